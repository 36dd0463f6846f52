"""Scenes, renderer and prompt sets of the shapes world."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from flowrl.paths import builtin_prompts
from flowrl.rewards.geneval import load_metadata, relative_position
from flowrl.toy.prompts import all_records, split_records
from flowrl.toy.render import render
from flowrl.toy.scenes import Scene, ShapeObject, _gap, sample_scene
from flowrl.toy.world import BACKGROUND, COLORS, MIN_GAP, PALETTE, RESOLUTION, SHAPES


def test_world_has_enough_classes_and_distinct_hues():
    assert len(SHAPES) >= 4 and len(COLORS) >= 4
    import colorsys

    hues = sorted(colorsys.rgb_to_hsv(*PALETTE[c])[0] * 360 for c in COLORS)
    gaps = np.diff(hues + [hues[0] + 360])
    assert gaps.min() >= 40, f"palette hues too close: {hues}"


def test_circle_area_and_colour():
    r = render(Scene((ShapeObject("circle", "red", 16, 16, 10),)))
    assert r.image.shape == (3, RESOLUTION, RESOLUTION) and r.image.dtype == np.float32
    assert abs(r.masks[0].sum() - np.pi * 25) < 6
    np.testing.assert_allclose(r.image[:, 16, 16], PALETTE["red"], atol=1e-6)
    np.testing.assert_allclose(r.image[:, 0, 0], BACKGROUND, atol=1e-6)


def test_triangle_points_up_and_bar_is_three_to_one():
    tri = render(Scene((ShapeObject("triangle", "blue", 16, 16, 11),))).masks[0]
    rows = tri.sum(axis=1)[tri.any(axis=1)]
    assert rows[0] < rows[-1] / 3, "apex row should be much narrower than the base"
    bar = ShapeObject("bar", "green", 16, 16, 10)
    x1, y1, x2, y2 = bar.box
    assert (x2 - x1) / (y2 - y1) == pytest.approx(3.0)


def test_render_is_antialiased():
    img = render(Scene((ShapeObject("circle", "blue", 16.3, 15.8, 9.5),))).image
    bg = np.asarray(BACKGROUND)[:, None, None]
    fg = np.asarray(PALETTE["blue"])[:, None, None]
    mixed = ~(np.isclose(img, bg).all(0) | np.isclose(img, fg).all(0))
    assert mixed.sum() > 10, "edge pixels should blend background and colour"


@pytest.mark.parametrize("seed", [0, 1])
def test_sampled_scenes_satisfy_every_prompt(seed):
    rng = np.random.default_rng(seed)
    for record in all_records():
        scene = sample_scene(record, rng)
        counts = collections.Counter(o.shape for o in scene.objects)
        assert sum(counts.values()) == sum(c.count for c in record.include)
        for i, clause in enumerate(record.include):
            assert counts[clause.cls] >= clause.count
            objs = [o for o in scene.objects if o.shape == clause.cls]
            if clause.color:
                assert sum(o.color == clause.color for o in objs) >= clause.count
            if clause.position:
                rel, k = clause.position
                ref = [o for o in scene.objects if o.shape == record.include[k].cls][0]
                assert rel in relative_position(objs[0].box, ref.box), record.prompt
        for a in range(len(scene.objects)):
            box = scene.objects[a].box
            assert 0 <= box[0] and box[2] <= RESOLUTION and 0 <= box[1] and box[3] <= RESOLUTION
            for b in range(a):
                assert _gap(box, scene.objects[b].box) >= MIN_GAP - 1e-9


def test_unknown_class_is_refused_clearly():
    from flowrl.rewards.geneval import Clause, PromptRecord

    with pytest.raises(ValueError, match="cannot draw"):
        sample_scene(PromptRecord("single_object", "a photo of a dog", (Clause("dog", 1),)), np.random.default_rng(0))


def test_prompt_phrasing_follows_geneval():
    by_prompt = {r.prompt: r for r in all_records()}
    r = by_prompt["a photo of three circles"]
    assert r.tag == "counting" and r.include[0].count == 3 and r.exclude[0].count == 4
    r = by_prompt["a photo of a triangle right of a square"]
    assert [c.cls for c in r.include] == ["square", "triangle"]
    assert r.include[1].position == ("right of", 0)
    r = by_prompt["a photo of a red bar and a blue circle"]
    assert r.tag == "color_attr" and (r.include[0].color, r.include[1].color) == ("red", "blue")
    tags = collections.Counter(r.tag for r in all_records())
    assert tags == {"single_object": 4, "two_object": 12, "counting": 12, "colors": 16, "position": 48, "color_attr": 144}


def test_shipped_prompt_sets_are_disjoint_and_regenerable():
    train = load_metadata(builtin_prompts("toy-train"))
    test = load_metadata(builtin_prompts("toy-test"))
    assert not {r.prompt for r in train} & {r.prompt for r in test}
    assert {r.tag for r in train} == {r.tag for r in test} == {
        "single_object", "two_object", "counting", "colors", "position", "color_attr"
    }
    assert len(train) + len(test) == len(all_records())
    regen_train, regen_test = split_records(all_records())
    assert regen_train == train and regen_test == test
