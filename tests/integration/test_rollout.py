"""RolloutWorker on a real vLLM CPU engine (tiny reasoner) inside the local Ray cluster.

One engine for the whole module (start-up dominates). Run: `pytest -m integration tests/integration/test_rollout.py`.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import EngineConfig
from pipeline.prompts import IMAGE_PAD, VISION_TOKENS, reasoner_prompt
from pipeline.synthetic import synthetic_pairs

pytestmark = pytest.mark.integration

ENGINE = EngineConfig(dtype="float32")  # fp32: bit-comparable with transformers on the same weights


@pytest.fixture(scope="module")
def worker(ray_local, tiny_reasoner_dir):
    from actors.rollout import RolloutWorker

    actor = ray_local.remote(RolloutWorker).options(num_cpus=1, resources={"rollout": 1}).remote(
        str(tiny_reasoner_dir), ENGINE, seed=0, num_threads=1)
    assert ray_local.get(actor.ready.remote(), timeout=300)
    yield actor
    ray_local.kill(actor)


@pytest.fixture(scope="module")
def hf(tiny_reasoner_dir):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_reasoner_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_reasoner_dir, dtype=torch.float32).eval()
    return processor, model


def _hf_logprobs(hf, pair, completion_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Prompt ids from the processor, and transformers' logprob of each completion token (as sampled)."""
    import torch

    processor, model = hf
    enc = processor(text=[reasoner_prompt(pair.prompt)], images=[pair.image_1, pair.image_2], return_tensors="pt")
    ids = torch.cat([enc["input_ids"][0], torch.tensor(completion_ids.tolist())]).unsqueeze(0)
    types = torch.cat([enc["mm_token_type_ids"][0], torch.zeros(len(completion_ids), dtype=torch.int64)])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=types.unsqueeze(0),
                       pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"]).logits[0]
    P = enc["input_ids"].shape[1]
    logits = logits[P - 1:P - 1 + len(completion_ids)].float()
    # The distribution the worker samples from: vision tokens banned with a -100 logit bias.
    logits[:, processor.tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))] -= 100.0
    logp = torch.log_softmax(logits, dim=-1)
    token_logp = logp.gather(-1, torch.tensor(completion_ids.tolist()).unsqueeze(-1)).squeeze(-1)
    return enc["input_ids"][0].numpy(), token_logp.numpy()


def test_groups_have_g_consistent_completions(ray_local, worker, hf):
    pairs = list(synthetic_pairs(seed=0, count=3))
    G, T = 4, 12
    groups = ray_local.get(worker.generate.remote(pairs, G, T, 1.0, 1.0), timeout=300)
    assert [g.pair_id for g in groups] == [p.pair_id for p in pairs]
    tokenizer = hf[0].tokenizer
    vision_ids = set(tokenizer.convert_tokens_to_ids(list(VISION_TOKENS)))
    for pair, group in zip(pairs, groups):
        assert group.policy_version == 0 and len(group.completions) == G
        assert [c.completion_index for c in group.completions] == list(range(G))
        for c in group.completions:
            assert (c.pair_id, c.policy_version) == (pair.pair_id, 0)
            assert c.token_ids.dtype == np.int64 and c.logprobs.dtype == np.float32
            assert c.token_ids.shape == c.logprobs.shape and 1 <= len(c.token_ids) <= T
            assert c.finish_reason in ("stop", "length")
            assert (c.finish_reason == "length") == (len(c.token_ids) == T)
            assert np.all(np.isfinite(c.logprobs)) and np.all(c.logprobs <= 0)
            assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
            assert not vision_ids & set(c.token_ids.tolist())  # only the processor places image tokens
        assert len({tuple(c.token_ids) for c in group.completions}) > 1  # sampled, not G copies
    # Token-in, token-out: the engine's prompt ids are the processor's, and its logprobs are those of the
    # returned tokens under the same weights (recomputed by transformers).
    for pair, group in zip(pairs[:1], groups[:1]):
        for c in group.completions:
            prompt_ids, hf_logp = _hf_logprobs(hf, pair, c.token_ids)
            np.testing.assert_array_equal(group.prompt_token_ids, prompt_ids)
            np.testing.assert_allclose(c.logprobs, hf_logp, atol=2e-3)


