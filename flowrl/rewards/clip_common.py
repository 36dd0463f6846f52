"""What the CLIP-backed rewards (pickscore, aesthetic, clipscore) share: pixel preprocessing in torch,
one loaded CLIPModel / tokenizer per process, and unit-norm image and text embeddings.

Preprocessing reproduces ``transformers.CLIPImageProcessor`` (the PIL one) on batched tensors,
without torchvision or a PIL round trip: resize the shortest side with antialiased bicubic, centre
crop, normalise. PIL resamples an image in two passes (width, then height) and stores the
intermediate as uint8, which saturates bicubic overshoot to [0, 255]; we do the same two passes and
clamp in between, so the only remaining difference is PIL's uint8 rounding (at most about one
grey level, see tests/unit/rewards/test_clip_rewards.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from flowrl.errors import FlowrlError, ModelNotFoundError
from flowrl.rewards.models import DTYPES, hub_cache_dir, load_pretrained, missing_model_message, shared

#: OpenAI CLIP's pixel statistics, used when a model folder has no preprocessor config.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: CLIP's text context length; prompts are truncated to it.
CLIP_MAX_TOKENS = 77

PREPROCESSOR_CONFIG = "preprocessor_config.json"


@dataclass(frozen=True)
class ClipPreprocess:
    """How a CLIP vision tower wants its pixels.

    Attributes:
        shortest_edge: resize so the shorter image side has this many pixels (aspect kept); None
            when `resize_to` is given instead.
        resize_to: (height, width) to resize to exactly, ignoring aspect (processors whose `size`
            is {"height", "width"}); None for a shortest-edge resize.
        crop: (height, width) of the centre crop; must equal the vision tower's image size.
        mean: per-channel mean subtracted from [0, 1] pixels.
        std: per-channel std the result is divided by.
    """

    shortest_edge: int | None
    resize_to: tuple[int, int] | None
    crop: tuple[int, int]
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD

    @classmethod
    def square(cls, size: int) -> ClipPreprocess:
        """OpenAI CLIP's recipe at `size` px: shortest side to `size`, centre crop `size` x `size`."""
        return cls(shortest_edge=size, resize_to=None, crop=(size, size))

    @classmethod
    def from_config(cls, config: dict[str, Any], default_size: int) -> ClipPreprocess:
        """Read `size`, `crop_size`, `image_mean`, `image_std` of a preprocessor_config.json dict.

        Both the old (``"size": 224``) and the new (``"size": {"shortest_edge": 224}``) layouts are
        read; anything missing falls back to OpenAI CLIP at `default_size` px.
        """
        size = config.get("size", default_size)
        shortest, exact = None, None
        if isinstance(size, int):
            shortest = size
        elif isinstance(size, dict) and "shortest_edge" in size:
            shortest = int(size["shortest_edge"])
        elif isinstance(size, dict) and {"height", "width"} <= size.keys():
            exact = (int(size["height"]), int(size["width"]))
        else:
            raise FlowrlError(
                f"preprocessor config size {size!r} is not a CLIP layout; expected an int, "
                '{"shortest_edge": N} or {"height": H, "width": W}'
            )
        crop = config.get("crop_size", shortest or default_size)
        if isinstance(crop, int):
            crop = (crop, crop)
        elif isinstance(crop, dict):
            crop = (int(crop["height"]), int(crop["width"]))
        mean = tuple(float(v) for v in config.get("image_mean", OPENAI_CLIP_MEAN))
        std = tuple(float(v) for v in config.get("image_std", OPENAI_CLIP_STD))
        return cls(shortest_edge=shortest, resize_to=exact, crop=tuple(crop), mean=mean, std=std)


