"""How informative the frozen listener is: p(preferred) on held-out synthetic pairs, by what it reads.

    python -m bench.listener                                  # tiny://listener-sft, 64 pairs per task
    python -m bench.listener --listener DIR --pairs 32

For each task (`render`, `match`, and the out-of-distribution `render-ood`, which no warm start saw) it
takes held-out pairs (the training seed + `HELDOUT_SEED_OFFSET`, as the driver's evaluation) and reads the
listener's p(preferred image) (the two answer tokens' probabilities renormalised, as the listener pool
does, here with transformers in float32) for three reasonings: faithful (`pipeline.sft.sft_reasoning`),
swapped (the two images' descriptions exchanged) and empty. Accuracy = the fraction with p > 0.5 towards
the image the reasoning supports (faithful: the preferred one; swapped: the other; empty: the preferred
one, i.e. what the listener gets from the images alone). Writes bench/results/listener.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from bench import write_result

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "listener.json"
TASKS = ("render", "match", "render-ood")
READINGS = ("faithful", "swapped", "empty")


def p_preferred_of(model_dir: str, pairs: list, reasoning_of) -> list[float]:
    """p(pair.preferred) read by the listener at `model_dir` for each pair, given `reasoning_of(pair)`."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from actors.listener import answer_token_ids
    from pipeline.prompts import listener_p_image_1, listener_prompt

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    one, two = answer_token_ids(processor.tokenizer)
    out = []
    for pair in pairs:
        enc = processor(text=[listener_prompt(pair.prompt, reasoning_of(pair))], images=[pair.image_1, pair.image_2],
                        return_tensors="pt")
        with torch.no_grad():
            logp = torch.log_softmax(model(**enc).logits[0, -1].float(), dim=-1)
        p1 = listener_p_image_1(float(logp[one]), float(logp[two]))
        out.append(p1 if pair.preferred == 1 else 1.0 - p1)
    return out


def summary(p: list[float], supports_preferred: bool) -> dict[str, float]:
    """Mean p(preferred) and the accuracy towards the image the reasoning supports."""
    right = [(x > 0.5) if supports_preferred else (x < 0.5) for x in p]
    return {"p_preferred_mean": round(sum(p) / len(p), 4), "accuracy": round(sum(right) / len(right), 4)}


def measure(model_dir: str, pairs_per_task: int = 64, seed: int = 0) -> dict[str, Any]:
    from pipeline.heldout import HELDOUT_SEED_OFFSET
    from pipeline.sft import sft_reasoning
    from pipeline.synthetic import synthetic_pairs

    readers = {"faithful": sft_reasoning, "swapped": lambda pair: sft_reasoning(pair, swap=True),
               "empty": lambda pair: ""}
    report: dict[str, Any] = {}
    for task in TASKS:
        pairs = list(synthetic_pairs(seed + HELDOUT_SEED_OFFSET, pairs_per_task, task=task))
        report[task] = {name: summary(p_preferred_of(model_dir, pairs, readers[name]), name != "swapped")
                        for name in READINGS}
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listener", default="tiny://listener-sft", help="checkpoint or tiny:// spec")
    parser.add_argument("--pairs", type=int, default=64, help="held-out pairs per task")
    parser.add_argument("--models", type=Path, default=ROOT / "runs" / "bench-models")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    for key, value in dict(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0").items():
        os.environ.setdefault(key, value)
    from pipeline.models import resolve_checkpoint

    model_dir = resolve_checkpoint(args.listener, "--listener", args.models)
    start = time.perf_counter()
    report = {"listener": args.listener, "pairs_per_task": args.pairs, "tasks": measure(model_dir, args.pairs),
              "manifest": json.loads((Path(model_dir) / "sft_manifest.json").read_text())
              if (Path(model_dir) / "sft_manifest.json").is_file() else None,
              "seconds": round(time.perf_counter() - start, 1), "date": time.strftime("%Y-%m-%d")}
    print(f"{'task':11} " + " ".join(f"{r + ' acc':>13} {'p_pref':>7}" for r in READINGS))
    for task, row in report["tasks"].items():
        print(f"{task:11} " + " ".join(f"{row[r]['accuracy']:>13.3f} {row[r]['p_preferred_mean']:>7.3f}"
                                       for r in READINGS))
    write_result(report, args.out)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
