"""flowrl/training/checkpoint.py: atomic files and checkpoint discovery, the one implementation the
trainer, `flowrl eval` and `flowrl export-lora` share."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowrl.errors import FlowrlError
from flowrl.training.checkpoint import (
    CHECKPOINTS, LATEST, STATE_FILE, checkpoint_epoch, folder_epoch, latest_checkpoint, remove_scratch, write_atomic,
)


def checkpoint(run: Path, epoch: int, complete: bool = True) -> Path:
    folder = run / CHECKPOINTS / f"epoch-{epoch}"
    folder.mkdir(parents=True)
    if complete:
        (folder / STATE_FILE).write_text(json.dumps({"epoch": epoch}))
    return folder


def test_write_atomic_replaces_the_file_and_leaves_no_scratch(tmp_path: Path):
    path = tmp_path / "pipeline.yaml"
    write_atomic(path, "a: 1\n")
    write_atomic(path, "a: 2\n")
    assert path.read_text() == "a: 2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline.yaml"]


def test_checkpoint_names():
    assert checkpoint_epoch("epoch-12") == 12
    assert [checkpoint_epoch(n) for n in ("epoch-", "epoch-1a", ".tmp-epoch-3", "latest")] == [None] * 4


def test_latest_trusts_a_pointer_to_a_complete_folder_and_scans_otherwise(tmp_path: Path):
    run = tmp_path / "run"
    assert latest_checkpoint(run) is None
    checkpoint(run, 3)
    five = checkpoint(run, 5)
    checkpoint(run, 7, complete=False)  # killed while written: never a resume point
    assert latest_checkpoint(run) == (5, five)
    (run / CHECKPOINTS / LATEST).write_text("epoch-3\n")
    assert latest_checkpoint(run) == (3, run / CHECKPOINTS / "epoch-3")  # the pointer wins when it is valid
    (run / CHECKPOINTS / LATEST).write_text("epoch-7\n")
    assert latest_checkpoint(run) == (5, five)  # it names an incomplete folder: scan


def test_folder_epoch_reads_the_state_then_the_name(tmp_path: Path):
    moved = tmp_path / "renamed"
    moved.mkdir()
    (moved / STATE_FILE).write_text(json.dumps({"epoch": 9}))
    assert folder_epoch(moved) == 9
    assert folder_epoch(checkpoint(tmp_path / "run", 4, complete=False)) == 4
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(FlowrlError, match="point TARGET at RUN/checkpoints/epoch-N"):
        folder_epoch(bare)


def test_remove_scratch_keeps_checkpoints(tmp_path: Path):
    root = tmp_path / CHECKPOINTS
    keep = checkpoint(tmp_path, 1)
    for name in (".tmp-epoch-2", ".old-epoch-1", ".trash-epoch-0-12"):
        (root / name).mkdir()
    (root / f".{LATEST}.tmp").write_text("epoch-2")
    remove_scratch(root)
    assert sorted(p.name for p in root.iterdir()) == [keep.name]
