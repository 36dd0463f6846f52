"""GenEval's CLIP colour check: compositing and crop on hand-made masks, the torch preprocessing
against PIL (what GenEval runs), the zero-shot arithmetic on hand-made vectors, and the classifier on
a tiny random CLIP against an independent computation (PIL + transformers' own forward)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_clip import save_tiny_clip
from transformers import CLIPModel, CLIPTokenizer

from flowrl.errors import ModelNotFoundError
from flowrl.rewards.geneval import COLORS, Clause, Detection, PromptRecord, judge
from flowrl.rewards.geneval.colors import (
    BACKGROUND_LEVEL,
    OPENAI_MEAN,
    OPENAI_STD,
    TEMPLATES,
    ColorClassifier,
    ColorQuery,
    bicubic_weights,
    clip_preprocess,
    color_detections,
    color_logits,
    composite_crop,
    crop_bounds,
    load_color_classifier,
    text_classifier,
)


pytestmark = pytest.mark.usefixtures("fresh_models")  # see conftest.py


def test_constants_match_reference() -> None:
    assert BACKGROUND_LEVEL == 0x99
    assert TEMPLATES == ("a photo of a {c} {object}", "a photo of a {c}-colored {object}", "a photo of a {c} object")
    assert COLORS == ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")


# -- composite and crop --------------------------------------------------------------------------


def test_crop_bounds_round_like_pil() -> None:
    assert crop_bounds((1.5, 2.5, 10.4, 12.6), 20, 20) == (2, 2, 10, 13)  # half to even, as round()
    assert crop_bounds((-3, -1, 50, 40), 20, 30) == (0, 0, 30, 20)  # clamped to the image
    assert crop_bounds((5, 5, 5, 5), 20, 20) == (5, 5, 6, 6)  # never empty


def test_composite_crop_on_hand_made_mask() -> None:
    levels = torch.arange(3 * 4 * 6, dtype=torch.float32).view(3, 4, 6)
    mask = np.zeros((4, 6), bool)
    mask[1, 2] = mask[2, 2] = mask[2, 3] = True
    out = composite_crop(levels, mask, (1, 1, 4, 3))  # x 1..3, y 1..2
    g = BACKGROUND_LEVEL
    for c in range(3):
        base = c * 24
        expected = [[g, base + 8, g], [g, base + 14, base + 15]]
        assert out[c].tolist() == expected
    plain = composite_crop(levels, None, (1, 1, 4, 3))
    assert torch.equal(plain, levels[:, 1:3, 1:4])


def test_composite_crop_matches_pil_composite() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    mask = rng.random((9, 11)) > 0.5
    box = (2, 1, 9, 7)
    image = Image.fromarray(rgb)
    reference = Image.composite(image, Image.new("RGB", image.size, "#999"), Image.fromarray(mask)).crop(box)
    ours = composite_crop(torch.from_numpy(rgb).permute(2, 0, 1).float(), mask, box)
    assert np.array_equal(ours.permute(1, 2, 0).numpy().astype(np.uint8), np.asarray(reference))


def test_composite_crop_checks_mask_shape() -> None:
    with pytest.raises(ValueError, match="does not match"):
        composite_crop(torch.zeros(3, 4, 6), np.zeros((6, 4), bool), (0, 0, 2, 2))


# -- preprocessing against PIL -------------------------------------------------------------------


def pil_clip_transform(rgb: np.ndarray, size: int = 224) -> np.ndarray:
    """OpenAI CLIP's test transform as torchvision runs it on a PIL image: [3, size, size]."""
    image = Image.fromarray(rgb)
    w, h = image.size
    long = int(size * max(w, h) / min(w, h))
    new_w, new_h = (size, long) if w <= h else (long, size)
    image = image.resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    x = np.asarray(image.crop((left, top, left + size, top + size))).astype(np.float64) / 255.0
    return ((x - np.array(OPENAI_MEAN)) / np.array(OPENAI_STD)).transpose(2, 0, 1)


@pytest.mark.parametrize("shape", [(50, 80), (300, 200), (224, 224), (500, 13), (7, 9), (10, 400), (1000, 700)])
def test_clip_preprocess_matches_pil_exactly(shape) -> None:
    # Noise is the hardest case: bicubic overshoot saturates, and every rounding step shows.
    rgb = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    ours = clip_preprocess(torch.from_numpy(rgb).permute(2, 0, 1).float()).numpy()
    assert ours.shape == (3, 224, 224)
    levels = np.abs(ours - pil_clip_transform(rgb)) * np.array(OPENAI_STD)[:, None, None] * 255
    assert levels.max() < 1e-3  # the same 8-bit pixels; what is left is float32 normalisation


def test_bicubic_weights_rows_sum_to_one_and_identity() -> None:
    for n_in, n_out in ((10, 4), (4, 10), (13, 224), (300, 224)):
        w = bicubic_weights(n_in, n_out)
        assert w.shape == (n_out, n_in)
        torch.testing.assert_close(w.sum(1), torch.ones(n_out, dtype=torch.float64))
    torch.testing.assert_close(bicubic_weights(7, 7), torch.eye(7, dtype=torch.float64))


# -- zero-shot arithmetic ------------------------------------------------------------------------


