"""GenEval's colour check: zero-shot CLIP ViT-L/14 over ten colour names, per detected object.

For each object a colour clause inspects, the image is composited over a ``#999999`` background
through the object's mask, cropped to its box, and preprocessed as OpenAI CLIP does (shorter side
to 224 px with PIL's antialiased bicubic filter, centre crop 224, OpenAI mean/std). Each colour's
class embedding is the normalised mean of the normalised text embeddings of three templates; the
colour is the argmax of ``100 * normalised image embedding . class embedding``. GenEval runs the
open_clip port of the OpenAI weights; the transformers model ``openai/clip-vit-large-patch14`` holds
the same weights.

Preprocessing is torch, not PIL, but follows PIL's arithmetic (8-bit levels, the same filter
weights in the same fixed point, rounding after each pass), so the pixels CLIP sees are those of
GenEval's PIL pipeline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from flowrl.rewards.clip_common import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, image_embeddings, text_embeddings
from flowrl.rewards.geneval.detectors.base import Detections, to_uint8_levels
from flowrl.rewards.geneval.metadata import COLORS, PromptRecord
from flowrl.rewards.geneval.scoring import COUNTING_THRESHOLD, THRESHOLD, Detection, keep_detections

__all__ = [
    "BACKGROUND_LEVEL",
    "CLIP_SIZE",
    "DEFAULT_CLIP_MODEL",
    "OPENAI_MEAN",
    "OPENAI_STD",
    "TEMPLATES",
    "ColorClassifier",
    "ColorQuery",
    "bicubic_weights",
    "clip_preprocess",
    "color_detections",
    "color_logits",
    "composite_crop",
    "crop_bounds",
    "load_color_classifier",
    "text_classifier",
]

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
"""OpenAI CLIP ViT-L/14, the weights GenEval's open_clip ``ViT-L-14`` / ``openai`` loads."""

TEMPLATES: tuple[str, ...] = (
    "a photo of a {c} {object}",
    "a photo of a {c}-colored {object}",
    "a photo of a {c} object",
)
"""GenEval's prompt templates; ``{c}`` is a colour, ``{object}`` the detected class name."""

BACKGROUND_LEVEL = 153.0
"""``#999999``: the 8-bit grey that replaces everything outside the object's mask."""

CLIP_SIZE = 224
"""CLIP ViT-L/14's input resolution."""

OPENAI_MEAN: tuple[float, float, float] = OPENAI_CLIP_MEAN
OPENAI_STD: tuple[float, float, float] = OPENAI_CLIP_STD


