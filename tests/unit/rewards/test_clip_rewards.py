"""PickScore, LAION aesthetic v2 and CLIPScore on tiny random CLIPs of the real classes.

Every score is compared with an independent computation of the published formula from the same
saved weights (transformers' own processor and forward, or a hand-written matmul chain), so the
tests check the rewards' preprocessing, tokenisation, loading and arithmetic, not the weights.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_clip import TINY_LOGIT_SCALE, TINY_MEAN, TINY_STD, head_state, save_head, save_tiny_clip
from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

from flowrl.errors import FlowrlError, ModelNotFoundError
from flowrl.registry import lookup
from flowrl.rewards.aesthetic import AestheticReward, find_head_file, read_head
from flowrl.rewards.clip_common import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ClipPreprocess,
    preprocess,
    preprocess_spec,
    resize_bicubic,
    resized_shape,
)
from flowrl.rewards.clipscore import ClipScoreReward
from flowrl.rewards.models import clear_shared
from flowrl.rewards.pickscore import PickScoreReward

PROMPTS = ["a red cat", "a dog", "sunset over a car", "a photo of a red car and a dog"]


pytestmark = pytest.mark.usefixtures("fresh_models")  # see conftest.py


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip") / "clip")


@pytest.fixture(scope="module")
def head_file(tmp_path_factory) -> Path:
    return save_head(tmp_path_factory.mktemp("head") / "head.pth")


@pytest.fixture(scope="module")
def reference(clip_dir):
    """The saved model, tokenizer and PIL image processor, loaded by transformers directly."""
    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    return model, CLIPTokenizer.from_pretrained(clip_dir), CLIPImageProcessorPil.from_pretrained(clip_dir)


def uint8_images(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """[n, H, W, 3] uint8: smooth colour fields plus noise, like rendered images rather than pure noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        coarse = coarse.resize((width, height), Image.BILINEAR)
        noisy = np.asarray(coarse, dtype=np.int16) + rng.integers(-40, 41, (height, width, 3))
        out.append(np.clip(noisy, 0, 255).astype(np.uint8))
    return np.stack(out)


def as_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [0, 1]."""
    return torch.from_numpy(images.copy()).permute(0, 3, 1, 2).float() / 255


def embeds(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def reference_cosine(reference, images: np.ndarray, prompts: list[str]) -> torch.Tensor:
    """cos(image_i, prompt_i) [B] from transformers' processor, tokenizer and feature functions."""
    model, tokenizer, processor = reference
    pixels = processor(images=[Image.fromarray(im) for im in images], return_tensors="pt")["pixel_values"]
    tokens = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        img = embeds(model.get_image_features(pixel_values=pixels))
        txt = embeds(model.get_text_features(**tokens))
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return (img * txt).sum(-1)


# ---- preprocessing -----------------------------------------------------------------------------

# The PIL processor resizes uint8 images in two uint8 passes, so its output is rounded to whole grey
# levels; ours is not rounded. The tolerance is therefore one and a half grey levels (1.5 / 255 in
# [0, 1] units) divided by the smallest std (normalisation scales errors by 1 / std), i.e. ~0.022 per
# pixel, and half a grey level on average. A wrong kernel (bilinear, or bicubic without antialias),
# a one-pixel crop shift or a single 2-D pass without PIL's intermediate clamping each exceed it
# (test_preprocess_tolerance_catches_a_wrong_resize).
GREY = 1 / 255


def assert_matches_processor(ours: torch.Tensor, theirs: torch.Tensor, std) -> None:
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs()
    assert diff.max() <= 1.5 * GREY / min(std), f"max |diff| {diff.max():.4f}"
    assert diff.mean() <= 0.5 * GREY / min(std), f"mean |diff| {diff.mean():.4f}"


@pytest.mark.parametrize("shape", [(256, 256), (300, 200), (180, 320), (200, 301), (96, 120), (224, 224)])
def test_preprocess_matches_clip_image_processor(shape):
    images = uint8_images(3, *shape, seed=shape[0])
    processor = CLIPImageProcessorPil()  # OpenAI CLIP's 224 px recipe
    theirs = processor(images=[Image.fromarray(im) for im in images], return_tensors="pt")["pixel_values"]
    ours = preprocess(as_tensor(images), ClipPreprocess.square(224))
    assert_matches_processor(ours, theirs, OPENAI_CLIP_STD)


