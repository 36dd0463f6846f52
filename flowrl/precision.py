"""Speed settings chosen from the machine: the precision of the no-grad passes
(`train.rollout_precision: auto`) and whether the transformer runs through torch.compile
(`train.compile: auto`, see `decide_compile`).

bfloat16 halves the bytes of every matmul and is about 1.5x faster where the hardware multiplies
it natively: CUDA GPUs of compute capability 8.0 and up (A100, H100, L40S, RTX 30xx/40xx), and
CPUs with AMX or AVX512-BF16 (Intel Sapphire Rapids and later, AMD Zen 4 and later). Elsewhere, on
an AVX2-only CPU, torch emulates bf16 matmuls and they run 10-20x *slower* than float32 (measured:
toy epochs of 659 s in bf16 against 38 s in float32 on a 2-core AVX2 EPYC).

The rule (`decide`), on what torch reports about the device (`DeviceFacts`):
1. CUDA: bfloat16 if ``torch.cuda.is_bf16_supported()``, else float32.
2. CPU: float32 unless torch's kernels run at AVX512 (``torch.backends.cpu.get_cpu_capability()``)
   and the CPU has AMX tiles or AVX512-BF16.
3. A CPU that passes 2 is probed (`probe_bf16_speedup`, about 0.1 s): oneDNN may be capped below
   the CPU's own ISA (``ONEDNN_MAX_CPU_ISA=AVX2``, a VM that hides AMX state) while CPUID still
   reports AMX, so bfloat16 is taken only when a bf16 matmul of the toy's size measures at least
   `MIN_SPEEDUP` times faster than float32.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from flowrl.errors import FlowrlError

Precision = Literal["float32", "bfloat16"]

#: bf16 must beat float32 by this factor in the probe to be chosen (below it, the rounding costs
#: precision for no real gain).
MIN_SPEEDUP = 1.2


@dataclass(frozen=True)
class DeviceFacts:
    """What the precision rule reads about a device.

    Attributes:
        kind: "cuda" or "cpu" (any other device type is treated like a CPU).
        capability: torch's CPU kernel level ("AVX2", "AVX512", "DEFAULT", ...); "" for CUDA.
        amx: the CPU has AMX tiles (CPUID).
        avx512_bf16: the CPU has AVX512-BF16 (CPUID).
        cuda_bf16: CUDA only: torch.cuda.is_bf16_supported().
        name: the device as people name it, for the log line.
    """

    kind: str
    capability: str = ""
    amx: bool = False
    avx512_bf16: bool = False
    cuda_bf16: bool = False
    name: str = ""


@dataclass(frozen=True)
class Decision:
    """The chosen precision and why, in one line for the run's log."""

    precision: Precision
    reason: str


def cpu_name() -> str:
    """The CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) ..."), for logs and benchmark headers."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_facts(device: torch.device | str) -> DeviceFacts:
    """Read `DeviceFacts` of `device` from torch."""
    device = torch.device(device)
    if device.type == "cuda":
        return DeviceFacts("cuda", cuda_bf16=bool(torch.cuda.is_bf16_supported()), name=torch.cuda.get_device_name(device))
    return DeviceFacts(
        "cpu",
        capability=torch.backends.cpu.get_cpu_capability(),
        amx=bool(torch.cpu._is_amx_tile_supported()),
        avx512_bf16=bool(torch.cpu._is_avx512_bf16_supported()),
        name="CPU",
    )


def probe_bf16_speedup(size: tuple[int, int, int] = (2048, 256, 1024), repeats: int = 3) -> float:
    """float32 seconds over bfloat16 seconds of the best of `repeats` matmuls [m, k] @ [k, n] on the
    CPU (about 0.1 s in all where bf16 is native; a few tenths where it is emulated)."""
    m, k, n = size
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)

    def best(x: torch.Tensor, y: torch.Tensor) -> float:
        x @ y  # warm-up: oneDNN builds its kernel on first use
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - start)
        return min(times)

    return best(a, b) / best(a.bfloat16(), b.bfloat16())


def decide(facts: DeviceFacts, probe: Callable[[], float] = probe_bf16_speedup) -> Decision:
    """The precision of `rollout_precision: auto` on a device (see the module docstring).

    Args:
        facts: what torch reports about the device.
        probe: measures bf16's speedup over float32 on this CPU; called only when the rule alone
            would pick bf16 on a CPU.
    """
    if facts.kind == "cuda":
        if facts.cuda_bf16:
            return Decision("bfloat16", f"{facts.name or 'CUDA GPU'} multiplies bfloat16 natively")
        return Decision("float32", f"{facts.name or 'this CUDA GPU'} has no native bfloat16 (compute capability < 8.0)")
    if facts.capability != "AVX512":
        return Decision(
            "float32",
            f"CPU kernels at {facts.capability or 'an unknown level'}: bfloat16 matmuls would be emulated, "
            "10-20x slower than float32",
        )
    if not (facts.amx or facts.avx512_bf16):
        return Decision("float32", "AVX512 CPU without AMX or AVX512-BF16: bfloat16 matmuls would be emulated")
    speedup = probe()
    native = "AMX" if facts.amx else "AVX512-BF16"
    if speedup >= MIN_SPEEDUP:
        return Decision("bfloat16", f"CPU with {native}: a bfloat16 matmul ran {speedup:.1f}x as fast as float32")
    return Decision(
        "float32",
        f"CPU reports {native}, but a bfloat16 matmul ran only {speedup:.2f}x as fast as float32 (oneDNN capped "
        "below it, e.g. ONEDNN_MAX_CPU_ISA)",
    )


def resolve(requested: str, device: torch.device | str) -> Decision:
    """`requested` as given ("float32" / "bfloat16"), or the machine's choice for "auto"."""
    if requested != "auto":
        return Decision(requested, "as the pipeline says")  # type: ignore[arg-type]
    return decide(device_facts(device))


