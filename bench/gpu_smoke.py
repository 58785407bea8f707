"""GPU smoke test: what only runs on a GPU, run once on one GPU before a cluster does (about 8 minutes).

    python -m bench.gpu_smoke                      # on a GPU box: every check, bench/results/gpu_smoke.json
    python -m bench.gpu_smoke --dry-run            # lists the checks and exits (any machine)
    python -m bench.gpu_smoke --device cpu --tiny  # every check at tiny widths on the CPU (gloo): the wiring

Needs torch, transformers and DeepSpeed only (what a bare GPU box has); vLLM and Ray are optional: their
checks are skipped with a line saying so. The JSON is rewritten after every section (status ok / error /
skipped, seconds, figures, the error's last lines), so a crash or a timeout never loses earlier sections.

Checks, in order (`SECTIONS`):
- versions: python, torch, CUDA, cuDNN, NCCL, transformers, DeepSpeed, vLLM, Ray, flash-attn; the GPU.
- bucket_pack: actors/weight_sync.py's bucket of bf16 tensors packed on the GPU, unpacked to equal views,
  and hopped to pinned host memory (`host_bytes`), with GB/s of each.
- nccl_group: a one-rank group of the weight sync (`new_group`, its own TCPStore, the long NCCL timeout)
  and a 256 MiB broadcast through it.
- vllm_weight_transfer, ray_gpu: imports vLLM's weight-transfer engine; a Ray actor with num_gpus=1 sees
  the GPU (skipped without vLLM / Ray).
- checkpoint: a Qwen2.5-VL with the 7B's real widths (hidden 3584, intermediate 18944, 28 heads, 4 KV
  heads, vocab 152064; vision tower 1280 wide, 16 heads, MLP 3420) but `--layers` decoder layers and
  `--vision-layers` vision blocks, random weights built locally on the GPU, saved in bf16 with a processor.
- reference_step: plain PyTorch, fp32 master weights, bf16 autocast, gradient checkpointing, fused AdamW,
  the learner's own inputs (packing, vision once per pair, chunked logprobs) and GRPO loss: tokens/s and
  peak memory; first, each sequence's logprobs from a plain forward (full logits), the batch's rollout
  logprobs.
- zero3_step: the learner itself (`actors.learner.LearnerRank`, one rank) with configs/qwen25vl_7b.yaml's
  learner settings (ZeRO-3, bf16, gradient checkpointing, its micro-batch budget): tokens/s, peak memory,
  and the first step's mean |logp - plain forward| (`logp_gap`).
- zero3_ds_defaults: the same with DeepSpeed's default ZeRO-3 buckets and thresholds.
- ratio: zero3_step tokens/s over reference_step's (goal >= 0.8), and the defaults' ratio.

Work: `--pairs` pairs x G = 8 completions of 256..512 tokens, two 448 x 448 images per pair (256 image
tokens each, the 7B config's min_pixels), about 2 micro-batches of 16384 tokens.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "gpu_smoke.json"
CONFIG = ROOT / "configs" / "qwen25vl_7b.yaml"
GOAL_RATIO = 0.8
# The 7B's widths (Qwen2.5-VL-7B-Instruct config.json); vision intermediate 3420.
SHAPE_7B = dict(hidden=3584, intermediate=18944, heads=28, kv_heads=4, vocab=152064,
                vision_width=1280, vision_heads=16, vision_intermediate=3420)


def _section_versions(ctx: dict) -> dict:
    import torch
    import transformers

    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "cuda": torch.version.cuda,
                           "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None}
    for name in ("deepspeed", "vllm", "ray", "flash_attn"):
        out[name] = _version(name)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported(),
                   nccl=".".join(map(str, torch.cuda.nccl.version())))
    return out


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return getattr(__import__(module), "__version__", "installed")
    except Exception as exc:  # an install that does not import is worth reporting, not fatal
        return f"import failed: {type(exc).__name__}: {exc}"


def _section_bucket_pack(ctx: dict) -> dict:
    import torch

    from actors.weight_buckets import host_bytes, pack_bucket, unpack_bucket

    device = ctx["device"]
    n = 4 if ctx["tiny"] else 64  # 64 tensors of 4 M bf16 elements: a 512 MiB bucket (the 7B config's)
    named = [(f"layer.{i}.weight", torch.randn(2**22 if not ctx["tiny"] else 2**12, device=device,
                                               dtype=torch.bfloat16)) for i in range(n)]
    _sync(device)
    start = time.perf_counter()
    meta, buffer = pack_bucket(named, device)
    _sync(device)
    pack_s = time.perf_counter() - start
    unpacked = unpack_bucket(meta, buffer)
    equal = all(a == b and torch.equal(x, y) for (a, x), (b, y) in zip(named, unpacked))
    start = time.perf_counter()
    host = host_bytes(buffer)
    hop_s = time.perf_counter() - start
    gb = buffer.numel() / 1e9
    return {"bucket_mib": buffer.numel() / 2**20, "tensors": n, "unpacked_equal": equal,
            "pack_gb_per_s": gb / pack_s, "host_hop_gb_per_s": gb / hop_s, "host_pinned": host.is_pinned(),
            "host_equal": bool(torch.equal(host, buffer.cpu()))}


def _section_nccl_group(ctx: dict) -> dict:
    import torch

    from actors import weight_sync
    from actors.weight_group import broadcast, free_port, new_group

    backend = "nccl" if ctx["device"].type == "cuda" else "gloo"
    start = time.perf_counter()
    group = new_group("127.0.0.1", free_port(), 0, 1, backend)
    formed_s = time.perf_counter() - start
    buffer = torch.arange(2**28 if not ctx["tiny"] else 2**16, device=group.device, dtype=torch.uint8)
    start = time.perf_counter()
    broadcast(group, buffer)
    _sync(group.device)
    seconds = time.perf_counter() - start
    timeout = getattr(weight_sync, "NCCL_GROUP_TIMEOUT" if backend == "nccl" else "_GROUP_TIMEOUT", None)
    if hasattr(group.process_group, "shutdown"):
        group.process_group.shutdown()
    return {"backend": backend, "formed_s": formed_s, "broadcast_mib": buffer.numel() / 2**20,
            "broadcast_s": seconds, "group_timeout_s": timeout.total_seconds() if timeout is not None else None}


def _section_vllm_weight_transfer(ctx: dict) -> dict:
    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vLLM is not installed here: its weight-transfer engine is not checked"}
    import vllm

    found = importlib.util.find_spec("vllm.distributed.weight_transfer") is not None
    return {"vllm": vllm.__version__, "weight_transfer_module": found}


def _section_ray_gpu(ctx: dict) -> dict:
    if importlib.util.find_spec("ray") is None:
        return {"skipped": "Ray is not installed here: actor GPU placement is not checked"}
    if ctx["device"].type != "cuda":
        return {"skipped": "no GPU: a num_gpus=1 actor cannot be placed"}
    import ray

    ray.init(num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        @ray.remote(num_gpus=1)
        def visible() -> tuple[str, int]:
            import torch

            return os.environ.get("CUDA_VISIBLE_DEVICES", ""), torch.cuda.device_count()

        devices, count = ray.get(visible.remote(), timeout=120)
    finally:
        ray.shutdown()
    return {"cuda_visible_devices": devices, "device_count": count}


def _section_checkpoint(ctx: dict) -> dict:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from pipeline.tiny import SPECS, TinySpec, build_config, build_processor, build_tokenizer

    tokenizer = build_tokenizer()
    if ctx["tiny"]:
        config = build_config(SPECS["tiny"], tokenizer)
        min_pixels, max_pixels = 3136, 12544
    else:
        s = SHAPE_7B
        config = build_config(TinySpec(hidden=s["hidden"], layers=ctx["layers"], heads=s["heads"],
                                       kv_heads=s["kv_heads"], intermediate=s["intermediate"],
                                       vision_depth=ctx["vision_layers"], vision_width=s["vision_width"],
                                       vision_heads=s["vision_heads"]), tokenizer)
        config.text_config.vocab_size = s["vocab"]
        config.vision_config.intermediate_size = s["vision_intermediate"]
        min_pixels, max_pixels = ctx["cfg"].model.min_pixels, ctx["cfg"].model.max_pixels
    torch.manual_seed(0)
    with torch.device(ctx["device"]):
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    path = Path(ctx["workdir"]) / "checkpoint"
    model.save_pretrained(path, safe_serialization=True)
    build_processor(tokenizer, min_pixels=min_pixels, max_pixels=max_pixels).save_pretrained(path)
    params = model.num_parameters()
    del model
    _free(ctx["device"])
    ctx["model_path"] = str(path)
    return {"parameters": params, "decoder_layers": config.text_config.num_hidden_layers,
            "vision_layers": config.vision_config.depth}  # the path is a temporary folder: not recorded


def _section_reference_step(ctx: dict) -> dict:
    """Plain PyTorch: the batch's plain-forward logprobs, then `--steps` timed steps after one warm-up."""
    from bench.gpu_smoke_work import make_batch, plain_step_runner

    batch = make_batch(ctx)
    runner = plain_step_runner(ctx, batch)
    runner.step()  # warm-up (kernels, allocator)
    _reset_peak(ctx["device"])
    seconds = [runner.step() for _ in range(ctx["steps"])]
    best = min(seconds)
    out = {"step_s": seconds, "tokens": runner.tokens, "tokens_per_s": runner.tokens / best,
           "peak_gib": _peak_gib(ctx["device"]), "micro_batches": runner.micro_batches}
    runner.close()
    _free(ctx["device"])
    return out


