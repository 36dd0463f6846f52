"""Where one epoch of the toy main job spends its time, phase by phase, per precision and threads.

Times the phases of one epoch of a pipeline (default pipelines/toy-geneval.yaml) with the trainer's
own stages: text encoding of the epoch's prompts, the rollout (sampler only), VAE decoding, the
reward, each ELBO term's forward passes (old, reference, policy) and its backward, and the AdamW
step. Rollouts, decoding and the reward run in micro-batches of `train.micro_batch`, as in
training; each phase is timed on the first micro-batches and scaled to the epoch's batch
(``--micro-batches``, default all). After a warm-up epoch, each configuration is timed over
``--repeats`` epochs (default 2) and the fastest is kept. Every configuration of ``--precisions`` x ``--threads`` runs in
the same process one after the other, after a warm-up, so their ratios are comparable.

Usage::

    .venv/bin/python benchmarks/toy_epoch.py                       # float32/bfloat16 x 1/2 threads
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python benchmarks/toy_epoch.py \\
        --micro-batches 1                                          # an AVX2-only CPU, imitated
    .venv/bin/python benchmarks/toy_epoch.py --out docs/toy-epoch.md   # add this machine's table

With ``--out`` the table replaces the section of this machine kind (CPU capability and bf16
support; a separate one for ``--compile`` comparisons) in that Markdown file and keeps the others.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PHASES = ("text encoding", "rollout", "decode", "reward", "ELBO forwards", "ELBO backward", "optimizer")


class Timer:
    """Seconds per phase, summed."""

    def __init__(self) -> None:
        self.s: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        yield
        self.s[name] += time.perf_counter() - start


def machine_kind() -> str:
    """'AVX512, AMX' style: what decides the CPU's speed in float32 and bf16."""
    native = [n for n, ok in (("AMX", torch.cpu._is_amx_tile_supported()), ("AVX512-BF16", torch.cpu._is_avx512_bf16_supported())) if ok]
    cap = torch.backends.cpu.get_cpu_capability()
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
    extra = f", oneDNN capped at {isa}" if isa else ""
    return f"CPU capability {cap}" + (f" ({', '.join(native)} in CPUID{extra})" if native else extra)


def time_epoch(trainer, precision: str, micro_batches: int | None) -> dict[str, float]:
    """Seconds of each phase of one epoch (epoch 0's prompts, seeds and noise)."""
    from flowrl.training.rollout import Pinned, derive_seed, encode_batch, rollout_autocast
    from flowrl.rewards.base import as_float_images

    c, policy, stages = trainer.cfg, trainer.policy, trainer.stages
    mb = c.train.micro_batch
    batch = trainer._pick_prompts(0)
    n = len(batch.prompts)
    chunks = list(range(0, n, mb))[: micro_batches or None]
    scale = n / sum(min(mb, n - i) for i in chunks)
    timer = Timer()
    with timer.phase("text encoding"):
        cond = encode_batch(policy, list(batch.prompts), trainer.with_negative)
    policy.transformer.eval()
    rollouts = []
    for i in chunks:
        idx = torch.arange(i, min(i + mb, n))
        seeds = [derive_seed(c.train.seed, 0, 2, int(k)) for k in idx]
        sub_cond = cond.index(idx)
        with torch.no_grad(), rollout_autocast(trainer.device, precision):
            with timer.phase("rollout"):
                x0, sigmas, traj = stages.sampler(Pinned(policy, c.train.rollout_policy), sub_cond, seeds, policy.latent_shape)
            with timer.phase("decode"):
                images = policy.decode(x0)
        from flowrl.types import Rollout

        sub = Rollout(batch.subset(idx), sub_cond, x0, images, sigmas, traj)
        with timer.phase("reward"):
            out = stages.rewards.rewards[0](as_float_images(images), list(sub.batch.prompts), sub.batch.metadata)
        rollouts.append((sub, out.scores))
    kl = getattr(trainer.p.objective, "kl", None)
    policy.activate("policy")
    trainer.optimizer.zero_grad(set_to_none=True)
    for j, (sub, scores) in enumerate(rollouts):
        adv = stages.advantage(scores.float(), sub.batch.group_ids).to(trainer.device)
        gen = torch.Generator().manual_seed(derive_seed(c.train.seed, 0, 4, 0, j))
        terms = iter(stages.estimator(sub, policy, kl, gen))
        while True:
            with timer.phase("ELBO forwards"):
                term = next(terms, None)
                if term is None:
                    break
                loss = stages.objective(term, adv).loss
            with timer.phase("ELBO backward"):
                loss.backward()
    with timer.phase("optimizer"):
        torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), c.optimizer.grad_clip)
        trainer.optimizer.step()
    return {k: v * (1.0 if k in ("text encoding", "optimizer") else scale) for k, v in timer.s.items()}


