"""Format warm start: supervised fine-tuning on the answer FORMAT only, through the real learner.

    python -m pipeline sft --model runs/models/tiny-reasoner --out runs/models/tiny-reasoner-sft
    python -m pipeline sft --model DIR --out DIR --steps 300 --seed 0 --lr 1e-3

Why: a tiny random reasoner never writes `<think>...</think><answer>N</answer>`, so every GRPO reward is 0
and there is no signal. This teaches the format and nothing about the preference: synthetic pairs
(`pipeline.synthetic`, a stream of their own, disjoint from the training and held-out streams), each with
the target `format_target(reasoning, answer)` where `answer` is the preferred image with probability
`answer_accuracy` (0.5 by default: a seeded coin, independent of the pair), so the warm start answers at
chance. The reasoning states the prompt and describes both images as they are ("The prompt asks for a red
circle. Image 1 shows a blue circle. Image 2 shows a red circle."), read off the pixels
(`describe_synthetic_image`), but by a second coin (`faithful_rate`, 0.5 by default, independent of the
answer's) half the targets swap the two images' descriptions. So the warm start learns to look and to
describe, but it answers by a coin and half the time tells image 1 and image 2 apart wrongly: which image
matches the prompt, and reasoning that a reader (the listener) finds faithful, is what GRPO has to learn.
(A departure worth stating: the paper's reasoner starts from an instruction-tuned VLM that already sees
and describes; the descriptions stand in for that, on a model of 1M random parameters.)

It shares the learner code: a `LearnerGroup` (DeepSpeed, `SftSettings.zero_stage`) steps with `objective="sft"`, i.e.
`pipeline.grpo.sft_loss`, the token-mean negative log-likelihood of the completion tokens with the same
whole-batch normaliser as the GRPO loss, and the result is written by `actors.checkpoint.export_policy`
(a checkpoint that transformers and vLLM load), atomically, with `sft_manifest.json` written last.
`tiny://reasoner-sft` in a config (`pipeline.models`) builds make-tiny + this on first use.

The listener warm start (`--role listener`, `tiny://listener-sft`) is the same loop on listener prompts
(`pipeline.prompts.listener_prompt`): each pair gives two sequences, its faithful reasoning (the text
above) -> the preferred image's number, and that reasoning with the two images' descriptions swapped -> the
other number. The listener so learns to answer from what it reads (docs/listener.md).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from pipeline.config import AlgoConfig, LearnerConfig
from pipeline.prompts import format_target, listener_prompt, reasoner_prompt
from pipeline.synthetic import BACKGROUND, DRAWN_COLOURS, TRAINING_TASKS, synthetic_pair
from pipeline.types import ImageIndex, PreferencePair, TrainBatch, TrainSequence

Role = Literal["reasoner", "listener"]

SFT_SEED_OFFSET = 2_000_003  # the SFT pairs' synthetic stream: disjoint from training (seed) and held-out
MANIFEST = "sft_manifest.json"
IM_END = "<|im_end|>"


@dataclass(frozen=True)
class SftSettings:
    """What the warm start does; the defaults are what `tiny://reasoner-sft` builds."""

    steps: int = 300  # optimizer steps
    pairs_per_step: int = 16  # sequences per step (one target per pair)
    lr: float = 1e-3  # AdamW learning rate
    seed: int = 0  # pairs, answer coins and learner seed
    answer_accuracy: float = 0.5  # probability that a target's answer is the preferred image
    faithful_rate: float = 0.5  # probability that a target's reasoning describes each image as it is (else
    #                             the two descriptions are swapped); a coin independent of the answer's
    image_size: int = 56  # side of the synthetic images (as data.image_size)
    tasks: tuple[str, ...] = TRAINING_TASKS  # synthetic tasks, in turn by pair (never the OOD one)
    freeze_vision: bool = False  # the vision tower learns to see colours and shapes too
    num_cpus: float = 1  # CPUs (intra-op threads) of the learner rank
    zero_stage: Literal[0, 2, 3] = 0  # one rank: ZeRO-3 would only add its per-module hooks (~1.5x the step)


# `tiny://listener-sft`: two sequences per pair (faithful and swapped), from the random tiny listener.
LISTENER_SFT = SftSettings(steps=300, pairs_per_step=16)


def default_settings(role: Role) -> SftSettings:
    """What `tiny://ROLE-sft` builds."""
    return LISTENER_SFT if role == "listener" else SftSettings()


@dataclass(frozen=True)
class SftResult:
    out: Path
    losses: list[float]
    seconds: float


# ---- targets (pure) ----------------------------------------------------------------------------------

def describe_synthetic_image(image: Image.Image) -> str:
    """"red circle": the colour and shape of a synthetic image, read off its pixels.

    The colour is the most frequent non-background colour (shapes are drawn without anti-aliasing, so
    their pixels are exactly one of `COLOURS`); the shape follows from how much of its bounding box the
    shape fills: a square about 1, a circle pi/4, a triangle 1/2.
    """
    rgb_HW3 = np.asarray(image.convert("RGB")).astype(np.int32)
    packed_HW = (rgb_HW3[..., 0] << 16) | (rgb_HW3[..., 1] << 8) | rgb_HW3[..., 2]  # one int per pixel
    values, counts = np.unique(packed_HW, return_counts=True)  # one pass, not one per known colour
    count_of = dict(zip(values.tolist(), counts.tolist()))
    counts_by_colour = {name: count_of.get(_packed(rgb), 0) for name, rgb in DRAWN_COLOURS.items() if rgb != BACKGROUND}
    colour = max(counts_by_colour, key=counts_by_colour.get)
    if counts_by_colour[colour] == 0:
        raise ValueError("no shape of a known colour in the image")
    mask_HW = packed_HW == _packed(DRAWN_COLOURS[colour])
    rows, cols = np.flatnonzero(mask_HW.any(axis=1)), np.flatnonzero(mask_HW.any(axis=0))
    fill = mask_HW.sum() / ((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1))
    shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
    return f"{colour} {shape}"


def _packed(rgb: tuple[int, int, int]) -> int:
    return (rgb[0] << 16) | (rgb[1] << 8) | rgb[2]


def sft_reasoning(pair: PreferencePair, swap: bool = False) -> str:
    """The prompt restated and both images described, with no verdict; `swap` gives image 1 the description
    of image 2 and vice versa (a reasoning that contradicts the images)."""
    first, second = describe_synthetic_image(pair.image_1), describe_synthetic_image(pair.image_2)
    if swap:
        first, second = second, first
    return f"The prompt asks for {pair.prompt}. Image 1 shows a {first}. Image 2 shows a {second}."


def listener_examples(pair: PreferencePair) -> list[tuple[str, ImageIndex]]:
    """The listener's targets for one pair: (faithful reasoning, preferred), (swapped reasoning, the other)."""
    other: ImageIndex = 2 if pair.preferred == 1 else 1
    return [(sft_reasoning(pair), pair.preferred), (sft_reasoning(pair, swap=True), other)]


