"""GenEval's official detector through mmdet (optional extra ``flowrl[mmdet]``).

GenEval itself runs mmdet 2.x with the checkpoint ``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco``.
This backend calls mmdet's own ``init_detector`` / ``inference_detector`` and converts their
results into GenEval detections, so scores match the official evaluation up to the PNG round trip
(images are passed as 8-bit arrays in mmcv's BGR order, exactly what ``mmcv.imread`` returns).

Two result formats are understood:

* mmdet 2.x: a tuple ``(bbox_results, segm_results)``; ``bbox_results[c]`` is a float array
  [N_c, 5] of ``(x1, y1, x2, y2, score)`` for class ``c`` and ``segm_results[c]`` a list of N_c
  bool masks [H, W] (a bare ``bbox_results`` list for box-only models).
* mmdet 3.x: a ``DetDataSample`` whose ``pred_instances`` has ``bboxes`` [N, 4], ``scores`` [N],
  ``labels`` [N] and optionally ``masks`` [N, H, W] (torch tensors or numpy arrays).

mmdet needs mmcv's compiled ops and cannot be installed everywhere; the converters here are plain
numpy and always importable, and only :func:`load_mmdet` imports mmdet.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowrl.errors import FlowrlError, ModelNotFoundError
from flowrl.rewards.base import as_float_images
from flowrl.rewards.geneval.detectors.base import (
    Detections,
    bool_mask,
    geneval_class_names,
    group_by_class,
    to_uint8_levels,
)
from flowrl.rewards.geneval.scoring import Detection

__all__ = [
    "MMDET_INSTALL_HINT",
    "MMDetDetector",
    "detections_from_mmdet",
    "detections_from_mmdet2",
    "detections_from_mmdet3",
    "load_mmdet",
    "to_bgr_uint8",
]

MMDET_INSTALL_HINT = (
    "install the optional extra with `pip install 'flowrl[mmdet]'` (mmdet 2.x). Mask2Former needs "
    "mmcv's compiled ops (MultiScaleDeformableAttention), i.e. the full mmcv 1.x package `mmcv-full`, "
    "not the ops-free `mmcv` 1.x: install it with `pip install -U openmim && mim install 'mmcv-full>=1.7,<2'`, "
    "which finds a prebuilt wheel only for some torch/CUDA pairs and otherwise compiles from source "
    "(needs a CUDA toolkit matching torch; see mmcv's installation docs). A separate environment "
    "with the versions GenEval pins is often easiest. Or use `backend: hf-mask2former`, which needs "
    "no extra"
)


def _numpy(x: Any) -> np.ndarray:
    """A numpy view of a numpy array, torch tensor or nested sequence."""
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _detection(box: np.ndarray, score: float, mask: np.ndarray | None) -> Detection:
    # float32 products can land a hair outside [0, 1]; Detection rightly refuses that.
    return Detection(box=tuple(float(v) for v in box), score=float(np.clip(score, 0.0, 1.0)), mask=mask)


def detections_from_mmdet2(
    result: Any, class_names: Sequence[str], keep_above: float | None = None
) -> Detections:
    """GenEval detections from mmdet 2.x's ``inference_detector`` result for one image.

    Args:
        result: ``(bbox_results, segm_results)`` or a bare ``bbox_results``; ``bbox_results`` is a
            list with one float array [N_c, 5] (x1, y1, x2, y2, score) per class, ``segm_results``
            a list with one list of N_c masks [H, W] per class (or None).
        class_names: GenEval class name of each class index (same length as ``bbox_results``).
        keep_above: If set, only detections scoring strictly above it are returned.

    Returns:
        Every class name -> its detections (with masks when ``segm_results`` has them), highest
        score first.

    Raises:
        ValueError: The result does not have this layout (with what was found).
    """
    if isinstance(result, tuple):
        if not 1 <= len(result) <= 2:
            raise ValueError(f"mmdet 2.x result tuple must be (bbox_results, segm_results), got {len(result)} items")
        bbox_results = result[0]
        segm_results = result[1] if len(result) == 2 else None
    else:
        bbox_results, segm_results = result, None
    if isinstance(segm_results, tuple):  # some heads return (masks, mask_scores)
        segm_results = segm_results[0]
    if len(bbox_results) != len(class_names):
        raise ValueError(
            f"mmdet result has {len(bbox_results)} classes but the detector declares {len(class_names)} class "
            "names; the model's CLASSES must list one name per output class"
        )
    if segm_results is not None and len(segm_results) != len(bbox_results):
        raise ValueError(f"mmdet result has {len(bbox_results)} bbox classes but {len(segm_results)} mask classes")
    labels, detections = [], []
    for c, boxes in enumerate(bbox_results):
        boxes = _numpy(boxes).reshape(-1, 5)
        masks = None if segm_results is None else segm_results[c]
        if masks is not None and len(masks) != len(boxes):
            raise ValueError(f"class {class_names[c]!r}: {len(boxes)} boxes but {len(masks)} masks")
        for i, row in enumerate(boxes):
            if keep_above is not None and not row[4] > keep_above:
                continue
            mask = None
            if masks is not None:
                if isinstance(masks[i], dict):
                    raise ValueError(
                        "mmdet returned RLE-encoded masks; decode them with pycocotools.mask.decode before "
                        "converting, or use a config whose test_cfg does not encode masks"
                    )
                mask = bool_mask(masks[i], f"class {class_names[c]!r} mask {i}")
            labels.append(c)
            detections.append(_detection(row[:4], row[4], mask))
    return group_by_class(class_names, labels, detections)


def detections_from_mmdet3(
    sample: Any, class_names: Sequence[str], keep_above: float | None = None
) -> Detections:
    """GenEval detections from mmdet 3.x's ``inference_detector`` result for one image.

    Args:
        sample: A ``DetDataSample`` (anything with ``pred_instances``) or the ``pred_instances``
            themselves: ``bboxes`` [N, 4] (x1, y1, x2, y2), ``scores`` [N], ``labels`` [N] and
            optionally ``masks`` [N, H, W] (bool), as torch tensors or numpy arrays.
        class_names: GenEval class name of each label index.
        keep_above: If set, only detections scoring strictly above it are returned.

    Returns:
        Every class name -> its detections, highest score first.
    """
    inst = getattr(sample, "pred_instances", sample)
    missing = [k for k in ("bboxes", "scores", "labels") if not hasattr(inst, k)]
    if missing:
        raise ValueError(
            f"mmdet 3.x pred_instances lacks {', '.join(missing)}; expected a DetDataSample from "
            "mmdet.apis.inference_detector"
        )
    bboxes = _numpy(inst.bboxes).reshape(-1, 4)
    scores = _numpy(inst.scores).reshape(-1)
    labels = _numpy(inst.labels).reshape(-1).astype(np.int64)
    masks = _numpy(inst.masks) if getattr(inst, "masks", None) is not None else None
    if not len(bboxes) == len(scores) == len(labels) or (masks is not None and len(masks) != len(bboxes)):
        raise ValueError(
            f"mmdet 3.x pred_instances fields disagree in length: {len(bboxes)} bboxes, {len(scores)} scores, "
            f"{len(labels)} labels" + ("" if masks is None else f", {len(masks)} masks")
        )
    keep_labels, detections = [], []
    for i in range(len(bboxes)):
        if keep_above is not None and not scores[i] > keep_above:
            continue
        mask = None if masks is None else bool_mask(masks[i], f"instance {i} mask")
        keep_labels.append(int(labels[i]))
        detections.append(_detection(bboxes[i], scores[i], mask))
    return group_by_class(class_names, keep_labels, detections)


def detections_from_mmdet(result: Any, class_names: Sequence[str], keep_above: float | None = None) -> Detections:
    """Either format: mmdet 3.x's ``DetDataSample`` or mmdet 2.x's tuple/list (see the module doc)."""
    if hasattr(result, "pred_instances"):
        return detections_from_mmdet3(result, class_names, keep_above)
    if isinstance(result, (tuple, list)):
        return detections_from_mmdet2(result, class_names, keep_above)
    raise ValueError(
        f"unrecognised mmdet result of type {type(result).__name__}; expected mmdet 2.x's "
        "(bbox_results, segm_results) tuple or mmdet 3.x's DetDataSample"
    )


def to_bgr_uint8(images: Tensor) -> list[np.ndarray]:
    """float [B, 3, H, W] in [0, 1] RGB -> B uint8 arrays [H, W, 3] in BGR order (``mmcv.imread``'s)."""
    levels = to_uint8_levels(images).to(torch.uint8)
    return [np.ascontiguousarray(im.permute(1, 2, 0).flip(-1).numpy()) for im in levels]


class MMDetDetector:
    """An mmdet detector behind the GenEval :class:`~.base.Detector` protocol.

    Args:
        model: The model from ``mmdet.apis.init_detector``.
        infer: ``mmdet.apis.inference_detector`` (``infer(model, [bgr arrays])`` -> one result each).
        class_names: GenEval class name of each label index.
        batch_size: Images per ``infer`` call.
        keep_above: See :func:`detections_from_mmdet2`.
    """

    def __init__(
        self,
        model: Any,
        infer: Callable[[Any, list[np.ndarray]], Sequence[Any]],
        class_names: Sequence[str],
        *,
        batch_size: int = 16,
        keep_above: float | None = None,
    ) -> None:
        self.model = model
        self.infer = infer
        self.class_names: tuple[str, ...] = tuple(class_names)
        self.batch_size = batch_size
        self.keep_above = keep_above

    def __call__(self, images: Tensor) -> list[Detections]:
        """Detections of a batch, see :meth:`~.base.Detector.__call__` (no colours: CLIP adds them)."""
        arrays = to_bgr_uint8(as_float_images(images))
        out: list[Detections] = []
        for start in range(0, len(arrays), self.batch_size):
            chunk = arrays[start : start + self.batch_size]
            results = self.infer(self.model, chunk)
            if len(results) != len(chunk):
                raise ValueError(f"mmdet returned {len(results)} results for {len(chunk)} images")
            out += [detections_from_mmdet(r, self.class_names, self.keep_above) for r in results]
        return out


def _model_classes(model: Any) -> Sequence[str] | None:
    """Class names an mmdet model carries: ``CLASSES`` (2.x) or ``dataset_meta['classes']`` (3.x)."""
    names = getattr(model, "CLASSES", None)
    if names is None:
        names = (getattr(model, "dataset_meta", None) or {}).get("classes")
    return names


def load_mmdet(config: str, checkpoint: str, device: torch.device) -> tuple[Any, Callable, tuple[str, ...]]:
    """Build an mmdet detector from a local config and checkpoint.

    Args:
        config: Path of the mmdet config (``.py``), e.g. GenEval's
            ``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py``.
        checkpoint: Path of the weights (``.pth``); never downloaded here.
        device: Where the model runs.

    Returns:
        The model, ``inference_detector`` and the GenEval class names of its labels.

    Raises:
        FlowrlError: mmdet (or mmcv's ops) is not installed, naming the extra and the mmcv build
            requirement; or the model declares no class names.
        ModelNotFoundError: The config or checkpoint file does not exist.
    """
    for label, path in (("detector_config", config), ("detector_checkpoint", checkpoint)):
        if not Path(path).expanduser().is_file():
            raise ModelNotFoundError(
                f"geneval mmdet backend: {label} {path} is not a file. flowrl never downloads weights; get "
                "GenEval's detector with `mim download mmdet --config mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco "
                "--dest <folder>` on a machine with network and point detector_config / detector_checkpoint at "
                "the .py and .pth it writes"
            )
    try:
        from mmdet.apis import inference_detector, init_detector
    except ImportError as err:
        raise FlowrlError(f"the geneval reward's mmdet backend needs mmdet, which cannot be imported ({err}); "
                          f"{MMDET_INSTALL_HINT}") from None
    try:
        model = init_detector(str(Path(config).expanduser()), str(Path(checkpoint).expanduser()), device=str(device))
    except ImportError as err:  # mmcv without compiled ops fails here, not at import
        raise FlowrlError(f"mmdet is installed but cannot build the detector ({err}); {MMDET_INSTALL_HINT}") from None
    names = _model_classes(model)
    if not names:
        raise FlowrlError(
            f"mmdet model from {config} declares no class names (neither CLASSES nor dataset_meta['classes']); "
            "use a checkpoint saved with its class names, as the official COCO checkpoints are"
        )
    return model, inference_detector, geneval_class_names(list(names), f"mmdet config {config}")
