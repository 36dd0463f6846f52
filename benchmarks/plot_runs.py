"""Plot several training runs side by side: eval score, train reward and KL to the reference vs epochs.

    .venv/bin/python benchmarks/plot_runs.py "beta 0=runs/a" "beta 1e-2=runs/b" --out docs/cmp.png

Each argument is LABEL=RUN_FOLDER (or LABEL=path/to/metrics.jsonl), split at its last "=".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flowrl.plots import plot_runs


def parse_run(arg: str) -> tuple[str, Path]:
    """'LABEL=PATH' -> (label, metrics.jsonl path); exits 2 with the fix on a bad argument."""
    label, sep, path = arg.rpartition("=")
    if not sep or not label or not path:
        sys.exit(f"plot_runs: {arg!r}: expected LABEL=RUN_FOLDER, e.g. 'beta 1e-2=runs/kl'")
    p = Path(path)
    metrics = p / "metrics.jsonl" if p.is_dir() else p
    if not metrics.is_file():
        sys.exit(f"plot_runs: no metrics.jsonl at {metrics}; pass a run folder written by `flowrl train`")
    return label, metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="LABEL=RUN_FOLDER")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    ap.add_argument("--eval-key", default="eval/geneval")
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)
    out = plot_runs([parse_run(a) for a in args.runs], args.out, args.eval_key, args.title)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
