"""What model-backed rewards share: where their weights come from, one loaded copy per process,
device and dtype, and the one-line description `flowrl rewards list` prints.

Weights are never downloaded implicitly on a machine without network: a model id is looked up in
the local Hugging Face cache only (``local_files_only``), a local folder or file is used as is, and
anything missing is a `ModelNotFoundError` that names the model, where flowrl looked, and how to fetch
it or point the reward at a local copy.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import torch
from pydantic import Field

from flowrl.errors import ModelNotFoundError
from flowrl.rewards.base import RewardConfig

T = TypeVar("T")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class RewardInfo:
    """One row of `flowrl rewards list`."""

    measures: str
    model: str
    licence: str
    extra: str = ""  # pip extra the reward's DEFAULT configuration needs beyond the default install ("" = none)


class ModelRewardConfig(RewardConfig):
    """Fields of every reward that runs a neural network."""

    model: str | None = Field(
        None, description="Local folder/file or hub id of the weights (default: the reward's published model)."
    )
    device: str = Field("auto", description="'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Compute dtype of the model.")
    batch_size: int = Field(16, gt=0, description="Images per forward pass.")


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda if available else cpu; anything else as torch reads it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def hub_cache_dir() -> str:
    """Where a hub id is looked up (honours HF_HUB_CACHE / HF_HOME like huggingface_hub does)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    return os.path.join(home, "hub")


def missing_model_message(model: str, reward: str, field: str = "model", detail: str = "") -> str:
    """The error text for weights that cannot be had offline: what, where we looked, how to fix."""
    where = f"not a local path, and not in the Hugging Face cache {hub_cache_dir()}"
    return (
        f"reward {reward!r}: cannot load model {model!r} ({where}{'; ' + detail if detail else ''}). "
        f"flowrl never downloads weights implicitly. Fetch them on a machine with network with "
        f"`hf download {model}` (`huggingface-cli download` on older huggingface_hub) and copy the cache "
        f"(or set HF_HOME), or set the reward's "
        f"`{field}:` to a local folder that holds them"
    )


def load_pretrained(loader: Callable[..., T], model: str, reward: str, field: str = "model", **kwargs) -> T:
    """`loader(model, local_files_only=True, **kwargs)` (a transformers/diffusers `from_pretrained`),
    turning "not found" into a `ModelNotFoundError` that teaches the fix.

    Args:
        loader: e.g. ``CLIPModel.from_pretrained``.
        model: local folder or hub id.
        reward: the reward's name, for the message.
        field: the config field that names this model, for the message.
    """
    path = Path(model).expanduser()
    if path.exists():
        model = str(path)
    elif model.startswith((".", "/", "~")) or model.count("/") > 1:  # a path, not an "org/name" hub id
        raise ModelNotFoundError(f"reward {reward!r}: {model} does not exist; set `{field}:` to an existing folder")
    try:
        return loader(model, local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        if path.exists():
            raise ModelNotFoundError(
                f"reward {reward!r}: {model} exists but cannot be loaded as this reward's model: {err}"
            ) from None
        raise ModelNotFoundError(missing_model_message(model, reward, field)) from None


_CACHE: dict[tuple, object] = {}
_LOCK = threading.Lock()


def shared(key: tuple, factory: Callable[[], T]) -> T:
    """One instance per `key` in this process: two rewards (or two mixes) that need the same model
    with the same device and dtype get the same object, loaded once."""
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = factory()
        return _CACHE[key]  # type: ignore[return-value]


def clear_shared() -> None:
    """Forget every shared model (tests; freeing memory between runs)."""
    with _LOCK:
        _CACHE.clear()
