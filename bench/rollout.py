"""Rollout throughput: the RolloutWorker (vLLM) against transformers `generate` on the same work.

    python -m bench.rollout                      # tiny and mid checkpoints, 32 pairs x G=8 x 128 tokens
    python -m bench.rollout --sizes mid --compiled --hf-dtype float32    # the issue's comparison, compiled vLLM
    python -m bench.rollout --sizes mid --pairs 8 --group-size 4 --new-tokens 32   # a quick look

Three engines on the same work: the RolloutWorker, the bare vLLM engine it wraps (`build_engine` +
`LLM.generate`: what the worker costs over vLLM itself), and transformers. `--compiled` builds both vLLM
engines with torch.compile (`enforce_eager=false`): slower to start, faster per token.

Same checkpoint, pairs, G, sampling (temperature 1, top-p 1) and dtype on both sides, and exactly the same
number of new tokens: the end of sequence is suppressed until `--new-tokens` (vLLM `min_tokens`,
transformers `min_new_tokens`), and the counts are checked. Each engine runs in a fresh process (so its
peak RSS is its own) with the same intra-op thread count (1 by default, as `rollout.num_cpus`); a warm-up
call precedes `--repeats` timed ones, and the best counts (the machines are shared: other processes slow
some runs by several times, so the JSON also keeps the median).
transformers gets its best case: the whole batch (pairs x G sequences, left-padded) in one `generate`.

Prints a table and writes bench/results/rollout.json: per size `vllm_tokens_per_s`, `hf_tokens_per_s`,
`ratio` and the peak RSS of each worker process; the top-level `ratio` is the mid size's.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from bench import write_result

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "rollout.json"


def _setup_child(threads: int) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    sys.path.insert(0, str(ROOT))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_vllm(ckpt: str, dtype: str, threads: int, repeats: int, pairs: int, group_size: int,
             new_tokens: int, compiled: bool = False) -> dict:
    """In a fresh process: a RolloutWorker, one warm-up generate, `repeats` timed ones."""
    _setup_child(threads)
    from actors.rollout import RolloutWorker
    from pipeline.config import EngineConfig
    from pipeline.synthetic import synthetic_pairs

    start = time.perf_counter()
    engine = EngineConfig(dtype=dtype, max_model_len=1024, enforce_eager=not compiled)
    worker = RolloutWorker(ckpt, engine, seed=0, num_threads=threads)
    startup_s = time.perf_counter() - start
    work = list(synthetic_pairs(seed=0, count=pairs))
    worker.generate(work[:2], 2, 8, 1.0, 1.0, min_new_tokens=8)  # warm-up

    def generate() -> int:
        groups = worker.generate(work, group_size, new_tokens, 1.0, 1.0, min_new_tokens=new_tokens)
        return sum(len(c.token_ids) for g in groups for c in g.completions)

    return {**timed(generate, repeats), "startup_s": startup_s, "peak_rss_mb": _peak_rss_mb()}


def run_bare_vllm(ckpt: str, dtype: str, threads: int, repeats: int, pairs: int, group_size: int,
                  new_tokens: int, compiled: bool = False) -> dict:
    """In a fresh process: the bare engine the worker wraps (`build_engine`, `LLM.generate`, no logprobs, no
    extension), on the same requests: what the worker costs over vLLM itself."""
    _setup_child(threads)
    from vllm import SamplingParams

    from actors.engine import build_engine
    from actors.rollout import reasoner_request
    from pipeline.config import EngineConfig
    from pipeline.synthetic import synthetic_pairs

    start = time.perf_counter()
    llm = build_engine(ckpt, EngineConfig(dtype=dtype, max_model_len=1024, enforce_eager=not compiled), seed=0,
                       num_threads=threads)
    startup_s = time.perf_counter() - start

    def generate(count: int, tokens: int) -> int:
        requests = [reasoner_request(p) for p in synthetic_pairs(seed=0, count=count)]
        params = SamplingParams(n=group_size, max_tokens=tokens, min_tokens=tokens, temperature=1.0, top_p=1.0)
        outputs = llm.generate(requests, params, use_tqdm=False)
        return sum(len(sample.token_ids) for output in outputs for sample in output.outputs)

    generate(2, 8)  # warm-up
    return {**timed(lambda: generate(pairs, new_tokens), repeats), "startup_s": startup_s,
            "peak_rss_mb": _peak_rss_mb()}


def run_hf(ckpt: str, dtype: str, threads: int, repeats: int, pairs: int, group_size: int,
           new_tokens: int) -> dict:
    """In a fresh process: transformers `generate` on the whole batch, one warm-up, `repeats` timed."""
    _setup_child(threads)
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pipeline.prompts import reasoner_prompt
    from pipeline.synthetic import synthetic_pairs

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    processor = AutoProcessor.from_pretrained(ckpt)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=getattr(torch, dtype)).eval()
    startup_s = time.perf_counter() - start

    def generate(count: int, tokens: int) -> int:
        work = list(synthetic_pairs(seed=0, count=count))
        enc = processor(text=[reasoner_prompt(p.prompt) for p in work],
                        images=[img for p in work for img in (p.image_1, p.image_2)], padding=True,
                        return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 max_new_tokens=tokens, min_new_tokens=tokens, num_return_sequences=group_size)
        return int(out[:, enc["input_ids"].shape[1]:].numel())

    generate(2, 8)  # warm-up
    return {**timed(lambda: generate(pairs, new_tokens), repeats), "startup_s": startup_s,
            "peak_rss_mb": _peak_rss_mb()}


def timed(generate, repeats: int) -> dict:
    """Token count (the same every time) and wall times of `repeats` calls."""
    counts, times = set(), []
    for _ in range(repeats):
        start = time.perf_counter()
        counts.add(generate())
        times.append(time.perf_counter() - start)
    if len(counts) != 1:
        raise RuntimeError(f"token counts differ between repeats: {sorted(counts)}")
    return {"tokens": counts.pop(), "times": times}


def in_fresh_process(fn, *args) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def bench_size(size: str, args: argparse.Namespace, workdir: Path) -> dict:
    from pipeline.tiny import make_tiny

    ckpt = str(make_tiny(workdir / f"reasoner-{size}", role="reasoner", size=size))
    work = (args.pairs, args.group_size, args.new_tokens)
    expected = args.pairs * args.group_size * args.new_tokens
    vllm = in_fresh_process(run_vllm, ckpt, args.dtype, args.threads, args.repeats, *work, args.compiled)
    bare = in_fresh_process(run_bare_vllm, ckpt, args.dtype, args.threads, args.repeats, *work, args.compiled)
    hf = in_fresh_process(run_hf, ckpt, args.hf_dtype or args.dtype, args.threads, args.repeats, *work)
    for name, result in (("vllm", vllm), ("bare_vllm", bare), ("hf", hf)):
        if result["tokens"] != expected:
            raise RuntimeError(f"{size}/{name}: generated {result['tokens']} tokens, expected {expected}")
    # Best of the repeats: the machine is shared, and the fastest run is the least disturbed one.
    vllm_tps, hf_tps = expected / min(vllm["times"]), expected / min(hf["times"])
    bare_tps = expected / min(bare["times"])
    return {"vllm_tokens_per_s": round(vllm_tps, 1), "hf_tokens_per_s": round(hf_tps, 1),
            "ratio": round(vllm_tps / hf_tps, 2), "tokens": expected,
            "bare_vllm_tokens_per_s": round(bare_tps, 1), "bare_ratio": round(bare_tps / hf_tps, 2),
            "worker_over_bare": round(vllm_tps / bare_tps, 2),
            "vllm_median_tokens_per_s": round(expected / statistics.median(vllm["times"]), 1),
            "hf_median_tokens_per_s": round(expected / statistics.median(hf["times"]), 1),
            "vllm_seconds": [round(t, 2) for t in vllm["times"]], "hf_seconds": [round(t, 2) for t in hf["times"]],
            "vllm_startup_s": round(vllm["startup_s"], 1), "hf_startup_s": round(hf["startup_s"], 1),
            "vllm_peak_rss_mb": round(vllm["peak_rss_mb"]), "hf_peak_rss_mb": round(hf["peak_rss_mb"])}


def print_table(results: dict[str, dict]) -> None:
    header = (f"{'size':6} {'tokens':>7} {'worker tok/s':>12} {'bare vLLM':>10} {'HF tok/s':>9} {'ratio':>6} "
              f"{'bare ratio':>10} {'vLLM RSS MB':>12} {'HF RSS MB':>10}")
    print(header)
    print("-" * len(header))
    for size, r in results.items():
        print(f"{size:6} {r['tokens']:>7} {r['vllm_tokens_per_s']:>12.0f} {r['bare_vllm_tokens_per_s']:>10.0f} "
              f"{r['hf_tokens_per_s']:>9.0f} {r['ratio']:>6.2f} {r['bare_ratio']:>10.2f} "
              f"{r['vllm_peak_rss_mb']:>12} {r['hf_peak_rss_mb']:>10}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid"])
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--hf-dtype", default=None, choices=["bfloat16", "float32"],
                        help="transformers' dtype if not --dtype (the issue's 6.5x compared bf16 vLLM with fp32)")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads of each engine (rollout.num_cpus defaults to 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per engine; the best counts")
    parser.add_argument("--compiled", action="store_true",
                        help="vLLM with torch.compile (rollout.engine.enforce_eager=false): slower start, faster steps")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        results = {size: bench_size(size, args, Path(tmp)) for size in args.sizes}
    print_table(results)
    report = {"ratio": results.get("mid", next(iter(results.values())))["ratio"], "sizes": results,
              "workload": {"pairs": args.pairs, "group_size": args.group_size, "new_tokens": args.new_tokens,
                           "temperature": 1.0, "top_p": 1.0},
              "dtype": args.dtype, "compiled": args.compiled, "hf_dtype": args.hf_dtype or args.dtype, "threads": args.threads, "repeats": args.repeats, "cpu_count": os.cpu_count(),
              "load_average_1m_at_end": round(os.getloadavg()[0], 2),
              "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d")}
    write_result(report, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
