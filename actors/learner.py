"""The DeepSpeed learner: W ranks, one torch.distributed world, one GRPO step per `train_step`.

`LearnerRank` is a plain class (one process, one rank); `LearnerGroup` makes W Ray actors of it that
form one world (gloo on CPU, NCCL on GPU, picked from the device; MASTER_ADDR 127.0.0.1 when every rank
shares a node, else rank 0's IP; a free port found on rank 0's node) and fans every call out to all ranks.

    group = LearnerGroup(model_path, cfg.learner, cfg.algo, seed=0, max_new_tokens=32, temperature=1.0)
    metrics = group.train_step(batch)                         # StepMetrics of the whole batch
    report = group.sync_weights(rollout_workers, version, cfg.sync)   # WeightVersion
    info = group.save_checkpoint(root, step, data_position, keep=2)   # CheckpointInfo
    info = group.load_checkpoint(info.path)                   # restores model, optimizer, scheduler, RNG
    group.train_step(batch, objective="sft")                  # NLL of the completions (format warm start)
    group.export_policy(out_dir)                              # a loadable HF checkpoint of the policy

One step: every rank plans the same micro-batches (`pipeline.batching`) and takes its row; each
micro-batch recomputes the completion tokens' logprobs (`pipeline.logprobs`) and adds its contribution
to the batch loss (`pipeline.grpo.grpo_loss`, normalised by counts of the WHOLE batch). Less work per step:
with SDPA attention (`learner.share_prompts`, CPUs and GPUs without flash-attention) a micro-batch is one
row in which each pair's prompt appears once and all its completions attend to it
(`pipeline.shared_prompt`; micro-batches planned by pair: `plan_shared_micro_batches`); with
flash-attention, or `share_prompts` off, its sequences are packed into rows without padding between them
(`pipeline.batching.pack_rows`); with the vision tower frozen, each pair's images go through the image
processor and the tower once per step and their features serve the pair's G completions in every
micro-batch; the output head computes the completion tokens' logprobs in chunks, never a [tokens,
vocabulary] float32 tensor.

Precision (`learner.dtype`, `auto` resolved per machine; actors/learner_setup.py holds the engine's setup):
float32, or bf16/fp16 mixed precision with fp32 master weights and fp32 gradient accumulation
(`deepspeed_config`). On a GPU AdamW is torch's fused kernel and the CUDA allocator uses expandable segments;
`offload_optimizer` never JIT-builds DeepSpeed's CPU Adam (`make_optimizer`).

Gradient scaling (why the loss is multiplied by `world_size`): we want the gradient of the full-batch
loss, i.e. the SUM of the contributions' gradients over micro-batches and ranks. We call
`engine.backward(loss, scale_wrt_gas=False)`, so DeepSpeed does not divide by gradient_accumulation_steps,
and mark the last micro-batch as the accumulation boundary ourselves (the micro-batch count changes from
step to step); DeepSpeed's gradient reduction (ZeRO-3's reduce-scatter, stage 0/2's all-reduce) AVERAGES
over the W data-parallel ranks, so each contribution is multiplied by W first. Gradient clipping then sees
the full-batch gradient.

ZeRO stage (`learner.zero_stage`): 3 partitions parameters over the ranks (gathered per module in every
forward and backward, and by the weight sync and the export); 2 partitions gradients and optimizer state
only; 0 replicates everything. On one rank there is nothing to partition and stage 3 only adds its
per-module hooks and gathers, so the CPU configs use 0; large models on several GPUs need 3. The frozen
reference is partitioned like the policy under 3 and a plain stage-0 engine otherwise.

Logprobs are scored at the rollout's sampling `temperature` (pass `cfg.rollout.temperature`), matching the
rollout engine's processed logprobs; top-p truncation is not reproduced.

Old logprobs (choice): with `algo.tis_cap` unset, the ratio is taken against the rollout engine's
logprobs (the behaviour policy that sampled the tokens, as in PPO); with `tis_cap` set, against the
learner's own detached logprobs (one update per batch, so they are "before this step's updates") and the
rollout logprobs enter as the TIS weight. The reference model is built only when `algo.kl_coef > 0`.

Tests: `pytest -m integration tests/integration/test_learner.py` (2 ranks on gloo, about 2 min on 2 cores);
`pytest -m gpu tests/gpu` (NCCL, needs CUDA).
"""

from __future__ import annotations

import os
import random
import time
from typing import Any, Literal

from actors.engine import intra_op_threads
from actors.learner_setup import (attention_kwargs, deepspeed_config, lr_multiplier, make_optimizer,
                                   resolve_learner_dtype, skip_shm_allreduce_build)
