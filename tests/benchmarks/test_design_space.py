"""The design-space study (benchmarks/study.py, benchmarks/design_space.py): the combination grid with the
real graph check, the budget, time-to-threshold with censoring, ratios, the report, and an end-to-end
--tiny run that trains, evaluates, resumes and writes the report into a temporary folder."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import study
from flowrl.config import diff_configs, load_pipeline
from flowrl.errors import FlowrlError
from study import (
    CostModel,
    EvalSettings,
    GridEntry,
    Point,
    Reach,
    ReachStat,
    RunResult,
    Stat,
    aggregate_reach,
    allocate_epochs,
    check_combo,
    design_combos,
    eval_epochs,
    format_reach,
    parse_threshold,
    plan_study,
    time_ratio,
    time_to_threshold,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _auto_is_bf16(monkeypatch):
    """The toy pipelines say rollout_precision: auto; the cost model's hand values here are those of a
    machine where it resolves to bfloat16 (an AMX CPU), whatever machine runs the tests."""
    monkeypatch.setattr(study, "resolved_precision", lambda requested: "bfloat16" if requested == "auto" else requested)


@pytest.fixture(scope="module")
def entries() -> dict[str, GridEntry]:
    return {c.name: check_combo(c) for c in design_combos()}


# ------------------------------------------------------------------------------------- grid


def test_grid_is_objectives_x_estimators_x_samplers_plus_three_baselines(entries):
    grid = [f"{o}-{e}-{s.name}" for o in study.OBJECTIVES for e in study.ESTIMATORS for s in study.SAMPLERS]
    assert list(entries) == grid + [study.FLOWGRPO, study.NFT, study.AWM]
    assert len(grid) == 24


def test_the_real_graph_check_refuses_trajectory_with_the_ode_sampler_and_nothing_else(entries):
    refused = {name: e.refused for name, e in entries.items() if e.refused is not None}
    assert set(refused) == {f"{o}-trajectory-dpm2" for o in study.OBJECTIVES}
    for message in refused.values():
        assert message.startswith("estimator.kind: the trajectory estimator needs per-step Gaussian transitions")
        assert "'dpm2' is deterministic" in message
    assert sum(e.refused is None for e in entries.values()) == 23


def test_the_paper_combination_is_exactly_the_toy_geneval_pipeline(entries):
    paper = entries[study.PAPER].pipeline.to_dict()
    assert diff_configs(load_pipeline(REPO / "pipelines" / "toy-geneval.yaml").to_dict(), paper) == []
    assert entries[study.PAPER].combo.role == "paper"


def test_grid_combinations_differ_from_the_paper_recipe_only_on_the_three_axes(entries):
    paper = entries[study.PAPER].pipeline.to_dict()
    for name, e in entries.items():
        if e.refused is None and e.combo.role in ("grid", "paper"):
            changed = {c.key.split(".")[0] for c in diff_configs(paper, e.pipeline.to_dict())}
            assert changed <= {"objective", "estimator", "sampler"}, (name, changed)
    cfg = entries["epg-trajectory-flow-sde-cfg"].pipeline
    assert (cfg.sampler.kind, cfg.sampler.guidance, cfg.sampler.noise_level) == ("flow-sde", 4.5, 0.7)
    assert (cfg.estimator.kind, cfg.estimator.guidance, cfg.estimator.timestep_fraction) == ("trajectory", 4.5, 0.3)
    assert entries["grpo-elbo-flow-sde-cfg"].pipeline.estimator.guidance == 4.5
    assert entries["grpo-elbo-dpm2"].pipeline.objective.kind == "grpo"


def test_baselines_are_their_pipeline_files_unchanged(entries):
    for name, file in ((study.FLOWGRPO, "toy-flowgrpo.yaml"), (study.NFT, "toy-nft.yaml"), (study.AWM, "toy-awm.yaml")):
        expected = load_pipeline(REPO / "pipelines" / file).to_dict()
        assert diff_configs(expected, entries[name].pipeline.to_dict()) == []
    assert entries[study.FLOWGRPO].pipeline.objective.clip_range == 1e-4


#: What each toy baseline must share with the released config its header names (the values of
#: yifan123/flow_grpo ac4c86e config/grpo.py geneval_sd3, NVlabs/DiffusionNFT 24af555 config/nft.py
#: sd3_geneval, scxue/advantage_weighted_matching be51372 config/dgx_awm.py geneval_sd3_no_cfg_1node).
RELEASED = {
    "toy-flowgrpo.yaml": ("ac4c86e8cae021841f1fde853d340e0db67690dd", {
        "sampler.kind": "flow-sde", "sampler.steps": 10, "sampler.guidance": 4.5, "sampler.noise_level": 0.7,
        "estimator.kind": "trajectory", "estimator.timestep_fraction": 0.99, "estimator.reduction": "mean",
        "objective.kind": "grpo", "objective.clip_range": 1e-4, "objective.kl.kind": "flowgrpo-step",
        "objective.kl.beta": 0.04, "advantage.std": "global", "advantage.clip": 5.0, "optimizer.lr": 3e-4,
        "optimizer.grad_clip": 1.0, "optimizer.schedule": "constant", "train.steps_per_epoch": 2,
        "train.rollout_policy": "policy", "train.ema_decay": 0.9, "model.lora.rank": 32, "model.lora.alpha": 64.0,
        "eval.sampler.steps": 40, "eval.sampler.guidance": 4.5, "rewards.0.signal": "dense",
    }),
    "toy-nft.yaml": ("24af5554898d85e93efa492f42b5e9cdf4156e9b", {
        "sampler.kind": "dpm2", "sampler.steps": 10, "sampler.guidance": 1.0, "estimator.kind": "elbo",
        "estimator.timestep_fraction": 0.99, "objective.kind": "nft", "objective.guidance_strength": 1.0,
        "objective.adv_clip": 5.0, "objective.kl.kind": "girsanov", "objective.kl.beta": 1e-4,
        "advantage.std": "global", "optimizer.lr": 3e-4, "optimizer.grad_clip": 1.0, "train.steps_per_epoch": 1,
        "train.rollout_policy": "old", "train.old.rate": 0.001, "train.old.max": 0.5, "train.ema_decay": 0.9,
        "model.lora.rank": 32, "eval.sampler.steps": 40, "eval.sampler.guidance": 1.0, "rewards.0.signal": "dense",
    }),
    "toy-awm.yaml": ("be5137232e33a21b449ed65a533211d0deb97ed8", {
        "sampler.steps": 14, "sampler.guidance": 1.0, "estimator.kind": "elbo", "objective.kind": "awm",
        "objective.weighting": "ghuber", "objective.ghuber_power": 0.25, "objective.advantage_scale": 0.2,
        "objective.old_beta": 1.0, "objective.kl.kind": "girsanov", "objective.kl.beta": 1e-3,
        "advantage.std": "global", "advantage.clip": 5.0, "optimizer.lr": 3e-4, "optimizer.grad_clip": 1.0,
        "train.steps_per_epoch": 1, "train.rollout_policy": "policy", "train.old.rate": 0.001, "train.old.max": 0.3,
        "train.ema_decay": 0.99, "model.lora.rank": 32, "eval.sampler.steps": 40, "rewards.0.signal": "dense",
    }),
}


def _get(data, dotted: str):
    for part in dotted.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


@pytest.mark.parametrize("file", sorted(RELEASED))
def test_baselines_mirror_their_released_configs(file):
    commit, values = RELEASED[file]
    path = REPO / "pipelines" / file
    assert commit in path.read_text(), "the header must name the commit it mirrors"
    data = load_pipeline(path).to_dict()
    wrong = {k: (_get(data, k), v) for k, v in values.items() if _get(data, k) != v}
    assert not wrong, wrong
    attention = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    assert data["model"]["lora"]["targets"] == attention


def test_awm_trains_six_of_the_grid_times_awm_trains():
    """AWM's times: the 14-step grid without index 0 and the last two (0.973 .. 0.357), 6 per image."""
    from flowrl.estimators.elbo import num_terms, times_in_range
    from flowrl.samplers import sd3_sigmas

    p = load_pipeline(REPO / "pipelines" / "toy-awm.yaml")
    grid = sd3_sigmas(p.sampler.steps)
    kept = times_in_range(grid[:-1], p.estimator.t_range)
    torch.testing.assert_close(kept, grid[1:12])
    assert num_terms(len(kept), p.estimator.timestep_fraction) == 6


