"""LoRA and merged-weight export behind ``flowrl export-lora``.

A trained run keeps its adapters in flowrl's own layout (``checkpoints/epoch-N/{policy,old,ema}``
with peft key names and one rank/alpha for all modules). This module turns them into files other
tools load:

- ``diffusers``: ``pytorch_lora_weights.safetensors`` for ``StableDiffusion3Pipeline.load_lora_weights``.
  The LoRA scale ``alpha / rank`` (times ``--scale``) is folded into ``lora_B``, so the file means
  ``W + B A`` exactly as diffusers, peft and ComfyUI read a diffusers LoRA with no alpha; the diffusers
  adapter metadata says the same (``lora_alpha == r``).
- ``comfyui`` (alias ``kohya``): the original SD3 MMDiT layout, ``lora_unet_joint_blocks_N_..`` keys
  with ``lora_down`` / ``lora_up`` / ``alpha``. diffusers' separate q, k, v projections are one fused
  ``qkv`` linear there, so their three LoRAs become one of rank 3r whose down is the three A's stacked
  and whose up is block-diagonal in the three B's: the same update, exactly.
- ``--merge``: the LoRA added into the base transformer weights, as a diffusers transformer folder and
  as one safetensors file (diffusers keys, or the original MMDiT keys with ``--format comfyui``).

Internally an adapter is a mapping from a module path of the diffusers transformer (for example
``transformer_blocks.0.attn.to_q``) to a `LoraLayer`; every format is a pure function of it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from flowrl.errors import FlowrlError

FORMATS = ("diffusers", "comfyui", "kohya")
WEIGHTS = ("ema", "policy")
LORA_FILE = "pytorch_lora_weights.safetensors"
COMFY_LORA_FILE = "lora.safetensors"
MERGED_FILE = "transformer.safetensors"
TRANSFORMER_WEIGHTS = "diffusion_pytorch_model.safetensors"
COMFY_PREFIX = "lora_unet_"
MMDIT_PREFIX = "model.diffusion_model."


# ------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class LoraLayer:
    """One low-rank update of a linear layer: delta W = (alpha / rank) * up @ down.

    Attributes:
        down: A [rank, in_features].
        up: B [out_features, rank].
        alpha: LoRA alpha; the update's scale is alpha / rank.
    """

    down: Tensor
    up: Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> Tensor:
        """The weight update [out_features, in_features] in float32."""
        return (self.up.float() @ self.down.float()) * self.scale


#: module path in the diffusers SD3 transformer -> its LoRA.
Adapter = dict[str, LoraLayer]


@dataclass(frozen=True)
class Source:
    """One checkpoint's adapter and where it came from.

    Attributes:
        checkpoint: the epoch-N folder.
        weights: which adapter was read ("ema" or "policy").
        epoch: training epoch of the checkpoint.
        base_model: model.path the run trained on (as written in the checkpoint).
        rank, alpha: the run's LoRA rank and alpha.
        pipeline_sha256: sha256 of the run's resolved pipeline.yaml (None when it is not beside the
            checkpoint).
        rewards: reward labels of the run's pipeline.
        adapter: the weights.
    """

    checkpoint: Path
    weights: str
    epoch: int
    base_model: str
    rank: int
    alpha: float
    pipeline_sha256: str | None
    rewards: tuple[str, ...]
    adapter: Adapter


# ------------------------------------------------------------------------ flowrl <-> adapter


def adapter_from_state(state: Mapping[str, Tensor], alpha: float) -> Adapter:
    """flowrl/peft adapter weights -> Adapter.

    Args:
        state: ``{module}.lora_A.weight`` [r, in] and ``{module}.lora_B.weight`` [out, r] tensors, as
            written by ``FlowPolicy.adapter_state`` and the trainer's checkpoints.
        alpha: the LoRA alpha they were trained with.

    Raises:
        FlowrlError: keys that are not LoRA pairs of linear layers.
    """
    downs, ups, other = {}, {}, []
    for key, value in state.items():
        if key.endswith(".lora_A.weight"):
            downs[key[: -len(".lora_A.weight")]] = value
        elif key.endswith(".lora_B.weight"):
            ups[key[: -len(".lora_B.weight")]] = value
        else:
            other.append(key)
    unpaired = sorted(set(downs) ^ set(ups))
    if other or unpaired:
        raise FlowrlError(
            f"not a LoRA adapter of linear layers: unexpected keys {other[:3]}, unpaired modules {unpaired[:3]}; "
            "export reads the {policy,ema}.safetensors files that `flowrl train` writes"
        )
    adapter = {}
    for module in sorted(downs):
        down, up = downs[module], ups[module]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise FlowrlError(
                f"{module}: LoRA shapes A {tuple(down.shape)} and B {tuple(up.shape)} are not a linear layer's "
                "[r, in] and [out, r]; only LoRA on linear layers can be exported"
            )
        adapter[module] = LoraLayer(down, up, float(alpha))
    return adapter


def adapter_to_state(adapter: Adapter) -> tuple[dict[str, Tensor], int, float]:
    """Adapter -> (flowrl/peft state, rank, alpha), the inverse of `adapter_from_state`.

    Raises:
        FlowrlError: modules of different ranks or scales, which flowrl's single rank/alpha cannot hold.
    """
    ranks = {layer.rank for layer in adapter.values()}
    alphas = {layer.alpha for layer in adapter.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise FlowrlError(
            f"the adapter mixes ranks {sorted(ranks)} and alphas {sorted(alphas)}; flowrl's adapter layout has one "
            "rank and alpha for every module (load it with diffusers instead)"
        )
    state = {}
    for module, layer in adapter.items():
        state[f"{module}.lora_A.weight"] = layer.down.contiguous()
        state[f"{module}.lora_B.weight"] = layer.up.contiguous()
    return state, ranks.pop(), alphas.pop()


# ---------------------------------------------------------------------------------- algebra


def scale_adapter(adapter: Adapter, factor: float) -> Adapter:
    """Every update times `factor` (through alpha: the tensors stay bit-identical)."""
    return {m: replace(layer, alpha=layer.alpha * factor) for m, layer in adapter.items()}


def fold_scale(layer: LoraLayer) -> LoraLayer:
    """The same update with alpha / rank multiplied into up, so that alpha == rank (scale 1)."""
    if layer.scale == 1.0:
        return layer
    up = (layer.up.float() * layer.scale).to(layer.up.dtype)
    return LoraLayer(layer.down, up, float(layer.rank))


def mix_adapters(adapters: Sequence[Adapter], weights: Sequence[float]) -> Adapter:
    """The weighted sum of several adapters' updates, exactly, as one adapter.

    sum_j w_j s_j B_j A_j = [w_1 s_1 B_1 | ... | w_n s_n B_n] @ [A_1; ...; A_n], so each module's
    down is the A's stacked [sum r_j, in], its up the scaled B's side by side [out, sum r_j], and
    its alpha the new rank (scale 1).

    Raises:
        FlowrlError: adapters with different module sets.
    """
    if len(adapters) != len(weights):
        raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights")
    modules = set(adapters[0])
    for a in adapters[1:]:
        if set(a) != modules:
            raise FlowrlError("cannot mix adapters that adapt different modules (different model.lora.targets)")
    dtype = adapters[0][next(iter(modules))].up.dtype if modules else torch.float32
    for a in adapters:
        for layer in a.values():
            dtype = torch.promote_types(dtype, layer.up.dtype)
    out = {}
    for module in sorted(modules):
        layers = [a[module] for a in adapters]
        down = torch.cat([layer.down.to(dtype) for layer in layers], dim=0)
        up = torch.cat([(layer.up.float() * (w * layer.scale)).to(dtype) for layer, w in zip(layers, weights)], dim=1)
        out[module] = LoraLayer(down, up, float(down.shape[0]))
    return out


def fuse_layers(parts: Sequence[LoraLayer | None]) -> LoraLayer:
    """LoRAs of the row blocks of one fused linear (e.g. q, k, v of a qkv) -> one LoRA, exactly.

    down = [A_1; A_2; ...] [sum r_i, in]; up is block-diagonal in the B's [n * out, sum r_i]; a missing
    part (None) gets zero rows. When the parts' scales differ they are folded into the B's first.

    Args:
        parts: the LoRA of each row block in order, None where that block has none; at least one set.
    """
    present = [p for p in parts if p is not None]
    if not present:
        raise ValueError("fuse_layers needs at least one LoRA")
    out = present[0].up.shape[0]
    if any(p.up.shape[0] != out for p in present):
        raise ValueError(f"fused blocks must have equal output sizes, got {[p.up.shape[0] for p in present]}")
    if len({p.scale for p in present}) > 1:
        present = [fold_scale(p) for p in present]
        parts = [fold_scale(p) if p is not None else None for p in parts]
    scale = present[0].scale
    rank = sum(p.rank for p in present)
    dtype = present[0].up.dtype
    down = torch.cat([p.down for p in present], dim=0)
    up = torch.zeros(out * len(parts), rank, dtype=dtype)
    col = 0
    for i, p in enumerate(parts):
        if p is not None:
            up[i * out : (i + 1) * out, col : col + p.rank] = p.up
            col += p.rank
    return LoraLayer(down, up, scale * rank)


def split_layer(layer: LoraLayer, n: int) -> list[LoraLayer]:
    """A LoRA of a fused linear -> the LoRAs of its n equal row blocks, exactly (inverse of fuse_layers).

    If up is block-diagonal with n equal rank blocks (what `fuse_layers` writes), each part keeps only
    its own block (rank / n); otherwise every part shares the whole down (rank unchanged).
    """
    if n == 1:
        return [layer]
    out = layer.up.shape[0] // n
    rank = layer.rank
    if rank % n == 0:
        r = rank // n
        blocks = layer.up.reshape(n, out, n, r)
        off = ~torch.eye(n, dtype=torch.bool)
        if not bool(blocks.permute(0, 2, 1, 3)[off].any()):
            return [
                LoraLayer(
                    layer.down[i * r : (i + 1) * r].clone(),
                    layer.up[i * out : (i + 1) * out, i * r : (i + 1) * r].clone(),
                    layer.scale * r,
                )
                for i in range(n)
            ]
    return [LoraLayer(layer.down.clone(), layer.up[i * out : (i + 1) * out].clone(), layer.alpha) for i in range(n)]


def swap_halves(t: Tensor) -> Tensor:
    """[a; b] -> [b; a] along dim 0: the (shift, scale) <-> (scale, shift) order of AdaLN outputs."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


