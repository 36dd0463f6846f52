"""RewardMix: weights, scale/clip, both aggregation modes and per-part logging, on hand-made rewards.

The rewards below are plain classes of this module: nothing is registered globally. They are built
either through `build=` or by dotted path ("<this module>:Fixed"), as a user's own reward would be.
"""

from __future__ import annotations

import pytest
import torch

from flowrl.advantages import StandardAdvantage
from flowrl.errors import FlowrlError
from flowrl.rewards.base import RewardConfig
from flowrl.rewards.mix import MixOutput, RewardMix, check_part, mix_advantages, mix_metrics, weighted_total
from flowrl.types import RewardOutput

GROUPS = torch.tensor([0, 0, 1, 1])
IMAGES = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
PROMPTS = ["p0", "p0", "p1", "p1"]


class Fixed:
    """Returns the configured raw scores, a detail `half` = scores / 2, and `failures`."""

    class Config(RewardConfig):
        kind: str = f"{__name__}:Fixed"
        values: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)
        failures: int = 0

    def __init__(self, config: Config):
        self.config = config
        self.seen: list[object] = []

    def __call__(self, images, prompts, metadata=()) -> RewardOutput:
        self.seen.append(images)
        scores = torch.tensor(self.config.values, dtype=torch.float32)
        return RewardOutput(scores=scores, details={"half": scores / 2}, failures=self.config.failures)


class Broken:
    """Returns whatever `make` gives: for checking that the mix refuses malformed outputs."""

    def __init__(self, config, make):
        self.config, self.make = config, make

    def __call__(self, images, prompts, metadata=()):
        return self.make(images.shape[0])


def cfg(**kw) -> Fixed.Config:
    return Fixed.Config(**kw)


# a: raw [1, 2, 3, 4], weight 2, scale 2, clip [0, 5]  -> transformed [2, 4, 5, 5]
# b: raw [0.5, -1, 0, 3], weight 0.5, no transform      -> transformed [0.5, -1, 0, 3]
# total = 2 * a' + 0.5 * b' = [4.25, 7.5, 10, 11.5]
A = cfg(name="a", values=(1.0, 2.0, 3.0, 4.0), weight=2.0, scale=2.0, clip=(0.0, 5.0))
B = cfg(name="b", values=(0.5, -1.0, 0.0, 3.0), weight=0.5, failures=2)


@pytest.fixture
def mix() -> RewardMix:
    return RewardMix([A, B], build=Fixed)


def test_scale_clip_and_weighted_total(mix: RewardMix):
    out = mix(IMAGES, PROMPTS)
    assert isinstance(out, MixOutput) and out.labels == ("a", "b")
    assert out.parts["a"].scores.tolist() == [1.0, 2.0, 3.0, 4.0]  # raw kept for logging
    assert out.scores["a"].tolist() == [2.0, 4.0, 5.0, 5.0]  # 2x, then clipped at 5
    assert out.scores["b"].tolist() == [0.5, -1.0, 0.0, 3.0]
    assert out.weights == {"a": 2.0, "b": 0.5}
    assert out.total.tolist() == [4.25, 7.5, 10.0, 11.5]
    assert weighted_total({"x": torch.tensor([1.0, 2.0])}, {"x": -3.0}).tolist() == [-3.0, -6.0]


def test_clip_low_bound_applies_after_scale():
    mix = RewardMix([cfg(values=(-3.0, -1.0, 0.0, 1.0), scale=-1.0, clip=(-0.5, 2.0))], build=Fixed)
    assert mix(IMAGES, PROMPTS).scores[mix.labels[0]].tolist() == [2.0, 1.0, 0.0, -0.5]


def test_sum_then_normalize(mix: RewardMix):
    # Per-group standardisation of 2-image groups gives -1 / +1 by order. Total [4.25, 7.5 | 10, 11.5].
    norm = StandardAdvantage(StandardAdvantage.Config(eps=1e-9))
    adv = mix_advantages(mix(IMAGES, PROMPTS), "sum-then-normalize", lambda r: norm(r, GROUPS))
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, -1.0, 1.0]))


