"""What a resume may change (and what never), the saved pipeline it compares against, and the
metrics lines it keeps."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from flowrl.config import Change
from flowrl.errors import ResumeError
from flowrl.training.checkpoint import STATE_FILE, write_atomic

# ------------------------------------------------------------------------------- resume policy

#: Settings a resume may change freely: they do not change what the run learns (train.epochs only
#: lengthens or shortens the schedule; with a cosine schedule the remaining epochs follow the new one).
RESUME_FREE = (
    "name", "output", "train.epochs", "train.threads", "train.compile", "train.rollout_precision", "train.max_bad_steps", "train.on_reward_error",
    "model.gradient_checkpointing", "prompts.test", "eval", "logging", "checkpoint",
)
#: Settings no resume may change, not even with --allow-changes: the saved adapters have their
#: shape, and a checkpoint holds either LoRA adapters or whole transformers (model.finetune).
RESUME_FIXED = ("model.lora", "model.finetune")
#: What a run folder's pipeline.yaml means where it lacks a setting added to flowrl later: the
#: value every run of the versions before it had.
IMPLICIT_SETTINGS = {("model", "finetune"): "lora", ("prompts", "tag_weights"): None, ("train", "old", "start"): 0}

ResumeCategory = Literal["free", "guarded", "fixed"]


def _under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def resume_category(key: str, finetune: str = "lora") -> ResumeCategory:
    """How a resume treats a change of the dotted `key`: "free" (always allowed), "fixed" (never),
    or "guarded" (it changes what the run learns: only with --allow-changes).

    Args:
        key: the dotted key.
        finetune: the run's model.finetune; a full fine-tune ignores model.lora, so changes of it
            are free there.
    """
    if finetune == "full" and _under(key, ("model.lora",)):
        return "free"
    if _under(key, RESUME_FIXED):
        return "fixed"
    if _under(key, RESUME_FREE):
        return "free"
    return "guarded"


def with_implicit_settings(saved: dict) -> dict:
    """A run's saved pipeline (plain data) with the settings that older flowrl versions did not write
    filled in at the values those versions used (`IMPLICIT_SETTINGS`), so that a run started before
    a setting existed resumes without a spurious change."""
    import copy

    out = copy.deepcopy(saved)
    for path, value in IMPLICIT_SETTINGS.items():
        node = out
        for part in path[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.setdefault(path[-1], value)
    return out


def check_resume_changes(changes: Sequence[Change], allow_changes: bool, run: Path, finetune: str = "lora") -> None:
    """Refuse a resume whose pipeline differs from the run's in a way that is not allowed.

    Args:
        changes: the differences between the run's pipeline.yaml (old) and the new pipeline.
        allow_changes: the user passed --allow-changes.
        run: the run folder (for the message).
        finetune: the run's model.finetune (see `resume_category`).

    Raises:
        ResumeError: a change of a fixed setting, or of a guarded one without `allow_changes`;
            the message lists each as ``key: old -> new`` and says how to proceed.
    """
    fixed = [c for c in changes if resume_category(c.key, finetune) == "fixed"]
    guarded = [c for c in changes if resume_category(c.key, finetune) == "guarded"]
    saved = run / "pipeline.yaml"
    if fixed:
        why = []
        if any(_under(c.key, ("model.lora",)) for c in fixed):
            why.append("the saved adapters have the old shape")
        if any(_under(c.key, ("model.finetune",)) for c in fixed):
            why.append(
                "the checkpoints hold what the old model.finetune trains (LoRA adapters, or whole transformers "
                "for full), which the other kind of fine-tune cannot continue from"
            )
        reason = "; ".join(why)
        raise ResumeError(
            f"--resume: the pipeline changes what the run in {run} trains ({saved}):\n"
            + "".join(f"  {c.format()}\n" for c in fixed)
            + f"{reason[0].upper()}{reason[1:]}, so this cannot be resumed, not even with "
            "--allow-changes. Undo the change, or start a new run in another folder (--out NEW_FOLDER)."
        )
    if guarded and not allow_changes:
        raise ResumeError(
            f"--resume: the pipeline differs from the one the run in {run} was trained with ({saved}), "
            "in settings that change what it learns:\n"
            + "".join(f"  {c.format()}\n" for c in guarded)
            + "Continuing would mix two experiments in one run. To proceed, either undo these changes "
            f"(the run's settings are in {saved}), start a new run in another folder (--out NEW_FOLDER), "
            "or, if you mean to change the experiment midway (e.g. a curriculum), pass --allow-changes: the "
            "run then continues with the new settings and keeps the old ones as pipeline.before-epoch-N.yaml. "
            "Changes of train.epochs, eval, logging and checkpoint settings are always allowed."
        )


def check_checkpoint_finetune(checkpoint: Path, finetune: str) -> None:
    """Refuse to load a checkpoint of the other kind of fine-tune (LoRA adapters vs whole transformers).

    The pipeline check of a resume already refuses a change of model.finetune; this one reads the
    checkpoint's own record, so it also holds when the run's pipeline.yaml is lost (--allow-changes).
    Checkpoints of versions before full fine-tuning record nothing: they are LoRA.

    Raises:
        ResumeError: naming both kinds and the way forward.
    """
    try:
        saved = json.loads((checkpoint / STATE_FILE).read_text()).get("finetune", "lora")
    except (OSError, ValueError, AttributeError):
        return  # an unreadable state fails later with its own message
    if saved != finetune:
        raise ResumeError(
            f"--resume: {checkpoint} was written by a model.finetune: {saved} run, but the pipeline says "
            f"model.finetune: {finetune}; a {saved} checkpoint cannot continue as a {finetune} fine-tune. Set "
            f"model.finetune: {saved} to continue the run, or start a new run in another folder (--out NEW_FOLDER)"
        )


def read_run_pipeline(run: Path) -> dict:
    """The resolved pipeline a run folder was started with (OUT/pipeline.yaml), as plain data.

    Raises:
        ResumeError: the file is missing or is not a YAML mapping.
    """
    path = run / "pipeline.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ResumeError(
            f"--resume: cannot read the run's settings {path} ({type(err).__name__}: {err}); --resume checks "
            "that the pipeline did not change. Restore the file, or pass --allow-changes to continue with "
            "the pipeline given now"
        ) from None
    if not isinstance(data, dict):
        raise ResumeError(f"--resume: {path} is not a mapping of settings; restore it, or pass --allow-changes")
    return data


def plain(data: Any) -> Any:
    """Data as a YAML round trip gives it back (tuples become lists), for comparison with a file."""
    return yaml.safe_load(yaml.safe_dump(data, sort_keys=False))


def truncate_metrics(path: Path, last_epoch: int) -> None:
    """Drop metrics lines of epochs after `last_epoch` (written after the checkpoint we resume),
    and a torn last line of a killed write; the file is replaced atomically."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # only a write cut by a kill leaves a partial line
        if isinstance(row, dict) and isinstance(row.get("epoch"), int) and row["epoch"] <= last_epoch:
            keep.append(line)
    write_atomic(path, "".join(line + "\n" for line in keep))
