"""Pure parts of LoRA export: fusing q/k/v LoRAs, mixing, folding scales, key layouts, safe writing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from flowrl.errors import FlowrlError
from flowrl.export import (
    LoraLayer,
    adapter_from_state,
    adapter_to_comfy,
    adapter_to_diffusers,
    adapter_to_state,
    check_output,
    check_shapes,
    comfy_to_adapter,
    fold_scale,
    fuse_layers,
    merge_into,
    mix_adapters,
    mmdit_target,
    parse_mix,
    publish,
    scale_adapter,
    split_layer,
    swap_halves,
)


def layer(rank: int, n_in: int, n_out: int, alpha: float, seed: int) -> LoraLayer:
    g = torch.Generator().manual_seed(seed)
    return LoraLayer(torch.randn(rank, n_in, generator=g), torch.randn(n_out, rank, generator=g), alpha)


def attention_adapter(rank: int = 2, alpha: float = 6.0, dim: int = 5, blocks: int = 2, seed: int = 0) -> dict[str, LoraLayer]:
    """Every default flowrl target of `blocks` SD3 blocks (the last one has no to_add_out, as in SD3)."""
    inner = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
    out, s = {}, seed
    for i in range(blocks):
        for name in inner:
            if i == blocks - 1 and name == "attn.to_add_out":
                continue
            out[f"transformer_blocks.{i}.{name}"] = layer(rank, dim, dim, alpha, s)
            s += 1
    return out


def test_lora_layer_delta_is_alpha_over_rank_times_up_down():
    lo = LoraLayer(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0], [4.0]]), alpha=2.0)  # rank 1, scale 2
    torch.testing.assert_close(lo.delta(), torch.tensor([[6.0, 12.0], [8.0, 16.0]]))


def test_fuse_is_block_diagonal_and_exact():
    q, k, v = (layer(2, 3, 4, 6.0, s) for s in range(3))  # scale 3 each
    fused = fuse_layers([q, k, v])
    assert fused.down.shape == (6, 3) and fused.up.shape == (12, 6)
    assert fused.alpha == 18.0, "alpha scales with the rank so that alpha / rank stays 3"
    assert torch.equal(fused.up[0:4, 2:6], torch.zeros(4, 4)) and torch.equal(fused.up[4:8, 0:2], torch.zeros(4, 2))
    torch.testing.assert_close(fused.delta(), torch.cat([q.delta(), k.delta(), v.delta()]))


def test_fuse_with_a_missing_part_gives_zero_rows():
    q, v = layer(2, 3, 4, 2.0, 0), layer(2, 3, 4, 2.0, 1)
    fused = fuse_layers([q, None, v])
    torch.testing.assert_close(fused.delta(), torch.cat([q.delta(), torch.zeros(4, 3), v.delta()]))


def test_fuse_folds_different_scales():
    a, b = layer(2, 3, 4, 2.0, 0), layer(1, 3, 4, 5.0, 1)
    fused = fuse_layers([a, b])
    assert fused.scale == 1.0
    torch.testing.assert_close(fused.delta(), torch.cat([a.delta(), b.delta()]))


def test_split_inverts_fuse_bit_for_bit():
    parts = [layer(2, 3, 4, 6.0, s) for s in range(3)]
    back = split_layer(fuse_layers(parts), 3)
    for p, b in zip(parts, back):
        assert torch.equal(p.down, b.down) and torch.equal(p.up, b.up) and b.alpha == pytest.approx(p.alpha)


def test_split_of_a_dense_fused_lora_shares_down_and_stays_exact():
    dense = layer(3, 5, 6, 3.0, 7)  # a qkv LoRA trained fused (kohya): up is not block-diagonal
    parts = split_layer(dense, 3)
    assert all(p.rank == 3 for p in parts)
    torch.testing.assert_close(torch.cat([p.delta() for p in parts]), dense.delta())


def test_scale_changes_alpha_not_tensors():
    a = {"m": layer(2, 3, 4, 4.0, 0)}
    s = scale_adapter(a, -0.5)
    assert s["m"].down is a["m"].down and s["m"].up is a["m"].up
    torch.testing.assert_close(s["m"].delta(), -0.5 * a["m"].delta())


def test_fold_scale_keeps_the_update():
    lo = layer(2, 3, 4, 7.0, 0)
    folded = fold_scale(lo)
    assert folded.alpha == 2.0 and torch.equal(folded.down, lo.down)
    torch.testing.assert_close(folded.delta(), lo.delta())


def test_mix_concatenates_ranks_and_equals_weighted_sum():
    a, b = {"m": layer(2, 3, 4, 4.0, 0)}, {"m": layer(2, 3, 4, 1.0, 1)}
    mixed = mix_adapters([a, b], [0.7, 0.3])
    assert mixed["m"].rank == 4 and mixed["m"].scale == 1.0
    torch.testing.assert_close(mixed["m"].delta(), 0.7 * a["m"].delta() + 0.3 * b["m"].delta())
    with pytest.raises(FlowrlError, match="different modules"):
        mix_adapters([a, {"n": b["m"]}], [0.5, 0.5])


def test_mmdit_targets_hand_table():
    assert mmdit_target("transformer_blocks.7.attn.to_k") == ("joint_blocks.7.x_block.attn.qkv", 1, 3, False)
    assert mmdit_target("transformer_blocks.0.attn.add_v_proj") == ("joint_blocks.0.context_block.attn.qkv", 2, 3, False)
    assert mmdit_target("transformer_blocks.2.attn.to_out.0").name == "joint_blocks.2.x_block.attn.proj"
    assert mmdit_target("transformer_blocks.2.attn.to_add_out").name == "joint_blocks.2.context_block.attn.proj"
    assert mmdit_target("transformer_blocks.0.attn2.to_q") == ("joint_blocks.0.x_block.attn2.qkv", 0, 3, False)
    assert mmdit_target("norm_out.linear").swap
    assert mmdit_target("transformer_blocks.3.norm1_context.linear", num_layers=4).swap
    assert not mmdit_target("transformer_blocks.2.norm1_context.linear", num_layers=4).swap
    with pytest.raises(FlowrlError, match="number of blocks"):
        mmdit_target("transformer_blocks.3.norm1_context.linear")
    with pytest.raises(FlowrlError, match="--format diffusers"):
        mmdit_target("transformer_blocks.0.attn.something_new")


def test_comfy_keys_and_round_trip():
    adapter = attention_adapter(rank=2, alpha=6.0)
    state = adapter_to_comfy(adapter)
    pattern = re.compile(r"^lora_unet_joint_blocks_\d+_(x|context)_block_attn_(qkv|proj)\.(lora_down\.weight|lora_up\.weight|alpha)$")
    assert all(pattern.match(k) for k in state), [k for k in state if not pattern.match(k)]
    assert "lora_unet_joint_blocks_1_context_block_attn_proj.alpha" not in state  # the last block has no to_add_out
    assert state["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"].shape == (6, 5)
    assert state["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"].shape == (15, 6)
    assert float(state["lora_unet_joint_blocks_0_x_block_attn_qkv.alpha"]) == 18.0  # 3r with alpha/rank kept
    assert float(state["lora_unet_joint_blocks_0_x_block_attn_proj.alpha"]) == 6.0
    assert state["lora_unet_joint_blocks_0_x_block_attn_proj.alpha"].ndim == 0
    back = comfy_to_adapter(state)
    assert back.keys() == adapter.keys()
    for m in adapter:
        assert torch.equal(back[m].down, adapter[m].down) and torch.equal(back[m].up, adapter[m].up), m
        assert back[m].alpha == pytest.approx(adapter[m].alpha)
    st_a, rank, alpha = adapter_to_state(back)
    assert rank == 2 and alpha == pytest.approx(6.0)


def test_comfy_swapped_adaln_round_trip():
    adapter = {"norm_out.linear": layer(2, 3, 8, 2.0, 0)}
    state = adapter_to_comfy(adapter)
    up = state["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"]
    assert torch.equal(up, swap_halves(adapter["norm_out.linear"].up))
    assert torch.equal(comfy_to_adapter(state)["norm_out.linear"].up, adapter["norm_out.linear"].up)


def test_comfy_refuses_foreign_keys():
    with pytest.raises(FlowrlError, match="not SD3 MMDiT modules"):
        comfy_to_adapter({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(1, 2),
                          "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(2, 1)})


def test_diffusers_state_folds_scale_and_declares_alpha_equal_rank():
    adapter = attention_adapter(rank=2, alpha=6.0, blocks=1)
    state, meta = adapter_to_diffusers(adapter)
    m = "transformer_blocks.0.attn.to_q"
    assert torch.equal(state[f"transformer.{m}.lora_A.weight"], adapter[m].down)
    torch.testing.assert_close(state[f"transformer.{m}.lora_B.weight"], 3.0 * adapter[m].up)
    assert meta["transformer.r"] == 2 and meta["transformer.lora_alpha"] == 2
    assert meta["transformer.target_modules"] == sorted(adapter) and meta["transformer.rank_pattern"] == {}


def test_adapter_from_state_checks_pairs_and_shapes():
    good = {"a.lora_A.weight": torch.zeros(2, 3), "a.lora_B.weight": torch.zeros(4, 2)}
    assert adapter_from_state(good, 4.0)["a"].scale == 2.0
    with pytest.raises(FlowrlError, match="unpaired"):
        adapter_from_state({"a.lora_A.weight": torch.zeros(2, 3)}, 4.0)
    with pytest.raises(FlowrlError, match="linear layer"):
        adapter_from_state({"a.lora_A.weight": torch.zeros(2, 3, 1, 1), "a.lora_B.weight": torch.zeros(4, 2, 1, 1)}, 4.0)


def test_check_shapes_and_merge():
    adapter = {"m": layer(2, 3, 4, 2.0, 0)}
    with pytest.raises(FlowrlError, match=r"m is \(4, 5\), the LoRA needs \(4, 3\)"):
        check_shapes(adapter, {"m.weight": (4, 5)}, "x")
    with pytest.raises(FlowrlError, match="1 adapted modules are missing"):
        check_shapes(adapter, {"other.weight": (4, 3)}, "x")
    base = {"m.weight": torch.ones(4, 3, dtype=torch.float64), "m.bias": torch.zeros(4)}
    merged = merge_into(base, adapter)
    assert merged["m.weight"].dtype == torch.float64 and torch.equal(merged["m.bias"], base["m.bias"])
    torch.testing.assert_close(merged["m.weight"].float(), 1 + adapter["m"].delta())


def test_parse_mix():
    assert parse_mix(None, 4) == [0.25] * 4
    assert parse_mix("0.7, 0.3", 2) == [0.7, 0.3]
    for bad in ("0.7", "a,b", "1,nan"):
        with pytest.raises(FlowrlError, match="--mix"):
            parse_mix(bad, 2)


def test_check_output(tmp_path: Path):
    check_output(tmp_path / "new", force=False)
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", force=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FlowrlError, match="--force"):
        check_output(tmp_path / "full", force=False)
    check_output(tmp_path / "full", force=True)
    with pytest.raises(FlowrlError, match="would replace the checkpoint"):
        check_output(tmp_path, force=True, protected=[tmp_path / "run" / "checkpoints" / "epoch-1"])


def test_publish_is_all_or_nothing(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def fail(folder: Path) -> None:
        (folder / "half.bin").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        publish(out, fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "old.txt").read_text() == "old"
    publish(out, lambda folder: (folder / "new.txt").write_text("new"))
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no temporary folders are left behind"