def test_text_classifier_and_logits_by_hand() -> None:
    # Two classes, two templates, D = 2. Class 0: (3, 4) and (0, 2) -> unit (0.6, 0.8), (0, 1)
    # -> mean (0.3, 0.9) -> normalised. Class 1: (-1, 0) twice -> (-1, 0).
    embeds = torch.tensor([[[3.0, 4.0], [0.0, 2.0]], [[-2.0, 0.0], [-5.0, 0.0]]])
    classifier = text_classifier(embeds)
    expected0 = torch.tensor([0.3, 0.9]) / torch.tensor([0.3, 0.9]).norm()
    torch.testing.assert_close(classifier, torch.stack([expected0, torch.tensor([-1.0, 0.0])]))
    logits = color_logits(torch.tensor([[0.0, 10.0]]), classifier)
    torch.testing.assert_close(logits, 100.0 * torch.tensor([[float(expected0[1]), 0.0]]))


# -- the classifier on a tiny random CLIP --------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"), preprocessor=False)


def reference_logits(folder, image: np.ndarray, objects) -> torch.Tensor:
    """GenEval's computation written independently: PIL composite/crop/resize and CLIPModel.forward."""
    model = CLIPModel.from_pretrained(folder).eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    size = model.config.vision_config.image_size
    pil = Image.fromarray(image)
    blank = Image.new("RGB", pil.size, (153, 153, 153))
    rows = []
    for name, mask, box in objects:
        crop = Image.composite(pil, blank, Image.fromarray(mask)).crop(box)
        pixels = torch.from_numpy(pil_clip_transform(np.asarray(crop), size)).float()[None]
        texts = [t.format(c=c, object=name) for c in COLORS for t in TEMPLATES]
        tokens = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
        text = out.text_embeds.view(len(COLORS), len(TEMPLATES), -1)  # unit rows already
        weights = text.mean(1)
        weights = weights / weights.norm(dim=-1, keepdim=True)
        rows.append(100.0 * out.image_embeds @ weights.T)
    return torch.cat(rows)


def test_color_classifier_matches_independent_computation(tiny_clip) -> None:
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    mask_a = np.zeros((40, 48), bool)
    mask_a[5:20, 4:30] = True
    mask_b = np.zeros((40, 48), bool)
    mask_b[22:38, 10:47] = rng.random((16, 37)) > 0.3
    objects = [("car", mask_a, (4, 5, 30, 20)), ("tv remote", mask_b, (10, 22, 47, 38))]
    classifier = load_color_classifier(str(tiny_clip), torch.device("cpu"), "float32")
    assert isinstance(classifier, ColorClassifier)
    images = torch.from_numpy(rgb).permute(2, 0, 1).float()[None] / 255.0
    queries = [ColorQuery(0, name, Detection(box=box, score=0.9, mask=mask)) for name, mask, box in objects]
    ours = classifier.logits(images, queries)
    reference = reference_logits(tiny_clip, rgb, objects)
    assert ours.shape == (2, len(COLORS))
    torch.testing.assert_close(ours, reference, atol=1e-3, rtol=0)
    assert classifier(images, queries) == [COLORS[i] for i in reference.argmax(1).tolist()]
    assert classifier(images, []) == []


def test_missing_clip_offline_names_field_and_model(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError) as err:
        load_color_classifier("openai/clip-vit-large-patch14", torch.device("cpu"), "float32")
    assert "openai/clip-vit-large-patch14" in str(err.value) and "`clip_model:`" in str(err.value)


# -- which detections get a colour ---------------------------------------------------------------


class FakeClassifier:
    """Says "red" for every object and remembers what it was asked."""

    def __init__(self):
        self.asked: list[ColorQuery] = []

    def __call__(self, images, queries):
        self.asked += list(queries)
        return ["red"] * len(queries)


def det(score: float, x: int = 0) -> Detection:
    return Detection(box=(x, 0, x + 4, 4), score=score)


def test_color_detections_colours_only_what_scoring_reads() -> None:
    records = [
        PromptRecord("colors", "a photo of a red car", (Clause("car", 1, color="red"),)),
        PromptRecord("counting", "a photo of two dogs", (Clause("dog", 2),), (Clause("dog", 3),)),
        PromptRecord(
            "color_attr",
            "a photo of a red car and a blue cat",
            (Clause("car", 1, color="red"), Clause("cat", 1, color="blue")),
        ),
    ]
    detections = [
        {"car": [det(0.2), det(0.8, 5), det(0.5, 9)], "dog": [det(0.9)]},
        {"dog": [det(0.95), det(0.92, 5)]},
        {"car": [det(0.7)], "cat": [det(0.31)]},
    ]
    fake = FakeClassifier()
    out = color_detections(fake, torch.zeros(3, 3, 8, 16), detections, records)
    # Image 0: the two kept cars (score > 0.3), best first; the dog (no colour clause) untouched.
    assert [(q.image, q.name, q.detection.score) for q in fake.asked] == [
        (0, "car", 0.8),
        (0, "car", 0.5),
        (2, "car", 0.7),
        (2, "cat", 0.31),
    ]
    assert [d.color for d in out[0]["car"]] == ["red", "red"] and out[0]["dog"][0].color is None
    assert out[1] == detections[1]
    assert detections[0]["car"][1].color is None  # the input is not modified
    # Two red cars where one was asked for: strict holds ("at least"), dense does not ("exactly").
    verdict = judge(records[0], out[0])
    assert verdict.correct and verdict.rewards == (0.0, 0.0)
    assert judge(records[2], out[2]).rewards == (1.0, 1.0, 1.0, 0.0)  # the cat is red, not blue


def test_color_detections_without_colour_clauses_never_calls_clip() -> None:
    fake = FakeClassifier()
    record = PromptRecord("single_object", "a photo of a car", (Clause("car", 1),))
    out = color_detections(fake, torch.zeros(1, 3, 8, 8), [{"car": [det(0.9)]}], [record])
    assert fake.asked == [] and out[0]["car"][0].color is None
