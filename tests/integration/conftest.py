"""Fixtures of the learner and weight-sync tests: a TrainBatch on the tiny reasoner, built like a rollout's.

The prompt tokens come from the checkpoint's processor (image placeholders expanded), the completions are
well-formed answers of different lengths, and the "rollout" logprobs are computed one sequence at a time
with plain transformers (no padding, the processor's own pixel values), independently of
`pipeline.logprobs`, so the learner's batched, padded, sharded recomputation can be checked against them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.prompts import format_target, reasoner_prompt
from pipeline.synthetic import synthetic_pairs
from pipeline.types import TrainBatch, TrainSequence


def _reference_logprobs(model, processor, pair, prompt_ids: np.ndarray, completion: list[int]) -> np.ndarray:
    import torch

    enc = processor(text=[reasoner_prompt(pair.prompt)], images=[pair.image_1, pair.image_2], return_tensors="pt")
    ids = torch.cat([enc["input_ids"][0], torch.tensor(completion)]).unsqueeze(0)
    types = torch.cat([enc["mm_token_type_ids"][0], torch.zeros(len(completion), dtype=torch.int64)]).unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=types,
                       pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"]).logits[0]
    P = len(prompt_ids)
    logp = torch.log_softmax(logits[P - 1:P - 1 + len(completion)].float(), dim=-1)
    return logp.gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1).numpy().astype(np.float32)


def build_train_batch(model_dir: Path, num_pairs: int = 3, group_size: int = 2, step: int = 0) -> TrainBatch:
    """`num_pairs` x `group_size` sequences; advantages +1/-1 within each group; lengths differ."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    sequences = []
    for index, pair in enumerate(synthetic_pairs(seed=0, count=num_pairs)):
        enc = processor(text=[reasoner_prompt(pair.prompt)], images=[pair.image_1, pair.image_2],
                        return_tensors="np")
        prompt_ids = enc["input_ids"][0].astype(np.int64)
        for g in range(group_size):
            text = format_target(f"the {pair.prompt} " * (1 + index + g), answer=1 + g % 2)
            completion = processor.tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
            sequences.append(TrainSequence(
                pair_id=pair.pair_id, completion_index=g, prompt_token_ids=prompt_ids,
                completion_token_ids=np.asarray(completion, dtype=np.int64),
                rollout_logprobs=_reference_logprobs(model, processor, pair, prompt_ids, completion),
                advantage=1.0 if g % 2 == 0 else -1.0, images=(pair.image_1, pair.image_2)))
    return TrainBatch(step=step, policy_version=0, sequences=tuple(sequences))


@pytest.fixture(scope="session")
def tiny_train_batch(tiny_reasoner_dir) -> TrainBatch:
    return build_train_batch(tiny_reasoner_dir)
