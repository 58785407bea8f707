"""Weight-sync benchmark: seconds and GB/s per transport, against an in-process copy of the same bytes.

    .venv/bin/python -m bench.weight_sync [--sizes tiny,random150m] [--repeats 3] [--bucket-mb 64]

For each model size a real learner group (DeepSpeed ZeRO-3, gloo, `--ranks` ranks) and one real vLLM
rollout worker are started; each transport syncs once to warm up (the collective transport forms its
process group then), then `--repeats` timed syncs; the median is reported. The baseline is one
`torch.Tensor.copy_` of the same number of bytes in this process (best of 20): `ratio_to_copy` =
sync seconds / copy seconds, i.e. how many memcpy's worth of time one sync costs (gather, serialisation,
transport, the engine's reload). Sizes: `tiny` (the test checkpoint, ~0.7M parameters) and `random150m`
(a random Qwen2.5-VL of ~140M parameters: hidden 1024, 12 layers). Writes bench/results/weight_sync.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "weight_sync.json"


def build_model(size: str, root: Path) -> Path:
    """The checkpoint of `size` under `root` (built once)."""
    from pipeline.tiny import SPECS, TinySpec, make_tiny

    out = root / size
    if (out / "config.json").exists():
        return out
    if size == "tiny":
        return make_tiny(out, role="reasoner")
    if size == "random150m":
        SPECS["random150m"] = TinySpec(hidden=1024, layers=12, heads=16, kv_heads=2, intermediate=2816,
                                       vision_depth=2, vision_width=128, vision_heads=4)
        return make_tiny(out, role="reasoner", size="random150m")  # type: ignore[arg-type]
    raise ValueError(f"unknown size {size!r}")


def copy_seconds(num_bytes: int, repeats: int = 20) -> float:
    """Best time of one in-process copy of `num_bytes` bytes (the minimum: on a shared machine the median
    of a sub-millisecond copy swings by 10x with the neighbours' load)."""
    import torch

    src = torch.randint(0, 255, (num_bytes,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def bench_size(ray, size: str, model_dir: Path, transports: list[str], repeats: int, bucket_mb: float,
               ranks: int) -> dict[str, dict[str, float]]:
    from actors.learner import LearnerGroup
    from actors.rollout import RolloutWorker
    from pipeline.config import AlgoConfig, EngineConfig, LearnerConfig, SyncConfig

    worker = ray.remote(RolloutWorker).options(num_cpus=1, resources={"rollout": 1}).remote(
        str(model_dir), EngineConfig(dtype="float32"), seed=0)
    group = LearnerGroup(str(model_dir), LearnerConfig(num_ranks=ranks, num_cpus=1), AlgoConfig())
    ray.get(worker.ready.remote())
    results: dict[str, dict[str, float]] = {}
    version = 0
    try:
        for transport in transports:
            sync = SyncConfig(transport=transport, bucket_mb=bucket_mb)
            version += 1
            group.sync_weights([worker], version, sync)  # warm-up (and group formation)
            reports = []
            for _ in range(repeats):
                version += 1
                reports.append(group.sync_weights([worker], version, sync))
            seconds = statistics.median(r.seconds for r in reports)
            num_bytes = reports[0].num_bytes
            baseline = copy_seconds(num_bytes)
            results[transport] = {
                "seconds": seconds, "gb_per_s": num_bytes / seconds / 1e9, "ratio_to_copy": seconds / baseline,
                "bytes": num_bytes, "buckets": reports[0].num_buckets, "copy_seconds": baseline,
                "copy_gb_per_s": num_bytes / baseline / 1e9, "peak_gathered_bytes": reports[0].peak_gathered_bytes,
            }
            print(f"{size:>11} {transport:>12}  {num_bytes / 1e6:9.1f} MB  {reports[0].num_buckets:3d} buckets  "
                  f"{seconds:8.4f} s  {num_bytes / seconds / 1e9:7.3f} GB/s  copy {baseline:8.5f} s  "
                  f"ratio {seconds / baseline:8.1f}", flush=True)
    finally:
        group.shutdown()
        ray.kill(worker)
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,random150m")
    parser.add_argument("--transports", default="object_store,collective")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bucket-mb", type=float, default=64.0)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--models", default="runs/bench-models", help="where the checkpoints are built")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    for key, value in dict(DS_ACCELERATOR="cpu", VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
                           HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0").items():
        os.environ.setdefault(key, value)
    import ray

    ray.init(num_cpus=8, resources={"rollout": 4, "learner": 8}, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "bucket_mb": args.bucket_mb,
              "learner_ranks": args.ranks, "repeats": args.repeats, "results": {}}
    try:
        for size in args.sizes.split(","):
            model_dir = build_model(size, Path(args.models))
            report["results"][size] = bench_size(ray, size, model_dir, args.transports.split(","), args.repeats,
                                                 args.bucket_mb, args.ranks)
    finally:
        ray.shutdown()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
