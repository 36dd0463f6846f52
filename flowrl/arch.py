"""The SD3.5-Medium architecture as configs, and random-weight builds of it (nothing downloaded).

`SD35M` holds the published sizes of stabilityai/stable-diffusion-3.5-medium (transformer 2.24 B
parameters: 24 joint blocks, 24 heads of 64, dual-attention blocks 0-12, qk RMS-norm; 16-channel
VAE; CLIP-L, CLIP-G and T5-XXL text encoders). `sd35m_components` builds diffusers/transformers
modules of that shape with random weights, optionally shrunk by `tiny_sd35m` for tests, so loading
and training code can be exercised on the real architecture without weights.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch


@dataclass(frozen=True)
class SD35Arch:
    """Sizes of an SD3.5-style model. Defaults are SD3.5 Medium's published configs."""

    # transformer (SD3Transformer2DModel)
    sample_size: int = 128  # latent size at the native 1024 px; 512 px images give 64x64 latents
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 24
    attention_head_dim: int = 64
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1536
    pooled_projection_dim: int = 2048
    pos_embed_max_size: int = 384
    dual_attention_layers: tuple[int, ...] = tuple(range(13))
    # VAE (AutoencoderKL)
    vae_channels: tuple[int, ...] = (128, 256, 512, 512)
    vae_layers_per_block: int = 2
    vae_norm_groups: int = 32
    scaling_factor: float = 1.5305
    shift_factor: float = 0.0609
    # CLIP-L (text_encoder) and CLIP-G (text_encoder_2), both with projection
    clip_l: tuple[int, int, int, int] = (768, 3072, 12, 12)  # hidden, intermediate, layers, heads
    clip_g: tuple[int, int, int, int] = (1280, 5120, 32, 20)
    clip_l_projection: int = 768
    clip_g_projection: int = 1280
    clip_max_length: int = 77
    clip_vocab: int = 49408
    # T5-XXL encoder (text_encoder_3)
    t5: tuple[int, int, int, int, int] = (4096, 10240, 24, 64, 64)  # d_model, d_ff, layers, heads, d_kv
    t5_vocab: int = 32128
    shift: float = 3.0

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


#: SD3.5 Medium.
SD35M = SD35Arch()


def tiny_sd35m(layers: int = 2, heads: int = 2, head_dim: int = 16, sample_size: int = 16) -> SD35Arch:
    """SD3.5-M's architecture (dual attention in every block here, qk RMS-norm, three text encoders)
    shrunk to a few hundred thousand parameters, for tests and `--dry-run`s."""
    return replace(
        SD35M,
        sample_size=sample_size,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=64,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=64,
        pos_embed_max_size=sample_size // 2,
        dual_attention_layers=tuple(range(layers)),
        vae_channels=(16, 16),
        vae_layers_per_block=1,
        vae_norm_groups=8,
        clip_l=(32, 64, 1, 2),
        clip_g=(32, 64, 1, 2),
        clip_l_projection=32,
        clip_g_projection=32,
        clip_max_length=16,
        t5=(64, 128, 1, 2, 16),
    )


def build_transformer(arch: SD35Arch):
    """A random-weight SD3Transformer2DModel of `arch` (float32, CPU)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=arch.sample_size,
        patch_size=arch.patch_size,
        in_channels=arch.in_channels,
        num_layers=arch.num_layers,
        attention_head_dim=arch.attention_head_dim,
        num_attention_heads=arch.num_attention_heads,
        joint_attention_dim=arch.joint_attention_dim,
        caption_projection_dim=arch.caption_projection_dim,
        pooled_projection_dim=arch.pooled_projection_dim,
        out_channels=arch.in_channels,
        pos_embed_max_size=arch.pos_embed_max_size,
        dual_attention_layers=arch.dual_attention_layers,
        qk_norm="rms_norm",
    )


def build_vae(arch: SD35Arch):
    """A random-weight AutoencoderKL with SD3's 16-channel latent."""
    from diffusers import AutoencoderKL

    n = len(arch.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=arch.vae_channels,
        layers_per_block=arch.vae_layers_per_block,
        latent_channels=arch.in_channels,
        norm_num_groups=arch.vae_norm_groups,
        sample_size=arch.sample_size * 2 ** (n - 1),
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=arch.scaling_factor,
        shift_factor=arch.shift_factor,
    )


def build_clip(sizes: tuple[int, int, int, int], projection: int, arch: SD35Arch, tokenizer=None):
    """A random-weight CLIPTextModelWithProjection; sizes = (hidden, intermediate, layers, heads).
    With `tokenizer`, the vocabulary and special tokens are that tokenizer's."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    hidden, inter, layers, heads = sizes
    special = {}
    if tokenizer is not None:
        eos = tokenizer.eos_token_id
        special = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos, "pad_token_id": eos}
    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=arch.clip_max_length,
            projection_dim=projection,
            hidden_act="gelu",
            **({"vocab_size": arch.clip_vocab} | special),
        )
    ).eval()


def build_t5(arch: SD35Arch, vocab: int | None = None):
    """A random-weight T5EncoderModel (T5 v1.1 style, gated GELU)."""
    from transformers import T5Config, T5EncoderModel

    d_model, d_ff, layers, heads, d_kv = arch.t5
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab or arch.t5_vocab,
            d_model=d_model,
            d_ff=d_ff,
            d_kv=d_kv,
            num_layers=layers,
            num_heads=heads,
            feed_forward_proj="gated-gelu",
        )
    ).eval()


def tiny_sd35m_folder(out: Path, seed: int = 0, arch: SD35Arch | None = None) -> Path:
    """Save a loadable diffusers folder of a tiny random SD3.5-M-architecture pipeline.

    The tokenizers are the toy model's offline ones (no download); the folder's card tells flowrl
    to encode with 16 T5 tokens. The text widths satisfy SD3's contract: joint_attention_dim =
    CLIP-L + CLIP-G hidden = T5 d_model, pooled = the two projections.

    Args:
        out: the folder to write (created).
        seed: torch seed of the random weights.
        arch: sizes (default `tiny_sd35m()`).

    Returns:
        `out`, which ``StableDiffusion3Pipeline.from_pretrained`` loads offline.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from flowrl.toy.model import ToyModelConfig, build_t5_tokenizer, build_tokenizer, save_model

    arch = arch or tiny_sd35m()
    torch.manual_seed(seed)
    tok, tok3 = build_tokenizer(arch.clip_max_length), build_t5_tokenizer()
    clip_l = build_clip(arch.clip_l, arch.clip_l_projection, arch, tokenizer=tok)
    clip_g = build_clip(arch.clip_g, arch.clip_g_projection, arch, tokenizer=tok)
    pipe = StableDiffusion3Pipeline(
        transformer=build_transformer(arch),
        vae=build_vae(arch),
        text_encoder=clip_l,
        tokenizer=tok,
        text_encoder_2=clip_g,
        tokenizer_2=build_tokenizer(arch.clip_max_length),
        text_encoder_3=build_t5(arch, vocab=len(tok3)),
        tokenizer_3=tok3,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=arch.shift),
    )
    toy_cfg = ToyModelConfig(resolution=arch.sample_size * 2 ** (len(arch.vae_channels) - 1))
    save_model(pipe, Path(out), toy_cfg, {"max_sequence_length": 16, "architecture": "tiny-sd3.5-medium"})
    return Path(out)
