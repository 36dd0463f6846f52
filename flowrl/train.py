"""Trainer: the RL loop of flowrl, its checkpoints, resume and logging.

One epoch: pick prompts -> encode once -> roll out (sampler) -> decode -> rewards -> advantages ->
estimator terms (gradient accumulation, term by term) -> objective -> clip -> AdamW step -> EMA ->
old-policy soft update -> metrics -> eval every N epochs -> checkpoint.

Every random draw of an epoch is derived from (seed, epoch), so a resumed run draws exactly what an
uninterrupted one would: resume equality follows from restoring adapters and optimizer state.

Run folder layout (other tools rely on it)::

    OUT/pipeline.yaml             resolved configuration (every default filled in)
    OUT/metrics.jsonl             one JSON object per epoch
    OUT/checkpoints/epoch-N/      policy/old/ema adapters (model.finetune: full: whole transformer
                                  state dicts), optimizer, trainer state
    OUT/checkpoints/latest        the name of the newest complete checkpoint folder ("epoch-N")
    OUT/samples/epoch-N.png       sample grid at each evaluation

Reliability (docs/reliability.md): every file a resume reads is written atomically (temp + fsync +
rename), so a run killed at any moment resumes to exactly what an uninterrupted run computes; the
first SIGTERM/SIGINT finishes the epoch and checkpoints; non-finite steps are skipped and counted;
reward failures follow `train.on_reward_error`, never a silent zero.

The trainer's rooms move to flowrl/training/ (issue 19): checkpoint.py (atomic files, finding
checkpoints), resume.py (what a resume may change), rollout.py (seeds, encoding, sampling),
schedule.py (lr and old-policy decay), signals.py; the reward-failure policy is in
flowrl/rewards/scoring.py. This module re-exports their names.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import yaml

from flowrl import registry
from flowrl.config import Change, ResolvedPipeline, diff_configs
from flowrl.distributed import World, assemble, init_world, rank_positions, shard_problems
from flowrl.errors import FlowrlError, NumericalError, ResumeError, RewardError
from flowrl.policy import ADAPTERS, FlowPolicy
from flowrl.prompts import PromptSet, check_tag_weights, load_prompt_set, pick_prompts, prompt_tags, resolve_prompt_path
from flowrl.rewards.base import as_float_images, check_batch
from flowrl.rewards.mix import RewardMix, combine, mix_advantages, mix_metrics
from flowrl.rewards.scoring import describe_error, failed_of, score_reward, subset_output, whole_groups  # noqa: F401
from flowrl.training.checkpoint import (  # noqa: F401 - CHECKPOINTS, LATEST, STATE_FILE, latest_checkpoint: used by callers
    CHECKPOINTS, LATEST, STATE_FILE, checkpoint_epoch, fsync_path, latest_checkpoint, remove_scratch, remove_tree, write_atomic,
)
from flowrl.training.resume import (  # noqa: F401 - re-exported for callers
    IMPLICIT_SETTINGS, RESUME_FIXED, RESUME_FREE, check_checkpoint_finetune, check_resume_changes, plain, read_run_pipeline,
    resume_category, truncate_metrics, with_implicit_settings,
)
from flowrl.training.rollout import Pinned, decode_in_chunks, derive_seed, encode_batch, roll_out, rollout_autocast  # noqa: F401
from flowrl.training.schedule import learning_rate, old_policy_decay  # noqa: F401
from flowrl.training.signals import StopSignals  # noqa: F401
from flowrl.types import PromptBatch, RewardOutput, Rollout

#: Test hook, not a setting: seconds to pause in the middle of writing a checkpoint, so that tests
#: can kill the process while a checkpoint is half written.
CHECKPOINT_PAUSE_ENV = "FLOWRL_TEST_CHECKPOINT_PAUSE"


@dataclass(frozen=True)
class Stages:
    sampler: object
    estimator: object
    objective: object
    advantage: object
    rewards: RewardMix  # iterable: the reward stages in `rewards:` order
    eval_sampler: object


def build_stages(p: ResolvedPipeline) -> Stages:
    def make(kind: str, cfg):
        return registry.lookup(kind, cfg.kind)(cfg)

    estimator_cls = registry.lookup("estimator", p.estimator.kind)
    if p.estimator.kind == "trajectory":
        # It recomputes the rollout's step densities, so it must know which SDE drew them.
        estimator = estimator_cls(p.estimator, sampler_name=p.sampler.kind, sampler_config=p.sampler)
    else:
        estimator = estimator_cls(p.estimator)
    return Stages(
        sampler=make("sampler", p.sampler),
        estimator=estimator,
        objective=make("objective", p.objective),
        advantage=make("advantage", p.advantage),
        rewards=RewardMix(p.rewards),  # each reward (and its model) built once per run
        eval_sampler=make("sampler", p.eval_sampler),
    )


def _uses_cfg(*sampler_cfgs) -> bool:
    return any(getattr(c, "guidance", 1.0) != 1.0 for c in sampler_cfgs)


def group_order(group_ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random order of the images [B] that keeps each group's images together (groups shuffled,
    images within a group in place), so micro-batches and optimizer steps hold whole groups whenever
    their sizes are multiples of the group size (the graph check makes them so)."""
    groups = torch.unique(group_ids)
    perm = groups[torch.randperm(groups.numel(), generator=generator)]
    return torch.cat([torch.nonzero(group_ids == g).flatten() for g in perm])


