"""Model inputs for a micro-batch of `TrainSequence`s and the completion tokens' logprobs under a policy.

Torch only (no ray, vllm or deepspeed), used by the learner and by tests that check the learner against
plain transformers. The prompt token ids come from the rollout with the image placeholders already
expanded; the pixel values and grids are recomputed here with the checkpoint's own image processor (the
one the rollout engine used), once per pair, and the number of `<|image_pad|>` tokens is checked against
the grids, so a processor mismatch fails loudly instead of silently misaligning images and text.

Layout (packed rows): the micro-batch's sequences are laid back to back in R rows of N positions
(`pipeline.batching.pack_rows`); a row's unused tail is pad tokens. There is no attention mask: every
sequence's text positions restart at 0, and transformers turns those restarts into a block-diagonal causal
mask (SDPA) or variable-length attention (flash-attention), so a sequence attends only to itself, as if it
had a row of its own. Position ids are [4, R, N]: that text row, then Qwen2.5-VL's three mrope rows
(temporal, height, width), computed per sequence by the model's own `get_rope_index` (`rope_index`). One
sequence per row is the old right-padded layout; the learner packs more per row where the attention kernel
makes it cheaper (see `pipeline.batching`).

Layout (shared prompts, `build_shared_inputs`): one row in which each pair's prompt appears once, followed
by its completions; the model must run `pipeline.shared_prompt`'s attention, which keeps every token to what
its own sequence would show it (`completion_logprobs` refuses such inputs on any other attention).

Logprobs: only the hidden states that predict real completion tokens (K of them) reach the output head,
and the head computes log p(target) in chunks of rows (`ChunkedTokenLogprobs`), recomputing each chunk's
logits in backward, so no [K, V] (let alone [B, L, V]) float32 logits exist at once; peak is one chunk.

Vision once per pair: with a frozen vision tower the learner encodes every pair's two images once per step
(`encode_images`) and passes the features to each micro-batch (`image_embeds`), so the G completions of a
pair share one vision forward instead of running G.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.batching import pack_rows
from pipeline.shared_prompt import SHARED_PROMPT_ATTENTION, SharedPromptLayout
from pipeline.types import TrainSequence

# (input_ids [1, L], mm_token_type_ids [1, L], image_grid_thw [n, 3]) -> mrope positions [3, 1, L]
RopeIndex = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# Elements of one chunk's [rows, V] logits: 2**26 fp32 = 256 MiB (441 rows at Qwen's 152K vocabulary).
CHUNK_ELEMENTS = 2**26


@dataclass(frozen=True)
class VisionSpec:
    """What the learner needs to know about the checkpoint's image handling."""

    image_token_id: int
    pad_token_id: int
    merge_size: int  # spatial merge: one image token per merge_size**2 patches


@dataclass(frozen=True)
class PairImages:
    """One pair's processed images (image 1 then image 2)."""

    pixel_values: torch.Tensor  # [patches, C * temporal * patch * patch]
    grid_thw: torch.Tensor  # [2, 3]


def pair_key(seq: TrainSequence) -> tuple[str, bytes]:
    """Sequences with the same key share prompt and images (the G completions of one pair)."""
    return seq.pair_id, np.asarray(seq.prompt_token_ids, dtype=np.int64).tobytes()


def process_images(sequences: Sequence[TrainSequence], image_processor, spec: VisionSpec) -> dict:
    """pair_key -> PairImages, the image processor run once per pair; placeholders checked per sequence."""
    out: dict[tuple[str, bytes], PairImages] = {}
    for seq in sequences:
        key = pair_key(seq)
        if key not in out:
            processed = image_processor(images=list(seq.images), return_tensors="pt")
            out[key] = PairImages(torch.as_tensor(processed["pixel_values"]),
                                  torch.as_tensor(processed["image_grid_thw"]))
        _check_placeholders(seq, out[key].grid_thw, spec)
    return out


