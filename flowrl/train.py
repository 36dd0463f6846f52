"""Trainer: the RL loop of flowrl, its checkpoints, resume and logging.

One epoch: pick prompts -> encode once -> roll out (sampler) -> decode -> rewards -> advantages ->
estimator terms (gradient accumulation, term by term) -> objective -> clip -> AdamW step -> EMA ->
old-policy soft update -> metrics -> eval every N epochs -> checkpoint.

Every random draw of an epoch is derived from (seed, epoch), so a resumed run draws exactly what an
uninterrupted one would: resume equality follows from restoring adapters and optimizer state.

Run folder layout (other tools rely on it)::

    OUT/pipeline.yaml             resolved configuration (every default filled in)
    OUT/metrics.jsonl             one JSON object per epoch
    OUT/checkpoints/epoch-N/      policy/old/ema adapters, optimizer, trainer state
    OUT/samples/epoch-N.png       sample grid at each evaluation
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from flowrl import registry
from flowrl.config import ResolvedPipeline
from flowrl.errors import FlowrlError
from flowrl.policy import ADAPTERS, FlowPolicy
from flowrl.prompts import PromptSet, load_prompt_set
from flowrl.rewards.mix import RewardMix, mix_advantages, mix_metrics
from flowrl.types import Conditioning, PromptBatch, Rollout

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence mixing), stable across runs."""
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class Pinned:
    """A VelocityModel view of a policy whose "policy" weights are replaced by `which`
    (e.g. sampling rollouts with the old policy, or evaluating the EMA)."""

    def __init__(self, policy: FlowPolicy, which: str):
        self.policy, self.which = policy, which

    def velocity(self, x, t, cond, which="policy", guidance=1.0):
        return self.policy.velocity(x, t, cond, self.which if which == "policy" else which, guidance)


@dataclass(frozen=True)
class Stages:
    sampler: object
    estimator: object
    objective: object
    advantage: object
    rewards: RewardMix  # iterable: the reward stages in `rewards:` order
    eval_sampler: object


def build_stages(p: ResolvedPipeline) -> Stages:
    def make(kind: str, cfg):
        return registry.lookup(kind, cfg.kind)(cfg)

    estimator_cls = registry.lookup("estimator", p.estimator.kind)
    if p.estimator.kind == "trajectory":
        # It recomputes the rollout's step densities, so it must know which SDE drew them.
        estimator = estimator_cls(p.estimator, sampler_name=p.sampler.kind, sampler_config=p.sampler)
    else:
        estimator = estimator_cls(p.estimator)
    return Stages(
        sampler=make("sampler", p.sampler),
        estimator=estimator,
        objective=make("objective", p.objective),
        advantage=make("advantage", p.advantage),
        rewards=RewardMix(p.rewards),  # each reward (and its model) built once per run
        eval_sampler=make("sampler", p.eval_sampler),
    )


def _uses_cfg(*sampler_cfgs) -> bool:
    return any(getattr(c, "guidance", 1.0) != 1.0 for c in sampler_cfgs)


def encode_batch(policy: FlowPolicy, prompts: list[str], with_negative: bool) -> Conditioning:
    """Encode each distinct prompt once, then expand to the batch."""
    unique = list(dict.fromkeys(prompts))
    cond = policy.encode(unique, with_negative=with_negative)
    index = torch.tensor([unique.index(p) for p in prompts], device=cond.prompt_embeds.device)
    return cond.index(index)


