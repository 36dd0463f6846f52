"""The tiny SD3: diffusers components with small configs, built offline, saved as a pipeline folder.

The folder this module writes loads with ``StableDiffusion3Pipeline.from_pretrained(path)`` and no
network, exactly like SD 3.5 Medium; flowrl never special-cases it. Architecture choices follow
SD 3.5 Medium where they are cheap (qk RMS-norm, a dual-attention first block, two CLIP text encoders
with projections, a 16-channel VAE latent) and shrink where they are not (no T5: its slot is empty,
T5 is a one-layer stand-in, and the model is trained with ``max_sequence_length=16`` T5 tokens;
call the pipeline with that value, which flowrl reads from the folder's ``flowrl_toy.json``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from flowrl.toy.world import COLORS, NUMBER_WORDS, PLURALS, RESOLUTION, SHAPES

#: Name of the file in which flowrl records how a model folder was built and how to call it.
TOY_CARD = "flowrl_toy.json"


@dataclass(frozen=True)
class ToyModelConfig:
    """Sizes of the tiny SD3. Defaults are the shipped model (about 2.4 M transformer parameters)."""

    resolution: int = RESOLUTION
    vae_channels: tuple[int, ...] = (32, 64)  # len - 1 = number of 2x downsamplings
    latent_channels: int = 16
    patch_size: int = 2
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 32
    dual_attention_layers: tuple[int, ...] = (0,)
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 2
    text_projection: int = 64
    text_max_length: int = 16
    #: T5 tokens the pipeline must be called with (``max_sequence_length``); diffusers' default of
    #: 256 would feed the model 240 padding tokens it never saw in training.
    t5_max_length: int = 16
    t5_layers: int = 1
    shift: float = 3.0
    extra_words: tuple[str, ...] = field(default=())

    @property
    def latent_size(self) -> int:
        return self.resolution // 2 ** (len(self.vae_channels) - 1)


def vocabulary(extra: tuple[str, ...] = ()) -> list[str]:
    """Words that get a token of their own: everything the shapes world's prompts say."""
    words = ["a", "an", "photo", "of", "and", "left", "right", "above", "below"]
    words += list(NUMBER_WORDS.values()) + list(SHAPES) + list(PLURALS.values()) + list(COLORS)
    return list(dict.fromkeys(words + list(extra)))


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: one printable unicode symbol per byte value."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    symbols, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            symbols.append(256 + extra)
            extra += 1
    return [chr(c) for c in symbols]


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP-style BPE of one lower-case word with the given merge ranks."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        rank, i = min((ranks.get((parts[i], parts[i + 1]), 1 << 30), i) for i in range(len(parts) - 1))
        if rank == 1 << 30:
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2 :]
    return parts


def build_tokenizer(max_length: int, extra_words: tuple[str, ...] = ()):
    """A CLIP tokenizer built offline: byte-level fallback plus one token per world word.

    Merges are added until every vocabulary word encodes to a single token, so the random text
    encoder sees words, not characters. Any other text still tokenizes (byte by byte).
    """
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    words = vocabulary(extra_words)
    changed = True
    while changed:  # fixpoint: a later merge can change how an earlier word splits
        changed = False
        ranks = {m: i for i, m in enumerate(merges)}
        for w in words:
            parts = _bpe(w, ranks)
            if len(parts) > 1:
                merges.append((parts[0], parts[1]))
                vocab.setdefault(parts[0] + parts[1], len(vocab))
                ranks[merges[-1]] = len(merges) - 1
                changed = True
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def build_t5_tokenizer(extra_words: tuple[str, ...] = ()):
    """A T5 (unigram) tokenizer built offline: one piece per world word, characters as fallback."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in vocabulary(extra_words)]
    pieces += [("\u2581", -8.0)] + [(c, -10.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def build_components(cfg: ToyModelConfig, seed: int = 0) -> dict:
    """Random-weight diffusers/transformers components of a tiny SD3 (seeded).

    Returns:
        dict with the keyword arguments of ``StableDiffusion3Pipeline``.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(cfg.text_max_length, cfg.extra_words)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def text_encoder() -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=cfg.text_hidden,
                intermediate_size=4 * cfg.text_hidden,
                num_hidden_layers=cfg.text_layers,
                num_attention_heads=cfg.text_heads,
                max_position_embeddings=cfg.text_max_length,
                projection_dim=cfg.text_projection,
                hidden_act="gelu",
                bos_token_id=bos,
                eos_token_id=eos,
                pad_token_id=eos,
            )
        ).eval()

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=16,
        sample_size=cfg.resolution,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=1.0,
        shift_factor=0.0,
    )
    inner = cfg.num_heads * cfg.head_dim
    t5_tokenizer = build_t5_tokenizer(cfg.extra_words)
    transformer = SD3Transformer2DModel(
        sample_size=cfg.latent_size,
        patch_size=cfg.patch_size,
        in_channels=cfg.latent_channels,
        num_layers=cfg.num_layers,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=2 * cfg.text_hidden,
        caption_projection_dim=inner,
        pooled_projection_dim=2 * cfg.text_projection,
        out_channels=cfg.latent_channels,
        pos_embed_max_size=cfg.latent_size // cfg.patch_size,
        dual_attention_layers=cfg.dual_attention_layers,
        qk_norm="rms_norm",
    )
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder(),
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder(),
        "tokenizer_2": build_tokenizer(cfg.text_max_length, cfg.extra_words),
        "text_encoder_3": T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tokenizer),
                d_model=2 * cfg.text_hidden,
                d_kv=cfg.head_dim,
                d_ff=4 * cfg.text_hidden,
                num_layers=cfg.t5_layers,
                num_heads=cfg.text_heads,
                relative_attention_num_buckets=8,
                feed_forward_proj="gated-gelu",
                pad_token_id=t5_tokenizer.pad_token_id,
                eos_token_id=t5_tokenizer.eos_token_id,
            )
        ).eval(),
        "tokenizer_3": t5_tokenizer,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=cfg.shift),
    }


def make_pipeline(components: dict):
    """A ``StableDiffusion3Pipeline`` over the given components (CPU, float32)."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_model(pipe, out: Path, cfg: ToyModelConfig, card: dict) -> None:
    """Save a pipeline folder plus flowrl's card (how it was built, how it must be called)."""
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    payload = {"config": asdict(cfg), **card}
    (out / TOY_CARD).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_card(path: Path) -> dict:
    """flowrl's card of a model folder, or {} for a folder flowrl did not build."""
    p = Path(path) / TOY_CARD
    return json.loads(p.read_text()) if p.is_file() else {}
