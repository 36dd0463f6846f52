"""GenEval detector backends: Mask2Former post-processing on constructed logits, the mmdet result
converters on inputs of mmdet's documented layouts, a tiny random Mask2Former loaded from disk, and
the geneval reward end to end on tiny random Mask2Former + CLIP folders."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydantic
import pytest
import torch
from tiny_clip import save_tiny_clip

from flowrl.errors import FlowrlError, ModelNotFoundError
from flowrl.rewards.geneval import Clause, Detection, PromptRecord, judge, load_metadata
from flowrl.rewards.geneval.colors import ColorQuery
from flowrl.rewards.geneval.detectors import (
    COCO_RENAMES,
    Detector,
    MMDetDetector,
    ShapesBackend,
    detections_from_mmdet,
    detections_from_mmdet2,
    detections_from_mmdet3,
    geneval_class_name,
    geneval_class_names,
    instance_detections,
    load_mask2former,
    load_mmdet,
)
from flowrl.rewards.geneval.detectors.mask2former import (
    PIXEL_MEAN,
    PIXEL_STD,
    Mask2FormerDetector,
    mask_boxes,
    padded_size,
    preprocess,
    rescaled_size,
    select_queries,
    upsample_mask_logits,
)
from flowrl.rewards.geneval.detectors.mmdet_adapter import to_bgr_uint8
from flowrl.rewards.geneval.reward import GenEvalReward


pytestmark = pytest.mark.usefixtures("fresh_models")  # see conftest.py


@pytest.fixture(scope="module")
def object_names(shared_dir: Path) -> tuple[str, ...]:
    """GenEval's 80 class names in detector order, read from ../shared (never copied into the repo)."""
    path = shared_dir / "data" / "geneval" / "object_names.txt"
    return tuple(line.strip() for line in path.read_text().splitlines() if line.strip())


@pytest.fixture(scope="module")
def coco_labels(object_names) -> dict[int, str]:
    """id2label as COCO / transformers spell it (mouse, remote, keyboard), built from GenEval's names."""
    inverse = {v: k for k, v in COCO_RENAMES.items()}
    return {i: inverse.get(n, n) for i, n in enumerate(object_names)}


# -- class names ---------------------------------------------------------------------------------


def test_geneval_class_name_renames_and_aliases() -> None:
    assert geneval_class_name("mouse") == "computer mouse"
    assert geneval_class_name("remote") == "tv remote"
    assert geneval_class_name("Keyboard") == "computer keyboard"
    assert geneval_class_name("diningtable") == "dining table"
    assert geneval_class_name("tvmonitor") == "tv"
    assert geneval_class_name("potted_plant") == "potted plant"
    assert geneval_class_name("computer mouse") == "computer mouse"  # already GenEval's: unchanged


def test_coco_label_map_gives_geneval_object_names(coco_labels, object_names) -> None:
    assert "mouse" in coco_labels.values()  # the map really is COCO-spelled
    assert geneval_class_names(coco_labels, "m") == object_names
    assert geneval_class_names({str(k): v for k, v in coco_labels.items()}, "m") == object_names
    assert geneval_class_names(list(coco_labels.values()), "m") == object_names


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        ({0: "LABEL_0", 1: "LABEL_1"}, "generic"),
        ({0: "mouse", 1: "computer mouse"}, "same GenEval class name"),
        ({0: "cat", 2: "dog"}, "without gaps"),
        ({}, "no class labels"),
    ],
)
def test_bad_label_maps_are_refused(labels, match) -> None:
    with pytest.raises(FlowrlError, match=match):
        geneval_class_names(labels, "some/model")


# -- pre-processing ------------------------------------------------------------------------------


def test_rescaled_size_follows_mmcv_imrescale() -> None:
    assert rescaled_size(512, 512) == (800, 800)
    assert rescaled_size(480, 640) == (800, 1067)  # 640 * 800 / 480 = 1066.67, rounded half up
    assert rescaled_size(100, 2000) == (67, 1333)  # the long side binds: factor 1333 / 2000
    assert rescaled_size(1024, 1024) == (800, 800)
    assert padded_size(800, 1067) == (800, 1088)
    assert padded_size(64, 64) == (64, 64)