def _section_zero3(ctx: dict, defaults: bool = False) -> dict:
    """The learner's own step (`LearnerRank`, one rank) with the 7B config's learner settings."""
    from bench.gpu_smoke_work import learner_config, make_batch

    from actors.learner import LearnerRank
    from actors.learner_setup import deepspeed_config
    from actors.weight_group import free_port

    batch = make_batch(ctx)
    cfg = learner_config(ctx, defaults)
    rank = LearnerRank(ctx["model_path"], cfg, ctx["cfg"].algo, rank=0, world_size=1,
                       max_new_tokens=ctx["max_new"], temperature=ctx["cfg"].rollout.temperature)
    rank.setup("127.0.0.1", free_port())
    first = rank.train_step(batch)
    _reset_peak(ctx["device"])
    steps = [rank.train_step(batch).values for _ in range(ctx["steps"])]
    best = min(steps, key=lambda v: v["step_seconds"])
    out = {"zero": deepspeed_config(cfg, 1, dtype=rank.dtype)["zero_optimization"], "dtype": rank.dtype,
           "step_s": [v["step_seconds"] for v in steps], "tokens": best["tokens"],
           "tokens_per_s": best["tokens"] / best["step_seconds"], "peak_gib": _peak_gib(ctx["device"]),
           "micro_batches": best["micro_batches"], "positions": best["positions"],
           "logp_gap": first.values["learner_rollout_logp_diff"] if ctx.get("plain_logprobs") else None,
           "first_loss": first.values["loss"], "grad_norm": first.values["grad_norm"]}
    del rank
    _free(ctx["device"])
    return out