def test_select_combos_keeps_study_order_and_names_the_nearest_on_a_typo():
    names = [c.name for c in study.select_combos(design_combos(), study.QUICK)]
    assert names == ["epg-trajectory-flow-sde", study.PAPER, study.FLOWGRPO, study.NFT, study.AWM]
    with pytest.raises(FlowrlError, match="did you mean.*pepg-elbo-dpm2"):
        study.select_combos(design_combos(), ["pepg-elbo-dpm"])


def test_batch_override_shrinks_the_micro_batch_to_whole_groups():
    paper = next(c for c in design_combos() if c.name == study.PAPER)
    e = check_combo(paper, batch=32)
    assert e.refused is None
    assert (e.pipeline.config.train.batch_size, e.pipeline.config.train.micro_batch) == (32, 32)
    bad = check_combo(paper, batch=12)
    assert bad.refused is not None and "group_size 8 does not divide train.batch_size 12" in bad.refused


# ----------------------------------------------------------------------------------- budget


#: The cost model's epoch of pipelines/toy-geneval.yaml: rollout + reward + 3 ELBO terms with a KL reference pass.
PAPER_EPOCH_S = 4.3 + 0.3 + 5.3 * 4 / 3


def test_cost_model_hand_values(entries):
    cost = CostModel()
    # 256 images x (10 steps x 4.3/2560 + 0.3/256 + 3 terms x 5.3/768 x 4/3) = 4.3 + 0.3 + 5.3 x 4/3:
    # the pipeline's KL term (beta 1e-2) adds a reference forward to the 3 passes of each term
    assert cost.epoch_seconds(entries[study.PAPER].pipeline) == pytest.approx(PAPER_EPOCH_S)
    # CFG doubles both the rollout and the training passes
    assert cost.epoch_seconds(entries["pepg-elbo-flow-sde-cfg"].pipeline) == pytest.approx(8.6 + 0.3 + 10.6 * 4 / 3)
    # DiffusionNFT's recipe: the same rollout and reward, 9 re-noised terms with a KL reference pass
    assert cost.epoch_seconds(entries[study.NFT].pipeline) == pytest.approx(4.3 + 0.3 + 3 * 5.3 * 4 / 3)
    # 64 fp32 images, 9 terms, a KL reference pass
    small = load_pipeline(REPO / "pipelines" / "toy-nft.yaml", [
        "train.batch_size=64", "train.micro_batch=64", "estimator.timestep_fraction=0.99", "train.rollout_precision=float32"])
    nft = 64 * (10 * 4.3 / 2560 * 5.5 / 4.3 + 0.3 / 256 + 9 * 5.3 / 768 * 4 / 3)
    assert cost.epoch_seconds(small) == pytest.approx(nft)
    assert cost.evaluation_seconds(316, 20) == pytest.approx(3.0 + 14.0)


