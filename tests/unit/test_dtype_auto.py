"""`engine.dtype: auto`: bf16 only where the hardware runs it fast (actors/engine.py resolve_dtype).

The flag sets are those of real /proc/cpuinfo lines: an AVX-512 CPU without bf16 units (the 2-core cloud
machines where bf16 matmul ran at a quarter of fp32's speed), one with AVX512_BF16, a Sapphire Rapids with
AMX, and an AVX2-only desktop.
"""

from __future__ import annotations

import pytest

from actors.engine import engine_kwargs, host_dtype_support, resolve_dtype
from pipeline.config import EngineConfig, RunConfig, load_config

AVX512_NO_BF16 = frozenset("fpu sse2 avx avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni".split())
AVX512_BF16 = AVX512_NO_BF16 | {"avx512_bf16"}
AMX = AVX512_NO_BF16 | {"amx_tile", "amx_bf16", "amx_int8"}
AVX2_ONLY = frozenset("fpu sse2 avx avx2 fma".split())


@pytest.mark.parametrize("flags, expected", [
    (AVX512_NO_BF16, "float32"), (AVX512_BF16, "bfloat16"), (AMX, "bfloat16"), (AVX2_ONLY, "float32"),
    (frozenset(), "float32"),
])
def test_auto_on_cpu_follows_the_bf16_units(flags, expected) -> None:
    assert resolve_dtype("auto", flags, gpu_bf16=None) == expected


def test_auto_on_a_gpu_follows_the_gpu_not_the_host_cpu() -> None:
    assert resolve_dtype("auto", AVX2_ONLY, gpu_bf16=True) == "bfloat16"  # e.g. A100/H100
    assert resolve_dtype("auto", AMX, gpu_bf16=False) == "float32"  # e.g. V100/T4: no bf16


@pytest.mark.parametrize("explicit", ["float32", "bfloat16", "float16"])
def test_an_explicit_dtype_is_kept_whatever_the_hardware(explicit) -> None:
    for flags, gpu in ((AVX2_ONLY, None), (AMX, None), (AVX2_ONLY, True), (AMX, False)):
        assert resolve_dtype(explicit, flags, gpu) == explicit


def test_the_resolved_dtype_reaches_the_engine_arguments() -> None:
    engine = EngineConfig(dtype="auto")
    assert engine_kwargs(engine, 0, 2, None, dtype=resolve_dtype("auto", AVX2_ONLY))["dtype"] == "float32"
    assert engine_kwargs(engine, 0, 2, None, dtype=resolve_dtype("auto", AMX))["dtype"] == "bfloat16"


def test_this_host_reports_its_flags() -> None:
    flags, gpu = host_dtype_support()
    cpuinfo = open("/proc/cpuinfo").read()
    assert ("avx512_bf16" in flags) == (" avx512_bf16" in cpuinfo)
    assert resolve_dtype("auto", flags, gpu) in ("bfloat16", "float32")


def test_the_default_configs_use_auto() -> None:
    assert RunConfig().rollout.engine.dtype == "auto" and RunConfig().listener.engine.dtype == "auto"
    for name in ("tiny_cpu", "qwen25vl_7b"):  # learn_cpu keeps float32: its rollout matches its fp32 learner
        cfg = load_config(f"configs/{name}.yaml")
        assert cfg.rollout.engine.dtype == "auto" and cfg.listener.engine.dtype == "auto", name
