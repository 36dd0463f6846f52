"""How much of a policy-gradient estimate is signal? Splits the trainer's own gradient into signal,
rollout noise and estimator noise, for variants of a pipeline compared side by side.

For each variant, R rollout batches (the trainer's epochs 0..R-1: same prompts and seeds for every
variant with the same sampler) each get D gradient estimates that differ only in the estimator's
noise (another (t, eps) draw). With g = s + n_rollout + n_estimator (independent, zero-mean noise):

    cos(same rollout, other estimator noise) ~ (|s|^2 + |n_r|^2) / |g|^2
    cos(other rollouts)                      ~ |s|^2 / |g|^2

so the signal's share of the gradient's energy is the cross-rollout cosine, rollout noise the
difference, estimator noise the rest. A share f at N images per step is a per-image SNR of
f / ((1 - f) N); dividing by the seconds per image of the step gives SNR per second of compute,
the number that says which variant learns fastest for the same compute (the signal directions of
variants with other weightings differ, so compare shares of the same kind of estimate).

Usage::

    .venv/bin/python benchmarks/grad_snr.py pipelines/toy-geneval.yaml \
        --variant base= --variant per-image=estimator.noise=per-image --rollouts 3 --draws 2

Each --variant is NAME=OVERRIDE[,OVERRIDE...] (overrides as on `flowrl train`; empty: the pipeline
itself). --checkpoint DIR loads a run's policy and old adapters first (the gradient at a trained
point, not at the LoRA's zero initialisation). Writes a Markdown table to --out (and prints it).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402


@dataclass(frozen=True)
class Split:
    """Energy shares of a gradient estimate (they sum to 1) and the cost of one estimate."""

    signal: float
    rollout: float
    estimator: float
    n_images: int
    seconds: float  # of one gradient estimate (training terms only)
    rollout_seconds: float  # of sampling and scoring one batch

    @property
    def snr_per_image(self) -> float:
        return self.signal / max(1e-12, 1 - self.signal) / self.n_images

    @property
    def snr_per_second(self) -> float:
        per_image_s = (self.seconds + self.rollout_seconds) / self.n_images
        return self.snr_per_image / per_image_s


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-30))


def split_energy(grads: list[list[torch.Tensor]]) -> tuple[float, float, float]:
    """(signal, rollout noise, estimator noise) shares from grads[r][d] (rollout r, draw d).

    Needs at least 2 rollouts and 2 draws per rollout. Cosines are averaged over all pairs.
    """
    same = [cosine(g[i], g[j]) for g in grads for i, j in itertools.combinations(range(len(g)), 2)]
    cross = [cosine(a, b) for ga, gb in itertools.combinations(grads, 2) for a in ga for b in gb]
    c_same, c_cross = float(np.mean(same)), float(np.mean(cross))
    return c_cross, c_same - c_cross, 1 - c_same


def flat_grad(params) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().clone() for p in params])


def measure(pipeline_path: str, overrides: list[str], rollouts: int, draws: int, checkpoint: Path | None, log=print) -> Split:
    from safetensors.torch import load_file

    from flowrl.config import load_pipeline
    from flowrl.distributed import init_world
    from flowrl.train import Trainer, derive_seed, group_order

    p = load_pipeline(pipeline_path, [*overrides, "optimizer.grad_clip=1e9", "train.steps_per_epoch=1"])
    trainer = Trainer(p, out=Path("/nonexistent-grad-snr"), log=lambda s: None)
    trainer.world = init_world()
    trainer._setup()
    c = trainer.cfg
    if checkpoint is not None:
        for name in ("policy", "old", "ema"):
            trainer.policy.load_adapter_state(name, load_file(checkpoint / f"{name}.safetensors"))
    params = trainer.policy.trainable_parameters()
    grads, t_train, t_roll = [], [], []
    for epoch in range(rollouts):
        t0 = time.perf_counter()
        batch = trainer._pick_prompts(epoch)
        order = group_order(batch.group_ids, torch.Generator().manual_seed(derive_seed(c.train.seed, epoch, 3)))
        rollout = trainer.sample(batch, torch.arange(len(batch.prompts)), epoch)
        adv, metrics, _ = trainer.score(rollout, epoch)
        t_roll.append(time.perf_counter() - t0)
        trainer.policy.activate("policy")
        per_rollout = []
        for d in range(draws):
            t1 = time.perf_counter()
            _, norm, bad = trainer._step(rollout, adv, order, epoch, step=1000 + d)
            if bad is not None:
                raise RuntimeError(bad)
            t_train.append(time.perf_counter() - t1)
            per_rollout.append(flat_grad(params))
        grads.append(per_rollout)
        log(f"  rollout {epoch}: reward {metrics.get('reward/mean', float('nan')):.3f}, |g| {float(per_rollout[0].norm()):.3g}")
    sig, roll, est = split_energy(grads)
    return Split(sig, roll, est, c.train.batch_size, float(np.median(t_train)), float(np.median(t_roll)))


def split_overrides(text: str) -> list[str]:
    """'a.b=1,c.d=[0.5,1]' -> ['a.b=1', 'c.d=[0.5,1]']: commas inside brackets stay."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [o for o in [*out, cur] if o]


def table(rows: dict[str, Split]) -> str:
    lines = [
        "| variant | signal | rollout noise | estimator noise | images | train s | rollout s | SNR / image | SNR / s (rel.) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    first = next(iter(rows.values())).snr_per_second if rows else 1.0
    for name, s in rows.items():
        lines.append(
            f"| {name} | {s.signal:.3f} | {s.rollout:.3f} | {s.estimator:.3f} | {s.n_images} | {s.seconds:.1f} | "
            f"{s.rollout_seconds:.1f} | {s.snr_per_image:.2e} | {s.snr_per_second / first:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pipeline")
    ap.add_argument("--variant", action="append", default=[], help="NAME=OVERRIDE[,OVERRIDE...]")
    ap.add_argument("--rollouts", type=int, default=3)
    ap.add_argument("--draws", type=int, default=2)
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--out", type=Path, help="Markdown file for the table")
    args = ap.parse_args(argv)
    if args.rollouts < 2 or args.draws < 2:
        ap.error("--rollouts and --draws must be at least 2 (the split compares pairs)")
    variants = args.variant or ["pipeline="]
    rows: dict[str, Split] = {}
    for spec in variants:
        name, _, over = spec.partition("=")
        overrides = split_overrides(over)
        print(f"{name}: {' '.join(overrides) or '(the pipeline)'}", flush=True)
        rows[name] = measure(args.pipeline, overrides, args.rollouts, args.draws, args.checkpoint)
        print(table({name: rows[name]}), flush=True)
    text = table(rows)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
