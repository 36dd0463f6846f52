"""`rollout_precision: auto`: the rule on faked device facts, the probe, and the trainer's record."""

from __future__ import annotations

import pytest

from flowrl.errors import FlowrlError
from flowrl.precision import (
    MIN_COMPILE_EPOCHS, MIN_SPEEDUP, DeviceFacts, cpp_compiler, decide, decide_compile, device_facts, probe_bf16_speedup,
    resolve,
)


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


# ------------------------------------------------------------------------- train.compile


@pytest.mark.parametrize(
    ("kind", "capability", "finetune", "epochs", "compiler", "enabled", "why"),
    [
        ("cpu", "AVX2", "lora", MIN_COMPILE_EPOCHS, "g++", True, "g++"),
        ("cpu", "AVX2", "lora", MIN_COMPILE_EPOCHS - 1, "g++", False, "epochs"),
        ("cpu", "AVX2", "lora", 80, None, False, "no C++ compiler"),
        ("cpu", "AVX512", "lora", 80, "g++", False, "AVX2 CPUs only"),
        ("cpu", "AVX2", "full", 80, "g++", False, "full fine-tune"),
        ("cuda", "", "lora", 80, None, False, "eager on cuda"),
    ],
)
def test_auto_compiles_long_lora_runs_on_an_avx2_cpu_with_a_compiler(kind, capability, finetune, epochs, compiler, enabled, why):
    d = decide_compile("auto", kind, finetune, epochs, lambda: compiler, capability)
    assert d.enabled is enabled and why in d.reason


def test_explicit_compile_is_kept_or_refused_with_the_fix():
    assert decide_compile(False, "cpu", "full", 80, never).enabled is False
    assert decide_compile(True, "cpu", "lora", 1, lambda: "g++").enabled is True  # short runs too, when asked
    assert decide_compile(True, "cuda", "lora", 1, never).enabled is True
    with pytest.raises(FlowrlError, match="apt install g\\+\\+.*train.compile: auto or false"):
        decide_compile(True, "cpu", "lora", 80, lambda: None)
    with pytest.raises(FlowrlError, match="LoRA fine-tuning"):
        decide_compile(True, "cpu", "full", 80, never)
    # auto asks for the compiler only where it would compile: eager runs never import inductor
    for args in (("cpu", "full", 80), ("cuda", "lora", 80), ("cpu", "lora", 1)):
        assert decide_compile("auto", *args, never, "AVX2").enabled is False
    assert decide_compile("auto", "cpu", "lora", 80, never, "AVX512").enabled is False


def test_the_compiler_of_this_machine_is_found_or_none(monkeypatch):
    found = cpp_compiler()
    assert found is None or isinstance(found, str)
    monkeypatch.setattr("torch._inductor.cpp_builder.get_cpp_compiler", lambda: (_ for _ in ()).throw(RuntimeError("moved")))
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CXX", raising=False)
    assert cpp_compiler() is None  # torch's search failed and nothing is on PATH

