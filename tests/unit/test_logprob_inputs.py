"""Micro-batch tensors for the learner (pipeline/logprobs.py), with a stand-in image processor."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.logprobs import (ChunkedTokenLogprobs, VisionSpec, build_inputs, completion_logprobs, encode_images,
                               model_rope_index, process_images, with_image_embeds)
from pipeline.types import TrainSequence

IMG, PAD = 9, 0
SPEC = VisionSpec(image_token_id=IMG, pad_token_id=PAD, merge_size=2)


def fake_image_processor(images, return_tensors):
    # each image: grid 1 x 2 x 2 -> 4 patches -> 4 / merge_size**2 = 1 image token
    return {"pixel_values": torch.ones(4 * len(images), 3), "image_grid_thw": torch.tensor([[1, 2, 2]] * len(images))}


def _seq(prompt: list[int], completion: list[int], advantage: float = 1.0) -> TrainSequence:
    image = Image.new("RGB", (4, 4))
    return TrainSequence(pair_id="p", completion_index=0, prompt_token_ids=np.array(prompt),
                         completion_token_ids=np.array(completion), rollout_logprobs=-np.arange(len(completion)) - 1.0,
                         advantage=advantage, images=(image, image))


def test_padded_layout_positions_targets_and_masks() -> None:
    inputs = build_inputs([_seq([5, IMG, IMG, 6], [7, 8]), _seq([5, IMG, IMG], [4, 3, 2], -1.0)],
                          fake_image_processor, SPEC)  # row_tokens None: one sequence per row
    assert inputs.input_ids_RN.tolist() == [[5, IMG, IMG, 6, 7, 8], [5, IMG, IMG, 4, 3, 2]]
    assert inputs.position_ids_4RN[0].tolist() == [[0, 1, 2, 3, 4, 5]] * 2  # text positions
    # completion token t of sequence b is predicted at flat position b * N + P_b - 1 + t (N = 6)
    assert inputs.positions_BT.tolist() == [[3, 4, 0], [6 + 2, 6 + 3, 6 + 4]]
    assert inputs.targets_BT.tolist() == [[7, 8, 0], [4, 3, 2]]
    assert inputs.mask_BT.tolist() == [[True, True, False], [True, True, True]]
    assert inputs.rollout_logp_BT.tolist() == [[-1, -2, 0], [-1, -2, -3]]
    assert inputs.advantages_B.tolist() == [1.0, -1.0]
    assert inputs.image_grid_thw.shape == (4, 3) and inputs.pixel_values.shape == (16, 3)
    assert inputs.num_tokens == 12


def test_packed_rows_restart_positions_and_pad_the_tail_as_its_own_block() -> None:
    long, a, b = _seq([5, IMG, IMG, 6, 6], [7, 8, 9]), _seq([IMG, IMG], [4]), _seq([IMG, IMG, 1], [2])
    inputs = build_inputs([long, a, b], fake_image_processor, SPEC, row_tokens=0)  # rows of <= 8 tokens
    # 8 = the longest; a (3) + b (4) = 7 share row 1, whose last position is padding
    assert inputs.input_ids_RN.tolist() == [[5, IMG, IMG, 6, 6, 7, 8, 9], [IMG, IMG, 4, IMG, IMG, 1, 2, PAD]]
    assert inputs.position_ids_4RN[0].tolist() == [list(range(8)), [0, 1, 2, 0, 1, 2, 3, 0]]
    # no rope_index: the three mrope rows are the text positions
    assert torch.equal(inputs.position_ids_4RN[1], inputs.position_ids_4RN[0])
    # a's token 4 is predicted at row 1 column 1 = 8 + 1; b's token 2 at row 1 column 3 + 2 = 8 + 5
    assert inputs.positions_BT.tolist() == [[4, 5, 6], [8 + 1, 0, 0], [8 + 5, 0, 0]]
    assert inputs.image_keys == tuple((key, i) for key in
                                      (("p", long.prompt_token_ids.tobytes()), ("p", a.prompt_token_ids.tobytes()),
                                       ("p", b.prompt_token_ids.tobytes())) for i in (0, 1))
    assert inputs.num_tokens == 15 and inputs.input_ids_RN.numel() == 16


def test_rope_index_fills_the_three_mrope_rows_per_sequence() -> None:
    calls = []

    def rope_index(ids, mm_token_type_ids, grid):
        calls.append((ids.tolist(), mm_token_type_ids.tolist(), grid.shape))
        return (100 + torch.arange(ids.shape[1])).expand(3, 1, -1)

    inputs = build_inputs([_seq([IMG, IMG], [4]), _seq([IMG, IMG, 1], [2])], fake_image_processor, SPEC,
                          rope_index=rope_index, row_tokens=10)
    assert calls == [([[IMG, IMG, 4]], [[1, 1, 0]], (2, 3)), ([[IMG, IMG, 1, 2]], [[1, 1, 0, 0]], (2, 3))]
    assert inputs.position_ids_4RN[1:, 0].tolist() == [[100, 101, 102, 100, 101, 102, 103]] * 3


def test_the_image_processor_runs_once_per_pair() -> None:
    calls = []

    def counting(images, return_tensors):
        calls.append(len(images))
        return fake_image_processor(images, return_tensors)

    group = [_seq([IMG, IMG, 1], [2 + g]) for g in range(4)]  # one pair, G = 4
    other = dataclasses.replace(_seq([IMG, IMG, 1], [3]), pair_id="q")
    images = process_images(group + [other], counting, SPEC)
    assert calls == [2, 2] and len(images) == 2
    inputs = build_inputs(group + [other], counting, SPEC, images=images)
    assert calls == [2, 2] and inputs.pixel_values.shape == (5 * 2 * 4, 3)  # 5 sequences x 2 images x 4 patches


def test_right_padding_uses_the_pad_id() -> None:
    inputs = build_inputs([_seq([IMG, IMG, 1], [2]), _seq([IMG, IMG, 1, 1, 1], [2])], fake_image_processor, SPEC)
    assert inputs.input_ids_RN[0].tolist() == [IMG, IMG, 1, 2, PAD, PAD]
    assert inputs.position_ids_4RN[0, 0].tolist() == [0, 1, 2, 3, 0, 1]  # the tail restarts: its own block


def test_placeholder_count_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="image tokens"):
        build_inputs([_seq([5, IMG, 6], [7])], fake_image_processor, SPEC)  # 1 placeholder, images need 2


class HeadModel(torch.nn.Module):
    """A stand-in VLM: `hidden(L)` gives the [1, L, 5] hidden states, an identity lm_head makes them logits;
    `head_inputs` records the shapes the head was called with."""

    def __init__(self, hidden) -> None:
        super().__init__()
        self.hidden = hidden
        self.lm_head = torch.nn.Linear(5, 5, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.eye(5))
        self.head_inputs: list[tuple[int, ...]] = []

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head

    def forward(self, input_ids, **_):
        hidden = self.hidden(input_ids.shape[1])
        self.head_inputs.append(tuple(hidden.shape))
        return type("Out", (), {"logits": self.lm_head(hidden)})


def test_completion_logprobs_gathers_the_predicting_positions() -> None:
    inputs = build_inputs([_seq([IMG, IMG, 1], [3, 2])], fake_image_processor, SPEC)

    def favour(L):  # the hidden state at position i favours token (i + 1) % 5 by 10 nats
        hidden = torch.zeros(1, L, 5)
        hidden[0, torch.arange(L), (torch.arange(L) + 1) % 5] = 10.0
        return hidden

    model = HeadModel(favour)
    logp = completion_logprobs(model, inputs)
    favoured = torch.log_softmax(torch.tensor([10.0, 0, 0, 0, 0]), 0)
    # token 3 is predicted at position 2 (favours 3); token 2 at position 3 (favours 4)
    assert logp[0].tolist() == pytest.approx([favoured[0].item(), favoured[1].item()])
    assert model.head_inputs == [(1, 5, 5)]  # the decoder ran on all 5 positions ...
    assert "forward" not in vars(model.lm_head)  # ... and the head's own forward is back


def test_output_head_yields_only_the_real_completion_tokens_logprobs() -> None:
    # B=2, N=6, T=3 with 5 real completion tokens: the head returns those 5 logprobs, never [B, N, V] logits
    inputs = build_inputs([_seq([5, IMG, IMG, 6], [1, 2]), _seq([5, IMG, IMG], [4, 3, 2])], fake_image_processor, SPEC)
    seen: list[tuple] = []
    model = HeadModel(lambda L: torch.zeros(2, L, 5))
    model.lm_head.register_forward_hook(lambda _m, args, out: seen.append((tuple(args[0].shape), tuple(out.shape))))
    logp = completion_logprobs(model, inputs)
    assert seen == [((2, 6, 5), (5,))] and logp.shape == (2, 3)
    expected = torch.full((2, 3), -np.log(5.0), dtype=torch.float32)  # uniform over 5 tokens ...
    expected[0, 2] = 0.0  # ... and 0 where there is no token
    assert torch.allclose(logp, expected)


def test_temperature_scales_the_logits() -> None:
    inputs = build_inputs([_seq([IMG, IMG, 1], [3])], fake_image_processor, SPEC)
    model = HeadModel(lambda L: torch.arange(5.0).expand(1, L, 5))
    logp = completion_logprobs(model, inputs, temperature=2.0)
    assert logp[0, 0].item() == pytest.approx(torch.log_softmax(torch.arange(5.0) / 2.0, 0)[3].item())


def test_chunked_token_logprobs_equal_the_full_log_softmax_values_and_gradients() -> None:
    """K = 7 states, V = 11, H = 5, float64: every chunking (1, 3 and all 7 rows per chunk) gives the full
    log_softmax's values and the same gradients for hidden states, weight and bias."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    weight = torch.randn(11, 5, generator=gen, dtype=torch.float64)
    bias = torch.randn(11, generator=gen, dtype=torch.float64)
    targets = torch.tensor([0, 10, 3, 3, 7, 1, 5])
    upstream = torch.randn(7, generator=gen, dtype=torch.float64)  # a loss that weighs tokens unequally

    def run(fn):
        h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
        logp = fn(h, w, b)
        (logp * upstream).sum().backward()
        return logp.detach(), h.grad, w.grad, b.grad

    full = run(lambda h, w, b: torch.log_softmax((h @ w.T + b) / 0.7, -1).gather(-1, targets[:, None])[:, 0])
    for rows in (1, 3, 7):
        chunked = run(lambda h, w, b: ChunkedTokenLogprobs.apply(h, w, b, targets, 0.7, rows))
        for got, want in zip(chunked, full):
            torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-9)