def test_preprocess_matches_processor_read_from_config():
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": 41}, crop_size={"height": 32, "width": 32}, image_mean=TINY_MEAN, image_std=TINY_STD
    )
    spec = ClipPreprocess.from_config(processor.to_dict(), default_size=224)
    assert spec == ClipPreprocess(41, None, (32, 32), TINY_MEAN, TINY_STD)
    images = uint8_images(4, 70, 50)
    theirs = processor(images=[Image.fromarray(im) for im in images], return_tensors="pt")["pixel_values"]
    assert_matches_processor(preprocess(as_tensor(images), spec), theirs, TINY_STD)


def _wrong_resize(x: torch.Tensor, mistake: str) -> torch.Tensor:
    """CLIP preprocessing to 224 px with one plausible mistake."""
    size = resized_shape(x.shape[-2], x.shape[-1], 224)
    if mistake == "bilinear":
        x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=False)
    elif mistake == "bicubic without antialias":
        x = torch.nn.functional.interpolate(x, size=size, mode="bicubic", antialias=False).clamp(0, 1)
    elif mistake == "one 2-D pass":
        x = torch.nn.functional.interpolate(x, size=size, mode="bicubic", antialias=True).clamp(0, 1)
    else:
        x = resize_bicubic(x, size)
    top = (size[0] - 224) // 2 + (mistake == "crop one pixel low")
    left = (size[1] - 224) // 2
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (x[:, :, top : top + 224, left : left + 224] - mean) / std


@pytest.mark.parametrize("mistake", ["bilinear", "bicubic without antialias", "one 2-D pass", "crop one pixel low"])
def test_preprocess_tolerance_catches_a_wrong_resize(mistake):
    """The tolerance above is tight enough to fail each plausible mistake."""
    images = uint8_images(3, 300, 200, seed=1)
    theirs = CLIPImageProcessorPil()(images=[Image.fromarray(im) for im in images], return_tensors="pt")
    assert_matches_processor(_wrong_resize(as_tensor(images), "none"), theirs["pixel_values"], OPENAI_CLIP_STD)
    with pytest.raises(AssertionError):
        assert_matches_processor(_wrong_resize(as_tensor(images), mistake), theirs["pixel_values"], OPENAI_CLIP_STD)


def test_resized_shape_truncates_the_long_side_like_transformers():
    assert resized_shape(300, 200, 224) == (336, 224)
    assert resized_shape(200, 333, 224) == (224, 372)  # 372.96 -> 372
    assert resized_shape(50, 50, 32) == (32, 32)