# ------------------------------------------------------------------- the original SD3 layout


class Target(NamedTuple):
    """Where a diffusers module lives in the original SD3 MMDiT state dict.

    Attributes:
        name: the original module path, e.g. joint_blocks.0.x_block.attn.qkv.
        part: which row block of that module it is (q, k, v = 0, 1, 2).
        parts: how many row blocks the original module has.
        swap: the original stores the two halves of the rows in the other order (AdaLN shift/scale).
    """

    name: str
    part: int = 0
    parts: int = 1
    swap: bool = False


#: modules of diffusers' transformer_blocks.{i} -> original joint_blocks.{i} (convert_sd3_transformer_
#: checkpoint_to_diffusers in diffusers' single_file_utils is the reference for the reverse direction).
_BLOCK = {
    "attn.to_q": Target("x_block.attn.qkv", 0, 3),
    "attn.to_k": Target("x_block.attn.qkv", 1, 3),
    "attn.to_v": Target("x_block.attn.qkv", 2, 3),
    "attn.add_q_proj": Target("context_block.attn.qkv", 0, 3),
    "attn.add_k_proj": Target("context_block.attn.qkv", 1, 3),
    "attn.add_v_proj": Target("context_block.attn.qkv", 2, 3),
    "attn.to_out.0": Target("x_block.attn.proj"),
    "attn.to_add_out": Target("context_block.attn.proj"),
    "attn.norm_q": Target("x_block.attn.ln_q"),
    "attn.norm_k": Target("x_block.attn.ln_k"),
    "attn.norm_added_q": Target("context_block.attn.ln_q"),
    "attn.norm_added_k": Target("context_block.attn.ln_k"),
    "attn2.to_q": Target("x_block.attn2.qkv", 0, 3),
    "attn2.to_k": Target("x_block.attn2.qkv", 1, 3),
    "attn2.to_v": Target("x_block.attn2.qkv", 2, 3),
    "attn2.to_out.0": Target("x_block.attn2.proj"),
    "attn2.norm_q": Target("x_block.attn2.ln_q"),
    "attn2.norm_k": Target("x_block.attn2.ln_k"),
    "ff.net.0.proj": Target("x_block.mlp.fc1"),
    "ff.net.2": Target("x_block.mlp.fc2"),
    "ff_context.net.0.proj": Target("context_block.mlp.fc1"),
    "ff_context.net.2": Target("context_block.mlp.fc2"),
    "norm1.linear": Target("x_block.adaLN_modulation.1"),
    "norm1_context.linear": Target("context_block.adaLN_modulation.1"),  # swapped in the last block
}
#: modules outside the blocks.
_TOP = {
    "pos_embed.proj": Target("x_embedder.proj"),
    "time_text_embed.timestep_embedder.linear_1": Target("t_embedder.mlp.0"),
    "time_text_embed.timestep_embedder.linear_2": Target("t_embedder.mlp.2"),
    "time_text_embed.text_embedder.linear_1": Target("y_embedder.mlp.0"),
    "time_text_embed.text_embedder.linear_2": Target("y_embedder.mlp.2"),
    "context_embedder": Target("context_embedder"),
    "proj_out": Target("final_layer.linear"),
    "norm_out.linear": Target("final_layer.adaLN_modulation.1", swap=True),
}