def test_preprocess_resizes_normalises_and_pads() -> None:
    images = torch.zeros(2, 3, 30, 50)
    images[0, 0], images[0, 1], images[0, 2] = 1.0, 0.5, 0.0  # levels 255, 128 (0.5 * 255 rounds up), 0
    images[1] = 0.2
    pixel_values, size = preprocess(images, scale=(64, 40))
    assert size == (38, 64)  # factor min(64 / 50, 40 / 30) = 1.28
    assert pixel_values.shape == (2, 3, 64, 64)  # 38 padded to 64
    expected0 = [(level - m) / s for level, m, s in zip((255, 128, 0), PIXEL_MEAN, PIXEL_STD, strict=True)]
    for c in range(3):
        torch.testing.assert_close(pixel_values[0, c, :38], torch.full((38, 64), expected0[c]))
        torch.testing.assert_close(pixel_values[1, c, :38], torch.full((38, 64), (51 - PIXEL_MEAN[c]) / PIXEL_STD[c]))
    assert torch.all(pixel_values[:, :, 38:] == 0)  # padding after normalisation: zeros


def test_preprocess_resize_keeps_8bit_levels() -> None:
    images = torch.rand(1, 3, 30, 50, generator=torch.Generator().manual_seed(0))
    pixel_values, _ = preprocess(images, scale=(64, 40))
    levels = pixel_values[0, :, :38] * torch.tensor(PIXEL_STD).view(3, 1, 1) + torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    torch.testing.assert_close(levels, levels.round(), atol=1e-3, rtol=0)
    assert 0 <= levels.min() and levels.max() <= 255


# -- post-processing -----------------------------------------------------------------------------

NAMES = ("person", "dog", "cat", "bench")
H, W = 20, 30


def rect(top: int, left: int, bottom: int, right: int, size=(H, W), inside=4.0, outside=-4.0) -> torch.Tensor:
    """Mask logits [h, w]: `inside` on rows top..bottom-1, cols left..right-1, else `outside`."""
    m = torch.full(size, outside)
    m[top:bottom, left:right] = inside
    return m


def one_hot_logits(label: int, strength: float, k: int = len(NAMES)) -> torch.Tensor:
    """Class logits [K + 1] with `strength` on `label` and 0 elsewhere (null class included)."""
    row = torch.zeros(k + 1)
    row[label] = strength
    return row


def prob(strength: float, k: int = len(NAMES)) -> float:
    """Softmax probability of the boosted class in `one_hot_logits` (K + 1 columns)."""
    return math.exp(strength) / (math.exp(strength) + k)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_select_queries_ranks_query_class_pairs() -> None:
    logits = torch.stack([one_hot_logits(1, 3.0), one_hot_logits(2, 5.0), torch.zeros(5)])
    probs, labels, queries = select_queries(logits, max_detections=3)
    assert queries.tolist()[:2] == [1, 0] and labels.tolist()[:2] == [2, 1]
    torch.testing.assert_close(probs[:2], torch.tensor([prob(5.0), prob(3.0)]))
    # Third best: the uniform query's first class (ties broken by flat index), 1 / 5.
    assert (queries[2].item(), labels[2].item()) == (2, 0)
    assert probs[2].item() == pytest.approx(0.2)
    assert len(select_queries(logits, max_detections=100)[0]) == 3 * 4  # capped by Q * K


