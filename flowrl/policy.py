"""FlowPolicy: a diffusers SD3 pipeline with LoRA adapters for the policy, the old policy and the EMA.

The reference policy is the base model with adapters disabled. All three adapters live in the same
transformer through peft (adapter names "policy", "old", "ema"), so switching costs a flag, not a
copy. SD3.5 Medium/Large and the embedded toy model go through the same code: only the folder differs.

With ``model.finetune: full`` the same names are whole transformers instead (flowrl/full.py): the
methods below keep their meaning ("adapter" then means one copy of the transformer), so the trainer,
estimators and samplers do not care which kind of fine-tune runs.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from flowrl.config import LoraConfig, ModelConfig
from flowrl.errors import FlowrlError, ModelNotFoundError
from flowrl.full import TransformerCopies
from flowrl.types import Conditioning, Which

ADAPTERS = ("policy", "old", "ema")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(path: str) -> str:
    """A local folder (relative paths also tried against the repository root) or a hub id."""
    from flowrl.paths import ASSETS

    p = Path(path).expanduser()
    if p.exists():
        return str(p)
    repo_relative = ASSETS.parent / path
    if repo_relative.exists():
        return str(repo_relative)
    return path


def load_pipeline(path: str, dtype: torch.dtype = torch.float32):
    """StableDiffusion3Pipeline from a folder or hub id, with a clear error when it cannot be had.

    Raises:
        ModelNotFoundError: not a local folder and not in the local hub cache (no network here).
    """
    from flowrl.hf import quiet

    quiet()
    from diffusers import StableDiffusion3Pipeline

    where = resolve_model_path(path)
    local = Path(where).exists()
    if local and not (Path(where) / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"{where} is not a diffusers pipeline folder (no model_index.json); point model.path at the "
            "folder that holds model_index.json, transformer/, vae/ ..."
        )
    try:
        pipe = StableDiffusion3Pipeline.from_pretrained(where, dtype=dtype, local_files_only=local)
    except OSError as err:
        raise ModelNotFoundError(
            f"cannot load model {path!r}: {err}. No weights are downloaded on machines without network: "
            f"fetch it elsewhere with `hf download {path}` and copy the cache, or set "
            "model.path to a local diffusers folder"
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _lora_key(name: str, adapter: str) -> str | None:
    """'blocks.0.attn.to_q.lora_A.policy.weight' -> 'blocks.0.attn.to_q.lora_A.weight' if it belongs
    to `adapter`, else None."""
    for part in ("lora_A", "lora_B"):
        marker = f".{part}.{adapter}."
        if marker in name:
            return name.replace(marker, f".{part}.")
    return None


class FlowPolicy:
    """The trained model: text encoding, velocity under any adapter, decoding.

    Args:
        pipe: the loaded diffusers pipeline.
        lora: adapter settings (LoRA only).
        max_sequence_length: T5 tokens used for every encoding.
        seed: seed of the adapters' random initialisation (LoRA only).
        finetune: "lora" (adapters) or "full" (every transformer weight, in separate copies).
        copies: full only: the trained copies to make ("policy", "old", "ema"; evaluation needs one).
        reference: full only: keep a frozen copy of the base for which="ref" (LoRA always has it).
        mesh: full only: shard every copy over this 1-D DeviceMesh (FSDP2; see flowrl/full.py).

    Attributes:
        pipe: the diffusers pipeline (frozen base weights).
        transformer: LoRA: pipe.transformer with the three adapters. Full: the policy copy (or the
            only copy made).
        full: full only: the transformer copies (flowrl.full.TransformerCopies); None for LoRA.
        max_sequence_length: T5 tokens used for every encoding.
    """

    def __init__(
        self,
        pipe,
        lora: LoraConfig,
        max_sequence_length: int,
        seed: int = 0,
        *,
        finetune: str = "lora",
        copies: Sequence[str] = ADAPTERS,
        reference: bool = False,
        mesh=None,
    ):
        from peft import LoraConfig as PeftLoraConfig

        self.pipe = pipe
        self.transformer = pipe.transformer
        self.max_sequence_length = max_sequence_length
        for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
            if module is not None:
                module.requires_grad_(False)
        self.full: TransformerCopies | None = None
        self._compiled = None
        self._active: str | None = None
        if finetune == "full":
            self.full = TransformerCopies(pipe.transformer, copies, reference, mesh)
            self.transformer = self.full.main
            self.activate("policy" if "policy" in self.full.modules else copies[0])
            return
        if finetune != "lora":
            raise ValueError(f"finetune {finetune!r}: use lora or full")
        if mesh is not None:
            raise ValueError("only a full fine-tune is sharded; LoRA adapters are replicated on every rank")
        missing = [t for t in lora.targets if not any(n.endswith(t) for n, _ in self.transformer.named_modules())]
        if missing:
            raise FlowrlError(
                f"model.lora.targets {missing} match no module of the transformer; SD3 targets are "
                "to_q, to_k, to_v, to_out.0, add_q_proj, add_k_proj, add_v_proj, to_add_out"
            )
        config = PeftLoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            init_lora_weights="gaussian" if lora.init == "gaussian" else True,
            target_modules=list(lora.targets),
        )
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            # peft warns that several adapters share the model: that is the design here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            for name in ADAPTERS:
                self.transformer.add_adapter(config, adapter_name=name)
        self._upcast_adapters()
        self.copy_adapter("policy", "old")
        self.copy_adapter("policy", "ema")
        self._active: str | None = None
        self.activate("policy")

    @classmethod
    def from_config(
        cls,
        cfg: ModelConfig,
        device: torch.device | str = "cpu",
        seed: int = 0,
        *,
        reference: bool = False,
        copies: Sequence[str] = ADAPTERS,
        mesh=None,
    ) -> FlowPolicy:
        """Load the base model named by `cfg` and attach fresh adapters (or make the copies of a full
        fine-tune).

        Args:
            cfg: the pipeline's model section (model.finetune picks the kind of fine-tune).
            device: where the model lives.
            seed: seed of the LoRA adapters' initialisation.
            reference: full fine-tune: keep a frozen copy of the base (which="ref").
            copies: full fine-tune: the trained copies to make.
            mesh: full fine-tune on several processes: a 1-D DeviceMesh to shard every copy over
                (FSDP2). The transformer then stays on the CPU until sharding moves each rank's
                shards to the mesh's device, so no device ever holds all the unsharded copies.
        """
        from flowrl.toy.model import read_card

        if mesh is None:
            pipe = load_pipeline(cfg.path, _DTYPES[cfg.dtype]).to(device)
        else:
            pipe = load_pipeline(cfg.path, _DTYPES[cfg.dtype])
            for component in pipe.components.values():
                if isinstance(component, torch.nn.Module) and component is not pipe.transformer:
                    component.to(device)
        card = read_card(Path(resolve_model_path(cfg.path)))
        max_len = cfg.max_sequence_length
        if max_len is None:
            max_len = card.get("max_sequence_length", 256)
        policy = cls(pipe, cfg.lora, max_len, seed, finetune=cfg.finetune, copies=copies, reference=reference, mesh=mesh)
        if cfg.gradient_checkpointing:
            policy.transformer.enable_gradient_checkpointing()
        return policy

    def compile(self, backend: str = "inductor") -> None:
        """Run the transformer's forward passes through ``torch.compile`` (LoRA only).

        The module itself stays as it is (its parameter names, adapters and checkpoints do not
        change); `velocity` calls the compiled wrapper, which compiles once per adapter state and
        grad mode it meets (about 30 s each on 2 CPU cores) and then runs its fused kernels.
        """
        if self.full is not None:
            raise FlowrlError("train.compile: true applies to LoRA fine-tuning; set it to false or auto with model.finetune: full")
        self._compiled = torch.compile(self.transformer, dynamic=False, backend=backend)

    @property
    def finetune(self) -> str:
        """"lora" or "full"."""
        return "lora" if self.full is None else "full"

    @property
    def sharded(self) -> bool:
        """Whether the weights are sharded over processes (FSDP2; full fine-tuning only)."""
        return self.full is not None and self.full.sharded

    # ---------------------------------------------------------------------------------- adapters

    @torch.no_grad()
    def _upcast_adapters(self) -> None:
        """Keep LoRA weights in float32 under a bfloat16/float16 base model (mixed precision).

        AdamW steps of lr 3e-4 are below bfloat16's resolution for most weights (8 bits of
        mantissa), so adapters stored in the base dtype would barely learn. peft casts the
        activations to the adapter's dtype and the result back, so only the small LoRA matmuls run
        in float32. A float32 base model is left untouched.
        """
        for name, p in self.transformer.named_parameters():
            if ".lora_" in name and p.dtype in (torch.bfloat16, torch.float16):
                p.data = p.data.float()

    def adapter_params(self, adapter: str = "policy") -> dict[str, torch.nn.Parameter]:
        """Parameters of one adapter, keyed without the adapter name (full: of one transformer copy,
        by parameter name; DTensor shards when sharded)."""
        if self.full is not None:
            return self.full.params(adapter)
        out = {}
        for name, p in self.transformer.named_parameters():
            key = _lora_key(name, adapter)
            if key is not None:
                out[key] = p
        return out

    def adapter_state(self, adapter: str) -> dict[str, Tensor]:
        """A detached copy of one adapter's weights (keys without the adapter name).

        Full: the copy's whole transformer state dict, on the CPU. Sharded, a collective that every
        rank must call: rank 0 receives the gathered weights, the other ranks an empty dict.
        """
        if self.full is not None:
            return self.full.state(adapter)
        return {k: p.detach().clone() for k, p in self.adapter_params(adapter).items()}

    @torch.no_grad()
    def load_adapter_state(self, adapter: str, state: dict[str, Tensor]) -> None:
        """Overwrite one adapter (full: one transformer copy; every rank passes the whole state).

        Raises:
            FlowrlError: the keys do not fit this model's adapter (or transformer).
        """
        if self.full is not None:
            return self.full.load_state(adapter, state)
        params = self.adapter_params(adapter)
        if set(params) != set(state):
            missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
            raise FlowrlError(
                f"adapter weights do not fit this model's '{adapter}' adapter: {len(missing)} missing "
                f"(e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]}); was the checkpoint "
                "made with another model or LoRA targets?"
            )
        for k, p in params.items():
            p.copy_(state[k].to(p.dtype))

    @torch.no_grad()
    def copy_adapter(self, src: str, dst: str) -> None:
        if self.full is not None:
            return self.full.copy(src, dst)
        self.load_adapter_state(dst, self.adapter_state(src))

    @torch.no_grad()
    def blend_adapter(self, dst: str, src: str, decay: float) -> None:
        """dst <- decay * dst + (1 - decay) * src (old-policy soft update and EMA)."""
        if self.full is not None:
            return self.full.blend(dst, src, decay)
        s, d = self.adapter_params(src), self.adapter_params(dst)
        for k, p in d.items():
            p.lerp_(s[k].to(p.dtype), 1.0 - decay)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        if self.full is not None:
            return self.full.trainable()
        return list(self.adapter_params("policy").values())

    def activate(self, which: Which | str) -> None:
        """Route the transformer through one adapter, or none for "ref" (full: check that the copy
        exists; `velocity` picks the module).

        Raises:
            FlowrlError: full fine-tune: "ref" without a reference copy, or a copy not made.
        """
        if which == self._active:
            return
        if self.full is not None:
            self.full.module(which)
        elif which == "ref":
            self.transformer.disable_adapters()
        else:
            if which not in ADAPTERS:
                raise ValueError(f"unknown weights {which!r}; use one of policy, old, ema, ref")
            if self._active in (None, "ref"):
                self.transformer.enable_adapters()
            self.transformer.set_adapter(which)
            # peft marks only the active adapter trainable; the optimizer owns "policy" alone.
            for name, p in self.transformer.named_parameters():
                if ".lora_" in name:
                    p.requires_grad_(_lora_key(name, "policy") is not None)
        self._active = which

    # --------------------------------------------------------------------------- model interface

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the transformer computes in (full: model.dtype; the weights are float32)."""
        if self.full is not None:
            return self.full.compute_dtype
        return next(self.transformer.parameters()).dtype

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the latents at the model's native resolution."""
        cfg = self.transformer.config
        return (cfg.in_channels, cfg.sample_size, cfg.sample_size)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], with_negative: bool = False) -> Conditioning:
        """Text conditioning of `prompts` (frozen encoders); the empty prompt as negative for CFG."""
        pe, npe, pooled, npooled = self.pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=with_negative,
            negative_prompt="" if with_negative else None,
            max_sequence_length=self.max_sequence_length,
        )
        return Conditioning(pe, pooled, npe if with_negative else None, npooled if with_negative else None)

    def velocity(self, x: Tensor, t: Tensor, cond: Conditioning, which: Which | str = "policy", guidance: float = 1.0) -> Tensor:
        """Velocity [B, C, h, w] at latents x [B, C, h, w] and times t [B] in [0, 1].

        CFG (guidance != 1) runs the negative and positive halves as one batch, as diffusers does.
        """
        self.activate(which)
        module = self.transformer if self._compiled is None else self._compiled
        context = contextlib.nullcontext()
        if self.full is not None:
            module, context = self.full.module(which), self.full.autocast(self.device)
        dtype = self.dtype
        if guidance != 1.0:
            if cond.neg_prompt_embeds is None:
                raise FlowrlError("classifier-free guidance needs negative embeddings: encode with with_negative=True")
            x_in = torch.cat([x, x])
            t_in = torch.cat([t, t])
            emb = torch.cat([cond.neg_prompt_embeds, cond.prompt_embeds])
            pooled = torch.cat([cond.neg_pooled, cond.pooled])
        else:
            x_in, t_in, emb, pooled = x, t, cond.prompt_embeds, cond.pooled
        with context:
            v = module(
                hidden_states=x_in.to(dtype),
                # float32, as StableDiffusion3Pipeline passes its scheduler's timesteps: the transformer
                # casts the sinusoidal embedding to its dtype, so the time itself is never rounded. In
                # bfloat16 t * 1000 would round to multiples of 4 near 1000 (up to 2 units off).
                timestep=t_in.float() * 1000,
                encoder_hidden_states=emb.to(dtype),
                pooled_projections=pooled.to(dtype),
                return_dict=False,
            )[0].float()
        if guidance != 1.0:
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + guidance * (v_cond - v_uncond)
        return v

    @torch.no_grad()
    def decode(self, x0: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] from normalised latents x0 [B, C, h, w]."""
        vae = self.pipe.vae
        z = x0.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return (vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)
