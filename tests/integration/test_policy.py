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
