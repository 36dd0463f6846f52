"""GenEval detector backends: images [B, 3, H, W] in [0, 1] -> per-class Detections per image.

* ``shapes`` (:class:`ShapesBackend`): the embedded toy world's classical detector; reports colours.
* ``hf-mask2former`` (:mod:`.mask2former`): Mask2Former Swin-S through transformers with mmdet's
  test pipeline re-implemented in torch; no extra dependency.
* ``mmdet`` (:mod:`.mmdet_adapter`): GenEval's own mmdet 2.x detector (optional extra).

The neural backends leave ``Detection.color`` empty; :mod:`flowrl.rewards.geneval.colors` fills it
in for the objects that colour clauses inspect.
"""

from __future__ import annotations

from flowrl.rewards.geneval.detectors.base import (
    COCO_RENAMES,
    Detections,
    Detector,
    ShapesBackend,
    geneval_class_name,
    geneval_class_names,
)
from flowrl.rewards.geneval.detectors.mask2former import Mask2FormerDetector, instance_detections, load_mask2former
from flowrl.rewards.geneval.detectors.mmdet_adapter import (
    MMDetDetector,
    detections_from_mmdet,
    detections_from_mmdet2,
    detections_from_mmdet3,
    load_mmdet,
)

__all__ = [
    "COCO_RENAMES",
    "Detections",
    "Detector",
    "MMDetDetector",
    "Mask2FormerDetector",
    "ShapesBackend",
    "detections_from_mmdet",
    "detections_from_mmdet2",
    "detections_from_mmdet3",
    "geneval_class_name",
    "geneval_class_names",
    "instance_detections",
    "load_mask2former",
    "load_mmdet",
]