def test_instance_detections_boxes_labels_scores() -> None:
    class_logits = torch.stack(
        [
            one_hot_logits(1, 6.0),  # a dog, very sure
            one_hot_logits(2, 4.0),  # a cat
            one_hot_logits(1, 2.0),  # a second, less sure dog
            one_hot_logits(0, 6.0),  # a person whose mask is empty: dropped
        ]
    )
    mask_logits = torch.stack(
        [
            rect(2, 3, 6, 10),
            rect(10, 20, 16, 28, inside=2.0),
            rect(0, 0, 1, 1),
            torch.full((H, W), -3.0),
        ]
    )
    out = instance_detections(class_logits, mask_logits, NAMES, (H, W), keep_above=0.1)
    assert set(out) == set(NAMES) and out["person"] == [] and out["bench"] == []
    dogs, cats = out["dog"], out["cat"]
    assert [d.box for d in dogs] == [(3.0, 2.0, 10.0, 6.0), (0.0, 0.0, 1.0, 1.0)]  # x2, y2 = last + 1
    assert [d.box for d in cats] == [(20.0, 10.0, 28.0, 16.0)]
    assert dogs[0].score == pytest.approx(prob(6.0) * sigmoid(4.0), rel=1e-5)
    assert dogs[1].score == pytest.approx(prob(2.0) * sigmoid(4.0), rel=1e-5)
    assert cats[0].score == pytest.approx(prob(4.0) * sigmoid(2.0), rel=1e-5)
    expected_mask = np.zeros((H, W), bool)
    expected_mask[2:6, 3:10] = True
    assert dogs[0].mask.dtype == np.bool_ and np.array_equal(dogs[0].mask, expected_mask)
    # Without keep_above every (query, class) pair is reported, the low-probability ones too, except
    # the 4 pairs of the empty-mask query: 3 queries x 4 classes.
    everything = instance_detections(class_logits, mask_logits, NAMES, (H, W))
    assert sum(len(v) for v in everything.values()) == 12
    # The person pairs come from the three other queries, each unlikely; the sure person had no mask.
    assert sorted(d.box for d in everything["person"]) == [(0, 0, 1, 1), (3, 2, 10, 6), (20, 10, 28, 16)]
    assert max(d.score for d in everything["person"]) < 0.1


def test_instance_detections_mask_score_is_mean_sigmoid_over_mask() -> None:
    logits = torch.full((H, W), -2.0)
    logits[5:8, 5:9] = torch.linspace(0.5, 3.0, 12).view(3, 4)
    out = instance_detections(one_hot_logits(3, 5.0)[None], logits[None], NAMES, (H, W))
    bench = out["bench"][0]
    expected = prob(5.0) * float(torch.sigmoid(logits[5:8, 5:9]).mean())
    assert bench.score == pytest.approx(expected, rel=1e-5)
    assert bench.box == (5.0, 5.0, 9.0, 8.0)


def test_instance_detections_cap_and_keep_above() -> None:
    class_logits = torch.stack([one_hot_logits(i % 4, 8.0 - i) for i in range(6)])
    mask_logits = torch.stack([rect(i, i, i + 3, i + 3) for i in range(6)])
    capped = instance_detections(class_logits, mask_logits, NAMES, (H, W), max_detections=4)
    assert sum(len(v) for v in capped.values()) == 4
    # The 4 most probable pairs are the boosted classes of queries 0..3, one per class.
    assert [capped[n][0].box[0] for n in NAMES] == [0.0, 1.0, 2.0, 3.0]
    kept = instance_detections(class_logits, mask_logits, NAMES, (H, W), keep_above=0.5)
    scores = [d.score for v in kept.values() for d in v]
    assert scores and min(scores) > 0.5
    assert len(scores) == sum(prob(8.0 - i) * sigmoid(4.0) > 0.5 for i in range(6))
    for dets in capped.values():  # per class, best first
        assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)


def test_instance_detections_checks_class_count() -> None:
    with pytest.raises(ValueError, match="4 classes \\+ 1 null"):
        instance_detections(torch.zeros(2, 4), torch.zeros(2, H, W), NAMES, (H, W))


