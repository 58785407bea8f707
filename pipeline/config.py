"""The run configuration: typed pydantic models loaded from YAML, with dotted command-line overrides.

    cfg = load_config("configs/tiny_cpu.yaml", ["learner.lr=1e-6", "trainer.steps=2"])

Unknown keys and wrong types raise `ConfigError` with one line naming the key and the file. Every field
is typed, defaulted and documented; builders take the sub-config they need, not the whole run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny_cpu.yaml"


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ModelConfig(_Section):
    reasoner: str = Field("tiny://reasoner", description="Policy checkpoint: local dir, hub id, or tiny://ROLE "
                          "(a tiny random Qwen2.5-VL built offline under trainer.output_dir on first use).")
    listener: str = Field("tiny://listener", description="Frozen listener checkpoint: same forms as reasoner.")
    trust_remote_code: bool = Field(False, description="Allow checkpoint code to run; off unless asked.")
    min_pixels: int = Field(3136, gt=0, description="Processor lower bound on image pixels (56x56).")
    max_pixels: int = Field(12544, gt=0, description="Processor upper bound on image pixels (112x112).")

    @model_validator(mode="after")
    def _pixel_bounds(self) -> "ModelConfig":
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) > max_pixels ({self.max_pixels})")
        return self


SyntheticTask = Literal["match", "render", "render-ood", "render-saturated", "render-white"]  # pipeline/synthetic.py


class DataConfig(_Section):
    source: str = Field("synthetic", description="'synthetic', a dataset hub id, or a local path (a file, or a "
                        "copy of a hub repository as snapshot_download lays it out: docs/evaluation.md 'Hub layouts').")
    pairs_per_step: int = Field(4, gt=0, description="Preference pairs per GRPO step.")
    eval_pairs: int = Field(32, ge=0, description="Held-out pairs scored every trainer.eval_every steps.")
    eval_split: str = Field("test", description="Split of the held-out pairs (synthetic: another seed).")
    image_size: int = Field(56, gt=0, description="Side of synthetic images, in pixels.")
    synthetic_task: SyntheticTask = Field(
        "match", description="Synthetic pairs: 'match' (the rejected image changes the prompt's colour or "
        "shape) or 'render' (it shows the shape in grey, a failed render); see pipeline/synthetic.py.")
    ood_task: SyntheticTask | Literal[""] = Field(
        "", description="Also evaluate (eval_ood/*) on held-out pairs of this synthetic task, e.g. 'render-ood' "
        "(colours no training task uses), next to eval/*; '' = off.")
    seed: int = Field(0, description="Seed of data order and of the per-pair image-order swap.")
    split: str = Field("train", description="Dataset split to train on.")
    subset: str = Field("", description="Dataset config name on the hub; for ImageRewardDB's train split '1k', "
                        "'2k', '4k' or '8k' chooses the train folders to read; '' = default (all).")
    format: Literal["auto", "imagereward", "hpdv2", "pickapic", "rapidata", "local"] = Field(
        "auto", description="Row schema; 'auto' infers it from the hub id or the column names.")
    streaming: bool = Field(False, description="Stream the dataset instead of downloading it (large sets).")
    shuffle_buffer: int = Field(1000, gt=0, description="Shuffle buffer (rows) when streaming.")
    tie_policy: Literal["skip", "random"] = Field("skip", description="Pairs people rated equal (Pick-a-Pic "
                                                  "0.5/0.5, equal votes): skip and count, or a seeded coin.")
    max_image_pixels: int = Field(4096 * 4096, gt=0, description="Rows with a larger image are skipped as "
                                  "oversized (before decoding); kept images are resized into model pixel bounds.")


class EngineConfig(_Section):
    enforce_eager: bool = Field(True, description=(
        "vLLM: no torch.compile and no CUDA graphs: fast engine start. false compiles (vLLM's own default): on "
        "the 2-core CPU benchmark (BENCHMARKS.md) steps 5-9% faster for 12-23 s more start-up: worth it "
        "for a run of a few hundred steps or more."))
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="vLLM dtype; 'auto' is bfloat16 where the hardware runs it fast (a GPU with bf16, "
        "a CPU with AVX512_BF16 or AMX) and float32 otherwise (actors/engine.py resolve_dtype).")
    max_model_len: int = Field(1024, gt=0, description="vLLM context length.")
    kv_cache_gib: int = Field(1, gt=0, description="CPU KV cache size (VLLM_CPU_KVCACHE_SPACE).")
    block_size: int | None = Field(None, gt=0, description="vLLM KV-cache block size in tokens. Prefix caching "
                                   "shares whole blocks: the G completions of a pair (and the listener's reads of "
                                   "them) share their prompt's KV only in the blocks it fills. None: vLLM's default "
                                   "on a GPU (16); on a CPU 32, the smallest its attention takes (its default, "
                                   "128, is longer than a pair's prompt, so nothing was shared; actors/engine.py "
                                   "resolve_block_size).")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="GPU fraction for vLLM (GPU only).")
    tensor_parallel_size: int = Field(1, gt=0, description="vLLM tensor parallel size (GPU only); only 1 runs "
                                      "today (pipeline/placement.py refuses more: one GPU per engine actor).")


class RolloutConfig(_Section):
    num_workers: int = Field(1, gt=0, description="Reasoner rollout workers (data parallel over pairs).")
    group_size: int = Field(4, gt=0, description="Completions sampled per pair (G).")
    max_new_tokens: int = Field(32, gt=0, description="Generation budget per completion.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    num_cpus: float = Field(1, ge=0, description="CPUs per rollout worker.")
    num_gpus: float = Field(0, ge=0, description="GPUs per rollout worker.")
    resource: str = Field("rollout", description="Ray custom resource rollout workers ask for (one unit each).")
    max_restarts: int = Field(3, ge=0, description="Rollout worker deaths survived per run before it stops.")
    restart_timeout_s: float = Field(300.0, gt=0, description="How long to wait for a restarted worker.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="vLLM engine arguments.")


class AutoscaleConfig(_Section):
    """The listener pool sizing itself from its own backlog (pipeline/autoscale.py has the rule)."""

    enabled: bool = Field(False, description="Let the pool resize itself between min_workers and max_workers.")
    min_workers: int = Field(1, gt=0, description="The pool never shrinks itself below this.")
    max_workers: int = Field(4, gt=0, description="The pool never grows itself above this, and `scale-listeners` "
                             "refuses more; on KubeRay keep it <= the listener group's maxReplicas.")
    target_backlog_per_worker: float = Field(8.0, gt=0, description="Requests queued or in flight per worker the "
                                             "pool aims for (the peak since the last check): more grows it, "
                                             "less shrinks it after scale_down_cooldown_s.")
    interval_s: float = Field(5.0, gt=0, description="How often the pool checks its backlog.")
    scale_up_cooldown_s: float = Field(30.0, ge=0, description="No growth sooner than this after a resize.")
    scale_down_cooldown_s: float = Field(300.0, ge=0, description="Shrink only after the backlog has wanted "
                                         "fewer workers for this long (longer than a GRPO step's quiet part).")
    resize_timeout_s: float = Field(900.0, gt=0, description="How long a growth (autoscaled, or manual with no "
                                    "timeout of its own) waits for the new engines "
                                    "(on KubeRay: for new listener pods) before it gives them up and keeps "
                                    "the workers that came up.")
    override_hold_s: float = Field(600.0, ge=0, description="After a manual `scale-listeners`, the pool keeps "
                                   "that size this long before autoscaling resumes.")

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscaleConfig":
        if self.min_workers > self.max_workers:
            raise ValueError(f"min_workers ({self.min_workers}) > max_workers ({self.max_workers})")
        return self


class ListenerConfig(_Section):
    num_workers: int = Field(1, gt=0, description="Listener engines in the pool (resizable live); with "
                             "autoscale.enabled, the size it starts at, within [min_workers, max_workers].")
    max_in_flight: int = Field(64, gt=0, description="Score requests in flight per listener (backpressure); "
                               "the requests a worker holds go to its engine as one call, so a cap far below a "
                               "step's completions splits the scoring into many small calls.")
    num_cpus: float = Field(1, ge=0, description="CPUs per listener.")
    num_gpus: float = Field(0, ge=0, description="GPUs per listener.")
    resource: str = Field("listener", description="Ray custom resource the pool asks for, so it scales alone.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="vLLM engine arguments.")
    autoscale: AutoscaleConfig = Field(default_factory=AutoscaleConfig, description="The pool resizing itself.")

    @model_validator(mode="after")
    def _start_within_bounds(self) -> "ListenerConfig":
        bounds = self.autoscale
        if bounds.enabled and not bounds.min_workers <= self.num_workers <= bounds.max_workers:
            raise ValueError(f"num_workers ({self.num_workers}) outside autoscale [min_workers, max_workers] = "
                             f"[{bounds.min_workers}, {bounds.max_workers}]")
        return self


class RewardConfig(_Section):
    w_format: float = Field(1.0, description="Weight of the format reward.")
    w_accuracy: float = Field(0.5, description="Weight of the accuracy reward.")
    w_listener: float = Field(0.5, description="Weight of the listener reward; 0 turns the listener off.")
    center_listener: bool = Field(False, description="Use p_listener - 0.5 instead of p_listener.")
    listener_signal: Literal["listener", "oracle", "placebo"] = Field(
        "listener", description="What the listener term rewards (docs/listener.md): 'listener' its p(preferred); "
        "'oracle' the fraction of the two images the reasoning describes as they are (synthetic data only); "
        "'placebo' the listener's p shuffled across the step's completions (same distribution, no information).")
    log_faithfulness: bool = Field(False, description="Also log reward/faithful, the oracle faithfulness of "
                                   "the reasoning's image descriptions, whatever the signal (synthetic data only).")
    drop_zero_variance: bool = Field(True, description="Drop groups whose rewards are all equal.")


class AlgoConfig(_Section):
    advantage_scaling: Literal["group", "batch", "none"] = Field("group", description="Std used to scale "
                                                                  "advantages; 'none' is Dr. GRPO.")
    eps_low: float = Field(0.2, ge=0, description="Lower clip of the ratio: 1 - eps_low.")
    eps_high: float = Field(0.28, ge=0, description="Upper clip of the ratio: 1 + eps_high.")
    dual_clip: float | None = Field(None, gt=1, description="Dual-clip bound c for negative advantages.")
    tis_cap: float | None = Field(None, gt=0, description="Truncated importance-sampling cap for the "
                                  "learner/rollout logprob mismatch; None disables the correction.")
    kl_coef: float = Field(0.0, ge=0, description="KL-to-reference coefficient; 0 loads no reference.")
    kl_estimator: Literal["k1", "k3"] = Field("k3", description="KL estimator.")
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "constant"] = Field(
        "token_mean", description="Loss aggregation; 'constant' is Dr. GRPO's fixed normaliser.")


class LearnerConfig(_Section):
    num_ranks: int = Field(1, gt=0, description="DeepSpeed data-parallel ranks.")
    zero_stage: Literal[0, 2, 3] = Field(3, description="DeepSpeed ZeRO stage: 3 partitions parameters, gradients "
                                         "and optimizer state over the ranks (large models); 2 gradients and "
                                         "optimizer state; 0 replicates everything (fastest on one rank: no "
                                         "partitioning hooks or flat buffers).")
    lr: float = Field(1e-5, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    decay_steps: int = Field(0, ge=0, description="Cosine decay of the lr over this many steps after the "
                             "warm-up, down to lr * min_lr_ratio (then held there); 0 keeps it constant.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Where the cosine decay ends, as a fraction of lr.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Training dtype: bfloat16/float16 are mixed precision (half-precision weights, "
        "fp32 master weights and fp32 gradient accumulation); auto is bfloat16 where the GPU or the CPU "
        "(AVX512_BF16/AMX) runs it fast, else float32. bf16 costs a logprob gap to the fp32 path of about "
        "0.004 nats (mid, bench/results/learner_step.json); float32 matches fp32 rollout engines to 1e-5.")
    offload_optimizer: bool = Field(False, description="Optimizer state offload to CPU (zero_stage 2 or 3).")
    grad_clip: float = Field(1.0, gt=0, description="Gradient norm clip.")
    micro_batch_tokens: int = Field(4096, gt=0, description="Token budget of one micro-batch.")
    share_prompts: bool = Field(True, description="Run each pair's prompt (its text and image tokens) once per "
                                "micro-batch and let all its completions attend to it (pipeline/shared_prompt.py): "
                                "the same logprobs and gradients through fewer tokens (bench.e2e mid: 27.6k -> "
                                "16.8k positions a step). Where the learner's attention is SDPA (CPUs, GPUs without "
                                "flash-attention); with flash-attention each micro-batch is one packed row.")
    activation_checkpointing: bool = Field(False, description="Recompute activations in backward.")
    freeze_vision: bool = Field(True, description="Keep the vision tower frozen.")
    zero3_persistence_threshold: int = Field(100_000, ge=0, description="ZeRO-3 keeps parameters with fewer "
                                             "elements than this unpartitioned on every rank (DeepSpeed's "
                                             "default); 0 partitions everything.")
    zero3_prefetch_bucket_size: int = Field(50_000_000, ge=0, description="ZeRO-3: parameter elements "
                                            "fetched ahead of use (DeepSpeed's default).")
    zero3_max_live_parameters: int = Field(1_000_000_000, ge=0, description="ZeRO-3: gathered parameter "
                                           "elements kept on a rank before release (DeepSpeed's default).")
    reduce_bucket_size: int = Field(500_000_000, gt=0, description="ZeRO-2/3: gradient elements reduced "
                                    "per bucket (DeepSpeed's default).")
    num_cpus: float = Field(1, ge=0, description="CPUs per learner rank.")
    num_gpus: float = Field(0, ge=0, description="GPUs per learner rank.")
    resource: str = Field("learner", description="Ray custom resource learner ranks ask for (one unit each).")
    placement: Literal["strict_pack", "pack", "none"] = Field(
        "pack", description="Placement group of the learner ranks (pipeline/placement.py): strict_pack = all on "
        "one node (NVLink for ZeRO-3's gathers; the run waits until one node holds them all), pack = one node "
        "if possible, none = wherever Ray puts them.")

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> "LearnerConfig":
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 2 or 3 (ZeRO-Offload), got 0")
        return self


class SyncConfig(_Section):
    transport: Literal["auto", "shared_memory", "object_store", "collective", "nccl"] = Field(
        "auto", description="How weights reach the rollout workers: shared_memory (same node, no "
        "serialisation), object_store (Ray; CUDA buckets hop through pinned host memory), collective "
        "(gloo/NCCL broadcast to the Ray actors), nccl (vLLM's weight-transfer engine, GPU learner and GPU "
        "engines); auto: nccl when the learner and the rollout workers have GPUs, else shared_memory when every "
        "rollout worker is on learner rank 0's node, else object_store (actors/weight_sync.py plan_transport).")
    bucket_mb: float = Field(64.0, gt=0, description="Weight-sync bucket size in MiB.")


class TrainerConfig(_Section):
    steps: int = Field(3, gt=0, description="GRPO steps to run.")
    output_dir: str = Field("runs/tiny", description="Checkpoints, tiny models and local metrics go here.")
    seed: int = Field(0, description="Global seed (engines, learner, data).")
    checkpoint_every: int = Field(1, gt=0, description="Checkpoint every K steps.")
    keep_checkpoints: int = Field(2, gt=0, description="Keep the last N checkpoints.")
    startup_timeout_s: float = Field(1800.0, gt=0, description="How long a run on an existing cluster "
                                     "(`ray job submit`) waits for the autoscaler to provide its actors' "
                                     "resources, and then for the engines to come up, before it stops with "
                                     "one line naming the resources it could not find.")
    sample_table_every: int = Field(1, gt=0, description="Log a table of sample completions every N steps.")
    eval_every: int = Field(0, ge=0, description="Greedy held-out accuracy (eval/accuracy) every N steps and "
                            "at the end; 0 turns it off.")
    max_staleness: int = Field(0, ge=0, le=1, description="Policy versions a trained group may lag the learner: "
                               "0 = on-policy, the stages one after the other; 1 = one step off-policy, the "
                               "rollout workers and the listener work on step t+1 while the learner trains on "
                               "step t and syncs (the loss's ratio to the rollout logprobs, or algo.tis_cap, "
                               "corrects the lag).")


class TrackingConfig(_Section):
    experiment: str = Field("listener-grpo", description="MLflow experiment name.")
    run_name: str = Field("", description="MLflow run name; empty picks one.")
    tracking_uri: str = Field("", description="MLflow URI; empty uses MLFLOW_TRACKING_URI, else "
                              "sqlite:///./mlflow.db. Credentials come from the environment only.")


class RunConfig(_Section):
    """The whole run."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="Checkpoints.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training data.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Reasoner rollout workers.")
    listener: ListenerConfig = Field(default_factory=ListenerConfig, description="Listener pool.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Reward weights.")
    algo: AlgoConfig = Field(default_factory=AlgoConfig, description="GRPO loss and advantages.")
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="DeepSpeed learner.")
    sync: SyncConfig = Field(default_factory=SyncConfig, description="Weight sync.")
    trainer: TrainerConfig = Field(default_factory=TrainerConfig, description="Loop, seeds, checkpoints.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow.")

    @model_validator(mode="after")
    def _oracle_needs_synthetic(self) -> "RunConfig":
        if self.data.source != "synthetic" and (self.reward.listener_signal == "oracle" or self.reward.log_faithfulness):
            raise ValueError("reward.listener_signal=oracle and reward.log_faithfulness read the images' true "
                             f"descriptions, which only data.source=synthetic has (got {self.data.source!r})")
        return self


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load YAML (the embedded default when `path` is None), apply `key=value` overrides, validate."""
    source = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        raw = yaml.safe_load(source.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections")
    for override in overrides:
        _apply_override(raw, override)
    return validate_config(raw, origin=str(source))


def validate_config(raw: dict[str, Any], origin: str = "<config>") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{origin}: {_first_error(exc)}") from None


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    key = ".".join(str(part) for part in error["loc"]) or "<root>"
    if error["type"] == "extra_forbidden":
        return f"unknown key '{key}'"
    given = f" (got {error['input']!r})" if "input" in error and not isinstance(error["input"], dict) else ""
    return f"key '{key}': {error['msg']}{given}"


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, value_text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{override}': expected key=value, e.g. learner.lr=1e-6")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{override}': '{part}' is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(value_text) if value_text.strip() else ""


def config_to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flatten_config(cfg: RunConfig) -> dict[str, str]:
    """Dotted key -> value string, e.g. for MLflow params."""
    flat: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for name, child in node.items():
                walk(f"{prefix}.{name}" if prefix else name, child)
        else:
            flat[prefix] = str(node)

    walk("", cfg.model_dump(mode="json"))
    return flat
