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
    assert len(model.lm_head._forward_pre_hooks) == 0  # ... and the head's selection hook is gone again


def test_output_head_sees_only_completion_positions() -> None:
    # B=2, L=6, T=3: the head is fed [2, 3, H], never [2, 6, H]
    inputs = build_inputs([_seq([5, IMG, IMG, 6], [1, 2]), _seq([5, IMG, IMG], [4, 3, 2])], fake_image_processor, SPEC)
    seen: list[tuple[int, ...]] = []
    model = HeadModel(lambda L: torch.zeros(2, L, 5))
    model.lm_head.register_forward_hook(lambda _m, args, out: seen.append(tuple(args[0].shape)))
    logp = completion_logprobs(model, inputs)
    assert seen == [(2, 3, 5)] and logp.shape == (2, 3)
    assert torch.allclose(logp, torch.full((2, 3), -np.log(5.0), dtype=torch.float32))  # uniform over 5 tokens


def test_temperature_scales_the_logits() -> None:
    inputs = build_inputs([_seq([IMG, IMG, 1], [3])], fake_image_processor, SPEC)
    model = HeadModel(lambda L: torch.arange(5.0).expand(1, L, 5))
    logp = completion_logprobs(model, inputs, temperature=2.0)
    assert logp[0, 0].item() == pytest.approx(torch.log_softmax(torch.arange(5.0) / 2.0, 0)[3].item())


def _full_logits_logprobs(model, inputs, temperature: float) -> torch.Tensor:
    """The previous implementation, kept here as the reference: [B, L, V] logits, then gather."""
    logits_BLV = model(input_ids=inputs.input_ids_BL, attention_mask=inputs.attention_mask_BL,
                       mm_token_type_ids=inputs.mm_token_type_ids_BL, pixel_values=inputs.pixel_values,
                       image_grid_thw=inputs.image_grid_thw, use_cache=False).logits
    index_BTV = inputs.positions_BT.unsqueeze(-1).expand(-1, -1, logits_BLV.shape[-1])
    logits_BTV = logits_BLV.gather(1, index_BTV).float() / temperature
    return torch.log_softmax(logits_BTV, dim=-1).gather(-1, inputs.targets_BT.unsqueeze(-1)).squeeze(-1)


def test_tiny_qwen_logprobs_loss_and_gradients_equal_the_full_logits_path(tiny_reasoner_dir) -> None:
    """On the real tiny Qwen2.5-VL (fp32): padded micro-batch of 3 sequences of different prompt and
    completion lengths; the head-on-completions path gives the same logprobs, loss and gradients."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from pipeline.grpo import LossNormalizer, grpo_loss
    from pipeline.prompts import reasoner_prompt
    from pipeline.synthetic import synthetic_pairs

    processor = AutoProcessor.from_pretrained(tiny_reasoner_dir)
    config = AutoConfig.from_pretrained(tiny_reasoner_dir)
    spec = VisionSpec(image_token_id=config.image_token_id, pad_token_id=0,
                      merge_size=processor.image_processor.merge_size)
    rng = np.random.default_rng(0)
    sequences = []
    for index, pair in enumerate(synthetic_pairs(seed=0, count=3)):
        prompt = processor(text=[reasoner_prompt(pair.prompt + " x" * index)], images=[pair.image_1, pair.image_2],
                           return_tensors="np")["input_ids"][0]
        completion = rng.integers(20, 200, size=5 + 7 * index)  # ordinary text tokens of the tiny vocabulary
        sequences.append(TrainSequence(pair_id=pair.pair_id, completion_index=0, prompt_token_ids=prompt,
                                       completion_token_ids=completion, rollout_logprobs=-rng.random(len(completion)),
                                       advantage=1.0 - index, images=(pair.image_1, pair.image_2)))
    inputs = build_inputs(sequences, processor.image_processor, spec)
    assert len({len(s.prompt_token_ids) for s in sequences}) == 3  # prompts of different lengths: padding varies
    model = AutoModelForImageTextToText.from_pretrained(tiny_reasoner_dir, dtype=torch.float32).eval()
    normalizer = LossNormalizer.from_lengths([len(s.completion_token_ids) for s in sequences], max_tokens=32)

    def loss_and_grads(logprobs_fn):
        model.zero_grad()
        logp_BT = logprobs_fn(model, inputs, 0.7)
        loss, _ = grpo_loss(logp_BT, inputs.rollout_logp_BT, inputs.advantages_B, inputs.mask_BT, normalizer,
                            eps_low=0.2, eps_high=0.28)
        loss.backward()
        return logp_BT.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                 if p.grad is not None}

    new_logp, new_loss, new_grads = loss_and_grads(completion_logprobs)
    old_logp, old_loss, old_grads = loss_and_grads(_full_logits_logprobs)
    mask = inputs.mask_BT
    torch.testing.assert_close(new_logp[mask], old_logp[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new_loss, old_loss, rtol=1e-5, atol=1e-7)
    assert new_grads.keys() == old_grads.keys() and any("lm_head" in n or "embed" in n for n in new_grads)
    for name in new_grads:
        torch.testing.assert_close(new_grads[name], old_grads[name], rtol=1e-4, atol=1e-6, msg=name)