@pytest.mark.parametrize(("epochs", "points", "expected"), [
    (10, 3, (3, 7, 9)), (12, 3, (3, 7, 11)), (5, 3, (1, 3, 4)), (2, 2, (0, 1)), (1, 4, (0,)), (3, 5, (0, 1, 2)),
])
def test_eval_epochs(epochs, points, expected):
    assert eval_epochs(epochs, points) == expected


def test_allocate_epochs_by_time_and_by_epochs():
    # 2 seeds, 100 s available: 25 s per run
    assert allocate_epochs({"a": 5.0, "b": 10.0}, 2, 100.0, "time") == {"a": 5, "b": 2}  # 2.5 rounds to 2
    assert allocate_epochs({"a": 5.0, "b": 10.0}, 2, 100.0, "epochs") == {"a": 3, "b": 3}  # 100 // (2 x 15)
    # nothing left: one epoch each (the plan then exceeds its budget)
    assert allocate_epochs({"a": 5.0}, 3, -10.0, "time") == {"a": 1}
    # rounding up must not break the budget: 3 x 7 x 4.9 > 100, so one combination drops an epoch
    got = allocate_epochs({"a": 4.9, "b": 4.9, "c": 4.9}, 1, 100.0, "time")
    assert sum(got.values()) * 4.9 <= 100.0 and sorted(got.values()) == [6, 7, 7]
    with pytest.raises(ValueError):
        allocate_epochs({"a": 1.0}, 1, 10.0, "steps")


def test_plan_study_fits_the_budget_and_lists_the_skipped(entries):
    chosen = [entries[n] for n in (study.PAPER, study.NFT, "epg-trajectory-dpm2")]
    ev = EvalSettings()
    plan = plan_study(chosen, (0, 1), 3600, ev, 79, 3)
    assert [e.combo.name for e in plan.skipped] == ["epg-trajectory-dpm2"]
    assert [r.folder for r in plan.runs] == ["pepg-elbo-dpm2/seed-0", "pepg-elbo-dpm2/seed-1", "nft/seed-0", "nft/seed-1"]
    assert plan.fits and plan.total_s <= 3600
    r = plan.runs[0]
    assert r.total_s == pytest.approx(5.0 + r.epochs * PAPER_EPOCH_S + len(r.eval_epochs) * 17.0)
    assert plan.total_s == pytest.approx(17.0 + sum(x.total_s for x in plan.runs))
    assert "train.seed=0" in r.overrides and f"train.epochs={r.epochs}" in r.overrides and "eval.every=0" in r.overrides
    assert f"checkpoint.every={r.eval_epochs[0] + 1}" in r.overrides
    # fixed epochs beyond the budget: the plan says it does not fit
    big = plan_study(chosen, (0, 1), 3600, ev, 79, 3, epochs=200)
    assert not big.fits and {x.epochs for x in big.runs} == {200} and big.allocation == "fixed"
    # the study's run overrides resolve (checkpoints on the evaluated epochs, all of them kept)
    p = load_pipeline(REPO / "pipelines" / r.combo.pipeline, r.overrides)
    assert p.config.checkpoint.keep_last == len(r.eval_epochs) + 1 and p.config.eval.every == 0


