"""One way to build a vLLM engine, shared by the rollout workers and the listeners, and the in-place
weight-update extension the rollout engine loads.

    llm = build_engine("runs/tiny/reasoner", EngineConfig(dtype="float32"), seed=0, num_threads=1)

What `build_engine` settles, measured on the 2-core CPU machines (Nov 2026):
- Threads: inside a Ray actor `OMP_NUM_THREADS=1`, and vLLM itself drops torch to one thread for serving
  unless `OMP_NUM_THREADS` is set externally. The builder sets both to `num_threads` (the actor's CPUs).
- In-process engine core (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): 3.5 s start-up instead of 24 s. The rollout
  engine REQUIRES it (`in_process=True`): the Ray-actor-side transports (shared memory, object store,
  collective) hand buckets to the model as tensors of the actor's own process; a user's `=1` is refused
  with one line (`in_process_conflict`), never overridden silently.
- GPU: `limit_mm_per_prompt` (two images, no video) and `mm_processor_kwargs` (`model.min_pixels` /
  `max_pixels`, from pipeline/placement.py) bound what vLLM profiles the vision encoder for (at the
  checkpoint's 12.8 MP default one image alone is 16,384 tokens); an engine that only prefills (the
  listener: one token per request) gets `cuda_graphs=False`, no CUDA graph capture on start or scale-up.
- No first-request stall: vLLM `torch.compile`s one sampler helper (`batched_count_greater_than`, used for
  logprob ranks) even in eager mode; on CPU that is a 3 s Dynamo trace per process plus a gcc build of the
  kernel when the inductor cache is cold (the 26 s first `generate` seen on a busy machine). An eager CPU
  engine runs that helper eagerly instead (Dynamo off in the engine's process, which is an actor of its
  own), and a one-token warm-up request moves the remaining first-call costs into start-up.

Weight updates (`WeightUpdateExtension`): one layer-wise reload session spans several buckets. vLLM's
layer-wise reload keeps each layer's processed (repacked) tensors, buffers the weights a layer receives,
and processes the layer once all of its elements have arrived, so a bucket may end in the middle of a fused
layer (q/k/v -> qkv_proj, gate/up -> gate_up_proj): the rest completes it in a later bucket (the weight
sync's planner avoids that, see `actors.weight_sync.layer_key`, but any caller may do it). Closing the
session restores untouched layers; a half-loaded layer keeps its old weights and the update raises
(loading it would fill the missing elements with garbage).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from pipeline.config import EngineConfig

if TYPE_CHECKING:
    import torch
    from vllm import LLM

WEIGHT_UPDATE_EXTENSION = "actors.engine.WeightUpdateExtension"
_LAYERWISE_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


def intra_op_threads(num_cpus: float) -> int:
    """An actor's torch/OpenMP threads: its CPU share (whole CPUs), at least one. The share an actor gets
    on a local cluster is planned from the machine's cores (`pipeline.placement.thread_plan`)."""
    return max(1, int(num_cpus + 1e-9))


def configure_threads(num_threads: int) -> None:
    """Intra-op threads for this process, set before vLLM starts (which honours an external OMP_NUM_THREADS)."""
    import torch

    num_threads = max(1, int(num_threads))
    os.environ["OMP_NUM_THREADS"] = str(num_threads)
    torch.set_num_threads(num_threads)


# CPU flags (/proc/cpuinfo) of the bf16 matmul units: without them bf16 runs at about a quarter of fp32's
# speed (converted in software), with them at about twice (measured on 2-core machines, Nov 2026).
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def resolve_dtype(dtype: str, cpu_flags: frozenset[str] | set[str], gpu_bf16: bool | None = None) -> str:
    """The engine dtype `dtype` stands for: 'auto' is bfloat16 where the hardware runs it fast (a GPU with
    bf16 support, `gpu_bf16=True`; or, without a GPU, `gpu_bf16=None`, a CPU with one of `BF16_CPU_FLAGS`)
    and float32 otherwise; any other value is itself."""
    if dtype != "auto":
        return dtype
    fast = gpu_bf16 if gpu_bf16 is not None else bool(BF16_CPU_FLAGS & set(cpu_flags))
    return "bfloat16" if fast else "float32"


CPU_BLOCK_SIZE = 32  # the smallest block vLLM's CPU attention takes (a multiple of 32)


