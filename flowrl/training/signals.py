"""SIGTERM / SIGINT during training: the first finishes the epoch and checkpoints, the second aborts."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

# ------------------------------------------------------------------------------------- signals


class StopSignals:
    """While active, the first SIGTERM or SIGINT asks the trainer to stop after the current epoch
    (it is checkpointed first); a second one ends the process at once by that signal. An abort is
    safe because every file a resume reads is written atomically.

    Attributes:
        requested: the name of the first signal received ("SIGTERM"), or None.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            os.write(2, f"\n{name} again: aborting now; the last complete checkpoint is intact\n".encode())
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = name
        self.log(f"{name} received: finishing the current epoch, then writing a checkpoint (send it again to abort at once)")