#: `train.compile: auto` compiles runs of at least this many epochs. Compiling the toy transformer
#: cost about 40 s of `make demo`'s first epoch and first evaluation on 2 AVX2 cores (empty kernel
#: cache) and saves about 4 s of each 18 s epoch there (docs/toy-epoch.md): it pays from about 10
#: epochs, and 20 leaves room for a slower machine.
MIN_COMPILE_EPOCHS = 20


@dataclass(frozen=True)
class CompileDecision:
    """Whether the transformer runs through torch.compile, and why, in one line for the run's log."""

    enabled: bool
    reason: str


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend would use, or None when there is none."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return get_cpp_compiler()
    except Exception:  # noqa: BLE001 - torch raises its own InvalidCxxCompiler, or the API moved
        return next((c for c in (os.environ.get("CXX"), "g++", "clang++") if c and shutil.which(c)), None)


def decide_compile(
    requested: bool | str, kind: str, finetune: str, epochs: int, find_compiler: Callable[[], str | None], capability: str = ""
) -> CompileDecision:
    """`train.compile` as it will run.

    Args:
        requested: True, False or "auto".
        kind: the device type ("cpu", "cuda").
        finetune: "lora" or "full" (a full fine-tune is never compiled: its copies swap weights).
        epochs: the run's train.epochs.
        find_compiler: `cpp_compiler`, called only when the answer matters (it imports torch's
            inductor, which a run that stays eager does without).
        capability: torch's CPU kernel level (``torch.backends.cpu.get_cpu_capability()``).

    auto compiles LoRA runs of at least `MIN_COMPILE_EPOCHS` epochs on a CPU whose kernels run at
    AVX2, with a C++ compiler: there the toy's epoch takes 0.76x the time (AMD EPYC, AVX2 imitated)
    or 0.72x (Intel Xeon, AVX2 imitated). It leaves the rest eager: GPUs (unmeasured), and AVX512
    CPUs, which run bf16 rollouts already and where inductor's kernels corrupted the heap in 3 of 4
    runs of benchmarks/toy_epoch.py on an AMD EPYC ("malloc(): unaligned tcache chunk detected"; docs/toy-epoch.md).
    True insists, and refuses what cannot work.

    Raises:
        FlowrlError: True with a full fine-tune, or on a CPU without a C++ compiler.
    """
    if requested is False:
        return CompileDecision(False, "as the pipeline says")
    if requested is True:
        if finetune == "full":
            raise FlowrlError("train.compile: true applies to LoRA fine-tuning; set it to false or auto with model.finetune: full")
        if kind == "cpu" and find_compiler() is None:
            raise FlowrlError(
                "train.compile: true needs a C++ compiler for torch.compile's CPU kernels and none was found "
                "(g++ or clang++ on PATH, or CXX): install one (apt install g++), or set train.compile: auto or false"
            )
        return CompileDecision(True, "as the pipeline says")
    if finetune == "full":
        return CompileDecision(False, "a full fine-tune runs eager")
    if kind != "cpu":
        return CompileDecision(False, f"eager on {kind} (compiling is measured on CPUs only)")
    if capability != "AVX2":
        return CompileDecision(False, f"CPU kernels at {capability or 'an unknown level'}: compiling is measured and kept on AVX2 CPUs only")
    if epochs < MIN_COMPILE_EPOCHS:
        return CompileDecision(False, f"{epochs} epochs: compiling pays from about {MIN_COMPILE_EPOCHS} on")
    compiler = find_compiler()
    if compiler is None:
        return CompileDecision(False, "no C++ compiler for torch.compile's CPU kernels (install g++ to compile)")
    return CompileDecision(True, f"AVX2 CPU with {compiler}, {epochs} epochs: about 0.75x the time per epoch after compiling")