def resized_shape(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(height, width) after scaling the shorter side to `shortest_edge`; the longer side is
    truncated to an int, as transformers does."""
    if height <= width:
        return shortest_edge, int(shortest_edge * width / height)
    return int(shortest_edge * height / width), shortest_edge


def resize_bicubic(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Antialiased bicubic resize of [B, C, H, W] in [0, 1] to [B, C, *size], PIL-style.

    Width first, then height, clamping to [0, 1] in between and after (PIL keeps the intermediate
    as uint8, so overshoot is cut there; a single 2-D pass would keep it and differ by up to ~20 grey
    levels on high-frequency images). A pass whose side does not change is skipped.
    """
    out = images
    if out.shape[-1] != size[1]:
        out = F.interpolate(out, size=(out.shape[-2], size[1]), mode="bicubic", antialias=True, align_corners=False)
        out = out.clamp(0, 1)
    if out.shape[-2] != size[0]:
        out = F.interpolate(out, size=(size[0], size[1]), mode="bicubic", antialias=True, align_corners=False)
        out = out.clamp(0, 1)
    return out


def center_crop(images: Tensor, size: tuple[int, int]) -> Tensor:
    """The central `size` window of [B, C, H, W] (top/left offsets rounded down).

    Raises:
        ValueError: the image is smaller than the crop.
    """
    height, width = images.shape[-2:]
    if height < size[0] or width < size[1]:
        raise ValueError(f"cannot centre-crop {size} from images of {height}x{width}")
    top, left = (height - size[0]) // 2, (width - size[1]) // 2
    return images[..., top : top + size[0], left : left + size[1]]


def preprocess(images: Tensor, spec: ClipPreprocess) -> Tensor:
    """Images [B, 3, H, W] float in [0, 1] -> CLIP pixel_values [B, 3, crop_h, crop_w] float32."""
    images = images.float()
    if spec.resize_to is not None:
        target = spec.resize_to
    else:
        target = resized_shape(images.shape[-2], images.shape[-1], spec.shortest_edge)
    images = center_crop(resize_bicubic(images, target), spec.crop)
    mean = torch.tensor(spec.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def model_key(model: str) -> str:
    """The identity of a weights source: an absolute path for a local folder/file, else the hub id.
    Two rewards whose keys are equal share one loaded copy."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def read_preprocessor_config(source: str) -> dict[str, Any] | None:
    """preprocessor_config.json of a local folder or of a hub id's cached snapshot; None if absent.

    Never touches the network: a hub id is looked up in the local cache only.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        file = path / PREPROCESSOR_CONFIG
        return json.loads(file.read_text()) if file.is_file() else None
    if path.exists() or source.count("/") != 1:
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(source, PREPROCESSOR_CONFIG, cache_dir=hub_cache_dir())
    except ValueError:  # not a valid repo id (huggingface_hub's HFValidationError)
        return None
    return json.loads(Path(found).read_text()) if isinstance(found, str) else None


def preprocess_spec(source: str, image_size: int) -> ClipPreprocess:
    """The preprocessing `source`'s preprocessor config asks for, checked against the vision tower.

    Args:
        source: local folder or hub id whose preprocessor_config.json to read.
        image_size: the CLIP vision tower's input size (``vision_config.image_size``); also the
            size used when `source` has no preprocessor config (with OpenAI CLIP mean/std).

    Raises:
        FlowrlError: the config crops to a size the vision tower cannot take.
    """
    config = read_preprocessor_config(source)
    spec = ClipPreprocess.square(image_size) if config is None else ClipPreprocess.from_config(config, image_size)
    if spec.crop != (image_size, image_size):
        raise FlowrlError(
            f"the preprocessor config of {source!r} crops images to {spec.crop[0]}x{spec.crop[1]} px but the "
            f"CLIP vision tower takes {image_size}x{image_size}; point the processor at the folder that "
            "belongs to this model"
        )
    return spec


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.count("/") > 1


def _not_found(source: str, reward: str, field: str) -> ModelNotFoundError:
    """The error for a `source` that is neither a local path nor in the hub cache."""
    if _looks_like_path(source):
        return ModelNotFoundError(f"reward {reward!r}: {source} does not exist; set `{field}:` to an existing folder")
    return ModelNotFoundError(missing_model_message(source, reward, field=field))


def _load_component(loader, source: str, reward: str, field: str, **kwargs):
    """`load_pretrained` whose not-found message names the config field that holds `source`."""
    try:
        return load_pretrained(loader, source, reward, cache_dir=hub_cache_dir(), **kwargs)
    except ModelNotFoundError:
        if field == "model" or Path(source).expanduser().exists():
            raise
        raise _not_found(source, reward, field) from None


#: Files of which a CLIP tokenizer needs one (the fast JSON, or the BPE vocabulary with merges.txt).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def has_tokenizer_files(source: str) -> bool:
    """Whether a local folder, or a hub id's cached snapshot, holds tokenizer files.

    Checked up front because transformers 5 builds an EMPTY tokenizer, without an error, from a
    source that has none.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return any((path / name).is_file() for name in TOKENIZER_FILES)
    if path.exists() or _looks_like_path(source):
        return False
    from huggingface_hub import try_to_load_from_cache

    for name in TOKENIZER_FILES:
        try:
            if isinstance(try_to_load_from_cache(source, name, cache_dir=hub_cache_dir()), str):
                return True
        except ValueError:  # not a valid repo id
            return False
    return False


def load_clip_model(model: str, reward: str, device: torch.device, dtype: str):
    """The process-wide `transformers.CLIPModel` for (model, device, dtype), in eval mode, frozen.

    Args:
        model: local folder or hub id (looked up in the local cache only).
        reward: the asking reward's name, for error messages.

    Raises:
        ModelNotFoundError: not a folder and not in the cache; the message says how to fetch it.
    """
    from transformers import CLIPModel

    def factory():
        clip = _load_component(CLIPModel.from_pretrained, model, reward, "model", dtype=DTYPES[dtype])
        return clip.to(device).eval().requires_grad_(False)

    return shared(("transformers.CLIPModel", model_key(model), str(device), dtype), factory)


def load_clip_tokenizer(source: str, reward: str, field: str = "model"):
    """The process-wide `transformers.CLIPTokenizer` of `source` (folder or hub id).

    Args:
        field: the reward config field `source` came from, named in the not-found message.
    """
    from transformers import CLIPTokenizer

    def factory():
        if not has_tokenizer_files(source):
            if Path(source).expanduser().exists():
                raise ModelNotFoundError(
                    f"reward {reward!r}: {source} has no CLIP tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                    f"set `{field}:` to the folder or hub id of this model's tokenizer"
                )
            raise _not_found(source, reward, field)
        return _load_component(CLIPTokenizer.from_pretrained, source, reward, field)

    return shared(("transformers.CLIPTokenizer", model_key(source)), factory)


def check_tokenizer_fits(tokenizer, clip, source: str, model: str) -> None:
    """Refuse a tokenizer whose ids the text tower has no embedding for.

    Raises:
        FlowrlError: the tokenizer's vocabulary is larger than the model's.
    """
    vocab = clip.config.text_config.vocab_size
    if len(tokenizer) > vocab:
        raise FlowrlError(
            f"the tokenizer of {source!r} has {len(tokenizer)} tokens but the text tower of {model!r} has "
            f"{vocab}; they do not belong together: point the processor at this model's tokenizer"
        )


def batches(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices of at most `batch_size` covering range(n)."""
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def _pooled(output: Any) -> Tensor:
    """get_*_features returns a tensor (transformers 4) or an output whose pooler_output is the
    projected embedding (transformers 5)."""
    return output if isinstance(output, Tensor) else output.pooler_output


def unit(x: Tensor) -> Tensor:
    """Rows of x [B, D] scaled to unit L2 norm, in float32."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True)


def image_embeddings(clip, pixel_values: Tensor) -> Tensor:
    """Projected CLIP image embeddings [B, projection_dim] float32 (not normalised) of
    pixel_values [B, 3, S, S]."""
    pixel_values = pixel_values.to(device=clip.device, dtype=clip.dtype)
    return _pooled(clip.get_image_features(pixel_values=pixel_values)).float()


def text_embeddings(clip, tokenizer, prompts: Sequence[str]) -> Tensor:
    """Projected CLIP text embeddings [B, projection_dim] float32 (not normalised).

    Prompts are padded to the longest and truncated to CLIP's 77-token context (or the model's
    position table, if shorter).
    """
    max_length = min(CLIP_MAX_TOKENS, clip.config.text_config.max_position_embeddings)
    tokens = tokenizer(list(prompts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    out = clip.get_text_features(
        input_ids=tokens["input_ids"].to(clip.device), attention_mask=tokens["attention_mask"].to(clip.device)
    )
    return _pooled(out).float()


def paired_cosine(
    clip, tokenizer, spec: ClipPreprocess, images: Tensor, prompts: Sequence[str], batch_size: int
) -> Tensor:
    """cos(image_i, prompt_i) [B] float32 on the CPU, for images [B, 3, H, W] in [0, 1].

    Runs `batch_size` pairs per forward pass under no_grad on the model's device and dtype.
    """
    out = []
    with torch.no_grad():
        for part in batches(images.shape[0], batch_size):
            pixels = preprocess(images[part].to(clip.device), spec)
            img = unit(image_embeddings(clip, pixels))
            txt = unit(text_embeddings(clip, tokenizer, prompts[part]))
            out.append((img * txt).sum(-1).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def logit_scale(clip) -> float:
    """exp(logit_scale) as stored in the checkpoint (100 for OpenAI CLIP)."""
    return float(clip.logit_scale.detach().float().exp())
