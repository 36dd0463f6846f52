"""Epoch prompt picking: uniform (the old behaviour, draw for draw) and balanced by task tag."""

from collections import Counter

import numpy as np
import pytest

from flowrl.prompts import load_prompt_set, pick_prompts, prompt_tags

TAGS = ("a",) * 20 + ("b",) * 5 + ("c",) * 2  # skewed like the toy train set


def test_uniform_is_numpys_choice_draw_for_draw():
    got = pick_prompts(8, 27, np.random.default_rng(3))
    want = np.random.default_rng(3).choice(27, size=8, replace=False)
    assert got.tolist() == want.tolist()
    assert len(pick_prompts(40, 27, np.random.default_rng(0))) == 40  # more than the set: with replacement


@pytest.mark.parametrize("n", [3, 7, 12, 32])
def test_by_tag_shares_slots_evenly_whatever_the_tag_sizes(n):
    idx = pick_prompts(n, len(TAGS), np.random.default_rng(n), TAGS, "by-tag")
    counts = Counter(TAGS[i] for i in idx)
    assert len(idx) == n
    assert max(counts.values()) - min(counts.get(t, 0) for t in "abc") <= 1


def test_by_tag_repeats_a_prompt_only_after_its_tag_is_used_up():
    idx = pick_prompts(12, len(TAGS), np.random.default_rng(1), TAGS, "by-tag")  # 4 slots per tag
    per_tag = {t: [i for i in idx if TAGS[i] == t] for t in "abc"}
    assert len(set(per_tag["a"])) == 4 and len(set(per_tag["b"])) == 4  # 20 and 5 prompts: no repeat
    assert sorted(Counter(per_tag["c"]).values()) == [2, 2]  # 2 prompts, 4 slots: each twice


def test_by_tag_is_deterministic_and_shuffled():
    a = pick_prompts(32, len(TAGS), np.random.default_rng(7), TAGS, "by-tag")
    b = pick_prompts(32, len(TAGS), np.random.default_rng(7), TAGS, "by-tag")
    assert a.tolist() == b.tolist()
    assert [TAGS[i] for i in a] != sorted(TAGS[i] for i in a)  # tags interleaved, not in blocks


def test_by_tag_without_tags_or_unknown_sampling_is_refused():
    with pytest.raises(ValueError, match="needs a tag"):
        pick_prompts(4, 10, np.random.default_rng(0), None, "by-tag")
    with pytest.raises(ValueError, match="uniform or by-tag"):
        pick_prompts(4, 10, np.random.default_rng(0), None, "stratified")


def test_toy_train_set_tags_are_read_from_its_metadata():
    tags = prompt_tags(load_prompt_set("toy-train"))
    assert tags is not None and Counter(tags)["color_attr"] == 96  # the skew by-tag sampling corrects


def test_tag_weights_share_the_slots_in_proportion():
    w = {"a": 1.0, "b": 2.0, "c": 1.0}  # 12 slots: 3, 6, 3 exactly
    idx = pick_prompts(12, len(TAGS), np.random.default_rng(0), TAGS, "by-tag", w)
    counts = Counter(TAGS[i] for i in idx)
    assert counts == {"a": 3, "b": 6, "c": 3}


def test_tag_weights_leftover_slots_follow_the_fractions():
    # 10 slots at 1:2 -> 3.33 and 6.67: "b" gets the leftover slot 2 times in 3, "a" 1 in 3.
    tags = ("a",) * 6 + ("b",) * 6
    got = Counter()
    for seed in range(600):
        got[Counter(tags[i] for i in pick_prompts(10, 12, np.random.default_rng(seed), tags, "by-tag", {"b": 2}))["b"]] += 1
    assert set(got) == {6, 7}
    assert 0.6 < got[7] / 600 < 0.73


def test_tag_weight_zero_leaves_a_tag_out_and_unnamed_tags_weigh_one():
    idx = pick_prompts(10, len(TAGS), np.random.default_rng(2), TAGS, "by-tag", {"a": 0.0})
    counts = Counter(TAGS[i] for i in idx)
    assert counts == {"b": 5, "c": 5}


def test_equal_tag_weights_are_plain_by_tag_draw_for_draw():
    a = pick_prompts(32, len(TAGS), np.random.default_rng(7), TAGS, "by-tag")
    b = pick_prompts(32, len(TAGS), np.random.default_rng(7), TAGS, "by-tag", {"a": 2.0, "b": 2.0, "c": 2.0})
    assert a.tolist() == b.tolist()


def test_bad_tag_weights_are_refused():
    with pytest.raises(ValueError, match=r"\['d'\].*its tags are \['a', 'b', 'c'\]"):
        pick_prompts(4, len(TAGS), np.random.default_rng(0), TAGS, "by-tag", {"d": 1.0})
    with pytest.raises(ValueError, match="weight of 0"):
        pick_prompts(4, len(TAGS), np.random.default_rng(0), TAGS, "by-tag", {"a": 0, "b": 0, "c": 0})
    with pytest.raises(ValueError, match="need by-tag"):
        pick_prompts(4, len(TAGS), np.random.default_rng(0), TAGS, "uniform", {"a": 2})


def test_negative_tag_weights_are_refused_not_clamped():
    with pytest.raises(ValueError, match=r"must be >= 0.*'b': -1"):
        pick_prompts(4, len(TAGS), np.random.default_rng(0), TAGS, "by-tag", {"b": -1.0})
