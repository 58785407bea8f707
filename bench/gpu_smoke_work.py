"""The work of bench.gpu_smoke's learner sections: the batch, the plain-PyTorch reference step, the learner
config. Kept apart so bench/gpu_smoke.py stays a list of checks; needs torch and transformers only."""

from __future__ import annotations

import time
from typing import Any

import numpy as np


def make_batch(ctx: dict):
    """`ctx['pairs']` pairs x G completions of max_new/2..max_new random tokens (cached in ctx; the reference
    section replaces its rollout logprobs by the plain forward's)."""
    if "batch" in ctx:
        return ctx["batch"]
    from transformers import AutoProcessor

    from pipeline.prompts import reasoner_prompt
    from pipeline.synthetic import synthetic_pairs
    from pipeline.types import TrainBatch, TrainSequence

    processor = AutoProcessor.from_pretrained(ctx["model_path"])
    group = 4 if ctx["tiny"] else ctx["cfg"].rollout.group_size
    rng = np.random.default_rng(0)
    top = len(processor.tokenizer) - 20  # ordinary tokens (the special ones sit at the start)
    sequences = []
    for pair in synthetic_pairs(seed=0, count=ctx["pairs"], image_size=56 if ctx["tiny"] else 448):
        prompt = processor(text=[reasoner_prompt(pair.prompt)], images=[pair.image_1, pair.image_2],
                           return_tensors="np")["input_ids"][0].astype(np.int64)
        for g in range(group):
            n = int(rng.integers(ctx["max_new"] // 2, ctx["max_new"] + 1))
            sequences.append(TrainSequence(
                pair_id=pair.pair_id, completion_index=g, prompt_token_ids=prompt,
                completion_token_ids=rng.integers(20, 20 + top, size=n).astype(np.int64),
                rollout_logprobs=np.zeros(n, np.float32), advantage=float(rng.choice([-1.0, 1.0])),
                images=(pair.image_1, pair.image_2)))
    ctx["batch"] = TrainBatch(step=0, policy_version=0, sequences=tuple(sequences))
    return ctx["batch"]


def learner_config(ctx: dict, ds_defaults: bool = False):
    """configs/qwen25vl_7b.yaml's learner on one rank (tiny: a budget that still makes 2+ micro-batches);
    `ds_defaults`: DeepSpeed's own ZeRO-3 buckets and thresholds instead of the config's."""
    from pipeline.config import LearnerConfig

    update: dict[str, Any] = {"num_ranks": 1, "num_cpus": 1, "num_gpus": 1 if ctx["device"].type == "cuda" else 0}
    if ctx["tiny"]:
        update["micro_batch_tokens"] = 1024
    if ds_defaults:
        fields = LearnerConfig.model_fields
        update.update({name: fields[name].default for name in (
            "zero3_persistence_threshold", "zero3_prefetch_bucket_size", "zero3_max_live_parameters",
            "reduce_bucket_size")})
    return ctx["cfg"].learner.model_copy(update=update)


class PlainStep:
    """The reference: one plain transformers model, fp32 master weights, bf16 autocast where the device has
    it, gradient checkpointing, fused AdamW (CUDA), the learner's inputs and loss, one optimizer step per
    batch over the same micro-batches as the learner's."""

    def __init__(self, ctx: dict, batch) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        from actors.learner_setup import attention_kwargs
        from pipeline.logprobs import VisionSpec

        self.ctx, self.device, cfg = ctx, ctx["device"], ctx["cfg"]
        self.learner = learner_config(ctx)
        half = "bfloat16" if self.device.type == "cuda" else "float32"
        self.autocast = dict(device_type=self.device.type, dtype=torch.bfloat16, enabled=half == "bfloat16")
        model = AutoModelForImageTextToText.from_pretrained(ctx["model_path"], dtype=torch.float32,
                                                            **attention_kwargs(self.device, half))
        self.model = model.to(self.device)
        self.model.model.visual.requires_grad_(False)
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=self.learner.lr, fused=self.device.type == "cuda")
        processor = AutoProcessor.from_pretrained(ctx["model_path"])
        config = AutoConfig.from_pretrained(ctx["model_path"])
        self.image_processor = processor.image_processor
        self.spec = VisionSpec(config.image_token_id, int(processor.tokenizer.pad_token_id),
                               int(processor.image_processor.merge_size))
        self.temperature = cfg.rollout.temperature
        ctx["batch"] = self._with_plain_logprobs(batch, processor)
        ctx["plain_logprobs"] = True
        self.batch = ctx["batch"]
        self.tokens = sum(len(s.prompt_token_ids) + len(s.completion_token_ids) for s in self.batch.sequences)
        self.micro_batches = 0

    def _with_plain_logprobs(self, batch, processor):
        """The batch whose rollout logprobs are each sequence's alone, full logits (no packing, no chunks)."""
        import dataclasses

        import torch

        out = []
        self.model.eval()
        for seq in batch.sequences:
            ids = torch.as_tensor(np.concatenate([seq.prompt_token_ids, seq.completion_token_ids]))[None]
            images = processor.image_processor(images=list(seq.images), return_tensors="pt")
            with torch.no_grad(), torch.autocast(**self.autocast):
                logits = self.model(input_ids=ids.to(self.device), use_cache=False,
                                    pixel_values=images["pixel_values"].to(self.device),
                                    image_grid_thw=images["image_grid_thw"].to(self.device),
                                    mm_token_type_ids=(ids == self.spec.image_token_id).to(torch.int32).to(
                                        self.device)).logits
            P, C = len(seq.prompt_token_ids), len(seq.completion_token_ids)
            logp = torch.log_softmax(logits[0, P - 1: P - 1 + C].float() / self.temperature, -1)
            target = torch.as_tensor(seq.completion_token_ids, device=self.device)[:, None]
            out.append(dataclasses.replace(seq, rollout_logprobs=logp.gather(-1, target)[:, 0].cpu().numpy()))
            del logits, logp
        self.model.train()
        return dataclasses.replace(batch, sequences=tuple(out))

    def step(self) -> float:
        """One optimizer step on the batch; its seconds (device synchronised)."""
        import torch

        from pipeline.batching import plan_micro_batches, row_tokens_for
        from pipeline.grpo import LossNormalizer, grpo_loss
        from pipeline.logprobs import (build_inputs, completion_logprobs, encode_images, model_rope_index,
                                       process_images, with_image_embeds)

        start = time.perf_counter()
        sequences, algo = self.batch.sequences, self.ctx["cfg"].algo
        lengths = [len(s.prompt_token_ids) + len(s.completion_token_ids) for s in sequences]
        plan = plan_micro_batches(lengths, 1, self.learner.micro_batch_tokens)[0]
        normalizer = LossNormalizer.from_lengths([len(s.completion_token_ids) for s in sequences],
                                                 max_tokens=self.ctx["max_new"])
        images = process_images(sequences, self.image_processor, self.spec)
        with torch.autocast(**self.autocast):
            features = encode_images(self.model, images, self.device, torch.float32)
        row_tokens = row_tokens_for(self.model.config._attn_implementation, self.learner.micro_batch_tokens)
        for micro in plan:
            inputs = build_inputs([sequences[i] for i in micro], self.image_processor, self.spec,
                                  model_rope_index(self.model), row_tokens, images)
            inputs = with_image_embeds(inputs.to(self.device, torch.float32), features)
            with torch.autocast(**self.autocast):
                logp_BT = completion_logprobs(self.model, inputs, self.temperature)
            loss, _ = grpo_loss(logp_BT, inputs.rollout_logp_BT, inputs.advantages_B, inputs.mask_BT, normalizer,
                                eps_low=algo.eps_low, eps_high=algo.eps_high, loss_agg=algo.loss_agg)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.learner.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.micro_batches = len(plan)
        return time.perf_counter() - start

    def close(self) -> None:
        del self.model, self.optimizer, self.params


def plain_step_runner(ctx: dict, batch) -> PlainStep:
    return PlainStep(ctx, batch)