def test_default_full_and_quick_plans_fit_their_budgets():
    ds = _load_script()
    full = ds.make_plan(ds.settings_from(ds.parse_args([])))
    assert full.fits and full.total_s <= 3 * 3600 and len(full.runs) == 23 * 3 and len(full.skipped) == 4
    quick = ds.make_plan(ds.settings_from(ds.parse_args(["--quick"])))
    assert quick.fits and quick.total_s <= 30 * 60 and len(quick.runs) == 5
    assert {r.epochs for r in quick.runs if r.combo.name == study.PAPER} == {21}  # about 4 minutes of 11.7 s epochs


# ------------------------------------------------------------------------------ calibration


def test_probe_batch_is_the_runs_own_or_whole_groups_per_step_never_above_the_batch(entries):
    assert study.probe_batch(entries[study.PAPER].pipeline) == 256  # by default each run's own batch
    assert study.probe_batch(entries[study.FLOWGRPO].pipeline) == 256  # its own batch too
    assert study.probe_batch(entries[study.PAPER].pipeline, target=64) == 64  # 8 groups of 8
    assert study.probe_batch(entries[study.PAPER].pipeline, target=60) == 64  # rounded up to whole groups
    assert study.probe_batch(entries[study.PAPER].pipeline, target=1000) == 256  # capped at the batch
    assert study.probe_batch(entries[study.FLOWGRPO].pipeline, target=20) == 32  # 2 steps per epoch x group 8
    # the probe's overrides resolve: PROBE_EPOCHS epochs, whole groups per micro-batch, no periodic eval
    p = entries[study.PAPER].pipeline
    probe = load_pipeline(REPO / "pipelines" / "toy-geneval.yaml", study.probe_overrides(p, 64))
    t = probe.config.train
    assert (t.batch_size, t.epochs, probe.config.eval.every) == (64, study.PROBE_EPOCHS, 0)
    assert t.micro_batch % probe.config.prompts.group_size == 0
    assert probe.config.checkpoint.every == study.PROBE_EPOCHS  # the checkpoint the eval timing needs


def test_probe_scales_linearly_and_its_overhead_is_what_the_epochs_leave():
    pr = study.Probe(batch=64, epoch_s=4.0, wall_s=20.0)
    assert pr.epoch_at(256) == pytest.approx(16.0)
    assert pr.overhead_s == pytest.approx(20.0 - study.PROBE_EPOCHS * 4.0)
    assert study.Probe(64, 4.0, 2.0).overhead_s == 0.0  # never negative
    assert study.Probe(64, 4.0, 20.0, epochs=2).overhead_s == pytest.approx(12.0)  # a file records its probes' epochs


def _calibration(entries, factor: float, names=(study.PAPER,)) -> study.Calibration:
    """A calibration where each named combination's epoch took `factor` x the cost model's estimate."""
    cost = CostModel()
    probes = {}
    for n in names:
        p = entries[n].pipeline
        b = study.probe_batch(p)
        probes[n] = study.Probe(b, factor * cost.epoch_seconds(p) * b / p.config.train.batch_size, 30.0)
    return study.Calibration(probes, {EvalSettings().tag(): 40.0}, "test", "2026-11-27T08:00:00")


def test_calibrated_seconds_use_the_probes_and_scale_the_rest_by_the_machine_speed(entries):
    cost = CostModel()
    names = (study.PAPER, study.FLOWGRPO, study.AWM)
    pipes = {n: entries[n].pipeline for n in names}
    cal = study.Calibration(
        {study.PAPER: study.Probe(64, 6.0, 30.0), study.FLOWGRPO: study.Probe(pipes[study.FLOWGRPO].config.train.batch_size, 1.5 * cost.epoch_seconds(pipes[study.FLOWGRPO]), 22.0)},
        {EvalSettings().tag(): 40.0},
    )
    per_epoch, eval_s, overhead = study.calibrated_seconds(cal, pipes, EvalSettings(), 316)
    assert per_epoch[study.PAPER] == pytest.approx(24.0)  # 6 s per 64 images -> 256 images
    assert per_epoch[study.FLOWGRPO] == pytest.approx(1.5 * cost.epoch_seconds(pipes[study.FLOWGRPO]))
    # AWM was not probed: the median speed of the probed two (1.5 and 24 / PAPER_EPOCH_S) times its estimate
    speed = float(np.median([24.0 / PAPER_EPOCH_S, 1.5]))
    assert cal.speed(cost, pipes) == pytest.approx(speed)
    assert per_epoch[study.AWM] == pytest.approx(speed * cost.epoch_seconds(pipes[study.AWM]))
    assert eval_s == 40.0  # the timed base-model evaluation of these settings
    assert overhead == pytest.approx(max(30.0 - study.PROBE_EPOCHS * 6.0, 22.0 - study.PROBE_EPOCHS * per_epoch[study.FLOWGRPO]))
    # other eval settings were never timed: the estimate times the speed
    other = EvalSettings(images_per_prompt=2)
    _, eval2, _ = study.calibrated_seconds(cal, pipes, other, 158)
    assert eval2 == pytest.approx(speed * cost.evaluation_seconds(158, 20))


