"""`flowrl export-lora` end to end on the embedded toy model.

Runs are built with the trainer's own writers (pipeline.yaml and checkpoints) around a FlowPolicy
whose adapters hold random nonzero weights, so every LoRA moves the output (a 2-epoch run barely
moves B) and the exact reference is the FlowPolicy itself. rank 4 with alpha 12 makes the scale 3,
so a mishandled alpha cannot pass.
"""

from __future__ import annotations

import json
import re
import shutil
import types
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from flowrl.cli import main
from flowrl.config import load_pipeline as load_config
from flowrl.export import comfy_file_to_flowrl, mmdit_state_dict
from flowrl.paths import TOY_MODEL
from flowrl.policy import FlowPolicy, load_pipeline
from flowrl.train import Trainer

REPO = Path(__file__).resolve().parents[2]
RANK, ALPHA = 4, 12.0

#: Two code paths (peft's multi-adapter layers, diffusers' loaded LoRA) sum in other orders; float32
#: rounding then grows with the output's size (|v| ~ 2 gives ~1e-5 on AVX-512 kernels).
FORWARD_TOL = {"atol": 1e-5, "rtol": 1e-5}


def toy_transformer():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_pretrained(TOY_MODEL / "transformer")


def make_run(folder: Path, seed: int, *overrides: str, epochs: tuple[int, ...] = (1, 3)) -> FlowPolicy:
    """A run folder whose checkpoints hold random adapters; returns the policy of the last epoch."""
    p = load_config(REPO / "pipelines" / "toy-geneval.yaml",
                    [f"model.lora.rank={RANK}", f"model.lora.alpha={ALPHA}", f"model.path={TOY_MODEL}", *overrides])
    pipe = types.SimpleNamespace(transformer=toy_transformer(), vae=None, text_encoder=None, text_encoder_2=None, text_encoder_3=None)
    policy = FlowPolicy(pipe, p.config.model.lora, max_sequence_length=16)
    trainer = Trainer(p, folder)
    trainer.policy, trainer.optimizer = policy, torch.optim.AdamW(policy.trainable_parameters())
    trainer._start_folder()
    g = torch.Generator().manual_seed(seed)
    for epoch in epochs:
        with torch.no_grad():
            for name in ("policy", "ema"):
                for prm in policy.adapter_params(name).values():
                    prm.copy_(torch.randn(prm.shape, generator=g) * 0.05)
        trainer._save_checkpoint(epoch)
    return policy


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("runs")
    return {"a": (root / "a", make_run(root / "a", 0)), "b": (root / "b", make_run(root / "b", 1))}


def inputs():
    g = torch.Generator().manual_seed(42)
    return dict(
        hidden_states=torch.randn(2, 16, 16, 16, generator=g),
        timestep=torch.tensor([250.0, 800.0]),
        encoder_hidden_states=torch.randn(2, 8, 128, generator=g),
        pooled_projections=torch.randn(2, 128, generator=g),
    )


@torch.no_grad()
def forward(transformer) -> torch.Tensor:
    return transformer(**inputs(), return_dict=False)[0]


@torch.no_grad()
def reference(policy: FlowPolicy, scale: float = 1.0, weights: str = "ema") -> torch.Tensor:
    """The policy's output under `weights`, with the LoRA update times `scale` (through the spare
    "old" adapter: B * scale)."""
    state = {k: v * scale if "lora_B" in k else v for k, v in policy.adapter_state(weights).items()}
    policy.load_adapter_state("old", state)
    policy.activate("old")
    return forward(policy.transformer)


def export(*args: str, code: int = 0):
    res = CliRunner().invoke(main, ["export-lora", *args])
    assert res.exit_code == code, res.output
    return res


def meta_of(file: Path) -> dict:
    with safe_open(str(file), "pt") as f:
        return f.metadata()


