"""The design-space study on the embedded toy model (issue 6): which combinations run, what they cost,
when each run reaches a score, whether it hacked the reward, and the report.

The paper (../shared/reference/METHOD.md) varies three axes: the policy-gradient objective (epg,
pepg, par, grpo), the likelihood estimator (elbo, trajectory) and the rollout sampler (dpm2 ODE,
flow-sde, flow-sde + CFG 4.5); beside the grid run three baselines with their own pipelines:
FlowGRPO's recipe (pipelines/toy-flowgrpo.yaml), DiffusionNFT (toy-nft.yaml) and AWM (toy-awm.yaml).
Every grid combination is pipelines/toy-geneval.yaml (the paper's recipe on the toy) with the
three axes overridden, so that nothing else differs. The pipeline's own graph check decides which
combinations exist; the refused ones are reported with its message.

Everything here is a small function of plain data, so tests can check it without training:
planning (`design_combos`, `check_combo`, `CostModel`, `plan_study`), reading runs (`load_run`),
statistics (`time_to_threshold`, `aggregate_reach`, `time_ratio`), the guard (`image_stats`,
`Guard`) and the report (`render_results`, `plot_curves`). ``benchmarks/design_space.py`` trains
and evaluates. Nothing here loads weights.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from flowrl.errors import FlowrlError

#: The repository's pipelines folder.
PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"

# ------------------------------------------------------------------------------ combinations

OBJECTIVES: tuple[str, ...] = ("epg", "pepg", "par", "grpo")
ESTIMATORS: tuple[str, ...] = ("elbo", "trajectory")
#: Rollout sampler steps of every grid combination (the paper: 10).
ROLLOUT_STEPS = 10
#: Flow-SDE noise level a (FlowGRPO's 0.7).
SDE_NOISE_LEVEL = 0.7
#: CFG scale of the "flow-sde + CFG" sampler (FlowGRPO's 4.5).
CFG_SCALE = 4.5
#: Share of the 10 grid times each estimator scores per image: toy-geneval's 0.3 (3 terms), for
#: both estimators, so that they cost the same and only the estimator differs.
TERM_FRACTION = 0.3

Role = Literal["grid", "paper", "flowgrpo", "nft", "awm"]


@dataclass(frozen=True)
class SamplerSpec:
    """One value of the sampler axis.

    Attributes:
        name: the slug used in combination names ("flow-sde-cfg").
        kind: the registered sampler.
        guidance: CFG scale of the rollouts (1 = off); the estimator scores with the same scale.
        label: how the paper's table names it ("ODE", "SDE", "SDE+CFG").
    """

    name: str
    kind: str
    guidance: float
    label: str

    def section(self) -> str:
        """The `sampler` section as a YAML flow mapping (an override value)."""
        noise = f", noise_level: {SDE_NOISE_LEVEL}" if self.kind == "flow-sde" else ""
        return f"{{kind: {self.kind}, steps: {ROLLOUT_STEPS}, guidance: {self.guidance}{noise}}}"


SAMPLERS: tuple[SamplerSpec, ...] = (
    SamplerSpec("dpm2", "dpm2", 1.0, "ODE (dpm2)"),
    SamplerSpec("flow-sde", "flow-sde", 1.0, "SDE"),
    SamplerSpec("flow-sde-cfg", "flow-sde", CFG_SCALE, "SDE+CFG"),
)


@dataclass(frozen=True)
class Combo:
    """One combination of the study: a pipeline file plus overrides.

    Attributes:
        name: folder name under the study's output, e.g. "pepg-elbo-dpm2".
        loss: the objective, as the table shows it.
        estimator: the likelihood estimator, as the table shows it.
        sampler: the rollout sampler, as the table shows it.
        pipeline: file name in pipelines/.
        overrides: key=value overrides applied to that file.
        role: "grid", or which reference recipe it is.
    """

    name: str
    loss: str
    estimator: str
    sampler: str
    pipeline: str
    overrides: tuple[str, ...] = ()
    role: Role = "grid"


PAPER = "pepg-elbo-dpm2"
FLOWGRPO = "flowgrpo-recipe"
NFT = "nft"
AWM = "awm"
#: --quick: the paper's recipe, the three baselines and the FlowGRPO-style trajectory combination.
QUICK: tuple[str, ...] = (PAPER, FLOWGRPO, NFT, AWM, "epg-trajectory-flow-sde")
#: --tiny (the smoke test): the paper's recipe and FlowGRPO's, which exercise both estimators.
TINY: tuple[str, ...] = (PAPER, FLOWGRPO)
#: --tiny shrinks every pipeline to seconds (tests/integration/test_train.py's TINY, less eval).
TINY_OVERRIDES: tuple[str, ...] = (
    "train.batch_size=8", "prompts.group_size=4", "train.micro_batch=4", "sampler.steps=3",
    "estimator.timestep_fraction=0.5",
)


def grid_combo(objective: str, estimator: str, sampler: SamplerSpec) -> Combo:
    """A grid combination: toy-geneval.yaml with the three axes overridden.

    The estimator scores with the sampler's CFG scale (the likelihood of the policy that sampled),
    and both estimators score TERM_FRACTION of the grid times.
    """
    if estimator == "elbo":
        est = (f"estimator.timestep_fraction={TERM_FRACTION}", f"estimator.guidance={sampler.guidance}")
    else:
        est = (
            f"estimator={{kind: trajectory, timestep_fraction: {TERM_FRACTION}, reduction: mean, "
            f"guidance: {sampler.guidance}}}",
        )
    name = f"{objective}-{estimator}-{sampler.name}"
    return Combo(
        name=name,
        loss=objective.upper(),
        estimator="ELBO" if estimator == "elbo" else "Traj",
        sampler=sampler.label,
        pipeline="toy-geneval.yaml",
        overrides=(f"objective.kind={objective}", f"sampler={sampler.section()}", *est),
        role="paper" if name == PAPER else "grid",
    )


def design_combos() -> list[Combo]:
    """Every combination of the study in the paper's table order (loss, estimator, sampler), then
    the baselines. Refused combinations are included; `check_combo` finds them."""
    grid = [grid_combo(o, e, s) for o in OBJECTIVES for e in ESTIMATORS for s in SAMPLERS]
    baselines = [
        Combo(FLOWGRPO, "GRPO (FlowGRPO recipe)", "Traj", "SDE+CFG", "toy-flowgrpo.yaml", role="flowgrpo"),
        Combo(NFT, "NFT (DiffusionNFT)", "- (velocity)", "ODE (dpm2)", "toy-nft.yaml", role="nft"),
        Combo(AWM, "AWM", "- (velocity)", "ODE (dpm2)", "toy-awm.yaml", role="awm"),
    ]
    return grid + baselines


def select_combos(combos: Sequence[Combo], names: Sequence[str]) -> list[Combo]:
    """The combinations named, in the study's order.

    Raises:
        FlowrlError: a name that is no combination (with the nearest names).
    """
    import difflib

    known = {c.name: c for c in combos}
    unknown = [n for n in names if n not in known]
    if unknown:
        near = difflib.get_close_matches(unknown[0], list(known), n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise FlowrlError(f"no combination {unknown[0]!r}{hint} Combinations: {', '.join(known)}")
    wanted = set(names)
    return [c for c in combos if c.name in wanted]


@dataclass(frozen=True)
class GridEntry:
    """A combination checked by the pipeline loader and its graph check.

    Attributes:
        combo: the combination.
        overrides: every override it was checked with (the combination's, then the study's).
        pipeline: the ResolvedPipeline, or None when refused.
        refused: the loader's message when refused (the graph check's, for a contradiction).
    """

    combo: Combo
    overrides: tuple[str, ...]
    pipeline: Any = None
    refused: str | None = None


def check_combo(combo: Combo, extra: Sequence[str] = (), pipelines: Path = PIPELINES, batch: int | None = None) -> GridEntry:
    """Resolve a combination with the real loader (schema and graph check); no weights are loaded.

    Args:
        combo: the combination.
        extra: study-wide overrides applied after the combination's (e.g. TINY_OVERRIDES).
        pipelines: folder of the pipeline files.
        batch: images per epoch for this run; the micro-batch shrinks to fit (see `batch_overrides`).

    Returns:
        A GridEntry with the pipeline, or with `refused` holding every problem the loader found.
    """
    from flowrl.config import ConfigError, load_pipeline

    path = pipelines / combo.pipeline
    overrides = (*combo.overrides, *extra)
    try:
        p = load_pipeline(path, overrides)
        if batch is not None and batch != p.config.train.batch_size:
            overrides = (*overrides, *batch_overrides(p, batch))
            p = load_pipeline(path, overrides)
    except ConfigError as err:
        return GridEntry(combo, overrides, refused="; ".join(f"{i.key}: {i.message}" for i in err.issues))
    return GridEntry(combo, overrides, pipeline=p)


def batch_overrides(p: Any, batch: int) -> tuple[str, ...]:
    """Overrides that set `batch` images per epoch, with the largest micro-batch up to the pipeline's
    own that divides one optimizer step's images (and holds whole groups under per-group noise).

    When no micro-batch fits, only the batch is set and the graph check explains the problem.
    """
    t = p.config.train
    per_step = batch // t.steps_per_epoch if batch % t.steps_per_epoch == 0 else 0
    group = p.config.prompts.group_size if getattr(p.estimator, "noise", None) == "per-group" else 1
    fits = [m for m in range(min(t.micro_batch, per_step), 0, -1) if per_step % m == 0 and m % group == 0]
    return (f"train.batch_size={batch}",) + ((f"train.micro_batch={fits[0]}",) if fits else ())


# ----------------------------------------------------------------------------------- budget


@dataclass(frozen=True)
class CostModel:
    """Seconds of the toy model's work on this project's 2-core machine.

    Measured on toy-geneval at batch 256 with bf16 rollouts: 4.3 s rollout (10-step
    dpm2 + decode), 0.3 s reward, 5.3 s training (3 ELBO terms, each one forward+backward of the
    policy and one forward of the old policy): about 10 s per epoch. fp32 rollouts took 5.5 s
    (docs/toy-rl.md); the trainer's evaluation (316 images, 20-step Euler, fp32) 14 s.

    Attributes:
        rollout_s: seconds per image and sampler step of a bf16 rollout (decode included).
        fp32_rollout_factor: an fp32 rollout's cost over a bf16 one.
        reward_s: seconds per image of the toy GenEval reward.
        term_s: seconds per image and estimator term (policy forward+backward, old forward).
        cfg_factor: cost multiplier of a pass with CFG (conditional + unconditional).
        kl_factor: training cost multiplier of a KL term (one more reference forward per term).
        eval_s: seconds per image and step of an evaluation (fp32 sampling, decode, scoring).
        eval_load_s: loading the model for one evaluation.
        run_overhead_s: loading the model for training, checkpoints, the trainer's own last eval.
    """

    rollout_s: float = 4.3 / 2560
    fp32_rollout_factor: float = 5.5 / 4.3
    reward_s: float = 0.3 / 256
    term_s: float = 5.3 / 768
    cfg_factor: float = 2.0
    kl_factor: float = 4.0 / 3.0
    eval_s: float = 14.0 / (316 * 20)
    eval_load_s: float = 3.0
    run_overhead_s: float = 5.0

    def epoch_seconds(self, p: Any) -> float:
        """Estimated seconds of one training epoch of a resolved pipeline."""
        from flowrl.estimators.elbo import num_terms, times_in_range
        from flowrl.samplers import sd3_sigmas

        c = p.config
        batch, steps = c.train.batch_size, p.sampler.steps
        rollout = self.rollout_s * steps * (self.cfg_factor if p.sampler.guidance != 1.0 else 1.0)
        if resolved_precision(c.train.rollout_precision) == "float32":
            rollout *= self.fp32_rollout_factor
        t_range = getattr(p.estimator, "t_range", None)
        grid = steps if t_range is None else len(times_in_range(sd3_sigmas(steps, p.sampler.shift)[:-1], t_range))
        terms = num_terms(grid, p.estimator.timestep_fraction)
        train = self.term_s * terms * (self.cfg_factor if getattr(p.estimator, "guidance", 1.0) != 1.0 else 1.0)
        kl = getattr(p.objective, "kl", None)
        if kl is not None and kl.beta > 0:
            train *= self.kl_factor
        return batch * (rollout + self.reward_s + train)

    def evaluation_seconds(self, n_images: int, steps: int) -> float:
        """Estimated seconds of one evaluation of `n_images` images with a `steps`-step sampler."""
        return self.eval_load_s + n_images * steps * self.eval_s


def resolved_precision(requested: str) -> str:
    """What `train.rollout_precision` runs as on this machine's CPU ("auto" resolved by its rule)."""
    from flowrl.precision import resolve

    return resolve(requested, "cpu").precision


