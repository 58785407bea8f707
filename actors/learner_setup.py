"""How the learner's DeepSpeed engine is set up: its precision (`learner.dtype`, `auto` resolved per machine),
its ZeRO config, the optimizer (torch AdamW, never a JIT-built op), the attention kernel and the lr schedule.
Pure functions of the config and the machine, so each is tested without a process group
(tests/unit/test_learner_precision.py, test_lr_schedule.py)."""

from __future__ import annotations

import math
from typing import Any

from pipeline.config import LearnerConfig


def resolve_learner_dtype(dtype: str) -> str:
    """`learner.dtype` on this machine: 'auto' is bfloat16 where the GPU (CUDA with bf16) or, without one,
    the CPU (AVX512_BF16 or AMX) runs it fast, else float32 (actors/engine.py's rule, shared with vLLM)."""
    from actors.engine import host_dtype_support, resolve_dtype

    return resolve_dtype(dtype, *host_dtype_support()) if dtype == "auto" else dtype


def deepspeed_config(cfg: LearnerConfig, world_size: int, with_optimizer: bool = True,
                     dtype: str | None = None) -> dict[str, Any]:
    """The DeepSpeed config of the policy at `cfg.zero_stage` (or, without optimizer, of the frozen
    reference: ZeRO-3 partitions it like the policy; below 3 there is nothing to partition, so stage 0),
    in `dtype` (the resolved `cfg.dtype`).

    Mixed precision: bf16/fp16 weights, fp32 master weights in the optimizer and fp32 gradient accumulation
    over the micro-batches (`data_types.grad_accum_dtype`: ZeRO 1-3 accumulate the reduced gradients in
    fp32). DeepSpeed gives stage 0 no fp32 master weights for bf16 (it would step the bf16 weights), so a
    bf16 policy at stage 0 runs stage 1, which on one rank partitions nothing and keeps fp32 masters."""
    dtype = dtype or cfg.dtype
    stage = cfg.zero_stage if with_optimizer or cfg.zero_stage == 3 else 0
    half = dtype in ("bfloat16", "float16")
    if with_optimizer and half and stage == 0:
        stage = 1
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero.update(stage3_param_persistence_threshold=cfg.zero3_persistence_threshold,
                    stage3_prefetch_bucket_size=cfg.zero3_prefetch_bucket_size,
                    stage3_max_live_parameters=cfg.zero3_max_live_parameters,
                    stage3_gather_16bit_weights_on_model_save=False)  # we export through our own bucketed gather
    if stage in (2, 3):
        zero.update(reduce_bucket_size=cfg.reduce_bucket_size)
    if with_optimizer and cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    return {
        "train_micro_batch_size_per_gpu": 1,  # a "sample" is one packed micro-batch; GAS is set per step
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16", "initial_scale_power": 16},
        **({"data_types": {"grad_accum_dtype": "fp32"}} if half and with_optimizer else {}),
        "zero_allow_untested_optimizer": True,  # torch.optim.AdamW: no JIT-built optimizer op
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def skip_shm_allreduce_build() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (`deepspeed_shm_comm`) when the
    process group starts: two compiler processes for about 40 s on a machine without its build cache, and
    again whenever that cache is invalidated (seen between test runs here). Only `inference_all_reduce`
    uses it, which training never calls; marked unavailable, DeepSpeed goes on without it (its module keeps
    the probed dict, so the edit holds)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def lr_multiplier(step: int, warmup_steps: int, decay_steps: int = 0, min_ratio: float = 0.1) -> float:
    """The lr factor at optimizer step `step` (0-based): linear warm-up to 1 over `warmup_steps`, then a
    cosine from 1 to `min_ratio` over `decay_steps` (0: constant), then `min_ratio`."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if decay_steps == 0:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(params, cfg: LearnerConfig, cuda: bool | None = None):
    """torch AdamW, never a JIT-built op: on a GPU the fused kernel (one launch for all tensors); with
    `offload_optimizer` the states live on the CPU, where DeepSpeed's CPU Adam is used only if it was
    prebuilt into the install (building it at run time needs CUDA headers a runtime image lacks), else
    torch's fused AdamW, which has a CPU kernel; on a CPU-only learner torch's default (foreach)."""
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cfg.offload_optimizer and cuda and prebuilt_cpu_adam():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    fused = cuda or None  # None: torch picks (foreach) on a CPU-only learner
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def prebuilt_cpu_adam() -> bool:
    """Whether DeepSpeed's CPU Adam op was compiled into this install (DS_BUILD_CPU_ADAM=1 at pip time)."""
    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:
        return False
    return bool(installed_ops.get("cpu_adam"))


def attention_kwargs(device, dtype: str) -> dict[str, str]:
    """from_pretrained's attention choice: flash-attention 2 (variable-length, so micro-batches are packed
    into one row: pipeline.batching.row_tokens_for) on a GPU in half precision when the package is
    installed; else transformers' default (SDPA)."""
    import importlib.util

    if getattr(device, "type", str(device)) == "cuda" and dtype in ("bfloat16", "float16") \
            and importlib.util.find_spec("flash_attn") is not None:
        return {"attn_implementation": "flash_attention_2"}
    return {}