def test_preprocess_config_layouts_and_fallback(clip_dir, tmp_path):
    old_layout = {"size": 224, "crop_size": 224}
    assert ClipPreprocess.from_config(old_layout, 32) == ClipPreprocess.square(224)
    exact = ClipPreprocess.from_config({"size": {"height": 32, "width": 32}, "crop_size": 32}, 32)
    assert exact.resize_to == (32, 32) and exact.shortest_edge is None
    # Folder with a config: its statistics; without one: the tower's size and OpenAI's statistics.
    assert preprocess_spec(str(clip_dir), 32) == ClipPreprocess(32, None, (32, 32), TINY_MEAN, TINY_STD)
    bare = save_tiny_clip(tmp_path / "bare", image_size=16, projection_dim=8, preprocessor=False)
    assert preprocess_spec(str(bare), 16) == ClipPreprocess(16, None, (16, 16), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    with pytest.raises(FlowrlError, match="crops images to 32x32 px but the CLIP vision tower takes 224x224"):
        preprocess_spec(str(clip_dir), 224)


# ---- pickscore ---------------------------------------------------------------------------------


def pickscore(clip_dir, **kw) -> PickScoreReward:
    return PickScoreReward(PickScoreReward.Config(model=str(clip_dir), processor=str(clip_dir), device="cpu", **kw))


def test_pickscore_is_scaled_cosine_of_the_checkpoint(clip_dir, reference):
    images = uint8_images(4, 32, 32)  # the tower's size: both pipelines skip the resize, exact pixels
    reward = pickscore(clip_dir, batch_size=3)  # 3 + 1: a ragged last batch
    out = reward(as_tensor(images), PROMPTS, [])
    model = reference[0]
    scale = model.logit_scale.exp().item()
    assert scale == pytest.approx(TINY_LOGIT_SCALE, rel=1e-6)  # from the checkpoint, not the config
    expected = scale * reference_cosine(reference, images, PROMPTS)
    assert out.scores.dtype == torch.float32 and out.scores.device.type == "cpu" and out.scores.shape == (4,)
    torch.testing.assert_close(out.scores, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.details["cosine"] * TINY_LOGIT_SCALE, out.scores)
    assert out.scores.std() > 0  # different pairs, different scores: the test could fail


def test_pickscore_resizes_like_the_processor(clip_dir, reference):
    images = uint8_images(3, 45, 60, seed=3)
    out = pickscore(clip_dir)(as_tensor(images), PROMPTS[:3], [])
    expected = TINY_LOGIT_SCALE * reference_cosine(reference, images, PROMPTS[:3])
    # Inputs differ by PIL's rounding (< 1 grey level), which moves a score by far less than 0.05.
    torch.testing.assert_close(out.scores, expected, rtol=0, atol=0.05)


def test_pickscore_truncates_long_prompts_and_ignores_batching(clip_dir, reference):
    long_prompt = "a dog " + " ".join(f"word{i}" for i in range(100))  # far beyond 77 tokens
    prompts = [long_prompt, "a cat", "a red car", "a dog"]
    images = uint8_images(4, 32, 32, seed=5)
    one = pickscore(clip_dir, batch_size=1)(as_tensor(images), prompts, [])
    clear_shared()
    four = pickscore(clip_dir, batch_size=4)(as_tensor(images), prompts, [])
    torch.testing.assert_close(one.scores, four.scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(four.scores, TINY_LOGIT_SCALE * reference_cosine(reference, images, prompts))


def test_pickscore_accepts_uint8_and_checks_the_batch(clip_dir):
    images = uint8_images(2, 32, 32)
    reward = pickscore(clip_dir)
    torch.testing.assert_close(reward(torch.from_numpy(images), PROMPTS[:2], []).scores,
                               reward(as_tensor(images), PROMPTS[:2], []).scores)
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        reward(as_tensor(images), PROMPTS[:3], [])


def test_pickscore_bfloat16_runs_and_returns_float32(clip_dir):
    images = as_tensor(uint8_images(2, 32, 32))
    full = pickscore(clip_dir)(images, PROMPTS[:2], []).scores
    half = pickscore(clip_dir, dtype="bfloat16")(images, PROMPTS[:2], []).scores
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=0, atol=0.2)  # bf16 keeps ~3 significant digits


# ---- clipscore ---------------------------------------------------------------------------------


def test_clipscore_is_clip_logits_over_logit_scale(clip_dir, reference):
    images = uint8_images(4, 32, 32, seed=7)
    out = ClipScoreReward(ClipScoreReward.Config(model=str(clip_dir), device="cpu"))(as_tensor(images), PROMPTS, [])
    model, tokenizer, processor = reference
    inputs = processor(images=[Image.fromarray(im) for im in images], return_tensors="pt")
    tokens = tokenizer(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        logits = model(pixel_values=inputs["pixel_values"], **tokens).logits_per_image  # [B images, B prompts]
    expected = logits.diagonal() / model.logit_scale.exp()
    torch.testing.assert_close(out.scores, expected, rtol=1e-4, atol=1e-6)
    assert out.scores.abs().max() <= 1


# ---- aesthetic ---------------------------------------------------------------------------------


def aesthetic(clip_dir, head, **kw) -> AestheticReward:
    return AestheticReward(AestheticReward.Config(model=str(clip_dir), head=str(head), device="cpu", **kw))


def test_aesthetic_is_the_linear_head_on_the_normalised_embedding(clip_dir, head_file, reference):
    images = uint8_images(5, 32, 32, seed=11)
    out = aesthetic(clip_dir, head_file, batch_size=2)(as_tensor(images), PROMPTS + ["x"], [])
    model, _, processor = reference
    pixels = processor(images=[Image.fromarray(im) for im in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        x = embeds(model.get_image_features(pixel_values=pixels))
    x = x / x.norm(dim=-1, keepdim=True)
    state = torch.load(head_file, weights_only=True)
    for key in ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7"):  # no activations between
        x = x @ state[f"{key}.weight"].T + state[f"{key}.bias"]
    torch.testing.assert_close(out.scores, x.squeeze(-1), rtol=1e-4, atol=1e-5)
    assert out.scores.shape == (5,) and out.scores.dtype == torch.float32 and out.scores.std() > 0


def test_aesthetic_ignores_prompts(clip_dir, head_file):
    images = as_tensor(uint8_images(2, 32, 32))
    reward = aesthetic(clip_dir, head_file)
    torch.testing.assert_close(reward(images, ["a", "b"], []).scores, reward(images, ["c", "d"], []).scores)


def test_aesthetic_head_saved_on_cuda_loads_on_cpu(tmp_path):
    path = save_head(tmp_path / "cuda.pth", location="cuda:0")
    if not torch.cuda.is_available():  # the file really carries the cuda tag: a plain load refuses it
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    head = read_head(path)
    expected = head_state()
    for key, value in head.state_dict().items():
        assert value.device.type == "cpu"
        torch.testing.assert_close(value, expected[key])
    assert not head.training  # dropout off


def test_aesthetic_head_with_wrong_keys_lists_expected_and_found(tmp_path):
    state = {k.replace("layers.", "mlp."): v for k, v in head_state().items()}
    path = save_head(tmp_path / "renamed.pth", state)
    with pytest.raises(FlowrlError) as err:
        read_head(path)
    message = str(err.value)
    assert "expected keys ['layers.0.bias', 'layers.0.weight'" in message
    assert "found ['mlp.0.bias', 'mlp.0.weight'" in message and str(path) in message


def test_aesthetic_head_with_wrong_shapes_or_pickled_module_is_refused(tmp_path):
    state = head_state()
    state["layers.0.weight"] = state["layers.0.weight"][:, :512]  # a ViT-B/32 head
    with pytest.raises(FlowrlError, match=r"layers.0.weight: expected \(1024, 768\), found \(1024, 512\)"):
        read_head(save_head(tmp_path / "b32.pth", state))
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")  # a whole module needs unsafe unpickling
    with pytest.raises(FlowrlError, match="cannot read head file"):
        read_head(tmp_path / "module.pth")


def fake_hub_snapshot(cache: Path, repo: str, files: dict[str, Path]) -> Path:
    """Lay `files` out as huggingface_hub's cache does for `repo` at revision main."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0" * 40)
    for name, source in files.items():
        (snapshot / name).write_bytes(source.read_bytes())
    return snapshot


def test_aesthetic_head_found_in_the_hub_cache(tmp_path, monkeypatch, head_file):
    cache = tmp_path / "hub"
    snapshot = fake_hub_snapshot(cache, "someone/aesthetic", {"sac+logos+ava1-l14-linearMSE.pth": head_file})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # no local file of that name
    assert find_head_file("sac+logos+ava1-l14-linearMSE.pth") == snapshot / "sac+logos+ava1-l14-linearMSE.pth"
    found = find_head_file("someone/aesthetic/sac+logos+ava1-l14-linearMSE.pth")
    assert found.read_bytes() == head_file.read_bytes()
    with pytest.raises(ModelNotFoundError, match="no other.pth of someone/aesthetic"):
        find_head_file("someone/aesthetic/other.pth")


def test_aesthetic_refuses_a_clip_of_the_wrong_width(tmp_path, head_file):
    small = save_tiny_clip(tmp_path / "b32", projection_dim=16)
    with pytest.raises(FlowrlError, match="embeds images in 16 dimensions but the aesthetic head takes 768"):
        aesthetic(small, head_file)


# ---- sharing, registry, config -----------------------------------------------------------------


def test_one_clip_per_process_shared_across_rewards(clip_dir, head_file):
    a = ClipScoreReward(ClipScoreReward.Config(model=str(clip_dir), device="cpu"))
    b = ClipScoreReward(ClipScoreReward.Config(model=str(clip_dir) + "/", device="cpu"))  # same folder
    c = aesthetic(clip_dir, head_file)
    d = pickscore(clip_dir)
    assert a.model is b.model is c.model is d.model
    assert a.tokenizer is b.tokenizer is d.tokenizer
    assert aesthetic(clip_dir, head_file).head is c.head
    other = ClipScoreReward(ClipScoreReward.Config(model=str(clip_dir), device="cpu", dtype="bfloat16"))
    assert other.model is not a.model and other.model.dtype == torch.bfloat16


def test_registered_under_their_names():
    assert lookup("reward", "pickscore") is PickScoreReward
    assert lookup("reward", "aesthetic") is AestheticReward
    assert lookup("reward", "clipscore") is ClipScoreReward


def test_configs_are_strict_and_carry_the_pipeline_fields():
    cfg = PickScoreReward.Config(scale=0.0385)
    assert (cfg.model, cfg.processor, cfg.label) == (None, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "pickscore")
    assert AestheticReward.Config().head == "sac+logos+ava1-l14-linearMSE.pth"
    with pytest.raises(ValueError, match="tokenizer"):
        ClipScoreReward.Config(tokenizer="x")
    for cls in (PickScoreReward, AestheticReward, ClipScoreReward):
        assert cls.info.licence and cls.info.model and cls.info.extra == ""


def test_pickscore_is_trained_on_score_over_26_as_flowgrpo():
    """FlowGRPO's scorer (and the paper's code built on it) returns logit_scale * cos / 26. `scale: 1/26`
    is that division to float32 rounding; the 0.0385 docs used to suggest is 0.1 % off."""
    from flowrl.rewards.base import transform

    raw = torch.tensor([20.51, 22.34, 22.85, 26.0])
    cfg = PickScoreReward.Config(scale="1/26")
    assert cfg.scale == 1 / 26
    torch.testing.assert_close(transform(raw, cfg), raw / 26, rtol=1.2e-7, atol=0)
    off = transform(raw, PickScoreReward.Config(scale=0.0385)) / (raw / 26)
    assert bool((off - 1 > 9e-4).all())  # 0.1 % high
    with pytest.raises(ValueError, match="divides by zero"):
        PickScoreReward.Config(scale="1/0")
    with pytest.raises(ValueError):
        PickScoreReward.Config(scale="one/26")


@pytest.mark.parametrize("name", ["sd35m-pickscore", "sd35m-multi-reward"])
def test_recipes_train_on_pickscore_over_26(name):
    from flowrl.config import load_pipeline

    path = Path(__file__).resolve().parents[3] / "pipelines" / f"{name}.yaml"
    rewards = [r for r in load_pipeline(path).rewards if r.kind == "pickscore"]
    assert rewards and all(r.scale == 1 / 26 for r in rewards)


# ---- offline errors ----------------------------------------------------------------------------


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "empty-hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    return cache


def test_missing_model_is_a_clear_error_without_network(empty_cache):
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError) as err:
        PickScoreReward(PickScoreReward.Config(model="no-such-org/no-such-clip", device="cpu"))
    message = str(err.value)
    assert "'no-such-org/no-such-clip'" in message and str(empty_cache) in message
    assert "download no-such-org/no-such-clip" in message and "`model:`" in message
    with pytest.raises(ModelNotFoundError, match="yuvalkirstain/PickScore_v1"):
        PickScoreReward(PickScoreReward.Config(device="cpu"))
    with pytest.raises(ModelNotFoundError, match="openai/clip-vit-large-patch14"):
        ClipScoreReward(ClipScoreReward.Config(device="cpu"))
    with pytest.raises(ModelNotFoundError, match="does not exist; set `model:`"):
        ClipScoreReward(ClipScoreReward.Config(model="./nowhere/clip", device="cpu"))
    assert time.monotonic() - start < 30  # no download retries


def test_missing_processor_names_the_processor_field(empty_cache, clip_dir):
    with pytest.raises(ModelNotFoundError) as err:
        PickScoreReward(PickScoreReward.Config(model=str(clip_dir), device="cpu"))  # default processor: absent
    message = str(err.value)
    assert "laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in message and "`processor:`" in message


def test_folder_without_tokenizer_is_refused_not_silently_empty(tmp_path, clip_dir):
    bare = tmp_path / "weights-only"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((clip_dir / name).read_bytes())
    with pytest.raises(ModelNotFoundError, match="has no CLIP tokenizer .* set `model:`"):
        ClipScoreReward(ClipScoreReward.Config(model=str(bare), device="cpu"))


def test_tokenizer_of_another_model_is_refused(tmp_path, clip_dir):
    from flowrl.toy.model import build_tokenizer

    other = tmp_path / "bigger-tokenizer"
    build_tokenizer(77, extra_words=tuple(f"word{i}" for i in range(50))).save_pretrained(other)
    with pytest.raises(FlowrlError, match="do not belong together"):
        ClipScoreReward(ClipScoreReward.Config(model=str(clip_dir), processor=str(other), device="cpu"))


def test_missing_head_says_where_it_looked_and_how_to_get_it(empty_cache, clip_dir):
    with pytest.raises(ModelNotFoundError) as err:
        AestheticReward(AestheticReward.Config(model=str(clip_dir), device="cpu"))
    message = str(err.value)
    assert "sac+logos+ava1-l14-linearMSE.pth" in message and str(empty_cache) in message
    assert "improved-aesthetic-predictor" in message and "`head:`" in message


def test_default_aesthetic_fails_on_the_head_before_loading_clip(empty_cache, monkeypatch):
    import flowrl.rewards.aesthetic as module

    monkeypatch.setattr(module, "load_clip_model", lambda *a: pytest.fail("loaded CLIP before finding the head"))
    with pytest.raises(ModelNotFoundError, match="head file"):
        AestheticReward(AestheticReward.Config(device="cpu"))

