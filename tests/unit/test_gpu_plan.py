"""The GPU path's decisions that need no GPU (issue 25): which weight-sync transport each topology gets,
the settings refused up front (one line each), the learner's placement group, the head node the pool and
the aggregator are pinned to, vLLM's engine arguments (pixel bounds, no CUDA graphs for the listener,
vLLM's weight-transfer engine), the rank layout of vLLM's NCCL group, the pinned host hop of a bucket, and
what `train --print-config` prints for the 7B config. The GPU ends themselves: tests/gpu/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from actors.engine import engine_kwargs, in_process_conflict
from actors.weight_buckets import bucket_meta, byte_view, from_byte_arrays, host_bytes
from actors.weight_sync import SYNC_FAILED, plan_transport
from actors.weight_sync_nccl import PACKED_CHUNK_BYTES, nccl_worker_init_info, transfer_update_info
from pipeline.config import ConfigError, EngineConfig, load_config
from pipeline.placement import (check_plan, describe_plan, engine_processor_kwargs, head_node_id,
                                learner_placement_group, planned_transport)

REPO = Path(__file__).resolve().parents[2]
GPU_7B = REPO / "configs" / "qwen25vl_7b.yaml"


# ---- transport per topology ----------------------------------------------------------------------------

@pytest.mark.parametrize("learner_gpu, rollout_gpu, same_node, expected", [
    (True, True, True, "nccl"),             # GPUs on both ends: vLLM's NCCL engine, even on one node
    (True, True, False, "nccl"),            # across pods: never 15 GB a step through the object store
    (True, True, None, "nccl"),             # known from the config alone
    (False, False, True, "shared_memory"),  # CPU, one node: as before
    (False, False, False, "object_store"),  # CPU, several nodes: as before
    (False, False, None, "auto"),           # CPU: decided at the first sync, by where the workers are
    (True, False, True, "shared_memory"),   # CPU engines: a GPU bucket is copied into /dev/shm
    (True, False, False, "object_store"),   # ... or hops through pinned host memory
    (False, True, False, "object_store"),
])
def test_auto_transport_for_each_topology(learner_gpu, rollout_gpu, same_node, expected) -> None:
    assert plan_transport("auto", learner_gpu, rollout_gpu, same_node) == expected


@pytest.mark.parametrize("name", ["shared_memory", "object_store", "collective", "nccl"])
def test_a_named_transport_is_kept(name) -> None:
    assert plan_transport(name, True, True, False) == plan_transport(name, False, False, True) == name


def test_the_7b_config_plans_nccl_and_the_cpu_configs_keep_auto() -> None:
    assert planned_transport(load_config(GPU_7B)) == "nccl"
    for path in (REPO / "configs").glob("*_cpu.yaml"):
        assert planned_transport(load_config(path)) == "auto", path.name
    assert planned_transport(load_config(None, ["learner.num_gpus=1", "rollout.num_gpus=1"])) == "nccl"


# ---- refusals ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_passes_the_plan_check(path) -> None:
    check_plan(load_config(path), environ={})


@pytest.mark.parametrize("overrides, environ, message", [
    (["rollout.engine.tensor_parallel_size=2"], {}, "rollout.engine.tensor_parallel_size=2 is not supported"),
    (["listener.engine.tensor_parallel_size=4"], {}, "listener.engine.tensor_parallel_size=4 is not supported"),
    (["rollout.num_gpus=2"], {}, "rollout.num_gpus=2: an engine uses one GPU"),
    (["listener.num_gpus=1.5"], {}, "listener.num_gpus=1.5: an engine uses one GPU"),
    (["sync.transport=nccl", "learner.num_gpus=0"], {}, "sync.transport=nccl needs a whole GPU"),
    (["sync.transport=nccl", "learner.num_gpus=1", "rollout.num_gpus=0.5"], {}, "rollout.num_gpus=0.5"),
    ([], {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}, "VLLM_ENABLE_V1_MULTIPROCESSING=1 is set"),
])
def test_settings_that_cannot_work_are_refused_in_one_line(overrides, environ, message) -> None:
    with pytest.raises(ConfigError) as info:
        check_plan(load_config(GPU_7B, overrides), environ=environ)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_nccl_with_a_whole_gpu_on_both_ends_is_accepted() -> None:
    check_plan(load_config(None, ["sync.transport=nccl", "learner.num_gpus=1", "rollout.num_gpus=1"]), environ={})


@pytest.mark.parametrize("value, refused", [(None, False), ("0", False), (" 0 ", False), ("1", True), ("true", True)])
def test_in_process_engine_core_conflict(value, refused) -> None:
    environ = {} if value is None else {"VLLM_ENABLE_V1_MULTIPROCESSING": value}
    assert bool(in_process_conflict(environ)) == refused


# ---- placement -------------------------------------------------------------------------------------------

def test_the_7b_learner_ranks_are_strict_packed_one_bundle_each() -> None:
    bundles, strategy = learner_placement_group(load_config(GPU_7B))
    assert strategy == "STRICT_PACK"
    assert bundles == [{"CPU": 8.0, "GPU": 1.0, "learner": 1.0}] * 4


def test_the_default_learner_group_packs_and_none_turns_it_off() -> None:
    bundles, strategy = learner_placement_group(load_config(None, ["learner.num_ranks=2", "learner.num_cpus=0"]))
    assert strategy == "PACK" and bundles == [{"learner": 1.0}, {"learner": 1.0}]  # zero CPUs/GPUs left out
    assert learner_placement_group(load_config(None, ["learner.placement=none"])) is None


def test_head_node_is_the_live_node_with_the_head_marker() -> None:
    nodes = [{"NodeID": "w1", "Alive": True, "Resources": {"CPU": 8.0, "listener": 1.0}},
             {"NodeID": "old-head", "Alive": False, "Resources": {"node:__internal_head__": 1.0}},
             {"NodeID": "head", "Alive": True, "Resources": {"CPU": 0.0, "node:__internal_head__": 1.0}}]
    assert head_node_id(nodes) == "head"
    assert head_node_id(nodes[:2]) is None


# ---- engine arguments ----------------------------------------------------------------------------------------

def test_pixel_bounds_reach_both_engines() -> None:
    cfg = load_config(GPU_7B)
    assert engine_processor_kwargs(cfg) == {"min_pixels": 200704, "max_pixels": 401408}
    kwargs = engine_kwargs(cfg.rollout.engine, 0, 2, engine_processor_kwargs(cfg))
    assert kwargs["mm_processor_kwargs"] == {"min_pixels": 200704, "max_pixels": 401408}
    assert kwargs["limit_mm_per_prompt"] == {"image": 2, "video": 0}
    # the largest image is max_pixels / (28 * 28) = 512 tokens: two fit max_model_len 4096 with room to spare
    assert 2 * cfg.model.max_pixels // (28 * 28) + cfg.rollout.max_new_tokens < cfg.rollout.engine.max_model_len


def test_listener_engine_captures_no_cuda_graphs_and_vllm_accepts_the_arguments() -> None:
    from vllm.config import CompilationConfig, WeightTransferConfig  # what vLLM's EngineArgs builds from them

    compiled = EngineConfig(enforce_eager=False)
    listener = engine_kwargs(compiled, 0, 2, None, cuda_graphs=False)
    assert listener["compilation_config"] == {"cudagraph_mode": "NONE"}
    assert "compilation_config" not in engine_kwargs(EngineConfig(enforce_eager=True), 0, 2, None, cuda_graphs=False)
    assert "compilation_config" not in engine_kwargs(compiled, 0, 2, None)  # the rollout engine keeps them
    rollout = engine_kwargs(compiled, 0, 2, None, weight_transfer="nccl")
    assert rollout["weight_transfer_config"] == {"backend": "nccl"}
    assert "weight_transfer_config" not in engine_kwargs(compiled, 0, 2, None)  # CPU transports: none
    assert WeightTransferConfig(**rollout["weight_transfer_config"]).backend == "nccl"
    assert CompilationConfig(**listener["compilation_config"]).cudagraph_mode.name == "NONE"


def test_block_size_is_vllms_on_a_gpu_and_the_cpu_attentions_smallest_on_a_cpu() -> None:
    from vllm.config import CacheConfig

    from actors.engine import CPU_BLOCK_SIZE, resolve_block_size

    assert resolve_block_size(None, on_cpu=False) is None  # vLLM's GPU default (16)
    assert resolve_block_size(None, on_cpu=True) == CPU_BLOCK_SIZE == 32
    assert resolve_block_size(64, on_cpu=True) == 64 and resolve_block_size(128, on_cpu=False) == 128
    assert "block_size" not in engine_kwargs(EngineConfig(), 0, 2, None)
    kwargs = engine_kwargs(load_config(GPU_7B).listener.engine, 0, 2, None, block_size=CPU_BLOCK_SIZE)
    assert CacheConfig(block_size=kwargs["block_size"]).block_size == 32  # vLLM takes it
    assert load_config(GPU_7B).rollout.engine.block_size is None  # the 7B config leaves vLLM's default


# ---- vLLM's NCCL group ----------------------------------------------------------------------------------------

def test_nccl_ranks_of_every_engine_worker_are_distinct_after_the_learner() -> None:
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferInitInfo

    for engines, tp in [(2, 1), (3, 2)]:
        infos = [nccl_worker_init_info("10.0.0.1", 29500, index, engines, tp) for index in range(engines)]
        ranks = [info["rank_offset"] + t for info in infos for t in range(tp)]  # vLLM adds the worker's TP rank
        assert ranks == list(range(1, 1 + engines * tp))  # rank 0 is learner rank 0
        assert {info["world_size"] for info in infos} == {1 + engines * tp}
        parsed = NCCLWeightTransferInitInfo(**infos[-1])  # the dict vLLM's worker parses
        assert parsed.packed and parsed.packed_buffer_size_bytes == PACKED_CHUNK_BYTES


def test_update_info_is_what_vllm_reads_back_into_the_bucket_dtypes() -> None:
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferUpdateInfo

    named = [("model.layers.0.mlp.up_proj.weight", torch.zeros(3, 4, dtype=torch.bfloat16)),
             ("model.norm.weight", torch.zeros(4))]
    info = NCCLWeightTransferUpdateInfo(**transfer_update_info(bucket_meta(named)))
    assert info.names == [name for name, _ in named] and info.shapes == [[3, 4], [4]]
    assert [getattr(torch, name) for name in info.dtype_names] == [torch.bfloat16, torch.float32]


# ---- the host hop of a bucket ------------------------------------------------------------------------------------

def test_host_bytes_copies_a_bucket_and_the_object_store_path_reads_it_back() -> None:
    named = [("a", torch.randn(5, 3)), ("b", torch.randn(7).to(torch.bfloat16))]
    hopped = [host_bytes(t.contiguous().view(-1).view(torch.uint8), pin=False) for _, t in named]
    assert all(h.data_ptr() != t.data_ptr() for h, (_, t) in zip(hopped, named))  # a copy, not a view
    back = from_byte_arrays(bucket_meta(named), [h.numpy() for h in hopped])
    assert all(torch.equal(got, want) for (_, got), (_, want) in zip(back, named))
    default = host_bytes(hopped[0])  # pins only where CUDA is there to pin with
    assert torch.equal(default, hopped[0]) and default.is_pinned() == torch.cuda.is_available()


def test_byte_view_of_a_host_tensor_still_shares_its_memory() -> None:
    tensor = torch.arange(6, dtype=torch.float32)
    view = byte_view(tensor)
    assert np.shares_memory(view, tensor.numpy())  # no host hop for what is on the host already


# ---- a failed sync and the print-out ---------------------------------------------------------------------------

def test_a_sync_failed_on_live_workers_stops_the_run_with_its_own_error() -> None:
    from pipeline.driver import stop_if_sync_failed
    from pipeline.errors import TrainingAborted
    from pipeline.types import WeightVersion

    failed = WeightVersion(version=3, num_bytes=0, num_buckets=1, seconds=1.0, transport="object_store",
                           error=f"{SYNC_FAILED} (TypeError: can't convert cuda:0 device type tensor to numpy)")
    with pytest.raises(TrainingAborted, match="TypeError: can't convert cuda") as info:
        stop_if_sync_failed(failed)
    assert "died" not in str(info.value) and "object_store" in str(info.value)
    died = WeightVersion(version=3, num_bytes=0, num_buckets=1, seconds=1.0, transport="collective",
                         error="ActorDiedError: The actor died unexpectedly")
    stop_if_sync_failed(died)  # a death: left to the restart logic


def test_print_config_of_the_7b_config_shows_transport_and_placement() -> None:
    result = subprocess.run([sys.executable, "-m", "pipeline", "train", "--config", str(GPU_7B), "--print-config"],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    plan = [line for line in result.stdout.splitlines() if line.startswith("# plan: ")]
    assert plan == [f"# plan: {line}" for line in describe_plan(load_config(GPU_7B))]
    text = "\n".join(plan)
    assert "sync.transport: nccl" in text
    assert "placement group STRICT_PACK of 4 x {'CPU': 8.0, 'GPU': 1.0, 'learner': 1.0}" in text
    assert "pinned to the head node" in text and "no CUDA graphs" in text and "GPUs: 8 in all" in text
    refused = subprocess.run([sys.executable, "-m", "pipeline", "train", "--config", str(GPU_7B), "--print-config",
                              "rollout.engine.tensor_parallel_size=2"], capture_output=True, text=True, cwd=REPO,
                             timeout=300)
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0
    assert "tensor_parallel_size=2 is not supported" in refused.stderr and "Traceback" not in refused.stderr


def test_the_cpu_workers_per_request_thread_count_warning_is_dropped_and_others_kept() -> None:
    import logging

    from actors.engine import _drop_thread_count_warning

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("vllm.v1.worker.cpu_worker", logging.WARNING, __file__, 1, message, None, None)

    assert not _drop_thread_count_warning(record(
        "CPU backend doesn't allow to use `torch.set_num_threads` after the thread binding, skip it."))
    assert _drop_thread_count_warning(record("sleep mode is not supported on CPU, ignore it."))
