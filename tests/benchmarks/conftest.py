"""Tests of the code under benchmarks/ (a folder of scripts, not a package): its modules import as
top-level names (`import study`), as the scripts beside them do."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