def sft_answer(pair: PreferencePair, seed: int, index: int, answer_accuracy: float) -> ImageIndex:
    """The preferred image with probability `answer_accuracy` (a coin seeded by (seed, index)), else the other."""
    right = random.Random(f"sft-answer:{seed}:{index}").random() < answer_accuracy
    return pair.preferred if right else (2 if pair.preferred == 1 else 1)


def sft_pairs(settings: SftSettings, step: int) -> list[tuple[int, PreferencePair]]:
    """(stream index, pair) of step `step`."""
    start = step * settings.pairs_per_step
    tasks = settings.tasks
    return [(i, synthetic_pair(settings.seed + SFT_SEED_OFFSET, i, settings.image_size, tasks[i % len(tasks)]))
            for i in range(start, start + settings.pairs_per_step)]


def sft_faithful(seed: int, index: int, faithful_rate: float) -> bool:
    """Whether target `index` describes the images as they are: a coin seeded by (seed, index), independent
    of `sft_answer`'s."""
    return random.Random(f"sft-faithful:{seed}:{index}").random() < faithful_rate


def sft_examples(pairs: list[tuple[int, PreferencePair]], settings: SftSettings,
                 role: Role = "reasoner") -> list[tuple[PreferencePair, str, str]]:
    """(pair, full chat prompt, target text) of one step: one per pair for the reasoner, two for the listener."""
    if role == "listener":
        return [(pair, listener_prompt(pair.prompt, reasoning), str(answer))
                for _, pair in pairs for reasoning, answer in listener_examples(pair)]
    return [(pair, reasoner_prompt(pair.prompt),
             format_target(sft_reasoning(pair, swap=not sft_faithful(settings.seed, index, settings.faithful_rate)),
                           sft_answer(pair, settings.seed, index, settings.answer_accuracy)))
            for index, pair in pairs]


def sft_batch(step: int, pairs: list[tuple[int, PreferencePair]], processor, settings: SftSettings,
              role: Role = "reasoner") -> TrainBatch:
    """One `TrainSequence` per example: the processor's prompt tokens (placeholders expanded), the target's
    tokens and the end of turn; no advantage and no rollout logprobs (the SFT objective reads neither)."""
    tokenizer = processor.tokenizer
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    sequences = []
    for k, (pair, prompt, target) in enumerate(sft_examples(pairs, settings, role)):
        images = [pair.image_1, pair.image_2]
        prompt_ids = processor(text=[prompt], images=images, return_tensors="np")["input_ids"][0]
        completion = np.asarray(tokenizer(target, add_special_tokens=False)["input_ids"] + [eos], dtype=np.int64)
        sequences.append(TrainSequence(
            pair_id=pair.pair_id, completion_index=k, prompt_token_ids=prompt_ids.astype(np.int64),
            completion_token_ids=completion, rollout_logprobs=np.zeros(len(completion), dtype=np.float32),
            advantage=0.0, images=(pair.image_1, pair.image_2)))
    return TrainBatch(step=step, policy_version=0, sequences=tuple(sequences))


