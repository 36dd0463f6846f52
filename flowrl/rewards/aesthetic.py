"""LAION aesthetic predictor v2: a linear MLP head on L2-normalised CLIP ViT-L/14 image embeddings.

score = head(e / |e|), e the projected 768-d CLIP image embedding; the head is five Linear layers
with dropout between the first four and NO activations (so, in eval mode, one affine map), trained
on AVA, logos and SAC ratings. Output is an unbounded score on AVA's 1-10 scale, about 4-7 in
practice. The prompt is not used.
"""

from __future__ import annotations

import glob
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from flowrl.errors import FlowrlError, ModelNotFoundError
from flowrl.registry import register
from flowrl.rewards.base import as_float_images, check_batch
from flowrl.rewards.clip_common import (
    batches,
    image_embeddings,
    load_clip_model,
    preprocess,
    preprocess_spec,
    unit,
)
from flowrl.rewards.models import ModelRewardConfig, RewardInfo, hub_cache_dir, resolve_device, shared
from flowrl.types import RewardOutput

DEFAULT_MODEL = "openai/clip-vit-large-patch14"
DEFAULT_HEAD = "sac+logos+ava1-l14-linearMSE.pth"
HEAD_URL = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth"
)
EMBED_DIM = 768


class AestheticHead(nn.Module):
    """The v2 predictor's MLP without activations; state-dict keys layers.{0,2,4,6,7}.{weight,bias}.

    Shapes: embeddings [B, 768] (unit norm) -> scores [B].
    """

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(EMBED_DIM, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.layers(embeddings).squeeze(-1)


def expected_head_shapes() -> dict[str, tuple[int, ...]]:
    """State-dict key -> shape of the head file flowrl reads."""
    return {k: tuple(v.shape) for k, v in AestheticHead().state_dict().items()}


def check_head_state(state: object, path: Path) -> None:
    """Refuse a head file that is not the v2 predictor's state dict.

    Raises:
        FlowrlError: not a dict of tensors, missing/unexpected keys, or wrong shapes; the message lists
            the expected keys and the keys found.
    """
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise FlowrlError(
            f"reward 'aesthetic': head file {path} does not hold a state dict of tensors "
            f"(found {type(state).__name__}); save it with torch.save(mlp.state_dict(), path)"
        )
    expected = expected_head_shapes()
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found.keys() != expected.keys():
        missing = sorted(expected.keys() - found.keys())
        unexpected = sorted(found.keys() - expected.keys())
        raise FlowrlError(
            f"reward 'aesthetic': head file {path} is not a LAION aesthetic v2 head: "
            f"expected keys {sorted(expected)}, found {sorted(found)} (missing {missing}, unexpected {unexpected}). "
            f"Use {DEFAULT_HEAD} or a head saved from the same 768-1024-128-64-16-1 linear MLP"
        )
    wrong = {k: (expected[k], found[k]) for k in expected if expected[k] != found[k]}
    if wrong:
        detail = ", ".join(f"{k}: expected {e}, found {f}" for k, (e, f) in sorted(wrong.items()))
        raise FlowrlError(f"reward 'aesthetic': head file {path} has wrong shapes: {detail}")


def read_head(path: Path) -> AestheticHead:
    """The head in `path`, on the CPU, float32, eval mode (dropout off).

    Loaded with ``map_location="cpu"`` (the published file was saved from cuda:0) and
    ``weights_only=True`` (a state dict needs no arbitrary unpickling).

    Raises:
        FlowrlError: unreadable file or not the expected state dict.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise FlowrlError(
            f"reward 'aesthetic': cannot read head file {path} as a torch state dict ({err}); "
            f"re-download {DEFAULT_HEAD} or save the head with torch.save(mlp.state_dict(), path)"
        ) from None
    check_head_state(state, path)
    head = AestheticHead()
    head.load_state_dict({k: v.float() for k, v in state.items()})
    return head.eval().requires_grad_(False)


def find_head_file(head: str) -> Path:
    """Where the head file named by the config's `head:` is.

    Looked up as: an existing local file; ``org/repo/path/in/repo`` in the Hugging Face cache; a bare
    file name in any cached model snapshot (first match in sorted order).

    Raises:
        ModelNotFoundError: found nowhere; the message says where it looked and how to get the file.
    """
    path = Path(head).expanduser()
    if path.is_file():
        return path
    cache = hub_cache_dir()
    looked = f"no local file {path.resolve()}"
    parts = head.split("/")
    if len(parts) >= 3 and not head.startswith((".", "/", "~")):
        from huggingface_hub import try_to_load_from_cache

        repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
        try:
            found = try_to_load_from_cache(repo, filename, cache_dir=cache)
        except ValueError:  # not a valid repo id
            found = None
        if isinstance(found, str):
            return Path(found)
        looked += f", and no {filename} of {repo} in the Hugging Face cache {cache}"
    elif len(parts) == 1:
        pattern = str(Path(cache) / "models--*" / "snapshots" / "*" / glob.escape(head))
        matches = sorted(glob.glob(pattern))
        if matches:
            return Path(matches[0])
        looked += f", and no file of that name in any model snapshot of the Hugging Face cache {cache}"
    raise ModelNotFoundError(
        f"reward 'aesthetic': cannot find the head file {head!r} ({looked}). flowrl never downloads weights "
        f"implicitly. Download {DEFAULT_HEAD} (3.7 MB) from {HEAD_URL} and set `head:` to its path, or give "
        "`head: org/repo/file.pth` for a copy in the Hugging Face cache"
    )


def load_head(path: Path, device: torch.device) -> AestheticHead:
    """The process-wide head from `path` on `device` (float32: it is 0.9 M parameters)."""
    return shared(("aesthetic-head", str(path.resolve()), str(device)), lambda: read_head(path).to(device))


@register("reward", "aesthetic")
class AestheticReward:
    """LAION aesthetic predictor v2 score of each image (prompts are ignored)."""

    info = RewardInfo(
        measures="visual appeal on AVA's 1-10 scale (about 4-7), prompt-independent",
        model=f"{DEFAULT_MODEL} + {DEFAULT_HEAD}",
        licence="head Apache-2.0; CLIP ViT-L/14 OpenAI, MIT code release",
    )

    class Config(ModelRewardConfig):
        kind: Literal["aesthetic"] = "aesthetic"
        head: str = Field(
            DEFAULT_HEAD,
            description="The MLP head: a local .pth file, 'org/repo/file.pth' in the Hugging Face cache, or a "
            "bare file name found in any cached snapshot.",
        )

    def __init__(self, config: Config | None = None):
        self.config = config or self.Config()
        device = resolve_device(self.config.device)
        model = self.config.model or DEFAULT_MODEL
        head_path = find_head_file(self.config.head)  # before loading CLIP: fail fast and cheap
        self.model = load_clip_model(model, "aesthetic", device, self.config.dtype)
        if self.model.config.projection_dim != EMBED_DIM:
            raise FlowrlError(
                f"reward 'aesthetic': {model} embeds images in {self.model.config.projection_dim} dimensions but "
                f"the aesthetic head takes {EMBED_DIM} (CLIP ViT-L/14); set `model:` to {DEFAULT_MODEL} or a copy"
            )
        self.head = load_head(head_path, device)
        self.preprocess = preprocess_spec(model, self.model.config.vision_config.image_size)

    def __call__(self, images, prompts: Sequence[str], metadata: Sequence[object] = ()) -> RewardOutput:
        """Scores [B] float32 on AVA's scale for images [B, 3, H, W] in [0, 1]."""
        images = as_float_images(images)
        check_batch(images, prompts, metadata)
        out = []
        with torch.no_grad():
            for part in batches(images.shape[0], self.config.batch_size):
                pixels = preprocess(images[part].to(self.model.device), self.preprocess)
                embeddings = unit(image_embeddings(self.model, pixels))
                out.append(self.head(embeddings).float().cpu())
        return RewardOutput(scores=torch.cat(out) if out else torch.zeros(0))