def _section_ratio(ctx: dict) -> dict:
    done = ctx["results"]["sections"]
    ref = done.get("reference_step", {}).get("tokens_per_s")
    out: dict[str, Any] = {"goal": GOAL_RATIO}
    for name in ("zero3_step", "zero3_ds_defaults"):
        ours = done.get(name, {}).get("tokens_per_s")
        out[name] = ours / ref if ours and ref else None
    out["meets_goal"] = out["zero3_step"] is not None and out["zero3_step"] >= GOAL_RATIO
    return out


SECTIONS: list[tuple[str, str, Callable[[dict], dict]]] = [
    ("versions", "library and GPU versions", _section_versions),
    ("bucket_pack", "weight-sync bucket packed/unpacked on the GPU, pinned host hop (GB/s)", _section_bucket_pack),
    ("nccl_group", "one-rank weight-sync NCCL group (own TCPStore, long timeout), 256 MiB broadcast",
     _section_nccl_group),
    ("vllm_weight_transfer", "vLLM's weight-transfer engine imports (skipped without vLLM)",
     _section_vllm_weight_transfer),
    ("ray_gpu", "a Ray actor with num_gpus=1 sees one GPU (skipped without Ray)", _section_ray_gpu),
    ("checkpoint", "7B-shaped Qwen2.5-VL, few layers, random weights, built locally", _section_checkpoint),
    ("reference_step", "plain PyTorch step: fp32 master, bf16 autocast, fused AdamW, checkpointing",
     _section_reference_step),
    ("zero3_step", "the learner's ZeRO-3 step with the 7B config's settings: tokens/s, peak, logp gap",
     _section_zero3),
    ("zero3_ds_defaults", "the same step with DeepSpeed's default ZeRO-3 buckets and thresholds",
     lambda ctx: _section_zero3(ctx, defaults=True)),
    ("ratio", f"zero3 tokens/s over the reference's (goal >= {GOAL_RATIO})", _section_ratio),
]