from pipeline.batching import plan_micro_batches, plan_shared_micro_batches, row_tokens_for
from pipeline.config import AlgoConfig, LearnerConfig, SyncConfig
from pipeline.grpo import LossNormalizer, aggregate, combine_metrics, grpo_loss, sft_loss
from pipeline.logprobs import (VisionSpec, build_inputs, build_shared_inputs, completion_logprobs, encode_images,
                               model_rope_index, pair_key, process_images, with_image_embeds)
from pipeline.shared_prompt import use_shared_prompt_attention
from pipeline.types import CheckpointInfo, StepMetrics, TrainBatch, TrainSequence, WeightVersion

# "grpo": the clipped policy loss on the sequences' advantages; "sft": the negative log-likelihood of the
# completions (advantages and rollout logprobs unused), for the format warm start (`python -m pipeline sft`).
Objective = Literal["grpo", "sft"]


class LearnerRank:
    """One DeepSpeed rank. Construct, then `setup(master_addr, master_port)` on every rank at once."""

    def __init__(self, model_path: str, learner: LearnerConfig, algo: AlgoConfig, rank: int, world_size: int,
                 seed: int = 0, max_new_tokens: int = 32, temperature: float = 1.0,
                 trust_remote_code: bool = False, processor_kwargs: dict[str, int] | None = None) -> None:
        self.model_path, self.cfg, self.algo = str(model_path), learner, algo
        self.trust_remote_code = trust_remote_code  # ModelConfig.trust_remote_code: off unless asked
        # The run's pixel bounds, the same ones vLLM gets (mm_processor_kwargs): else an image near the bound
        # could get another number of vision tokens here than in the engine that sampled it.
        self.processor_kwargs = dict(processor_kwargs or {})
        self.rank, self.world_size, self.seed, self.max_new_tokens = rank, world_size, seed, max_new_tokens
        self.temperature = temperature if temperature > 0 else 1.0  # greedy rollouts: no rescaling
        self.engine: Any = None
        self.ref_engine: Any = None
        self.share_prompts = False  # decided with the attention kernel (_build_engine)
        self._transports: dict[tuple, Any] = {}

    # ---- set-up -----------------------------------------------------------------------------------

    def node_address(self) -> tuple[str, str, int]:
        """(node id, node IP, a free port on this node) for the rendezvous."""
        import ray

        from actors.weight_group import free_port

        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), free_port()

    def setup(self, master_addr: str, master_port: int) -> None:
        """Join the world and build the DeepSpeed engine(s) (and the reference when kl_coef > 0)."""
        # Before the first CUDA allocation: segments that grow in place instead of fragmenting the cache
        # between micro-batches of different lengths.
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        import torch

        cuda = torch.cuda.is_available()
        self.dtype = resolve_learner_dtype(self.cfg.dtype)
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")  # before deepspeed is imported
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")  # Ray gives each rank its own GPU
        torch.set_num_threads(intra_op_threads(self.cfg.num_cpus))  # Ray sets OMP_NUM_THREADS=1 in actors
        import deepspeed

        if not cuda:
            skip_shm_allreduce_build()
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False)
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        seed_everything(self.seed)
        self._load_processor()
        self.engine = self._build_engine(with_optimizer=True)
        if self.algo.kl_coef > 0:
            self.ref_engine = self._build_engine(with_optimizer=False)

    def _load_processor(self) -> None:
        from transformers import AutoConfig, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(self.model_path, trust_remote_code=self.trust_remote_code,
                                                       **self.processor_kwargs)
        config = AutoConfig.from_pretrained(self.model_path, trust_remote_code=self.trust_remote_code)
        tokenizer = self.processor.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.vision = VisionSpec(image_token_id=config.image_token_id, pad_token_id=int(pad),
                                 merge_size=int(self.processor.image_processor.merge_size))

    def _build_engine(self, with_optimizer: bool):
        import deepspeed
        import torch
        from transformers import AutoModelForImageTextToText
        from transformers.integrations import HfDeepSpeedConfig

        config = deepspeed_config(self.cfg, self.world_size, with_optimizer, self.dtype)
        self._hf_ds_config = HfDeepSpeedConfig(config)  # must exist (and stay referenced) before from_pretrained
        attention = attention_kwargs(self.device, self.dtype)
        # Shared prompts need SDPA underneath; flash-attention's varlen packing is kept where it runs.
        self.share_prompts = self.cfg.share_prompts and "attn_implementation" not in attention
        model = AutoModelForImageTextToText.from_pretrained(
            self.model_path, dtype=getattr(torch, self.dtype), trust_remote_code=self.trust_remote_code,
            **attention)
        if self.share_prompts:
            use_shared_prompt_attention(model)
        if not with_optimizer:
            model.requires_grad_(False)
            engine, *_ = deepspeed.initialize(model=model, config=config)
            engine.module.eval()
            return engine
        if self.cfg.freeze_vision:
            vision_tower(model).requires_grad_(False)
        if self.cfg.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], self.cfg,
                                   cuda=self.device.type == "cuda")
        cfg = self.cfg
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(
            step, cfg.warmup_steps, cfg.decay_steps, cfg.min_lr_ratio))
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=config)
        return engine

    # ---- one GRPO step ------------------------------------------------------------------------------

    def train_step(self, batch: TrainBatch, objective: Objective = "grpo") -> StepMetrics:
        """One optimizer step on the whole batch; every rank returns the same batch-level metrics."""
        start = time.perf_counter()
        sequences = batch.sequences
        if not sequences:
            raise ValueError(f"step {batch.step}: empty TrainBatch")
        plan = self._plan(sequences)
        normalizer = LossNormalizer.from_lengths([len(s.completion_token_ids) for s in sequences],
                                                 max_tokens=self.max_new_tokens)
        lr = float(self.engine.get_lr()[0])
        self.engine.train()
        # Empty slots re-run sequence 0 (below): its images are needed too.
        stand_in = [sequences[0]] if any(not micro for micro in plan) else []
        images = process_images([sequences[i] for micro in plan for i in micro] + stand_in,
                                self.processor.image_processor, self.vision)  # once per pair
        features: dict | None = {} if self.cfg.freeze_vision else None
        parts: list[dict[str, float]] = []
        tokens = positions = 0
        own_norm = None
        for index, micro in enumerate(plan):
            last = index == len(plan) - 1
            self.engine.set_gradient_accumulation_boundary(last)
            # An empty slot re-runs sequence 0 with zero weight: the ranks' collectives must stay in step.
            chosen = [sequences[i] for i in micro] or [sequences[0]]
            loss, metrics, n_tokens, n_positions = self._micro_step(chosen, normalizer, real=bool(micro),
                                                                    objective=objective, images=images,
                                                                    features=features)
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            if last and self.cfg.zero_stage == 0:  # DeepSpeed's fp32 stage 0 clips without reporting the norm
                own_norm = grad_norm_of(self.engine.module)
            self.engine.step()
            if micro:
                parts.append(metrics)
                tokens += n_tokens
                positions += n_positions
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = own_norm if grad_norm is None else grad_norm
        values = self._reduce_metrics(parts, tokens, positions)
        seconds = time.perf_counter() - start
        values.update(grad_norm=float(grad_norm if grad_norm is not None else float("nan")), lr=lr,
                      step_seconds=seconds, tokens_per_s=values["tokens"] / seconds,
                      completion_tokens=float(batch.num_completion_tokens), sequences=float(len(sequences)),
                      micro_batches=float(len(plan)))
        return StepMetrics(step=batch.step, values=values)

    def _plan(self, sequences: tuple[TrainSequence, ...]) -> list[tuple[int, ...]]:
        """This rank's micro-batches (sequence indices), planned alike on every rank."""
        if self.share_prompts:
            return plan_shared_micro_batches(
                [len(s.prompt_token_ids) for s in sequences], [len(s.completion_token_ids) for s in sequences],
                [pair_key(s) for s in sequences], self.world_size, self.cfg.micro_batch_tokens)[self.rank]
        lengths = [len(s.prompt_token_ids) + len(s.completion_token_ids) for s in sequences]
        return plan_micro_batches(lengths, self.world_size, self.cfg.micro_batch_tokens)[self.rank]

    def _encode_new_pairs(self, sequences: list[TrainSequence], images: dict, features: dict) -> None:
        """Add to `features` (frozen tower) the micro-batch's pairs not encoded yet this step, so each pair's
        images go through the tower once and serve its G completions in every micro-batch. Exactly one
        vision forward per micro-batch (the first pair again when none is new, a 2-image forward): every
        rank then makes the same calls (ZeRO-3 gathers are collective) and ZeRO-3's recorded module order
        is the same for every micro-batch, so its prefetching stays on."""
        import torch

        keys = list(dict.fromkeys(pair_key(s) for s in sequences))
        new = [key for key in keys if (key, 0) not in features] or keys[:1]
        features.update(encode_images(self.engine, {key: images[key] for key in new}, self.device,
                                      getattr(torch, self.dtype)))

    def _micro_step(self, sequences: list[TrainSequence], normalizer: LossNormalizer, real: bool,
                    objective: Objective = "grpo", images: dict | None = None, features: dict | None = None):
        """(loss contribution, metrics, real tokens, positions run) of one micro-batch."""
        import torch

        if self.share_prompts:
            inputs = build_shared_inputs(sequences, self.processor.image_processor, self.vision,
                                         model_rope_index(self.engine), images)
        else:
            row_tokens = row_tokens_for(self.engine.module.config._attn_implementation, self.cfg.micro_batch_tokens)
            inputs = build_inputs(sequences, self.processor.image_processor, self.vision,
                                  model_rope_index(self.engine), row_tokens, images)
        inputs = inputs.to(self.device, pixel_dtype=getattr(torch, self.dtype))
        if features is not None:
            self._encode_new_pairs(sequences, images, features)
            inputs = with_image_embeds(inputs, features)
        positions = inputs.input_ids_RN.numel()
        logp_BT = completion_logprobs(self.engine, inputs, self.temperature)
        ref_logp_BT = None
        if self.ref_engine is not None:  # also on empty slots: the reference's gathers are collective too
            with torch.no_grad():
                ref_logp_BT = completion_logprobs(self.ref_engine, inputs, self.temperature)
        if not real:
            return logp_BT.sum() * 0.0, {}, 0, 0
        if objective == "sft":
            loss = sft_loss(logp_BT, inputs.mask_BT, normalizer)
            return loss, {"loss": float(loss.detach())}, inputs.num_tokens, positions
        rollout_BT = inputs.rollout_logp_BT
        old_BT = logp_BT.detach() if self.algo.tis_cap is not None else rollout_BT
        loss, metrics = grpo_loss(
            logp_BT, old_BT, inputs.advantages_B, inputs.mask_BT, normalizer,
            eps_low=self.algo.eps_low, eps_high=self.algo.eps_high, dual_clip=self.algo.dual_clip,
            rollout_logp_BT=rollout_BT, tis_cap=self.algo.tis_cap, ref_logp_BT=ref_logp_BT,
            kl_coef=self.algo.kl_coef, kl_estimator=self.algo.kl_estimator, loss_agg=self.algo.loss_agg)
        # |learner - engine| logprob gap of the sampled tokens (a token mean, additive like grpo's metrics).
        metrics["learner_rollout_logp_diff"] = aggregate(
            (logp_BT.detach() - rollout_BT).abs(), inputs.mask_BT, normalizer, "token_mean")
        metrics["loss"] = loss.detach()
        return loss, {k: float(v) for k, v in metrics.items()}, inputs.num_tokens, positions

    def _reduce_metrics(self, parts: list[dict[str, float]], tokens: int, positions: int) -> dict[str, float]:
        """Combine the micro-batches' metrics over all ranks (grpo's additive/min/max rules). `tokens`: the
        sequences' own (prompt + completion each); `positions`: what the model ran, padding included and each
        shared prompt once, so `positions / tokens` is what the layout costs (< 1: prompts shared)."""
        import torch.distributed as dist

        mine = {**combine_metrics(parts), "tokens": float(tokens), "positions": float(positions)}
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, mine)
        return combine_metrics(everyone)

    # ---- weights and checkpoints --------------------------------------------------------------------

    def sync_weights(self, workers: list[Any], version: int, sync: SyncConfig) -> WeightVersion | None:
        """All ranks gather; rank 0 sends to `workers` and returns the report (others None)."""
        from actors.weight_sync import make_transport, resolve_transport, sync_weights

        transport, name = None, sync.transport
        if self.rank == 0:
            key = (sync.transport, tuple(w._actor_id.hex() for w in workers))
            if key not in self._transports:  # the collective group is formed once per worker set
                name = resolve_transport(sync.transport, workers)  # auto: by where the workers are
                self._transports[key] = (name, make_transport(name, workers))
            name, transport = self._transports[key]
        return sync_weights(self.engine.module, transport, version, int(sync.bucket_mb * 2**20), name)

    def reset_transports(self) -> None:
        """Drop cached transports: the next sync forms a new group with the workers' current processes."""
        for _, transport in self._transports.values():
            transport.close()
        self._transports = {}

    def gathered_state_dict(self, include_frozen: bool = True) -> dict[str, Any] | None:
        """Rank 0: checkpoint name -> numpy copy of every (trainable) parameter; for tests and tools."""
        from actors.weight_sync import iter_gathered_buckets

        state: dict[str, Any] = {}
        for named in iter_gathered_buckets(self.engine.module, 64 * 2**20, include_frozen=include_frozen):
            if self.rank == 0:
                state.update({name: t.detach().float().cpu().numpy().copy() for name, t in named})
        return state if self.rank == 0 else None

    def save_checkpoint(self, root: str, step: int, data_position: dict, keep: int,
                        run_config: str = "") -> CheckpointInfo:
        from actors.checkpoint import save_checkpoint

        return save_checkpoint(self.engine, self.processor, root, step, data_position, keep,
                               rank=self.rank, model_path=self.model_path, run_config=run_config)

    def load_checkpoint(self, path: str) -> CheckpointInfo:
        from actors.checkpoint import load_checkpoint

        return load_checkpoint(self.engine, path, rank=self.rank)

    def export_policy(self, out: str) -> str:
        """All ranks: write the current policy as a loadable HF checkpoint into `out` (rank 0 writes)."""
        from pathlib import Path

        from actors.checkpoint import export_policy

        export_policy(self.engine.module, self.processor, Path(out), rank=self.rank, base_path=self.model_path)
        return str(out)