def resolve_block_size(configured: int | None, on_cpu: bool) -> int | None:
    """The KV-cache block size an engine gets: the configured one, else CPU_BLOCK_SIZE on a CPU (vLLM's CPU
    default, 128 tokens, is longer than a pair's prompt, so its G samples shared no prefix block: a mid
    listener scoring 16 groups of 8 took 8.9 s with 128-token blocks, 6.9 s with 32), else vLLM's own."""
    if configured is not None:
        return configured
    return CPU_BLOCK_SIZE if on_cpu else None


def host_dtype_support() -> tuple[frozenset[str], bool | None]:
    """This machine's CPU flags and whether its GPU runs bf16 (None: no GPU)."""
    import torch

    try:
        text = open("/proc/cpuinfo").read()
    except OSError:  # not Linux: no flags known, fp32
        text = ""
    flags = frozenset(flag for line in text.splitlines() if line.startswith("flags")
                      for flag in line.split(":", 1)[1].split())
    gpu = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else None
    return flags, gpu


def engine_kwargs(engine: EngineConfig, seed: int, max_images: int, mm_processor_kwargs: dict | None,
                  trust_remote_code: bool = False, dtype: str | None = None, cuda_graphs: bool = True,
                  weight_transfer: str = "", block_size: int | None = None) -> dict:
    """The `vllm.LLM` arguments for one engine (pure; the CPU/GPU split is vLLM's, by platform). `dtype`:
    the resolved `engine.dtype` (`resolve_dtype`); None passes the config's value through. `block_size`: the
    resolved one (`resolve_block_size`); None leaves vLLM's default. `cuda_graphs`
    False: compiled but no graph capture (a prefill-only engine). `weight_transfer`: the backend of vLLM's
    weight-transfer engine ('nccl': actors/weight_sync_nccl.py), '' for none."""
    kwargs: dict[str, Any] = dict(
        enforce_eager=engine.enforce_eager, dtype=dtype or engine.dtype, max_model_len=engine.max_model_len,
        seed=seed, limit_mm_per_prompt={"image": max_images, "video": 0}, trust_remote_code=trust_remote_code,
        gpu_memory_utilization=engine.gpu_memory_utilization, tensor_parallel_size=engine.tensor_parallel_size,
    )
    if mm_processor_kwargs:
        kwargs["mm_processor_kwargs"] = dict(mm_processor_kwargs)
    if block_size is not None:
        kwargs["block_size"] = block_size
    if not cuda_graphs and not engine.enforce_eager:
        kwargs["compilation_config"] = {"cudagraph_mode": "NONE"}
    if weight_transfer:
        kwargs["weight_transfer_config"] = {"backend": weight_transfer}
    return kwargs


IN_PROCESS_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"


def in_process_conflict(environ: dict[str, str] | Any) -> str:
    """One line if `environ` asks for a multiprocess engine core, which the rollout engine's weight sync
    cannot work with; '' if unset or '0'."""
    value = environ.get(IN_PROCESS_ENV)
    if value is None or value.strip() == "0":
        return ""
    return (f"{IN_PROCESS_ENV}={value} is set, but the rollout engine's weight sync loads buckets into the "
            f"engine core in its own process: unset it (the run sets it to 0 itself)")


def build_engine(model_path: str, engine: EngineConfig, seed: int, num_threads: int = 1, max_images: int = 2,
                 mm_processor_kwargs: dict | None = None, trust_remote_code: bool = False,
                 in_process: bool = False, cuda_graphs: bool = True, weight_transfer: str = "",
                 **extra: Any) -> "LLM":
    """A warmed-up `vllm.LLM` for `model_path`; `extra` goes to `LLM` (e.g. `worker_extension_cls`).
    `in_process`: the engine core must run in this process (forced; a conflicting setting raises).

    Sampling is made reproducible by the engine `seed` and the order of requests: vLLM CPU 0.32 crashes on
    a per-request `SamplingParams(seed=...)`.
    """
    if in_process:
        if conflict := in_process_conflict(os.environ):
            raise RuntimeError(conflict)
        os.environ[IN_PROCESS_ENV] = "0"
    else:
        os.environ.setdefault(IN_PROCESS_ENV, "0")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(engine.kv_cache_gib)  # the config, not a stray env var, decides
    configure_threads(num_threads)
    from vllm import LLM
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        logging.getLogger(_CPU_WORKER_LOGGER).addFilter(_drop_thread_count_warning)
    if current_platform.is_cpu() and engine.enforce_eager:
        import torch._dynamo

        torch._dynamo.config.disable = True  # see the module docstring: no compile in an eager CPU engine
    dtype = resolve_dtype(engine.dtype, *host_dtype_support())
    kwargs = engine_kwargs(engine, seed, max_images, mm_processor_kwargs, trust_remote_code, dtype=dtype,
                           cuda_graphs=cuda_graphs, weight_transfer=weight_transfer,
                           block_size=resolve_block_size(engine.block_size, current_platform.is_cpu()))
    llm = LLM(model=str(model_path), **kwargs, **extra)
    warm_up(llm)
    return llm


