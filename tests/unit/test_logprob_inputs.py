"""Micro-batch tensors for the learner (pipeline/logprobs.py), with a stand-in image processor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.logprobs import VisionSpec, build_inputs, completion_logprobs
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


def test_padding_positions_targets_and_masks() -> None:
    inputs = build_inputs([_seq([5, IMG, IMG, 6], [7, 8]), _seq([5, IMG, IMG], [4, 3, 2], -1.0)],
                          fake_image_processor, SPEC)
    assert inputs.input_ids_BL.tolist() == [[5, IMG, IMG, 6, 7, 8], [5, IMG, IMG, 4, 3, 2]]
    assert inputs.mm_token_type_ids_BL.tolist() == [[0, 1, 1, 0, 0, 0], [0, 1, 1, 0, 0, 0]]
    # completion token t of sequence b is predicted at position P_b - 1 + t
    assert inputs.positions_BT.tolist() == [[3, 4, 0], [2, 3, 4]]
    assert inputs.targets_BT.tolist() == [[7, 8, 0], [4, 3, 2]]
    assert inputs.mask_BT.tolist() == [[True, True, False], [True, True, True]]
    assert inputs.rollout_logp_BT.tolist() == [[-1, -2, 0], [-1, -2, -3]]
    assert inputs.advantages_B.tolist() == [1.0, -1.0]
    assert inputs.image_grid_thw.shape == (4, 3) and inputs.pixel_values.shape == (16, 3)
    assert inputs.num_tokens == 12


def test_right_padding_uses_the_pad_id() -> None:
    inputs = build_inputs([_seq([IMG, IMG, 1], [2]), _seq([IMG, IMG, 1, 1, 1], [2])], fake_image_processor, SPEC)
    assert inputs.input_ids_BL[0].tolist() == [IMG, IMG, 1, 2, PAD, PAD]
    assert inputs.attention_mask_BL[0].tolist() == [1, 1, 1, 1, 0, 0]


def test_placeholder_count_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="image tokens"):
        build_inputs([_seq([5, IMG, 6], [7])], fake_image_processor, SPEC)  # 1 placeholder, images need 2


def test_completion_logprobs_gathers_the_predicting_positions() -> None:
    inputs = build_inputs([_seq([IMG, IMG, 1], [3, 2])], fake_image_processor, SPEC)

    class Favour(torch.nn.Module):  # the logits at position i favour token (i + 1) % 5 by 10 nats
        def forward(self, input_ids, **_):
            L = input_ids.shape[1]
            logits = torch.zeros(1, L, 5)
            logits[0, torch.arange(L), (torch.arange(L) + 1) % 5] = 10.0
            return type("Out", (), {"logits": logits})

    logp = completion_logprobs(Favour(), inputs)
    favoured = torch.log_softmax(torch.tensor([10.0, 0, 0, 0, 0]), 0)
    # token 3 is predicted at position 2 (favours 3); token 2 at position 3 (favours 4)
    assert logp[0].tolist() == pytest.approx([favoured[0].item(), favoured[1].item()])


def test_temperature_scales_the_logits() -> None:
    inputs = build_inputs([_seq([IMG, IMG, 1], [3])], fake_image_processor, SPEC)

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, **_):
            return type("Out", (), {"logits": torch.tensor([[[0.0, 1.0, 2.0, 3.0, 4.0]]]).expand(1, input_ids.shape[1], 5)})

    logp = completion_logprobs(Fixed(), inputs, temperature=2.0)
    assert logp[0, 0].item() == pytest.approx(torch.log_softmax(torch.arange(5.0) / 2.0, 0)[3].item())