def tag_metrics(mix, parts: dict, failures: dict[str, int], metadata) -> dict[str, float]:
    """Per-task-tag train scores, ``reward/<label>/tag/<tag>``, of every reward that summarises by
    tag (GenEval: strict accuracy per tag) and scored every image of the batch."""
    out: dict[str, float] = {}
    if not metadata:
        return out
    for label, reward in zip(mix.configs, mix.rewards, strict=True):
        summary = getattr(reward, "eval_summary", None)
        if summary is None or failures.get(label) or len(parts[label].scores) != len(metadata):
            continue  # a failed image has no verdict; with several processes only this rank's metadata is here
        for key, value in summary(parts[label], metadata).items():
            if key.startswith("tag/"):
                out[f"reward/{label}/{key}"] = value
    return out


# ---------------------------------------------- files that survive a kill: flowrl/training/checkpoint.py


def _pause_for_tests() -> None:
    seconds = os.environ.get(CHECKPOINT_PAUSE_ENV)
    if seconds:
        time.sleep(float(seconds))


# ------------------------------------------------------------------------------ numeric guards


def grads_finite(params: Sequence[torch.Tensor]) -> bool:
    """Whether every gradient of `params` is finite (parameters without a gradient count as finite).

    Sharded (FSDP) gradients are checked on this rank's shards only, without a collective; ranks
    agree on the answer through `World.any`.
    """
    grads = [_local(p.grad) for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)))


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def needs_reference(p: ResolvedPipeline) -> bool:
    """Whether training computes the reference velocity (which="ref"): the estimators do so only for
    a KL term with beta > 0. A full fine-tune keeps a copy of the base model just for it."""
    kl = getattr(p.objective, "kl", None)
    return kl is not None and kl.beta > 0


def check_text_encoding(spec: str, key: str) -> None:
    """Refuse a prompt file that is not UTF-8, naming the line of the first undecodable byte.

    Raises:
        FlowrlError: with file:line, the byte, and how to fix it.
    """
    try:
        path = resolve_prompt_path(spec)
        raw = path.read_bytes()
    except (FlowrlError, OSError):
        return  # load_prompt_set reports a missing file with its own message
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise FlowrlError(
            f"{key}: {path}:{line}: byte 0x{raw[err.start]:02x} at column {column} is not UTF-8 text; save the "
            "file as UTF-8 (one prompt per line) or remove the line"
        ) from None


def load_prompts(spec: str, key: str) -> PromptSet:
    """`load_prompt_set` with the pipeline key in the message and encoding problems located.

    Raises:
        FlowrlError: naming `key` (e.g. "prompts.train"), the file and line, and the fix.
    """
    check_text_encoding(spec, key)
    try:
        return load_prompt_set(spec)
    except FlowrlError as err:
        raise FlowrlError(f"{key}: {err}") from None