def mmdit_target(module: str, num_layers: int | None = None) -> Target:
    """The original SD3 location of a diffusers transformer module.

    Args:
        module: e.g. "transformer_blocks.3.attn.add_q_proj".
        num_layers: blocks in the model; needed only for the last block's norm1_context, whose AdaLN
            output halves the original stores swapped.

    Raises:
        FlowrlError: a module the SD3 layout has no place for, or norm1_context without num_layers.
    """
    if module in _TOP:
        return _TOP[module]
    head, sep, rest = module.partition(".")
    index, _, inner = rest.partition(".")
    if head == "transformer_blocks" and sep and index.isdigit() and inner in _BLOCK:
        t = _BLOCK[inner]
        if inner == "norm1_context.linear":
            if num_layers is None:
                raise FlowrlError(
                    f"{module}: converting norm1_context needs the model's number of blocks; pass --base with the base model"
                )
            t = t._replace(swap=int(index) == num_layers - 1)
        return t._replace(name=f"joint_blocks.{index}.{t.name}")
    raise FlowrlError(
        f"{module} has no counterpart in the original SD3 layout known to flowrl; export this adapter with "
        "--format diffusers (or --merge) instead"
    )


def _block_count(keys: Sequence[str]) -> int:
    return 1 + max(int(k.split(".")[1]) for k in keys if k.startswith("transformer_blocks."))


