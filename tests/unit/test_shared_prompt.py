"""Shared-prompt attention (pipeline/shared_prompt.py) and its inputs, against hand-worked layouts and masks.

The real tiny Qwen2.5-VL through this layout (logprobs, loss and every gradient against each sequence alone)
is in tests/unit/test_logprob_inputs.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.logprobs import VisionSpec, build_shared_inputs
from pipeline.shared_prompt import SharedPromptLayout, layout_attention, shared_prompt_attention
from pipeline.types import TrainSequence

T, F = True, False
# Row of 6: prompt 0-2; completion 0 at 3-4, completion 1 at 5, both reading the prompt.
LAYOUT = SharedPromptLayout.from_spans(prompt_spans=[(0, 3)], completion_spans=[(3, 2, 0), (5, 1, 0)])
# Who may attend to whom in that row, by hand: each token sees what it would in its own sequence.
ALLOWED_NN = torch.tensor([
    [T, F, F, F, F, F],
    [T, T, F, F, F, F],
    [T, T, T, F, F, F],
    [T, T, T, T, F, F],  # completion 0, first token: the prompt and itself
    [T, T, T, T, T, F],
    [T, T, T, F, F, T],  # completion 1: the prompt and itself, never completion 0
])


def test_layout_indices_and_masks_by_hand() -> None:
    assert LAYOUT.prompt_index_UP.tolist() == [[0, 1, 2]] and LAYOUT.prompt_valid_UP.all()
    assert LAYOUT.completion_index_SC.tolist() == [[3, 4], [5, 0]]
    assert LAYOUT.completion_valid_SC.tolist() == [[T, T], [T, F]]
    assert LAYOUT.completion_prompt_S.tolist() == [0, 0] and LAYOUT.positions == 6
    assert LAYOUT.row_of_valid_V.tolist() == [0, 1, 2, 3, 4, 5]  # prompt slots, then completions 0 and 1
    assert LAYOUT.prompt_mask_U1PP[0, 0].tolist() == [[T, F, F], [T, T, F], [T, T, T]]
    # [prompt keys | own keys]; completion 1's second query is padding and still sees the prompt (no NaN row)
    assert LAYOUT.completion_mask_S1CK[:, 0].tolist() == [
        [[T, T, T, T, F], [T, T, T, T, T]],
        [[T, T, T, T, F], [T, T, T, T, F]],
    ]


def test_spans_must_cover_the_row_exactly_once() -> None:
    with pytest.raises(ValueError, match="exactly once"):
        SharedPromptLayout.from_spans([(0, 3)], [(4, 1, 0)])  # position 3 missing
    with pytest.raises(ValueError, match="exactly once"):
        SharedPromptLayout.from_spans([(0, 3)], [(2, 2, 0)])  # position 2 twice


def test_layout_attention_equals_dense_attention_with_the_hand_mask_values_and_gradients() -> None:
    """float64, 2 heads: the two batched SDPA calls give the output and the q/k/v gradients of one dense
    attention over the row with ALLOWED_NN."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 6, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    upstream = torch.randn(6, 2, 4, generator=gen, dtype=torch.float64)

    def run(fn):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = fn(*leaves)
        (out * upstream).sum().backward()
        return [out.detach()] + [t.grad for t in leaves]

    dense = run(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=ALLOWED_NN, scale=0.3).transpose(0, 1))
    shared = run(lambda q, k, v: layout_attention(q, k, v, LAYOUT, 0.3))
    for got, want in zip(shared, dense):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_attention_function_repeats_grouped_key_value_heads_and_checks_the_row() -> None:
    """transformers' calling convention: [1, H, N, D] queries, [1, H_kv, N, D] keys and values (here 4
    query heads over 2 KV heads) -> ([1, N, H, D], None); a layout of another length is refused; with no
    layout it is plain SDPA."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 6, 3, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 6, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    out, weights = shared_prompt_attention(module, q, k, v, None, scaling=0.5, shared_prompts=LAYOUT)
    want = layout_attention(q[0], k[0].repeat_interleave(2, 0), v[0].repeat_interleave(2, 0), LAYOUT, 0.5)
    assert out.shape == (1, 6, 4, 3) and weights is None
    torch.testing.assert_close(out[0], want)
    other = SharedPromptLayout.from_spans([(0, 2)], [(2, 1, 0)])
    with pytest.raises(ValueError, match="one row expected"):
        shared_prompt_attention(module, q, k, v, None, scaling=0.5, shared_prompts=other)
    plain, _ = shared_prompt_attention(module, q, k, v, None, scaling=0.5)
    causal = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True, scale=0.5)
    torch.testing.assert_close(plain, causal.transpose(1, 2))


# ---- build_shared_inputs with a stand-in image processor -------------------------------------------------

IMG, PAD = 9, 0
SPEC = VisionSpec(image_token_id=IMG, pad_token_id=PAD, merge_size=2)


def fake_image_processor(images, return_tensors):
    # each image: grid 1 x 2 x 2 -> 4 patches -> 4 / merge_size**2 = 1 image token
    return {"pixel_values": torch.ones(4 * len(images), 3), "image_grid_thw": torch.tensor([[1, 2, 2]] * len(images))}


def _seq(pair_id: str, prompt: list[int], completion: list[int], advantage: float = 1.0) -> TrainSequence:
    image = Image.new("RGB", (4, 4))
    return TrainSequence(pair_id=pair_id, completion_index=0, prompt_token_ids=np.array(prompt),
                         completion_token_ids=np.array(completion), rollout_logprobs=-np.arange(len(completion)) - 1.0,
                         advantage=advantage, images=(image, image))


def test_shared_inputs_by_hand_each_prompt_once_in_batch_order_of_first_appearance() -> None:
    """Batch [a0, b0, a1]: row [prompt a | a0 | a1 | prompt b | b0]; a completion's text positions continue
    its prompt's; its first token is predicted by the prompt's last position (3 for a, 11 for b)."""
    a0, b0, a1 = _seq("a", [5, IMG, IMG, 6], [7, 8]), _seq("b", [IMG, IMG, 1], [2], -1.0), \
        _seq("a", [5, IMG, IMG, 6], [4, 3, 2], 0.5)
    inputs = build_shared_inputs([a0, b0, a1], fake_image_processor, SPEC)
    assert inputs.input_ids_RN.tolist() == [[5, IMG, IMG, 6, 7, 8, 4, 3, 2, IMG, IMG, 1, 2]]
    text_positions = [0, 1, 2, 3, 4, 5, 4, 5, 6, 0, 1, 2, 3]
    assert inputs.position_ids_4RN[:, 0].tolist() == [text_positions] * 4  # no rope_index: 1D in all rows
    assert inputs.positions_BT.tolist() == [[3, 4, 0], [11, 0, 0], [3, 6, 7]]
    assert inputs.targets_BT.tolist() == [[7, 8, 0], [2, 0, 0], [4, 3, 2]]
    assert inputs.mask_BT.tolist() == [[T, T, F], [T, F, F], [T, T, T]]
    assert inputs.advantages_B.tolist() == [1.0, -1.0, 0.5]
    assert inputs.num_tokens == 6 + 4 + 7  # what one sequence per row would run
    assert [(key[0], i) for key, i in inputs.image_keys] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    layout = inputs.shared_prompts
    assert layout.prompt_index_UP.tolist() == [[0, 1, 2, 3], [9, 10, 11, 0]]
    assert layout.completion_index_SC.tolist() == [[4, 5, 0], [6, 7, 8], [12, 0, 0]]
    assert layout.completion_prompt_S.tolist() == [0, 0, 1] and layout.positions == 13


def test_shared_inputs_move_with_the_layout() -> None:
    inputs = build_shared_inputs([_seq("a", [IMG, IMG], [1])], fake_image_processor, SPEC)
    moved = inputs.to("cpu", torch.bfloat16)
    assert moved.pixel_values.dtype == torch.bfloat16 and moved.shared_prompts.positions == 3
    with pytest.raises(ValueError, match="at least one"):
        build_shared_inputs([], fake_image_processor, SPEC)