def test_a_slower_machine_gets_fewer_epochs_and_the_plan_still_fits(entries):
    chosen = [entries[n] for n in (study.PAPER, study.NFT)]
    estimated = plan_study(chosen, (0,), 1800, EvalSettings(), 79, 4)
    slow = plan_study(chosen, (0,), 1800, EvalSettings(), 79, 4, calibration=_calibration(entries, 1.5, (study.PAPER, study.NFT)))
    assert estimated.source == "estimated" and slow.source == "measured"
    assert slow.fits and slow.probe_s == pytest.approx(60.0 + 40.0)  # probe runs + the timed probe evaluation
    assert slow.total_s == pytest.approx(100.0 + 40.0 + sum(r.total_s for r in slow.runs))
    for a, b in zip(estimated.runs, slow.runs):
        assert b.epoch_s == pytest.approx(1.5 * a.epoch_s)
        assert b.epochs < a.epochs  # the same seconds buy fewer epochs
    # measured on a machine this slow, the cost model's plan would have overrun its budget
    assert sum(r.epochs * 1.5 * r.epoch_s for r in estimated.runs) > sum(r.train_s for r in slow.runs)
    assert "seconds measured on this machine" in study.plan_lines(slow)[-1] and "probes 1.7 min" in study.plan_lines(slow)[-1]
    assert "estimated by the cost model" in study.plan_lines(estimated)[-1]


def test_calibration_round_trips_and_a_bad_file_is_refused(entries, tmp_path):
    cal = _calibration(entries, 1.3, (study.PAPER, study.NFT))
    assert study.Calibration.from_json(json.loads(json.dumps(cal.to_json()))) == cal
    merged = cal.merged(study.Calibration({study.AWM: study.Probe(64, 3.0, 9.0)}, {}, "", ""))
    assert set(merged.probes) == {study.PAPER, study.NFT, study.AWM} and merged.host == "test"
    with pytest.raises(ValueError, match="not a calibration record"):
        study.Calibration.from_json({"probes": {"x": {"batch": 64}}})
    ds = _load_script()
    assert ds.load_calibration(tmp_path) is None
    (tmp_path / ds.CALIBRATION_FILE).write_text('{"probes": 3}')
    with pytest.raises(FlowrlError, match="--recalibrate"):
        ds.load_calibration(tmp_path)


# ------------------------------------------------------------------------------- thresholds


def test_parse_threshold():
    assert parse_threshold("0.8") == study.Threshold("0.8", 0.8, False)
    t = parse_threshold("base+0.05")
    assert t.relative and t.level(0.35) == pytest.approx(0.40) and t.level(None) is None
    assert t.label(0.35) == "base+0.05 (=0.400)"
    for bad in ("base-0.1", "1.5", "eighty", ""):
        with pytest.raises(FlowrlError, match="neither a score"):
            parse_threshold(bad)


def _points(*scores: float, epoch_s: float = 10.0, every: int = 5) -> list[Point]:
    """The base point, then an evaluation every `every` epochs of `epoch_s` seconds."""
    return [Point(0, 0.0, scores[0])] + [Point(every * i, every * i * epoch_s, s) for i, s in enumerate(scores[1:], 1)]


def test_time_to_threshold_first_evaluation_at_or_above():
    pts = _points(0.35, 0.38, 0.42, 0.41, 0.47)
    assert time_to_threshold(pts, 0.40) == Reach(100.0, 10, 200.0, 20)
    assert time_to_threshold(pts, 0.47) == Reach(200.0, 20, 200.0, 20)  # equality counts
    assert time_to_threshold(pts, 0.35) == Reach(0.0, 0, 200.0, 20)  # the base model is already there


def test_time_to_threshold_censored_runs_keep_their_horizon():
    r = time_to_threshold(_points(0.35, 0.40, 0.45), 0.8)
    assert not r.reached and r.seconds is None and r.epochs is None
    assert (r.horizon_s, r.horizon_epochs) == (100.0, 10)


def test_aggregate_reach_and_format():
    done = aggregate_reach([Reach(100.0, 10, 300.0, 30), Reach(140.0, 14, 300.0, 30)])
    assert done.complete and done.seconds.mean == pytest.approx(120.0)
    assert done.seconds.std == pytest.approx(math.sqrt(800.0))
    assert format_reach(done) == "120 ± 28 s"
    part = aggregate_reach([Reach(100.0, 10, 300.0, 30), Reach(None, None, 300.0, 30)])
    assert not part.complete and part.seconds is None and part.lower_s == pytest.approx(200.0)
    assert format_reach(part) == "≥ 200 s (1/2 reached)"
    none = aggregate_reach([Reach(None, None, 280.0, 28), Reach(None, None, 300.0, 30)])
    assert format_reach(none) == "not reached in 300 s (0/2)"
    assert format_reach(aggregate_reach([Reach(50.0, 5, 90.0, 9)])) == "50 s"
    assert format_reach(aggregate_reach([])) == "-"


