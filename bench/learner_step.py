"""The learner's GRPO step alone, in-process (one rank, gloo): seconds per step and the dtype's logprob gap.

    python -m bench.learner_step                              # mid, fp32 and auto, 1 thread
    python -m bench.learner_step --sizes tiny,mid --dtypes float32,bfloat16 --threads 2 --steps 3
    python -m bench.learner_step --dtypes bfloat16 --steps 0    # the gap only (one step), no timing
    python -m bench.learner_step --dtypes auto --threads 2 --layouts shared,rows   # shared prompts vs rows

Work: `--pairs` synthetic pairs (64 px images) x `--group` completions of 16..`--max-new` tokens, the
mid workload of bench.e2e (16 x 8 x <= 128). The rollout logprobs of the batch are those of a plain fp32
transformers forward over each sequence (full logits, no chunking, no packing), so the learner's first-step
`learner_rollout_logp_diff` (token mean of |learner logp - rollout logp|) IS the gap between the learner's
path (its dtype, its packing and chunking) and the fp32 reference; `max_gap` is the largest token's.
Seconds: the median over `--steps` steps after one warm-up step (`step_seconds`, measured inside the rank).

Writes bench/results/learner_step.json (one entry per size x dtype, with the CPU's bf16 flags and the
threads) and prints a table.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from bench import write_result

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "learner_step.json"
MODELS = ROOT / "runs" / "bench-models"


def checkpoint(size: str) -> Path:
    from pipeline.tiny import make_tiny

    out = MODELS / f"learner-{size}-reasoner"
    if not (out / "config.json").is_file():
        make_tiny(out, role="reasoner", size=size)
    return out


def fp32_reference_logprobs(model, processor, sequence) -> Any:
    """[C] float32: log p(completion) from one plain fp32 forward of prompt + completion (full logits)."""
    import numpy as np
    import torch

    ids = np.concatenate([sequence.prompt_token_ids, sequence.completion_token_ids])
    images = processor.image_processor(images=list(sequence.images), return_tensors="pt")
    input_ids = torch.as_tensor(ids, dtype=torch.int64)[None]
    image_token = model.config.image_token_id
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=images["pixel_values"],
                       image_grid_thw=images["image_grid_thw"],
                       mm_token_type_ids=(input_ids == image_token).to(torch.int32), use_cache=False).logits
    P, C = len(sequence.prompt_token_ids), len(sequence.completion_token_ids)
    logp = torch.log_softmax(logits[0, P - 1: P - 1 + C].float(), -1)
    return logp.gather(-1, torch.as_tensor(sequence.completion_token_ids)[:, None])[:, 0].numpy()


def build_batch(model_dir: Path, pairs: int, group: int, max_new: int, seed: int = 0, reference: bool = True):
    """A TrainBatch of `pairs` x `group` sequences, random completions, fp32 reference rollout logprobs
    (`reference=False`: zeros, for timing only)."""
    import dataclasses

    import numpy as np
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pipeline.prompts import reasoner_prompt
    from pipeline.synthetic import synthetic_pairs
    from pipeline.types import TrainBatch, TrainSequence

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    rng = np.random.default_rng(seed)
    vocab = len(processor.tokenizer) - 20  # ordinary tokens only (the special ones sit at the start)
    sequences = []
    for pair in synthetic_pairs(seed=seed, count=pairs, image_size=64):
        enc = processor(text=[reasoner_prompt(pair.prompt)], images=[pair.image_1, pair.image_2], return_tensors="np")
        prompt = enc["input_ids"][0].astype(np.int64)
        for g in range(group):
            completion = rng.integers(20, 20 + vocab, size=int(rng.integers(16, max_new + 1))).astype(np.int64)
            seq = TrainSequence(pair_id=pair.pair_id, completion_index=g, prompt_token_ids=prompt,
                                completion_token_ids=completion, rollout_logprobs=np.zeros(len(completion), np.float32),
                                advantage=float(rng.choice([-1.0, 1.0])), images=(pair.image_1, pair.image_2))
            sequences.append(dataclasses.replace(seq, rollout_logprobs=fp32_reference_logprobs(model, processor, seq))
                             if reference else seq)
    return TrainBatch(step=0, policy_version=0, sequences=tuple(sequences))


def measure(size: str, dtype: str, threads: int, steps: int, pairs: int, group: int, max_new: int,
            reference: bool = True, layout: str = "shared") -> dict:
    from actors.learner import LearnerRank
    from actors.weight_group import free_port
    from pipeline.config import AlgoConfig, LearnerConfig

    model_dir = checkpoint(size)
    batch = build_batch(model_dir, pairs, group, max_new, reference=reference)
    learner = LearnerConfig(num_ranks=1, zero_stage=0, dtype=dtype, num_cpus=threads, lr=1e-6,
                            share_prompts=layout == "shared")
    rank = LearnerRank(str(model_dir), learner, AlgoConfig(), rank=0, world_size=1, max_new_tokens=max_new)
    rank.setup("127.0.0.1", free_port())
    first = rank.train_step(batch)
    seconds = [rank.train_step(batch).values["step_seconds"] for _ in range(steps)]
    values = first.values
    return {
        "size": size, "dtype": dtype, "layout": layout, "threads": threads, "sequences": len(batch.sequences),
        "tokens": values["tokens"], "positions": values["positions"],
        "micro_batches": values["micro_batches"], "first_step_s": values["step_seconds"],
        "step_s_median": statistics.median(seconds) if seconds else None, "step_s_all": seconds,
        "logp_gap_to_fp32_token_mean": values["learner_rollout_logp_diff"] if reference else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="mid")
    parser.add_argument("--dtypes", default="float32,auto")
    parser.add_argument("--layouts", default="shared", help="micro-batch layouts, comma-separated: shared "
                        "(each pair's prompt once: learner.share_prompts, the default) and/or rows (one "
                        "sequence per row, packed)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new", type=int, default=128)
    parser.add_argument("--no-reference", action="store_true", help="timing only: skip the fp32 reference "
                        "forward (rollout logprobs 0, no gap)")
    parser.add_argument("--label", default="", help="stored with the result (e.g. 'before', 'after')")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from actors.engine import host_dtype_support

    flags, gpu = host_dtype_support()
    rows = []
    for size in args.sizes.split(","):
        for dtype, layout in itertools.product(args.dtypes.split(","), args.layouts.split(",")):
            start = time.perf_counter()
            row = measure(size, dtype, args.threads, args.steps, args.pairs, args.group, args.max_new,
                          reference=not args.no_reference, layout=layout)
            row["wall_s"] = time.perf_counter() - start
            rows.append(row)
            print(f"{size:5s} {dtype:9s} {layout:6s} step {row['step_s_median'] or row['first_step_s']:.2f} s  "
                  f"tokens {row['tokens']:.0f} "
                  f"(positions {row['positions']:.0f})  gap {row['logp_gap_to_fp32_token_mean']}", flush=True)
    write_result({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "label": args.label,
                  "cpu": platform.processor() or platform.machine(), "cpu_bf16_flags": sorted(
                      flags & {"avx512_bf16", "amx_bf16", "amx_tile"}), "gpu_bf16": gpu,
                  "pairs": args.pairs, "group": args.group, "max_new": args.max_new, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