def mmdit_state_dict(state: Mapping[str, Tensor], prefix: str = MMDIT_PREFIX) -> dict[str, Tensor]:
    """A diffusers SD3Transformer2DModel state dict -> the original SD3 MMDiT layout (the inverse of
    diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``): q, k, v fused into qkv, AdaLN
    halves of the final layers swapped, keys under `prefix` as in Stability's single-file releases.

    Raises:
        FlowrlError: a key the layout has no place for, or a fused qkv with a part missing.
    """
    num_layers = _block_count(list(state))
    fused: dict[str, list[Tensor | None]] = {}
    swapped: set[str] = set()
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key == "pos_embed.pos_embed":
            out[prefix + "pos_embed"] = value
            continue
        module, _, param = key.rpartition(".")
        t = mmdit_target(module, num_layers)
        name = f"{t.name}.{param}"
        fused.setdefault(name, [None] * t.parts)[t.part] = value
        if t.swap:
            swapped.add(name)
    for name, parts in fused.items():
        if any(p is None for p in parts):
            raise FlowrlError(f"{name}: the fused tensor needs all {len(parts)} parts, some are missing from the state dict")
        value = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        out[prefix + name] = swap_halves(value) if name in swapped else value
    return out


def comfy_key(original_module: str) -> str:
    """joint_blocks.0.x_block.attn.qkv -> lora_unet_joint_blocks_0_x_block_attn_qkv (kohya/ComfyUI)."""
    return COMFY_PREFIX + original_module.replace(".", "_")


def adapter_to_comfy(adapter: Adapter, num_layers: int | None = None) -> dict[str, Tensor]:
    """Adapter -> kohya/ComfyUI SD3 LoRA state: ``lora_unet_<module>.lora_down.weight`` [R, in],
    ``.lora_up.weight`` [out, R] and ``.alpha`` (0-d float32; the update is alpha / R * up @ down).

    q, k, v LoRAs of one attention become one LoRA of the fused qkv (`fuse_layers`): exact.
    """
    groups: dict[str, list[LoraLayer | None]] = {}
    swapped: set[str] = set()
    for module, layer in adapter.items():
        t = mmdit_target(module, num_layers)
        groups.setdefault(t.name, [None] * t.parts)[t.part] = layer
        if t.swap:
            swapped.add(t.name)
    state = {}
    for name in sorted(groups):
        layer = fuse_layers(groups[name])
        up = swap_halves(layer.up) if name in swapped else layer.up
        key = comfy_key(name)
        state[f"{key}.lora_down.weight"] = layer.down.contiguous()
        state[f"{key}.lora_up.weight"] = up.contiguous()
        state[f"{key}.alpha"] = torch.tensor(float(layer.alpha), dtype=torch.float32)
    return state


def _comfy_index(num_layers: int) -> dict[str, list[tuple[str, Target]]]:
    """lora_unet_* name -> [(diffusers module, target)] for every module of a num_layers model."""
    index: dict[str, list[tuple[str, Target]]] = {}
    modules = list(_TOP) + [f"transformer_blocks.{i}.{inner}" for i in range(num_layers) for inner in _BLOCK]
    for module in modules:
        t = mmdit_target(module, num_layers)
        index.setdefault(comfy_key(t.name), []).append((module, t))
    return index


def comfy_to_adapter(state: Mapping[str, Tensor], num_layers: int | None = None) -> Adapter:
    """kohya/ComfyUI SD3 LoRA state -> Adapter (the inverse of `adapter_to_comfy`): a fused qkv LoRA
    is split back into q, k, v LoRAs (`split_layer`), exactly; a missing ``.alpha`` means alpha = rank.

    Args:
        state: lora_unet_* tensors.
        num_layers: blocks in the model (only matters for the last block's norm1_context); default: the
            highest block index in the keys + 1.

    Raises:
        FlowrlError: keys of another model or layout.
    """
    suffixes = (".lora_down.weight", ".lora_up.weight", ".alpha")
    odd = sorted(k for k in state if not k.endswith(suffixes))
    if odd:
        raise FlowrlError(
            f"{len(odd)} keys are not plain LoRA tensors (e.g. {odd[:2]}); only lora_down/lora_up/alpha LoRAs "
            "(no DoRA, LoHa, LoKr) can be converted"
        )
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in state}
    blocks = [int(n.split("_")[4]) for n in names if n.startswith(COMFY_PREFIX + "joint_blocks_")]
    index = _comfy_index(num_layers if num_layers is not None else (max(blocks) + 1 if blocks else 0))
    unknown = sorted(n for n in names if n not in index)
    if unknown:
        raise FlowrlError(
            f"{len(unknown)} LoRA modules are not SD3 MMDiT modules (e.g. {unknown[:3]}); only lora_unet_* "
            "keys of an SD3 transformer can be converted"
        )
    adapter: Adapter = {}
    for name in sorted(names):
        try:
            down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
        except KeyError:
            raise FlowrlError(f"{name}: lora_down/lora_up pair incomplete; is this a LoRA file?") from None
        alpha = float(state[f"{name}.alpha"]) if f"{name}.alpha" in state else float(down.shape[0])
        targets = sorted(index[name], key=lambda mt: mt[1].part)
        if targets[0][1].swap:
            up = swap_halves(up)
        for (module, _), part in zip(targets, split_layer(LoraLayer(down, up, alpha), targets[0][1].parts)):
            adapter[module] = part
    return dict(sorted(adapter.items()))


