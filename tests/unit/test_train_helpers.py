"""Pure helpers of the trainer: learning-rate schedule, group-preserving order, rollout autocast,
how a resume treats model.finetune."""

from __future__ import annotations

import math

import pytest
import torch

from flowrl.config import diff_configs
from flowrl.train import group_order, learning_rate, old_policy_decay, resume_category, rollout_autocast, with_implicit_settings


def test_constant_schedule_with_warmup():
    lrs = [learning_rate(e, 10, 1e-3, "constant", 2, 0.0) for e in range(10)]
    assert lrs[:3] == [pytest.approx(5e-4), pytest.approx(1e-3), pytest.approx(1e-3)]
    assert all(x == pytest.approx(1e-3) for x in lrs[1:])


def test_cosine_schedule_hand_values():
    lr = lambda e: learning_rate(e, 5, 1.0, "cosine", 0, 0.1)  # noqa: E731
    assert lr(0) == pytest.approx(1.0)
    assert lr(2) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # 0.55
    assert lr(4) == pytest.approx(0.1)
    assert lr(1) > lr(2) > lr(3)


def test_cosine_after_warmup_starts_at_peak():
    assert learning_rate(1, 11, 2.0, "cosine", 2, 0.0) == pytest.approx(2.0)  # last warm-up epoch
    assert learning_rate(2, 11, 2.0, "cosine", 2, 0.0) == pytest.approx(2.0)  # first decay epoch
    assert learning_rate(10, 11, 2.0, "cosine", 2, 0.0) == pytest.approx(0.0, abs=1e-12)


def test_old_policy_decay_is_the_papers_return_decay_of_the_global_step():
    # decay_type 1 (the paper's and DiffusionNFT's GenEval): min(0.001 * step, 0.5), called after the
    # epoch's optimizer steps with the count that includes them, so the first epoch already gives 0.001
    assert [old_policy_decay(s, 0.001, 0.5) for s in (0, 1, 2, 3)] == [0.0, 0.001, 0.002, 0.003]
    assert old_policy_decay(10_000, 0.001, 0.5) == 0.5
    # decay_type 2 (DiffusionNFT's OCR): flat for 75 steps, then 0.0075 per step up to 0.999
    assert old_policy_decay(74, 0.0075, 0.999, 75) == 0.0
    assert old_policy_decay(75, 0.0075, 0.999, 75) == 0.0
    assert old_policy_decay(76, 0.0075, 0.999, 75) == pytest.approx(0.0075)
    assert old_policy_decay(1000, 0.0075, 0.999, 75) == 0.999


def test_group_order_keeps_groups_contiguous_and_is_a_permutation():
    ids = torch.arange(8).repeat_interleave(4)
    order = group_order(ids, torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(32))
    blocks = ids[order].view(8, 4)
    assert bool((blocks == blocks[:, :1]).all()), "a group was split"
    assert blocks[:, 0].tolist() != list(range(8)), "groups were not shuffled"
    again = group_order(ids, torch.Generator().manual_seed(0))
    assert torch.equal(order, again)


def test_rollout_autocast_runs_matmuls_in_bf16_only_when_asked():
    a = torch.randn(4, 4)
    with rollout_autocast(torch.device("cpu"), "float32"):
        assert (a @ a).dtype == torch.float32
    with rollout_autocast(torch.device("cpu"), "bfloat16"):
        assert (a @ a).dtype == torch.bfloat16


def test_tag_metrics_log_each_tag_of_rewards_that_summarise_by_tag():
    from types import SimpleNamespace

    from flowrl.paths import builtin_prompts
    from flowrl.rewards.geneval import load_metadata
    from flowrl.rewards.geneval.reward import GenEvalReward
    from flowrl.train import tag_metrics
    from flowrl.types import RewardOutput

    records = load_metadata(builtin_prompts("toy-test"))
    by_tag = {}
    for r in records:
        by_tag.setdefault(r.tag, r)
    meta = [by_tag["counting"], by_tag["counting"], by_tag["colors"]]
    strict = torch.tensor([1.0, 0.0, 1.0])
    out = RewardOutput(strict, {"strict": strict, "dense": strict})
    plain = SimpleNamespace()  # a reward without eval_summary: nothing per tag
    mix = SimpleNamespace(configs=["geneval", "other"], rewards=[SimpleNamespace(eval_summary=GenEvalReward.eval_summary), plain])
    got = tag_metrics(mix, {"geneval": out, "other": out}, {"geneval": 0, "other": 0}, meta)
    assert got == {"reward/geneval/tag/counting": 0.5, "reward/geneval/tag/colors": 1.0}
    assert tag_metrics(mix, {"geneval": out, "other": out}, {"geneval": 1}, meta) == {}  # a failed image: no verdict
    assert tag_metrics(mix, {"geneval": out, "other": out}, {}, meta[:2]) == {}  # another rank's images
    assert tag_metrics(mix, {"geneval": out, "other": out}, {}, ()) == {}


def test_finetune_is_fixed_for_a_run_and_lora_settings_do_not_matter_to_a_full_one():
    assert resume_category("model.finetune") == resume_category("model.finetune", "full") == "fixed"
    assert resume_category("model.lora.rank") == "fixed"
    assert resume_category("model.lora.rank", "full") == "free", "a full fine-tune ignores model.lora"
    assert resume_category("model.dtype", "full") == "guarded"


def test_a_run_from_before_model_finetune_resumes_as_lora_without_a_change():
    old = {"model": {"path": "assets/toy-sd3", "dtype": "float32"}, "train": {"epochs": 3}}
    new = {"model": {"path": "assets/toy-sd3", "dtype": "float32", "finetune": "lora"}, "train": {"epochs": 3}}
    assert with_implicit_settings(old)["model"]["finetune"] == "lora" and "finetune" not in old["model"]
    assert diff_configs(with_implicit_settings(old), new) == []
    full = {**new, "model": {**new["model"], "finetune": "full"}}
    (change,) = diff_configs(with_implicit_settings(old), full)
    assert change.key == "model.finetune" and (change.old, change.new) == ("lora", "full")
    assert with_implicit_settings({"model": "odd"}) == {"model": "odd"}, "a malformed file is left to the diff"


def test_a_run_from_before_tag_weights_resumes_without_a_change():
    old = {"prompts": {"train": "toy-train", "sampling": "uniform"}}
    new = {"prompts": {"train": "toy-train", "sampling": "uniform", "tag_weights": None}}
    assert diff_configs(with_implicit_settings(old), new) == []
    weighted = {"prompts": {**new["prompts"], "sampling": "by-tag", "tag_weights": {"position": 2.0}}}
    changes = {c.key for c in diff_configs(with_implicit_settings(old), weighted)}
    assert "prompts.tag_weights" in changes and resume_category("prompts.tag_weights") == "guarded"