def build_trainer(pipeline: Path, overrides: list[str]):
    from flowrl.config import load_pipeline
    from flowrl.distributed import World
    from flowrl.train import Trainer

    p = load_pipeline(pipeline, overrides)
    trainer = Trainer(p, out=Path(tempfile.mkdtemp(prefix="toy-epoch-")), log=lambda s: None)
    trainer.world = World.single()
    trainer._setup()
    return trainer


def render(results: dict[tuple[str, int], dict[str, float]], header: str) -> str:
    configs = list(results)
    names = [f"{p}, {t} thread{'s' if t > 1 else ''}" for p, t in configs]
    lines = [header, "", "| phase (s per epoch) | " + " | ".join(names) + " |", "|---|" + "---:|" * len(configs)]
    for ph in PHASES:
        lines.append(f"| {ph} | " + " | ".join(f"{results[c].get(ph, 0.0):.2f}" for c in configs) + " |")
    totals = {c: sum(results[c].values()) for c in configs}
    lines.append("| **epoch** | " + " | ".join(f"**{totals[c]:.1f}**" for c in configs) + " |")
    ref = configs[0]
    lines.append(f"| epoch / {names[0]} | " + " | ".join(f"{totals[c] / totals[ref]:.2f}x" for c in configs) + " |")
    return "\n".join(lines)


def write_section(path: Path, kind: str, body: str) -> None:
    """Replace (or add) the `## <kind>` section of `path`, keeping the others."""
    title = "# One toy epoch, phase by phase\n\nWritten by `benchmarks/toy_epoch.py`; one section per machine kind.\n"
    text = path.read_text() if path.exists() else title
    sections = re.split(r"(?m)^(?=## )", text)
    head, rest = sections[0], [s for s in sections[1:] if not s.startswith(f"## {kind}\n")]
    path.write_text(head.rstrip() + "\n\n" + "".join(s.rstrip() + "\n\n" for s in rest) + f"## {kind}\n\n{body}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", type=Path, default=REPO / "pipelines" / "toy-geneval.yaml")
    ap.add_argument("--precisions", default="float32,bfloat16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--micro-batches", type=int, default=None, help="time only the first N micro-batches, scaled to the epoch")
    ap.add_argument("--repeats", type=int, default=2, help="epochs timed per configuration; the fastest is reported")
    ap.add_argument("--out", type=Path, default=None, help="Markdown file to write this machine's section into")
    ap.add_argument("--compile", default="off", help="off, on, or off,on: time each (torch.compile of the transformer)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the pipeline")
    args = ap.parse_args()

    trainer = build_trainer(args.pipeline, args.overrides)
    configs = [(p, int(t), c) for c in args.compile.split(",") for t in args.threads.split(",") for p in args.precisions.split(",")]
    torch.set_num_threads(max(t for _, t, _ in configs))
    results = {}
    warmed = set()
    for precision, threads, comp in configs:
        torch.set_num_threads(threads)
        trainer.policy._compiled = None
        if comp == "on":
            trainer.policy.compile()
        if (precision, comp) not in warmed:  # first calls build kernels (and compile), fault in memory: not timed
            start = time.perf_counter()
            time_epoch(trainer, precision, args.micro_batches)
            warmed.add((precision, comp))
            print(f"warm-up {precision}, compile {comp}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        key = (precision, threads) if args.compile == "off" else (f"{precision}{', compiled' if comp == 'on' else ''}", threads)
        # The fastest of --repeats epochs: a shared 2-core machine only ever adds time.
        runs = [time_epoch(trainer, precision, args.micro_batches) for _ in range(args.repeats)]
        results[key] = min(runs, key=lambda r: sum(r.values()))
        totals = ", ".join(f"{sum(r.values()):.1f}" for r in runs)
        print(f"{key}: {totals} s per epoch", file=sys.stderr, flush=True)
    from flowrl.precision import cpu_name

    c = trainer.cfg
    kind = machine_kind() + (", torch.compile" if args.compile != "off" else "")
    header = (
        f"{cpu_name()}, {os.cpu_count()} CPUs; torch {torch.__version__}; {dt.date.today()}. "
        f"`{args.pipeline.relative_to(REPO) if args.pipeline.is_relative_to(REPO) else args.pipeline}`"
        f"{' ' + ' '.join(args.overrides) if args.overrides else ''}: {c.train.batch_size} images, micro-batches of "
        f"{c.train.micro_batch}, {trainer.p.sampler.kind} {trainer.p.sampler.steps} steps"
        + (f", the first {args.micro_batches} micro-batch(es) timed and scaled" if args.micro_batches else "")
        + f"; after a warm-up epoch, the fastest of {args.repeats} epochs per column"
        + ". Precision applies to the rollout and decode (`train.rollout_precision`); training runs in the model dtype."
    )
    table = render(results, header)
    print(f"## {kind}\n\n{table}")
    if args.out:
        write_section(args.out, kind, table)


if __name__ == "__main__":
    main()