def comfy_file_to_flowrl(path: Path) -> tuple[dict[str, Tensor], int, float]:
    """A kohya/ComfyUI SD3 LoRA file (e.g. one `export_lora` wrote) -> (flowrl adapter state, rank,
    alpha), loadable with ``FlowPolicy.load_adapter_state`` when made with flowrl's LoRA settings."""
    from safetensors.torch import load_file

    return adapter_to_state(comfy_to_adapter(load_file(str(path))))


def adapter_to_diffusers(adapter: Adapter) -> tuple[dict[str, Tensor], dict]:
    """Adapter -> (state for ``load_lora_weights``, diffusers' LoRA adapter metadata).

    Keys are ``transformer.{module}.lora_A.weight`` [r, in] / ``lora_B.weight`` [out, r]. Each scale is
    folded into lora_B (`fold_scale`), so alpha == r everywhere: readers that find no alpha (peft's
    convention, older diffusers, ComfyUI) and diffusers reading the metadata agree.
    """
    state = {}
    ranks = {}
    for module, layer in sorted(adapter.items()):
        folded = fold_scale(layer)
        state[f"transformer.{module}.lora_A.weight"] = folded.down.contiguous()
        state[f"transformer.{module}.lora_B.weight"] = folded.up.contiguous()
        ranks[module] = folded.rank
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {m: k for m, k in ranks.items() if k != r}
    config = {
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(adapter),
    }
    return state, {f"transformer.{k}": v for k, v in config.items()}


# ---------------------------------------------------------------------------------- merging


