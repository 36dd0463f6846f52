"""GenEval's detector through transformers: Mask2Former (Swin-S, COCO instance) without mmdet.

GenEval runs mmdet 2.x's Mask2Former. This module runs the transformers port of the architecture
(``Mask2FormerForUniversalSegmentation``, default ``facebook/mask2former-swin-small-coco-instance``)
with mmdet's test-time pre- and post-processing re-implemented in torch, batched:

* **Pre-processing** (mmdet's test pipeline): 8-bit pixel levels; bilinear resize keeping the aspect
  ratio so the image fits (1333, 800) (long side <= 1333, short side <= 800, one of them equal);
  ImageNet mean/std in 0..255 units; zero padding (after normalisation) to a multiple of 32.
* **Post-processing** (mmdet's ``MaskFormerFusionHead.instance_postprocess``): class probabilities
  are a softmax over the 80 classes *and* the null class, the null column then dropped; the best
  ``max_detections`` (query, class) pairs are kept; each kept query's mask logits are upsampled to
  the padded input, cropped to the resized image and upsampled to the original size (bilinear);
  mask = logit > 0 (sigmoid > 0.5); mask score = mean sigmoid over the mask; score = class
  probability x mask score; box = tight box of the mask.

transformers' own ``post_process_instance_segmentation`` differs (a fixed 384x384 intermediate
size, a score threshold, overlap resolution), which is why it is not used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from flowrl.rewards.base import as_float_images
from flowrl.rewards.geneval.detectors.base import Detections, geneval_class_names, group_by_class, to_uint8_levels
from flowrl.rewards.geneval.scoring import Detection

__all__ = [
    "DEFAULT_MODEL",
    "MAX_DETECTIONS",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "SIZE_DIVISOR",
    "TEST_SCALE",
    "Mask2FormerDetector",
    "instance_detections",
    "load_mask2former",
    "mask_boxes",
    "padded_size",
    "preprocess",
    "rescaled_size",
    "select_queries",
    "upsample_mask_logits",
]

DEFAULT_MODEL = "facebook/mask2former-swin-small-coco-instance"
"""Same architecture as GenEval's mmdet checkpoint, different (Meta's own) weights."""

TEST_SCALE: tuple[int, int] = (1333, 800)
"""mmdet's test ``img_scale``: the long side fits 1333 and the short side 800, keeping the aspect."""

PIXEL_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
"""ImageNet mean, RGB, in 0..255 units."""

PIXEL_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)
"""ImageNet std, RGB, in 0..255 units."""

SIZE_DIVISOR = 32
"""Inputs are zero-padded (after normalisation) to a multiple of this, bottom and right."""

MAX_DETECTIONS = 100
"""mmdet's ``max_per_image`` for Mask2Former instance segmentation."""