#: Images per probe epoch: None probes at each run's own batch. The first quick study with 64-image
#: probes planned 20 % too few seconds: per image, a 256-image epoch cost more than a 64-image one.
PROBE_IMAGES: int | None = None
#: Epochs of a probe run; the plan uses the last one's seconds. Two: with one, the full study's first
#: probe (a cold process on a cold disk) read 21.9 s for an epoch its runs took 17.0 s in, so that
#: combination got 4 epochs where its equal-cost twins got 6. The second epoch costs about 7 minutes
#: of the 3-hour budget.
PROBE_EPOCHS = 2


def probe_batch(p: Any, target: int | None = PROBE_IMAGES) -> int:
    """Images per epoch of a probe of pipeline `p`: its own batch (target None), or the smallest
    multiple of one group per optimizer step (group_size x steps_per_epoch) that is >= `target`,
    never more than the run's batch."""
    t = p.config.train
    if target is None:
        return t.batch_size
    unit = p.config.prompts.group_size * t.steps_per_epoch
    return min(t.batch_size, unit * math.ceil(target / unit))


def probe_overrides(p: Any, batch: int) -> tuple[str, ...]:
    """Overrides that turn a study run's pipeline into a probe: `batch` images per epoch,
    PROBE_EPOCHS epochs, no periodic evaluation and a one-image final one, a checkpoint at the end."""
    return (
        *batch_overrides(p, batch), f"train.epochs={PROBE_EPOCHS}", "eval.every=0", "eval.limit=1",
        "eval.images_per_prompt=1", f"checkpoint.every={PROBE_EPOCHS}", "checkpoint.keep_last=1",
    )


@dataclass(frozen=True)
class Probe:
    """One combination's probe run, as measured.

    Attributes:
        batch: images per probe epoch.
        epoch_s: seconds of the probe's last epoch.
        wall_s: seconds of the whole probe (model loading, epochs, checkpoint, final eval).
        epochs: epochs the probe trained.
    """

    batch: int
    epoch_s: float
    wall_s: float
    epochs: int = PROBE_EPOCHS

    def epoch_at(self, batch: int) -> float:
        """Seconds of one epoch of `batch` images (epoch cost is linear in the images)."""
        return self.epoch_s * batch / self.batch

    @property
    def overhead_s(self) -> float:
        """A run's fixed seconds beyond its steady epochs: everything but the timed epochs."""
        return max(0.0, self.wall_s - self.epochs * self.epoch_s)


