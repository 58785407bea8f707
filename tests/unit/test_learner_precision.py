"""The learner's precision and optimizer choices (actors/learner.py), decided without building an engine:
the DeepSpeed config per dtype and stage, `learner.dtype: auto`, fused AdamW, no JIT-built CPU Adam."""

from __future__ import annotations

import pytest
import torch

from actors.engine import host_dtype_support, resolve_dtype
from actors.learner_setup import attention_kwargs, deepspeed_config, make_optimizer, prebuilt_cpu_adam, resolve_learner_dtype
from pipeline.config import LearnerConfig, load_config


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_fp32_has_no_mixed_precision_and_keeps_its_stage(stage) -> None:
    config = deepspeed_config(LearnerConfig(zero_stage=stage), world_size=2, dtype="float32")
    assert config["zero_optimization"]["stage"] == stage
    assert not config["bf16"]["enabled"] and not config["fp16"]["enabled"] and "data_types" not in config


@pytest.mark.parametrize("stage, runs", [(0, 1), (2, 2), (3, 3)])
def test_bf16_accumulates_gradients_in_fp32_with_fp32_masters(stage, runs) -> None:
    """Stage 0 has no fp32 master weights for bf16 in DeepSpeed (its DDP_BFLOAT16 steps the bf16 weights),
    so a bf16 policy at stage 0 runs stage 1 (BF16_Optimizer: fp32 masters, fp32 accumulation)."""
    config = deepspeed_config(LearnerConfig(zero_stage=stage), world_size=1, dtype="bfloat16")
    assert config["bf16"]["enabled"] and config["data_types"] == {"grad_accum_dtype": "fp32"}
    assert config["zero_optimization"]["stage"] == runs


def test_the_frozen_reference_has_no_optimizer_settings() -> None:
    for stage, ref_stage in ((0, 0), (2, 0), (3, 3)):
        config = deepspeed_config(LearnerConfig(zero_stage=stage), 1, with_optimizer=False, dtype="bfloat16")
        assert config["zero_optimization"]["stage"] == ref_stage and "data_types" not in config


def test_zero3_buckets_come_from_the_config() -> None:
    cfg = load_config("configs/qwen25vl_7b.yaml").learner
    zero = deepspeed_config(cfg, cfg.num_ranks, dtype="bfloat16")["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_prefetch_bucket_size"] == cfg.zero3_prefetch_bucket_size == 5e8
    assert zero["stage3_param_persistence_threshold"] == 2_000_000 > 3584 * 512  # k/v projections stay whole
    assert zero["stage3_max_live_parameters"] == 3e9 and zero["reduce_bucket_size"] == 5e8
    assert cfg.dtype == "auto" and cfg.activation_checkpointing


def test_auto_follows_the_machine_and_explicit_dtypes_stay() -> None:
    assert resolve_learner_dtype("auto") == resolve_dtype("auto", *host_dtype_support())
    flags = open("/proc/cpuinfo").read()
    if not torch.cuda.is_available():
        expected = "bfloat16" if (" avx512_bf16" in flags or " amx_bf16" in flags) else "float32"
        assert resolve_learner_dtype("auto") == expected
    for dtype in ("float32", "bfloat16", "float16"):
        assert resolve_learner_dtype(dtype) == dtype
    assert LearnerConfig().dtype == "auto"  # bf16 where the machine runs it fast; tests that need exactness pin float32


def test_adamw_is_fused_on_cuda_and_never_a_jit_built_cpu_adam() -> None:
    params = [torch.nn.Parameter(torch.randn(4, 4))]
    assert make_optimizer(params, LearnerConfig(), cuda=True).defaults["fused"] is True
    assert not make_optimizer(params, LearnerConfig(), cuda=False).defaults["fused"]
    offload = LearnerConfig(zero_stage=3, offload_optimizer=True)
    optimizer = make_optimizer(params, offload, cuda=True)
    if not prebuilt_cpu_adam():  # this install has no compiled cpu_adam: torch's fused AdamW, CPU kernel
        assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"] is True
        params[0].grad = torch.ones(4, 4)
        before = params[0].detach().clone()
        optimizer.step()  # the fused kernel runs on CPU tensors (the offloaded fp32 partitions)
        assert not torch.equal(before, params[0].detach())


def test_flash_attention_only_on_a_gpu_in_half_precision() -> None:
    assert attention_kwargs(torch.device("cpu"), "bfloat16") == {}
    assert attention_kwargs(torch.device("cuda"), "float32") == {}
