"""Data-parallel training across processes: who does which images, and the few collectives needed.

The launcher (``accelerate launch``, ``torchrun``, or ``flowrl train --launcher ...``) sets the world
size; the YAML never does. Every rank holds the full model and the same LoRA adapters. Per epoch:

1. Every rank draws the same prompts and the same training order (both pure functions of
   ``(seed, epoch)``), then takes its contiguous share of each optimizer step's images
   (`rank_positions`). Image ``i`` of the epoch is always sampled with ``derive_seed(seed, epoch, 2, i)``,
   whichever rank draws it, so the union of the ranks' images is the single-process batch.
2. Rewards are computed where the images are, then all-gathered (with the images' positions and
   group ids) so that advantages and logged statistics are over the whole batch.
3. Each rank accumulates the gradient of its share, scaled as if it were the whole step; the
   gradients are then averaged over ranks (one flat all-reduce per optimizer step, what DDP does
   with ``no_sync`` accumulation), so N processes x B images = 1 process x N*B images.
   The transformer is not wrapped in DDP: the policy, old and EMA adapters and the reference share
   one module and several forwards feed one backward, which DDP's hooks do not support.
4. Every rank applies the same clipped update, so the adapters stay identical; rank 0 alone writes
   metrics, samples and checkpoints, and runs the periodic evaluation.

A full fine-tune (``model.finetune: full``) is sharded instead of replicated: every transformer copy,
the gradients and the optimizer state are split over the ranks with FSDP2 (flowrl/full.py). Steps 1
and 2 are unchanged; in step 3 FSDP averages the gradients in the backward pass itself, and the ranks
agree on every finiteness check so that they all run the same passes; in step 4 every rank takes
part in the evaluation's sampling and in gathering the weights for a checkpoint.

Single process (no launcher environment): `World.single()`; no collective is ever called and the
trainer takes exactly the code path it had before distribution existed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor

from flowrl.errors import FlowrlError

#: How long a rank waits in a collective for the others (rank 0's evaluation runs in between).
COLLECTIVE_TIMEOUT_S = 3 * 3600
#: Environment variables a launcher sets (torchrun and accelerate launch both set these).
LAUNCH_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


def launched_world_size(env: Mapping[str, str] | None = None) -> int:
    """The world size the launcher set (WORLD_SIZE), 1 without a launcher."""
    env = os.environ if env is None else env
    try:
        return max(1, int(env.get("WORLD_SIZE", "1")))
    except ValueError:
        raise FlowrlError(f"WORLD_SIZE={env.get('WORLD_SIZE')!r} is not an integer; launch with accelerate launch or torchrun") from None


@dataclass(frozen=True)
class World:
    """This process's place among the training processes.

    Attributes:
        rank: 0..size-1; rank 0 writes the run folder.
        size: number of processes (the launcher's WORLD_SIZE).
        local_rank: index on this machine (picks the GPU).
        device: where this rank's model lives.
    """

    rank: int
    size: int
    local_rank: int
    device: torch.device

    @classmethod
    def single(cls, device: torch.device | None = None) -> World:
        """One process, no collectives (the device defaults to CUDA when present)."""
        return cls(0, 1, 0, device or torch.device("cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------ collectives

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        """Leave the process group (call on every rank once training is done and nothing failed).

        Without it gloo's worker threads outlive the interpreter's teardown and a rank can abort at
        exit ("terminate called without an active exception") after a run that succeeded. It is
        not called after an error: a rank stuck in a collective would make the others' teardown wait.
        """
        if self.size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (picklable objects; small ones: rewards, flags)."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(out, obj)
        return out

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on at least one."""
        if self.size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self._comm_device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)

    @torch.no_grad()
    def average_(self, tensors: Sequence[Tensor]) -> None:
        """Replace each tensor by its mean over ranks, in place (one flat all-reduce)."""
        if self.size == 1 or not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1).float() for t in tensors]).to(self._comm_device)
        torch.distributed.all_reduce(flat)
        flat /= self.size
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t).to(t.device, t.dtype))
            offset += n

    @torch.no_grad()
    def broadcast_(self, tensors: Sequence[Tensor]) -> None:
        """Overwrite each tensor by rank 0's, in place."""
        if self.size == 1:
            return
        for t in tensors:
            buf = t.detach().to(self._comm_device).contiguous()
            torch.distributed.broadcast(buf, src=0)
            t.copy_(buf.to(t.device, t.dtype))

    def mesh(self):
        """A 1-D DeviceMesh of all ranks on this rank's device type (what FSDP2 shards over)."""
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.device.type, (self.size,))

    @property
    def _comm_device(self) -> torch.device:
        # NCCL moves CUDA tensors only; gloo moves CPU tensors.
        return self.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")