@dataclass(frozen=True)
class Calibration:
    """Seconds measured on this machine before planning, so that a plan fits its budget on the
    day it runs (the CostModel is one machine's measurement on one day; 2-core machines drift by
    1.5x). Saved as OUT/calibration.json and reused, so a resumed study keeps its plan.

    Attributes:
        probes: each combination's probe.
        eval_s: seconds of one evaluation per evaluation-settings tag (`EvalSettings.tag`): a
            probe checkpoint's, so with the adapters that slow every forward (the base model,
            without them, evaluated 20 % faster).
        host: the machine it was measured on (informational).
        measured: when.
    """

    probes: Mapping[str, Probe]
    eval_s: Mapping[str, float]
    host: str = ""
    measured: str = ""

    def speed(self, cost: CostModel, pipelines: Mapping[str, Any]) -> float:
        """Measured over estimated epoch seconds, the median over the probed combinations (1 when
        none is probed): how much slower than the cost model this machine is today."""
        ratios = [
            self.probes[k].epoch_at(p.config.train.batch_size) / cost.epoch_seconds(p)
            for k, p in pipelines.items() if k in self.probes
        ]
        return float(np.median(ratios)) if ratios else 1.0

    def to_json(self) -> dict:
        return {
            "probes": {k: {"batch": v.batch, "epoch_s": v.epoch_s, "wall_s": v.wall_s, "epochs": v.epochs} for k, v in self.probes.items()},
            "eval_s": dict(self.eval_s), "host": self.host, "measured": self.measured,
        }

    @classmethod
    def from_json(cls, data: Mapping) -> Calibration:
        """Raises ValueError on a malformed file."""
        try:
            probes = {
                str(k): Probe(int(v["batch"]), float(v["epoch_s"]), float(v["wall_s"]), int(v.get("epochs", PROBE_EPOCHS)))
                for k, v in data["probes"].items()
            }
            evals = {str(k): float(v) for k, v in data.get("eval_s", {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"not a calibration record ({err!r})") from None
        return cls(probes, evals, str(data.get("host", "")), str(data.get("measured", "")))

    def merged(self, other: Calibration) -> Calibration:
        """This calibration with `other`'s probes and evaluation timings added (other's win)."""
        return Calibration({**self.probes, **other.probes}, {**self.eval_s, **other.eval_s}, other.host or self.host,
                           other.measured or self.measured)


@dataclass(frozen=True)
class EvalSettings:
    """How every checkpoint (and the base model) is evaluated: the same prompts and seeds for all.

    Attributes:
        prompts: the test prompt set.
        limit: only the first N prompts (None: all).
        images_per_prompt: images per prompt (GenEval's protocol: 4).
        steps: Euler steps.
        guidance: CFG scale (1: none, as the paper evaluates).
        weights: the checkpoint's adapter ("ema", as the pipelines evaluate).
        seed: image i starts from seed + i (flowrl eval's rule).
        batch: images sampled together.
    """

    prompts: str = "toy-test"
    limit: int | None = None
    images_per_prompt: int = 4
    steps: int = 20
    guidance: float = 1.0
    weights: str = "ema"
    seed: int = 0
    batch: int = 64

    def n_images(self, n_test_prompts: int) -> int:
        return min(n_test_prompts, self.limit or n_test_prompts) * self.images_per_prompt

    def tag(self) -> str:
        """Folder name of evaluations with these settings, e.g. ``toy-test-k4-euler20-cfg1-ema-seed0``
        (other settings write to other folders, so changing them never clashes with old results)."""
        limit = f"-first{self.limit}" if self.limit else ""
        return f"{self.prompts}{limit}-k{self.images_per_prompt}-euler{self.steps}-cfg{self.guidance:g}-{self.weights}-seed{self.seed}"


def eval_epochs(epochs: int, points: int) -> tuple[int, ...]:
    """The checkpoint epochs (0-based) evaluated: every ceil(epochs / points) epochs, and the last."""
    if epochs < 1 or points < 1:
        raise ValueError(f"epochs and points must be >= 1, got {epochs} and {points}")
    every = math.ceil(epochs / points)
    found = list(range(every - 1, epochs, every))
    if found[-1] != epochs - 1:
        found.append(epochs - 1)
    return tuple(found)


@dataclass(frozen=True)
class RunPlan:
    """One training run of the study and what it is expected to cost.

    Attributes:
        combo: the combination.
        seed: train.seed.
        epochs: training epochs.
        eval_epochs: checkpoint epochs evaluated afterwards.
        overrides: every override of its pipeline file, run settings included.
        epoch_s: estimated seconds per epoch.
        eval_s: estimated seconds of one evaluation.
        overhead_s: estimated fixed seconds of the run.
    """

    combo: Combo
    seed: int
    epochs: int
    eval_epochs: tuple[int, ...]
    overrides: tuple[str, ...]
    epoch_s: float
    eval_s: float
    overhead_s: float

    @property
    def folder(self) -> str:
        return f"{self.combo.name}/seed-{self.seed}"

    @property
    def train_s(self) -> float:
        return self.epochs * self.epoch_s

    @property
    def total_s(self) -> float:
        return self.overhead_s + self.train_s + len(self.eval_epochs) * self.eval_s


@dataclass(frozen=True)
class StudyPlan:
    """Every run of the study, the skipped combinations and the budget.

    Attributes:
        runs: the runs, combination-major.
        skipped: combinations the loader refused (with its message).
        base_eval_s: estimated seconds of the base model's evaluation (shared by all runs).
        budget_s: the wall-clock budget.
        allocation: how epochs were chosen: "time" (equal training seconds per run), "epochs"
            (equal epochs) or "fixed" (--epochs).
        source: where the seconds come from: "estimated" (the CostModel) or "measured" (a
            Calibration of this machine).
        probe_s: seconds of the calibration's probe runs of these combinations and of its timed
            evaluation (part of the study).
    """

    runs: tuple[RunPlan, ...]
    skipped: tuple[GridEntry, ...]
    base_eval_s: float
    budget_s: float
    allocation: str
    source: str = "estimated"
    probe_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.probe_s + self.base_eval_s + sum(r.total_s for r in self.runs)

    @property
    def fits(self) -> bool:
        return self.total_s <= self.budget_s


def run_overrides(seed: int, epochs: int, evals: Sequence[int]) -> tuple[str, ...]:
    """Overrides that make a pipeline a study run (applied after the combination's and the study's).

    The trainer's periodic evaluation is off (eval.every=0); as it still evaluates at the last
    epoch, that evaluation shrinks to one image (eval.limit=1, eval.images_per_prompt=1): the
    study's numbers come from evaluating the checkpoints afterwards, the base model once for all.
    Checkpoints land on the evaluated epochs and all of them are kept. Every run is eager
    (train.compile=false), as its probe was timed, so that equal budgets buy equal compute.
    """
    every = evals[0] + 1
    return (
        f"train.seed={seed}", f"train.epochs={epochs}", "train.compile=false", "eval.every=0", "eval.limit=1",
        "eval.images_per_prompt=1", f"checkpoint.every={every}", f"checkpoint.keep_last={len(evals) + 1}",
    )


def allocate_epochs(
    epoch_s: Mapping[str, float], runs_per_combo: int, available_s: float, allocation: str
) -> dict[str, int]:
    """Epochs per combination so that the runs' training fits `available_s` seconds.

    Args:
        epoch_s: estimated seconds per epoch of each combination.
        runs_per_combo: seeds.
        available_s: training seconds left once fixed costs (evaluations, overheads) are paid.
        allocation: "time": every run trains the same seconds (the fair horizon for
            time-to-threshold); "epochs": every run trains the same number of epochs.

    Returns:
        Epochs per combination, at least 1 (the plan then says it exceeds the budget).
    """
    if not epoch_s:
        return {}
    n = len(epoch_s) * runs_per_combo
    budget = max(available_s, 0.0)
    if allocation == "time":
        # Nearest whole epochs to the per-run seconds, then trim the longest runs until it fits.
        per_run = budget / n
        epochs = {k: max(1, round(per_run / s)) for k, s in epoch_s.items()}
        while runs_per_combo * sum(epochs[k] * s for k, s in epoch_s.items()) > budget:
            longer = [k for k in epochs if epochs[k] > 1]
            if not longer:
                break
            k = max(longer, key=lambda k: epochs[k] * epoch_s[k])
            epochs[k] -= 1
        return epochs
    if allocation == "epochs":
        every = int(budget // (runs_per_combo * sum(epoch_s.values())))
        return {k: max(1, every) for k in epoch_s}
    raise ValueError(f"allocation must be 'time' or 'epochs', got {allocation!r}")


def plan_study(
    entries: Sequence[GridEntry],
    seeds: Sequence[int],
    budget_s: float,
    eval_settings: EvalSettings,
    n_test_prompts: int,
    evals_per_run: int,
    cost: CostModel = CostModel(),
    allocation: str = "time",
    epochs: Mapping[str, int] | int | None = None,
    headroom: float = 0.9,
    calibration: Calibration | None = None,
) -> StudyPlan:
    """Plan every run: epochs per combination from the budget (or as given), evaluation epochs,
    overrides and estimated seconds.

    Args:
        entries: checked combinations (refused ones become `skipped`).
        seeds: train seeds; every combination runs each.
        budget_s: wall-clock budget of the whole study.
        eval_settings: how checkpoints are evaluated.
        n_test_prompts: prompts in the test set.
        evals_per_run: checkpoints evaluated per run (fewer when a run has fewer epochs).
        cost: the cost model.
        allocation: "time" or "epochs" (see `allocate_epochs`); ignored for combinations with
            fixed epochs.
        epochs: fixed epochs for every run (an int) or per combination name (others allocated).
        headroom: share of the budget the allocation plans for; the rest absorbs the slowdowns of
            shared cores. The plan fits when its total is within the whole budget.
        calibration: seconds measured on this machine (see `calibrated_seconds`); None: the cost
            model's estimates.
    """
    ok = [e for e in entries if e.refused is None]
    skipped = tuple(e for e in entries if e.refused is not None)
    if isinstance(epochs, int):
        fixed = {e.combo.name: epochs for e in ok}
    else:
        fixed = {k: v for k, v in (epochs or {}).items() if any(e.combo.name == k for e in ok)}
    pipelines = {e.combo.name: e.pipeline for e in ok}
    n_images = eval_settings.n_images(n_test_prompts)
    if calibration is None:
        per_epoch = {k: cost.epoch_seconds(p) for k, p in pipelines.items()}
        eval_s, overhead_s = cost.evaluation_seconds(n_images, eval_settings.steps), cost.run_overhead_s
    else:
        per_epoch, eval_s, overhead_s = calibrated_seconds(calibration, pipelines, eval_settings, n_images, cost)
    probe_s = 0.0
    if calibration is not None and any(k in calibration.probes for k in pipelines):
        # the probes' runs, and the timed evaluation of one probe's checkpoint
        probe_s = sum(calibration.probes[k].wall_s for k in pipelines if k in calibration.probes)
        probe_s += calibration.eval_s.get(eval_settings.tag(), 0.0)
    n_runs = len(ok) * len(seeds)
    fixed_cost = probe_s + eval_s + n_runs * (overhead_s + evals_per_run * eval_s)
    fixed_cost += len(seeds) * sum(fixed[k] * per_epoch[k] for k in fixed if k in per_epoch)
    free = {k: s for k, s in per_epoch.items() if k not in fixed}
    chosen = {**allocate_epochs(free, len(seeds), headroom * budget_s - fixed_cost, allocation), **fixed}
    runs = []
    for e in ok:
        n = chosen[e.combo.name]
        evals = eval_epochs(n, evals_per_run)
        for seed in seeds:
            overrides = (*e.overrides, *run_overrides(seed, n, evals))
            runs.append(RunPlan(e.combo, seed, n, evals, overrides, per_epoch[e.combo.name], eval_s, overhead_s))
    kind = "fixed" if per_epoch and set(per_epoch) <= set(fixed) else allocation
    return StudyPlan(tuple(runs), skipped, eval_s, budget_s, kind, "estimated" if calibration is None else "measured", probe_s)


def calibrated_seconds(
    calibration: Calibration, pipelines: Mapping[str, Any], eval_settings: EvalSettings, n_images: int,
    cost: CostModel = CostModel(),
) -> tuple[dict[str, float], float, float]:
    """Epoch seconds per combination, seconds of one evaluation and a run's fixed seconds, from a
    calibration.

    A probed combination's epoch is its probe's, scaled to the run's batch. One that was not probed,
    and an evaluation whose settings were never timed, get the cost model's estimate times the
    machine's speed (`Calibration.speed`). The fixed seconds are the largest probe overhead.

    Args:
        calibration: the measurements.
        pipelines: resolved pipeline of each combination.
        eval_settings: how checkpoints are evaluated.
        n_images: images of one evaluation.
        cost: the cost model, for what was not measured.
    """
    speed = calibration.speed(cost, pipelines)
    per_epoch = {
        k: calibration.probes[k].epoch_at(p.config.train.batch_size) if k in calibration.probes else speed * cost.epoch_seconds(p)
        for k, p in pipelines.items()
    }
    eval_s = calibration.eval_s.get(eval_settings.tag())
    if eval_s is None:
        eval_s = speed * cost.evaluation_seconds(n_images, eval_settings.steps)
    overheads = [calibration.probes[k].overhead_s for k in pipelines if k in calibration.probes]
    return per_epoch, eval_s, max(overheads) if overheads else speed * cost.run_overhead_s


def format_duration(seconds: float) -> str:
    """'45 s', '12.5 min', '2 h 05 min'."""
    if seconds < 100:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    h, m = divmod(round(seconds / 60), 60)
    return f"{h} h {m:02d} min"


def plan_lines(plan: StudyPlan) -> list[str]:
    """The plan as text lines: one per combination, the skipped ones, and the total vs the budget."""
    lines = [f"{'combination':<28} {'seeds':>5} {'s/epoch':>8} {'epochs':>6} {'evals':>5} {'per run':>10}"]
    by_combo: dict[str, list[RunPlan]] = {}
    for r in plan.runs:
        by_combo.setdefault(r.combo.name, []).append(r)
    for name, runs in by_combo.items():
        r = runs[0]
        lines.append(f"{name:<28} {len(runs):>5} {r.epoch_s:>8.1f} {r.epochs:>6} {len(r.eval_epochs):>5} {format_duration(r.total_s):>10}")
    for e in plan.skipped:
        lines.append(f"skipped {e.combo.name}: {e.refused}")
    lines.append(
        f"planned: {len(plan.runs)} runs, {format_duration(plan.total_s)} in all (base-model eval "
        f"{format_duration(plan.base_eval_s)}" + (f", probes {format_duration(plan.probe_s)}" if plan.probe_s else "") + f"), budget {format_duration(plan.budget_s)}; epochs allocated: {plan.allocation}; "
        + ("seconds measured on this machine" if plan.source == "measured" else "seconds estimated by the cost model (not measured here)")
    )
    return lines


# ------------------------------------------------------------------------------- thresholds


@dataclass(frozen=True)
class Threshold:
    """A score to reach: absolute ("0.8") or relative to the base model ("base+0.05").

    Attributes:
        spec: as written.
        value: the score, or the margin over the base model.
        relative: whether `value` is a margin over the base model's score.
    """

    spec: str
    value: float
    relative: bool = False

    def level(self, base: float | None) -> float | None:
        """The score to reach; None for a relative threshold without a base score."""
        if not self.relative:
            return self.value
        return None if base is None else base + self.value

    def label(self, base: float | None = None) -> str:
        if not self.relative:
            return f"{self.value:.2f}"
        lvl = self.level(base)
        return f"base+{self.value:.2f}" + (f" (={lvl:.3f})" if lvl is not None else "")


DEFAULT_THRESHOLDS: tuple[str, ...] = ("0.8", "0.9", "base+0.05", "base+0.10")


def parse_threshold(text: str) -> Threshold:
    """'0.8' -> absolute 0.8; 'base+0.05' -> base score + 0.05.

    Raises:
        FlowrlError: anything else.
    """
    s = text.strip().replace(" ", "")
    m = re.fullmatch(r"base\+(\d*\.?\d+)", s)
    try:
        if m:
            return Threshold(text.strip(), float(m.group(1)), relative=True)
        value = float(s)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise FlowrlError(
            f"threshold {text!r} is neither a score in [0, 1] (e.g. 0.8) nor a margin over the base model "
            "(e.g. base+0.05); write one of those"
        )
    return Threshold(text.strip(), value)


# ------------------------------------------------------------------------------------ curves


@dataclass(frozen=True)
class Point:
    """One evaluation of a run.

    Attributes:
        epochs: training epochs completed (0: the base model).
        seconds: training seconds spent to get there.
        score: toy GenEval (overall, strict) on the test prompts.
    """

    epochs: int
    seconds: float
    score: float


@dataclass(frozen=True)
class Reach:
    """When a run first reached a score, or that it never did within its horizon (censored).

    Attributes:
        seconds: training seconds at the first evaluation at or above the level, else None.
        epochs: epochs completed at that evaluation, else None.
        horizon_s: training seconds at the run's last evaluation.
        horizon_epochs: epochs at the run's last evaluation.
    """

    seconds: float | None
    epochs: int | None
    horizon_s: float
    horizon_epochs: int

    @property
    def reached(self) -> bool:
        return self.seconds is not None


def time_to_threshold(points: Sequence[Point], level: float) -> Reach:
    """The first evaluated point at or above `level` (no interpolation between evaluations).

    Args:
        points: a run's evaluations, the base model's first (epochs 0, 0 s); at least one.
        level: the score to reach.
    """
    if not points:
        raise ValueError("time_to_threshold needs at least one point")
    pts = sorted(points, key=lambda p: p.epochs)
    last = pts[-1]
    for p in pts:
        if p.score >= level:
            return Reach(p.seconds, p.epochs, last.seconds, last.epochs)
    return Reach(None, None, last.seconds, last.epochs)


def clock(epoch_s: Sequence[float], mode: str = "measured") -> list[float]:
    """Training seconds after each epoch: the running sum of the measured epoch times, or
    ("median") epochs x the median epoch time, which ignores slow epochs caused by other
    processes on shared cores."""
    if mode == "measured":
        return [float(x) for x in np.cumsum(epoch_s)]
    if mode == "median":
        med = float(np.median(epoch_s)) if len(epoch_s) else 0.0
        return [med * (i + 1) for i in range(len(epoch_s))]
    raise ValueError(f"clock must be 'measured' or 'median', got {mode!r}")


# ------------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (n - 1; 0 for one value) over seeds."""

    mean: float
    std: float
    n: int

    def format(self, digits: int = 3) -> str:
        if self.n < 2:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def stat(values: Sequence[float]) -> Stat | None:
    """Stat of the values, or None when there are none."""
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if x.size == 0:
        return None
    return Stat(float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0, int(x.size))


@dataclass(frozen=True)
class ReachStat:
    """Time-to-threshold over the seeds of a combination.

    Attributes:
        n: runs.
        reached: runs that reached the level.
        seconds: Stat over the runs when all reached, else None.
        lower_s: mean over runs of (time reached, or the horizon for a censored run): a lower
            bound of the mean time to reach the level.
        horizon_s: the longest horizon among the censored runs (0 when none is censored).
    """

    n: int
    reached: int
    seconds: Stat | None
    lower_s: float
    horizon_s: float

    @property
    def complete(self) -> bool:
        return self.n > 0 and self.reached == self.n


def aggregate_reach(reaches: Sequence[Reach]) -> ReachStat:
    """Combine the seeds' Reach into one ReachStat (censored runs never get an invented time)."""
    n = len(reaches)
    done = [r.seconds for r in reaches if r.reached]
    bounds = [r.seconds if r.reached else r.horizon_s for r in reaches]
    horizon = max((r.horizon_s for r in reaches if not r.reached), default=0.0)
    seconds = stat(done) if n and len(done) == n else None
    return ReachStat(n, len(done), seconds, float(np.mean(bounds)) if bounds else float("nan"), horizon)


def format_reach(r: ReachStat) -> str:
    """'120 ± 15 s', '≥ 150 s (2/3 reached)', 'not reached in 300 s (0/3)', or '-' without runs."""
    if r.n == 0:
        return "-"
    if r.complete and r.seconds is not None:
        return f"{r.seconds.mean:.0f} ± {r.seconds.std:.0f} s" if r.seconds.n > 1 else f"{r.seconds.mean:.0f} s"
    if r.reached:
        return f"≥ {r.lower_s:.0f} s ({r.reached}/{r.n} reached)"
    return f"not reached in {r.horizon_s:.0f} s (0/{r.n})"


@dataclass(frozen=True)
class Ratio:
    """Time-to-threshold of a slower recipe over a faster one.

    Attributes:
        value: the ratio or its bound; None when it cannot be bounded.
        bound: "exact" (both reached in every run), "lower" (only the slower one was censored:
            the true ratio is at least `value`), "upper" (only the faster one was censored: at
            most `value`), "none".
        why: for "none" (and bounds), what was censored or missing.
    """

    value: float | None
    bound: Literal["exact", "lower", "upper", "none"]
    why: str = ""

    def format(self) -> str:
        if self.value is None:
            return f"n/a ({self.why})"
        sign = {"exact": "", "lower": "≥ ", "upper": "≤ "}[self.bound]
        return f"{sign}{self.value:.2f}x" + (f" ({self.why})" if self.why else "")

    def verdict(self, goal: float) -> str:
        """'meets the goal', 'misses the goal', or 'undetermined' (censoring hides the answer)."""
        if self.value is None:
            return "undetermined"
        if self.bound == "exact":
            return "meets the goal" if self.value >= goal else "misses the goal"
        if self.bound == "lower":
            return "meets the goal" if self.value >= goal else "undetermined"
        return "misses the goal" if self.value < goal else "undetermined"


def time_ratio(slow: ReachStat, fast: ReachStat, slow_name: str = "baseline", fast_name: str = "paper recipe") -> Ratio:
    """Mean time-to-threshold of `slow` over that of `fast`, bounded where runs were censored."""
    if slow.n == 0 or fast.n == 0:
        missing = slow_name if slow.n == 0 else fast_name
        return Ratio(None, "none", f"no finished runs: {missing}")
    if fast.complete and fast.seconds is not None:
        if fast.seconds.mean <= 0:
            return Ratio(None, "none", f"the {fast_name} is at the level before training")
        if slow.complete and slow.seconds is not None:
            return Ratio(slow.seconds.mean / fast.seconds.mean, "exact")
        return Ratio(slow.lower_s / fast.seconds.mean, "lower", f"{slow_name} censored in {slow.n - slow.reached}/{slow.n} runs")
    if slow.complete and slow.seconds is not None and fast.lower_s > 0:
        return Ratio(slow.seconds.mean / fast.lower_s, "upper", f"{fast_name} censored in {fast.n - fast.reached}/{fast.n} runs")
    return Ratio(None, "none", f"both censored: {fast_name} {fast.reached}/{fast.n}, {slow_name} {slow.reached}/{slow.n} runs reached")


def compare(a: Stat | None, b: Stat | None) -> str:
    """'>' or '<' when the means differ by more than the combined std over seeds, '≈' when they do
    not, '?' when either is missing. With one seed per side there is no std: the sign decides."""
    if a is None or b is None:
        return "?"
    noise = math.hypot(a.std, b.std)
    d = a.mean - b.mean
    if abs(d) <= noise or d == 0:
        return "≈"
    return ">" if d > 0 else "<"


# ------------------------------------------------------------------------------------ guard


@dataclass(frozen=True)
class ImageStats:
    """Held-out image statistics of an evaluation (the reward never sees them as such).

    Attributes:
        saturation: mean HSV saturation over pixels and images.
        detected: share of images where the shapes detector finds any object.
        confidence: mean over images of the highest detection score (0 without detection).
        n: images.
    """

    saturation: float
    detected: float
    confidence: float
    n: int


def saturation(images: np.ndarray) -> np.ndarray:
    """Mean HSV saturation of each image, float [N] in [0, 1].

    Args:
        images: float [N, 3, H, W] in [0, 1].
    """
    x = np.clip(np.asarray(images, dtype=np.float64), 0.0, 1.0)
    hi, lo = x.max(axis=1), x.min(axis=1)
    s = np.where(hi > 0, (hi - lo) / np.where(hi > 0, hi, 1.0), 0.0)
    return s.reshape(s.shape[0], -1).mean(axis=1)


def image_stats(images: np.ndarray, detect: Callable[[np.ndarray], list[dict[str, list[Any]]]] | None = None) -> ImageStats:
    """ImageStats of a batch: saturation, and the shapes detector's confidence.

    Args:
        images: float [N, 3, H, W] in [0, 1].
        detect: images -> per image {class: [Detection]} (default: flowrl.toy's ShapesDetector).
    """
    if detect is None:
        from flowrl.toy.detector import ShapesDetector

        detect = ShapesDetector()
    found = detect(images)
    best = np.array([max((d.score for ds in f.values() for d in ds), default=0.0) for f in found])
    return ImageStats(float(saturation(images).mean()), float((best > 0).mean()), float(best.mean()), len(found))


@dataclass(frozen=True)
class Guard:
    """How far a run's final evaluation images moved from the base model's (same prompts and seeds).

    Attributes:
        saturation: change of mean saturation.
        detected: change of the share of images with any detection.
        confidence: change of mean top detection confidence.
    """

    saturation: float
    detected: float
    confidence: float

    @classmethod
    def between(cls, run: ImageStats, base: ImageStats) -> Guard:
        return cls(run.saturation - base.saturation, run.detected - base.detected, run.confidence - base.confidence)


@dataclass(frozen=True)
class GuardLimits:
    """When a guard flags possible reward hacking or quality loss.

    Attributes:
        saturation: |saturation change| above this (colour drift: over- or washed-out colours).
        detected: a fall of the share of images with any detection by more than this.
        confidence: a fall of the mean top detection confidence by more than this.
    """

    saturation: float = 0.05
    detected: float = 0.10
    confidence: float = 0.05

    def flags(self, g: Guard) -> list[str]:
        out = []
        if abs(g.saturation) > self.saturation:
            out.append(f"saturation {g.saturation:+.3f}")
        if g.detected < -self.detected:
            out.append(f"detections {g.detected:+.3f}")
        if g.confidence < -self.confidence:
            out.append(f"confidence {g.confidence:+.3f}")
        return out


# ------------------------------------------------------------------------------- run folders

#: The study's record of a finished run (written last, atomically).
DONE_FILE = "study.json"
EVALS = "evals"


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file; a torn last line (a killed write) is skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def eval_folder(run: Path, epoch: int, tag: str) -> Path:
    """Where the evaluation of checkpoint `epoch` of a run goes (`tag`: EvalSettings.tag())."""
    return Path(run) / EVALS / tag / f"epoch-{epoch}"


def eval_score(folder: Path) -> float | None:
    """GenEval overall (strict) of an evaluation folder's summary.json, or None when not there."""
    path = Path(folder) / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return float(summary["overall"]) if "overall" in summary else None


@dataclass(frozen=True)
class RunResult:
    """A finished run of the study, read back from its folder.

    Attributes:
        combo: combination name.
        seed: train seed.
        points: evaluations, the base model's first.
        epoch_s: measured seconds of each training epoch.
        guard: final images vs the base model's, when both image sets were there.
    """

    combo: str
    seed: int
    points: tuple[Point, ...]
    epoch_s: tuple[float, ...]
    guard: Guard | None = None

    @property
    def final(self) -> float:
        return self.points[-1].score


def load_run(run: Path, combo: str, seed: int, evals: Sequence[int], base: float, tag: str, clock_mode: str = "measured") -> RunResult | None:
    """Read a run folder: metrics.jsonl for the clock, evals/<tag>/epoch-N/summary.json for the scores.

    Returns:
        None when the run has not finished (a missing epoch or evaluation).
    """
    metrics = Path(run) / "metrics.jsonl"
    if not metrics.is_file():
        return None
    times = {r["epoch"]: float(r["time/epoch_s"]) for r in read_jsonl(metrics) if isinstance(r.get("epoch"), int) and r["epoch"] >= 0 and "time/epoch_s" in r}
    last = max(evals)
    if any(e not in times for e in range(last + 1)):
        return None
    epoch_s = [times[e] for e in range(last + 1)]
    seconds = clock(epoch_s, clock_mode)
    points = [Point(0, 0.0, base)]
    for e in evals:
        score = eval_score(eval_folder(run, e, tag))
        if score is None:
            return None
        points.append(Point(e + 1, seconds[e], score))
    return RunResult(combo, seed, tuple(points), tuple(epoch_s))


def eval_images(folder: Path) -> np.ndarray:
    """The images of an evaluation folder in index order, float [N, 3, H, W] in [0, 1]."""
    from flowrl.evaluate import load_images

    rows = read_jsonl(Path(folder) / "results.jsonl")
    rows.sort(key=lambda r: r["index"])
    return load_images([Path(folder) / r["filename"] for r in rows]).numpy()


# ------------------------------------------------------------------------------------ report


@dataclass(frozen=True)
class ComboSummary:
    """A combination's runs, summarised over seeds.

    Attributes:
        combo: the combination.
        runs: its finished runs.
        planned: runs planned.
        final: final score over seeds.
        reaches: per threshold spec, time-to-threshold over seeds.
        guard: per field, the guard over seeds (None without images).
        epochs: epochs per run.
        epoch_s: median measured seconds per epoch over all its epochs.
    """

    combo: Combo
    runs: tuple[RunResult, ...]
    planned: int
    final: Stat | None
    reaches: Mapping[str, ReachStat]
    guard: Mapping[str, Stat | None]
    epochs: int | None
    epoch_s: float | None


def summarize_combo(combo: Combo, runs: Sequence[RunResult], planned: int, thresholds: Sequence[Threshold], base: float | None) -> ComboSummary:
    """Summarise a combination's finished runs over seeds (relative thresholds need `base`)."""
    reaches = {}
    for t in thresholds:
        level = t.level(base)
        reaches[t.spec] = aggregate_reach([time_to_threshold(r.points, level) for r in runs]) if level is not None else ReachStat(0, 0, None, float("nan"), 0.0)
    guards = [r.guard for r in runs if r.guard is not None]
    guard = {k: stat([getattr(g, k) for g in guards]) for k in ("saturation", "detected", "confidence")}
    all_s = [s for r in runs for s in r.epoch_s]
    return ComboSummary(
        combo, tuple(runs), planned, stat([r.final for r in runs]), reaches, guard,
        runs[0].points[-1].epochs if runs else None, float(np.median(all_s)) if all_s else None,
    )


#: GenEval of the paper's SD3.5-M ablation and baselines (METHOD.md), by combination name.
PAPER_SCORES: dict[str, float] = {
    "epg-trajectory-flow-sde": 0.92, "epg-trajectory-flow-sde-cfg": 0.95, "epg-elbo-flow-sde": 0.90,
    "epg-elbo-dpm2": 0.96, "pepg-elbo-flow-sde": 0.96, "pepg-elbo-dpm2": 0.96, "par-elbo-dpm2": 0.96,
    "grpo-elbo-dpm2": 0.94, FLOWGRPO: 0.95, NFT: 0.95,
}
#: Goals of the headline ratios: (slower recipe, goal of its time over the paper recipe's).
RATIO_GOALS: tuple[tuple[str, str, float], ...] = ((FLOWGRPO, "FlowGRPO recipe", 4.6), (NFT, "DiffusionNFT", 2.0))


@dataclass(frozen=True)
class Finding:
    """One claim of the paper checked on the toy: verdict is 'reproduced', 'not reproduced' or
    'undetermined'."""

    claim: str
    verdict: str
    evidence: str


def _final(summaries: Mapping[str, ComboSummary], name: str) -> Stat | None:
    s = summaries.get(name)
    return s.final if s is not None else None


def _spread(stats: Sequence[Stat | None]) -> float | None:
    means = [s.mean for s in stats if s is not None]
    return max(means) - min(means) if len(means) >= 2 and len(means) == len(stats) else None


def ordering_findings(summaries: Mapping[str, ComboSummary], thresholds: Sequence[Threshold], base: float | None) -> list[Finding]:
    """The paper's orderings, checked on the toy's numbers (noise: the std over seeds)."""
    out = []
    paper = _final(summaries, PAPER)
    if paper is not None and base is not None:
        base_stat = Stat(base, 0.0, 1)
        moved = compare(paper, base_stat)
        out.append(Finding(
            "RL improves the base model (paper recipe)",
            "reproduced" if moved == ">" else "not reproduced",
            f"paper recipe {paper.format()} vs base {base:.3f}"
            + ("" if moved == ">" else "; the remaining comparisons are between runs that barely moved"),
        ))
    for slow, label, goal in RATIO_GOALS:
        ratios = []
        for t in thresholds:
            s, f = summaries.get(slow), summaries.get(PAPER)
            if s is None or f is None:
                continue
            r = time_ratio(s.reaches[t.spec], f.reaches[t.spec], label)
            ratios.append((t, r, r.verdict(goal)))
        verdicts = {v for _, _, v in ratios}
        verdict = "reproduced" if verdicts == {"meets the goal"} else "not reproduced" if "misses the goal" in verdicts else "undetermined"
        evidence = "; ".join(f"{t.label(base)}: {r.format()}" for t, r, _ in ratios) or "runs missing"
        out.append(Finding(f"{label} needs >= {goal}x the paper recipe's time to a threshold", verdict, evidence))
    losses = [_final(summaries, f"{o}-elbo-dpm2") for o in OBJECTIVES]
    designs = [_final(summaries, n) for n in ("epg-trajectory-flow-sde", "epg-trajectory-flow-sde-cfg", "epg-elbo-flow-sde", "epg-elbo-dpm2")]
    loss_spread, design_spread = _spread(losses), _spread(designs)
    if loss_spread is None or design_spread is None:
        out.append(Finding("with ELBO the loss matters less than the estimator/sampler", "undetermined", "runs missing"))
    else:
        out.append(Finding(
            "with ELBO the loss matters less than the estimator/sampler",
            "reproduced" if loss_spread < design_spread else "not reproduced",
            f"spread of final scores over the 4 losses (ELBO, ODE): {loss_spread:.3f}; over estimator/sampler (EPG): {design_spread:.3f}",
        ))
    for a, b, claim in (
        ("epg-elbo-dpm2", "epg-elbo-flow-sde", "with ELBO, ODE rollouts beat SDE rollouts (EPG)"),
        ("epg-elbo-dpm2", "epg-trajectory-flow-sde", "ELBO + ODE beats trajectory + SDE (EPG)"),
    ):
        sa, sb = _final(summaries, a), _final(summaries, b)
        c = compare(sa, sb)
        verdict = {">": "reproduced", "<": "not reproduced", "≈": "undetermined", "?": "undetermined"}[c]
        ev = f"{a} {sa.format() if sa else 'missing'} vs {b} {sb.format() if sb else 'missing'}"
        out.append(Finding(claim, verdict, ev + (" (within the spread over seeds)" if c == "≈" else "")))
    return out


@dataclass(frozen=True)
class ReportContext:
    """What the report says about how the study was run.

    Attributes:
        mode: "full", "quick" or "tiny".
        seeds: train seeds.
        base_score: the base model's toy GenEval (None when not evaluated).
        eval_settings: the evaluation protocol.
        n_test_prompts: prompts in the test set.
        clock: "measured" or "median".
        planned_s: the plan's estimated seconds.
        budget_s: the budget.
        generated: timestamp text.
        command: the command line that rebuilds it.
        plots: file names of the two PNGs (reward vs time, vs epochs), relative to the report.
        actual_s: recorded wall-clock seconds of the finished runs (training and evaluation).
        notes: more lines for the header (e.g. runs left out and why).
    """

    mode: str
    seeds: tuple[int, ...]
    base_score: float | None
    eval_settings: EvalSettings
    n_test_prompts: int
    clock: str
    planned_s: float
    budget_s: float
    generated: str
    command: str
    plots: tuple[str, str] = ("design-space-time.png", "design-space-epochs.png")
    actual_s: float | None = None
    notes: tuple[str, ...] = ()


def _table_row(s: ComboSummary, thresholds: Sequence[Threshold], limits: GuardLimits) -> str:
    c = s.combo
    paper = PAPER_SCORES.get(c.name)
    if not s.runs:
        cells = ["not run"] + ["-"] * (len(thresholds) + 3)
    else:
        final = s.final.format() if s.final else "-"
        times = [format_reach(s.reaches[t.spec]) for t in thresholds]
        g = s.guard
        sat = g["saturation"].format() if g.get("saturation") else "-"
        conf = g["confidence"].format() if g.get("confidence") else "-"
        flags = []
        for r in s.runs:
            if r.guard is not None:
                flags += limits.flags(r.guard)
        guard = f"{sat} / {conf}" + (" ⚠" if flags else "")
        cells = [final, *times, guard, str(s.epochs), f"{s.epoch_s:.1f}" if s.epoch_s else "-"]
    runs = f"{len(s.runs)}/{s.planned}"
    name = f"**{c.loss}**" if c.role != "grid" else c.loss
    return "| " + " | ".join([name, c.estimator, c.sampler, *cells, runs, f"{paper:.2f}" if paper else "-"]) + " |"


def render_results(
    summaries: Sequence[ComboSummary],
    skipped: Sequence[GridEntry],
    thresholds: Sequence[Threshold],
    ctx: ReportContext,
    limits: GuardLimits = GuardLimits(),
) -> str:
    """docs/results.md: headline ratios, the paper's orderings checked, the table (paper layout),
    the skipped combinations and the plots."""
    by_name = {s.combo.name: s for s in summaries}
    base = ctx.base_score
    es = ctx.eval_settings
    n_img = es.n_images(ctx.n_test_prompts)
    lines = [
        "# Design-space study on the toy model",
        "",
        f"Generated by `{ctx.command}` ({ctx.mode} mode, {ctx.generated}). How to run it and what it "
        "measures: [design-space.md](design-space.md).",
        "",
        f"- Seeds: {', '.join(map(str, ctx.seeds))}. Plan: {format_duration(ctx.planned_s)} of a "
        f"{format_duration(ctx.budget_s)} budget on this machine"
        + (f"; the finished runs took {format_duration(ctx.actual_s)} (training and evaluation)." if ctx.actual_s else "."),
        f"- Score: toy GenEval (strict, mean over tags) on {n_img} images ({es.prompts}, "
        f"{es.images_per_prompt} per prompt{f', first {es.limit} prompts' if es.limit else ''}), "
        f"{es.steps}-step Euler, CFG {es.guidance:g}, {es.weights.upper()} weights, image i from seed {es.seed} + i; "
        "the same images for every run and the base model.",
        f"- Base model: {base:.3f}." if base is not None else "- Base model: not evaluated.",
        f"- Time: training seconds ({'sum of measured epoch times' if ctx.clock == 'measured' else 'epochs x median epoch time'}), "
        "evaluations excluded. Time to a threshold is the first evaluated checkpoint at or above it; "
        "a run that never gets there is censored, never given a number.",
        *[f"- {n}" for n in ctx.notes],
        "",
        "## Headline: time to threshold over the paper's recipe",
        "",
        "| threshold | paper recipe | " + " | ".join(f"{label} | ratio (goal >= {goal}x)" for _, label, goal in RATIO_GOALS) + " |",
        "|---|---|" + "---|---|" * len(RATIO_GOALS),
    ]
    paper = by_name.get(PAPER)
    paper = paper if paper is not None and paper.runs else None
    for t in thresholds:
        row = [t.label(base), format_reach(paper.reaches[t.spec]) if paper else "not run"]
        for slow, label, goal in RATIO_GOALS:
            s = by_name.get(slow)
            if s is None or not s.runs or paper is None:
                row += ["not run" if s is None or not s.runs else format_reach(s.reaches[t.spec]), "n/a (not run)"]
                continue
            r = time_ratio(s.reaches[t.spec], paper.reaches[t.spec], label)
            row += [format_reach(s.reaches[t.spec]), f"{r.format()}: {r.verdict(goal)}"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Does the toy show the paper's ordering?", ""]
    findings = ordering_findings(by_name, thresholds, base)
    for f in findings:
        lines.append(f"- **{f.verdict}**: {f.claim}. {f.evidence}.")
    lines += [
        "",
        "## Ablation table (loss / estimator / sampler -> score)",
        "",
        "Mean ± std over seeds. Guard: change of mean colour saturation / of mean top detector confidence "
        "of the final images against the base model's (same prompts and seeds); ⚠ marks a run beyond "
        f"±{limits.saturation} saturation, -{limits.confidence} confidence or -{limits.detected} share of images "
        "with a detection. Paper: GenEval of the same row on SD3.5-M (METHOD.md).",
        "",
        "| loss | estimator | sampler | toy GenEval (final) | " + " | ".join(f"t -> {t.label(base)}" for t in thresholds)
        + " | guard: Δsat / Δconf | epochs | s/epoch | runs | paper |",
        "|" + "---|" * (len(thresholds) + 9),
    ]
    lines += [_table_row(s, thresholds, limits) for s in summaries]
    if skipped:
        lines += ["", "## Skipped combinations (refused by the graph check)", ""]
        lines += [f"- `{e.combo.name}`: {e.refused}" for e in skipped]
    lines += [
        "",
        "## Curves",
        "",
        "One line per combination (mean over seeds, shaded: ± std); the first point is the base model.",
        "",
        f"![reward vs training time]({ctx.plots[0]})",
        "",
        f"![reward vs epochs]({ctx.plots[1]})",
        "",
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class Curve:
    """A combination's mean curve over seeds (seeds aligned by evaluation index)."""

    label: str
    role: str
    epochs: tuple[float, ...]
    seconds: tuple[float, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def mean_curve(label: str, role: str, runs: Sequence[RunResult]) -> Curve | None:
    """Average the seeds' points index by index (all seeds of a combination share their eval epochs)."""
    if not runs:
        return None
    n = min(len(r.points) for r in runs)
    ys = np.array([[p.score for p in r.points[:n]] for r in runs])
    secs = np.array([[p.seconds for p in r.points[:n]] for r in runs]).mean(axis=0)
    eps = np.array([[p.epochs for p in r.points[:n]] for r in runs]).mean(axis=0)
    std = ys.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(n)
    return Curve(label, role, tuple(eps), tuple(secs), tuple(ys.mean(axis=0)), tuple(std))


def plot_curves(curves: Sequence[Curve], x: Literal["seconds", "epochs"], out_png: Path, base: float | None, title: str = "") -> Path:
    """One line per combination, shaded ± std; the reference recipes drawn thicker."""
    from flowrl.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(11, 6), constrained_layout=True)
    cmap = plt.get_cmap("tab20")
    for i, c in enumerate(curves):
        xs = np.array(c.seconds) / 60 if x == "seconds" else np.array(c.epochs)
        m, s = np.array(c.mean), np.array(c.std)
        ref = c.role != "grid"
        style = "-" if ("elbo" in c.label or ref) else "--"
        color = {"paper": "black", "flowgrpo": "tab:red", "nft": "tab:blue", "awm": "tab:green"}.get(c.role, cmap(i % 20))
        ax.plot(xs, m, style, marker="o", ms=3, lw=2.5 if ref else 1.2, color=color, label=c.label)
        ax.fill_between(xs, m - s, m + s, color=color, alpha=0.12)
    if base is not None:
        ax.axhline(base, color="grey", lw=0.8, ls=":", label=f"base model {base:.3f}")
    ax.set_xlabel("training minutes" if x == "seconds" else "epochs")
    ax.set_ylabel("toy GenEval (test prompts, no CFG)")
    ax.grid(alpha=0.3)
    if curves or base is not None:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7)
    if title:
        ax.set_title(title)
    return save_figure(fig, out_png)


__all__ = [
    "AWM", "CFG_SCALE", "Calibration", "Combo", "ComboSummary", "CostModel", "Curve", "DEFAULT_THRESHOLDS", "EvalSettings",
    "FLOWGRPO", "Finding", "GridEntry", "Guard", "GuardLimits", "ImageStats", "NFT", "PAPER", "Point", "QUICK",
    "Ratio", "Reach", "ReachStat", "ReportContext", "RunPlan", "RunResult", "SAMPLERS", "Stat", "StudyPlan",
    "PROBE_EPOCHS", "PROBE_IMAGES", "Probe", "TINY", "TINY_OVERRIDES", "Threshold", "aggregate_reach", "allocate_epochs", "batch_overrides", "calibrated_seconds", "check_combo",
    "clock", "compare", "design_combos", "eval_epochs", "format_duration", "format_reach", "image_stats",
    "load_run", "mean_curve", "ordering_findings", "parse_threshold", "plan_lines", "plan_study", "plot_curves", "probe_batch", "probe_overrides",
    "render_results", "run_overrides", "saturation", "select_combos", "stat", "summarize_combo", "time_ratio",
    "time_to_threshold",
]