def decode_in_chunks(policy: FlowPolicy, x0: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([policy.decode(x0[i : i + chunk]) for i in range(0, x0.shape[0], chunk)])


def roll_out(policy, sampler, batch: PromptBatch, cond: Conditioning, seeds: list[int], which: str, chunk: int) -> Rollout:
    """Sample and decode `batch` in chunks of `chunk` images (per-image seeds: chunking is invisible)."""
    xs, trajs, sigmas = [], [], None
    model = Pinned(policy, which)
    for i in range(0, len(seeds), chunk):
        idx = torch.arange(i, min(i + chunk, len(seeds)))
        x0, sigmas, traj = sampler(model, cond.index(idx), seeds[i : i + chunk], policy.latent_shape)
        xs.append(x0)
        trajs.append(traj)
    x0 = torch.cat(xs)
    trajectory = None
    if trajs[0] is not None:
        from flowrl.types import Trajectory

        trajectory = Trajectory(torch.cat([t.latents for t in trajs]), trajs[0].sigmas, torch.cat([t.log_probs for t in trajs]))
    images = decode_in_chunks(policy, x0, chunk)
    return Rollout(batch, cond, x0, images, sigmas, trajectory)


def group_order(group_ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random order of the images [B] that keeps each group's images together (groups shuffled,
    images within a group in place), so micro-batches and optimizer steps hold whole groups whenever
    their sizes are multiples of the group size (the graph check makes them so)."""
    groups = torch.unique(group_ids)
    perm = groups[torch.randperm(groups.numel(), generator=generator)]
    return torch.cat([torch.nonzero(group_ids == g).flatten() for g in perm])


def learning_rate(epoch: int, epochs: int, lr: float, schedule: str, warmup: int, min_ratio: float) -> float:
    """The learning rate of `epoch` (0-based) of `epochs`: linear warm-up over `warmup` epochs, then
    constant or cosine decay to `min_ratio * lr` at the last epoch. A pure function of the epoch, so
    resuming needs no scheduler state."""
    if warmup and epoch < warmup:
        return lr * (epoch + 1) / warmup
    if schedule == "constant":
        return lr
    span = max(1, epochs - 1 - warmup)
    progress = min(1.0, (epoch - warmup) / span)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def rollout_autocast(device: torch.device, precision: str):
    """Autocast context for rollouts: bf16 matmuls when asked, else a no-op."""
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, precision))


class Trainer:
    """Runs a resolved pipeline into a run folder."""

    def __init__(self, pipeline: ResolvedPipeline, out: Path | None = None, resume: bool = False, log: Callable[[str], None] = print):
        self.p = pipeline
        self.cfg = pipeline.config
        self.out = Path(out or self.cfg.output)
        self.resume = resume
        self.log = log

    # ------------------------------------------------------------------------------------ setup

    def _check_folder(self) -> int:
        """Check the run folder before anything is loaded; returns the first epoch to run."""
        cfg_file = self.out / "pipeline.yaml"
        if self.resume:
            ckpt = latest_checkpoint(self.out)
            if ckpt is None:
                raise FlowrlError(f"--resume: no complete checkpoint in {self.out / CHECKPOINTS}; start without --resume")
            return ckpt[0] + 1
        if cfg_file.exists() or (self.out / CHECKPOINTS).exists():
            raise FlowrlError(
                f"{self.out} already holds a run; pass --resume to continue it, or choose another output "
                f"(output=... on the command line)"
            )
        return 0

    def _start_folder(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "pipeline.yaml").write_text(yaml.safe_dump(self.p.to_dict(), sort_keys=False))

    def _setup(self) -> None:
        c = self.cfg
        if c.train.threads:
            torch.set_num_threads(c.train.threads)
        torch.manual_seed(c.train.seed)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.policy = FlowPolicy.from_config(c.model, self.device, seed=c.train.seed)
        self.stages = build_stages(self.p)
        self.train_set = load_prompt_set(c.prompts.train)
        self.test_set = load_prompt_set(c.prompts.test)
        o = c.optimizer
        self.optimizer = torch.optim.AdamW(self.policy.trainable_parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)
        self.with_negative = _uses_cfg(self.p.sampler, self.p.eval_sampler, self.p.estimator)
        self.writer = None
        if c.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise FlowrlError(
                    "logging.tensorboard: true needs the tensorboard package; install it with "
                    "pip install 'flowrl[tensorboard]' or set logging.tensorboard: false"
                ) from None
            self.writer = SummaryWriter(str(self.out / "tensorboard"))

    # ------------------------------------------------------------------------------------- loop

    def run(self) -> Path:
        start = self._check_folder()
        self._setup()
        if start == 0:
            self._start_folder()
        else:
            self._load_checkpoint(self.out / CHECKPOINTS / f"epoch-{start - 1}")
            truncate_metrics(self.out / "metrics.jsonl", start - 1)
            self.log(f"resumed from epoch {start - 1}")
        epochs = self.cfg.train.epochs
        from flowrl.progress import count_progress

        if start == 0 and self.cfg.eval.every:
            self._write_metrics({"epoch": -1, **self.evaluate(-1)})
        with count_progress("train epochs", epochs - start) as advance:
            for epoch in range(start, epochs):
                metrics = self.train_epoch(epoch)
                last = epoch == epochs - 1
                evaluated = (self.cfg.eval.every and (epoch + 1) % self.cfg.eval.every == 0) or last
                if evaluated:
                    metrics |= self.evaluate(epoch)
                self._write_metrics(metrics)
                self.log(format_metrics(metrics))
                if evaluated:
                    from flowrl.plots import plot_run

                    plot_run(self.out / "metrics.jsonl", self.out / "curves.png", title=self.cfg.name)
                if (self.cfg.checkpoint.every and (epoch + 1) % self.cfg.checkpoint.every == 0) or last:
                    self._save_checkpoint(epoch)
                advance(1)
        if self.writer is not None:
            self.writer.close()
        return self.out

    def _pick_prompts(self, epoch: int) -> PromptBatch:
        c = self.cfg
        n_prompts = c.train.batch_size // c.prompts.group_size
        rng = np.random.default_rng(derive_seed(c.train.seed, epoch, 1))
        replace = n_prompts > len(self.train_set)
        chosen = rng.choice(len(self.train_set), size=n_prompts, replace=replace)
        idx = np.repeat(chosen, c.prompts.group_size)
        meta = [self.train_set.metadata[i] for i in idx] if self.train_set.metadata else ()
        groups = torch.from_numpy(np.repeat(np.arange(n_prompts), c.prompts.group_size))
        return PromptBatch([self.train_set.prompts[i] for i in idx], groups, meta)

    def score(self, rollout: Rollout) -> tuple[torch.Tensor, dict[str, float], dict]:
        """Every reward of the mix on the rollout's images -> advantages [B], logged means, and
        the raw output of each reward by label."""
        batch = rollout.batch
        out = self.stages.rewards(rollout.images, batch.prompts, batch.metadata)
        adv = mix_advantages(out, self.cfg.train.reward_aggregation, lambda r: self.stages.advantage(r, batch.group_ids))
        return adv, mix_metrics(out), dict(out.parts)

    def train_epoch(self, epoch: int) -> dict:
        c = self.cfg
        t0 = time.perf_counter()
        batch = self._pick_prompts(epoch)
        cond = encode_batch(self.policy, list(batch.prompts), self.with_negative)
        seeds = [derive_seed(c.train.seed, epoch, 2, i) for i in range(len(batch.prompts))]
        self.policy.transformer.eval()
        with torch.no_grad(), rollout_autocast(self.device, c.train.rollout_precision):
            rollout = roll_out(self.policy, self.stages.sampler, batch, cond, seeds, c.train.rollout_policy, c.train.micro_batch)
        t_roll = time.perf_counter()
        adv, metrics, _ = self.score(rollout)
        adv = adv.to(self.device)
        t_reward = time.perf_counter()

        kl_cfg = getattr(self.p.objective, "kl", None)
        per_step = c.train.batch_size // c.train.steps_per_epoch
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        order = group_order(batch.group_ids, torch.Generator().manual_seed(derive_seed(c.train.seed, epoch, 3)))
        grad_norms = []
        o = c.optimizer
        lr = learning_rate(epoch, c.train.epochs, o.lr, o.schedule, o.warmup_epochs, o.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.policy.activate("policy")
        for step in range(c.train.steps_per_epoch):
            step_idx = order[step * per_step : (step + 1) * per_step]
            self.optimizer.zero_grad(set_to_none=True)
            for m in range(0, per_step, c.train.micro_batch):
                idx = step_idx[m : m + c.train.micro_batch]
                sub = rollout.subset(idx)
                gen = torch.Generator(device="cpu").manual_seed(derive_seed(c.train.seed, epoch, 4, step, m))
                for terms in self.stages.estimator(sub, self.policy, kl_cfg, gen):
                    out = self.stages.objective(terms, adv[idx])
                    (out.loss * (len(idx) / per_step)).backward()
                    for k, v in out.metrics.items():
                        sums[k] += float(v) * terms.weight * len(idx) / per_step
                        counts[k] += 1
            params = self.policy.trainable_parameters()
            norm = torch.nn.utils.clip_grad_norm_(params, c.optimizer.grad_clip)
            if torch.isfinite(norm):
                self.optimizer.step()
            grad_norms.append(float(norm))
            self.policy.blend_adapter("ema", "policy", c.train.ema_decay)
        decay = min(c.train.old.rate * epoch, c.train.old.max)
        self.policy.blend_adapter("old", "policy", decay)
        t_train = time.perf_counter()

        metrics = {"epoch": epoch, **metrics}
        metrics |= {f"train/{k}": v / c.train.steps_per_epoch for k, v in sums.items()}
        metrics["loss"] = metrics.pop("train/loss", float("nan"))
        metrics["train/grad_norm"] = float(np.mean(grad_norms))
        metrics["train/old_decay"] = decay
        metrics["train/lr"] = lr
        metrics["advantage/abs_mean"] = float(adv.abs().mean())
        metrics["time/rollout_s"] = t_roll - t0
        metrics["time/reward_s"] = t_reward - t_roll
        metrics["time/train_s"] = t_train - t_reward
        metrics["time/epoch_s"] = t_train - t0
        return metrics

    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict:
        """Sample the test prompts with the eval sampler and weights; score with every reward."""
        c = self.cfg
        t0 = time.perf_counter()
        test = self.test_set
        n = min(len(test), c.eval.limit or len(test))
        k = c.eval.images_per_prompt
        idx = np.repeat(np.arange(n), k)
        meta = [test.metadata[i] for i in idx] if test.metadata else ()
        batch = PromptBatch([test.prompts[i] for i in idx], torch.from_numpy(idx), meta)
        cond = encode_batch(self.policy, list(batch.prompts), self.with_negative)
        seeds = [derive_seed(c.eval.seed, i) for i in range(len(idx))]
        which = c.eval.weights
        rollout = roll_out(self.policy, self.stages.eval_sampler, batch, cond, seeds, which, max(c.train.micro_batch, 64))
        self.policy.activate("policy")
        out: dict[str, float] = {}
        marks = None
        for reward in self.stages.rewards:
            res = reward(rollout.images, batch.prompts, batch.metadata)
            label = reward.config.label
            summary = reward.eval_summary(res, batch.metadata) if hasattr(reward, "eval_summary") else {"": float(res.scores.mean())}
            for key, value in summary.items():
                out[f"eval/{label}" + (f"/{key}" if key else "")] = value
            if "strict" in res.details and marks is None:
                marks = [bool(x) for x in res.details["strict"].tolist()]
        out["time/eval_s"] = time.perf_counter() - t0
        if c.logging.sample_grid:
            from flowrl.viz import save_grid

            save_grid(rollout.images[:64], self.out / "samples" / f"epoch-{epoch}.png", marks=marks[:64] if marks else None)
        return out

    # ----------------------------------------------------------------------------- persistence

    def _write_metrics(self, metrics: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.writer is not None:
            for k, v in metrics.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, metrics["epoch"])

    def _save_checkpoint(self, epoch: int) -> Path:
        from safetensors.torch import save_file

        root = self.out / CHECKPOINTS
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"epoch-{epoch}"
        tmp = root / f".tmp-epoch-{epoch}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        meta = {"epoch": str(epoch), "base_model": self.cfg.model.path, "rank": str(self.cfg.model.lora.rank), "alpha": str(self.cfg.model.lora.alpha)}
        for name in ADAPTERS:
            state = {k: v.contiguous().cpu() for k, v in self.policy.adapter_state(name).items()}
            save_file(state, tmp / f"{name}.safetensors", metadata=meta)
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        state = {"epoch": epoch, "torch_rng": torch.get_rng_state().tolist()}
        (tmp / STATE_FILE).write_text(json.dumps(state))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)  # atomic: a checkpoint folder exists only once complete
        keep = sorted((p for p in root.glob("epoch-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
        for old in keep[: -self.cfg.checkpoint.keep_last]:
            shutil.rmtree(old)
        return final

    def _load_checkpoint(self, path: Path) -> None:
        from safetensors.torch import load_file

        for name in ADAPTERS:
            self.policy.load_adapter_state(name, {k: v.to(self.device) for k, v in load_file(path / f"{name}.safetensors").items()})
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.device))
        state = json.loads((path / STATE_FILE).read_text())
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))


def latest_checkpoint(run: Path) -> tuple[int, Path] | None:
    """(epoch, folder) of the newest complete checkpoint of a run folder."""
    found = []
    for p in (Path(run) / CHECKPOINTS).glob("epoch-*"):
        if (p / STATE_FILE).is_file():
            try:
                found.append((int(p.name.split("-")[1]), p))
            except ValueError:
                continue
    return max(found) if found else None


def truncate_metrics(path: Path, last_epoch: int) -> None:
    """Drop metrics lines of epochs after `last_epoch` (written after the checkpoint we resume)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["epoch"] <= last_epoch]
    path.write_text("".join(line + "\n" for line in keep))


def format_metrics(m: dict) -> str:
    parts = [f"epoch {m['epoch']}"]
    for key in ("reward/mean", "loss", "train/ratio_mean", "time/epoch_s"):
        if key in m and isinstance(m[key], float) and math.isfinite(m[key]):
            parts.append(f"{key}={m[key]:.4g}")
    parts += [f"{k}={v:.3f}" for k, v in m.items() if k.startswith("eval/") and k.count("/") == 1]
    return "  ".join(parts)
