"""The tiny SD3 is a real diffusers SD3: built offline, saved, loaded back through from_pretrained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowrl.paths import TOY_MODEL
from flowrl.toy.model import ToyModelConfig, build_components, build_t5_tokenizer, build_tokenizer, make_pipeline, read_card, save_model, vocabulary


def test_every_world_word_is_one_token():
    clip = build_tokenizer(16)
    t5 = build_t5_tokenizer()
    for word in vocabulary():
        assert len(clip(word, add_special_tokens=False).input_ids) == 1, word
        assert len(t5(word, add_special_tokens=False).input_ids) == 1, word
    # Anything else still tokenizes (byte fallback), it is not dropped.
    assert len(clip("zebra", add_special_tokens=False).input_ids) > 1


def test_build_is_seeded():
    a = build_components(ToyModelConfig(), seed=3)["transformer"].state_dict()
    b = build_components(ToyModelConfig(), seed=3)["transformer"].state_dict()
    c = build_components(ToyModelConfig(), seed=4)["transformer"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_saved_folder_loads_with_plain_from_pretrained(tmp_path: Path):
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    cfg = ToyModelConfig()
    pipe = make_pipeline(build_components(cfg, seed=0))
    save_model(pipe, tmp_path, cfg, {"max_sequence_length": cfg.t5_max_length})
    loaded = StableDiffusion3Pipeline.from_pretrained(tmp_path, local_files_only=True)
    assert isinstance(loaded.transformer, SD3Transformer2DModel)
    assert isinstance(loaded.vae, AutoencoderKL) and loaded.vae.config.latent_channels == 16
    assert isinstance(loaded.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(loaded.text_encoder_2, CLIPTextModelWithProjection)
    assert isinstance(loaded.text_encoder_3, T5EncoderModel)
    assert loaded.scheduler.config.shift == 3.0
    sd, sd2 = pipe.transformer.state_dict(), loaded.transformer.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert read_card(tmp_path)["max_sequence_length"] == cfg.t5_max_length
    loaded.set_progress_bar_config(disable=True)
    out = loaded("a photo of a red circle", num_inference_steps=2, guidance_scale=1.0,
                 max_sequence_length=cfg.t5_max_length, output_type="pt").images
    assert out.shape == (1, 3, cfg.resolution, cfg.resolution)


def test_shipped_toy_model_is_small_and_loads():
    from diffusers import StableDiffusion3Pipeline

    files = [p for p in TOY_MODEL.rglob("*") if p.is_file()]
    assert files, f"the embedded model is missing from {TOY_MODEL}"
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    pipe = StableDiffusion3Pipeline.from_pretrained(TOY_MODEL, local_files_only=True)
    card = read_card(TOY_MODEL)
    assert card["kind"] == "flowrl-toy-sd3" and card["resolution"] == 32
    assert pipe.vae.config.scaling_factor != 1.0, "latent normalisation must be fitted, not the default"


def test_unknown_words_do_not_crash_encoding():
    cfg = ToyModelConfig()
    pipe = make_pipeline(build_components(cfg, seed=0))
    pe, _, pooled, _ = pipe.encode_prompt(["a zebra on a skateboard", ""], None, None, do_classifier_free_guidance=False,
                                          max_sequence_length=cfg.t5_max_length)
    assert pe.shape == (2, cfg.text_max_length + cfg.t5_max_length, 2 * cfg.text_hidden)
    assert torch.isfinite(pe).all() and torch.isfinite(pooled).all()