class Trainer:
    """Runs a resolved pipeline into a run folder.

    Args:
        pipeline: the validated pipeline.
        out: the run folder (default: the pipeline's `output`).
        resume: continue the run in `out` from its latest complete checkpoint (or from the start
            when it was stopped before its first checkpoint).
        log: where progress lines go.
        allow_changes: with `resume`, accept a pipeline that differs from the run's in settings
            that change what it learns (see `resume_category`).

    Attributes:
        stopped_by: after `run`, the signal that stopped it early ("SIGTERM"), or None.
        stopped_at: the last epoch completed (and checkpointed) when stopped early, else None.
    """

    def __init__(
        self,
        pipeline: ResolvedPipeline,
        out: Path | None = None,
        resume: bool = False,
        log: Callable[[str], None] = print,
        allow_changes: bool = False,
    ):
        self.p = pipeline
        self.cfg = pipeline.config
        self.out = Path(out or self.cfg.output)
        self.resume = resume
        self.allow_changes = allow_changes
        self._log = log
        self.world = World.single()  # joined to the launcher's process group in `run`
        self.skipped_total = 0  # optimizer steps skipped for non-finite values, whole run
        self.bad_in_a_row = 0  # consecutive skipped steps (train.max_bad_steps)
        self.global_step = 0  # optimizer steps taken, whole run (the old policy's decay counts them)
        self.stopped_by: str | None = None
        self.stopped_at: int | None = None
        self._changes: list[Change] = []
        self._saved_pipeline: dict | None = None

    def log(self, text: str) -> None:
        """Progress lines come from rank 0 only (every rank computes the same thing)."""
        if self.world.is_main:
            self._log(text)

    # ------------------------------------------------------------------------------------ setup

    def _check_folder(self) -> int:
        """Check the run folder before anything is loaded; returns the first epoch to run.

        Raises:
            FlowrlError: a new run into a folder that holds one; --allow-changes without --resume.
            ResumeError: --resume without a run to resume, or with a pipeline that changed.
        """
        cfg_file = self.out / "pipeline.yaml"
        if not self.resume:
            if self.allow_changes:
                raise FlowrlError("--allow-changes only applies to --resume (it accepts a changed pipeline for a resumed run)")
            if cfg_file.exists() or (self.out / CHECKPOINTS).exists():
                raise FlowrlError(
                    f"{self.out} already holds a run; pass --resume to continue it, or choose another output "
                    f"(--out NEW_FOLDER, or output=... on the command line)"
                )
            return 0
        ckpt = latest_checkpoint(self.out)
        if ckpt is None and not cfg_file.is_file():
            raise ResumeError(f"--resume: no complete checkpoint in {self.out / CHECKPOINTS}; start without --resume")
        try:
            self._saved_pipeline = read_run_pipeline(self.out)
        except ResumeError:
            if not self.allow_changes:
                raise
            self.log(f"--allow-changes: {cfg_file} is missing or unreadable; continuing with the pipeline given now")
        if self._saved_pipeline is not None:
            saved = with_implicit_settings(self._saved_pipeline)
            self._changes = diff_configs(saved, plain(self.p.to_dict()))
            model = saved.get("model") if isinstance(saved.get("model"), dict) else {}
            check_resume_changes(self._changes, self.allow_changes, self.out, model.get("finetune", "lora"))
        if ckpt is not None:
            check_checkpoint_finetune(ckpt[1], self.cfg.model.finetune)
        return 0 if ckpt is None else ckpt[0] + 1

    def _start_folder(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_atomic(self.out / "pipeline.yaml", yaml.safe_dump(self.p.to_dict(), sort_keys=False))

    def _record_changes(self, start: int) -> None:
        """After a resume with a changed pipeline: keep the old settings, write the new ones."""
        if not self._changes:
            if self.resume and self._saved_pipeline is None:  # lost or unreadable, resumed with --allow-changes
                self._start_folder()
            return
        self.log("resuming with changed settings:\n" + "\n".join(f"  {c.format()}" for c in self._changes))
        old_epochs = (self._saved_pipeline or {}).get("train", {}).get("epochs")
        o = self.cfg.optimizer
        if start > 0 and o.schedule != "constant" and isinstance(old_epochs, int) and old_epochs != self.cfg.train.epochs:
            before = learning_rate(start - 1, old_epochs, o.lr, o.schedule, o.warmup_epochs, o.min_lr_ratio)
            after = learning_rate(start, self.cfg.train.epochs, o.lr, o.schedule, o.warmup_epochs, o.min_lr_ratio)
            self.log(f"note: the {o.schedule} learning-rate schedule now spans {self.cfg.train.epochs} epochs: lr {before:.3g} at epoch {start - 1} -> {after:.3g} at epoch {start}")
        if self._saved_pipeline is not None:
            write_atomic(self.out / f"pipeline.before-epoch-{start}.yaml", yaml.safe_dump(self._saved_pipeline, sort_keys=False))
        write_atomic(self.out / "pipeline.yaml", yaml.safe_dump(self.p.to_dict(), sort_keys=False))

    def _setup(self) -> None:
        c = self.cfg
        # Prompt files first: a typo there should not wait for the model to load.
        self.train_set = load_prompts(c.prompts.train, "prompts.train")
        self.test_set = load_prompts(c.prompts.test, "prompts.test")
        self.train_tags = prompt_tags(self.train_set)
        if c.prompts.sampling == "by-tag" and self.train_tags is None:
            raise FlowrlError(
                f"prompts.sampling: by-tag needs a task tag for every train prompt, but {c.prompts.train} has none "
                "(a .txt set, or records without 'tag'); give a GenEval-metadata .jsonl set or use sampling: uniform"
            )
        if c.prompts.tag_weights and self.train_tags is not None:
            try:
                check_tag_weights(c.prompts.tag_weights, sorted(set(self.train_tags)))
            except ValueError as err:
                raise FlowrlError(f"prompts.tag_weights: {err} ({c.prompts.train}); fix the tag names or weights") from None
        if c.train.threads:
            torch.set_num_threads(c.train.threads)
        torch.manual_seed(c.train.seed)
        self.device = self.world.device
        # A full fine-tune on several processes is sharded (FSDP2); LoRA is replicated on every rank.
        mesh = self.world.mesh() if c.model.finetune == "full" and self.world.size > 1 else None
        self.policy = FlowPolicy.from_config(c.model, self.device, seed=c.train.seed, reference=needs_reference(self.p), mesh=mesh)
        if c.train.compile is True:  # "auto" was resolved in _resolve_machine_choices
            self.policy.compile()
        self.stages = build_stages(self.p)
        o = c.optimizer
        self.optimizer = torch.optim.AdamW(self.policy.trainable_parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)
        self.with_negative = _uses_cfg(self.p.sampler, self.p.eval_sampler, self.p.estimator)
        self.writer = None
        if c.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise FlowrlError(
                    "logging.tensorboard: true needs the tensorboard package; install it with "
                    "pip install 'flowrl[tensorboard]' or set logging.tensorboard: false"
                ) from None
            self.writer = SummaryWriter(str(self.out / "tensorboard"))

    # ------------------------------------------------------------------------------------- loop

    def run(self) -> Path:
        """Train from the first epoch still to run to `train.epochs`; returns the run folder.

        The first SIGTERM/SIGINT stops after the current epoch, checkpointed (see `stopped_by`).

        Raises:
            FlowrlError: bad input (folder, prompts, model), a refused resume, a reward failure
                under `on_reward_error: fail`, or too many non-finite steps in a row.
        """
        self.world = init_world()
        self._check_sharding()
        self._resolve_machine_choices()
        start = self._check_folder()
        self.world.barrier()  # every rank has read the folder before rank 0 writes into it
        epochs = self.cfg.train.epochs
        if start >= epochs:
            self.log(f"nothing to do: the run in {self.out} already finished epoch {start - 1} of train.epochs={epochs}; raise train.epochs to train longer")
            self.world.close()
            return self.out
        main = self.world.is_main
        with StopSignals(self.log) as stop:
            self._setup()
            if start == 0:
                if self.resume:
                    self.log(f"no checkpoint in {self.out} yet: starting the run again from epoch 0")
                    if main:
                        (self.out / "metrics.jsonl").unlink(missing_ok=True)
                if main:
                    self._start_folder()
            else:
                self._load_checkpoint(self.out / CHECKPOINTS / f"epoch-{start - 1}")
                if main:
                    truncate_metrics(self.out / "metrics.jsonl", start - 1)
                self.log(f"resumed from epoch {start - 1}")
            if main:
                self._record_changes(start)
            self._sync_adapters()
            self._loop(start, epochs, stop)
        if self.writer is not None:
            self.writer.close()
        self.world.barrier()  # no rank leaves before rank 0 has written the last checkpoint
        self.world.close()
        return self.out

    def _resolve_machine_choices(self) -> None:
        """Replace `train.rollout_precision: auto` and `train.compile: auto` by this machine's choices
        (flowrl/precision.py), so that the run's pipeline.yaml records what ran; logs each and why.

        Raises:
            FlowrlError: `train.compile: true` where it cannot run (see `decide_compile`).
        """
        from flowrl.precision import cpp_compiler, decide_compile, resolve

        t = self.cfg.train
        decision = resolve(t.rollout_precision, self.world.device)
        if self.world.size > 1:  # rank 0's probe decides for all, so every rank samples alike
            decision = self.world.gather_objects(decision)[0]
        if t.rollout_precision == "auto":
            self.log(f"rollout precision: {decision.precision} ({decision.reason})")
        kind = self.world.device.type
        cpu = kind == "cpu"
        compiled = decide_compile(
            t.compile, kind, self.cfg.model.finetune, t.epochs, cpp_compiler if cpu else lambda: None,
            torch.backends.cpu.get_cpu_capability() if cpu else "",
        )
        if t.compile == "auto":
            self.log(f"torch.compile: {'on' if compiled.enabled else 'off'} ({compiled.reason})")
        update = {"rollout_precision": decision.precision, "compile": compiled.enabled}
        if any(getattr(t, k) != v for k, v in update.items()):
            train = t.model_copy(update=update)
            self.p = replace(self.p, config=self.cfg.model_copy(update={"train": train}))
            self.cfg = self.p.config

    def _check_sharding(self) -> None:
        """Refuse a global batch the launched processes cannot share (see `shard_problems`).

        Raises:
            FlowrlError: naming the batch, the number of processes and the fix.
        """
        t = self.cfg.train
        problems = shard_problems(t.batch_size, t.steps_per_epoch, t.micro_batch, self.world.size, self.cfg.prompts.group_size)
        if problems:
            raise FlowrlError(f"train.batch_size: {problems[0]}")

    def _sync_adapters(self) -> None:
        """Start every rank from rank 0's adapters (they are equal by seeding; this makes it certain).

        A full fine-tune has nothing to broadcast: its copies are the base weights every rank loaded
        (or a checkpoint every rank read), and FSDP gives each rank its own shard of them.
        """
        if self.world.size > 1 and not self.policy.sharded:
            from flowrl.policy import ADAPTERS as names

            self.world.broadcast_([p for name in names for p in self.policy.adapter_params(name).values()])

    def _loop(self, start: int, epochs: int, stop: StopSignals) -> None:
        from flowrl.progress import count_progress

        main = self.world.is_main
        if self.world.any(stop.requested is not None):
            self.stopped_by = stop.requested or "a signal to another process"
            self.log(f"{self.stopped_by}: stopped before training started; nothing new to save")
            return
        # Rank 0 alone evaluates and writes checkpoints, unless the weights are sharded (FSDP): every
        # forward pass and every gathering of the weights then needs all ranks, so all join in.
        joins = main or self.policy.sharded
        if start == 0 and self.cfg.eval.every and joins:
            first = self.evaluate(-1)
            if main:
                self._write_metrics({"epoch": -1, **first})
        self.log(f"training epochs {start}..{epochs - 1} into {self.out}")
        progress = count_progress("train epochs", epochs - start) if main else contextlib.nullcontext(lambda n: None)
        with progress as advance:
            for epoch in range(start, epochs):
                metrics = self.train_epoch(epoch)
                last = epoch == epochs - 1
                evaluated = (self.cfg.eval.every and (epoch + 1) % self.cfg.eval.every == 0) or last
                if evaluated and joins:
                    metrics |= self.evaluate(epoch)
                if main:
                    self._write_metrics(metrics)
                self.log(format_metrics(metrics))
                if evaluated and main:
                    from flowrl.plots import plot_run

                    plot_run(self.out / "metrics.jsonl", self.out / "curves.png", title=self.cfg.name)
                stopping = self.world.any(stop.requested is not None)
                if stopping and stop.requested is None:
                    stop.requested = "a signal to another process"
                if ((self.cfg.checkpoint.every and (epoch + 1) % self.cfg.checkpoint.every == 0) or last or stopping) and joins:
                    self._save_checkpoint(epoch)
                advance(1)
                if stopping and not last:
                    self.stopped_by, self.stopped_at = stop.requested, epoch
                    self.log(f"{stop.requested}: stopped after epoch {epoch}; checkpoint {self.out / CHECKPOINTS / f'epoch-{epoch}'}")
                    return

    def _pick_prompts(self, epoch: int) -> PromptBatch:
        c = self.cfg
        n_prompts = c.train.batch_size // c.prompts.group_size
        rng = np.random.default_rng(derive_seed(c.train.seed, epoch, 1))
        chosen = pick_prompts(n_prompts, len(self.train_set), rng, self.train_tags, c.prompts.sampling, c.prompts.tag_weights)
        idx = np.repeat(chosen, c.prompts.group_size)
        meta = [self.train_set.metadata[i] for i in idx] if self.train_set.metadata else ()
        groups = torch.from_numpy(np.repeat(np.arange(n_prompts), c.prompts.group_size))
        return PromptBatch([self.train_set.prompts[i] for i in idx], groups, meta)

    def score(self, rollout: Rollout, epoch: int | None = None, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float], dict]:
        """Every reward of the mix on the rollout's images -> advantages [B], logged means, and
        the raw output of each reward by label (over the images kept for training).

        Failures follow `train.on_reward_error`: "fail" raises; "drop-group" gives every image of a
        group holding a failed image advantage 0 and leaves the group out of the means. Either
        way `reward/<label>/failures` counts the images each reward could not score.

        With several processes, each scores its own images and the scores, failures and group ids
        are all-gathered first: advantages [B] and the logged means are over the whole epoch
        batch (B = all ranks' images, in epoch order), identical on every rank.

        Args:
            rollout: this rank's images.
            epoch: for messages.
            positions: int64 [b], the epoch positions of the rollout's images; needed with
                several processes (None: the rollout is the whole batch).

        Raises:
            RewardError: a failure under "fail", or under "drop-group" one in every group.
        """
        batch = rollout.batch
        mix, policy = self.stages.rewards, self.cfg.train.on_reward_error
        images = as_float_images(rollout.images)
        check_batch(images, batch.prompts, batch.metadata)
        parts, failures, errors_of = {}, {}, {}
        failed = torch.zeros(images.shape[0], dtype=torch.bool)
        where = f"epoch {epoch}: " if epoch is not None else ""
        for label, reward in zip(mix.configs, mix.rewards, strict=True):
            out, bad, errors = score_reward(reward, label, images, batch.prompts, batch.metadata, policy)
            parts[label] = out
            failed |= bad.cpu()
            failures[label] = out.failures + int(bad.sum())
            errors_of[label] = errors
        group_ids = batch.group_ids
        if self.world.size > 1:
            parts, failed, failures, errors_of, group_ids = self._gather_scores(positions, parts, failed, failures, errors_of, group_ids)
        for label, errors in errors_of.items():
            bad = failed_of(parts[label])
            if bool(bad.any()):
                why = f" ({errors[0]}{f' and {len(errors) - 1} more' if len(errors) > 1 else ''})" if errors else " (non-finite scores)"
                self.log(f"{where}reward {label!r} failed on {int(bad.sum())} of {len(bad)} images{why}")
        batch = replace(batch, group_ids=group_ids)
        dropped = whole_groups(failed, batch.group_ids.cpu())
        n_groups = int(torch.unique(batch.group_ids).numel())
        n_dropped = int(torch.unique(batch.group_ids.cpu()[dropped]).numel())
        if n_dropped == n_groups:
            raise RewardError(
                f"{where}the rewards failed on images of every one of the {n_groups} prompt groups, so nothing is "
                "left to learn from (train.on_reward_error: drop-group); see the failures logged above and fix the reward"
            )
        if n_dropped:
            self.log(f"{where}dropped {n_dropped} of {n_groups} prompt groups (zero advantage, left out of reward means)")
        keep = torch.nonzero(~dropped).flatten()
        out = combine({k: subset_output(o, keep) for k, o in parts.items()}, mix.configs)
        group_ids = batch.group_ids[keep.to(batch.group_ids.device)]
        kept_adv = mix_advantages(out, self.cfg.train.reward_aggregation, lambda r: self.stages.advantage(r, group_ids))
        adv = torch.zeros(failed.shape[0], dtype=kept_adv.dtype, device=kept_adv.device)
        adv[keep.to(kept_adv.device)] = kept_adv
        metrics = mix_metrics(out)
        metrics |= tag_metrics(mix, parts, failures, batch.metadata)
        metrics |= {f"reward/{k}/failures": n for k, n in failures.items()}
        metrics["reward/dropped_groups"] = n_dropped
        return adv, metrics, dict(out.parts)

    def _gather_scores(self, positions, parts, failed, failures, errors_of, group_ids):
        """Every rank's reward outputs put together in epoch order (see `score`)."""
        if positions is None:
            raise ValueError("score() with several processes needs the epoch positions of the rollout's images")
        local = (positions.cpu(), {k: (o.scores.cpu(), {d: v.cpu() for d, v in o.details.items()}, o.failures) for k, o in parts.items()},
                 failed.cpu(), failures, errors_of, group_ids.cpu())
        ranks = self.world.gather_objects(local)
        pos = [r[0] for r in ranks]
        merged = {}
        for label in parts:
            outs = [r[1][label] for r in ranks]
            names = list(dict.fromkeys(d for o in outs for d in o[1]))
            details = {
                d: assemble([o[1].get(d, torch.full_like(o[0].float(), float("nan"))) for o in outs], pos) for d in names
            }
            merged[label] = RewardOutput(assemble([o[0] for o in outs], pos), details, sum(o[2] for o in outs))
        return (
            merged,
            assemble([r[2] for r in ranks], pos),
            {label: sum(r[3][label] for r in ranks) for label in parts},
            {label: [e for r in ranks for e in r[4][label]] for label in parts},
            assemble([r[5] for r in ranks], pos),
        )

    def _step(self, rollout: Rollout, adv: torch.Tensor, step_idx: torch.Tensor, epoch: int, step: int, offset: int = 0) -> tuple[dict[str, float], float | None, str | None]:
        """Accumulate the gradient of one optimizer step, term by term.

        With several processes `step_idx` is this rank's share of the step, starting at position
        `offset` of the step's images: micro-batch m draws the estimator noise of micro-batch
        `offset + m` of the single-process step, and the gradients (each rank's scaled as if its
        share were the whole step) are averaged over ranks, so the update is the single-process one.
        Sharded (FSDP), every rank must run the same backward passes: the ranks agree on each
        finiteness check, so that they all stop the step together or none does.

        Returns:
            (metric sums of the step, the clipped gradient norm, None) when every loss and
            gradient was finite; else ({}, None, what went wrong and where).
        """
        c = self.cfg
        kl_cfg = getattr(self.p.objective, "kl", None)
        per_step = len(step_idx)
        params = self.policy.trainable_parameters()
        sums: dict[str, float] = defaultdict(float)
        self.optimizer.zero_grad(set_to_none=True)
        bad = None
        for m in range(0, per_step, c.train.micro_batch):
            idx = step_idx[m : m + c.train.micro_batch]
            sub = rollout.subset(idx)
            gen = torch.Generator(device="cpu").manual_seed(derive_seed(c.train.seed, epoch, 4, step, offset + m))
            for j, terms in enumerate(self.stages.estimator(sub, self.policy, kl_cfg, gen)):
                out = self.stages.objective(terms, adv[idx])
                where = (
                    f"micro-batch {(offset + m) // c.train.micro_batch} (images {offset + m}..{offset + m + len(idx) - 1} of the step), "
                    f"term {j} (mean t={float(terms.t.float().mean()):.3g}) of objective {self.p.objective.kind!r}"
                )
                finite = bool(torch.isfinite(out.loss.detach()))
                if not self._agreed(finite):
                    bad = (
                        f"non-finite loss ({float(out.loss.detach()):g}) in {where}"
                        if not finite
                        else f"a non-finite loss on another process in {where}"
                    )
                    break
                (out.loss * (len(idx) / per_step)).backward()
                if not self._agreed(grads_finite(params)):
                    bad = f"non-finite gradient from the backward pass of {where}"
                    break
                for k, v in out.metrics.items():
                    sums[k] += float(v) * terms.weight * len(idx) / per_step
            if bad is not None:
                break
        if self.world.size > 1:
            bad = self._average_step(params, sums, bad)
        if bad is not None:
            return {}, None, bad
        norm = torch.nn.utils.clip_grad_norm_(params, c.optimizer.grad_clip)
        if self.policy.sharded:  # a DTensor: the norm over every rank's shards
            norm = norm.full_tensor()
        if not bool(torch.isfinite(norm)):
            return {}, None, f"non-finite gradient norm ({float(norm):g})"
        return dict(sums), float(norm), None

    def _agreed(self, ok: bool) -> bool:
        """`ok` on every rank when the weights are sharded (one rank leaving the micro-batch loop alone
        would leave the others waiting in FSDP's collectives); else this rank's `ok`, no collective."""
        if self.policy.sharded:
            return not self.world.any(not ok)
        return ok

    def _average_step(self, params: Sequence[torch.nn.Parameter], sums: dict[str, float], bad: str | None) -> str | None:
        """Make every rank agree on a step: skipped by all when any rank saw a non-finite value,
        else gradients and metric sums averaged over ranks, in place. Returns the reason to skip.

        Sharded (FSDP), the backward passes already averaged the gradients (reduce-scatter): only the
        metric sums are averaged here.
        """
        if self.world.any(bad is not None):
            return bad or f"a non-finite loss or gradient on another process (this is rank {self.world.rank})"
        if self.policy.sharded:
            grads = []
        else:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [p.grad for p in params]
        keys = sorted(sums)
        values = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
        self.world.average_(grads + [values])
        sums.update(zip(keys, values.tolist()))
        return None

    def _skip(self, epoch: int, step: int, why: str) -> None:
        """Count a skipped step; raise once `train.max_bad_steps` steps in a row were skipped."""
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_total += 1
        self.bad_in_a_row += 1
        limit = self.cfg.train.max_bad_steps
        self.log(f"epoch {epoch} step {step}: skipped the update: {why} ({self.bad_in_a_row} in a row; train.max_bad_steps: {limit})")
        if self.bad_in_a_row >= limit:
            found = latest_checkpoint(self.out)
            ckpt = f"the last checkpoint is {found[1]}" if found else "no checkpoint was written yet"
            raise NumericalError(
                f"training stopped at epoch {epoch} step {step}: {self.bad_in_a_row} optimizer steps in a row had "
                f"non-finite loss or gradients (train.max_bad_steps: {limit}); the last: {why}. Skipped steps do not "
                f"change the weights, and {ckpt}. Usual causes: a learning rate too high (optimizer.lr), rewards or "
                "advantages of a large scale (rewards.*.scale, advantage), or overflow in low precision (model.dtype, "
                "train.rollout_precision). Fix the cause and continue with --resume, or raise train.max_bad_steps"
            )

    def sample(self, batch: PromptBatch, positions: torch.Tensor, epoch: int) -> Rollout:
        """The training rollout of `batch`, whose images sit at `positions` (int64 [b]) of the epoch:
        encoded, then sampled by `train.rollout_policy` without grad in `train.rollout_precision`.
        Image i of the epoch always gets the seed derive_seed(seed, epoch, 2, i), on any rank."""
        c = self.cfg
        cond = encode_batch(self.policy, list(batch.prompts), self.with_negative)
        seeds = [derive_seed(c.train.seed, epoch, 2, i) for i in positions.tolist()]
        self.policy.transformer.eval()
        with torch.no_grad(), rollout_autocast(self.device, c.train.rollout_precision):
            return roll_out(self.policy, self.stages.sampler, batch, cond, seeds, c.train.rollout_policy, c.train.micro_batch)

    def train_epoch(self, epoch: int) -> dict:
        c = self.cfg
        t0 = time.perf_counter()
        world = self.world
        batch = self._pick_prompts(epoch)
        order = group_order(batch.group_ids, torch.Generator().manual_seed(derive_seed(c.train.seed, epoch, 3)))
        if world.size == 1:
            mine = torch.arange(len(batch.prompts))
        else:  # this rank's share of every step; sampled in epoch order, trained in step order
            ranked = rank_positions(order, c.train.steps_per_epoch, world.size, world.rank)
            mine = torch.sort(ranked).values
            order = torch.searchsorted(mine, ranked)
            batch = batch.subset(mine)
        rollout = self.sample(batch, mine, epoch)
        t_roll = time.perf_counter()
        adv, metrics, _ = self.score(rollout, epoch, positions=mine if world.size > 1 else None)
        adv_all = adv
        if world.size > 1:
            adv = adv[mine.to(adv.device)]
        adv = adv.to(self.device)
        t_reward = time.perf_counter()

        per_step = c.train.batch_size // c.train.steps_per_epoch // world.size
        sums: dict[str, float] = defaultdict(float)
        grad_norms, skipped = [], 0
        o = c.optimizer
        lr = learning_rate(epoch, c.train.epochs, o.lr, o.schedule, o.warmup_epochs, o.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.policy.activate("policy")
        for step in range(c.train.steps_per_epoch):
            step_sums, norm, bad = self._step(rollout, adv, order[step * per_step : (step + 1) * per_step], epoch, step, world.rank * per_step)
            if bad is not None:
                skipped += 1
                self._skip(epoch, step, bad)
                continue
            self.bad_in_a_row = 0
            self.optimizer.step()
            self.global_step += 1
            grad_norms.append(norm)
            for k, v in step_sums.items():
                sums[k] += v
            self.policy.blend_adapter("ema", "policy", c.train.ema_decay)
        decay = old_policy_decay(self.global_step, c.train.old.rate, c.train.old.max, c.train.old.start)
        self.policy.blend_adapter("old", "policy", decay)
        t_train = time.perf_counter()

        good = c.train.steps_per_epoch - skipped
        metrics = {"epoch": epoch, **metrics}
        metrics |= {f"train/{k}": v / good for k, v in sums.items()}
        metrics["loss"] = metrics.pop("train/loss", float("nan"))
        metrics["train/grad_norm"] = float(np.mean(grad_norms)) if grad_norms else float("nan")
        metrics["train/skipped_steps"] = skipped
        metrics["train/skipped_total"] = self.skipped_total
        metrics["train/old_decay"] = decay
        metrics["train/global_step"] = self.global_step
        metrics["train/lr"] = lr
        metrics["advantage/abs_mean"] = float(adv_all.abs().mean())
        metrics["time/rollout_s"] = t_roll - t0
        metrics["time/reward_s"] = t_reward - t_roll
        metrics["time/train_s"] = t_train - t_reward
        metrics["time/epoch_s"] = t_train - t0
        return metrics

    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict:
        """Sample the test prompts with the eval sampler and weights; score with every reward.

        A reward that raises follows `train.on_reward_error`: "fail" stops the run; "drop-group"
        leaves that reward out of this evaluation and logs `eval/<label>/failures` (all images).

        Sharded weights (FSDP): every rank samples the same images (each forward pass needs all
        ranks); rank 0 alone scores them, and the other ranks return {}.
        """
        c = self.cfg
        t0 = time.perf_counter()
        test = self.test_set
        n = min(len(test), c.eval.limit or len(test))
        k = c.eval.images_per_prompt
        idx = np.repeat(np.arange(n), k)
        meta = [test.metadata[i] for i in idx] if test.metadata else ()
        batch = PromptBatch([test.prompts[i] for i in idx], torch.from_numpy(idx), meta)
        cond = encode_batch(self.policy, list(batch.prompts), self.with_negative)
        seeds = [c.eval.seed + i for i in range(len(idx))]  # as `flowrl eval` and `flowrl toy sample`: image i, seed + i
        which = c.eval.weights
        rollout = roll_out(self.policy, self.stages.eval_sampler, batch, cond, seeds, which, max(c.train.micro_batch, 64))
        self.policy.activate("policy")
        if not self.world.is_main:
            return {}
        out: dict[str, float] = {}
        marks = None
        for reward in self.stages.rewards:
            label = reward.config.label
            try:
                res = reward(rollout.images, batch.prompts, batch.metadata)
                summary = reward.eval_summary(res, batch.metadata) if hasattr(reward, "eval_summary") else {"": float(res.scores.mean())}
            except FlowrlError:
                raise
            except Exception as err:
                if c.train.on_reward_error == "fail":
                    raise RewardError(
                        f"reward {label!r} raised {describe_error(err)} while evaluating epoch {epoch}; fix the reward, or "
                        "set train.on_reward_error: drop-group to skip a failing reward's evaluation"
                    ) from err
                self.log(f"evaluation of epoch {epoch}: reward {label!r} failed ({describe_error(err)}); left out of this evaluation")
                out[f"eval/{label}/failures"] = len(idx)
                continue
            for key, value in summary.items():
                out[f"eval/{label}" + (f"/{key}" if key else "")] = value
            if "strict" in res.details and marks is None:
                marks = [bool(x) for x in res.details["strict"].tolist()]
        out["time/eval_s"] = time.perf_counter() - t0
        if c.logging.sample_grid:
            from flowrl.viz import save_grid

            save_grid(rollout.images[:64], self.out / "samples" / f"epoch-{epoch}.png", marks=marks[:64] if marks else None)
        return out

    # ----------------------------------------------------------------------------- persistence

    def _write_metrics(self, metrics: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.writer is not None:
            for k, v in metrics.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, metrics["epoch"])

    def _save_checkpoint(self, epoch: int) -> Path:
        """Write checkpoints/epoch-N so that it exists only once complete, point `latest` at it,
        then delete checkpoints beyond `checkpoint.keep_last`.

        Order (each step atomic, so a kill at any point leaves a consistent folder): files into a
        temporary folder, fsync each and the folder, rename to epoch-N, fsync checkpoints/, rewrite
        `latest`, prune. Scratch left by a killed write is dot-named and removed by the next write.

        A full fine-tune writes whole transformer state dicts and the optimizer state keyed by
        parameter name, both independent of the number of processes. Sharded, every rank calls
        this: the weights and optimizer state are gathered to rank 0, which alone writes.
        """
        from safetensors.torch import save_file

        full, main = self.policy.full is not None, self.world.is_main
        root = self.out / CHECKPOINTS
        final = root / f"epoch-{epoch}"
        tmp = root / f".tmp-epoch-{epoch}"
        if main:
            root.mkdir(parents=True, exist_ok=True)
            remove_scratch(root)
            tmp.mkdir()
        meta = {"epoch": str(epoch), "base_model": self.cfg.model.path, "rank": str(self.cfg.model.lora.rank), "alpha": str(self.cfg.model.lora.alpha)}
        if full:  # no LoRA rank or alpha: `flowrl export-lora` reads "finetune" to refuse these files
            meta = {"epoch": str(epoch), "base_model": self.cfg.model.path, "finetune": "full"}
        for name in ADAPTERS:  # one at a time: a full fine-tune's state dicts are whole models
            state = {k: v.contiguous().cpu() for k, v in self.policy.adapter_state(name).items()}  # gathered to rank 0 when sharded
            if main:
                save_file(state, tmp / f"{name}.safetensors", metadata=meta)
            del state
        if main:
            _pause_for_tests()
        optimizer = self.policy.full.optimizer_state(self.optimizer) if full else self.optimizer.state_dict()
        if not main:
            return final
        torch.save(optimizer, tmp / "optimizer.pt")
        state = {
            "epoch": epoch,
            "torch_rng": torch.get_rng_state().tolist(),
            "skipped_total": self.skipped_total,
            "bad_in_a_row": self.bad_in_a_row,
            "global_step": self.global_step,
            "finetune": self.cfg.model.finetune,
        }
        (tmp / STATE_FILE).write_text(json.dumps(state))  # last: its presence marks a complete folder
        for f in tmp.iterdir():
            fsync_path(f)
        fsync_path(tmp)
        if final.exists():  # the same epoch again (a resume redid it): swap, never half-delete
            final.rename(root / f".old-epoch-{epoch}")
        tmp.rename(final)
        fsync_path(root)
        write_atomic(root / LATEST, final.name + "\n")
        self._prune(root, final)
        remove_scratch(root)
        return final

    def _prune(self, root: Path, keep: Path) -> None:
        """Delete all but the newest `checkpoint.keep_last` checkpoints (never `keep`)."""
        found = sorted((e, p) for p in root.iterdir() if p.is_dir() and (e := checkpoint_epoch(p.name)) is not None)
        for _, old in found[: -self.cfg.checkpoint.keep_last]:
            if old != keep:
                remove_tree(old)

    def _load_checkpoint(self, path: Path) -> None:
        """Restore the weights, optimizer state and trainer state of a checkpoint folder. A full
        fine-tune's files are whole state dicts: every rank reads them and keeps its shard."""
        from safetensors.torch import load_file

        if self.policy.full is not None:
            for name in ADAPTERS:
                self.policy.load_adapter_state(name, load_file(path / f"{name}.safetensors"))
            self.policy.full.load_optimizer_state(self.optimizer, torch.load(path / "optimizer.pt", map_location="cpu"))
        else:
            for name in ADAPTERS:
                self.policy.load_adapter_state(name, {k: v.to(self.device) for k, v in load_file(path / f"{name}.safetensors").items()})
            self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.device))
        state = json.loads((path / STATE_FILE).read_text())
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        self.skipped_total = int(state.get("skipped_total", 0))  # absent in checkpoints of older versions
        self.bad_in_a_row = int(state.get("bad_in_a_row", 0))
        # Absent before the decay counted optimizer steps: every step of epochs 0..N not skipped.
        steps_done = (int(state["epoch"]) + 1) * self.cfg.train.steps_per_epoch - self.skipped_total
        self.global_step = int(state.get("global_step", steps_done))


def format_metrics(m: dict) -> str:
    parts = [f"epoch {m['epoch']}"]
    for key in ("reward/mean", "loss", "train/ratio_mean", "time/epoch_s"):
        if key in m and isinstance(m[key], float) and math.isfinite(m[key]):
            parts.append(f"{key}={m[key]:.4g}")
    parts += [f"{k}={v:.3f}" for k, v in m.items() if k.startswith("eval/") and k.count("/") == 1]
    return "  ".join(parts)