def vision_tower(model):
    """The vision encoder of a transformers VLM (Qwen2.5-VL: `model.model.visual`)."""
    for owner in (getattr(model, "model", None), model):
        for name in ("visual", "vision_tower", "vision_model"):
            if owner is not None and hasattr(owner, name):
                return getattr(owner, name)
    raise ValueError(f"{type(model).__name__}: no vision tower found to freeze")


def grad_norm_of(model) -> float:
    """2-norm of the model's (already all-reduced) gradients, before clipping."""
    import torch

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class LearnerGroup:
    """W `LearnerRank` Ray actors forming one world; every method fans out to all ranks."""

    def __init__(self, model_path: str, learner: LearnerConfig, algo: AlgoConfig, *, seed: int = 0,
                 max_new_tokens: int = 32, temperature: float = 1.0, trust_remote_code: bool = False,
                 actor_options: dict[str, Any] | None = None,
                 processor_kwargs: dict[str, int] | None = None) -> None:
        import ray

        options = actor_options if actor_options is not None else {
            "num_cpus": learner.num_cpus, "num_gpus": learner.num_gpus, "resources": {learner.resource: 1}}
        remote = ray.remote(LearnerRank).options(**options)
        W = learner.num_ranks
        self.ranks = [remote.remote(model_path, learner, algo, rank, W, seed, max_new_tokens, temperature,
                                    trust_remote_code, processor_kwargs) for rank in range(W)]
        addresses = ray.get([rank.node_address.remote() for rank in self.ranks])
        node0, ip0, port = addresses[0]
        master = "127.0.0.1" if all(node == node0 for node, _, _ in addresses) else ip0
        ray.get([rank.setup.remote(master, port) for rank in self.ranks])

    def _all(self, method: str, *args: Any) -> list[Any]:
        """Call `method` on every rank; raise as soon as any rank fails (its peers may be stuck in a
        collective waiting for it, so waiting for all of them could hang)."""
        import ray

        refs = [getattr(rank, method).remote(*args) for rank in self.ranks]
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)  # re-raises a rank's error (RayActorError when it died)
        return ray.get(refs)

    def reset_transports(self) -> None:
        """Forget the weight-sync process groups (after a rollout worker restarted in a new process)."""
        self._all("reset_transports")

    def train_step(self, batch: TrainBatch, objective: Objective = "grpo") -> StepMetrics:
        import ray

        return self._all("train_step", ray.put(batch), objective)[0]  # one batch copy in the object store

    def sync_weights(self, workers: list[Any], version: int, sync: SyncConfig) -> WeightVersion:
        return self._all("sync_weights", list(workers), version, sync)[0]

    def gathered_state_dict(self, include_frozen: bool = True) -> dict[str, Any]:
        return self._all("gathered_state_dict", include_frozen)[0]

    def save_checkpoint(self, root: str, step: int, data_position: dict, keep: int,
                        run_config: str = "") -> CheckpointInfo:
        return self._all("save_checkpoint", str(root), step, data_position, keep, run_config)[0]

    def load_checkpoint(self, path: str) -> CheckpointInfo:
        return self._all("load_checkpoint", str(path))[0]

    def export_policy(self, out: str) -> str:
        return self._all("export_policy", str(out))[0]

    def shutdown(self) -> None:
        import ray

        for rank in self.ranks:
            ray.kill(rank)
        self.ranks = []
