"""FlowPolicy on the embedded toy model: LoRA adapters, and flowrl's Euler sampler reproducing
diffusers' own StableDiffusion3Pipeline for the same noise."""

from __future__ import annotations

import pytest
import torch

from flowrl.config import LoraConfig, ModelConfig
from flowrl.errors import FlowrlError, ModelNotFoundError
from flowrl.paths import TOY_MODEL
from flowrl.policy import FlowPolicy, load_pipeline

PROMPTS = ["a photo of a red circle", "a photo of two bars"]


@pytest.fixture(scope="module")
def policy() -> FlowPolicy:
    return FlowPolicy.from_config(ModelConfig(path=str(TOY_MODEL), lora=LoraConfig(rank=4, alpha=8)))


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_euler_reproduces_diffusers_pipeline(policy, guidance):
    from flowrl.samplers import initial_noise
    from flowrl.registry import lookup

    steps = 6
    pipe = load_pipeline(str(TOY_MODEL))
    noise = initial_noise([11, 12], policy.latent_shape)
    ref = pipe(PROMPTS, latents=noise.clone(), num_inference_steps=steps, guidance_scale=guidance,
               max_sequence_length=policy.max_sequence_length, output_type="pt").images
    sampler_cls = lookup("sampler", "euler")
    sampler = sampler_cls(sampler_cls.Config(kind="euler", steps=steps, guidance=guidance))
    cond = policy.encode(PROMPTS, with_negative=guidance != 1.0)
    with torch.no_grad():
        x0, sigmas, traj = sampler(policy, cond, [11, 12], policy.latent_shape)
        ours = policy.decode(x0)
    assert traj is None and sigmas.shape == (steps + 1,)
    torch.testing.assert_close(ours, ref.float(), atol=1e-5, rtol=0)


def _timesteps_seen(transformer, run) -> list[torch.Tensor]:
    """The `timestep` argument of every transformer call made by `run()`."""
    seen: list[torch.Tensor] = []
    handle = transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["timestep"].detach().clone()), with_kwargs=True
    )
    try:
        run()
    finally:
        handle.remove()
    return seen


def test_a_bf16_model_gets_the_float32_timesteps_diffusers_gives_it():
    """StableDiffusion3Pipeline hands its transformer the scheduler's float32 timesteps even in
    bfloat16; flowrl must pass the very same values, not t * 1000 rounded to bfloat16 (multiples of
    4 near 1000: 973.06 -> 972, 943.05 -> 944)."""
    from flowrl.registry import lookup
    from flowrl.samplers import initial_noise

    steps = 6
    policy = FlowPolicy.from_config(ModelConfig(path=str(TOY_MODEL), dtype="bfloat16", lora=LoraConfig(rank=4, alpha=8)))
    pipe = load_pipeline(str(TOY_MODEL), torch.bfloat16)
    noise = initial_noise([11, 12], policy.latent_shape)
    theirs = _timesteps_seen(pipe.transformer, lambda: pipe(
        PROMPTS, latents=noise.to(torch.bfloat16), num_inference_steps=steps, guidance_scale=1.0,
        max_sequence_length=policy.max_sequence_length, output_type="latent"))
    sampler_cls = lookup("sampler", "euler")
    sampler = sampler_cls(sampler_cls.Config(kind="euler", steps=steps, guidance=1.0))
    cond = policy.encode(PROMPTS)
    with torch.no_grad():
        ours = _timesteps_seen(policy.transformer, lambda: sampler(policy, cond, [11, 12], policy.latent_shape))
    assert len(ours) == len(theirs) == steps
    for mine, ref in zip(ours, theirs, strict=True):
        assert mine.dtype == ref.dtype == torch.float32
        assert torch.equal(mine, ref)
    assert not torch.equal(theirs[1], theirs[1].to(torch.bfloat16).float()), "the grid must hold a time bf16 rounds"


