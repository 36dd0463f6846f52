"""The paper's design-space study on the embedded toy model (issue 6); docs/design-space.md explains it.

Trains every combination of objective {epg, pepg, par, grpo} x estimator {elbo, trajectory} x
sampler {dpm2, flow-sde, flow-sde + CFG} (those the graph check accepts), plus DiffusionNFT, AWM and
FlowGRPO's recipe, for each seed; evaluates the checkpoints and the base model with the same prompts
and seeds; writes the report (docs/results.md) and two PNGs beside it. The pure parts live in
benchmarks/study.py.

Usage::

    .venv/bin/python benchmarks/design_space.py               # full study, <= 3 h on 2 cores
    .venv/bin/python benchmarks/design_space.py --quick       # 5 combinations x 1 seed, <= 30 min
    .venv/bin/python benchmarks/design_space.py --plan-only   # print the plan and stop
    .venv/bin/python benchmarks/design_space.py --report-only # rebuild the report from the run folders
    .venv/bin/python benchmarks/design_space.py --tiny --out /tmp/ds --report /tmp/ds/results.md  # smoke test

Before planning, the study measures this machine (OUT/calibration.json): each combination trains
two epochs at its own batch (a probe; the second, warm one is timed), and one probe's checkpoint
is evaluated, timed; epochs are then allocated from these seconds rather than from the cost
model's, measured on another day.
The file is reused, so a resumed study keeps its plan; --recalibrate measures again, --no-calibrate
plans from the cost model alone.

Runs go to OUT/<combination>/seed-<s>/ (a trainer run folder; evaluations in evals/<settings>/
epoch-N/, and study.json once finished). Rerunning the same command skips finished runs, resumes
interrupted ones (the trainer's --resume) and evaluations (flowrl eval's own resume).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
sys.path.insert(0, str(REPO / "benchmarks"))  # study.py, beside this file

import study  # noqa: E402
from flowrl.errors import FlowrlError  # noqa: E402


@dataclass(frozen=True)
class Mode:
    """Defaults of a study mode (each can be overridden on the command line).

    Attributes:
        name: "full", "quick" or "tiny".
        combos: combination names (None: every one).
        seeds: train seeds.
        budget_s: wall-clock budget.
        evals_per_run: checkpoints evaluated per run.
        eval: evaluation settings.
        extra: overrides applied to every combination.
        epochs: fixed epochs (None: allocated from the budget).
        out: run folders.
        report: the Markdown report.
    """

    name: str
    combos: tuple[str, ...] | None
    seeds: tuple[int, ...]
    budget_s: float
    evals_per_run: int
    eval: study.EvalSettings
    extra: tuple[str, ...]
    epochs: int | None
    out: Path
    report: Path


MODES = {
    "full": Mode("full", None, (0, 1, 2), 3 * 3600, 3, study.EvalSettings(images_per_prompt=2), (), None,
                 REPO / "outputs" / "design-space", REPO / "docs" / "results.md"),
    "quick": Mode("quick", study.QUICK, (0,), 30 * 60, 4, study.EvalSettings(), (), None,
                  REPO / "outputs" / "design-space-quick", REPO / "docs" / "results-quick.md"),
    "tiny": Mode("tiny", study.TINY, (0,), 10 * 60, 2, study.EvalSettings(limit=2, images_per_prompt=1, steps=3),
                 study.TINY_OVERRIDES, 2, REPO / "outputs" / "design-space-tiny", REPO / "outputs" / "design-space-tiny" / "results.md"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="design_space.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="paper recipe, FlowGRPO recipe, NFT, AWM, EPG/trajectory/flow-sde; 1 seed; 30 min budget")
    mode.add_argument("--tiny", action="store_true", help="smoke test: 2 combinations x 1 seed on tiny settings (seconds)")
    ap.add_argument("--report-only", action="store_true", help="rebuild the report and PNGs from the run folders; train nothing")
    ap.add_argument("--plan-only", action="store_true", help="print the plan and stop")
    ap.add_argument("--yes", action="store_true", help="run even when the plan exceeds the budget")
    ap.add_argument("--out", type=Path, help="folder of the runs (default: outputs/design-space[-quick|-tiny])")
    ap.add_argument("--report", type=Path, help="the Markdown report; the PNGs go beside it (default: docs/results.md, docs/results-quick.md for --quick)")
    ap.add_argument("--combos", help="comma-separated combination names (default: the mode's)")
    ap.add_argument("--seeds", help="comma-separated train seeds (default: 0,1,2; --quick and --tiny: 0)")
    ap.add_argument("--budget-hours", type=float, help="wall-clock budget (default: 3; --quick: 0.5)")
    ap.add_argument("--epochs", action="append", default=[], metavar="N|COMBO=N", help="fixed epochs for every run, or for one combination (repeatable); others are allocated from the budget")
    ap.add_argument("--allocation", choices=("time", "epochs"), default="time", help="time: every run trains the same seconds (default); epochs: the same epochs")
    ap.add_argument("--batch", type=int, help="images per epoch of every run (default: each pipeline's own)")
    ap.add_argument("--evals-per-run", type=int, help="checkpoints evaluated per run (default: 3; --quick: 4)")
    ap.add_argument("--eval-images-per-prompt", type=int, help="images per test prompt (default: 2; --quick: 4, GenEval's protocol)")
    ap.add_argument("--eval-limit", type=int, help="only the first N test prompts")
    ap.add_argument("--threshold", action="append", default=[], metavar="SPEC", help=f"score to reach: 0.8 or base+0.05 (repeatable; default: {' '.join(study.DEFAULT_THRESHOLDS)})")
    ap.add_argument("--clock", choices=("measured", "median"), default="measured", help="training time: sum of measured epoch times, or epochs x median epoch time (robust to other processes)")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    cal = ap.add_mutually_exclusive_group()
    cal.add_argument("--no-calibrate", action="store_true", help="plan from the cost model's estimates; probe nothing")
    cal.add_argument("--recalibrate", action="store_true", help="probe every combination again, even if OUT/calibration.json has it")
    return ap.parse_args(argv)


@dataclass(frozen=True)
class Settings:
    """The mode with the command line applied."""

    mode: Mode
    combos: tuple[str, ...] | None
    seeds: tuple[int, ...]
    budget_s: float
    evals_per_run: int
    eval: study.EvalSettings
    epochs: dict[str, int] | int | None
    batch: int | None
    out: Path
    report: Path
    thresholds: tuple[study.Threshold, ...]
    allocation: str
    clock: str


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise FlowrlError(f"{what} {text!r} is not a comma-separated list of integers (e.g. 0,1,2)") from None
    if not values:
        raise FlowrlError(f"{what} is empty; give at least one value (e.g. 0)")
    return values


def parse_epochs(items: list[str], default: int | None) -> dict[str, int] | int | None:
    """['30'] -> 30; ['nft=40'] -> {'nft': 40}; both -> every combination 30 except nft 40 (the
    combination names are checked by the caller)."""
    bare, named = default, {}
    for item in items:
        name, eq, value = item.rpartition("=")
        try:
            n = int(value)
        except ValueError:
            raise FlowrlError(f"--epochs {item!r}: expected N or COMBO=N with N an integer") from None
        if n < 1:
            raise FlowrlError(f"--epochs {item!r}: epochs must be >= 1")
        if eq:
            named[name] = n
        else:
            bare = n
    if named:
        return {"*": bare, **named} if bare is not None else named
    return bare


def settings_from(args: argparse.Namespace) -> Settings:
    mode = MODES["quick" if args.quick else "tiny" if args.tiny else "full"]
    ev = mode.eval
    if args.eval_images_per_prompt is not None:
        ev = replace(ev, images_per_prompt=args.eval_images_per_prompt)
    if args.eval_limit is not None:
        ev = replace(ev, limit=args.eval_limit)
    for name, value in (("--eval-images-per-prompt", ev.images_per_prompt), ("--eval-limit", ev.limit or 1),
                        ("--evals-per-run", args.evals_per_run or 1), ("--batch", args.batch or 1)):
        if value < 1:
            raise FlowrlError(f"{name} must be >= 1, got {value}")
    out = args.out or mode.out
    report = args.report or (mode.report if mode.name != "tiny" or args.out is None else out / "results.md")
    return Settings(
        mode=mode,
        combos=tuple(x.strip() for x in args.combos.split(",") if x.strip()) if args.combos else mode.combos,
        seeds=_ints(args.seeds, "--seeds") if args.seeds else mode.seeds,
        budget_s=args.budget_hours * 3600 if args.budget_hours else mode.budget_s,
        evals_per_run=args.evals_per_run or mode.evals_per_run,
        eval=ev,
        epochs=parse_epochs(args.epochs, mode.epochs),
        batch=args.batch,
        out=out,
        report=report,
        thresholds=tuple(study.parse_threshold(t) for t in (args.threshold or study.DEFAULT_THRESHOLDS)),
        allocation=args.allocation,
        clock=args.clock,
    )


# ------------------------------------------------------------------------------------ planning


def check_entries(s: Settings) -> list[study.GridEntry]:
    combos = study.design_combos()
    if s.combos is not None:
        combos = study.select_combos(combos, s.combos)
    return [study.check_combo(c, s.mode.extra, batch=s.batch) for c in combos]


def resolve_epochs(s: Settings, entries: list[study.GridEntry]) -> dict[str, int] | int | None:
    if not isinstance(s.epochs, dict):
        return s.epochs
    names = {e.combo.name for e in entries}
    unknown = sorted(set(s.epochs) - names - {"*"})
    if unknown:
        raise FlowrlError(f"--epochs {unknown[0]}=N: no such combination in this study; combinations: {', '.join(sorted(names))}")
    bare = s.epochs.get("*")
    out = {n: bare for n in names} if bare is not None else {}
    return out | {k: v for k, v in s.epochs.items() if k != "*"}


def n_test_prompts(ev: study.EvalSettings) -> int:
    from flowrl.prompts import load_prompt_set

    return len(load_prompt_set(ev.prompts))


def make_plan(s: Settings, calibration: study.Calibration | None = None, entries: list[study.GridEntry] | None = None) -> study.StudyPlan:
    entries = check_entries(s) if entries is None else entries
    return study.plan_study(
        entries, s.seeds, s.budget_s, s.eval, n_test_prompts(s.eval), s.evals_per_run,
        allocation=s.allocation, epochs=resolve_epochs(s, entries), calibration=calibration,
    )


# ---------------------------------------------------------------------------------- calibration


CALIBRATION_FILE = "calibration.json"


def load_calibration(out: Path) -> study.Calibration | None:
    """OUT/calibration.json, or None when there is none.

    Raises:
        FlowrlError: the file is there but unreadable (it is never silently replaced).
    """
    path = out / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        return study.Calibration.from_json(json.loads(path.read_text()))
    except ValueError as err:
        raise FlowrlError(f"{path} is not a calibration file ({err}); delete it or pass --recalibrate to measure again") from None


def probe(entry: study.GridEntry, folder: Path, log, ev: study.EvalSettings | None = None) -> tuple[study.Probe, float | None]:
    """Train the combination for PROBE_EPOCHS epochs in `folder` (deleted afterwards) and time it;
    with `ev`, also time an evaluation of its checkpoint with those settings.

    Returns:
        The probe, and the evaluation's seconds (None without `ev`).
    """
    import shutil

    from flowrl.config import load_pipeline
    from flowrl.train import CHECKPOINTS, Trainer

    batch = study.probe_batch(entry.pipeline)
    overrides = (*entry.overrides, *study.probe_overrides(entry.pipeline, batch))
    p = load_pipeline(study.PIPELINES / entry.combo.pipeline, overrides)
    shutil.rmtree(folder, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        trainer = Trainer(p, folder, log=log)
        trainer.run()
        wall = time.perf_counter() - t0
        if trainer.stopped_by is not None:
            raise Stopped(f"{trainer.stopped_by} while probing {entry.combo.name}")
        rows = [r for r in study.read_jsonl(folder / "metrics.jsonl") if "time/epoch_s" in r]
        eval_s = None
        if ev is not None:
            t1 = time.perf_counter()
            evaluate_into(folder / CHECKPOINTS / f"epoch-{study.PROBE_EPOCHS - 1}", folder / "eval", ev, log, weights=ev.weights)
            eval_s = time.perf_counter() - t1
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return study.Probe(batch, float(rows[-1]["time/epoch_s"]), wall), eval_s


def calibrate(s: Settings, entries: list[study.GridEntry], console, again: bool = False) -> study.Calibration:
    """Probe each combination that OUT/calibration.json lacks (every one with `again`), timing one
    evaluation of the first probe's checkpoint when these eval settings were never timed; saves and
    returns the merged calibration."""
    import platform

    say = lambda text: console.print(text, highlight=False, soft_wrap=True)  # noqa: E731
    quiet = lambda text: console.print(f"    {text}", highlight=False, style="dim", soft_wrap=True)  # noqa: E731
    old = None if again else load_calibration(s.out)
    have = old or study.Calibration({}, {})
    todo = [e for e in entries if e.refused is None and e.combo.name not in have.probes]
    if not todo and s.eval.tag() not in have.eval_s:
        todo = [e for e in entries if e.refused is None][:1]  # a probe to evaluate
    probes, evals = {}, {}
    for i, e in enumerate(todo, 1):
        timed = s.eval.tag() not in have.eval_s and not evals
        say(
            f"[bold]probe {i}/{len(todo)}[/] {e.combo.name}: {study.PROBE_EPOCHS} epoch{'s' if study.PROBE_EPOCHS > 1 else ''} of {study.probe_batch(e.pipeline)} images"
            + (", then a timed evaluation of its checkpoint" if timed else "")
        )
        pr, eval_s = probe(e, s.out / ".probes" / e.combo.name, quiet, s.eval if timed else None)
        probes[e.combo.name] = pr
        if eval_s is not None:
            evals[s.eval.tag()] = eval_s
        say(f"    {pr.epoch_at(e.pipeline.config.train.batch_size):.1f} s per epoch" + (f"; evaluation {eval_s:.0f} s" if eval_s else ""))
    if not probes and old is not None:
        return old
    host = f"{platform.node()} ({os.cpu_count()} CPUs)"
    cal = have.merged(study.Calibration(probes, evals, host, dt.datetime.now().isoformat(timespec="seconds")))
    s.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(s.out / CALIBRATION_FILE, cal.to_json())
    return cal


# ------------------------------------------------------------------------------------- running


def config_digest(run: study.RunPlan) -> str:
    """sha256 of the run's resolved pipeline (file + overrides, defaults filled in): an edit of the
    pipeline file that changes what the run trains changes it; a comment does not."""
    import hashlib

    from flowrl.config import load_pipeline

    config = load_pipeline(study.PIPELINES / run.combo.pipeline, run.overrides).config
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()


def identity(run: study.RunPlan, ev: study.EvalSettings) -> dict:
    """What a finished run's study.json must match for the run to be skipped (a study.json written
    before the config digest existed does not match: such runs are redone)."""
    return {
        "combo": run.combo.name, "pipeline": run.combo.pipeline, "seed": run.seed, "epochs": run.epochs,
        "eval_epochs": list(run.eval_epochs), "overrides": list(run.overrides), "eval": asdict(ev),
        "config_sha256": config_digest(run),
    }


def read_done(folder: Path) -> dict | None:
    path = folder / study.DONE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def evaluate_into(target: Path, out: Path, ev: study.EvalSettings, log, weights: str | None) -> float:
    """Evaluate a checkpoint (or the base model, weights None) into `out`; returns GenEval overall."""
    from flowrl.evaluate import EvalRequest, evaluate

    req = EvalRequest(
        target=str(target), rewards=("geneval",), prompts=ev.prompts, limit=ev.limit,
        images_per_prompt=ev.images_per_prompt, batch=ev.batch, weights=weights, sampler="euler",
        steps=ev.steps, guidance=ev.guidance, seed=ev.seed, out=out,
    )
    res = evaluate(req, log=log)
    return float(res.summary["overall"])


def base_folder(s: Settings) -> Path:
    return s.out / "base" / s.eval.tag()


def evaluate_base(s: Settings, log) -> float:
    from flowrl.paths import TOY_MODEL

    out = base_folder(s)
    score = study.eval_score(out)
    if score is not None:
        return score
    out.parent.mkdir(parents=True, exist_ok=True)
    return evaluate_into(TOY_MODEL, out, s.eval, log, weights=None)


class Stopped(Exception):
    """The trainer was stopped by a signal; the study stops and can be resumed."""


def run_one(run: study.RunPlan, s: Settings, log, ident: dict) -> dict:
    """Train (or resume) one run, evaluate its checkpoints, write study.json (with `ident`, the run's
    `identity`); returns study.json."""
    from flowrl.config import load_pipeline
    from flowrl.train import CHECKPOINTS, Trainer

    folder = s.out / run.folder
    t0 = time.perf_counter()
    p = load_pipeline(study.PIPELINES / run.combo.pipeline, run.overrides)
    resume = (folder / "pipeline.yaml").is_file() or (folder / CHECKPOINTS).is_dir()
    trainer = Trainer(p, folder, resume=resume, log=log)
    trainer.run()
    if trainer.stopped_by is not None:
        raise Stopped(f"{trainer.stopped_by} during {run.folder}")
    t1 = time.perf_counter()
    for epoch in run.eval_epochs:
        ckpt = folder / CHECKPOINTS / f"epoch-{epoch}"
        out = study.eval_folder(folder, epoch, s.eval.tag())
        if study.eval_score(out) is not None:
            continue
        if not ckpt.is_dir():
            raise FlowrlError(
                f"{run.folder}: checkpoint {ckpt} to evaluate is missing (the run folder was trained with other "
                f"epochs or checkpoint settings than this plan's {run.epochs} epochs); use the epochs it was trained "
                f"with (--epochs), another --out, or delete {folder}"
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        evaluate_into(ckpt, out, s.eval, log, weights=s.eval.weights)
    t2 = time.perf_counter()
    previous = read_done(folder) or {}
    done = {
        **ident, "planned_s": run.total_s,
        "train_wall_s": previous.get("train_wall_s", 0.0) + (t1 - t0), "eval_wall_s": previous.get("eval_wall_s", 0.0) + (t2 - t1),
        "finished": dt.datetime.now().isoformat(timespec="seconds"),
    }
    write_json_atomic(folder / study.DONE_FILE, done)
    return done


def run_study(s: Settings, plan: study.StudyPlan, console) -> None:
    """Every run of the plan in order, skipping finished ones; progress on the console."""
    say = lambda text: console.print(text, highlight=False, soft_wrap=True)  # noqa: E731
    quiet = lambda text: console.print(f"    {text}", highlight=False, style="dim", soft_wrap=True)  # noqa: E731
    start = time.perf_counter()
    say("[bold]base model[/]: evaluating (shared by every run)")
    base = evaluate_base(s, quiet)
    say(f"base model: toy GenEval {base:.3f}")
    runs = list(plan.runs)
    spent, planned_done = 0.0, 0.0
    for i, run in enumerate(runs, 1):
        folder = s.out / run.folder
        done, ident = read_done(folder), identity(run, s.eval)
        if done is not None and {k: done.get(k) for k in ident} == ident:
            say(f"[{i}/{len(runs)}] {run.folder}: finished earlier, skipped")
            continue
        left = sum(r.total_s for r in runs[i - 1:])
        speed = spent / planned_done if planned_done else 1.0
        elapsed = time.perf_counter() - start
        say(
            f"[bold][{i}/{len(runs)}] {run.folder}[/]: {run.epochs} epochs (~{run.epoch_s:.1f} s each), "
            f"{len(run.eval_epochs)} evals; planned {study.format_duration(run.total_s)}; elapsed "
            f"{study.format_duration(elapsed)}, about {study.format_duration(left * speed)} left"
        )
        t = time.perf_counter()
        record = run_one(run, s, quiet, ident)
        spent += time.perf_counter() - t
        planned_done += run.total_s
        say(f"    done in {study.format_duration(time.perf_counter() - t)} (planned {study.format_duration(record['planned_s'])})")


# -------------------------------------------------------------------------------------- report


def write_report(s: Settings, plan: study.StudyPlan, console, command: str) -> Path:
    """Read every run folder of the plan and write the report and its two PNGs."""
    say = lambda text: console.print(text, highlight=False, soft_wrap=True)  # noqa: E731
    tag = s.eval.tag()
    base = study.eval_score(base_folder(s))
    base_stats = study.image_stats(study.eval_images(base_folder(s))) if base is not None else None
    by_combo: dict[str, list[study.RunPlan]] = {}
    for r in plan.runs:
        by_combo.setdefault(r.combo.name, []).append(r)
    summaries, curves, notes, actual = [], [], [], 0.0
    for name, runs in by_combo.items():
        results = []
        for r in runs:
            folder = s.out / r.folder
            done = read_done(folder)
            if done is None or base is None:
                continue
            if done.get("eval") != asdict(s.eval):
                notes.append(f"{r.folder} was evaluated with other settings ({done.get('eval')}); left out")
                continue
            res = study.load_run(folder, name, r.seed, done["eval_epochs"], base, tag, s.clock)
            if res is None:
                notes.append(f"{r.folder}: study.json is there but an epoch or evaluation is missing; left out (rerun to finish it)")
                continue
            final = study.eval_folder(folder, done["eval_epochs"][-1], tag)
            guard = study.Guard.between(study.image_stats(study.eval_images(final)), base_stats)
            results.append(replace(res, guard=guard))
            actual += done.get("train_wall_s", 0.0) + done.get("eval_wall_s", 0.0)
        summaries.append(study.summarize_combo(runs[0].combo, results, len(runs), s.thresholds, base))
        curve = study.mean_curve(name, runs[0].combo.role, results)
        if curve is not None:
            curves.append(curve)
    stem = s.report.stem
    plots = (f"{stem}-reward-vs-time.png", f"{stem}-reward-vs-epochs.png")
    ctx = study.ReportContext(
        mode=s.mode.name, seeds=s.seeds, base_score=base, eval_settings=s.eval, n_test_prompts=n_test_prompts(s.eval),
        clock=s.clock, planned_s=plan.total_s, budget_s=s.budget_s, generated=dt.date.today().isoformat(),
        command=command, plots=plots, actual_s=actual or None, notes=tuple(notes),
    )
    s.report.parent.mkdir(parents=True, exist_ok=True)
    s.report.write_text(study.render_results(summaries, plan.skipped, s.thresholds, ctx))
    title = f"design-space study ({s.mode.name}), toy GenEval"
    study.plot_curves(curves, "seconds", s.report.parent / plots[0], base, title + " vs training time")
    study.plot_curves(curves, "epochs", s.report.parent / plots[1], base, title + " vs epochs")
    say(f"report: {s.report} (+ {plots[0]}, {plots[1]})")
    return s.report


def show_plan(plan: study.StudyPlan, console) -> None:
    for line in study.plan_lines(plan):
        console.print(line, highlight=False, soft_wrap=True)


def refuse_over_budget(plan: study.StudyPlan, yes: bool, console) -> bool:
    """True when the plan may run: it fits its budget, or --yes was given; else says why not."""
    if plan.fits or yes:
        return True
    console.print(
        f"[red]refused[/]: the plan needs {study.format_duration(plan.total_s)}, over the budget of "
        f"{study.format_duration(plan.budget_s)}. Pass --yes to run it anyway, or lower --epochs, --seeds, "
        "--evals-per-run or --eval-images-per-prompt (or raise --budget-hours).",
        highlight=False, soft_wrap=True,
    )
    return False


def report_command(argv: list[str]) -> str:
    """The command that rebuilds this report."""
    keep = [a for a in argv if a not in ("--report-only", "--yes", "--plan-only", "--recalibrate")]
    return shlex.join(["python", "benchmarks/design_space.py", *keep, "--report-only"])


def main(argv: list[str] | None = None) -> int:
    """Plan, check the budget, run, report. Returns the exit code (0 ok, 2 refused or bad input,
    130 interrupted)."""
    from rich.console import Console

    argv = list(sys.argv[1:] if argv is None else argv)
    console = Console(stderr=True)
    try:
        args = parse_args(argv)
        s = settings_from(args)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        entries = check_entries(s)
        plan = make_plan(s, None if args.no_calibrate else load_calibration(s.out), entries)
        measure = not (args.no_calibrate or args.report_only or args.plan_only)
        if not measure or not plan.fits:
            show_plan(plan, console)
        if args.report_only:
            write_report(s, plan, console, report_command(argv))
            return 0
        if not plan.runs:
            raise FlowrlError("no combination of this selection passes the graph check (see 'skipped' above); nothing to run")
        if not refuse_over_budget(plan, args.yes, console):
            return 2
        if args.plan_only:
            if plan.source == "estimated":
                console.print("(not calibrated yet: a run first measures this machine and may choose other epochs)", highlight=False)
            return 0
        s.out.mkdir(parents=True, exist_ok=True)
        try:
            if measure:
                plan = make_plan(s, calibrate(s, entries, console, again=args.recalibrate), entries)
                show_plan(plan, console)
                if not refuse_over_budget(plan, args.yes, console):
                    return 2
            run_study(s, plan, console)
        except Stopped as why:
            console.print(f"stopped ({why}); the run is checkpointed. Rerun the same command to resume.", highlight=False)
            return 130
        write_report(s, plan, console, report_command(argv))
        return 0
    except KeyboardInterrupt:
        console.print("interrupted; rerun the same command to resume (finished runs and scored images are kept)")
        return 130
    except FlowrlError as err:
        console.print(f"[red]error[/]: {err}", highlight=False, soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