def run_sections(ctx: dict, out: Path, only: set[str] | None = None) -> dict:
    """Every section in order; the JSON is rewritten after each (errors recorded, later sections still run)."""
    results = ctx["results"]
    for name, _, fn in SECTIONS:
        if only and name not in only:
            continue
        start = time.perf_counter()
        print(f"[gpu_smoke] {name} ...", flush=True)
        try:
            figures = fn(ctx)
            status = "skipped" if "skipped" in figures else "ok"
            entry = {"status": status, **figures}
        except Exception as exc:
            entry = {"status": "error", "error": f"{type(exc).__name__}: {exc}",
                     "traceback": traceback.format_exc().splitlines()[-12:]}
        entry["seconds"] = round(time.perf_counter() - start, 2)
        results["sections"][name] = entry
        _write(results, out)
        print(f"[gpu_smoke] {name}: {entry['status']} in {entry['seconds']} s"
              + (f" ({entry.get('error') or entry.get('skipped')})" if entry["status"] != "ok" else ""), flush=True)
    return results


def _write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    os.replace(tmp, out)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (process RSS peak)


def _free(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="list the checks and exit")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    parser.add_argument("--tiny", action="store_true", help="tiny widths (the CPU check of the wiring)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the 7B-shaped model (2-4)")
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=4, help="pairs of G = 8 completions")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--only", default="", help="comma-separated section names")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.dry_run:
        for name, what, _ in SECTIONS:
            print(f"{name:22s} {what}")
        print(f"(dry run: nothing run; a real run writes {args.out} section by section)")
        return 0
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch

    from pipeline.config import load_config

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: --device cuda but torch sees no GPU; use --device cpu --tiny for the CPU check")
        return 2
    os.environ.setdefault("DS_ACCELERATOR", device.type)
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": str(device),
               "tiny": args.tiny, "layers": args.layers, "vision_layers": args.vision_layers,
               "pairs": args.pairs, "sections": {}}
    with tempfile.TemporaryDirectory(prefix="gpu_smoke.") as workdir:
        ctx = {"device": device, "tiny": args.tiny, "layers": args.layers, "vision_layers": args.vision_layers,
               "pairs": args.pairs, "steps": args.steps, "workdir": workdir, "cfg": load_config(str(CONFIG)),
               "results": results}
        ctx["max_new"] = 32 if args.tiny else ctx["cfg"].rollout.max_new_tokens
        run_sections(ctx, Path(args.out), {s for s in args.only.split(",") if s} or None)
    failed = [n for n, e in results["sections"].items() if e["status"] == "error"]
    print(f"gpu_smoke: {len(results['sections'])} sections, errors: {', '.join(failed) or 'none'}; {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