def test_chunked_logprobs_keep_no_vocabulary_sized_tensor_for_backward() -> None:
    """What autograd saves for backward through the head: the K x H states, the weight and the targets,
    never a K x V logits or softmax tensor (K = 40 > H = 8, so K x V would be the largest)."""
    K, H, V = 40, 8, 50
    hidden = torch.randn(K, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    saved: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        logp = ChunkedTokenLogprobs.apply(hidden, weight, None, torch.zeros(K, dtype=torch.int64), 1.0, 16)
    assert logp.shape == (K,) and saved and all(s != (K, V) and (len(s) < 2 or s[1] != V) for s in saved), saved
    logp.sum().backward()
    assert hidden.grad.shape == (K, H) and weight.grad.shape == (V, H)


# ---- the real tiny Qwen2.5-VL: layouts, vision once per pair, dtype -----------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_reasoner_dir):
    """Model (fp32, eval), processor, spec and 4 sequences of 2 pairs (G = 2) whose lengths (308, 99, 103,
    102 tokens) let the packed layout put the three short ones, of both pairs, in one row of <= 308."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from pipeline.prompts import reasoner_prompt
    from pipeline.synthetic import synthetic_pairs

    processor = AutoProcessor.from_pretrained(tiny_reasoner_dir)
    config = AutoConfig.from_pretrained(tiny_reasoner_dir)
    spec = VisionSpec(image_token_id=config.image_token_id, pad_token_id=0,
                      merge_size=processor.image_processor.merge_size)
    rng = np.random.default_rng(0)
    sequences = []
    for index, pair in enumerate(synthetic_pairs(seed=0, count=2)):
        prompt = processor(text=[reasoner_prompt(pair.prompt + " x" * index)], images=[pair.image_1, pair.image_2],
                           return_tensors="np")["input_ids"][0]
        for g, length in enumerate([(2 * len(prompt) + 20, 3), (5, 4)][index]):
            completion = rng.integers(20, 200, size=length)  # ordinary text tokens of the tiny vocabulary
            sequences.append(TrainSequence(
                pair_id=pair.pair_id, completion_index=g, prompt_token_ids=prompt, completion_token_ids=completion,
                rollout_logprobs=-rng.random(length), advantage=[1.0, -0.5][g] * (1 + index),
                images=(pair.image_1, pair.image_2)))
    model = AutoModelForImageTextToText.from_pretrained(tiny_reasoner_dir, dtype=torch.float32).eval()
    return model, processor, spec, sequences


def _per_sequence_reference(model, processor, sequences, temperature: float) -> torch.Tensor:
    """[B, T]: each sequence alone through transformers, full [1, L, V] logits, log_softmax, gather."""
    rows = []
    for seq in sequences:
        ids = torch.as_tensor(np.concatenate([seq.prompt_token_ids, seq.completion_token_ids]))[None]
        images = processor.image_processor(images=list(seq.images), return_tensors="pt")
        logits = model(input_ids=ids, pixel_values=images["pixel_values"], image_grid_thw=images["image_grid_thw"],
                       mm_token_type_ids=(ids == model.config.image_token_id).to(torch.int32), use_cache=False).logits
        P, C = len(seq.prompt_token_ids), len(seq.completion_token_ids)
        logp = torch.log_softmax(logits[0, P - 1: P - 1 + C].float() / temperature, -1)
        rows.append(logp.gather(-1, torch.as_tensor(seq.completion_token_ids)[:, None])[:, 0])
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)


def _loss_and_grads(model, logprobs_fn, inputs, sequences):
    from pipeline.grpo import LossNormalizer, grpo_loss

    normalizer = LossNormalizer.from_lengths([len(s.completion_token_ids) for s in sequences], max_tokens=128)
    model.zero_grad()
    logp_BT = logprobs_fn()
    loss, _ = grpo_loss(logp_BT, inputs.rollout_logp_BT, inputs.advantages_B, inputs.mask_BT, normalizer,
                        eps_low=0.2, eps_high=0.28)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logp_BT.detach(), loss.detach(), grads


def _assert_same(got, want, mask) -> None:
    torch.testing.assert_close(got[0][mask], want[0][mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-7)
    assert got[2].keys() == want[2].keys() and any("layers" in n for n in got[2])
    for name in got[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("row_tokens, rows", [(None, 4), (0, 2), (100_000, 1)])
def test_tiny_qwen_packed_and_padded_layouts_equal_each_sequence_alone(tiny, row_tokens, rows) -> None:
    """Padded (one sequence per row), packed within the longest (the CPU layout: the three short sequences,
    of both pairs, share a row) and one packed row (the flash-attention layout): logprobs, GRPO loss and
    every gradient equal those of each sequence run alone with full logits, at temperature 0.7."""
    model, processor, spec, sequences = tiny
    inputs = build_inputs(sequences, processor.image_processor, spec, model_rope_index(model), row_tokens)
    assert inputs.input_ids_RN.shape[0] == rows
    new = _loss_and_grads(model, lambda: completion_logprobs(model, inputs, 0.7), inputs, sequences)
    ref = _loss_and_grads(model, lambda: _per_sequence_reference(model, processor, sequences, 0.7), inputs, sequences)
    _assert_same(new, ref, inputs.mask_BT)


def test_tiny_qwen_vision_once_per_pair_equals_pixels_per_completion(tiny) -> None:
    """Frozen tower: one vision forward for the 2 pairs' 4 images (instead of 8 image encodings for 4
    completions) gives the same logprobs, loss and gradients as pixels through the model per completion."""
    model, processor, spec, sequences = tiny
    model.model.visual.requires_grad_(False)
    calls: list[int] = []
    hook = model.model.visual.register_forward_hook(lambda _m, args, _out: calls.append(int(args[0].shape[0])))
    images = process_images(sequences, processor.image_processor, spec)
    inputs = build_inputs(sequences, processor.image_processor, spec, model_rope_index(model), 0, images)
    per_completion = _loss_and_grads(model, lambda: completion_logprobs(model, inputs, 0.7), inputs, sequences)
    assert len(calls) == 1 and calls[0] == inputs.pixel_values.shape[0]  # all 4 sequences' 8 images' patches
    calls.clear()
    features = encode_images(model, images, "cpu", torch.float32)
    once = with_image_embeds(inputs, features)
    assert len(calls) == 1 and calls[0] == inputs.pixel_values.shape[0] // 2  # 2 pairs' 4 images
    shared = _loss_and_grads(model, lambda: completion_logprobs(model, once, 0.7), inputs, sequences)
    assert len(calls) == 1  # the forward used the features: no further vision call
    hook.remove()
    model.model.visual.requires_grad_(True)
    _assert_same(shared, per_completion, inputs.mask_BT)


def test_tiny_qwen_bf16_logprob_gap_to_fp32_is_bounded(tiny) -> None:
    """`learner.dtype: bfloat16` (what `auto` picks on bf16 hardware) runs the forward in bf16 weights; on
    the tiny model its logprobs stay within 0.01 nats of fp32 on average and 0.05 at worst (measured: mean
    0.0011, max 0.0038 over these 224 tokens; bench.learner_step measures tiny and mid through the learner)."""
    model, processor, spec, sequences = tiny
    inputs = build_inputs(sequences, processor.image_processor, spec, model_rope_index(model), 0)
    with torch.no_grad():
        fp32 = completion_logprobs(model, inputs)
        bf16 = completion_logprobs(copy.deepcopy(model).to(torch.bfloat16), inputs.to("cpu", torch.bfloat16))
    gap = (bf16 - fp32).abs()[inputs.mask_BT]
    assert bf16.dtype == torch.float32 and 0 < gap.max()  # computed in bf16, returned in fp32
    assert gap.mean() < 0.01 and gap.max() < 0.05, (gap.mean(), gap.max())


def test_tiny_qwen_shared_prompt_layout_equals_each_sequence_alone(tiny) -> None:
    """The shared-prompt layout (each pair's prompt once, its completions after it, one row) gives the
    logprobs, GRPO loss and every gradient of each sequence run alone, at temperature 0.7, with the
    prompt's tokens run once per pair: 2 prompts + 4 completions instead of 4 (prompt + completion)."""
    from pipeline.logprobs import build_shared_inputs
    from pipeline.shared_prompt import use_shared_prompt_attention

    model, processor, spec, sequences = tiny
    shared_model = copy.deepcopy(model)
    use_shared_prompt_attention(shared_model)
    inputs = build_shared_inputs(sequences, processor.image_processor, spec, model_rope_index(model))
    P = [len(s.prompt_token_ids) for s in sequences]
    C = [len(s.completion_token_ids) for s in sequences]
    assert inputs.input_ids_RN.shape == (1, P[0] + P[2] + sum(C))
    assert inputs.num_tokens == sum(P) + sum(C)  # what the one-sequence-per-row layout runs
    new = _loss_and_grads(shared_model, lambda: completion_logprobs(shared_model, inputs, 0.7), inputs, sequences)
    ref = _loss_and_grads(model, lambda: _per_sequence_reference(model, processor, sequences, 0.7), inputs, sequences)
    _assert_same(new, ref, inputs.mask_BT)


def test_shared_prompt_inputs_refuse_a_model_without_the_shared_prompt_attention(tiny) -> None:
    """Plain SDPA would read the row as one sequence (completions attending to each other): refused."""
    from pipeline.logprobs import build_shared_inputs

    model, processor, spec, sequences = tiny
    inputs = build_shared_inputs(sequences, processor.image_processor, spec, model_rope_index(model))
    with pytest.raises(ValueError, match="shared-prompt inputs need"):
        completion_logprobs(model, inputs)
