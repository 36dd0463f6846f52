"""Tiny random-weight models of the real classes behind the CLIP rewards, built offline.

`save_tiny_clip` writes a folder that ``CLIPModel.from_pretrained`` / ``CLIPTokenizer.from_pretrained``
load exactly like openai/clip-vit-large-patch14 (same classes, small sizes), so the rewards' loading
code runs unchanged on it. `save_head` writes an aesthetic-head state dict.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

#: Pixel statistics written to the tiny folder's preprocessor config: deliberately not OpenAI's, so a
#: test can tell whether they were read.
TINY_MEAN = (0.5, 0.4, 0.3)
TINY_STD = (0.25, 0.2, 0.3)
#: exp(logit_scale) stored in the tiny checkpoint (CLIP's config default would give 1 / 0.07).
TINY_LOGIT_SCALE = 20.0
HEAD_KEYS = ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7")
HEAD_SHAPES = ((1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16))


def save_tiny_clip(
    folder: Path, image_size: int = 32, projection_dim: int = 768, seed: int = 0, preprocessor: bool = True
) -> Path:
    """A CLIPModel (2-layer towers, `image_size` px, 8 px patches) + CLIPTokenizer (+ PIL image
    processor config with TINY_MEAN/STD unless `preprocessor` is False) saved to `folder`."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from flowrl.toy.model import build_tokenizer

    tokenizer = build_tokenizer(77, extra_words=("cat", "dog", "red", "car", "sunset"))
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **tower,
        ),
        vision_config=dict(image_size=image_size, patch_size=8, **tower),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(TINY_LOGIT_SCALE))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if preprocessor:
        CLIPImageProcessorPil(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            image_mean=list(TINY_MEAN),
            image_std=list(TINY_STD),
        ).save_pretrained(folder)
    return folder


def head_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random aesthetic-head weights under the published keys, scaled so the output is O(1)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, (out_dim, in_dim) in zip(HEAD_KEYS, HEAD_SHAPES, strict=True):
        state[f"{key}.weight"] = torch.randn(out_dim, in_dim, generator=gen) / math.sqrt(in_dim)
        state[f"{key}.bias"] = torch.randn(out_dim, generator=gen) * 0.1
    return state


def save_head(path: Path, state: dict[str, torch.Tensor] | None = None, location: str | None = None) -> Path:
    """torch.save a head state dict; `location` (e.g. "cuda:0") rewrites the storage device tag the
    file records, to imitate the published file, which was saved from a GPU."""
    state = head_state() if state is None else state
    if location is None:
        torch.save(state, path)
        return path
    import torch.serialization as ser

    original = ser.location_tag
    ser.location_tag = lambda storage: location
    try:
        torch.save(state, path)
    finally:
        ser.location_tag = original
    return path