def _rs(*reaches: tuple[float | None, float]) -> ReachStat:
    return aggregate_reach([Reach(s, None if s is None else 1, h, 10) for s, h in reaches])


def test_time_ratio_exact_and_bounded_by_censoring():
    paper = _rs((100.0, 300.0), (100.0, 300.0))
    exact = time_ratio(_rs((460.0, 900.0), (460.0, 900.0)), paper, "FlowGRPO recipe")
    assert (exact.value, exact.bound) == (pytest.approx(4.6), "exact")
    assert exact.format() == "4.60x" and exact.verdict(4.6) == "meets the goal" and exact.verdict(5.0) == "misses the goal"
    # FlowGRPO never got there in 300 s: the ratio is at least 3x, which cannot tell about a 4.6x goal
    lower = time_ratio(_rs((None, 300.0), (None, 300.0)), paper, "FlowGRPO recipe")
    assert (lower.value, lower.bound) == (pytest.approx(3.0), "lower")
    assert lower.format().startswith("≥ 3.00x (FlowGRPO recipe censored in 2/2 runs")
    assert lower.verdict(4.6) == "undetermined" and lower.verdict(2.0) == "meets the goal"
    # the paper recipe censored, the baseline reached: an upper bound
    upper = time_ratio(_rs((150.0, 300.0)), _rs((None, 300.0)), "NFT")
    assert (upper.value, upper.bound) == (pytest.approx(0.5), "upper") and upper.verdict(2.0) == "misses the goal"
    both = time_ratio(_rs((None, 300.0)), _rs((None, 300.0)), "NFT")
    assert both.value is None and both.format().startswith("n/a (both censored") and both.verdict(2.0) == "undetermined"
    assert time_ratio(_rs((10.0, 30.0)), _rs((0.0, 30.0))).value is None  # reached before training
    assert "no finished runs" in time_ratio(aggregate_reach([]), paper).format()


def test_clock_and_compare():
    assert study.clock([10.0, 12.0, 50.0]) == [10.0, 22.0, 72.0]
    assert study.clock([10.0, 12.0, 50.0], "median") == [12.0, 24.0, 36.0]
    assert study.compare(Stat(0.5, 0.02, 3), Stat(0.4, 0.02, 3)) == ">"
    assert study.compare(Stat(0.42, 0.02, 3), Stat(0.40, 0.02, 3)) == "≈"
    assert study.compare(Stat(0.30, 0.0, 1), Stat(0.40, 0.0, 1)) == "<"
    assert study.compare(None, Stat(0.4, 0.0, 1)) == "?"


# ------------------------------------------------------------------------------------- guard


def test_saturation_and_image_stats_hand_values():
    grey = np.full((1, 3, 4, 4), 0.5)
    red = np.zeros((1, 3, 4, 4))
    red[:, 0] = 1.0
    black = np.zeros((1, 3, 4, 4))
    assert study.saturation(np.concatenate([grey, red, black])).tolist() == [0.0, 1.0, 0.0]

    class D:
        def __init__(self, score):
            self.score = score

    fake = lambda images: [{"circle": [D(0.9), D(0.2)]}, {"circle": []}]  # noqa: E731
    s = study.image_stats(np.concatenate([grey, red]), detect=fake)
    assert (s.saturation, s.detected, s.confidence, s.n) == (0.5, 0.5, pytest.approx(0.45), 2)
    g = study.Guard.between(study.ImageStats(0.6, 0.7, 0.5, 2), study.ImageStats(0.5, 0.9, 0.6, 2))
    assert (g.saturation, g.detected, g.confidence) == pytest.approx((0.1, -0.2, -0.1))
    assert study.GuardLimits().flags(g) == ["saturation +0.100", "detections -0.200", "confidence -0.100"]
    assert study.GuardLimits().flags(study.Guard(0.01, 0.05, 0.02)) == []


# ------------------------------------------------------------------------------------ report


def _result(combo: str, seed: int, *scores: float, guard=None) -> RunResult:
    return RunResult(combo, seed, tuple(_points(0.35, *scores)), (10.0,) * 5 * len(scores), guard)


def _summaries(thresholds):
    combos = {c.name: c for c in design_combos()}
    runs = {
        study.PAPER: [_result(study.PAPER, 0, 0.42, 0.50), _result(study.PAPER, 1, 0.38, 0.46, guard=study.Guard(0.2, 0.0, 0.0))],
        study.FLOWGRPO: [_result(study.FLOWGRPO, 0, 0.36, 0.39), _result(study.FLOWGRPO, 1, 0.37, 0.41)],
        study.NFT: [],
    }
    return [study.summarize_combo(combos[n], rs, 2, thresholds, 0.35) for n, rs in runs.items()]