def merge_into(base: Mapping[str, Tensor], adapter: Adapter, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Base transformer weights + the adapter's updates: W' = W + (alpha / r) B A for each module.

    Computed in float32, stored in `dtype` (default: each weight's own dtype).

    Raises:
        FlowrlError: a module the base does not have, or of another shape.
    """
    check_shapes(adapter, {k: tuple(v.shape) for k, v in base.items()}, "the base model")
    out = {}
    for key, value in base.items():
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        target = dtype or value.dtype
        if module in adapter:
            out[key] = (value.float() + adapter[module].delta()).to(target).contiguous()
        else:
            out[key] = value.to(target) if value.is_floating_point() else value
    return out


def check_shapes(adapter: Adapter, shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
    """Refuse an adapter that does not fit a transformer's weight shapes.

    Args:
        shapes: weight key -> shape of the transformer (e.g. from `base_shapes`).
        where: how to name that transformer in the error.
    """
    missing, wrong = [], []
    for module, layer in adapter.items():
        shape = shapes.get(f"{module}.weight")
        want = (layer.up.shape[0], layer.down.shape[1])
        if shape is None:
            missing.append(module)
        elif tuple(shape) != want:
            wrong.append(f"{module} is {tuple(shape)}, the LoRA needs {want}")
    if missing or wrong:
        problems = ([f"{len(missing)} adapted modules are missing (e.g. {missing[:2]})"] if missing else []) + wrong[:3]
        raise FlowrlError(
            f"the LoRA does not fit {where}: {'; '.join(problems)}. It was trained on another architecture; "
            "use the base model the run trained on (its model.path), or drop --base"
        )


# ------------------------------------------------------------------------ reading checkpoints


def find_checkpoint(path: Path) -> Path:
    """A run folder (its latest complete checkpoint) or an epoch-N folder -> the epoch-N folder.

    Raises:
        FlowrlError: the path does not exist or holds no checkpoint.
    """
    from flowrl.training.checkpoint import CHECKPOINTS, latest_checkpoint

    path = Path(path)
    if not path.exists():
        raise FlowrlError(f"{path} does not exist; pass a run folder (made by `flowrl train`) or its checkpoints/epoch-N folder")
    if path.is_dir() and ((path / CHECKPOINTS).is_dir() or (path / "pipeline.yaml").is_file()):
        found = latest_checkpoint(path)
        if found is None:
            raise FlowrlError(
                f"{path} is a run folder without a complete checkpoint in {path / CHECKPOINTS}; train longer "
                "(checkpoint.every) or pass a checkpoint folder"
            )
        return found[1]
    if path.is_dir() and any((path / f"{w}.safetensors").is_file() for w in WEIGHTS):
        return path
    raise FlowrlError(
        f"{path} is neither a run folder (with pipeline.yaml and checkpoints/) nor a checkpoint folder "
        "(with ema.safetensors / policy.safetensors)"
    )


def pipeline_info(checkpoint: Path) -> tuple[str | None, tuple[str, ...]]:
    """(sha256 of the run's resolved pipeline.yaml, reward labels) for a checkpoint in a run folder;
    (None, ()) when the checkpoint was moved out of its run."""
    import yaml

    run = checkpoint.parent.parent
    file = run / "pipeline.yaml"
    if checkpoint.parent.name != "checkpoints" or not file.is_file():
        return None, ()
    raw = file.read_bytes()
    data = yaml.safe_load(raw) or {}
    labels = tuple(str(r.get("name") or r.get("kind")) for r in data.get("rewards") or [] if isinstance(r, dict))
    return hashlib.sha256(raw).hexdigest(), labels


def check_lora_checkpoint(file: Path, meta: Mapping[str, str]) -> None:
    """Refuse the weights of a full fine-tune (``model.finetune: full``): they are whole transformers,
    not a LoRA, so there is nothing to export; say what to load instead.

    Raises:
        FlowrlError: `meta` (the file's safetensors metadata) marks a full fine-tune.
    """
    if meta.get("finetune", "lora") != "full":
        return
    raise FlowrlError(
        f"{file} holds the whole transformer of a full fine-tune (model.finetune: full), not a LoRA, so there is "
        "no LoRA to export and nothing to merge. The file already is a full transformer state dict in diffusers' "
        "key layout: load it with SD3Transformer2DModel.load_state_dict(safetensors.torch.load_file(...)) into the "
        "base model's transformer (or pass the checkpoint to `flowrl eval`); use `flowrl export-lora` for runs "
        "trained with model.finetune: lora"
    )


def read_source(path: Path, weights: str = "ema") -> Source:
    """Read one checkpoint's adapter (`weights`: "ema" or "policy") and provenance.

    Raises:
        FlowrlError: a missing file, or a file without flowrl's checkpoint metadata.
    """
    from safetensors import safe_open

    if weights not in WEIGHTS:
        raise FlowrlError(f"--weights {weights!r}: choose one of {', '.join(WEIGHTS)}")
    checkpoint = find_checkpoint(path)
    file = checkpoint / f"{weights}.safetensors"
    if not file.is_file():
        present = sorted(p.name for p in checkpoint.glob("*.safetensors"))
        raise FlowrlError(
            f"{file} is missing (the folder has {present or 'no .safetensors files'}); the checkpoint is incomplete "
            f"or was copied partly; choose another checkpoint or --weights {'policy' if weights == 'ema' else 'ema'}"
        )
    try:
        with safe_open(str(file), "pt") as f:
            meta = f.metadata() or {}
            check_lora_checkpoint(file, meta)
            state = {k: f.get_tensor(k) for k in f.keys()}
    except FlowrlError:
        raise
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise FlowrlError(f"cannot read {file}: {err}; the file is damaged, re-copy the checkpoint") from None
    needed = ("epoch", "base_model", "rank", "alpha")
    if any(k not in meta for k in needed):
        raise FlowrlError(
            f"{file} lacks flowrl's checkpoint metadata ({', '.join(k for k in needed if k not in meta)}); "
            "export reads checkpoints written by `flowrl train`"
        )
    rank, alpha = int(meta["rank"]), float(meta["alpha"])
    adapter = adapter_from_state(state, alpha)
    if not adapter:
        raise FlowrlError(f"{file} holds no LoRA weights; the checkpoint is damaged, choose another")
    odd = sorted(m for m, layer in adapter.items() if layer.rank != rank)
    if odd:
        raise FlowrlError(f"{file}: metadata says rank {rank} but {odd[0]} has rank {adapter[odd[0]].rank}; the file is inconsistent")
    sha, rewards = pipeline_info(checkpoint)
    return Source(checkpoint, weights, int(meta["epoch"]), meta["base_model"], rank, alpha, sha, rewards, adapter)


def _same_model(a: str, b: str) -> bool:
    from flowrl.policy import resolve_model_path

    def norm(s: str) -> str:
        where = resolve_model_path(s)
        return str(Path(where).resolve()) if Path(where).exists() else s

    return a == b or norm(a) == norm(b)


def check_mixable(sources: Sequence[Source]) -> None:
    """Refuse to combine checkpoints that are not LoRAs of one architecture on one base model."""
    first = sources[0]
    for s in sources[1:]:
        pair = f"{first.checkpoint} and {s.checkpoint}"
        if not _same_model(first.base_model, s.base_model):
            raise FlowrlError(
                f"cannot mix {pair}: they were trained on different base models ({first.base_model!r} vs "
                f"{s.base_model!r}); a LoRA only means something on its own base. Export them separately"
            )
        if set(first.adapter) != set(s.adapter):
            only = sorted(set(first.adapter) ^ set(s.adapter))
            raise FlowrlError(
                f"cannot mix {pair}: they adapt different modules (model.lora.targets differ, e.g. {only[:2]}); "
                "mix checkpoints of runs with the same targets"
            )
        if first.rank != s.rank:
            raise FlowrlError(
                f"cannot mix {pair}: LoRA rank {first.rank} vs {s.rank} (model.lora.rank); mix checkpoints of "
                "runs with the same adapter architecture"
            )
        shape = lambda layer: (tuple(layer.down.shape), tuple(layer.up.shape))  # noqa: E731
        bad = [m for m in first.adapter if shape(first.adapter[m]) != shape(s.adapter[m])]
        if bad:
            raise FlowrlError(f"cannot mix {pair}: {bad[0]} has different shapes; the runs used different architectures")


# ------------------------------------------------------------------------------- base models


def find_base_transformer(base: str) -> Path | None:
    """The diffusers transformer folder (config.json + safetensors) of a base model: a pipeline folder
    (its transformer/), a transformer folder, or a hub id already in the local cache. None when the
    model is not on this machine (nothing is downloaded).

    Raises:
        FlowrlError: a local folder that holds no diffusers SD3 transformer.
    """
    from flowrl.policy import resolve_model_path

    where = Path(resolve_model_path(base))
    if not where.exists():
        try:
            from huggingface_hub import snapshot_download

            where = Path(snapshot_download(base, allow_patterns=["transformer/*"], local_files_only=True))
        except Exception:  # not cached, or not a valid hub id: both mean "not on this machine"
            return None
    for folder in (where / "transformer", where):
        if (folder / "config.json").is_file() and _weight_files(folder):
            return folder
    raise FlowrlError(
        f"{where} holds no diffusers transformer (transformer/config.json with {TRANSFORMER_WEIGHTS}); point --base at "
        "a diffusers pipeline folder or its transformer/ folder"
    )


def _weight_files(folder: Path) -> list[Path]:
    single = folder / TRANSFORMER_WEIGHTS
    if single.is_file():
        return [single]
    index = folder / f"{TRANSFORMER_WEIGHTS}.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    return []


def base_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Weight key -> shape of a transformer folder, read from the safetensors headers only."""
    from safetensors import safe_open

    shapes = {}
    for file in _weight_files(folder):
        with safe_open(str(file), "pt") as f:
            for k in f.keys():
                shapes[k] = tuple(f.get_slice(k).get_shape())
    return shapes


def load_base_state(folder: Path) -> dict[str, Tensor]:
    """Every weight of a transformer folder (all shards)."""
    from safetensors.torch import load_file

    state = {}
    for file in _weight_files(folder):
        state.update(load_file(str(file)))
    return state


# ---------------------------------------------------------------------------------- writing


def parse_mix(text: str | None, n: int) -> list[float]:
    """'0.7,0.3' -> [0.7, 0.3]; None -> equal weights 1/n.

    Raises:
        FlowrlError: not n finite numbers.
    """
    if text is None:
        return [1.0 / n] * n
    try:
        weights = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FlowrlError(f"--mix {text!r}: expected comma-separated numbers such as 0.7,0.3") from None
    if len(weights) != n or not all(math.isfinite(w) for w in weights):
        raise FlowrlError(f"--mix {text!r}: give one finite weight per checkpoint ({n} checkpoints, {len(weights)} weights)")
    return weights


def export_metadata(sources: Sequence[Source], fmt: str, weights: str, scale: float, mix: Sequence[float], base: str) -> dict[str, str]:
    """safetensors metadata (string values) written into every exported file."""
    from flowrl import __version__

    rewards = list(dict.fromkeys(r for s in sources for r in s.rewards))
    meta = {
        "format": "pt",
        "flowrl.version": __version__,
        "flowrl.format": fmt,
        "flowrl.base_model": base,
        "flowrl.weights": weights,
        "flowrl.scale": repr(float(scale)),
        "flowrl.rank": str(sources[0].rank),
        "flowrl.alpha": repr(sources[0].alpha),
        "flowrl.epoch": ",".join(str(s.epoch) for s in sources),
        "flowrl.rewards": json.dumps(rewards),
        "flowrl.sources": json.dumps(
            [
                {
                    "checkpoint": str(s.checkpoint),
                    "epoch": s.epoch,
                    "pipeline_sha256": s.pipeline_sha256,
                    "rewards": list(s.rewards),
                    "weight": w,
                }
                for s, w in zip(sources, mix)
            ]
        ),
    }
    shas = [s.pipeline_sha256 for s in sources]
    if all(shas):
        meta["flowrl.pipeline_sha256"] = ",".join(shas)  # type: ignore[arg-type]
    if len(sources) > 1:
        meta["flowrl.mix"] = json.dumps(list(mix))
    return meta


def check_output(out: Path, force: bool, protected: Sequence[Path] = ()) -> None:
    """Refuse an output that would overwrite work: a non-empty OUT without --force, or an OUT that
    holds one of the `protected` (input) folders."""
    out_r = Path(out).resolve()
    for p in protected:
        p = Path(p).resolve()
        if p == out_r or out_r in p.parents:
            raise FlowrlError(f"-o {out} would replace the checkpoint {p} being exported; choose another output folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FlowrlError(f"{out} already exists and is not empty; choose another -o, or pass --force to replace it")


def publish(out: Path, write: Callable[[Path], None]) -> None:
    """Run `write(folder)` into a temporary sibling of `out`, then move it into place, so `out` is
    either the complete result or untouched (on any error the temporary folder is removed). The
    files and the folder are flushed to the disk before the rename, as a checkpoint's are."""
    from flowrl.training.checkpoint import fsync_path

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        for f in tmp.rglob("*"):
            fsync_path(f)
        fsync_path(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.replaced-{os.getpid()}"
            out.rename(old)
            try:
                tmp.rename(out)
            except BaseException:
                old.rename(out)
                raise
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(out)
        fsync_path(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


@dataclass(frozen=True)
class ExportResult:
    """What `export_lora` wrote."""

    out: Path
    files: tuple[str, ...]  # relative to out
    sources: tuple[Source, ...]
    weights: tuple[float, ...]
    shapes_checked: bool


def export_lora(
    checkpoints: Sequence[Path],
    out: Path,
    fmt: str = "diffusers",
    merge: bool = False,
    weights: str = "ema",
    scale: float = 1.0,
    mix: str | Sequence[float] | None = None,
    base: str | None = None,
    dtype: str | None = None,
    force: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> ExportResult:
    """Export one checkpoint, or a weighted mix of several, as a LoRA file or merged weights.

    Args:
        checkpoints: run folders or epoch-N folders.
        out: output folder (created; never left half-written).
        fmt: "diffusers", or "comfyui" / "kohya" (the original SD3 layout).
        merge: write the base transformer with the LoRA added instead of the LoRA.
        weights: "ema" or "policy" adapter of each checkpoint.
        scale: multiplies the (mixed) update.
        mix: one weight per checkpoint, as a sequence or comma-separated text (default: equal
            weights summing to 1).
        base: base model to check shapes against and merge into (default: the checkpoints' own).
        dtype: merged weights' dtype ("float32", "bfloat16", "float16"; default: the base's).
        force: replace a non-empty `out`.
        log: receives one-line notes for the user.

    Raises:
        FlowrlError: every user mistake, before anything is written.
    """
    if fmt not in FORMATS:
        raise FlowrlError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    fmt = "comfyui" if fmt == "kohya" else fmt
    if not checkpoints:
        raise FlowrlError("give at least one checkpoint (a run folder or its checkpoints/epoch-N)")
    if not math.isfinite(scale):
        raise FlowrlError(f"--scale {scale}: must be a finite number")
    torch_dtype = None
    if dtype is not None:
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
        if torch_dtype is None:
            raise FlowrlError(f"--dtype {dtype!r}: choose float32, bfloat16 or float16")
        if not merge:
            raise FlowrlError("--dtype applies to merged weights; add --merge, or drop --dtype (a LoRA keeps the checkpoint's dtype)")
    mix_weights = parse_mix(mix if mix is None or isinstance(mix, str) else ",".join(map(str, mix)), len(checkpoints))
    sources = [read_source(Path(c), weights) for c in checkpoints]
    check_output(Path(out), force, [s.checkpoint for s in sources])
    check_mixable(sources)

    base_name = base or sources[0].base_model
    try:
        folder = find_base_transformer(base_name)
    except FlowrlError:
        if base is not None or merge:
            raise
        folder = None  # the LoRA alone needs no base: its own base folder being unusable must not block it
    if folder is None:
        if base is not None or merge:
            raise FlowrlError(
                f"base model {base_name!r} is not on this machine (not a folder, not in the Hugging Face cache); "
                f"fetch it with `hf download {base_name}` or point --base at a local diffusers folder"
            )
        log(f"note: base model {base_name!r} is not on this machine; the LoRA's shapes were not checked against it")
    else:
        check_shapes(sources[0].adapter, base_shapes(folder), f"the base model {base_name!r} ({folder})")
        if base is not None and not _same_model(base, sources[0].base_model):
            log(f"note: using --base {base!r} instead of the checkpoint's {sources[0].base_model!r} (shapes match)")
    num_layers = json.loads((folder / "config.json").read_text()).get("num_layers") if folder else None

    if len(sources) == 1:
        adapter = scale_adapter(sources[0].adapter, mix_weights[0] * scale)
    else:
        adapter = scale_adapter(mix_adapters([s.adapter for s in sources], mix_weights), scale)
    kind = {("diffusers", False): "diffusers-lora", ("comfyui", False): "comfyui-lora",
            ("diffusers", True): "diffusers-transformer", ("comfyui", True): "mmdit-transformer"}[(fmt, merge)]
    meta = export_metadata(sources, kind, weights, scale, mix_weights, base_name)
    files: list[str] = []

    def write(tmp: Path) -> None:
        from safetensors.torch import save_file

        if not merge and fmt == "diffusers":
            state, config = adapter_to_diffusers(adapter)
            save_file(state, str(tmp / LORA_FILE), metadata={**meta, "lora_adapter_metadata": json.dumps(config, sort_keys=True)})
            files.append(LORA_FILE)
        elif not merge:
            save_file(adapter_to_comfy(adapter, num_layers), str(tmp / COMFY_LORA_FILE), metadata=meta)
            files.append(COMFY_LORA_FILE)
        else:
            merged = merge_into(load_base_state(folder), adapter, torch_dtype)
            (tmp / "transformer").mkdir()
            shutil.copyfile(folder / "config.json", tmp / "transformer" / "config.json")
            save_file(merged, str(tmp / "transformer" / TRANSFORMER_WEIGHTS), metadata={**meta, "flowrl.format": "diffusers-transformer"})
            files.extend(["transformer/config.json", f"transformer/{TRANSFORMER_WEIGHTS}"])
            if fmt == "diffusers":
                _link_or_copy(tmp / "transformer" / TRANSFORMER_WEIGHTS, tmp / MERGED_FILE)
            else:
                save_file(mmdit_state_dict(merged), str(tmp / MERGED_FILE), metadata=meta)
            files.append(MERGED_FILE)

    publish(Path(out), write)
    return ExportResult(Path(out), tuple(files), tuple(sources), tuple(mix_weights), folder is not None)
