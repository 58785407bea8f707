"""Model inputs for a micro-batch of `TrainSequence`s and the completion tokens' logprobs under a policy.

Torch only (no ray, vllm or deepspeed), used by the learner and by tests that check the learner against
plain transformers. The prompt token ids come from the rollout with the image placeholders already
expanded; the pixel values and grids are recomputed here with the checkpoint's own image processor (the
one the rollout engine used), and the number of `<|image_pad|>` tokens is checked against the grids, so a
processor mismatch fails loudly instead of silently misaligning images and text.

Layout: sequences are right-padded to the longest `prompt + completion`; completion token t of sequence b
is predicted by the hidden state at position `P_b - 1 + t`, and only those B x T hidden states go through
the output head (no logits for prompt positions). Qwen2.5-VL's 3D rope positions are computed by the
model from `input_ids`, `mm_token_type_ids` (1 on image tokens) and `image_grid_thw`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.types import TrainSequence


@dataclass(frozen=True)
class VisionSpec:
    """What the learner needs to know about the checkpoint's image handling."""

    image_token_id: int
    pad_token_id: int
    merge_size: int  # spatial merge: one image token per merge_size**2 patches


@dataclass
class MicroBatchInputs:
    """Tensors of one micro-batch (B sequences, L padded positions, T padded completion tokens)."""

    input_ids_BL: torch.Tensor  # [B, L] int64
    attention_mask_BL: torch.Tensor  # [B, L] int64
    mm_token_type_ids_BL: torch.Tensor  # [B, L] int32, 1 on image tokens
    pixel_values: torch.Tensor  # [sum of patches, C * temporal * patch * patch]
    image_grid_thw: torch.Tensor  # [num images, 3]
    positions_BT: torch.Tensor  # [B, T] index of the logits predicting each completion token
    targets_BT: torch.Tensor  # [B, T] completion tokens (0 on padding)
    mask_BT: torch.Tensor  # [B, T] bool, real completion tokens
    rollout_logp_BT: torch.Tensor  # [B, T] float32
    advantages_B: torch.Tensor  # [B] float32

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask_BL.sum())

    def to(self, device: torch.device | str, pixel_dtype: torch.dtype) -> "MicroBatchInputs":
        moved = {name: value.to(device) for name, value in vars(self).items()}
        moved["pixel_values"] = moved["pixel_values"].to(pixel_dtype)
        return MicroBatchInputs(**moved)


def build_inputs(sequences: Sequence[TrainSequence], image_processor, spec: VisionSpec) -> MicroBatchInputs:
    """Pad and stack `sequences`; process their images (image 1 then image 2 of each, in order)."""
    if not sequences:
        raise ValueError("build_inputs needs at least one sequence")
    pixels, grids = [], []
    for seq in sequences:
        processed = image_processor(images=list(seq.images), return_tensors="pt")
        _check_placeholders(seq, processed["image_grid_thw"], spec)
        pixels.append(processed["pixel_values"])
        grids.append(processed["image_grid_thw"])
    prompt_lens = [len(s.prompt_token_ids) for s in sequences]
    comp_lens = [len(s.completion_token_ids) for s in sequences]
    B, L, T = len(sequences), max(p + c for p, c in zip(prompt_lens, comp_lens)), max(max(comp_lens), 1)
    input_ids_BL = torch.full((B, L), spec.pad_token_id, dtype=torch.int64)
    attention_mask_BL = torch.zeros((B, L), dtype=torch.int64)
    positions_BT = torch.zeros((B, T), dtype=torch.int64)
    targets_BT = torch.zeros((B, T), dtype=torch.int64)
    mask_BT = torch.zeros((B, T), dtype=torch.bool)
    rollout_logp_BT = torch.zeros((B, T), dtype=torch.float32)
    for b, seq in enumerate(sequences):
        P, C = prompt_lens[b], comp_lens[b]
        input_ids_BL[b, : P + C] = torch.from_numpy(
            _as_int64(list(seq.prompt_token_ids) + list(seq.completion_token_ids)))
        attention_mask_BL[b, : P + C] = 1
        positions_BT[b, :C] = torch.arange(P - 1, P - 1 + C)
        targets_BT[b, :C] = torch.from_numpy(_as_int64(seq.completion_token_ids))
        mask_BT[b, :C] = True
        rollout_logp_BT[b, :C] = torch.as_tensor(seq.rollout_logprobs, dtype=torch.float32)
    return MicroBatchInputs(
        input_ids_BL=input_ids_BL,
        attention_mask_BL=attention_mask_BL,
        mm_token_type_ids_BL=(input_ids_BL == spec.image_token_id).to(torch.int32),
        pixel_values=torch.cat(pixels),
        image_grid_thw=torch.cat(grids),
        positions_BT=positions_BT,
        targets_BT=targets_BT,
        mask_BT=mask_BT,
        rollout_logp_BT=rollout_logp_BT,
        advantages_B=torch.tensor([s.advantage for s in sequences], dtype=torch.float32),
    )