@dataclass
class MicroBatchInputs:
    """Tensors of one micro-batch: B sequences packed into R rows of N positions, T padded completion tokens."""

    input_ids_RN: torch.Tensor  # [R, N] int64
    position_ids_4RN: torch.Tensor  # [4, R, N] int64: text position, then mrope t, h, w
    pixel_values: torch.Tensor  # [patches of the images in row order, patch features]
    image_grid_thw: torch.Tensor  # [num images, 3], row order
    image_keys: tuple  # (pair_key, image index 0/1) of each image, row order
    positions_BT: torch.Tensor  # [B, T] flat index (row * N + column) of the state predicting each token
    targets_BT: torch.Tensor  # [B, T] completion tokens (0 on padding)
    mask_BT: torch.Tensor  # [B, T] bool, real completion tokens
    rollout_logp_BT: torch.Tensor  # [B, T] float32
    advantages_B: torch.Tensor  # [B] float32
    num_tokens: int  # real (prompt + completion) tokens
    image_embeds: tuple | None = None  # per image [tokens, hidden], row order; replaces pixel_values
    shared_prompts: SharedPromptLayout | None = None  # one row, each prompt once (build_shared_inputs)

    def to(self, device: torch.device | str, pixel_dtype: torch.dtype) -> "MicroBatchInputs":
        moved = {name: value.to(device) if isinstance(value, (torch.Tensor, SharedPromptLayout)) else value
                 for name, value in vars(self).items()}
        moved["pixel_values"] = moved["pixel_values"].to(pixel_dtype)
        return MicroBatchInputs(**moved)


def build_inputs(sequences: Sequence[TrainSequence], image_processor, spec: VisionSpec,
                 rope_index: RopeIndex | None = None, row_tokens: int | None = None,
                 images: dict | None = None) -> MicroBatchInputs:
    """Pack `sequences` into rows of at most `row_tokens` positions (None: one sequence per row, the
    right-padded layout) and stack their tensors. `rope_index`: the model's mrope (None: plain 1D positions
    in all three rows, a text-only model's); `images`: `process_images`'s result, computed here if None."""
    if not sequences:
        raise ValueError("build_inputs needs at least one sequence")
    images = images if images is not None else process_images(sequences, image_processor, spec)
    lengths = [len(s.prompt_token_ids) + len(s.completion_token_ids) for s in sequences]
    rows = pack_rows(lengths, row_tokens)
    R, N, T = len(rows), max(sum(lengths[b] for b in row) for row in rows), max(
        max(len(s.completion_token_ids) for s in sequences), 1)
    B = len(sequences)
    input_ids_RN = torch.full((R, N), spec.pad_token_id, dtype=torch.int64)
    position_ids_4RN = torch.zeros((4, R, N), dtype=torch.int64)
    positions_BT = torch.zeros((B, T), dtype=torch.int64)
    targets_BT = torch.zeros((B, T), dtype=torch.int64)
    mask_BT = torch.zeros((B, T), dtype=torch.bool)
    rollout_logp_BT = torch.zeros((B, T), dtype=torch.float32)
    image_keys = []
    for r, row in enumerate(rows):
        start = 0
        for b in row:
            seq, key = sequences[b], pair_key(sequences[b])
            P, C = len(seq.prompt_token_ids), len(seq.completion_token_ids)
            ids = torch.from_numpy(_as_int64(list(seq.prompt_token_ids) + list(seq.completion_token_ids)))
            input_ids_RN[r, start: start + P + C] = ids
            position_ids_4RN[0, r, start: start + P + C] = torch.arange(P + C)
            position_ids_4RN[1:, r, start: start + P + C] = _mrope_positions(ids, images[key].grid_thw, spec,
                                                                              rope_index)
            positions_BT[b, :C] = r * N + start + torch.arange(P - 1, P - 1 + C)
            targets_BT[b, :C] = torch.from_numpy(_as_int64(seq.completion_token_ids))
            mask_BT[b, :C] = True
            rollout_logp_BT[b, :C] = torch.as_tensor(seq.rollout_logprobs, dtype=torch.float32)
            image_keys += [(key, 0), (key, 1)]
            start += P + C
        # The tail is a "sequence" of its own (positions restart at 0): it attends only to itself.
        position_ids_4RN[:, r, start:] = torch.arange(N - start)
    pairs = [images[key] for key, i in image_keys[::2]]
    return MicroBatchInputs(
        input_ids_RN=input_ids_RN, position_ids_4RN=position_ids_4RN,
        pixel_values=torch.cat([p.pixel_values for p in pairs]),
        image_grid_thw=torch.cat([p.grid_thw for p in pairs]), image_keys=tuple(image_keys),
        positions_BT=positions_BT, targets_BT=targets_BT, mask_BT=mask_BT, rollout_logp_BT=rollout_logp_BT,
        advantages_B=torch.tensor([s.advantage for s in sequences], dtype=torch.float32),
        num_tokens=sum(lengths))