# ------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("scale", [1.0, -0.5])
def test_diffusers_file_loads_in_stable_diffusion3_pipeline(runs, tmp_path, scale):
    run, policy = runs["a"]
    out = tmp_path / "lora"
    export(str(run), "-o", str(out), "--scale", str(scale))
    pipe = load_pipeline(str(TOY_MODEL))
    base = forward(pipe.transformer)
    pipe.load_lora_weights(str(out))
    ours = forward(pipe.transformer)
    want = reference(policy, scale)
    assert (want - base).abs().max() > 1e-2, "the LoRA must move the output for this test to mean anything"
    torch.testing.assert_close(ours, want, **FORWARD_TOL)

    # Without diffusers' adapter metadata (older diffusers, other readers) alpha defaults to the
    # rank: the folded scale keeps the same result.
    pipe = load_pipeline(str(TOY_MODEL))
    pipe.load_lora_weights(load_file(out / "pytorch_lora_weights.safetensors"))
    torch.testing.assert_close(forward(pipe.transformer), want, **FORWARD_TOL)


def test_latest_checkpoint_and_policy_weights(runs, tmp_path):
    run, policy = runs["a"]
    export(str(run / "checkpoints" / "epoch-1"), "-o", str(tmp_path / "e1"))
    export(str(run), "-o", str(tmp_path / "latest"), "--weights", "policy")
    assert meta_of(tmp_path / "e1" / "pytorch_lora_weights.safetensors")["flowrl.epoch"] == "1"
    latest = tmp_path / "latest" / "pytorch_lora_weights.safetensors"
    assert meta_of(latest)["flowrl.epoch"] == "3" and meta_of(latest)["flowrl.weights"] == "policy"
    pipe = load_pipeline(str(TOY_MODEL))
    pipe.load_lora_weights(str(tmp_path / "latest"))
    torch.testing.assert_close(forward(pipe.transformer), reference(policy, weights="policy"), **FORWARD_TOL)


def test_comfyui_file_keys_round_trip_and_meaning(runs, tmp_path):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    run, policy = runs["a"]
    export(str(run), "-o", str(tmp_path / "c"), "--format", "comfyui")
    export(str(run), "-o", str(tmp_path / "k"), "--format", "kohya")
    file = tmp_path / "c" / "lora.safetensors"
    state = load_file(file)
    assert state.keys() == load_file(tmp_path / "k" / "lora.safetensors").keys()
    pattern = re.compile(
        r"^lora_unet_(joint_blocks_\d+_((x_block_attn2?|context_block_attn)_(qkv|proj)|(x_block|context_block)_(mlp_fc[12]|adaLN_modulation_1))"
        r"|context_embedder)\.(lora_down\.weight|lora_up\.weight|alpha)$"
    )
    assert all(pattern.match(k) for k in state), sorted(k for k in state if not pattern.match(k))
    assert "lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_up.weight" in state  # SD3.5's dual attention
    # toy-geneval.yaml adapts every linear layer: MLPs, AdaLN (the last block's context half swapped) and the text projection
    for name in ("joint_blocks_3_context_block_adaLN_modulation_1", "joint_blocks_1_x_block_mlp_fc2", "context_embedder"):
        assert f"lora_unet_{name}.lora_down.weight" in state
    assert float(state["lora_unet_joint_blocks_0_x_block_attn_qkv.alpha"]) == 3 * ALPHA

    # back to flowrl's layout: identical to the checkpoint
    ckpt = load_file(run / "checkpoints" / "epoch-3" / "ema.safetensors")
    back, rank, alpha = comfy_file_to_flowrl(file)
    assert (rank, alpha) == (RANK, ALPHA) and back.keys() == ckpt.keys()
    assert all(torch.equal(back[k], ckpt[k]) for k in ckpt)

    # its meaning, read the way ComfyUI does (lora_unet_<key with . as _> patches <key>.weight by
    # alpha / rank * up @ down) on the original layout, then converted by diffusers' own converter
    original = mmdit_state_dict(load_file(TOY_MODEL / "transformer" / "diffusion_pytorch_model.safetensors"))
    prefix = "model.diffusion_model."
    by_lora_name = {"lora_unet_" + k[len(prefix):-len(".weight")].replace(".", "_"): k for k in original if k.endswith(".weight")}
    for key in [k for k in state if k.endswith(".lora_down.weight")]:
        name = key[: -len(".lora_down.weight")]
        down, up = state[key], state[f"{name}.lora_up.weight"]
        original[by_lora_name[name]] = original[by_lora_name[name]] + float(state[f"{name}.alpha"]) / down.shape[0] * up @ down
    transformer = toy_transformer()
    transformer.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(original))
    torch.testing.assert_close(forward(transformer), reference(policy), **FORWARD_TOL)