_CPU_WORKER_LOGGER = "vllm.v1.worker.cpu_worker"


def _drop_thread_count_warning(record: logging.LogRecord) -> bool:
    # vLLM's CPU worker warns each time torch.set_num_threads is called after its thread binding, and its
    # multimodal processor calls it twice per request: 64 log lines a tiny listener step, none of them news.
    return "set_num_threads" not in record.getMessage()


def warm_up(llm: "LLM") -> None:
    """One greedy one-token request with a logprob, so the first real request pays no first-call costs."""
    from vllm import SamplingParams

    llm.generate(["warm-up"], SamplingParams(max_tokens=1, temperature=0.0, logprobs=0), use_tqdm=False)


def as_tensor(value: Any) -> "torch.Tensor":
    """A CPU tensor from a tensor or numpy array (buckets may arrive either way through Ray)."""
    import torch

    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)


@contextmanager
def _quiet_layerwise():
    # Closing a session logs "Failed to load weights" for every layer the update did not touch (e.g. the
    # frozen vision tower); those layers are restored as they were, which is what we want.
    logger = logging.getLogger(_LAYERWISE_LOGGER)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class WeightUpdateExtension:
    """Mixed into vLLM's worker (`worker_extension_cls`); reached with `llm.collective_rpc(name, args=...)`."""

    # Prefixed names: vLLM's worker has its own start/update/finish_weight_update (its weight-transfer API).

    def lgrpo_begin_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.get_model())

    def lgrpo_load_bucket(self, named_tensors: Iterable[tuple[str, Any]]) -> int:
        """Load one bucket (checkpoint names, any dtype) into the open session; returns bytes received."""
        from vllm.config import set_current_vllm_config

        model = self.model_runner.get_model()
        tensors = [(name, as_tensor(t)) for name, t in named_tensors]
        with set_current_vllm_config(self.vllm_config):
            model.load_weights(iter(tensors))
        return int(sum(t.numel() * t.element_size() for _, t in tensors))

    def lgrpo_finish_update(self) -> None:
        """Close the session; a half-loaded layer keeps its old weights and the update is refused."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        model = self.model_runner.get_model()
        incomplete = _drop_incomplete_layers(model)
        with set_current_vllm_config(self.vllm_config), _quiet_layerwise():
            finalize_layerwise_reload(model, self.model_runner.model_config)
        self.lgrpo_reset_caches()
        if incomplete:
            raise ValueError(f"weight update left layers half-loaded (a fused q/k/v or gate/up split "
                             f"across updates?); they keep their old weights: {incomplete[:5]}")


    def lgrpo_reset_caches(self) -> None:
        """Drop the worker's caches computed with the old weights (after vLLM's own finish_weight_update too)."""
        self.model_runner.reset_encoder_cache()
        self.model_runner.reset_mm_cache()


def _drop_incomplete_layers(model: Any) -> list[str]:
    """Layers that received some but not all of their elements in the open session; their partial weights
    are dropped (finalising then restores their old tensors instead of filling the gaps with garbage)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

    incomplete = []
    for name, layer in model.named_modules():
        info = get_layerwise_info(layer)
        if not info.can_load() or isinstance(layer, VocabParallelEmbedding):
            continue  # not in a session; or an embedding whose vocab padding is never loaded
        if 0 < info.load_numel < (info.load_numel_total or 0):
            incomplete.append(name)
            info.load_numel = 0
    return incomplete
