"""Full fine-tuning (``model.finetune: full``): one transformer per set of weights, sharded with FSDP2
when several processes train.

LoRA keeps the policy, old policy and EMA as three adapters of one transformer and gets the reference
by switching adapters off. Training every weight leaves no such trick, so each set of weights is a
module of its own:

- ``policy``: trainable, float32 master weights whatever ``model.dtype`` is (AdamW steps of 1e-5 are
  below bfloat16's resolution for most weights). Its forward passes compute in ``model.dtype``:
  autocast in one process, FSDP2's mixed precision (parameters gathered in ``model.dtype``,
  gradients reduced in float32) when sharded.
- ``old``, ``ema``: float32 copies without gradients, soft-updated towards the policy with
  elementwise ``lerp`` (an EMA step in bfloat16 would round to nothing, as the policy's would).
- ``ref``: the base weights in ``model.dtype``, frozen; made only when something computes the
  reference velocity (a KL term with ``objective.kl.beta > 0``), since it costs a whole model.

So a run holds 3 or 4 transformers, plus float32 gradients and AdamW's two float32 moments of the
policy: 24 bytes per parameter (4 each for the policy, old, EMA and gradients, 8 for AdamW), plus 2
or 4 for the reference, against LoRA's 2 or 4 for the frozen base (adapters are small).

Sharded (`TransformerCopies` given a mesh): `fully_shard` on each joint transformer block, then on
the root, on a 1-D mesh of all ranks, for every copy alike. Each process loads the whole base model
on the CPU; the first float32 copy is sharded before the others are made, and those are built on the
meta device and filled shard by shard, so no process ever holds more than the base and one float32
copy unsharded. Each rank then holds 1/N of every copy, of the gradients and of the optimizer state.
Gradients are averaged over ranks by FSDP's reduce-scatter in the backward pass. Elementwise updates (copy, blend, the AdamW step) act on the local shards, which
line up because every copy is sharded the same way. State dicts are gathered in full on rank 0 for
checkpoints and loaded from full state dicts, so a checkpoint does not depend on the number of
processes that wrote it.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from flowrl.errors import FlowrlError

#: The trained copies, as FlowPolicy's LoRA adapters are named; "ref" is the optional fourth.
COPIES = ("policy", "old", "ema")


def _state_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


class TransformerCopies:
    """The transformers of a full fine-tune, by name ("policy", "old", "ema", "ref").

    Args:
        base: the base transformer as loaded, in model.dtype. It becomes the "ref" copy (with
            `reference`) or, upcast to float32 in place, the first of `names`.
        names: the trained copies to make, a non-empty subset of COPIES (`flowrl eval` makes one).
        reference: keep a frozen copy of the base as "ref".
        mesh: shard every copy over this 1-D DeviceMesh of all ranks (FSDP2); the shards move to
            the mesh's device. None: plain modules where `base` is.

    Attributes:
        modules: name -> transformer; only "policy" has trainable parameters.
        compute_dtype: model.dtype, in which every forward pass computes.
        sharded: whether the copies are FSDP2 modules.
    """

    def __init__(self, base: torch.nn.Module, names: Sequence[str] = COPIES, reference: bool = False, mesh=None):
        unknown = [n for n in names if n not in COPIES]
        if unknown or not names:
            raise ValueError(f"copies {list(names)}: choose a non-empty subset of {', '.join(COPIES)}")
        self.compute_dtype = next(base.parameters()).dtype
        self.sharded = mesh is not None
        self.modules: dict[str, torch.nn.Module] = {}
        first, *rest = names
        master = copy.deepcopy(base).float() if reference else base.float()
        master.requires_grad_(first == "policy")
        self.modules[first] = master
        if reference:
            base.requires_grad_(False)
        if mesh is None:
            for name in rest:
                self.modules[name] = copy.deepcopy(master).requires_grad_(name == "policy")
        else:
            # Shard before making the other copies, so that no process ever holds more than the base
            # and one float32 copy unsharded (each process loads the whole base model first).
            cls = type(master)
            if reference:
                self._shard(base, mesh)
            self._shard(master, mesh)
            for name in rest:
                self.modules[name] = self._sharded_twin(cls, master, mesh, trainable=name == "policy")
        if reference:
            self.modules["ref"] = base

    @property
    def main(self) -> torch.nn.Module:
        """The policy copy (or the only copy made, for evaluation)."""
        return self.modules.get("policy") or next(iter(self.modules.values()))

    def module(self, which: str) -> torch.nn.Module:
        """The transformer of `which`.

        Raises:
            FlowrlError: "ref" when no reference copy was made, or a copy this policy does not hold.
        """
        if which in self.modules:
            return self.modules[which]
        if which == "ref":
            raise FlowrlError(
                "the reference velocity (which='ref') was asked for, but with model.finetune: full flowrl keeps a "
                "frozen copy of the base model only when a KL term needs it (objective.kl.beta > 0); a custom stage "
                "that computes the reference needs such a KL term, or model.finetune: lora (reference = adapters off)"
            )
        if which not in COPIES:
            raise ValueError(f"unknown weights {which!r}; use one of policy, old, ema, ref")
        raise FlowrlError(f"this policy holds only the {', '.join(self.modules)} weights, not {which!r}")

    # ------------------------------------------------------------------------------- sharding

    def _shard(self, module: torch.nn.Module, mesh) -> None:
        """FSDP2 on each joint transformer block, then on the root.

        The root is resharded after its forward as well (FSDP2 keeps a root's parameters gathered
        by default, expecting a backward right after): the old, EMA and reference copies only ever
        run no-grad forwards, and elementwise updates need every parameter sharded between passes.
        Parameters are gathered in model.dtype for the forward passes and gradients reduced in
        float32 (mixed precision), which is autocast's role in one process.
        """
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy()
        if self.compute_dtype != torch.float32:
            mp = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
        for block in module.transformer_blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(module, mesh=mesh, mp_policy=mp, reshard_after_forward=True)

    @torch.no_grad()
    def _sharded_twin(self, cls: type, master: torch.nn.Module, mesh, trainable: bool) -> torch.nn.Module:
        """A copy of the sharded `master` (a `cls` before sharding), built on the meta device, sharded
        the same way, then filled shard by shard: the unsharded copy never exists."""
        with torch.device("meta"):
            twin = cls.from_config(master.config)
        twin.requires_grad_(trainable)
        self._shard(twin, mesh)
        twin.to_empty(device=next(master.parameters()).device)
        for d, s in _pairs(twin, master):
            d.copy_(s)
        sources = dict(master.named_buffers())
        for name, b in twin.named_buffers():
            b.copy_(sources[name])
        twin.train(master.training)
        return twin

    def autocast(self, device: torch.device):
        """The context of a forward pass: autocast to model.dtype for float32 master weights in one
        process; nothing when the model computes in float32 or FSDP casts the parameters itself."""
        if self.sharded or self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.compute_dtype)

    # --------------------------------------------------------------------------------- weights

    def params(self, name: str) -> dict[str, torch.nn.Parameter]:
        """Parameters of one copy by name (DTensor shards when sharded)."""
        return dict(self.module(name).named_parameters())

    def trainable(self) -> list[torch.nn.Parameter]:
        return list(self.module("policy").parameters())

    def state(self, name: str) -> dict[str, Tensor]:
        """The full state dict of one copy, on the CPU (`SD3Transformer2DModel.load_state_dict` reads it).

        Sharded, this is a collective that every rank must call: rank 0 receives the gathered
        tensors, the other ranks an empty dict.
        """
        module = self.module(name)
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            return get_model_state_dict(module, options=_state_options(cpu_offload=True))
        return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

    @torch.no_grad()
    def load_state(self, name: str, state: dict[str, Tensor]) -> None:
        """Load a full state dict (as `state` writes it) into one copy; sharded, every rank passes
        the whole dict and keeps its shard.

        Raises:
            FlowrlError: the keys are not this transformer's.
        """
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        module = self.module(name)
        expected = set(module.state_dict())
        if expected != set(state):
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise FlowrlError(
                f"weights do not fit this model's '{name}' transformer: {len(missing)} missing (e.g. {missing[:2]}), "
                f"{len(extra)} unexpected (e.g. {extra[:2]}); was the checkpoint made with another model, or is it a "
                "LoRA checkpoint (model.finetune: lora)?"
            )
        # set_model_state_dict replaces the values of the dict it is given by local shards.
        set_model_state_dict(module, dict(state), options=_state_options(strict=True))

    @torch.no_grad()
    def copy(self, src: str, dst: str) -> None:
        """dst <- src, elementwise (shard by shard when sharded)."""
        for d, s in _pairs(self.module(dst), self.module(src)):
            d.copy_(s)

    @torch.no_grad()
    def blend(self, dst: str, src: str, decay: float) -> None:
        """dst <- decay * dst + (1 - decay) * src, elementwise (shard by shard when sharded)."""
        for d, s in _pairs(self.module(dst), self.module(src)):
            d.lerp_(s.to(d.dtype), 1.0 - decay)

    # ------------------------------------------------------------------------------- optimizer

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's full state (keyed by parameter name, on the CPU), independent of sharding.

        Sharded, a collective: rank 0 receives the state, the other ranks an empty dict.
        """
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.module("policy"), optimizer, options=_state_options(cpu_offload=True))

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load a full optimizer state (as `optimizer_state` returns it); every rank passes all of it."""
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.module("policy"), optimizer, state, options=_state_options())


def _pairs(a: torch.nn.Module, b: torch.nn.Module) -> Iterator[tuple[Tensor, Tensor]]:
    """The parameters of two copies of one architecture, matched by name: (a's, b's)."""
    other = dict(b.named_parameters())
    for name, p in a.named_parameters():
        yield p, other[name]