def rescaled_size(height: int, width: int, scale: tuple[int, int] = TEST_SCALE) -> tuple[int, int]:
    """Size after mmcv's ``imrescale``: the largest aspect-keeping size fitting ``scale``.

    Args:
        height, width: The image's size.
        scale: Two edge limits in any order; the larger bounds the long side, the smaller the short.

    Returns:
        ``(new_height, new_width)``, each rounded half up, e.g. 512x512 -> 800x800 and
        480x640 -> 800x1067.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def padded_size(height: int, width: int, divisor: int = SIZE_DIVISOR) -> tuple[int, int]:
    """``(height, width)`` rounded up to multiples of ``divisor``."""
    return math.ceil(height / divisor) * divisor, math.ceil(width / divisor) * divisor


def preprocess(
    images: Tensor,
    scale: tuple[int, int] = TEST_SCALE,
    divisor: int = SIZE_DIVISOR,
    mean: Sequence[float] = PIXEL_MEAN,
    std: Sequence[float] = PIXEL_STD,
) -> tuple[Tensor, tuple[int, int]]:
    """mmdet's Mask2Former test pipeline for a batch of same-size images.

    Args:
        images: float [B, 3, H, W] in [0, 1], RGB.
        scale: See :func:`rescaled_size`.
        divisor: See :func:`padded_size`.
        mean, std: Per-channel normalisation in 0..255 units, RGB.

    Returns:
        ``pixel_values`` float32 [B, 3, Hp, Wp] (normalised, zero-padded bottom/right) and the
        resized size ``(h, w)`` before padding, with ``h <= Hp``, ``w <= Wp``.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    height, width = images.shape[-2:]
    size = rescaled_size(height, width, scale)
    levels = to_uint8_levels(images)
    if size != (height, width):
        # cv2's INTER_LINEAR on 8-bit images: half-pixel centres, no antialiasing, rounded output.
        levels = F.interpolate(levels, size=size, mode="bilinear", align_corners=False).round().clamp(0, 255)
    mean_t = torch.tensor(mean, dtype=levels.dtype, device=levels.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=levels.dtype, device=levels.device).view(1, 3, 1, 1)
    normalised = (levels - mean_t) / std_t
    pad_h, pad_w = padded_size(*size, divisor)
    pixel_values = F.pad(normalised, (0, pad_w - size[1], 0, pad_h - size[0]), value=0.0)
    return pixel_values, size


def select_queries(class_logits: Tensor, max_detections: int = MAX_DETECTIONS) -> tuple[Tensor, Tensor, Tensor]:
    """The best (query, class) pairs of one image by class probability.

    Args:
        class_logits: float [Q, K + 1], the model's ``class_queries_logits`` for one image; the
            last column is the null ("no object") class.
        max_detections: How many pairs to keep (fewer if ``Q * K`` is smaller).

    Returns:
        ``probs`` float [N], ``labels`` long [N] in ``0..K-1`` and ``queries`` long [N] in
        ``0..Q-1``, highest probability first (ties: lower flat index ``query * K + label`` first).
        A query can appear several times with different labels.
    """
    if class_logits.ndim != 2 or class_logits.shape[1] < 2:
        raise ValueError(f"class_logits must be [Q, K + 1] with K >= 1, got shape {tuple(class_logits.shape)}")
    num_classes = class_logits.shape[1] - 1
    # Softmax over the null class too, then drop it: a query that is probably "nothing" keeps low
    # probabilities for every real class (renormalising without it would inflate them).
    probs = class_logits.float().softmax(dim=-1)[:, :num_classes].flatten()
    k = min(max_detections, probs.numel())
    # A stable sort gives a deterministic order for ties, unlike topk.
    order = torch.sort(probs, descending=True, stable=True).indices[:k]
    return probs[order], order % num_classes, torch.div(order, num_classes, rounding_mode="floor")


def upsample_mask_logits(
    mask_logits: Tensor,
    image_size: tuple[int, int],
    input_size: tuple[int, int] | None = None,
    padded: tuple[int, int] | None = None,
) -> Tensor:
    """Mask logits at the model's output resolution -> logits at the original image's size.

    As mmdet does: bilinear upsampling to the padded input, crop of the padding, bilinear resize to
    the original size (``align_corners=False`` throughout).

    Args:
        mask_logits: float [N, h, w] (a quarter of the padded input for Mask2Former).
        image_size: ``(H, W)`` of the original image.
        input_size: ``(h_in, w_in)`` of the resized image inside the padded input; None when the
            model saw the image unresized and unpadded (then only the final resize happens).
        padded: ``(Hp, Wp)`` of the padded input; required with ``input_size``.

    Returns:
        float [N, H, W].
    """
    logits = mask_logits.float()[:, None]  # [N, 1, h, w]
    if input_size is not None:
        if padded is None:
            raise ValueError("upsample_mask_logits: give `padded` together with `input_size`")
        logits = F.interpolate(logits, size=padded, mode="bilinear", align_corners=False)
        logits = logits[..., : input_size[0], : input_size[1]]
    if tuple(logits.shape[-2:]) != tuple(image_size):
        logits = F.interpolate(logits, size=image_size, mode="bilinear", align_corners=False)
    return logits[:, 0]


