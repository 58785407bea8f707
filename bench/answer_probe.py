"""Can a checkpoint learn a synthetic task's answer at all? A supervised probe, in plain PyTorch.

    python -m bench.answer_probe --model runs/bench-models/tiny-reasoner-sft --task render   # learns
    python -m bench.answer_probe --model runs/bench-models/tiny-reasoner-sft --task match    # does not
    python -m bench.answer_probe --model DIR --task match --label image2-red                 # one feature: learns

The reasoning is teacher-forced: the correct descriptions read off the pixels (`pipeline.sft.sft_reasoning`)
followed by `</think><answer>`, and the answer token alone (`1` or `2`) is trained by cross-entropy, the
vision tower frozen, as in the learner. This is the best case for GRPO: its gradient on a binary answer is
at best this supervised one. Every `--eval-every` steps it prints the held-out mean p(correct) and the
accuracy on 64 pairs of a seed never trained on.

`--label` replaces the preference by a single feature, to tell "cannot learn" from "cannot learn this":
`image2-red` (is image 2 red) and `prompt-rgb` (is the prompt's colour red, green or blue). Either is one
token's identity; the `match` preference is an XOR of two (BENCHMARKS.md, "Learning proof").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HELDOUT_SEED = 1_000_003
TRAIN_SEED = 77


def label_of(pair, label: str) -> int:
    """Class index (0 = answer "1", 1 = answer "2") of `pair` under `label`."""
    from pipeline.sft import describe_synthetic_image

    if label == "preference":
        return pair.preferred - 1
    if label == "image2-red":
        return int(describe_synthetic_image(pair.image_2).split()[0] == "red")
    if label == "prompt-rgb":
        return int(pair.prompt.split()[1] in ("red", "green", "blue"))
    raise ValueError(f"unknown label {label!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="checkpoint directory (e.g. the SFT warm start)")
    parser.add_argument("--task", choices=["match", "render"], default="match")
    parser.add_argument("--label", choices=["preference", "image2-red", "prompt-rgb"], default="preference")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--pairs-per-step", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pipeline.prompts import reasoner_prompt
    from pipeline.sft import sft_reasoning
    from pipeline.synthetic import synthetic_pair

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    processor = AutoProcessor.from_pretrained(str(args.model))
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(str(args.model), dtype=torch.float32)
    model.model.visual.requires_grad_(False)
    answer_ids = torch.tensor([processor.tokenizer.convert_tokens_to_ids(t) for t in ("1", "2")])

    def batch(seed: int, start: int, count: int):
        pairs = [synthetic_pair(seed, start + i, task=args.task) for i in range(count)]
        texts = [reasoner_prompt(p.prompt) + f"<think>{sft_reasoning(p)}</think><answer>" for p in pairs]
        inputs = processor(text=texts, images=[im for p in pairs for im in (p.image_1, p.image_2)], padding=True,
                           return_tensors="pt")
        return inputs, torch.tensor([label_of(p, args.label) for p in pairs])

    def answer_logits_B2(inputs) -> torch.Tensor:
        return model(**inputs).logits[:, -1][:, answer_ids]

    held_inputs, held_labels = batch(HELDOUT_SEED, 0, 64)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    start = time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0:
            model.eval()
            with torch.no_grad():
                p_correct = torch.softmax(answer_logits_B2(held_inputs), -1)[torch.arange(64), held_labels]
            print(f"step {step:5d}  held-out p(correct) {p_correct.mean():.3f}  accuracy "
                  f"{(p_correct > 0.5).float().mean():.3f}  {time.perf_counter() - start:.0f} s", flush=True)
            model.train()
        if step == args.steps:
            break
        inputs, labels = batch(TRAIN_SEED, step * args.pairs_per_step, args.pairs_per_step)
        loss = torch.nn.functional.cross_entropy(answer_logits_B2(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return 0


if __name__ == "__main__":
    sys.exit(main())