def build_shared_inputs(sequences: Sequence[TrainSequence], image_processor, spec: VisionSpec,
                        rope_index: RopeIndex | None = None, images: dict | None = None) -> MicroBatchInputs:
    """The shared-prompt layout (pipeline/shared_prompt.py): ONE row, each distinct prompt once followed by
    its completions, no padding. A completion continues its prompt's positions (text and mrope), and its
    first token is predicted by the prompt's last state, which every completion of the prompt reads."""
    if not sequences:
        raise ValueError("build_shared_inputs needs at least one sequence")
    images = images if images is not None else process_images(sequences, image_processor, spec)
    groups: dict[tuple[str, bytes], list[int]] = {}
    for b, seq in enumerate(sequences):
        groups.setdefault(pair_key(seq), []).append(b)
    lengths = [len(s.prompt_token_ids) + len(s.completion_token_ids) for s in sequences]
    N = sum(len(sequences[members[0]].prompt_token_ids) for members in groups.values()) + sum(
        len(s.completion_token_ids) for s in sequences)
    B, T = len(sequences), max(max(len(s.completion_token_ids) for s in sequences), 1)
    input_ids_N = torch.full((N,), spec.pad_token_id, dtype=torch.int64)
    position_ids_4N = torch.zeros((4, N), dtype=torch.int64)
    positions_BT = torch.zeros((B, T), dtype=torch.int64)
    targets_BT = torch.zeros((B, T), dtype=torch.int64)
    mask_BT = torch.zeros((B, T), dtype=torch.bool)
    rollout_logp_BT = torch.zeros((B, T), dtype=torch.float32)
    prompt_spans, completion_spans, image_keys = [], [], []
    start = 0
    for u, (key, members) in enumerate(groups.items()):
        prompt = _as_int64(sequences[members[0]].prompt_token_ids)
        P = len(prompt)
        prompt_spans.append((start, P))
        input_ids_N[start: start + P] = torch.from_numpy(prompt)
        position_ids_4N[0, start: start + P] = torch.arange(P)
        image_keys += [(key, 0), (key, 1)]
        prompt_last, start = start + P - 1, start + P
        for b in members:
            seq = sequences[b]
            C = len(seq.completion_token_ids)
            ids = torch.from_numpy(_as_int64(list(seq.prompt_token_ids) + list(seq.completion_token_ids)))
            mrope_3L = _mrope_positions(ids, images[key].grid_thw, spec, rope_index)
            if b == members[0]:
                position_ids_4N[1:, start - P: start] = mrope_3L[:, :P]
            input_ids_N[start: start + C] = ids[P:]
            position_ids_4N[0, start: start + C] = torch.arange(P, P + C)
            position_ids_4N[1:, start: start + C] = mrope_3L[:, P:]
            positions_BT[b, 0] = prompt_last
            positions_BT[b, 1:C] = start + torch.arange(C - 1)
            targets_BT[b, :C] = ids[P:]
            mask_BT[b, :C] = True
            rollout_logp_BT[b, :C] = torch.as_tensor(seq.rollout_logprobs, dtype=torch.float32)
            completion_spans.append((start, C, u))
            start += C
    pairs = [images[key] for key, i in image_keys[::2]]
    return MicroBatchInputs(
        input_ids_RN=input_ids_N[None], position_ids_4RN=position_ids_4N[:, None],
        pixel_values=torch.cat([p.pixel_values for p in pairs]),
        image_grid_thw=torch.cat([p.grid_thw for p in pairs]), image_keys=tuple(image_keys),
        positions_BT=positions_BT, targets_BT=targets_BT, mask_BT=mask_BT, rollout_logp_BT=rollout_logp_BT,
        advantages_B=torch.tensor([s.advantage for s in sequences], dtype=torch.float32),
        num_tokens=sum(lengths), shared_prompts=SharedPromptLayout.from_spans(prompt_spans, completion_spans))


def _mrope_positions(ids_L: torch.Tensor, grid_thw: torch.Tensor, spec: VisionSpec,
                     rope_index: RopeIndex | None) -> torch.Tensor:
    """[3, L] mrope positions of one unpadded sequence."""
    if rope_index is None:
        return torch.arange(len(ids_L)).expand(3, -1)
    mm_token_type_ids = (ids_L == spec.image_token_id).to(torch.int32)
    return rope_index(ids_L[None], mm_token_type_ids[None], grid_thw)[:, 0]