def mask_boxes(masks: Tensor) -> Tensor:
    """Tight boxes of boolean masks, mmdet's ``mask2bbox``.

    Args:
        masks: bool [N, H, W].

    Returns:
        float32 [N, 4], ``(x1, y1, x2, y2)`` with ``x2 = last column + 1`` and ``y2 = last row + 1``;
        all zeros for an empty mask.
    """
    n, height, width = masks.shape
    cols = masks.any(dim=1)  # [N, W]
    rows = masks.any(dim=2)  # [N, H]
    # argmax of a 0/1 vector is its first 1; on the flipped vector it counts from the end.
    x1 = cols.int().argmax(dim=1)
    y1 = rows.int().argmax(dim=1)
    x2 = width - cols.flip(1).int().argmax(dim=1)
    y2 = height - rows.flip(1).int().argmax(dim=1)
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()
    empty = ~cols.any(dim=1)
    boxes[empty] = 0.0
    return boxes.reshape(n, 4)


def instance_detections(
    class_logits: Tensor,
    mask_logits: Tensor,
    class_names: Sequence[str],
    image_size: tuple[int, int],
    *,
    input_size: tuple[int, int] | None = None,
    padded: tuple[int, int] | None = None,
    max_detections: int = MAX_DETECTIONS,
    keep_above: float | None = None,
) -> Detections:
    """GenEval detections of one image from Mask2Former's raw outputs (mmdet's instance rule).

    Args:
        class_logits: float [Q, K + 1], last column the null class.
        mask_logits: float [Q, h, w], per-query mask logits (any resolution; see
            :func:`upsample_mask_logits` for ``input_size`` and ``padded``).
        class_names: K GenEval class names, in label order.
        image_size: ``(H, W)`` of the original image; masks and boxes are in its pixels.
        input_size: The resized image's size inside the padded model input, or None.
        padded: The padded model input's size, or None.
        max_detections: At most this many (query, class) pairs, the most probable.
        keep_above: If set, only detections scoring strictly above it are returned (GenEval never
            keeps a detection scoring at or below its lowest threshold, and masks are memory).

    Returns:
        Every class name -> its detections (bool masks [H, W], tight boxes), highest score first.
        Detections whose mask is empty (score exactly 0 in mmdet) are dropped.
    """
    if class_logits.shape[0] != mask_logits.shape[0]:
        raise ValueError(
            f"class_logits has {class_logits.shape[0]} queries but mask_logits has {mask_logits.shape[0]}"
        )
    if class_logits.shape[1] != len(class_names) + 1:
        raise ValueError(
            f"class_logits has {class_logits.shape[1]} columns, expected {len(class_names)} classes + 1 null "
            "class; the model's label count does not match its class names"
        )
    probs, labels, queries = select_queries(class_logits, max_detections)
    if queries.numel() == 0:
        return group_by_class(class_names, [], [])
    # Upsample each selected query once, even when it was selected for several classes.
    unique, inverse = torch.unique(queries, return_inverse=True)
    logits = upsample_mask_logits(mask_logits[unique], image_size, input_size, padded)  # [U, H, W]
    binary = logits > 0  # sigmoid > 0.5
    area = binary.flatten(1).sum(1)
    mask_score = (logits.sigmoid() * binary).flatten(1).sum(1) / area.clamp(min=1)
    boxes = mask_boxes(binary)
    scores = (probs * mask_score[inverse]).clamp(0.0, 1.0)
    keep = area[inverse] > 0
    if keep_above is not None:
        keep &= scores > keep_above
    kept = torch.nonzero(keep).flatten().tolist()
    which = inverse.tolist()
    # Only the masks of kept detections leave the device (one copy per query, shared across labels).
    masks_np = {u: binary[u].cpu().numpy() for u in sorted({which[j] for j in kept})}
    boxes_l, scores_l, labels_l = boxes.tolist(), scores.tolist(), labels.tolist()
    detections = [Detection(box=tuple(boxes_l[which[j]]), score=scores_l[j], mask=masks_np[which[j]]) for j in kept]
    return group_by_class(class_names, [labels_l[j] for j in kept], detections)