def test_render_results_table_ratios_and_censoring():
    thresholds = tuple(parse_threshold(t) for t in study.DEFAULT_THRESHOLDS)
    skipped = [GridEntry(next(c for c in design_combos() if c.name == "epg-trajectory-dpm2"), (), refused="estimator.kind: no ODE")]
    ctx = study.ReportContext("full", (0, 1), 0.35, EvalSettings(images_per_prompt=2), 79, "measured", 9000.0, 10800.0, "today", "cmd", ("t.png", "e.png"))
    text = study.render_results(_summaries(thresholds), skipped, thresholds, ctx)
    table = [line for line in text.splitlines() if line.startswith("| **PEPG**")]
    assert len(table) == 1
    cells = table[0].split(" | ")
    assert cells[1:4] == ["ELBO", "ODE (dpm2)", "0.480 ± 0.028"]  # final 0.50 and 0.46
    # base+0.05 = 0.40: seed 0 at 50 s, seed 1 at 100 s; base+0.10 = 0.45: both at 100 s; 0.8 never
    assert cells[4] == "not reached in 100 s (0/2)" and cells[6] == "75 ± 35 s" and cells[7] == "100 ± 0 s"
    assert "⚠" in cells[8]  # seed 1's saturation moved by 0.2
    assert cells[-1] == "0.96 |"
    # every row of the ablation table has as many cells as its header
    rows = [line for line in text.split("## Ablation table")[1].splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in rows}) == 1 and len(rows) == 2 + 3
    assert "| **NFT (DiffusionNFT)** | - (velocity) | ODE (dpm2) | not run |" in text
    # FlowGRPO reaches base+0.05 only in seed 1 (100 s): censored, so a lower bound over the paper's 75 s
    head = next(line for line in text.splitlines() if line.startswith("| base+0.05"))
    assert "≥ 100 s (1/2 reached)" in head and "≥ 1.33x (FlowGRPO recipe censored in 1/2 runs): undetermined" in head
    assert "| 0.80 | not reached in 100 s (0/2) |" in text and "n/a (not run)" in head
    assert "- `epg-trajectory-dpm2`: estimator.kind: no ODE" in text
    assert "![reward vs training time](t.png)" in text and "Base model: 0.350." in text
    assert "**reproduced**: RL improves the base model (paper recipe)" in text
    assert "**undetermined**: DiffusionNFT needs >= 2.0x" in text


def test_ordering_findings_report_a_reversed_order_honestly():
    thresholds = (parse_threshold("base+0.05"),)
    combos = {c.name: c for c in design_combos()}
    runs = {
        study.PAPER: [_result(study.PAPER, s, 0.36, 0.37) for s in (0, 1)],
        study.FLOWGRPO: [_result(study.FLOWGRPO, s, 0.45, 0.50) for s in (0, 1)],
        "epg-elbo-dpm2": [_result("epg-elbo-dpm2", s, 0.36, 0.36 + 0.01 * s) for s in (0, 1)],
        "epg-elbo-flow-sde": [_result("epg-elbo-flow-sde", s, 0.45, 0.55 + 0.01 * s) for s in (0, 1)],
    }
    summaries = {n: study.summarize_combo(combos[n], rs, 2, thresholds, 0.35) for n, rs in runs.items()}
    found = {f.claim: f for f in study.ordering_findings(summaries, thresholds, 0.35)}
    assert found["FlowGRPO recipe needs >= 4.6x the paper recipe's time to a threshold"].verdict == "not reproduced"
    assert found["with ELBO, ODE rollouts beat SDE rollouts (EPG)"].verdict == "not reproduced"
    assert found["with ELBO the loss matters less than the estimator/sampler"].verdict == "undetermined"


def test_load_run_reads_clock_and_scores_and_refuses_unfinished(tmp_path):
    run, tag = tmp_path / "run", "tag"
    run.mkdir()
    rows = [{"epoch": -1, "eval/geneval": 0.1}] + [{"epoch": e, "time/epoch_s": 10.0 + e} for e in range(4)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"epoch": 4, "ti')
    for epoch, score in ((1, 0.40), (3, 0.45)):
        folder = study.eval_folder(run, epoch, tag)
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps({"overall": score}))
    got = study.load_run(run, "c", 0, (1, 3), 0.35, tag)
    assert got.points == (Point(0, 0.0, 0.35), Point(2, 21.0, 0.40), Point(4, 46.0, 0.45))
    assert got.final == 0.45
    assert study.load_run(run, "c", 0, (1, 3, 5), 0.35, tag) is None  # epoch 5 not trained
    (study.eval_folder(run, 3, tag) / "summary.json").unlink()
    assert study.load_run(run, "c", 0, (1, 3), 0.35, tag) is None  # evaluation missing


