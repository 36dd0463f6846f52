"""Files that survive a kill, and finding the checkpoints of a run (the one implementation that the
trainer, `flowrl eval` and `flowrl export-lora` share).

A run folder holds ``checkpoints/epoch-N/`` (complete checkpoints: the trainer writes each into a
dot-named temporary folder and renames it, ``trainer_state.json`` last) and ``checkpoints/latest``
(the name of the newest one). Every file a resume reads is replaced atomically (`write_atomic`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from flowrl.errors import FlowrlError

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
#: File in CHECKPOINTS naming the newest complete checkpoint folder, e.g. "epoch-12".
LATEST = "latest"
#: Prefixes of the scratch entries a checkpoint write leaves behind only when it is killed.
SCRATCH = (".tmp-", ".old-", ".trash-", f".{LATEST}.tmp")


def fsync_path(path: Path) -> None:
    """Flush a file (its bytes) or a folder (its entries) to the disk, where the OS allows it."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # folders cannot be opened on some platforms (Windows); nothing to flush there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` by `text` so that a reader (or a kill) sees the old or the new file, never a
    torn one: write a temporary sibling, fsync it, rename it over `path`, fsync the folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def remove_tree(path: Path) -> None:
    """Delete a folder without ever leaving a half-deleted folder under its name: rename it to a
    scratch name first (atomic), then delete that."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_scratch(root: Path) -> None:
    """Delete what killed checkpoint writes left in `root` (dot-named, never read by a resume)."""
    for entry in root.iterdir():
        if entry.name.startswith(SCRATCH):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def checkpoint_epoch(name: str) -> int | None:
    """'epoch-12' -> 12; anything else -> None."""
    match = re.fullmatch(r"epoch-(\d+)", name)
    return int(match.group(1)) if match else None


def is_complete(folder: Path) -> bool:
    """Whether a checkpoint folder was written to the end (its trainer state is written last)."""
    return (folder / STATE_FILE).is_file()


def folder_epoch(folder: Path) -> int:
    """The epoch of a checkpoint folder: its trainer state's, else its epoch-N name's.

    Raises:
        FlowrlError: neither tells (a renamed folder without a readable trainer_state.json).
    """
    state = folder / STATE_FILE
    if state.is_file():
        try:
            return int(json.loads(state.read_text())["epoch"])
        except (ValueError, KeyError, TypeError):
            pass
    epoch = checkpoint_epoch(folder.name)
    if epoch is None:
        raise FlowrlError(
            f"cannot tell the epoch of checkpoint {folder}: no readable {STATE_FILE} and the folder is "
            "not named epoch-N; point TARGET at RUN/checkpoints/epoch-N as the trainer wrote it"
        )
    return epoch


def latest_checkpoint(run: Path) -> tuple[int, Path] | None:
    """(epoch, folder) of the newest complete checkpoint of a run folder.

    The `checkpoints/latest` pointer is trusted when it names a complete folder; otherwise (an
    older run, a deleted folder, a hand-edited pointer) the folders themselves are scanned.
    """
    root = Path(run) / CHECKPOINTS
    pointed = pointed_checkpoint(root)
    if pointed is not None:
        return pointed
    found = []
    for p in root.glob("epoch-*"):
        epoch = checkpoint_epoch(p.name)
        if epoch is not None and is_complete(p):
            found.append((epoch, p))
    return max(found) if found else None


def pointed_checkpoint(root: Path) -> tuple[int, Path] | None:
    """(epoch, folder) named by `root/latest` if that folder is a complete checkpoint, else None."""
    try:
        name = (root / LATEST).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    epoch = checkpoint_epoch(name)
    if epoch is None or not is_complete(root / name):
        return None
    return epoch, root / name
