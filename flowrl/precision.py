"""Which precision the no-grad passes run in, chosen from the machine (`rollout_precision: auto`).

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

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

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
