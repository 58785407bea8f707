"""Typed messages between the driver and the actors (docs/design.md "Contracts").

Every message is a frozen dataclass of plain Python values, numpy arrays and PIL images, so it crosses
Ray by pickling and never carries a live torch module. Every message carries the ids needed to join it
back: `pair_id`, `completion_index`, `policy_version`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image

ImageIndex = Literal[1, 2]  # images are numbered as the reasoner prompt shows them


@dataclass(frozen=True, eq=False)
class PreferencePair:
    """A prompt, two images generated for it, and which one people preferred."""

    pair_id: str
    prompt: str
    image_1: Image.Image
    image_2: Image.Image
    preferred: ImageIndex
    prompt_id: str = ""  # groups the pairs of one prompt (ImageReward protocol)
    category: str = ""  # for per-category accuracy, where the dataset has one

    def __post_init__(self) -> None:
        if self.preferred not in (1, 2):
            raise ValueError(f"pair {self.pair_id}: preferred must be 1 or 2, got {self.preferred!r}")


@dataclass(frozen=True, eq=False)
class Completion:
    """One sampled reasoner completion, token-in/token-out."""

    pair_id: str
    completion_index: int
    policy_version: int
    token_ids: np.ndarray  # [T] int64, generated tokens only
    logprobs: np.ndarray  # [T] float32, the rollout engine's logprob of each generated token
    text: str
    finish_reason: str  # "stop" | "length" | ...


@dataclass(frozen=True, eq=False)
class RolloutGroup:
    """The G completions sampled for one pair, with the exact prompt tokens they were sampled from."""

    pair: PreferencePair
    prompt_token_ids: np.ndarray  # [P] int64, image placeholders expanded as the engine saw them
    completions: tuple[Completion, ...]
    policy_version: int

    @property
    def pair_id(self) -> str:
        return self.pair.pair_id


@dataclass(frozen=True)
class ListenerScore:
    """The frozen listener's verdict on one completion's masked reasoning."""

    pair_id: str
    completion_index: int
    p_image_1: float  # p(image 1) renormalised over the two answer tokens
    p_preferred: float  # p(the human-preferred image)
    usable: bool = True  # False: no reasoning left after masking; p is a 0.5 placeholder, earns no credit


@dataclass(frozen=True, eq=False)
class ListenerRequest:
    """One completion for the listener to score: its pair (prompt, images, label) and the reasoner's text."""

    pair: PreferencePair
    completion_index: int
    text: str  # the full completion; the listener masks the answer itself


@dataclass(frozen=True)
class ListenerPoolStats:
    """The listener pool's state and counters since it started."""

    num_workers: int  # target size (of the last resize; while one is under way, the size it moves to)
    ready_workers: int  # workers taking requests now
    queued: int  # requests waiting for a free slot (backpressure)
    in_flight: int  # requests sent to a worker and not yet answered
    completed: int  # requests answered
    retries: int  # requests re-sent after their worker died
    restarts: int  # workers replaced after dying
    failed: int  # requests answered with an error (a worker raised, or retries ran out)

    def as_metrics(self, prefix: str = "listener/") -> dict[str, float]:
        return {f"{prefix}{name}": float(value) for name, value in self.__dict__.items()}


@dataclass(frozen=True)
class ResizeResult:
    """What a resize of the listener pool did (`ListenerPool.scale_to`, `python -m pipeline scale-listeners`)."""

    asked: int  # workers asked for
    before: int  # workers serving before
    serving: int  # workers serving after (fewer than asked when new engines got no resources in time)
    error: str = ""  # one line when it fell short (what the cluster lacked), else ""
    hold_s: float = 0.0  # a manual resize: seconds before autoscaling may change the size again (0: off)


@dataclass(frozen=True)
class CompletionReward:
    """Every reward component of one completion, kept for logging."""

    pair_id: str
    completion_index: int
    answer: ImageIndex | None  # parsed answer, None when the format is bad
    r_format: float
    r_accuracy: float
    r_listener: float
    total: float
    listener_p_preferred: float
    contradiction: bool  # the listener prefers the other image than the reasoner's answer


@dataclass(frozen=True, eq=False)
class ScoredGroup:
    """A rollout group with its rewards and group-relative advantages."""

    group: RolloutGroup
    rewards: tuple[CompletionReward, ...]
    advantages: np.ndarray  # [G] float32


@dataclass(frozen=True, eq=False)
class TrainSequence:
    """One (prompt, completion) sequence for the learner."""

    pair_id: str
    completion_index: int
    prompt_token_ids: np.ndarray  # [P]
    completion_token_ids: np.ndarray  # [T]
    rollout_logprobs: np.ndarray  # [T] from the rollout engine
    advantage: float
    images: tuple[Image.Image, Image.Image]


@dataclass(frozen=True, eq=False)
class TrainBatch:
    """All sequences of one GRPO step; the learner splits it into micro-batches by token budget."""

    step: int
    policy_version: int
    sequences: tuple[TrainSequence, ...]

    @property
    def num_completion_tokens(self) -> int:
        return int(sum(len(s.completion_token_ids) for s in self.sequences))


@dataclass(frozen=True)
class WeightVersion:
    """What a weight sync reports."""

    version: int
    num_bytes: int
    num_buckets: int
    seconds: float
    transport: str = ""  # SyncConfig.transport that carried the weights
    peak_gathered_bytes: int = 0  # most bytes of gathered (unpartitioned) parameters alive at once
    error: str = ""  # non-empty: the sync did not reach every rollout worker (one died); the driver re-syncs
    gather_s: float = 0.0  # materialising the buckets on the learner (ZeRO-3 gathers)
    transfer_s: float = 0.0  # packing/staging and the transport, beyond the engines' load
    load_s: float = 0.0  # the slowest engine's load of each bucket, plus closing the update

    def metrics(self) -> dict[str, float]:
        """The per-step `sync/*` metrics."""
        return {"sync/bytes": float(self.num_bytes), "sync/gather_s": self.gather_s,
                "sync/transfer_s": self.transfer_s, "sync/load_s": self.load_s}


@dataclass(frozen=True)
class WeightBucketMeta:
    """Names, dtypes and shapes of one weight-sync bucket, packed back to back in one byte buffer."""

    names: tuple[str, ...]  # checkpoint (model.safetensors) names
    dtypes: tuple[str, ...]  # torch dtype names, e.g. "bfloat16"
    shapes: tuple[tuple[int, ...], ...]
    num_bytes: int  # the packed buffer's length


@dataclass(frozen=True)
class CheckpointInfo:
    """A finished checkpoint: where it is and where the run stood."""

    path: str  # the checkpoint directory (DeepSpeed state, `policy/` safetensors export, manifest.json)
    step: int
    data_position: dict  # JSON-serialisable position in the data stream, as the driver passed it


@dataclass(frozen=True)
class StepMetrics:
    """Flat name -> value metrics of one step, as logged to MLflow."""

    step: int
    values: dict[str, float] = field(default_factory=dict)