def test_original_layout_is_what_diffusers_converts_back():
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    state = load_file(TOY_MODEL / "transformer" / "diffusion_pytorch_model.safetensors")
    original = mmdit_state_dict(state)
    assert "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight" in original
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("fmt", ["diffusers", "comfyui"])
def test_merged_transformer_equals_base_plus_lora(runs, tmp_path, fmt):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    run, policy = runs["a"]
    out = tmp_path / "merged"
    export(str(run), "-o", str(out), "--merge", "--format", fmt, "--scale", "0.5")
    merged = SD3Transformer2DModel.from_pretrained(out / "transformer")
    assert not any("lora" in n for n, _ in merged.named_modules()) and not getattr(merged, "peft_config", None)
    torch.testing.assert_close(forward(merged), reference(policy, 0.5), **FORWARD_TOL)
    folder = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    single = load_file(out / "transformer.safetensors")
    if fmt == "diffusers":
        assert single.keys() == folder.keys() and all(torch.equal(single[k], folder[k]) for k in folder)
    else:
        converted = convert_sd3_transformer_checkpoint_to_diffusers(single)
        assert all(torch.equal(converted[k], folder[k]) for k in folder)
    for f in (out / "transformer.safetensors", out / "transformer" / "diffusion_pytorch_model.safetensors"):
        assert meta_of(f)["flowrl.format"] in ("diffusers-transformer", "mmdit-transformer")


def test_merge_dtype(runs, tmp_path):
    run, _ = runs["a"]
    export(str(run), "-o", str(tmp_path / "m"), "--merge", "--dtype", "bfloat16")
    assert all(v.dtype == torch.bfloat16 for v in load_file(tmp_path / "m" / "transformer.safetensors").values())


def test_mix_is_the_weighted_sum_of_updates(runs, tmp_path):
    (run_a, pa), (run_b, pb) = runs["a"], runs["b"]
    out = tmp_path / "mix"
    export(str(run_a), str(run_b), "--mix", "0.7,0.3", "-o", str(out))
    state = load_file(out / "pytorch_lora_weights.safetensors")
    meta = meta_of(out / "pytorch_lora_weights.safetensors")
    assert json.loads(meta["flowrl.mix"]) == [0.7, 0.3] and json.loads(meta["lora_adapter_metadata"])["transformer.r"] == 2 * RANK
    sa, sb = pa.adapter_state("ema"), pb.adapter_state("ema")
    s = ALPHA / RANK
    for key in [k for k in sa if "lora_A" in k]:
        m = key[: -len(".lora_A.weight")]
        delta = state[f"transformer.{m}.lora_B.weight"] @ state[f"transformer.{m}.lora_A.weight"]
        want = 0.7 * s * sa[f"{m}.lora_B.weight"] @ sa[key] + 0.3 * s * sb[f"{m}.lora_B.weight"] @ sb[key]
        torch.testing.assert_close(delta, want, atol=1e-6, rtol=1e-5)

    merged_out = tmp_path / "mix-merged"
    export(str(run_a), str(run_b), "--mix", "0.7,0.3", "-o", str(merged_out), "--merge")
    pipe = load_pipeline(str(TOY_MODEL))
    pipe.load_lora_weights(str(out))
    from diffusers import SD3Transformer2DModel

    torch.testing.assert_close(forward(SD3Transformer2DModel.from_pretrained(merged_out / "transformer")), forward(pipe.transformer), **FORWARD_TOL)


def test_metadata_on_every_file(runs, tmp_path):
    run, _ = runs["a"]
    export(str(run), "-o", str(tmp_path / "d"), "--scale", "2")
    export(str(run), "-o", str(tmp_path / "c"), "--format", "comfyui", "--weights", "policy")
    export(str(run), "-o", str(tmp_path / "m"), "--merge")
    files = [tmp_path / "d" / "pytorch_lora_weights.safetensors", tmp_path / "c" / "lora.safetensors",
             tmp_path / "m" / "transformer.safetensors", tmp_path / "m" / "transformer" / "diffusion_pytorch_model.safetensors"]
    import hashlib

    sha = hashlib.sha256((run / "pipeline.yaml").read_bytes()).hexdigest()
    for f in files:
        m = meta_of(f)
        assert m["flowrl.base_model"] == str(TOY_MODEL) and m["flowrl.pipeline_sha256"] == sha, f
        assert json.loads(m["flowrl.rewards"]) == ["geneval"] and m["flowrl.epoch"] == "3"
        assert (m["flowrl.rank"], m["flowrl.alpha"]) == (str(RANK), repr(ALPHA))
        assert m["flowrl.version"] and m["flowrl.format"] and m["flowrl.weights"] in ("ema", "policy")
    assert meta_of(files[0])["flowrl.scale"] == "2.0" and meta_of(files[1])["flowrl.weights"] == "policy"
    assert meta_of(files[0])["flowrl.format"] == "diffusers-lora" and meta_of(files[1])["flowrl.format"] == "comfyui-lora"


