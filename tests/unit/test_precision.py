"""`rollout_precision: auto`: the rule on faked device facts, the probe, and the trainer's record."""

from __future__ import annotations

import pytest

from flowrl.precision import MIN_SPEEDUP, DeviceFacts, decide, device_facts, probe_bf16_speedup, resolve


def never(*_):
    raise AssertionError("the rule alone decides here; no probe")


@pytest.mark.parametrize(
    ("facts", "want"),
    [
        (DeviceFacts("cuda", cuda_bf16=True, name="H200"), "bfloat16"),
        (DeviceFacts("cuda", cuda_bf16=False, name="V100"), "float32"),
        (DeviceFacts("cpu", capability="AVX2", amx=False, avx512_bf16=False), "float32"),  # an EPYC 7xx3
        # CPUID says AMX, but torch's kernels were capped at AVX2 (ATEN_CPU_CAPABILITY=avx2)
        (DeviceFacts("cpu", capability="AVX2", amx=True, avx512_bf16=True), "float32"),
        (DeviceFacts("cpu", capability="AVX512", amx=False, avx512_bf16=False), "float32"),  # Skylake-X
        (DeviceFacts("cpu", capability="DEFAULT"), "float32"),
    ],
)
def test_the_rule_alone(facts, want):
    assert decide(facts, probe=never).precision == want


@pytest.mark.parametrize(("speedup", "want"), [(3.0, "bfloat16"), (MIN_SPEEDUP, "bfloat16"), (1.1, "float32"), (0.08, "float32")])
def test_a_cpu_with_native_bf16_is_confirmed_by_the_probe(speedup, want):
    # AMX in CPUID and AVX512 kernels, but oneDNN may still be capped (ONEDNN_MAX_CPU_ISA=AVX2): the
    # probe's measured speedup decides
    calls = []
    d = decide(DeviceFacts("cpu", capability="AVX512", amx=True), probe=lambda: calls.append(1) or speedup)
    assert calls == [1] and d.precision == want
    assert ("AMX" in d.reason) and (f"{speedup:.1f}" in d.reason or f"{speedup:.2f}" in d.reason)


def test_explicit_precisions_are_kept():
    assert resolve("float32", "cpu").precision == "float32"
    assert resolve("bfloat16", "cpu").precision == "bfloat16"


def test_facts_and_probe_on_this_machine():
    facts = device_facts("cpu")
    assert facts.kind == "cpu" and facts.capability
    assert probe_bf16_speedup(size=(64, 32, 64), repeats=1) > 0
    assert resolve("auto", "cpu").precision in ("float32", "bfloat16")