def encode_images(model, images: dict, device: torch.device | str, dtype: torch.dtype) -> dict:
    """(pair_key, image index) -> [tokens, hidden] features: ONE vision forward for all `images` (no grad:
    the tower is frozen). `model`: a transformers Qwen2.5-VL or a DeepSpeed engine wrapping one."""
    keys = list(images)
    pixels = torch.cat([images[k].pixel_values for k in keys]).to(device, dtype)
    grids = torch.cat([images[k].grid_thw for k in keys]).to(device)
    with torch.no_grad():
        features = _inner_model(model).get_image_features(pixels, grids, return_dict=True).pooler_output
    return {(key, i): features[2 * n + i] for n, key in enumerate(keys) for i in (0, 1)}


def with_image_embeds(inputs: MicroBatchInputs, features: dict) -> MicroBatchInputs:
    """`inputs` whose images are the precomputed `features` (row order) instead of pixels."""
    embeds = tuple(features[key] for key in inputs.image_keys)
    return MicroBatchInputs(**{**vars(inputs), "image_embeds": embeds})


def model_rope_index(model) -> RopeIndex:
    """The model's own mrope positions (Qwen2.5-VL's `get_rope_index`; pure index arithmetic on the config,
    no parameters, so it is safe to call outside the forward under ZeRO-3)."""
    inner = _inner_model(model)
    return lambda ids, mm_token_type_ids, grid_thw: inner.get_rope_index(
        ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=grid_thw)[0]


def _inner_model(model):
    """The transformers VLM's base model (Qwen2_5_VLModel) under a DeepSpeed engine or not."""
    return getattr(model, "module", model).model


def completion_logprobs(model, inputs: MicroBatchInputs, temperature: float = 1.0,
                        chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """log p(completion token | prefix, images) -> [B, T] float32 (0 at padding positions).

    `model`: a transformers VLM or a DeepSpeed engine wrapping one; one forward of it, whose output head is
    swapped, while inside, for `ChunkedTokenLogprobs` over the K states that predict real completion
    tokens. `temperature`: the rollout's sampling temperature, so the logprobs are those of the
    distribution the tokens were sampled from (vLLM's processed logprobs); top-p is not reproduced.
    """
    index_K = inputs.positions_BT[inputs.mask_BT]
    targets_K = inputs.targets_BT[inputs.mask_BT]
    kwargs = dict(input_ids=inputs.input_ids_RN, position_ids=inputs.position_ids_4RN, use_cache=False)
    if inputs.shared_prompts is not None:
        _check_shared_prompt_attention(model)
        kwargs["shared_prompts"] = inputs.shared_prompts
    if inputs.image_embeds is not None:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=inputs.image_embeds)}
    else:
        kwargs.update(pixel_values=inputs.pixel_values, image_grid_thw=inputs.image_grid_thw)
    with _head_computes_logprobs(model, index_K, targets_K, temperature, chunk_elements):
        logp_K = model(**kwargs).logits  # the swapped head's output: [K] float32
    return torch.zeros(inputs.mask_BT.shape, dtype=logp_K.dtype, device=logp_K.device).masked_scatter(
        inputs.mask_BT, logp_K)