def test_adapters_start_equal_to_the_base_and_blend(policy):
    cond = policy.encode(PROMPTS)
    x, t = torch.randn(2, *policy.latent_shape), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        v = {w: policy.velocity(x, t, cond, w) for w in ("policy", "old", "ema", "ref")}
    assert all(torch.equal(v["ref"], v[w]) for w in ("policy", "old", "ema")), "B = 0 at init: adapters are the identity"
    saved = policy.adapter_state("policy")
    with torch.no_grad():
        for k, p in policy.adapter_params("policy").items():
            if "lora_B" in k:
                p.fill_(0.01)
        moved = policy.velocity(x, t, cond, "policy")
        assert not torch.allclose(moved, v["ref"])
        assert torch.equal(policy.velocity(x, t, cond, "old"), v["old"]), "other adapters must not move"
    before = policy.adapter_state("old")
    policy.blend_adapter("old", "policy", 0.25)
    after, pol = policy.adapter_state("old"), policy.adapter_state("policy")
    for k in after:
        torch.testing.assert_close(after[k], 0.25 * before[k] + 0.75 * pol[k])
    policy.load_adapter_state("policy", saved)
    policy.copy_adapter("policy", "old")
    assert all(p.requires_grad for p in policy.trainable_parameters())
    assert not any(p.requires_grad for p in policy.adapter_params("old").values())


