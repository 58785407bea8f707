"""Weight-sync benchmark at the pipeline's configuration: each transport beside the engine's reload floor
and one in-process copy of the same bytes.

    .venv/bin/python -m bench.weight_sync [--ranks 1,2] [--dtypes float32,bfloat16] [--repeats 3]

The `mid` checkpoint (`python -m pipeline make-tiny --size mid`, 92.6 MB trainable in fp32), the bucket size
of the default config (configs/tiny_cpu.yaml `sync.bucket_mb`, or `--bucket-mb`), a real DeepSpeed ZeRO-3
learner group (gloo, 1 and 2 ranks) and one real vLLM rollout worker per engine dtype, driven through
`LearnerGroup.sync_weights` exactly as the driver does. For each (ranks, engine dtype, transport): one
warm-up sync (imports, the collective group), then `--repeats` timed syncs; medians are reported, with the
phases (`gather_s`, `transfer_s`, `load_s`) and the peak RSS each sync added on learner rank 0 and on the
worker (Linux VmHWM, reset just before the sync). Beside them:
- `reload_floor_s`: the engine reloading a state dict already resident in its own process (the same
  buckets through the same `load_weights` + `finish_weight_update`): what no transport can beat;
- `copy_s`: one `torch.Tensor.copy_` of the same bytes in this process (best of 20), so `ratio_to_copy` =
  sync seconds / copy seconds (the target: <= 2).
Writes bench/results/weight_sync.json (`results[label][transport]`, the keys bench.report reads).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import time
from pathlib import Path

from bench import write_result

RESULTS = Path(__file__).resolve().parent / "results" / "weight_sync.json"
TRANSPORTS = ("shared_memory", "object_store", "collective")


def copy_seconds(num_bytes: int, repeats: int = 20) -> float:
    """Best time of one in-process copy of `num_bytes` bytes into memory already touched (the minimum: on
    a shared machine the median swings with the neighbours' load)."""
    import torch

    src = torch.randint(0, 255, (num_bytes,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def _rss_kb(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _reset_peak(_actor) -> int:
    """In an actor's process: peak RSS := current RSS (Linux clear_refs 5); returns the RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _rss_kb("VmRSS") * 1024


def _peak(_actor) -> int:
    return _rss_kb("VmHWM") * 1024


def _reload_floor(model_dir: str, bucket_bytes: int, version: int, repeats: int) -> float:
    """In the worker's process: the checkpoint's trainable tensors made resident once, then loaded through
    the engine `repeats` times in buckets of `bucket_bytes`; median seconds of one full reload."""
    def run(actor) -> float:
        from safetensors.torch import load_file

        state = [(k, v.clone()) for k, v in load_file(f"{model_dir}/model.safetensors").items()
                 if ".visual." not in f".{k}"]  # the trainable tensors: the learner freezes the vision tower
        buckets, size = [[]], 0
        for name, tensor in state:
            if buckets[-1] and size + tensor.nbytes > bucket_bytes:
                buckets.append([])
                size = 0
            buckets[-1].append((name, tensor))
            size += tensor.nbytes
        times = []
        for repeat in range(repeats + 1):  # the first is a warm-up
            start = time.perf_counter()
            for bucket in buckets:
                actor.load_weights(bucket)
            actor.finish_weight_update(version + repeat)
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    return run


def bench_transport(ray, group, worker, transport: str, bucket_mb: float, repeats: int, version: int) -> dict:
    from pipeline.config import SyncConfig

    sync = SyncConfig(transport=transport, bucket_mb=bucket_mb)
    group.sync_weights([worker], version, sync)  # warm-up
    reports, extra_learner, extra_worker = [], [], []
    for repeat in range(repeats):
        actors = [group.ranks[0], worker]
        before = ray.get([a.__ray_call__.remote(_reset_peak) for a in actors])
        reports.append(group.sync_weights([worker], version + 1 + repeat, sync))
        peaks = ray.get([a.__ray_call__.remote(_peak) for a in actors])
        extra_learner.append(peaks[0] - before[0])
        extra_worker.append(peaks[1] - before[1])
    if any(r.error for r in reports):
        raise RuntimeError(f"{transport}: {reports[0].error}")
    med = {key: statistics.median(getattr(r, key) for r in reports)
           for key in ("seconds", "gather_s", "transfer_s", "load_s")}
    return {**med, "bytes": reports[0].num_bytes, "buckets": reports[0].num_buckets,
            "gb_per_s": reports[0].num_bytes / med["seconds"] / 1e9,
            "peak_extra_learner_mib": max(extra_learner) / 2**20, "peak_extra_worker_mib": max(extra_worker) / 2**20,
            "peak_gathered_bytes": reports[0].peak_gathered_bytes}


def bench_ranks(ray, model_dir: str, ranks: int, workers: dict, bucket_mb: float, repeats: int,
                transports: list[str]) -> dict[str, dict]:
    from actors.learner import LearnerGroup
    from pipeline.config import AlgoConfig, LearnerConfig

    group = LearnerGroup(model_dir, LearnerConfig(num_ranks=ranks, num_cpus=1, dtype="float32"),  # fp32 weights sent,
                         AlgoConfig())  # as in the figures recorded before `auto` became the default
    out: dict[str, dict] = {}
    try:
        for dtype, worker in workers.items():
            label = f"mid, {ranks} learner rank{'s' if ranks > 1 else ''}, engine {dtype}"
            version = ray.get(worker.policy_version.remote()) + 1
            floor = ray.get(worker.__ray_call__.remote(
                _reload_floor(model_dir, int(bucket_mb * 2**20), version, repeats)))
            version += repeats + 1
            out[label] = {}
            for transport in transports:
                result = bench_transport(ray, group, worker, transport, bucket_mb, repeats, version)
                version += repeats + 1
                copy = copy_seconds(result["bytes"])
                result.update(reload_floor_s=floor, copy_seconds=copy, copy_gb_per_s=result["bytes"] / copy / 1e9,
                              ratio_to_copy=result["seconds"] / copy, ratio_to_floor=result["seconds"] / floor)
                out[label][transport] = result
                print(f"{label:>38} {transport:>13}  {result['bytes'] / 1e6:6.1f} MB  {result['seconds']:7.3f} s "
                      f"(gather {result['gather_s']:.3f} transfer {result['transfer_s']:.3f} load "
                      f"{result['load_s']:.3f})  floor {floor:.3f} s  copy {copy:.4f} s  x{result['ratio_to_copy']:.1f}"
                      f"  +{result['peak_extra_learner_mib']:.0f}/+{result['peak_extra_worker_mib']:.0f} MiB",
                      flush=True)
    finally:
        group.shutdown()
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--transports", default=",".join(TRANSPORTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bucket-mb", type=float, default=None, help="default: the default config's sync.bucket_mb")
    parser.add_argument("--models", default="runs/bench-models", help="where the mid checkpoint is built")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    for key, value in dict(DS_ACCELERATOR="cpu", VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1",
                           RAY_USAGE_STATS_ENABLED="0").items():
        os.environ.setdefault(key, value)
    import ray

    from actors.rollout import RolloutWorker
    from pipeline.config import EngineConfig, load_config
    from pipeline.tiny import make_tiny

    bucket_mb = args.bucket_mb or load_config(None).sync.bucket_mb
    model_dir = Path(args.models) / "mid"
    if not (model_dir / "config.json").exists():
        make_tiny(model_dir, role="reasoner", size="mid")
    ray.init(num_cpus=8, resources={"rollout": 4, "learner": 8}, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "model": "mid",
              "bucket_mb": bucket_mb, "repeats": args.repeats, "results": {}}
    try:
        remote = ray.remote(RolloutWorker).options(num_cpus=1, resources={"rollout": 1})
        workers = {dtype: remote.remote(str(model_dir), EngineConfig(dtype=dtype, kv_cache_gib=1), seed=0)
                   for dtype in args.dtypes.split(",")}
        ray.get([w.ready.remote() for w in workers.values()])
        for ranks in (int(r) for r in args.ranks.split(",")):
            report["results"].update(bench_ranks(ray, str(model_dir), ranks, workers, bucket_mb, args.repeats,
                                                 args.transports.split(",")))
    finally:
        ray.shutdown()
    write_result(report, args.out)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
