"""The shapes-world detector: accuracy on renders with known ground truth, calibration, input contract."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from flowrl.rewards.geneval import COUNTING_THRESHOLD, THRESHOLD, Detection, judge
from flowrl.toy.detector import MatchCounts, ShapesDetector, box_iou, detect_one, match_objects
from flowrl.toy.prompts import all_records, split_records
from flowrl.toy.render import render
from flowrl.toy.scenes import Scene, ShapeObject, sample_scene
from flowrl.toy.world import BACKGROUND, COLORS, PALETTE, SHAPES

DETECTOR = ShapesDetector()


def draw(*objects: ShapeObject, blur: float = 0.0, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """float32 [3, 32, 32] render of `objects`, Gaussian-blurred by `blur` px, plus pixel noise."""
    image = render(Scene(tuple(objects))).image
    if blur:
        image = np.stack([gaussian_filter(c, blur, mode="nearest") for c in image])
    if noise:
        image = image + np.random.default_rng(seed).normal(0.0, noise, image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def all_detections(found: dict[str, list[Detection]]) -> list[tuple[str, Detection]]:
    return [(cls, d) for cls, ds in found.items() for d in ds]


def only_detection(found: dict[str, list[Detection]]) -> tuple[str, Detection]:
    """The single detection of an image of one object (the test fails if there are more)."""
    dets = all_detections(found)
    assert len(dets) == 1, f"expected one detection, got {[(c, d.score) for c, d in dets]}"
    return dets[0]


def random_scenes(n: int, seed: int) -> list[Scene]:
    """A tag uniformly, a record of that tag uniformly, then a layout (as the benchmark draws them)."""
    rng = np.random.default_rng(seed)
    by_tag = defaultdict(list)
    for record in all_records():
        by_tag[record.tag].append(record)
    tags = sorted(by_tag)
    scenes = []
    for _ in range(n):
        group = by_tag[tags[rng.integers(len(tags))]]
        scenes.append(sample_scene(group[rng.integers(len(group))], rng))
    return scenes


# -- accuracy on random scenes ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("blur", "noise"), [(0.0, 0.0), (0.7, 0.0), (0.6, 0.03)], ids=["clean", "blur0.7", "blur0.6+noise"]
)
def test_precision_and_recall_on_random_scenes(blur: float, noise: float) -> None:
    scenes = random_scenes(150, seed=11)
    images = np.stack([draw(*s.objects, blur=blur, noise=noise, seed=i) for i, s in enumerate(scenes)])
    for threshold in (THRESHOLD, COUNTING_THRESHOLD):
        total = MatchCounts(0, 0, 0)
        for scene, found in zip(scenes, DETECTOR(images)):
            total = total + match_objects(found, scene.objects, score_threshold=threshold)
        assert total.expected > 250
        assert total.precision >= 0.99, (threshold, total)
        assert total.recall >= 0.99, (threshold, total)


def test_ground_truth_renders_of_test_prompts_pass_geneval_strict() -> None:
    _, test = split_records(all_records())
    rng = np.random.default_rng(3)
    records = [r for r in test for _ in range(2)]
    images = np.stack([render(sample_scene(r, rng)).image for r in records])
    verdicts = [judge(r, found) for r, found in zip(records, DETECTOR(images))]
    accuracy = np.mean([v.correct for v in verdicts])
    failures = [(r.prompt, v.reasons) for r, v in zip(records, verdicts) if not v.correct]
    assert accuracy >= 0.98, failures
    assert {r.tag for r in records} == {
        "single_object", "two_object", "counting", "colors", "position", "color_attr"
    }


# -- shapes, colours, boxes, scores --------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", [8.0, 9.5, 11.0])
def test_clean_objects_are_found_with_their_class_and_a_high_score(shape: str, size: float) -> None:
    obj = ShapeObject(shape, "blue", 15.6, 16.3, size)
    cls, det = only_detection(DETECTOR.detect_one(draw(obj)))
    assert cls == shape
    assert det.score > 0.9
    assert box_iou(det.box, obj.box) > 0.6  # thin triangle corners are under half covered


@pytest.mark.parametrize("shape", ["square", "circle"])
@pytest.mark.parametrize("size", [8.0, 9.0, 10.0, 11.0])
@pytest.mark.parametrize("blur", [0.5, 0.65, 0.8])
def test_blurred_squares_stay_squares_and_circles_stay_circles(
    shape: str, size: float, blur: float
) -> None:
    # A fill-ratio rule calls a blurred square a circle: blur rounds its corners off.
    obj = ShapeObject(shape, "red", 16.4, 15.7, size)
    for noise in (0.0, 0.03):
        image = draw(obj, blur=blur, noise=noise, seed=int(10 * size))
        cls, det = only_detection(DETECTOR.detect_one(image))
        assert cls == shape, (blur, noise)
        assert det.score > 0.9, (blur, noise, det.score)


@pytest.mark.parametrize("size", [8.0, 9.5, 11.0])
def test_bars_and_squares_are_told_apart(size: float) -> None:
    for shape in ("bar", "square"):
        image = draw(ShapeObject(shape, "green", 16.0, 16.0, size), blur=0.7)
        blob = max(DETECTOR.blobs(image)[0], key=lambda b: b.area)
        other = "square" if shape == "bar" else "bar"
        assert blob.shape == shape
        assert blob.fits[shape] > blob.fits[other] + 0.15, blob.fits


def test_triangles_are_read_apex_up_only() -> None:
    upright = draw(ShapeObject("triangle", "yellow", 16.0, 16.0, 10.0), blur=0.5)
    cls, det = only_detection(DETECTOR.detect_one(upright))
    assert cls == "triangle" and det.score > 0.9
    upside_down = np.ascontiguousarray(upright[:, ::-1])  # apex down: not a shape the world draws
    blobs = DETECTOR.blobs(upside_down)[0]
    assert len(blobs) == 1
    assert blobs[0].fits["triangle"] < DETECTOR.blobs(upright)[0][0].fits["triangle"] - 0.15
    assert blobs[0].score < 0.9


@pytest.mark.parametrize("color", COLORS)
def test_colours_are_read_correctly(color: str) -> None:
    objects = [
        ShapeObject("circle", color, 7.0, 7.0, 9.0),
        ShapeObject("square", color, 24.0, 7.0, 9.0),
        ShapeObject("triangle", color, 7.0, 24.0, 9.0),
        ShapeObject("bar", color, 23.0, 24.0, 9.0),
    ]
    for blur, noise in ((0.0, 0.0), (0.7, 0.03)):
        found = DETECTOR.detect_one(draw(*objects, blur=blur, noise=noise))
        assert {cls: [d.color for d in ds] for cls, ds in found.items()} == {s: [color] for s in SHAPES}


def paint(obj: ShapeObject, rgb: tuple[float, float, float]) -> np.ndarray:
    """float32 [3, 32, 32]: `obj` drawn in an arbitrary colour over the background."""
    from flowrl.toy.render import coverage

    alpha = coverage(obj, 32)
    bg, fg = (np.asarray(v, dtype=np.float32)[:, None, None] for v in (BACKGROUND, rgb))
    return (bg * (1 - alpha) + fg * alpha).astype(np.float32)


@pytest.mark.parametrize("color", COLORS)
def test_slightly_off_colours_are_still_read(color: str) -> None:
    off = tuple(float(np.clip(v + d, 0, 1)) for v, d in zip(PALETTE[color], (0.07, -0.07, 0.05)))
    cls, det = only_detection(DETECTOR.detect_one(paint(ShapeObject("square", color, 16, 16, 10), off)))
    assert (cls, det.color) == ("square", color) and det.score > 0.9


@pytest.mark.parametrize(
    "rgb", [(0.1, 0.1, 0.1), (0.5, 0.1, 0.6), (0.55, 0.55, 0.55)], ids=["black", "purple", "grey"]
)
def test_colours_outside_the_palette_are_ignored(rgb: tuple[float, float, float]) -> None:
    found = DETECTOR.detect_one(paint(ShapeObject("circle", "red", 16, 16, 10), rgb))
    assert all(d.score <= THRESHOLD for _, d in all_detections(found))


def test_four_colours_in_one_image_are_kept_apart() -> None:
    places = ((7, 7), (24, 7), (7, 24), (23, 24))
    objects = [ShapeObject(s, c, x, y, 9.5) for s, c, (x, y) in zip(SHAPES, COLORS, places)]
    found = DETECTOR.detect_one(draw(*objects, blur=0.6))
    assert match_objects(found, objects, score_threshold=COUNTING_THRESHOLD) == MatchCounts(4, 4, 4)


def test_boxes_are_tight_around_masks() -> None:
    scenes = random_scenes(20, seed=5)
    images = np.stack([draw(*s.objects, blur=0.5) for s in scenes])
    n = 0
    for found in DETECTOR(images):
        for _, d in all_detections(found):
            assert d.mask is not None and d.mask.dtype == np.bool_ and d.mask.shape == (32, 32)
            rows, cols = np.nonzero(d.mask)
            assert d.box == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
            n += 1
    assert n >= 30


def test_detections_come_sorted_under_every_class() -> None:
    circles = [
        ShapeObject("circle", c, 7 + 16 * (i % 2), 7 + 16 * (i // 2), 8 + i) for i, c in enumerate(COLORS)
    ]
    found = DETECTOR.detect_one(draw(*circles))
    assert set(found) == set(SHAPES)
    scores = [d.score for d in found["circle"]]
    assert len(scores) == 4 and scores == sorted(scores, reverse=True)


def test_sloppy_blobs_score_in_between() -> None:
    # An ellipse of aspect 1.5 resembles a circle, but not closely.
    c = (np.arange(128) + 0.5) / 4
    y, x = np.meshgrid(c, c, indexing="ij")
    inside = ((x - 16) / 6) ** 2 + ((y - 16) / 4) ** 2 <= 1
    alpha = inside.reshape(32, 4, 32, 4).mean(axis=(1, 3))
    bg, red = (np.asarray(v, dtype=np.float32)[:, None, None] for v in (BACKGROUND, PALETTE["red"]))
    cls, det = only_detection(DETECTOR.detect_one(bg * (1 - alpha) + red * alpha))
    assert 0.3 < det.score < 0.9, (cls, det.score)


def test_a_blob_two_classes_fit_about_equally_well_is_not_confident() -> None:
    # Blurred this much, a small circle is nearly a blurred small square: the margin lowers the score.
    blob = DETECTOR.blobs(draw(ShapeObject("circle", "red", 16.0, 16.0, 8.0), blur=1.2))[0][0]
    assert blob.shape == "circle"
    assert blob.fits["circle"] - blob.fits["square"] < 0.05
    assert blob.score < 0.9


def test_touching_objects_of_one_colour_merge_into_no_confident_detection() -> None:
    pair = ShapeObject("circle", "red", 12.0, 16.0, 8.0), ShapeObject("circle", "red", 20.0, 16.0, 8.0)
    found = DETECTOR.detect_one(draw(*pair))
    assert all(d.score < 0.9 for _, d in all_detections(found))


# -- junk -----------------------------------------------------------------------------------------


def test_background_only_has_no_detections() -> None:
    empty = np.broadcast_to(np.asarray(BACKGROUND, dtype=np.float32)[:, None, None], (3, 32, 32)).copy()
    noisy = np.clip(empty + np.random.default_rng(0).normal(0, 0.03, empty.shape), 0, 1).astype(np.float32)
    assert DETECTOR(np.stack([empty, noisy])) == [{s: [] for s in SHAPES}] * 2


@pytest.mark.parametrize("kind", ["uniform", "gaussian", "smooth"])
def test_noise_images_have_no_confident_detections(kind: str) -> None:
    rng = np.random.default_rng(7)
    if kind == "uniform":
        images = rng.random((20, 3, 32, 32))
    elif kind == "gaussian":
        images = np.asarray(BACKGROUND)[None, :, None, None] + rng.normal(0, 0.15, (20, 3, 32, 32))
    else:  # smooth random colour fields: blobs of every colour, none of them a shape
        images = gaussian_filter(rng.normal(0, 1, (20, 3, 32, 32)), (0, 0, 2.5, 2.5))
        lo, hi = images.min(axis=(1, 2, 3), keepdims=True), images.max(axis=(1, 2, 3), keepdims=True)
        images = (images - lo) / (hi - lo)
    found = DETECTOR(images.astype(np.float32))
    assert all(d.score <= 0.9 for f in found for _, d in all_detections(f))


def test_an_image_painted_one_colour_is_not_a_confident_square() -> None:
    red = np.broadcast_to(np.asarray(PALETTE["red"], dtype=np.float32)[:, None, None], (3, 32, 32)).copy()
    assert all(d.score < THRESHOLD for _, d in all_detections(DETECTOR.detect_one(red)))


def test_any_finite_input_is_accepted() -> None:
    rng = np.random.default_rng(1)
    for image in (
        np.full((3, 32, 32), 1e30, dtype=np.float32),
        np.full((3, 32, 32), -5.0),
        rng.normal(0, 10, (3, 32, 32)),
        rng.random((3, 1, 1)),
        rng.random((3, 5, 2)),
    ):
        found = DETECTOR.detect_one(image)
        assert set(found) == set(SHAPES)
    assert DETECTOR(np.zeros((0, 3, 32, 32), dtype=np.float32)) == []


# -- input contract -------------------------------------------------------------------------------


def test_torch_and_numpy_inputs_agree_and_single_images_are_a_batch_of_one() -> None:
    scenes = random_scenes(6, seed=2)
    images = np.stack([draw(*s.objects, blur=0.5) for s in scenes])
    from_numpy = DETECTOR(images)
    assert DETECTOR(torch.from_numpy(images)) == from_numpy
    assert DETECTOR(torch.from_numpy(images).double()) == from_numpy
    assert DETECTOR(images[0]) == from_numpy[:1]
    assert DETECTOR.detect_one(torch.from_numpy(images[1])) == from_numpy[1]
    assert detect_one(images[2]) == from_numpy[2]
    assert sum(len(ds) for f in from_numpy for ds in f.values()) >= sum(len(s.objects) for s in scenes)


@pytest.mark.parametrize(
    ("shape", "fragment"),
    [
        ((32, 32), "[B, 3, H, W] or [3, H, W]"),
        ((2, 1, 3, 32, 32), "[B, 3, H, W]"),
        ((1, 4, 32, 32), "got shape (1, 4, 32, 32)"),
        ((32, 32, 3), "channels first"),
    ],
)
def test_bad_ranks_and_channel_counts_raise_a_clear_error(shape: tuple[int, ...], fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        DETECTOR(np.zeros(shape, dtype=np.float32))
    assert fragment in str(info.value)


def test_other_bad_inputs_raise_a_clear_error() -> None:
    with pytest.raises(ValueError, match="float images"):
        DETECTOR(np.zeros((3, 32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match="NaN or infinite"):
        DETECTOR(np.full((2, 3, 8, 8), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="one image"):
        DETECTOR.detect_one(np.zeros((2, 3, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="areas"):
        ShapesDetector(full_score_areas=(300.0, 100.0))


def test_settings_are_frozen_fields() -> None:
    with pytest.raises(AttributeError):
        DETECTOR.min_area = 1.0  # type: ignore[misc]
    strict = ShapesDetector(fit_center=0.9)
    image = draw(ShapeObject("circle", "red", 16.0, 16.0, 9.0), blur=0.8)
    strict_score = only_detection(strict.detect_one(image))[1].score
    assert strict_score < only_detection(DETECTOR.detect_one(image))[1].score


# -- matching helper ------------------------------------------------------------------------------


def test_match_objects_is_one_to_one_and_needs_class_colour_and_overlap() -> None:
    a = ShapeObject("circle", "red", 10.0, 10.0, 8.0)  # box (6, 6, 14, 14)
    b = ShapeObject("circle", "red", 24.0, 10.0, 8.0)  # box (20, 6, 28, 14)
    good = Detection((6, 6, 14, 14), 0.95, "red")
    found = {
        "circle": [good, Detection((6, 6, 14, 14), 0.94, "red")],
        "square": [Detection((20, 6, 28, 14), 0.9, "red")],
    }
    assert match_objects(found, [a, b]) == MatchCounts(1, 3, 2)  # duplicate and wrong class unmatched
    assert match_objects({"circle": [Detection((20, 6, 28, 14), 0.9, "blue")]}, [b]) == MatchCounts(0, 1, 1)
    assert match_objects({"circle": [Detection((9, 6, 17, 14), 0.9, "red")]}, [a]).matched == 0  # IoU 0.45
    assert match_objects({"circle": [Detection((6, 6, 14, 14), 0.2, "red")]}, [a]) == MatchCounts(0, 0, 1)
    assert box_iou((0, 0, 2, 2), (1, 0, 3, 2)) == pytest.approx(1 / 3)