@pytest.mark.slow
def test_compiled_velocity_follows_every_adapter():
    """train.compile: velocity runs through torch.compile's wrapper, which must see adapter switches
    (policy / old / ref) and gradients as the eager module does. The eager backend checks dynamo's
    tracing and guards in seconds; benchmarks/toy_epoch.py --compile times the inductor one."""
    pol = FlowPolicy.from_config(ModelConfig(path=str(TOY_MODEL), lora=LoraConfig(rank=4, alpha=8)), seed=1)
    cond = pol.encode(PROMPTS)
    x, t = torch.randn(2, *pol.latent_shape, generator=torch.Generator().manual_seed(0)), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        for p in pol.adapter_params("policy").values():
            p.add_(0.05)
        eager = {w: pol.velocity(x, t, cond, w) for w in ("policy", "old", "ref")}
    pol.compile(backend="eager")
    with torch.no_grad():
        for w in ("policy", "old", "ref", "policy"):
            torch.testing.assert_close(pol.velocity(x, t, cond, w), eager[w], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(eager["policy"], eager["old"])
    pol.velocity(x, t, cond, "policy").square().mean().backward()
    assert all(p.grad is not None for p in pol.trainable_parameters())
    assert set(pol.adapter_params("policy")) == {k for k in pol.adapter_state("policy")}  # names unchanged
    assert not any("_orig_mod" in k for k in pol.adapter_params("policy"))


def test_only_policy_adapter_gets_gradients(policy):
    cond = policy.encode(PROMPTS)
    x, t = torch.randn(2, *policy.latent_shape), torch.tensor([0.5, 0.5])
    with torch.no_grad():
        policy.velocity(x, t, cond, "old")
    policy.velocity(x, t, cond, "policy").square().mean().backward()
    assert all(p.grad is not None for p in policy.trainable_parameters())
    assert all(p.grad is None for p in policy.adapter_params("old").values())
    for p in policy.trainable_parameters():
        p.grad = None


def test_mismatched_adapter_state_is_refused(policy):
    with pytest.raises(FlowrlError, match="do not fit"):
        policy.load_adapter_state("policy", {"nope.lora_A.weight": torch.zeros(1)})


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        load_pipeline(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="local diffusers folder"):
        load_pipeline("someone/not-a-cached-model")


# ------------------------------------------------------------------------------ full fine-tuning

BASE_WEIGHTS = TOY_MODEL / "transformer" / "diffusion_pytorch_model.safetensors"


def test_full_finetune_trains_every_weight_of_its_own_copy_and_blends():
    from safetensors.torch import load_file

    base = load_file(BASE_WEIGHTS)
    policy = FlowPolicy.from_config(ModelConfig(path=str(TOY_MODEL), finetune="full"), reference=True)
    assert policy.finetune == "full" and list(policy.full.modules) == ["policy", "old", "ema", "ref"]
    cond = policy.encode(PROMPTS)
    x, t = torch.randn(2, *policy.latent_shape), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        v = {w: policy.velocity(x, t, cond, w) for w in ("policy", "old", "ema", "ref")}
    assert all(torch.equal(v["ref"], v[w]) for w in ("policy", "old", "ema")), "every copy starts as the base"

    params = policy.trainable_parameters()
    names = dict(policy.adapter_params("policy"))
    assert set(names) == set(base) - {"pos_embed.pos_embed"}, "every transformer weight (pos_embed is a buffer)"
    policy.velocity(x, t, cond, "policy").square().mean().backward()
    assert all(p.grad is not None and p.dtype == torch.float32 for p in params)
    for other in ("old", "ema", "ref"):
        assert not any(p.requires_grad or p.grad is not None for p in policy.adapter_params(other).values()), other
    dead = sorted(k for k, p in names.items() if not bool(p.grad.any()))
    # SD3's last block is context_pre_only: its text-stream output is dropped, so its text query is unused.
    assert dead == [f"transformer_blocks.3.attn.{n}" for n in ("add_q_proj.bias", "add_q_proj.weight", "norm_added_q.weight")]
    torch.optim.SGD(params, lr=0.1).step()
    for p in params:
        p.grad = None
    moved = policy.adapter_state("policy")
    assert all(not torch.equal(moved[k], base[k]) for k in names if k not in dead), "the step moves every weight"
    ref = policy.full.modules["ref"].state_dict()
    assert all(torch.equal(ref[k], base[k]) for k in base), "the reference stays the base"
    with torch.no_grad():
        assert torch.equal(policy.velocity(x, t, cond, "ref"), v["ref"])
        assert torch.equal(policy.velocity(x, t, cond, "old"), v["old"]), "other copies must not move"

    for dst, decay in (("old", 0.25), ("ema", 0.9)):
        before = policy.adapter_state(dst)
        policy.blend_adapter(dst, "policy", decay)
        after = policy.adapter_state(dst)
        for k in before:
            torch.testing.assert_close(after[k], decay * before[k] + (1 - decay) * moved[k], rtol=1e-6, atol=1e-7)
    policy.copy_adapter("policy", "old")
    assert all(torch.equal(a, moved[k]) for k, a in policy.adapter_state("old").items())
    policy.load_adapter_state("policy", base)
    with torch.no_grad():
        assert torch.equal(policy.velocity(x, t, cond, "policy"), v["ref"]), "a loaded state dict is the weights"


def test_full_finetune_keeps_float32_masters_and_makes_the_reference_only_when_asked():
    policy = FlowPolicy.from_config(ModelConfig(path=str(TOY_MODEL), dtype="bfloat16", finetune="full"))
    assert list(policy.full.modules) == ["policy", "old", "ema"]
    assert policy.dtype == torch.bfloat16, "forward passes compute in model.dtype"
    assert all(p.dtype == torch.float32 for w in ("policy", "old", "ema") for p in policy.adapter_params(w).values())
    cond = policy.encode(PROMPTS)
    x, t = torch.randn(2, *policy.latent_shape), torch.tensor([0.3, 0.8])
    v = policy.velocity(x, t, cond, "policy")
    v.square().mean().backward()
    assert v.dtype == torch.float32 and bool(torch.isfinite(v).all())
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in policy.trainable_parameters())
    with pytest.raises(FlowrlError, match="objective.kl.beta > 0"):
        policy.velocity(x, t, cond, "ref")
    with pytest.raises(FlowrlError, match="LoRA checkpoint"):
        policy.load_adapter_state("policy", {"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(1)})