def test_image_placeholder_mismatch_is_an_error(ray_local, worker, hf):
    pair = next(synthetic_pairs(seed=0, count=1))
    group = ray_local.get(worker.generate.remote([pair], 1, 2, 0.0, 1.0), timeout=300)[0]
    ids = group.prompt_token_ids
    pad = hf[0].tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    truncated = np.delete(ids, int(np.flatnonzero(ids == pad)[0]))

    def check(self, pair, ids):
        self._check_image_tokens(pair, ids)

    ray_local.get(worker.__ray_call__.remote(check, pair, ids))  # the engine's own ids pass
    with pytest.raises(Exception, match="image placeholder tokens per image"):
        ray_local.get(worker.__ray_call__.remote(check, pair, truncated))


def _greedy(ray_local, worker, pairs):
    groups = ray_local.get(worker.generate.remote(pairs, 2, 16, 0.0, 1.0), timeout=300)
    return groups, [tuple(c.token_ids) for g in groups for c in g.completions]


def test_update_weights_in_place_then_restore(ray_local, worker, tiny_reasoner_dir):
    import torch
    from safetensors.torch import load_file

    pairs = list(synthetic_pairs(seed=1, count=2))
    before_groups, before = _greedy(ray_local, worker, pairs)
    original = load_file(tiny_reasoner_dir / "model.safetensors")
    names = sorted(n for n in original if n.startswith("model."))  # the language model; vision stays
    noise = torch.Generator().manual_seed(0)
    changed = {n: original[n] + 0.05 * torch.randn(original[n].shape, generator=noise) for n in names}
    # Two buckets that split every fused layer: q_proj in the first, k/v in the second.
    first = [(n, changed[n]) for n in names if "q_proj" in n or "gate_proj" in n]
    second = [(n, changed[n]) for n in names if not ("q_proj" in n or "gate_proj" in n)]
    loaded = ray_local.get(worker.load_weights.remote(first))
    with pytest.raises(Exception, match="weight update is in progress"):
        ray_local.get(worker.generate.remote(pairs, 1, 4, 0.0, 1.0))
    loaded += ray_local.get(worker.load_weights.remote(second))
    assert loaded == sum(t.numel() * t.element_size() for t in changed.values())
    ray_local.get(worker.finish_weight_update.remote(1))
    assert ray_local.get(worker.policy_version.remote()) == 1

    after_groups, after = _greedy(ray_local, worker, pairs)
    assert after != before
    assert all(c.policy_version == 1 for g in after_groups for c in g.completions)

    ray_local.get(worker.update_weights.remote([(n, original[n]) for n in names], 2))
    restored_groups, restored = _greedy(ray_local, worker, pairs)
    assert restored == before and ray_local.get(worker.policy_version.remote()) == 2
    for b, r in zip(before_groups, restored_groups):
        np.testing.assert_array_equal(b.prompt_token_ids, r.prompt_token_ids)
        for cb, cr in zip(b.completions, r.completions):
            np.testing.assert_allclose(cb.logprobs, cr.logprobs, atol=1e-5)


def test_half_loaded_fused_layer_is_refused_and_keeps_old_weights(ray_local, worker, tiny_reasoner_dir):
    from safetensors.torch import load_file

    pairs = list(synthetic_pairs(seed=1, count=2))
    _, before = _greedy(ray_local, worker, pairs)
    version = ray_local.get(worker.policy_version.remote())
    q = "model.layers.0.self_attn.q_proj.weight"
    only_q = [(q, load_file(tiny_reasoner_dir / "model.safetensors")[q] * 2.0)]
    with pytest.raises(Exception, match="half-loaded"):
        ray_local.get(worker.update_weights.remote(only_q, version + 1))
    assert ray_local.get(worker.policy_version.remote()) == version
    assert _greedy(ray_local, worker, pairs)[1] == before  # the engine still serves the old weights