def test_upsample_mask_logits_crops_padding_then_resizes() -> None:
    # Model output at a quarter of a 32x32 padded input whose top 16 rows hold the resized image.
    low = torch.full((1, 8, 8), -4.0)
    low[0, :2, :4] = 4.0  # the top-left quarter of the image region (rows 0..3 of 4 at this scale)
    up = upsample_mask_logits(low, (8, 16), input_size=(16, 32), padded=(32, 32))
    assert up.shape == (1, 8, 16)
    mask = up[0] > 0
    assert mask_boxes(mask[None]).tolist() == [[0.0, 0.0, 8.0, 4.0]]
    # Without the crop the same logits would cover a quarter of the rows instead of half.
    plain = upsample_mask_logits(low, (8, 16)) > 0
    assert mask_boxes(plain).tolist() == [[0.0, 0.0, 8.0, 2.0]]


def test_mask_boxes_empty_and_single_pixel() -> None:
    masks = torch.zeros(2, 5, 7, dtype=torch.bool)
    masks[1, 3, 6] = True
    assert mask_boxes(masks).tolist() == [[0.0, 0.0, 0.0, 0.0], [6.0, 3.0, 7.0, 4.0]]


# -- mmdet adapters ------------------------------------------------------------------------------


def mmdet2_result(object_names, h=12, w=16):
    """mmdet 2.x's (bbox_results, segm_results) with 2 dogs, 1 computer mouse, nothing else."""
    k = len(object_names)
    bbox = [np.zeros((0, 5), np.float32) for _ in range(k)]
    segm = [[] for _ in range(k)]
    dog, mouse = object_names.index("dog"), object_names.index("computer mouse")
    bbox[dog] = np.array([[1, 2, 5, 6, 0.4], [0, 0, 3, 3, 0.95]], np.float32)
    bbox[mouse] = np.array([[4, 4, 9, 8, 0.8]], np.float32)
    for c, boxes in ((dog, bbox[dog]), (mouse, bbox[mouse])):
        for x1, y1, x2, y2, _ in boxes.astype(int):
            m = np.zeros((h, w), bool)
            m[y1:y2, x1:x2] = True
            segm[c].append(m)
    return tuple([bbox, segm]), dog, mouse


def test_mmdet2_tuple_to_detections(object_names) -> None:
    result, dog, mouse = mmdet2_result(object_names)
    out = detections_from_mmdet2(result, object_names)
    assert set(out) == set(object_names)
    assert [d.score for d in out["dog"]] == pytest.approx([0.95, 0.4])  # sorted, best first
    assert out["dog"][0].box == (0.0, 0.0, 3.0, 3.0)
    assert out["computer mouse"][0].box == (4.0, 4.0, 9.0, 8.0)
    assert out["computer mouse"][0].mask.sum() == 5 * 4 and out["computer mouse"][0].mask.dtype == np.bool_
    assert sum(len(v) for v in out.values()) == 3
    kept = detections_from_mmdet2(result, object_names, keep_above=0.5)
    assert len(kept["dog"]) == 1 and len(kept["computer mouse"]) == 1
    # A record can be judged on them directly.
    record = PromptRecord("single_object", "a photo of a computer mouse", (Clause("computer mouse", 1),))
    assert judge(record, out).correct


def test_mmdet2_bbox_only_and_uint8_masks(object_names) -> None:
    (bbox, segm), dog, _ = mmdet2_result(object_names)
    boxes_only = detections_from_mmdet2(bbox, object_names)
    assert boxes_only["dog"][0].mask is None and len(boxes_only["dog"]) == 2
    segm = [[m.astype(np.uint8) for m in ms] for ms in segm]
    out = detections_from_mmdet((bbox, segm), object_names)
    assert out["dog"][0].mask.dtype == np.bool_


def test_mmdet2_layout_errors(object_names) -> None:
    (bbox, segm), dog, _ = mmdet2_result(object_names)
    with pytest.raises(ValueError, match="80 classes but the detector declares 3"):
        detections_from_mmdet2((bbox, segm), object_names[:3])
    segm[dog] = segm[dog][:1]
    with pytest.raises(ValueError, match="2 boxes but 1 masks"):
        detections_from_mmdet2((bbox, segm), object_names)
    segm[dog] = [{"size": [12, 16], "counts": b""}] * 2
    with pytest.raises(ValueError, match="RLE"):
        detections_from_mmdet2((bbox, segm), object_names)
    with pytest.raises(ValueError, match="unrecognised mmdet result"):
        detections_from_mmdet(object(), object_names)