def init_world(env: Mapping[str, str] | None = None) -> World:
    """The World of this process: `World.single()` without a launcher, else join the process group
    through accelerate (NCCL on GPUs, one GPU per local rank; gloo on CPUs).

    Raises:
        FlowrlError: a launcher environment that does not hold together.
    """
    env = os.environ if env is None else env
    size = launched_world_size(env)
    if size == 1:
        return World.single()
    try:
        rank, local_rank = int(env["RANK"]), int(env.get("LOCAL_RANK", env["RANK"]))
    except (KeyError, ValueError):
        raise FlowrlError(
            f"WORLD_SIZE={size} but RANK/LOCAL_RANK are missing or not integers; start distributed runs with "
            "`flowrl train --launcher accelerate --num-processes N`, `accelerate launch -m flowrl train` or `torchrun -m flowrl train`"
        ) from None
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    from accelerate import PartialState

    # Rank 0 alone runs the periodic evaluation (40-step sampling of the test set: many minutes at
    # SD3.5-M size) while the others wait in the next collective; the default 10-30 minute
    # collective timeout would end the run.
    state = PartialState(cpu=not cuda, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return World(state.process_index, state.num_processes, state.local_process_index if cuda else local_rank, device)


# ------------------------------------------------------------------------------ the images of a rank


def shard_problems(batch_size: int, steps_per_epoch: int, micro_batch: int, world: int, group_size: int) -> list[str]:
    """Why `batch_size` cannot be split over `world` ranks as the trainer needs ([] when it can).

    Each optimizer step's images are split evenly over the ranks, and each rank's share must be a
    whole number of micro-batches (so that micro-batch boundaries, and with them the estimator's
    noise, are those of the single-process run).
    """
    per_step = batch_size // steps_per_epoch
    if per_step % world:
        return [
            f"the {per_step} images of an optimizer step (train.batch_size {batch_size} / train.steps_per_epoch "
            f"{steps_per_epoch}) cannot be split evenly over {world} processes; launch a number of processes that "
            f"divides {per_step}, or change train.batch_size (it is the global batch, all processes together)"
        ]
    share = per_step // world
    if share % micro_batch:
        fits = [d for d in range(1, share + 1) if share % d == 0]
        return [
            f"each of the {world} processes trains {share} images per optimizer step, which train.micro_batch "
            f"{micro_batch} does not divide; use a micro_batch in {fits} (per process), or another number of processes"
        ]
    del group_size  # groups may span ranks: rewards are gathered before advantages
    return []


def rank_positions(order: Tensor, steps_per_epoch: int, world: int, rank: int) -> Tensor:
    """The epoch positions one rank trains on, in training order: int64 [B / world].

    Args:
        order: int64 [B], the epoch's training order (`group_order`): step k trains
            order[k * B/steps : (k+1) * B/steps].
        steps_per_epoch: optimizer steps per epoch.
        world: number of ranks.
        rank: this rank.

    Returns:
        For each step, the rank's contiguous share of that step's images, steps concatenated.
    """
    per_step = order.numel() // steps_per_epoch
    share = per_step // world
    return torch.cat([order[k * per_step + rank * share : k * per_step + (rank + 1) * share] for k in range(steps_per_epoch)])


def assemble(parts: Sequence[Tensor], positions: Sequence[Tensor]) -> Tensor:
    """Per-rank rows put back in epoch order: out[positions[r][j]] = parts[r][j].

    Args:
        parts: one tensor [b_r, ...] per rank.
        positions: one int64 [b_r] per rank; together a permutation of range(sum b_r).
    """
    pos = torch.cat([p.cpu() for p in positions])
    rows = torch.cat([p.cpu() for p in parts])
    out = torch.empty_like(rows)
    out[pos] = rows
    return out