# ---------------------------------------------------------------------------- end to end


def _load_script():
    """benchmarks/design_space.py as a module (benchmarks/ is not a package)."""
    import sys

    name = "flowrl_benchmarks_design_space"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / "design_space.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses resolve their annotations through sys.modules
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_plan_over_budget_is_refused_without_yes(tmp_path, capsys):
    ds = _load_script()
    out = tmp_path / "runs"
    assert ds.main(["--quick", "--epochs", "400", "--out", str(out), "--report", str(tmp_path / "r.md")]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "over the budget of 30.0 min" in err and "--yes" in err
    assert not out.exists()
    assert ds.main(["--quick", "--epochs", "nope=3", "--plan-only"]) == 2
    assert "no such combination" in capsys.readouterr().err


def test_a_finished_run_is_redone_when_its_pipeline_file_changes_what_it_trains(entries, tmp_path, monkeypatch):
    ds = _load_script()
    folder = tmp_path / "pipelines"
    folder.mkdir()
    text = (REPO / "pipelines" / "toy-geneval.yaml").read_text()
    (folder / "toy-geneval.yaml").write_text(text)
    monkeypatch.setattr(study, "PIPELINES", folder)
    run = plan_study([entries[study.PAPER]], (0,), 3600, EvalSettings(), 79, 3).runs[0]
    before = ds.identity(run, EvalSettings())
    (folder / "toy-geneval.yaml").write_text("# a new comment\n" + text)
    assert ds.identity(run, EvalSettings()) == before  # comments do not count
    (folder / "toy-geneval.yaml").write_text(text.replace("rank: 32", "rank: 16"))
    after = ds.identity(run, EvalSettings())
    assert after["config_sha256"] != before["config_sha256"]
    assert {k: v for k, v in after.items() if k != "config_sha256"} == {k: v for k, v in before.items() if k != "config_sha256"}


@pytest.mark.slow
def test_tiny_study_end_to_end_resumes_and_rebuilds_the_report(tmp_path, capsys):
    ds = _load_script()
    out, report = tmp_path / "runs", tmp_path / "docs" / "results.md"
    args = ["--tiny", "--out", str(out), "--report", str(report)]
    assert ds.main(args) == 0
    log = capsys.readouterr().err
    assert "probe 1/2" in log and "probe 2/2" in log and "seconds measured on this machine" in log
    cal = ds.load_calibration(out)
    assert set(cal.probes) == set(study.TINY) and ds.MODES["tiny"].eval.tag() in cal.eval_s
    assert all(p.batch == 8 and p.epoch_s > 0 for p in cal.probes.values())
    assert not (out / ".probes" / study.PAPER).exists()  # probe folders are cleaned up
    first = report.read_text()
    pngs = [report.parent / "results-reward-vs-time.png", report.parent / "results-reward-vs-epochs.png"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in pngs)
    assert "| **PEPG** | ELBO | ODE (dpm2) |" in first and "| **GRPO (FlowGRPO recipe)** | Traj | SDE+CFG |" in first
    assert "| 2 |" in first and "| 1/1 |" in first
    for combo in study.TINY:
        run = out / combo / "seed-0"
        done = json.loads((run / study.DONE_FILE).read_text())
        assert done["epochs"] == 2 and done["eval_epochs"] == [0, 1]
        for epoch in (0, 1):
            assert study.eval_score(study.eval_folder(run, epoch, ds.MODES["tiny"].eval.tag())) is not None
    capsys.readouterr()

    # interrupt one run after epoch 0: its last checkpoint, evaluations and study.json are gone
    run = out / study.PAPER / "seed-0"
    trained = (out / study.FLOWGRPO / "seed-0" / "metrics.jsonl").stat().st_mtime_ns
    import shutil

    shutil.rmtree(run / "checkpoints" / "epoch-1")
    (run / "checkpoints" / "latest").write_text("epoch-0\n")
    shutil.rmtree(run / study.EVALS)
    (run / study.DONE_FILE).unlink()
    assert ds.main(args) == 0
    log = capsys.readouterr().err
    assert "probe " not in log  # the saved calibration is reused, so the plan (and its runs) are the same
    assert "flowgrpo-recipe/seed-0: finished earlier, skipped" in log
    assert "resumed from epoch 0" in log
    assert (out / study.FLOWGRPO / "seed-0" / "metrics.jsonl").stat().st_mtime_ns == trained
    assert (run / study.DONE_FILE).is_file()
    second = report.read_text()

    # --report-only rebuilds the same report from the folders alone
    report.unlink()
    for p in pngs:
        p.unlink()
    assert ds.main([*args, "--report-only"]) == 0
    assert all(p.is_file() for p in pngs)
    undated = lambda text: [line for line in text.splitlines() if not line.startswith("Generated by")]  # noqa: E731
    assert undated(report.read_text()) == undated(second)
    assert "--report-only" in report.read_text()