@pytest.mark.parametrize("as_tensor", [True, False])
def test_mmdet3_data_sample_to_detections(object_names, as_tensor) -> None:
    masks = np.zeros((2, 10, 10), bool)
    masks[0, 1:4, 2:6] = True
    masks[1, 5:9, 5:9] = True
    fields = dict(
        bboxes=np.array([[2, 1, 6, 4], [5, 5, 9, 9]], np.float32),
        scores=np.array([0.7, 0.99], np.float32),
        labels=np.array([object_names.index("cat"), object_names.index("tv remote")]),
        masks=masks,
    )
    if as_tensor:
        fields = {k: torch.from_numpy(v) for k, v in fields.items()}
    sample = SimpleNamespace(pred_instances=SimpleNamespace(**fields))
    out = detections_from_mmdet(sample, object_names)
    assert out["cat"][0].box == (2.0, 1.0, 6.0, 4.0) and out["cat"][0].score == pytest.approx(0.7)
    assert out["tv remote"][0].score == pytest.approx(0.99)
    assert np.array_equal(out["tv remote"][0].mask, masks[1])
    assert detections_from_mmdet3(sample, object_names, keep_above=0.8)["cat"] == []
    no_masks = SimpleNamespace(pred_instances=SimpleNamespace(**{k: v for k, v in fields.items() if k != "masks"}))
    assert detections_from_mmdet3(no_masks, object_names)["cat"][0].mask is None


def test_mmdet3_length_mismatch(object_names) -> None:
    inst = SimpleNamespace(bboxes=np.zeros((2, 4)), scores=np.zeros(1), labels=np.zeros(2, int))
    with pytest.raises(ValueError, match="disagree in length"):
        detections_from_mmdet3(inst, object_names)


def test_to_bgr_uint8_matches_mmcv_imread_layout() -> None:
    images = torch.zeros(1, 3, 2, 3)
    images[0, 0, 0, 0] = 1.0  # a red pixel
    images[0, 2, 1, 2] = 0.5  # a half blue pixel
    (array,) = to_bgr_uint8(images)
    assert array.dtype == np.uint8 and array.shape == (2, 3, 3)
    assert array[0, 0].tolist() == [0, 0, 255] and array[1, 2].tolist() == [128, 0, 0]


def test_mmdet_detector_calls_inference_in_batches(object_names) -> None:
    result, _, _ = mmdet2_result(object_names, h=8, w=8)
    calls = []

    def infer(model, arrays):
        calls.append([a.shape for a in arrays])
        return [result for _ in arrays]

    detector = MMDetDetector("model", infer, object_names, batch_size=2)
    assert isinstance(detector, Detector)
    out = detector(torch.rand(3, 3, 8, 8))
    assert calls == [[(8, 8, 3)] * 2, [(8, 8, 3)]]
    assert len(out) == 3 and len(out[2]["dog"]) == 2


def test_load_mmdet_without_mmdet_names_the_extra(tmp_path, monkeypatch) -> None:
    config, checkpoint = tmp_path / "m2f.py", tmp_path / "m2f.pth"
    with pytest.raises(ModelNotFoundError, match="mim download mmdet"):
        load_mmdet(str(config), str(checkpoint), torch.device("cpu"))
    config.write_text("model = {}\n")
    checkpoint.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "mmdet", None)  # importing it now raises ImportError
    monkeypatch.setitem(sys.modules, "mmdet.apis", None)
    with pytest.raises(FlowrlError, match=r"flowrl\[mmdet\]") as err:
        load_mmdet(str(config), str(checkpoint), torch.device("cpu"))
    assert "mmcv-full" in str(err.value) and not isinstance(err.value, ImportError)