@contextmanager
def _head_computes_logprobs(model, index_K: torch.Tensor, targets_K: torch.Tensor, temperature: float,
                            chunk_elements: int) -> Iterator[None]:
    """While inside, the output head maps hidden [R, N, H] to the [K] logprobs of `targets_K` at the flat
    positions `index_K`. The head module itself is still called (only its `forward` is swapped), so
    ZeRO-3's hooks gather its weight around the forward and again before its backward."""
    head = getattr(model, "module", model).get_output_embeddings()  # DeepSpeedEngine.module: the HF model

    def forward(hidden_RNH: torch.Tensor) -> torch.Tensor:
        hidden_KH = hidden_RNH.reshape(-1, hidden_RNH.shape[-1]).index_select(0, index_K)
        rows = max(1, chunk_elements // head.weight.shape[0])
        return ChunkedTokenLogprobs.apply(hidden_KH, head.weight, head.bias, targets_K, temperature, rows)

    head.forward = forward  # an instance attribute: nn.Module.__call__ runs it inside the hooks
    try:
        yield
    finally:
        del head.forward


class ChunkedTokenLogprobs(torch.autograd.Function):
    """logp_K[k] = log_softmax(hidden_KH[k] @ weight_VH.T + bias_V) / temperature)[targets_K[k]], float32,
    `rows` hidden states at a time; backward recomputes each chunk's logits (nothing [K, V] is saved):
    d logp_k / d logits_k = (onehot(target_k) - softmax_k) / temperature."""

    @staticmethod
    def forward(ctx, hidden_KH, weight_VH, bias_V, targets_K, temperature: float, rows: int):
        logp_K = torch.empty(hidden_KH.shape[0], dtype=_accumulation_dtype(weight_VH), device=hidden_KH.device)
        for s in range(0, hidden_KH.shape[0], rows):
            logits_CV = _chunk_logits(hidden_KH[s: s + rows], weight_VH, bias_V, temperature)
            logp_K[s: s + rows] = torch.log_softmax(logits_CV, dim=-1).gather(-1, targets_K[s: s + rows, None])[:, 0]
        ctx.save_for_backward(hidden_KH, weight_VH, bias_V, targets_K)
        ctx.temperature, ctx.rows = temperature, rows
        device = hidden_KH.device.type  # backward recomputes under the forward's autocast, if any
        ctx.autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        return logp_K

    @staticmethod
    def backward(ctx, grad_K):
        device = grad_K.device.type
        with torch.autocast(device, dtype=ctx.autocast or torch.float32, enabled=ctx.autocast is not None):
            return ChunkedTokenLogprobs._backward(ctx, grad_K)

    @staticmethod
    def _backward(ctx, grad_K):
        hidden_KH, weight_VH, bias_V, targets_K = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden_KH) if need_h else None
        acc = _accumulation_dtype(weight_VH)
        grad_w = torch.zeros(weight_VH.shape, dtype=acc, device=weight_VH.device) if need_w else None
        grad_b = torch.zeros(bias_V.shape, dtype=acc, device=bias_V.device) if need_b else None
        for s in range(0, hidden_KH.shape[0], ctx.rows):
            h_CH, g_C, t_C = hidden_KH[s: s + ctx.rows], grad_K[s: s + ctx.rows], targets_K[s: s + ctx.rows]
            d_CV = torch.softmax(_chunk_logits(h_CH, weight_VH, bias_V, ctx.temperature), dim=-1)
            d_CV.mul_(-g_C[:, None]).scatter_add_(1, t_C[:, None], g_C[:, None]).div_(ctx.temperature)
            if need_h:
                grad_h[s: s + ctx.rows] = (d_CV.to(weight_VH.dtype) @ weight_VH).to(grad_h.dtype)
            if need_w:
                grad_w.add_((d_CV.to(h_CH.dtype).T @ h_CH).to(acc))
            if need_b:
                grad_b.add_(d_CV.sum(0))
        return (grad_h, grad_w.to(weight_VH.dtype) if need_w else None,
                grad_b.to(bias_V.dtype) if need_b else None, None, None, None)


def _accumulation_dtype(weight_VH: torch.Tensor) -> torch.dtype:
    """float32 for half-precision (and fp32) heads; float64 stays float64."""
    return torch.promote_types(weight_VH.dtype, torch.float32)


def _chunk_logits(hidden_CH, weight_VH, bias_V, temperature: float) -> torch.Tensor:
    """[C, V] logits / temperature in at least float32 (the matmul in the weights' dtype, like the head's)."""
    logits_CV = torch.nn.functional.linear(hidden_CH.to(weight_VH.dtype), weight_VH, bias_V)
    logits_CV = logits_CV.to(_accumulation_dtype(weight_VH))
    return logits_CV / temperature if temperature != 1.0 else logits_CV


def _check_shared_prompt_attention(model) -> None:
    """Any other attention would read the shared-prompt row as one sequence: completions seeing each other."""
    found = _inner_model(model).language_model.config._attn_implementation
    if found != SHARED_PROMPT_ATTENTION:
        raise ValueError(f"shared-prompt inputs need the text model's attention to be {SHARED_PROMPT_ATTENTION!r} "
                         f"(pipeline.shared_prompt.use_shared_prompt_attention), not {found!r}")


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