# ---- the run -----------------------------------------------------------------------------------------

def warm_start(model: str | Path, out: str | Path, settings: SftSettings = SftSettings(),
               log_every: int = 50, role: Role = "reasoner") -> SftResult:
    """SFT `model` for `settings.steps` steps on one learner rank; the result is written to `out` atomically.
    `role` picks the targets: the reasoner's format, or the listener's answer from the reasoning it reads."""
    import ray
    from transformers import AutoProcessor

    from actors.learner import LearnerGroup

    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    started = _init_ray_for_sft([settings])
    learner_cfg = LearnerConfig(num_ranks=1, zero_stage=settings.zero_stage, lr=settings.lr,
                                freeze_vision=settings.freeze_vision, num_cpus=settings.num_cpus,
                                micro_batch_tokens=8192)
    processor = AutoProcessor.from_pretrained(str(model))
    t_start = time.perf_counter()
    group = LearnerGroup(str(model), learner_cfg, AlgoConfig(), seed=settings.seed, max_new_tokens=256,
                         temperature=1.0)
    losses: list[float] = []
    try:
        for step in range(settings.steps):
            batch = sft_batch(step, sft_pairs(settings, step), processor, settings, role)
            losses.append(group.train_step(batch, objective="sft").values["loss"])
            if log_every and (step + 1) % log_every == 0:
                print(f"sft ({role}) step {step + 1}/{settings.steps}  loss {losses[-1]:.4f}", file=sys.stderr,
                      flush=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
            staging = Path(tmp) / "ckpt"
            group.export_policy(str(staging))
            seconds = time.perf_counter() - t_start
            (staging / MANIFEST).write_text(json.dumps(
                {"base_model": str(model), "role": role, "settings": asdict(settings),
                 "final_loss": losses[-1] if losses else None, "seconds": round(seconds, 1)}, indent=2) + "\n")
            if out.exists():
                shutil.rmtree(out)
            os.replace(staging, out)
    finally:
        group.shutdown()
        if started:
            ray.shutdown()
    return SftResult(out=out, losses=losses, seconds=seconds)


def warm_starts(jobs: list[tuple[str | Path, str | Path, SftSettings, Role]]) -> list[SftResult]:
    """Several warm starts (model, out, settings, role) at once, each on its own learner rank, on one Ray
    cluster: their single-threaded learners run side by side instead of one after the other. One job is
    `warm_start` itself."""
    import ray

    if len(jobs) < 2:
        return [warm_start(model, out, settings, role=role) for model, out, settings, role in jobs]
    from transformers import AutoProcessor  # noqa: F401 - two threads importing it first at once can fail

    started = _init_ray_for_sft([settings for _, _, settings, _ in jobs])
    try:
        with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="sft") as pool:
            futures = [pool.submit(warm_start, model, out, settings, role=role) for model, out, settings, role in jobs]
            return [future.result() for future in futures]
    finally:
        if started:
            ray.shutdown()


def _init_ray_for_sft(settings: list[SftSettings]) -> bool:
    """Join `ray job submit`'s cluster, or start a local one that fits these learners; True when started here."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):  # under `ray job submit`: join the job's cluster
        ray.init(log_to_driver=False)
        return True
    cpus = sum(int(s.num_cpus) for s in settings)
    ray.init(num_cpus=max(2, cpus), resources={"learner": len(settings)}, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    return True


def sft_command(args) -> int:
    """`python -m pipeline sft` (see pipeline/cli.py for the flags)."""
    from pipeline.config import ConfigError

    if not (Path(args.model) / "config.json").is_file():
        raise ConfigError(f"--model {args.model}: not a checkpoint directory (no config.json)")
    settings = SftSettings(steps=args.steps, pairs_per_step=args.pairs_per_step, lr=args.lr, seed=args.seed,
                           answer_accuracy=args.answer_accuracy, faithful_rate=args.faithful_rate,
                           image_size=args.image_size,
                           freeze_vision=args.freeze_vision, tasks=tuple(args.tasks), num_cpus=args.threads)
    result = warm_start(args.model, args.out, settings, role=getattr(args, "role", "reasoner"))
    print(f"{result.out}  ({settings.steps} steps, final loss {result.losses[-1]:.4f}, {result.seconds:.0f} s)")
    return 0
