"""Advantages: hand-computed exact and standard advantages, grouping, clipping, aggregation."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from flowrl import registry
from flowrl.advantages import (
    ExactAdvantage,
    StandardAdvantage,
    aggregate,
    exact_advantages,
    group_mean,
    group_std,
    standard_advantages,
)
from flowrl.errors import FlowrlError


def test_exact_hand_values():
    r, g = torch.tensor([1.0, 0.0, 3.0, 1.0]), torch.tensor([0, 0, 1, 1])
    torch.testing.assert_close(exact_advantages(r, g), 0.1 * torch.tensor([0.5, -0.5, 1.0, -1.0]))
    torch.testing.assert_close(ExactAdvantage()(r, g), 0.1 * torch.tensor([0.5, -0.5, 1.0, -1.0]))
    stage = ExactAdvantage(ExactAdvantage.Config(kind="exact", beta=1.0, alpha=0.5))
    torch.testing.assert_close(stage(r, g), 2.0 * torch.tensor([0.5, -0.5, 1.0, -1.0]))


def test_groups_of_any_size_and_any_ids():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 4.0, 7.0])
    g = torch.tensor([7, 7, 7, -2, 42, 42])  # sizes 3, 1, 2; ids need not be 0..n-1 nor sorted
    torch.testing.assert_close(group_mean(r, g), torch.tensor([2.0, 2.0, 2.0, 10.0, 5.5, 5.5]))
    torch.testing.assert_close(group_std(r, g), torch.tensor([(2 / 3) ** 0.5] * 3 + [0.0, 1.5, 1.5]))
    a = exact_advantages(r, g)
    assert a[3].item() == 0.0  # a lone image has nothing to compare with
    g2 = torch.tensor([0, 1, 0, 2, 1, 0])  # interleaved groups
    torch.testing.assert_close(group_mean(r, g2), torch.tensor([11 / 3, 3.0, 11 / 3, 10.0, 3.0, 11 / 3]))


def test_standard_group_std():
    r, g = torch.tensor([1.0, 3.0, 0.0, 10.0]), torch.tensor([0, 0, 1, 1])
    # group 0: mean 2, std 1; group 1: mean 5, std 5
    out = standard_advantages(r, g, "group", clip=5.0, eps=1e-4)
    torch.testing.assert_close(out, torch.tensor([-1 / (1 + 1e-4), 1 / (1 + 1e-4), -5 / (5 + 1e-4), 5 / (5 + 1e-4)]))


def test_standard_global_std():
    r, g = torch.tensor([1.0, 3.0, 0.0, 10.0]), torch.tensor([0, 0, 1, 1])
    s = r.std(unbiased=False).item()  # population std of all rewards of the batch
    out = StandardAdvantage(StandardAdvantage.Config(kind="standard", std="global"))(r, g)
    torch.testing.assert_close(out, torch.tensor([-1.0, 1.0, -5.0, 5.0]) / (s + 1e-4))


def test_standard_clip_and_tied_group():
    r = torch.tensor([0.0] * 9 + [1.0] + [2.0, 2.0])
    g = torch.tensor([0] * 10 + [1, 1])
    out = standard_advantages(r, g, "group", clip=5.0)
    # the outlier is (1 - 0.1) / 0.3 = 3 sigma; with clip 2 it is cut to 2
    assert out[9].item() == pytest.approx(0.9 / (0.3 + 1e-4))
    assert standard_advantages(r, g, "group", clip=2.0)[9].item() == 2.0
    assert out[10].item() == 0.0 and out[11].item() == 0.0  # tied group: 0, not NaN
    big = standard_advantages(torch.tensor([0.0] * 99 + [1.0]), torch.zeros(100, dtype=torch.long), "group", clip=5.0)
    assert big.max().item() == 5.0  # sqrt(99) ~ 9.9 sigma, clipped to 5


def test_aggregation_modes_on_hand_values():
    g = torch.tensor([0, 0])
    scores = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 10.0])}
    weights = {"a": 2.0, "b": 0.5}
    norm = lambda r: exact_advantages(r, g, 1.0, 1.0)  # noqa: E731  (r - mean)
    # sum first: [2, 5] -> [-1.5, 1.5]
    torch.testing.assert_close(aggregate(scores, weights, "sum-then-normalize", norm), torch.tensor([-1.5, 1.5]))
    # normalise first: a -> [0.5, -0.5], b -> [-5, 5]; 2 a + 0.5 b = [-1.5, 1.5] (linear: same here)
    torch.testing.assert_close(aggregate(scores, weights, "normalize-then-sum", norm), torch.tensor([-1.5, 1.5]))
    # with a std normaliser the modes differ: each reward is put on the same scale first
    std_norm = lambda r: standard_advantages(r, g, "group", eps=0.0)  # noqa: E731
    torch.testing.assert_close(aggregate(scores, weights, "normalize-then-sum", std_norm), torch.tensor([1.5, -1.5]))
    torch.testing.assert_close(aggregate(scores, weights, "sum-then-normalize", std_norm), torch.tensor([-1.0, 1.0]))


def test_aggregation_refuses_mismatched_weights():
    with pytest.raises(FlowrlError, match="weight"):
        aggregate({"a": torch.zeros(2)}, {"b": 1.0}, "sum-then-normalize", lambda r: r)
    with pytest.raises(FlowrlError):
        aggregate({}, {}, "sum-then-normalize", lambda r: r)


def test_shapes_checked():
    with pytest.raises(ValueError, match=r"\[B\]"):
        group_mean(torch.zeros(4), torch.zeros(3, dtype=torch.long))


def test_configs_and_registry():
    assert registry.names("advantage") == ["exact", "standard"]
    c = ExactAdvantage.Config.model_validate({"kind": "exact"})
    assert c.beta / c.alpha == pytest.approx(0.1)
    s = StandardAdvantage.Config.model_validate({"kind": "standard"})
    assert (s.std, s.clip, s.eps) == ("group", 5.0, 1e-4)
    for cls, bad in [
        (ExactAdvantage, {"beta": -1e-4}),
        (ExactAdvantage, {"alpha": 0.0}),
        (StandardAdvantage, {"std": "batch"}),
        (StandardAdvantage, {"clip": 0.0}),
        (StandardAdvantage, {"scale": 1.0}),
    ]:
        with pytest.raises(ValidationError):
            cls.Config.model_validate({"kind": cls.stage_name, **bad})