def completion_logprobs(model, inputs: MicroBatchInputs, temperature: float = 1.0) -> torch.Tensor:
    """log p(completion token | prefix, images) -> [B, T] float32 (padding positions hold junk: mask them).

    `model`: a transformers VLM or a DeepSpeed engine wrapping one. Its output head (lm_head) sees only the
    B x T hidden states that predict completion tokens, so no [B, L, V] logits are materialised for the
    prompt (a [B, L, V] fp32 tensor is most of a micro-batch's activation memory when V >> hidden size).

    `temperature`: the rollout's sampling temperature, so the logprobs are those of the distribution the
    tokens were sampled from (vLLM's processed logprobs); top-p truncation is not reproduced.
    """
    with _head_reads_positions(model, inputs.positions_BT):
        out = model(
            input_ids=inputs.input_ids_BL,
            attention_mask=inputs.attention_mask_BL,
            mm_token_type_ids=inputs.mm_token_type_ids_BL,
            pixel_values=inputs.pixel_values,
            image_grid_thw=inputs.image_grid_thw,
            use_cache=False,
        )
    logits_BTV = out.logits.float()  # only completion positions go to fp32
    if temperature != 1.0:
        logits_BTV = logits_BTV / temperature
    return torch.log_softmax(logits_BTV, dim=-1).gather(-1, inputs.targets_BT.unsqueeze(-1)).squeeze(-1)


@contextmanager
def _head_reads_positions(model, positions_BT: torch.Tensor) -> Iterator[None]:
    """While inside, the model's output head gets hidden[b, positions_BT[b, t]] ([B, T, H]) as its input.

    A pre-hook rather than calling the decoder and the head separately: the model runs as one forward of
    the (DeepSpeed) module, whose ZeRO-3 hooks fetch and release parameters around each submodule and
    trace one forward per step; the gather is differentiable, so gradients reach the decoder as before.
    """
    head = getattr(model, "module", model).get_output_embeddings()  # DeepSpeedEngine.module: the HF model

    def select(_head, args):
        hidden_BLH = args[0]
        index_BTH = positions_BT.unsqueeze(-1).expand(-1, -1, hidden_BLH.shape[-1])
        return (hidden_BLH.gather(1, index_BTH), *args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def _check_placeholders(seq: TrainSequence, grid_thw: torch.Tensor, spec: VisionSpec) -> None:
    expected = int(grid_thw.prod(dim=-1).sum()) // spec.merge_size**2
    found = int((torch.as_tensor(_as_int64(seq.prompt_token_ids)) == spec.image_token_id).sum())
    if found != expected:
        raise ValueError(
            f"pair {seq.pair_id} completion {seq.completion_index}: the prompt has {found} image tokens but "
            f"the processor makes {expected} for these images; the learner and the rollout must use the same "
            f"processor settings (min_pixels/max_pixels)")


def _as_int64(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)