def test_normalize_then_sum(mix: RewardMix):
    # a' [2, 4 | 5, 5] -> [-1, 1, 0, 0] (a tied group gives 0), times 2;
    # b' [0.5, -1 | 0, 3] -> [1, -1, -1, 1], times 0.5;  sum [-1.5, 1.5, -0.5, 0.5].
    norm = StandardAdvantage(StandardAdvantage.Config(eps=1e-9))
    out = mix(IMAGES, PROMPTS)
    adv = mix.advantages(out, "normalize-then-sum", lambda r: norm(r, GROUPS))
    torch.testing.assert_close(adv, torch.tensor([-1.5, 1.5, -0.5, 0.5]))


def test_metrics_log_every_part(mix: RewardMix):
    logged = mix_metrics(mix(IMAGES, PROMPTS))
    assert logged == pytest.approx(
        {
            "reward/a": 2.5,  # raw mean, not the transformed one (4.0)
            "reward/b": 0.625,
            "reward/a/half": 1.25,
            "reward/b/half": 0.3125,
            "reward/b/failures": 2,  # counted, never hidden; a had none and logs no key
            "reward/mean": 33.25 / 4,  # mean of the weighted total of transformed scores
        }
    )


def test_images_are_converted_once_and_shared():
    mix = RewardMix([A, B], build=Fixed)
    uint8 = (IMAGES * 255).round().to(torch.uint8).permute(0, 2, 3, 1)  # [B, H, W, 3]
    mix(uint8, PROMPTS)
    a, b = (r.seen[0] for r in mix)
    assert a is b and a.shape == (4, 3, 8, 8) and a.dtype == torch.float32


def test_duplicate_labels_are_refused():
    with pytest.raises(FlowrlError, match="labelled 'x'.*distinct `name`"):
        RewardMix([cfg(name="x"), cfg(name="y"), cfg(name="x")], build=Fixed)
    with pytest.raises(FlowrlError, match="at least one reward"):
        RewardMix([], build=Fixed)
    same_kind = RewardMix([cfg(), cfg(name="other")], build=Fixed)  # the kind is one label, `name` the other
    assert same_kind.labels == (f"{__name__}:Fixed", "other")


def test_default_build_resolves_the_kind_through_the_registry():
    mix = RewardMix([cfg(values=(1.0, 2.0, 3.0, 4.0))])
    assert len(mix) == 1 and isinstance(next(iter(mix)), Fixed)
    assert mix(IMAGES, PROMPTS).total.tolist() == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(FlowrlError, match="cannot import user reward"):
        RewardMix([cfg(kind="no_such_module:Reward")])


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda b: RewardOutput(scores=torch.zeros(b + 1)), r"shape \(5,\) for 4 images"),
        (lambda b: RewardOutput(scores=torch.zeros(b, 1)), r"shape \(4, 1\)"),
        (lambda b: RewardOutput(scores=torch.zeros(b), details={"d": torch.zeros(2)}), "detail 'd'"),
        (lambda b: RewardOutput(scores=torch.tensor([0.0, float("nan"), 1.0, 0.0])), "1 non-finite"),
        (lambda b: torch.zeros(b), "must return a RewardOutput"),
    ],
)
def test_malformed_outputs_name_the_reward(make, match):
    mix = RewardMix([cfg(name="bad")], build=lambda c: Broken(c, make))
    with pytest.raises(FlowrlError, match=f"reward 'bad'.*{match}|{match}"):
        mix(IMAGES, PROMPTS)


def test_check_part_accepts_a_good_output():
    check_part("ok", RewardOutput(scores=torch.zeros(3), details={"d": torch.ones(3)}), 3)


def test_prompt_count_must_match_images(mix: RewardMix):
    with pytest.raises(ValueError, match="4 images but 3 prompts"):
        mix(IMAGES, PROMPTS[:3])
