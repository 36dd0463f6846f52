"""Progress display: rich bars on a terminal, plain periodic lines otherwise (logs, CI)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def _is_tty() -> bool:
    return sys.stderr.isatty()


@contextmanager
def count_progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    """Yields `advance(n)`; shows a rich bar on a TTY and a line per ~10% otherwise."""
    if _is_tty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True) as bar:
            task = bar.add_task(label, total=total)
            yield lambda n: bar.advance(task, n)
        return
    done, next_report, start = 0, 0.0, time.perf_counter()

    def advance(n: int) -> None:
        nonlocal done, next_report
        done += n
        if done / max(total, 1) >= next_report or done == total:
            print(f"{label}: {done}/{total} ({time.perf_counter() - start:.0f}s)", file=sys.stderr, flush=True)
            next_report = done / max(total, 1) + 0.1

    yield advance


class PhaseProgress:
    """Progress of a multi-phase job reporting `(phase, step, total, values)`; used as a context."""

    def __init__(self) -> None:
        self._bar = None
        self._tasks: dict[str, int] = {}
        self._start = time.perf_counter()

    def __enter__(self) -> PhaseProgress:
        if _is_tty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def update(self, phase: str, step: int, total: int, values: dict) -> None:
        info = " ".join(f"{k}={v:.4f}" for k, v in values.items())
        if self._bar is None:
            if step % 100 == 0 or step == total - 1:
                print(f"[{time.perf_counter() - self._start:7.1f}s] {phase} {step + 1}/{total} {info}", file=sys.stderr, flush=True)
            return
        if phase not in self._tasks:
            self._tasks[phase] = self._bar.add_task(phase, total=total, info="")
        self._bar.update(self._tasks[phase], completed=step + 1, info=info)