def test_force_replaces_a_previous_export(runs, tmp_path):
    run, _ = runs["a"]
    out = tmp_path / "o"
    export(str(run), "-o", str(out), "--format", "comfyui")
    export(str(run), "-o", str(out), "--force")
    assert sorted(p.name for p in out.iterdir()) == ["pytorch_lora_weights.safetensors"]


def test_lora_export_without_the_base_on_this_machine(tmp_path):
    run = tmp_path / "run"
    make_run(run, 3, "model.path=nobody/not-downloaded-sd3", epochs=(0,))
    res = export(str(run), "-o", str(tmp_path / "lora"))
    assert "shapes were not checked" in res.output
    assert meta_of(tmp_path / "lora" / "pytorch_lora_weights.safetensors")["flowrl.base_model"] == "nobody/not-downloaded-sd3"
    refused(str(run), "-o", str(tmp_path / "merged"), "--merge", match="not on this machine.*hf download")


# ------------------------------------------------------------------------------------ refusals


def bad_base(folder: Path) -> Path:
    """A real SD3 transformer folder of other sizes."""
    from diffusers import SD3Transformer2DModel

    SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                          joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64, out_channels=16,
                          pos_embed_max_size=8).save_pretrained(folder / "transformer")
    return folder


def refused(*args: str, match: str):
    res = export(*args, code=2)
    assert re.search(match, res.output), res.output
    assert "Traceback" not in res.output


def test_refusals(runs, tmp_path):
    run, _ = runs["a"]
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    refused(str(run), "-o", str(full), match="not empty.*--force")
    assert [p.name for p in full.iterdir()] == ["keep.txt"]

    refused(str(tmp_path / "nope"), "-o", str(tmp_path / "o1"), match="does not exist")
    empty_run = tmp_path / "empty-run"
    (empty_run / "checkpoints").mkdir(parents=True)
    refused(str(empty_run), "-o", str(tmp_path / "o2"), match="without a complete checkpoint")
    refused(str(tmp_path), "-o", str(tmp_path / "o3"), match="neither a run folder")

    partial = tmp_path / "partial-epoch-3"
    shutil.copytree(run / "checkpoints" / "epoch-3", partial)
    (partial / "ema.safetensors").unlink()
    refused(str(partial), "-o", str(tmp_path / "o4"), match=r"ema.safetensors is missing.*--weights policy")

    refused(str(run), "-o", str(run / "checkpoints"), "--force", match="would replace the checkpoint")
    refused(str(run), str(run), "--mix", "1,2,3", "-o", str(tmp_path / "o5"), match="one finite weight per checkpoint")
    refused(str(run), "-o", str(tmp_path / "o6"), "--base", str(bad_base(tmp_path / "bad")), match=r"does not fit .*is \(32, 32\), the LoRA needs \(128, 128\)")
    refused(str(run), "-o", str(tmp_path / "o7"), "--base", "nobody/missing-model", match="not on this machine")
    refused(str(run), "-o", str(tmp_path / "o8"), "--dtype", "float16", match="--dtype applies to merged")
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".") or p.name.startswith("o")]
    assert leftovers == [], f"refusals must write nothing: {leftovers}"


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (("model.path=/elsewhere/other-sd3",), "different base models"),
        (("model.lora.rank=2", "model.lora.alpha=4"), "rank 4 vs 2"),
        (("model.lora.targets=[to_q,to_k,to_v]",), "different modules"),
    ],
)
def test_refuses_to_mix_different_architectures(runs, tmp_path, overrides, match):
    run, _ = runs["a"]
    other = tmp_path / "other"
    make_run(other, 5, *overrides, epochs=(0,))
    refused(str(run), str(other), "-o", str(tmp_path / "o"), match=match)
    assert not (tmp_path / "o").exists()