def crop_bounds(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    """Integer crop ``(x0, y0, x1, y1)`` of a float box, as PIL's ``Image.crop`` rounds it.

    Python's ``round`` (half to even) on each coordinate, as PIL does; then clamped to the image
    and widened to at least one pixel so that a degenerate box still yields an image.
    """
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    x0, x1 = min(max(x0, 0), width - 1), min(max(x1, 0), width)
    y0, y1 = min(max(y0, 0), height - 1), min(max(y1, 0), height)
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def composite_crop(
    levels: Tensor, mask: np.ndarray | Tensor | None, box: Sequence[float], background: float = BACKGROUND_LEVEL
) -> Tensor:
    """The object's pixels over a flat background, cropped to its box.

    Args:
        levels: float [3, H, W], 8-bit levels 0..255 (see :func:`.detectors.base.to_uint8_levels`).
        mask: bool [H, W], the object's mask; None keeps the whole image (box-only detectors).
        box: ``(x1, y1, x2, y2)`` in pixels.
        background: Grey level outside the mask (GenEval: 153, ``#999999``).

    Returns:
        float [3, y1 - y0, x1 - x0] with the bounds of :func:`crop_bounds`.
    """
    _, height, width = levels.shape
    if mask is not None:
        mask_t = torch.as_tensor(np.asarray(mask) if not isinstance(mask, Tensor) else mask, device=levels.device)
        if tuple(mask_t.shape) != (height, width):
            raise ValueError(f"mask shape {tuple(mask_t.shape)} does not match the image's {height}x{width}")
        levels = torch.where(mask_t.bool()[None], levels, torch.full_like(levels, background))
    x0, y0, x1, y1 = crop_bounds(box, height, width)
    return levels[:, y0:y1, x0:x1]


def _bicubic(x: Tensor, a: float = -0.5) -> Tensor:
    """PIL's bicubic kernel (Keys, a = -0.5), support 2."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


_PRECISION_BITS = 22
"""PIL's fixed-point precision for 8-bit resampling (32 - 8 - 2 bits)."""


@lru_cache(maxsize=256)
def bicubic_weights(in_size: int, out_size: int) -> Tensor:
    """Resampling matrix of PIL's antialiased bicubic resize along one axis.

    When shrinking, the kernel is stretched by the scale (antialiasing); each output's weights are
    normalised to sum to 1 over the input samples inside its window (edges are not padded). The
    arithmetic follows PIL's ``precompute_coeffs`` step for step.

    Args:
        in_size: Input length.
        out_size: Output length.

    Returns:
        float64 [out_size, in_size]; ``out = W @ in`` along that axis.
    """
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = 2.0 * filter_scale
    centers = (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale  # [out]
    index = torch.arange(in_size, dtype=torch.float64)  # [in]
    weights = _bicubic(((index[None] - centers[:, None]) + 0.5) * (1.0 / filter_scale))  # [out, in]
    # PIL's window: inputs int(center - support + 0.5) .. int(center + support + 0.5), exclusive.
    lo = torch.clamp((centers - support + 0.5).floor(), min=0)
    hi = torch.clamp((centers + support + 0.5).floor(), max=in_size)
    weights = torch.where((index[None] >= lo[:, None]) & (index[None] < hi[:, None]), weights, 0.0)
    total = weights.sum(dim=1, keepdim=True)
    return weights / torch.where(total == 0, 1.0, total)


def _fixed_point(weights: Tensor) -> Tensor:
    """PIL's 8-bit coefficients: weights x 2^22 rounded half away from zero (still float64)."""
    scaled = weights * (1 << _PRECISION_BITS)
    return torch.trunc(scaled + 0.5 * torch.sign(scaled))


def _resample_8bit(products: Tensor) -> Tensor:
    """PIL's 8-bit output of a pass: (sum + 2^21) >> 22, clipped to 0..255 (exact in float64)."""
    return torch.floor((products + (1 << (_PRECISION_BITS - 1))) / (1 << _PRECISION_BITS)).clamp(0, 255)


def clip_preprocess(
    crop: Tensor,
    size: int = CLIP_SIZE,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
) -> Tensor:
    """OpenAI CLIP's test transform of one image: resize shorter side, centre crop, normalise.

    Same arithmetic as torchvision's ``Resize(size, BICUBIC)`` + ``CenterCrop(size)`` on an 8-bit
    PIL image: long side ``int(size * long / short)``, crop offset ``round((L - size) / 2)``, a
    horizontal then a vertical pass with PIL's fixed-point coefficients, each rounded to 8 bits.
    Only the rows and columns that survive the crop are computed, so a thin sliver of a box does
    not blow up memory.

    Args:
        crop: float [3, h, w], integer 8-bit levels 0..255.
        size: Output side.
        mean, std: Per-channel normalisation of [0, 1] values.

    Returns:
        float32 [3, size, size], normalised.
    """
    _, height, width = crop.shape
    if height == 0 or width == 0:
        raise ValueError(f"cannot preprocess an empty crop of size {height}x{width}")
    short, long = min(height, width), max(height, width)
    long_out = int(size * long / short)
    new_h, new_w = (size, long_out) if height <= width else (long_out, size)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    x = crop.double()
    if new_w != width:
        wx = _fixed_point(bicubic_weights(width, new_w)[left : left + size]).to(crop.device)  # [size, w]
        x = _resample_8bit(torch.einsum("chw,ow->cho", x, wx))
    else:
        x = x[:, :, left : left + size]
    if new_h != height:
        wy = _fixed_point(bicubic_weights(height, new_h)[top : top + size]).to(crop.device)  # [size, h]
        x = _resample_8bit(torch.einsum("chw,oh->cow", x, wy))
    else:
        x = x[:, top : top + size]
    mean_t = torch.tensor(mean, dtype=torch.float64, device=crop.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float64, device=crop.device).view(3, 1, 1)
    return ((x / 255.0 - mean_t) / std_t).float()


def text_classifier(text_embeds: Tensor) -> Tensor:
    """Zero-shot class embeddings: the normalised mean of each class's normalised template embeddings.

    Args:
        text_embeds: float [C, T, D], T template embeddings per class.

    Returns:
        float [C, D], unit rows.
    """
    return F.normalize(F.normalize(text_embeds.float(), dim=-1).mean(dim=1), dim=-1)


def color_logits(image_embeds: Tensor, classifier: Tensor) -> Tensor:
    """``100 * normalise(image_embeds) @ classifier.T``: [N, D] x [C, D] -> [N, C]."""
    return 100.0 * F.normalize(image_embeds.float(), dim=-1) @ classifier.float().T


class ColorQuery(NamedTuple):
    """One object whose colour is wanted: which image, the object's class name, its detection."""

    image: int
    name: str
    detection: Detection


class ColorClassifier:
    """GenEval's zero-shot colour classifier on a transformers CLIP model.

    Args:
        model: A transformers ``CLIPModel`` (its device and dtype are used as they are).
        tokenizer: Its tokenizer.
        batch_size: Crops per image forward pass.
        colors: Colour names to choose between (GenEval's ten by default).
        templates: Prompt templates with ``{c}`` and ``{object}`` fields.
        size: Input side of the vision tower (default: the model's ``vision_config.image_size``,
            224 for ViT-L/14).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        batch_size: int = 16,
        colors: Sequence[str] = COLORS,
        templates: Sequence[str] = TEMPLATES,
        size: int | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.colors = tuple(colors)
        self.templates = tuple(templates)
        self.size = size or int(model.config.vision_config.image_size)
        self._classifiers: dict[str, Tensor] = {}

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """Projected text embeddings, float32 [len(texts), D] (not normalised)."""
        return text_embeddings(self.model, self.tokenizer, list(texts))

    @torch.inference_mode()
    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """Projected image embeddings of preprocessed crops [N, 3, S, S] -> float32 [N, D]."""
        return torch.cat([image_embeddings(self.model, chunk) for chunk in pixel_values.split(self.batch_size)])

    def classifier(self, name: str) -> Tensor:
        """Class embeddings of every colour for objects called ``name``, float32 [C, D] (cached)."""
        if name not in self._classifiers:
            texts = [t.format(c=c, object=name) for c in self.colors for t in self.templates]
            embeds = self.encode_text(texts).view(len(self.colors), len(self.templates), -1)
            self._classifiers[name] = text_classifier(embeds)
        return self._classifiers[name]

    def logits(self, images: Tensor, queries: Sequence[ColorQuery]) -> Tensor:
        """Colour logits of each queried object, float32 [N, C].

        Args:
            images: float [B, 3, H, W] in [0, 1]; ``ColorQuery.image`` indexes it.
            queries: The objects (masks bool [H, W] or None, boxes in pixels).
        """
        if not queries:
            return torch.zeros(0, len(self.colors))
        levels = to_uint8_levels(images)
        crops = torch.stack(
            [
                clip_preprocess(composite_crop(levels[q.image], q.detection.mask, q.detection.box), self.size)
                for q in queries
            ]
        )
        embeds = self.encode_images(crops)
        rows = []
        for i, q in enumerate(queries):
            rows.append(color_logits(embeds[i : i + 1], self.classifier(q.name).to(embeds.device)))
        return torch.cat(rows).cpu()

    def __call__(self, images: Tensor, queries: Sequence[ColorQuery]) -> list[str]:
        """The colour name of each queried object (argmax of :meth:`logits`)."""
        if not queries:
            return []
        return [self.colors[i] for i in self.logits(images, queries).argmax(dim=1).tolist()]


def color_detections(
    classifier: ColorClassifier | Any,
    images: Tensor,
    detections: Sequence[Detections],
    records: Sequence[PromptRecord],
) -> list[Detections]:
    """Fill in ``Detection.color`` where GenEval's scoring will read it.

    Per image, for each class that a colour clause of its record names, the detections that
    :func:`~flowrl.rewards.geneval.scoring.keep_detections` keeps (the record's threshold, at most
    16) get their colour; they replace that class's list (the dropped ones could never count). All
    such objects of the batch go through CLIP together.

    Args:
        classifier: Called as ``classifier(images, [ColorQuery, ...]) -> [colour, ...]``.
        images: float [B, 3, H, W] in [0, 1].
        detections: B per-class detection dicts (not modified).
        records: B prompt records.

    Returns:
        New per-class dicts, coloured where needed.
    """
    queries: list[ColorQuery] = []
    slots: list[tuple[int, str, int]] = []
    out = [dict(d) for d in detections]
    for i, (record, found) in enumerate(zip(records, out, strict=True)):
        threshold = COUNTING_THRESHOLD if record.tag == "counting" else THRESHOLD
        for name in sorted({c.cls for c in record.include if c.color is not None}):
            kept = keep_detections(found.get(name, ()), threshold)
            found[name] = kept
            for k, det in enumerate(kept):
                if det.color is None:
                    queries.append(ColorQuery(i, name, det))
                    slots.append((i, name, k))
    if queries:
        for (i, name, k), color in zip(slots, classifier(images, queries), strict=True):
            out[i][name][k] = dataclasses.replace(out[i][name][k], color=color)
    return out


def load_color_classifier(
    model: str, device: torch.device, dtype: str, batch_size: int = 16, reward: str = "geneval"
) -> ColorClassifier:
    """A :class:`ColorClassifier` on the process-wide CLIP model and tokenizer of ``model``, offline.

    The model is shared (:func:`flowrl.rewards.clip_common.load_clip_model`) with any other reward
    that loads the same weights on the same device and dtype (e.g. ``clipscore``).

    Args:
        model: Hub id (local cache only) or local folder holding a ``CLIPModel`` and its tokenizer.
        device: Where the model runs.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        batch_size: Crops per forward pass.
        reward: The reward's label, for error messages.

    Raises:
        ModelNotFoundError: The weights or tokenizer cannot be found offline; says how to fix,
            naming the ``clip_model`` field.
    """
    from flowrl.errors import ModelNotFoundError
    from flowrl.rewards.clip_common import load_clip_model, load_clip_tokenizer
    from flowrl.rewards.models import missing_model_message

    try:
        clip = load_clip_model(model, reward, device, dtype)
    except ModelNotFoundError:
        if Path(model).expanduser().exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
            raise
        # load_clip_model's message names the `model:` field; the CLIP model is `clip_model:` here.
        raise ModelNotFoundError(missing_model_message(model, reward, field="clip_model")) from None
    tokenizer = load_clip_tokenizer(model, reward, field="clip_model")
    return ColorClassifier(clip, tokenizer, batch_size=batch_size)