# -- a tiny random Mask2Former through the real loading path -------------------------------------


def save_tiny_mask2former(folder: Path, id2label: dict[int, str], num_queries: int = 6) -> Path:
    """A random-weight Mask2FormerForUniversalSegmentation (tiny Swin backbone) saved to `folder`."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    backbone = SwinConfig(
        image_size=64,
        patch_size=4,
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone,
        feature_size=32,
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=32,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        dim_feedforward=32,
        num_queries=num_queries,
        num_labels=len(id2label),
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )
    torch.manual_seed(0)
    Mask2FormerForUniversalSegmentation(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_m2f(tmp_path_factory, coco_labels) -> Path:
    return save_tiny_mask2former(tmp_path_factory.mktemp("m2f"), coco_labels)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("clip"), preprocessor=False)


def test_tiny_mask2former_loads_and_detects(tiny_m2f, object_names) -> None:
    model, names = load_mask2former(str(tiny_m2f), torch.device("cpu"), torch.float32)
    assert names == object_names
    detector = Mask2FormerDetector(model, names, batch_size=1)
    assert isinstance(detector, Detector)
    images = torch.rand(2, 3, 24, 40, generator=torch.Generator().manual_seed(1))
    out = detector(images)
    assert len(out) == 2
    for found in out:
        assert set(found) == set(object_names)
        dets = [d for v in found.values() for d in v]
        assert 0 < len(dets) <= 6 * 80  # random weights: every non-empty (query, class) pair
        for d in dets:
            assert isinstance(d, Detection) and d.color is None
            assert d.mask.shape == (24, 40) and d.mask.dtype == np.bool_ and d.mask.any()
            x1, y1, x2, y2 = d.box
            assert 0 <= x1 < x2 <= 40 and 0 <= y1 < y2 <= 24
            assert 0.0 < d.score <= 1.0


# -- the geneval reward --------------------------------------------------------------------------


def records(object_names) -> list[PromptRecord]:
    assert {"bench", "dog", "car"} <= set(object_names)
    return [
        PromptRecord("single_object", "a photo of a bench", (Clause("bench", 1),)),
        PromptRecord("counting", "a photo of two dogs", (Clause("dog", 2),), (Clause("dog", 3),)),
        PromptRecord("colors", "a photo of a red car", (Clause("car", 1, color="red"),)),
    ]


def constructed_forward(object_names, num_queries: int = 6):
    """A Mask2Former output: in every image a sure bench, one sure dog and one sure car, apart."""
    labels = [object_names.index(n) for n in ("bench", "dog", "car")]
    boxes = [(10, 20, 60, 90), (100, 20, 150, 90), (100, 110, 190, 190)]  # rows, cols at 1/4 of 800 px

    def forward(pixel_values):
        b, _, hp, wp = pixel_values.shape
        class_logits = torch.zeros(b, num_queries, len(object_names) + 1)
        class_logits[..., -1] = 12.0  # "no object" for every unused query
        mask_logits = torch.full((b, num_queries, hp // 4, wp // 4), -6.0)
        for q, (label, (top, left, bottom, right)) in enumerate(zip(labels, boxes, strict=True)):
            class_logits[:, q, label], class_logits[:, q, -1] = 30.0, 0.0
            mask_logits[:, q, top:bottom, left:right] = 6.0
        return class_logits, mask_logits

    return forward


def test_reward_hf_mask2former_end_to_end(tiny_m2f, tiny_clip, object_names, monkeypatch) -> None:
    config = GenEvalReward.Config(
        backend="hf-mask2former", model=str(tiny_m2f), clip_model=str(tiny_clip), device="cpu", batch_size=2
    )
    reward = GenEvalReward(config)
    assert reward.detector.class_names == object_names
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    recs = records(object_names)
    prompts = [r.prompt for r in recs]

    real = reward(images, prompts, recs)  # the tiny model's own (random) outputs
    assert real.scores.shape == (3,) and real.scores.dtype == torch.float32
    assert real.details["strict"].shape == (3,) and set(real.details["strict"].tolist()) <= {0.0, 1.0}

    monkeypatch.setattr(reward.detector, "forward", constructed_forward(object_names))
    out = reward(images, prompts, recs)
    # The car's colour is whatever the tiny CLIP says about its crop; ask it independently.
    car = reward.detector(images[2:3])[0]["car"][0]
    color = reward.colors(images[2:3], [ColorQuery(0, "car", car)])[0]
    car_score = 1.0 if color == "red" else 0.5
    torch.testing.assert_close(out.scores, torch.tensor([1.0, 0.5, car_score]))
    assert out.details["strict"].tolist() == [1.0, 0.0, float(color == "red")]

    strict = GenEvalReward(config.model_copy(update={"signal": "strict"}))
    monkeypatch.setattr(strict.detector, "forward", constructed_forward(object_names))
    assert strict(images, prompts, recs).scores.tolist() == out.details["strict"].tolist()


def test_reward_refuses_classes_the_detector_lacks(tiny_m2f, tiny_clip) -> None:
    reward = GenEvalReward(
        GenEvalReward.Config(backend="hf-mask2former", model=str(tiny_m2f), clip_model=str(tiny_clip), device="cpu")
    )
    record = PromptRecord("single_object", "a photo of a circle", (Clause("circle", 1),))
    with pytest.raises(FlowrlError, match="cannot detect 'circle'"):
        reward(torch.rand(1, 3, 16, 16), [record.prompt], [record])


def test_shapes_backend_is_a_detector() -> None:
    backend = ShapesBackend()
    assert isinstance(backend, Detector) and backend.class_names == ("circle", "square", "triangle", "bar")
    assert GenEvalReward().detector.class_names == backend.class_names


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"backend": "mmdet"}, "needs detector_config and detector_checkpoint"),
        ({"backend": "shapes", "clip_model": "x"}, "`clip_model` is only read by backend hf-mask2former / mmdet"),
        ({"backend": "hf-mask2former", "detector_config": "a.py"}, "`detector_config` is only read by backend mmdet"),
        ({"backend": "mmdet", "model": "m", "detector_config": "a", "detector_checkpoint": "b"}, "`model`"),
    ],
)
def test_config_refuses_fields_of_other_backends(fields, match) -> None:
    with pytest.raises(pydantic.ValidationError, match=match):
        GenEvalReward.Config(**fields)


def test_missing_detector_weights_offline(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelNotFoundError) as err:
        GenEvalReward(GenEvalReward.Config(backend="hf-mask2former", device="cpu"))
    message = str(err.value)
    assert "facebook/mask2former-swin-small-coco-instance" in message
    assert "hf download" in message and "`model:`" in message


def test_missing_clip_weights_offline_names_clip_model(tiny_m2f, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelNotFoundError) as err:
        GenEvalReward(GenEvalReward.Config(backend="hf-mask2former", model=str(tiny_m2f), device="cpu"))
    message = str(err.value)
    assert "openai/clip-vit-large-patch14" in message and "`clip_model:`" in message


def test_reward_mmdet_backend_without_mmdet(tmp_path, monkeypatch) -> None:
    (tmp_path / "c.py").write_text("")
    (tmp_path / "w.pth").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "mmdet", None)
    monkeypatch.setitem(sys.modules, "mmdet.apis", None)
    config = GenEvalReward.Config(
        backend="mmdet", detector_config=str(tmp_path / "c.py"), detector_checkpoint=str(tmp_path / "w.pth")
    )
    with pytest.raises(FlowrlError, match=r"pip install 'flowrl\[mmdet\]'"):
        GenEvalReward(config)


def test_official_metadata_classes_are_all_detectable(geneval_metadata_path, object_names) -> None:
    classes = {c.cls for r in load_metadata(geneval_metadata_path) for c in (*r.include, *r.exclude)}
    assert classes <= set(object_names)
