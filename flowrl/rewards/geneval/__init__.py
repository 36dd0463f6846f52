"""GenEval: prompt metadata, detector-agnostic strict scoring and the dense training reward.

Typical use::

    from flowrl.rewards.geneval import Detection, judge, load_metadata

    records = load_metadata("evaluation_metadata.jsonl")
    j = judge(records[0], {"bench": [Detection(box=(10, 20, 200, 180), score=0.97)]})
    j.correct  # GenEval's official strict verdict
    j.score    # dense training reward (FlowGRPO form)

The rules are those of ``../shared/reference/REWARDS.md``, section "GenEval".
"""

from __future__ import annotations

from flowrl.rewards.geneval.metadata import (
    COLORS,
    RELATIONS,
    TAGS,
    Clause,
    MetadataError,
    PromptRecord,
    load_metadata,
    parse_record,
    write_metadata,
)
from flowrl.rewards.geneval.scoring import (
    COUNTING_THRESHOLD,
    MAX_OBJECTS,
    POSITION_THRESHOLD,
    THRESHOLD,
    Detection,
    Judgement,
    judge,
    keep_detections,
    relative_position,
)
from flowrl.rewards.geneval.summary import GenEvalSummary, summarize

__all__ = [
    "COLORS",
    "COUNTING_THRESHOLD",
    "MAX_OBJECTS",
    "POSITION_THRESHOLD",
    "RELATIONS",
    "TAGS",
    "THRESHOLD",
    "Clause",
    "Detection",
    "GenEvalSummary",
    "Judgement",
    "MetadataError",
    "PromptRecord",
    "judge",
    "keep_detections",
    "load_metadata",
    "parse_record",
    "relative_position",
    "summarize",
    "write_metadata",
]
