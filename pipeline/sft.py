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
(`describe_synthetic_image`). A second coin (`faithful_rate`, 0.5 by default, independent of the answer's)
swaps the two images' descriptions in that fraction of the targets (a reasoning that contradicts the
images). So the warm start learns to look and to describe, but it answers by a coin: which image matches
the prompt is what GRPO has to learn. The default (0.5) is what `tiny://reasoner-sft`, the demo and CI use:
from it GRPO learns the `render` tasks within 40 updates on CPU, but half its reasonings start unfaithful,
which builds the listener's effect in (docs/listener.md). The listener experiment's primary setting is
`faithful_rate` 1.0 (`bench.learning` builds it): faithful descriptions from the start.
(A departure worth stating: the paper's reasoner starts from an instruction-tuned VLM that already sees
and describes; the descriptions stand in for that, on a model of 1M random parameters.)

It shares the learner code: a `LearnerGroup` (DeepSpeed, `SftSettings.zero_stage`) steps with `objective="sft"`, i.e.
`pipeline.grpo.sft_loss`, the token-mean negative log-likelihood of the completion tokens with the same
whole-batch normaliser as the GRPO loss, and the result is written by `actors.checkpoint.export_policy`
(a checkpoint that transformers and vLLM load), atomically, with `sft_manifest.json` written last.
`tiny://reasoner-sft` in a config (`pipeline.models`) builds make-tiny + this on first use.

The listener warm start (`--role listener`, `tiny://listener-sft`) is the same loop on listener prompts
(`pipeline.prompts.listener_prompt`) on a describe-then-judge task of its own (docs/listener.md): from a
stream no other warm start or run uses (`LISTENER_SEED_OFFSET`), a pair is described in words (the prompt
restated, one sentence per image, in either order, with or without the prompt) and the target is the image
whose description matches the prompt; the two images attached are of another, independent pair
(`LISTENER_IMAGES_OFFSET`), so only the text tells the target. It never sees a reasoner's target.
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

from pipeline.config import AlgoConfig, LearnerConfig
from pipeline.prompts import format_target, listener_prompt, reasoner_prompt
from pipeline.synthetic import TRAINING_TASKS, describe_synthetic_image, synthetic_pair
from pipeline.types import ImageIndex, PreferencePair, TrainBatch, TrainSequence

Role = Literal["reasoner", "listener"]

SFT_SEED_OFFSET = 2_000_003  # the SFT pairs' synthetic stream: disjoint from training (seed) and held-out
LISTENER_SEED_OFFSET = 3_000_017  # the listener's described pairs: a stream of its own
LISTENER_IMAGES_OFFSET = 4_000_037  # the images attached to its examples: independent of the described pairs
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


# `tiny://listener-sft`: one describe-then-judge example per pair, from the random tiny listener.
LISTENER_SFT = SftSettings(steps=300, pairs_per_step=32, faithful_rate=1.0)  # its texts describe what they
#                                                                            say (the reasoner's coin is unused)


def default_settings(role: Role) -> SftSettings:
    """What `tiny://ROLE-sft` builds."""
    return LISTENER_SFT if role == "listener" else SftSettings()


@dataclass(frozen=True)
class SftResult:
    out: Path
    losses: list[float]
    seconds: float


# ---- targets (pure) ----------------------------------------------------------------------------------

def sft_reasoning(pair: PreferencePair, swap: bool = False) -> str:
    """The prompt restated and both images described, with no verdict; `swap` gives image 1 the description
    of image 2 and vice versa (a reasoning that contradicts the images)."""
    first, second = describe_synthetic_image(pair.image_1), describe_synthetic_image(pair.image_2)
    if swap:
        first, second = second, first
    return f"The prompt asks for {pair.prompt}. Image 1 shows a {first}. Image 2 shows a {second}."


LISTENER_TEMPLATES = (  # (prompt restated, image 2 described first)
    (True, False), (True, True), (False, False), (False, True))


def listener_reading(prompt: str, first: str, second: str, restate: bool, second_first: bool) -> str:
    """A text describing image 1 as `first` and image 2 as `second`, in one of the listener's phrasings."""
    sentences = [f"Image 1 shows a {first}.", f"Image 2 shows a {second}."]
    if second_first:
        sentences.reverse()
    return " ".join(([f"The prompt asks for {prompt}."] if restate else []) + sentences)


def listener_example(described: PreferencePair, seed: int, index: int, image_size: int
                     ) -> tuple[PreferencePair, str, ImageIndex]:
    """(pair shown, text read, target) of listener example `index`: `described` in words, the images of an
    independent pair, and the target the image whose description matches the prompt."""
    rng = random.Random(f"listener-sft:{seed}:{index}")
    restate, second_first = LISTENER_TEMPLATES[rng.randrange(len(LISTENER_TEMPLATES))]
    text = listener_reading(described.prompt, describe_synthetic_image(described.image_1),
                            describe_synthetic_image(described.image_2), restate, second_first)
    shown = synthetic_pair(seed + LISTENER_IMAGES_OFFSET, index, image_size, rng.choice(TRAINING_TASKS))
    pair = PreferencePair(pair_id=f"listener-sft-{seed}-{index}", prompt=described.prompt, image_1=shown.image_1,
                          image_2=shown.image_2, preferred=described.preferred)
    return pair, text, described.preferred


def sft_answer(pair: PreferencePair, seed: int, index: int, answer_accuracy: float) -> ImageIndex:
    """The preferred image with probability `answer_accuracy` (a coin seeded by (seed, index)), else the other."""
    right = random.Random(f"sft-answer:{seed}:{index}").random() < answer_accuracy
    return pair.preferred if right else (2 if pair.preferred == 1 else 1)


def sft_pairs(settings: SftSettings, step: int, role: Role = "reasoner") -> list[tuple[int, PreferencePair]]:
    """(stream index, pair) of step `step`: the reasoner's and the listener's streams are disjoint."""
    start = step * settings.pairs_per_step
    tasks = settings.tasks
    offset = LISTENER_SEED_OFFSET if role == "listener" else SFT_SEED_OFFSET
    return [(i, synthetic_pair(settings.seed + offset, i, settings.image_size, tasks[i % len(tasks)]))
            for i in range(start, start + settings.pairs_per_step)]


def sft_faithful(seed: int, index: int, faithful_rate: float) -> bool:
    """Whether target `index` describes the images as they are: a coin seeded by (seed, index), independent
    of `sft_answer`'s."""
    return random.Random(f"sft-faithful:{seed}:{index}").random() < faithful_rate


def sft_examples(pairs: list[tuple[int, PreferencePair]], settings: SftSettings,
                 role: Role = "reasoner") -> list[tuple[PreferencePair, str, str]]:
    """(pair, full chat prompt, target text) of one step, one per pair: the reasoner's format target, or the
    listener's describe-then-judge example (whose pair carries the independent images it is shown)."""
    if role == "listener":
        return [(shown, listener_prompt(shown.prompt, text), str(answer)) for index, pair in pairs
                for shown, text, answer in [listener_example(pair, settings.seed, index, settings.image_size)]]
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
                                micro_batch_tokens=8192, dtype="float32")  # warm starts alike on every machine
    processor = AutoProcessor.from_pretrained(str(model))
    t_start = time.perf_counter()
    group = LearnerGroup(str(model), learner_cfg, AlgoConfig(), seed=settings.seed, max_new_tokens=256,
                         temperature=1.0)
    losses: list[float] = []
    try:
        for step in range(settings.steps):
            batch = sft_batch(step, sft_pairs(settings, step, role), processor, settings, role)
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
