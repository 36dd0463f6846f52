"""What every GenEval detector backend shares: the protocol, class names, image conversion.

A backend maps a batch of images to one ``{class name: [Detection, ...]}`` dict per image, the
mapping :func:`flowrl.rewards.geneval.judge` consumes. The class is the dict key (as the toy
``ShapesDetector`` does it), so :class:`~flowrl.rewards.geneval.Detection` needs no label field.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from flowrl.errors import FlowrlError
from flowrl.rewards.geneval.scoring import Detection

__all__ = [
    "COCO_RENAMES",
    "Detections",
    "Detector",
    "ShapesBackend",
    "bool_mask",
    "geneval_class_name",
    "geneval_class_names",
    "group_by_class",
    "to_uint8_levels",
]

Detections = dict[str, list[Detection]]
"""One image's detections: every class name of the detector -> its detections, best first."""


@runtime_checkable
class Detector(Protocol):
    """A GenEval detector backend.

    Attributes:
        class_names: The classes the detector can report, in label order; every returned dict has
            exactly these keys.
    """

    class_names: tuple[str, ...]

    def __call__(self, images: Tensor) -> list[Detections]:
        """Detect objects.

        Args:
            images: float [B, 3, H, W] in [0, 1], RGB.

        Returns:
            B dicts, each mapping every name of :attr:`class_names` to that class's detections
            (boxes in pixels of the input image, masks bool [H, W] where the backend has them),
            highest score first; empty lists for classes not found.
        """
        ...


COCO_RENAMES: Mapping[str, str] = {
    "mouse": "computer mouse",
    "remote": "tv remote",
    "keyboard": "computer keyboard",
}
"""COCO names that GenEval's ``object_names.txt`` spells differently (so CLIP prompts read well)."""

# Spellings of COCO classes found in other label maps (Pascal VOC style, panoptic, older configs).
_ALIASES: Mapping[str, str] = {
    "tvmonitor": "tv",
    "tv monitor": "tv",
    "television": "tv",
    "motorbike": "motorcycle",
    "aeroplane": "airplane",
    "sofa": "couch",
    "pottedplant": "potted plant",
    "diningtable": "dining table",
    "hair dryer": "hair drier",
    "cellphone": "cell phone",
    "mobile phone": "cell phone",
    "doughnut": "donut",
}


def geneval_class_name(name: str) -> str:
    """GenEval's name of a detector class label (``"mouse"`` -> ``"computer mouse"``).

    Lower-cases, turns ``_``/``-`` into spaces, folds a few alternative COCO spellings
    (``"tvmonitor"``, ``"diningtable"``, ...) and applies :data:`COCO_RENAMES`. Names already in
    GenEval's spelling come back unchanged.
    """
    key = " ".join(name.strip().lower().replace("_", " ").replace("-", " ").split())
    key = _ALIASES.get(key, _ALIASES.get(key.replace(" ", ""), key))
    return COCO_RENAMES.get(key, key)


def geneval_class_names(labels: Mapping[int, str] | Sequence[str], source: str) -> tuple[str, ...]:
    """GenEval class names of a detector's labels, in label-index order.

    Args:
        labels: ``id2label`` of a transformers model (``{0: "person", ...}``, int or str keys) or a
            list of names in label order (mmdet's ``CLASSES``).
        source: What the labels belong to, for error messages (a model id or config path).

    Returns:
        One GenEval name per label index ``0 .. n-1``.

    Raises:
        FlowrlError: Label indices are not ``0 .. n-1``, names are generic (``LABEL_0``), or two
            labels map to the same name.
    """
    if isinstance(labels, Mapping):
        try:
            by_index = {int(k): str(v) for k, v in labels.items()}
        except (TypeError, ValueError):
            raise FlowrlError(f"{source}: id2label keys must be integers, got {list(labels)[:5]}") from None
        if sorted(by_index) != list(range(len(by_index))):
            raise FlowrlError(
                f"{source}: label ids must be 0..{len(by_index) - 1} without gaps, got "
                f"{sorted(by_index)[:10]}...; fix the model config's id2label"
            )
        raw = [by_index[i] for i in range(len(by_index))]
    else:
        raw = [str(v) for v in labels]
    if not raw:
        raise FlowrlError(f"{source}: the detector declares no class labels; it needs COCO's 80 classes")
    generic = [n for n in raw if n.upper().startswith("LABEL_")]
    if generic:
        raise FlowrlError(
            f"{source}: class labels are generic ({generic[0]!r}, ...), so detections cannot be matched "
            "to GenEval's class names; set the model config's id2label to the COCO names in label order"
        )
    names = tuple(geneval_class_name(n) for n in raw)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise FlowrlError(f"{source}: several labels map to the same GenEval class name: {', '.join(dupes)}")
    return names


def group_by_class(
    class_names: Sequence[str], labels: Iterable[int], detections: Iterable[Detection]
) -> Detections:
    """Per-class lists of detections, each sorted by score (highest first, ties in input order).

    Args:
        class_names: Name of each label index.
        labels: Label index of each detection.
        detections: The detections, parallel to ``labels``.

    Returns:
        A dict with every name of ``class_names`` as a key (empty list when none was found).
    """
    out: Detections = {name: [] for name in class_names}
    for label, det in zip(labels, detections, strict=True):
        if not 0 <= label < len(class_names):
            raise ValueError(f"label {label} is outside the detector's {len(class_names)} classes")
        out[class_names[label]].append(det)
    for dets in out.values():
        dets.sort(key=lambda d: -d.score)
    return out


def to_uint8_levels(images: Tensor) -> Tensor:
    """float [B, 3, H, W] in [0, 1] -> float32 with integer values 0..255 (what an 8-bit PNG holds).

    GenEval scores saved PNGs; quantising here makes the in-memory path see the same pixels.
    """
    return (images.float().clamp(0, 1) * 255.0).round()


class ShapesBackend:
    """The toy shapes world's classical detector (:class:`flowrl.toy.detector.ShapesDetector`)
    behind the :class:`Detector` protocol. It reports colours itself, so needs no CLIP."""

    def __init__(self) -> None:
        from flowrl.toy.detector import ShapesDetector
        from flowrl.toy.world import SHAPES

        self.detector = ShapesDetector()
        self.class_names: tuple[str, ...] = tuple(SHAPES)

    def __call__(self, images: Tensor) -> list[Detections]:
        """See :meth:`Detector.__call__`; detections carry ``color`` already."""
        return self.detector(images)


def bool_mask(mask: object, where: str) -> np.ndarray:
    """A bool [H, W] numpy array from a numpy/torch mask of any integer/bool/float dtype (> 0.5)."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"{where}: expected a mask of shape [H, W], got shape {array.shape}")
    if array.dtype == np.bool_:
        return array
    return array > 0.5 if np.issubdtype(array.dtype, np.floating) else array != 0
