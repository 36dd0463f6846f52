"""GenEval scoring: hand-computed cases for every rule of REWARDS.md (section "GenEval")."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from flowrl.rewards.geneval import (
    COUNTING_THRESHOLD,
    MAX_OBJECTS,
    POSITION_THRESHOLD,
    THRESHOLD,
    Clause,
    Detection,
    GenEvalSummary,
    Judgement,
    PromptRecord,
    judge,
    keep_detections,
    relative_position,
    summarize,
)


def det(box=(0, 0, 10, 10), score=0.95, color=None) -> Detection:
    return Detection(box=box, score=score, color=color)


def single(cls="dog") -> PromptRecord:
    return PromptRecord("single_object", f"a photo of a {cls}", (Clause(cls, 1),))


def counting(cls: str, n: int) -> PromptRecord:
    return PromptRecord("counting", f"a photo of {n} {cls}s", (Clause(cls, n),), (Clause(cls, n + 1),))


def colored(cls: str, color: str, count: int = 1) -> PromptRecord:
    return PromptRecord("colors", f"a photo of {count} {color} {cls}", (Clause(cls, count, color=color),))


def position(cls: str, relation: str, ref: str) -> PromptRecord:
    """Official layout: clause 0 is the reference, clause 1 is `relation` of it."""
    return PromptRecord(
        "position",
        f"a photo of a {cls} {relation} a {ref}",
        (Clause(ref, 1), Clause(cls, 1, position=(relation, 0))),
    )


# Boxes for position tests: a reference at the image centre and objects clearly around it.
REF = (40, 40, 60, 60)
LEFT = (0, 40, 20, 60)
RIGHT = (80, 40, 100, 60)


def test_constants_match_reference() -> None:
    assert (THRESHOLD, COUNTING_THRESHOLD, MAX_OBJECTS, POSITION_THRESHOLD) == (0.3, 0.9, 16, 0.1)


# ---------------------------------------------------------------- keeping detections


def test_threshold_is_strict() -> None:
    kept = keep_detections([det(score=0.3), det(score=0.31), det(score=0.2)], THRESHOLD)
    assert [d.score for d in kept] == [0.31]


def test_judge_drops_score_exactly_at_threshold() -> None:
    assert not judge(single(), {"dog": [det(score=0.3)]}).correct
    assert judge(single(), {"dog": [det(score=0.31)]}).correct


def test_counting_uses_the_counting_threshold() -> None:
    # 0.9 is not > 0.9, so only one clock counts.
    j = judge(counting("clock", 2), {"clock": [det(score=0.95), det(score=0.9)]})
    assert not j.correct
    assert j.score == pytest.approx(0.5)  # 1 - |2 - 1| / 2
    assert judge(counting("clock", 2), {"clock": [det(score=0.95), det(score=0.91)]}).correct
    # The same 0.5-score objects count for a non-counting prompt.
    two = PromptRecord("two_object", "a clock and a cat", (Clause("clock", 1), Clause("cat", 1)))
    assert judge(two, {"clock": [det(score=0.5)], "cat": [det(score=0.5)]}).correct


def test_keep_sorts_by_score_descending() -> None:
    kept = keep_detections([det(score=0.4), det(score=0.9), det(score=0.6)], THRESHOLD)
    assert [d.score for d in kept] == [0.9, 0.6, 0.4]


def test_keep_ties_follow_the_official_argsort_order() -> None:
    # The official code orders by np.argsort(scores)[::-1]: of two equal scores the later-listed
    # detection comes first (a stable sort would keep the listed order).
    a, b = det(box=(0, 0, 1, 1), score=0.5), det(box=(5, 5, 6, 6), score=0.5)
    assert keep_detections([a, b], THRESHOLD) == [b, a]
    assert keep_detections([b, a], THRESHOLD) == [a, b]
    four = [det(box=(i, 0, i + 1, 1), score=s) for i, s in enumerate([0.5, 0.9, 0.5, 0.9])]
    assert keep_detections(four, THRESHOLD) == [four[3], four[1], four[2], four[0]]


def test_tie_order_changes_the_strict_verdict_as_in_the_official_code() -> None:
    # "a photo of a red car": two equally confident cars, the red one listed first. The official
    # order puts the blue one first, so the one car checked is blue: wrong (a stable sort said right).
    red, blue = det(box=(0, 0, 10, 10), score=0.8, color="red"), det(box=(50, 0, 60, 10), score=0.8, color="blue")
    j = judge(colored("car", "red"), {"car": [red, blue]})
    assert not j.correct and any("blue" in r for r in j.reasons)
    assert judge(colored("car", "red"), {"car": [blue, red]}).correct


def test_keep_order_is_numpys_argsort_reversed_on_tie_heavy_scores() -> None:
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 8, 16, 17, 40):
        scores = rng.choice([0.35, 0.5, 0.7, 0.95], size=n).tolist()
        dets = [det(box=(i, 0, i + 1, 1), score=s) for i, s in enumerate(scores)]
        want = np.argsort(np.asarray(scores, dtype=np.float32))[::-1][:MAX_OBJECTS]
        assert keep_detections(dets, THRESHOLD) == [dets[i] for i in want]


def test_max_objects_truncates_to_16() -> None:
    dogs = [det(box=(i, 0, i + 1, 1)) for i in range(17)]
    assert len(keep_detections(dogs, THRESHOLD)) == 16
    # Counting sixteen with "not seventeen" excluded: 17 confident dogs count as 16, so it passes.
    record = PromptRecord("counting", "sixteen dogs", (Clause("dog", 16),), (Clause("dog", 17),))
    j = judge(record, {"dog": dogs})
    assert j.correct
    assert j.rewards == (1.0,)


def test_truncation_happens_after_sorting() -> None:
    # Ascending input: truncating before sorting would keep the 16 *lowest* scores.
    scores = [round(0.40 + 0.01 * i, 2) for i in range(20)]
    kept = keep_detections([det(score=s) for s in scores], THRESHOLD)
    assert [d.score for d in kept] == sorted(scores, reverse=True)[:16]
    assert min(d.score for d in kept) == 0.44


def test_keep_rejects_non_detections() -> None:
    with pytest.raises(TypeError, match="Detection"):
        keep_detections([((0, 0, 1, 1), 0.9)], THRESHOLD)  # type: ignore[list-item]


# ---------------------------------------------------------------- exclude clauses


def test_counting_two_with_three_confident_is_wrong() -> None:
    j = judge(counting("dog", 2), {"dog": [det(score=0.95)] * 3})
    assert not j.correct
    assert any("dog<3" in r for r in j.reasons)
    # Dense: found = 3 -> 1 - |2 - 3| / 2; exclude ignored.
    assert j.rewards == (0.5,)


def test_counting_extra_object_below_counting_threshold_is_fine() -> None:
    j = judge(counting("dog", 2), {"dog": [det(score=0.95), det(score=0.95), det(score=0.5)]})
    assert j.correct  # 0.5 < 0.9: the third dog is not kept
    assert j.score == 1.0


def test_exclude_on_non_counting_record_is_applied_strictly_only() -> None:
    record = PromptRecord("single_object", "a dog, no cat", (Clause("dog", 1),), (Clause("cat", 1),))
    j = judge(record, {"dog": [det()], "cat": [det(score=0.5)]})
    assert not j.correct
    assert j.score == 1.0  # the dense reward ignores exclude clauses
    assert judge(record, {"dog": [det()], "cat": [det(score=0.3)]}).correct


# ---------------------------------------------------------------- colour


def test_colour_checks_only_the_count_most_confident() -> None:
    dogs = [det(score=0.9, color="red"), det(score=0.8, color="red"), det(score=0.7, color="blue")]
    j = judge(colored("dog", "red", 2), {"dog": dogs})
    assert j.correct
    # Dense: 3 found != 2 -> [1 - 1/2, 0]: strict and dense disagree.
    assert j.rewards == (0.5, 0.0)
    assert j.score == pytest.approx(0.25)


def test_colour_second_most_confident_wrong_fails() -> None:
    dogs = [det(score=0.9, color="red"), det(score=0.8, color="blue"), det(score=0.7, color="red")]
    j = judge(colored("dog", "red", 2), {"dog": dogs})
    assert not j.correct
    assert j.reasons == ("expected red dog>=2, found 1 red; and blue",)


def test_colour_order_follows_score_not_input_order() -> None:
    record = colored("car", "pink")
    assert judge(record, {"car": [det(score=0.6, color="blue"), det(score=0.9, color="pink")]}).correct
    assert not judge(record, {"car": [det(score=0.9, color="blue"), det(score=0.6, color="pink")]}).correct


def test_dense_colour_partial_credit() -> None:
    # Exactly 2 found, 1 of them red: [1, 1 - |2 - 1| / 2].
    j = judge(colored("dog", "red", 2), {"dog": [det(color="red"), det(color="blue")]})
    assert not j.correct
    assert j.rewards == (1.0, 0.5)
    assert j.score == pytest.approx(0.75)


def test_missing_colour_reading_raises() -> None:
    with pytest.raises(ValueError, match="must supply colour readings"):
        judge(colored("dog", "red"), {"dog": [det(color=None)]})


def test_missing_colour_outside_inspected_objects_is_fine() -> None:
    # Not kept (score 0.2) or not a colour prompt: nobody reads the colour, so None is allowed.
    assert judge(colored("dog", "red"), {"dog": [det(color="red"), det(score=0.2)]}).correct
    assert judge(single(), {"dog": [det(color=None)]}).correct


# ---------------------------------------------------------------- relative position


def test_position_basic_directions_with_y_down() -> None:
    assert relative_position(RIGHT, REF) == {"right of"}
    assert relative_position(LEFT, REF) == {"left of"}
    above, below = (40, 0, 60, 20), (40, 80, 60, 100)  # smaller y is higher up
    assert relative_position(above, REF) == {"above"}
    assert relative_position(below, REF) == {"below"}


def test_position_margin_removes_a_raw_relation() -> None:
    # Offset (3, 4); margins 0.1*(10+10)=2 in x, 0.1*(2+2)=0.4 in y -> revised (1, 3.6); /5 -> (0.2, 0.72).
    a, b = (3, 4, 13, 6), (0, 0, 10, 2)
    raw_dx = 3 / 5
    assert raw_dx > 0.5  # without the margin this would also be "right of"
    assert relative_position(a, b) == {"below"}


def test_position_offset_within_margin_gives_no_relation() -> None:
    # Centres 1.5 px apart in x, margin 2: the raw offset points right, the revised one is zero.
    assert relative_position((1.5, 0, 11.5, 10), (0, 0, 10, 10)) == frozenset()


def test_position_identical_centres_give_no_relation() -> None:
    assert relative_position((0, 0, 10, 10), (0, 0, 10, 10)) == frozenset()
    assert relative_position((2, 2, 8, 8), (0, 0, 10, 10)) == frozenset()


def test_position_diagonal_gives_two_relations() -> None:
    # Offset (20, 20), revised (18, 18), / 28.28 -> (0.636, 0.636).
    assert relative_position((20, 20, 30, 30), (0, 0, 10, 10)) == {"right of", "below"}
    assert relative_position((0, 0, 10, 10), (20, 20, 30, 30)) == {"left of", "above"}


def test_position_divides_by_the_raw_offset_norm() -> None:
    # Offset (3, 4); margins 2 (x) and 4 (y) -> revised (1, 0). Divided by |raw| = 5: dx = 0.2, no
    # relation. Dividing by the revised norm instead would give dx = 1, "right of".
    assert relative_position((3, 4, 13, 24), (0, 0, 10, 20)) == frozenset()


def test_position_threshold_is_strict() -> None:
    # Offset (3, 4), widths 2 + 3 -> x margin 0.5, revised (2.5, 4), / 5 -> dx = 0.5 exactly.
    assert relative_position((2, 4, 4, 4), (-1.5, 0, 1.5, 0)) == {"below"}


def test_position_tiny_revised_offset_counts_as_none() -> None:
    # Offset 0.0012, margin 0.0004 -> revised 0.0008 < 1e-3: no relation, although 0.0008/0.0012 > 0.5.
    assert relative_position((0.0012, 0, 0.0032, 0), (0, 0, 0.002, 0)) == frozenset()
    # The same geometry 1000x larger clears the cutoff: revised 0.8, dx = 0.667.
    assert relative_position((1.2, 0, 3.2, 0), (0, 0, 2, 0)) == {"right of"}


# ---------------------------------------------------------------- judge: position prompts


def test_position_correct() -> None:
    j = judge(position("dog", "right of", "teddy bear"), {"teddy bear": [det(REF)], "dog": [det(RIGHT)]})
    assert j.correct and j.reasons == ()
    assert j.rewards == (1.0, 1.0, 1.0)


def test_position_reference_missing() -> None:
    j = judge(position("dog", "right of", "teddy bear"), {"dog": [det(RIGHT)]})
    assert not j.correct
    assert "no target for dog to be right of" in j.reasons
    assert j.rewards == (0.0, 1.0, 0.0)
    assert j.score == pytest.approx(1 / 3, abs=1e-3)


def test_position_reference_failed_its_colour() -> None:
    # The teddy bear exists but is blue, so clause 0 is unmatched and the dog has no target,
    # although the dog is geometrically right of it.
    record = PromptRecord(
        "position",
        "a dog right of a red teddy bear",
        (Clause("teddy bear", 1, color="red"), Clause("dog", 1, position=("right of", 0))),
    )
    j = judge(record, {"teddy bear": [det(REF, color="blue")], "dog": [det(RIGHT)]})
    assert not j.correct
    assert "no target for dog to be right of" in j.reasons
    assert j.rewards == (1.0, 0.0, 1.0, 0.0)


def test_clause_failing_colour_skips_its_position_check() -> None:
    record = PromptRecord(
        "position",
        "a red dog right of a cat",
        (Clause("cat", 1), Clause("dog", 1, color="red", position=("right of", 0))),
    )
    # The dog is blue *and* on the wrong side: only the colour is reported and scored.
    j = judge(record, {"cat": [det(REF)], "dog": [det(LEFT, color="blue")]})
    assert not j.correct
    assert len(j.reasons) == 1 and j.reasons[0].startswith("expected red dog>=1")
    assert j.rewards == (1.0, 1.0, 0.0)


def test_position_uses_only_the_count_most_confident_strictly() -> None:
    # Two dogs for a one-dog prompt: strict looks at the top dog (right of), dense wants exactly one.
    dogs = [det(RIGHT, score=0.9), det(LEFT, score=0.5)]
    j = judge(position("dog", "right of", "cat"), {"cat": [det(REF)], "dog": dogs})
    assert j.correct
    assert j.rewards == (1.0, 0.0, 0.0)  # [cat 1, dog 1 - |1 - 2|, 0 for the failed clause]
    flipped = [det(RIGHT, score=0.5), det(LEFT, score=0.9)]
    assert not judge(position("dog", "right of", "cat"), {"cat": [det(REF)], "dog": flipped}).correct


# ---------------------------------------------------------------- dense reward, REWARDS.md examples


def test_dense_single_object_two_found() -> None:
    j = judge(single(), {"dog": [det(), det()]})
    assert j.score == 0.0
    assert j.correct  # strict: "at least one"


def test_dense_single_object_three_found_goes_negative() -> None:
    j = judge(single(), {"dog": [det()] * 3})
    assert j.score == -1.0
    assert j.correct


def test_dense_counting_three_with_two_found() -> None:
    j = judge(counting("clock", 3), {"clock": [det(), det()]})
    assert j.score == pytest.approx(0.667, abs=1e-3)
    assert not j.correct


def test_dense_wrong_colour() -> None:
    j = judge(colored("car", "pink"), {"car": [det(color="green")]})
    assert j.score == 0.5
    assert not j.correct


def test_dense_relation_wrong_keeps_the_quirk() -> None:
    j = judge(position("dog", "right of", "teddy bear"), {"teddy bear": [det(REF)], "dog": [det(LEFT)]})
    assert not j.correct
    assert j.reasons == ("expected dog right of target, found left of",)
    # [teddy 1, dog 1, failed pair 0, quirk 1]: 0.75, not the 2/3 a "clean" rule would give.
    assert j.rewards == (1.0, 1.0, 0.0, 1.0)
    assert j.score == 0.75


def test_dense_quirk_stops_after_the_first_failed_pair() -> None:
    # Both dogs are on the wrong side, but only one 0 is appended before the quirky 1.
    record = PromptRecord(
        "position", "two dogs right of a cat", (Clause("cat", 1), Clause("dog", 2, position=("right of", 0)))
    )
    j = judge(record, {"cat": [det(REF)], "dog": [det(LEFT), det((0, 0, 20, 20))]})
    assert j.rewards == (1.0, 1.0, 0.0, 1.0)


def test_dense_two_object_one_missing() -> None:
    two = PromptRecord("two_object", "a dog and a cat", (Clause("dog", 1), Clause("cat", 1)))
    j = judge(two, {"dog": [det()]})
    assert not j.correct
    assert j.reasons == ("expected cat>=1, found 0",)
    assert j.rewards == (1.0, 0.0)


def test_unrelated_classes_are_ignored() -> None:
    j = judge(single(), {"dog": [det()], "cat": [det()] * 5, "not a coco class": [det()]})
    assert j.correct and j.score == 1.0


# ---------------------------------------------------------------- data types


def test_detection_validates_its_fields() -> None:
    with pytest.raises(ValueError, match="x2 < x1"):
        Detection(box=(10, 0, 5, 10), score=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Detection(box=(0, 0, 1, 1), score=1.2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Detection(box=(0, 0, 1, 1), score=float("nan"))
    with pytest.raises(ValueError, match="4"):
        Detection(box=(0, 0, 1), score=0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a GenEval colour"):
        Detection(box=(0, 0, 1, 1), score=0.5, color="crimson")
    with pytest.raises(ValueError, match="boolean"):
        Detection(box=(0, 0, 1, 1), score=0.5, mask=np.zeros((4, 4), dtype=np.float32))


def test_detection_normalises_box_and_ignores_mask_in_equality() -> None:
    a = Detection(box=[0, 1, 2, 3], score=1, mask=np.ones((4, 4), dtype=bool))  # type: ignore[arg-type]
    assert a.box == (0.0, 1.0, 2.0, 3.0) and isinstance(a.score, float)
    assert a == Detection(box=(0, 1, 2, 3), score=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.score = 0.5  # type: ignore[misc]


def test_judgement_is_frozen() -> None:
    j = judge(single(), {"dog": [det()]})
    assert isinstance(j, Judgement)
    with pytest.raises(dataclasses.FrozenInstanceError):
        j.correct = False  # type: ignore[misc]


# ---------------------------------------------------------------- summaries


def test_summarize_averages_tags_not_images() -> None:
    a, b = single("dog"), single("cat")
    c = position("dog", "right of", "cat")
    results = [(c, True), (c, False)]  # position first: per_tag must still follow TAGS order
    results += [(a, True), (a, True), (a, True), (a, False)] + [(b, False)] * 4
    s = summarize(results)
    assert isinstance(s, GenEvalSummary)
    assert list(s.per_tag) == ["single_object", "position"]
    assert s.per_tag == {"single_object": 3 / 8, "position": 0.5}
    assert s.overall == pytest.approx((3 / 8 + 0.5) / 2)  # 0.4375, whereas the image mean is 0.4
    assert s.prompt_share == pytest.approx(2 / 3)  # a and c have a correct image, b has none
    assert (s.n_images, s.n_prompts) == (10, 3)
    assert s.dense_mean is None  # bare bools carry no dense reward


def test_summarize_with_judgements_and_prompt_identity() -> None:
    rec = single("dog")
    same_text_other_tag = PromptRecord("colors", rec.prompt, (Clause("dog", 1, color="red"),))
    j_good = judge(rec, {"dog": [det()]})  # score 1.0
    j_two = judge(rec, {"dog": [det(), det()]})  # correct, score 0.0
    j_bad = judge(same_text_other_tag, {"dog": [det(color="blue")]})  # wrong, score 0.5
    s = summarize([(rec, j_good), (rec, j_two), (same_text_other_tag, j_bad)])
    assert s.n_prompts == 2  # same text, different tag: two prompts
    assert s.prompt_share == 0.5
    assert s.dense_mean == pytest.approx(0.5)
    assert s.overall == pytest.approx(0.5)  # (1.0 + 0.0) / 2


def test_summarize_rejects_empty_and_bad_verdicts() -> None:
    with pytest.raises(ValueError, match="no results"):
        summarize([])
    with pytest.raises(ValueError, match="Judgement or bool"):
        summarize([(single(), 1.0)])  # type: ignore[list-item]
