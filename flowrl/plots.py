"""Reward curves as PNG files (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl file (blank lines skipped)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (imported on first use: it is slow to load)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(metrics_path: Path, out_png: Path, title: str = "") -> Path:
    """Plot train reward and every headline eval metric against epoch and wall-clock time.

    The x axis of the time panel is cumulative training time (sum of time/epoch_s), so evals do not
    count as training.
    """
    plt = pyplot()

    rows = read_metrics(metrics_path)
    train = [r for r in rows if r["epoch"] >= 0 and "reward/mean" in r]
    clock, elapsed = {}, 0.0
    for r in sorted(train, key=lambda r: r["epoch"]):
        elapsed += r.get("time/epoch_s", 0.0)
        clock[r["epoch"]] = elapsed / 60
    clock[-1] = 0.0
    eval_keys = sorted({k for r in rows for k in r if k.startswith("eval/") and k.count("/") == 1})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, xkey in zip(axes, ("epoch", "minutes")):
        def xs(rs):
            return [r["epoch"] + 1 if xkey == "epoch" else clock.get(r["epoch"], float("nan")) for r in rs]

        ax.plot(xs(train), [r["reward/mean"] for r in train], lw=1, alpha=0.6, label="train reward (mean)")
        for key in eval_keys:
            ev = [r for r in rows if key in r]
            ax.plot(xs(ev), [r[key] for r in ev], marker="o", lw=2, label=key)
        ax.set_xlabel("epochs" if xkey == "epoch" else "training minutes")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("score")
    axes[0].legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, out_png)


def plot_runs(runs: list[tuple[str, Path]], out_png: Path, eval_key: str = "eval/geneval", title: str = "") -> Path:
    """Compare runs side by side against epochs: eval score, train reward and KL to the reference.

    Args:
        runs: (label, metrics.jsonl path) per run, one colour each.
        eval_key: the eval metric of the first panel.
    A run without a KL term (no `train/kl`, or only zeros: the trainer logs 0 when beta is 0) leaves
    the third panel empty for its colour.
    """
    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    panels = ((eval_key, "o", 2.0), ("reward/mean", None, 1.0), ("train/kl", None, 1.0))
    for i, (label, path) in enumerate(runs):
        rows = read_metrics(path)
        for ax, (key, marker, lw) in zip(axes, panels):
            have = [r for r in rows if key in r]
            if key == "train/kl" and not any(r[key] for r in have):
                continue
            ax.plot([r["epoch"] + 1 for r in have], [r[key] for r in have], color=f"C{i}", marker=marker, lw=lw, label=label)
    for ax, (key, _, _) in zip(axes, panels):
        ax.set_xlabel("epochs")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[2].set_yscale("symlog", linthresh=0.1)
    axes[0].legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, out_png)


def save_figure(fig, out_png: str | Path) -> Path:
    """Write a matplotlib figure as a PNG (parent folders created) and free it."""
    import matplotlib.pyplot as plt

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