class Mask2FormerDetector:
    """A transformers Mask2Former behind the GenEval :class:`~.base.Detector` protocol.

    Args:
        model: A ``Mask2FormerForUniversalSegmentation`` (or any module whose output has
            ``class_queries_logits`` [B, Q, K+1] and ``masks_queries_logits`` [B, Q, h, w]).
        class_names: K GenEval class names in label order (see :func:`load_mask2former`).
        device: Where the model runs.
        dtype: The model's compute dtype; post-processing is always float32.
        batch_size: Images per forward pass.
        max_detections: See :func:`instance_detections`.
        keep_above: See :func:`instance_detections`.
        scale, size_divisor: See :func:`preprocess`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        class_names: Sequence[str],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
        max_detections: int = MAX_DETECTIONS,
        keep_above: float | None = None,
        scale: tuple[int, int] = TEST_SCALE,
        size_divisor: int = SIZE_DIVISOR,
    ) -> None:
        self.model = model
        self.class_names: tuple[str, ...] = tuple(class_names)
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size
        self.max_detections = max_detections
        self.keep_above = keep_above
        self.scale = scale
        self.size_divisor = size_divisor

    @torch.inference_mode()
    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """One forward pass: pixel_values float [B, 3, Hp, Wp] -> (class logits [B, Q, K+1],
        mask logits [B, Q, h, w]), both float32 on the model's device."""
        out = self.model(pixel_values=pixel_values.to(self.device, self.dtype))
        return out.class_queries_logits.float(), out.masks_queries_logits.float()

    def __call__(self, images: Tensor) -> list[Detections]:
        """Detections of a batch, see :meth:`~.base.Detector.__call__` (no colours: CLIP adds them)."""
        images = as_float_images(images)
        height, width = images.shape[-2:]
        results: list[Detections] = []
        for chunk in images.split(self.batch_size):
            # Resizing 16 images to ~800x1333 is worth doing on the accelerator.
            pixel_values, input_size = preprocess(chunk.to(self.device), self.scale, self.size_divisor)
            class_logits, mask_logits = self.forward(pixel_values)
            for b in range(chunk.shape[0]):
                results.append(
                    instance_detections(
                        class_logits[b],
                        mask_logits[b],
                        self.class_names,
                        (height, width),
                        input_size=input_size,
                        padded=tuple(pixel_values.shape[-2:]),
                        max_detections=self.max_detections,
                        keep_above=self.keep_above,
                    )
                )
        return results


def load_mask2former(
    model: str, device: torch.device, dtype: torch.dtype, reward: str = "geneval"
) -> tuple[torch.nn.Module, tuple[str, ...]]:
    """Load a transformers Mask2Former offline and its GenEval class names.

    Args:
        model: Hub id (looked up in the local cache only) or local folder.
        device, dtype: Where and in what dtype the model runs.
        reward: The reward's label, for error messages.

    Returns:
        The model in eval mode and one GenEval class name per label (``mouse`` -> ``computer
        mouse``, ...).

    Raises:
        ModelNotFoundError: The weights are neither a local folder nor in the Hugging Face cache.
        FlowrlError: The model's labels cannot be mapped to GenEval class names.
    """
    from transformers import Mask2FormerForUniversalSegmentation

    from flowrl.rewards.models import load_pretrained

    net = load_pretrained(Mask2FormerForUniversalSegmentation.from_pretrained, model, reward)
    class_names = geneval_class_names(net.config.id2label, f"detector model {model!r}")
    return net.to(device=device, dtype=dtype).eval(), class_names
