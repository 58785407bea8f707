"""GPU checks of the lean learner (CUDA only; skipped without it): bench.gpu_smoke at tiny widths on the
GPU, every section ok, the ZeRO-3 learner's logprobs within bf16 noise of a plain forward, and the
chunked head's values and gradients in bf16 equal to the full log_softmax's within bf16 rounding.

    python -m pytest -m gpu tests/gpu/test_gpu_lean_learner.py -s
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_gpu_smoke_at_tiny_widths_passes_every_section(tmp_path) -> None:
    from bench.gpu_smoke import main

    out = tmp_path / "smoke.json"
    rc = main(["--device", "cuda", "--tiny", "--steps", "1", "--out", str(out)])
    sections = json.loads(out.read_text())["sections"]
    assert rc == 0, {n: s.get("error") for n, s in sections.items() if s["status"] == "error"}
    assert sections["bucket_pack"]["unpacked_equal"] and sections["bucket_pack"]["host_pinned"]
    assert sections["zero3_step"]["dtype"] == "bfloat16" and sections["zero3_step"]["logp_gap"] < 0.05


def test_chunked_head_in_bf16_matches_the_full_log_softmax() -> None:
    from pipeline.logprobs import ChunkedTokenLogprobs

    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(300, 64, device="cuda", generator=gen).bfloat16().requires_grad_(True)
    weight = (torch.randn(5000, 64, device="cuda", generator=gen) / 8).bfloat16().requires_grad_(True)
    targets = torch.randint(0, 5000, (300,), device="cuda", generator=gen)
    chunked = ChunkedTokenLogprobs.apply(hidden, weight, None, targets, 1.0, 64)
    grads = torch.autograd.grad(chunked.sum(), (hidden, weight))
    full = torch.log_softmax((hidden @ weight.T).float(), -1).gather(-1, targets[:, None])[:, 0]
    full_grads = torch.autograd.grad(full.sum(), (hidden, weight))
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-5)
    for got, want in zip(grads, full_grads):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_shared_prompt_attention_in_bf16_on_cuda_matches_dense_attention() -> None:
    """The learner's shared-prompt attention (two batched SDPA calls with masks) on the GPU in bf16 against
    one dense fp32 attention over the row with the mask written out: 2 prompts, 3 completions."""
    from pipeline.shared_prompt import SharedPromptLayout, layout_attention

    prompts, completions = [(0, 40), (90, 30)], [(40, 20, 0), (60, 30, 0), (120, 7, 1)]
    N = 127
    allowed = torch.zeros(N, N, dtype=torch.bool)
    for start, length in prompts:
        allowed[start:start + length, start:start + length] = torch.ones(length, length, dtype=torch.bool).tril()
    for start, length, u in completions:
        p_start, p_length = prompts[u]
        allowed[start:start + length, p_start:p_start + p_length] = True
        allowed[start:start + length, start:start + length] = torch.ones(length, length, dtype=torch.bool).tril()
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(4, N, 32, device="cuda", generator=gen).bfloat16() for _ in range(3))
    layout = SharedPromptLayout.from_spans(prompts, completions).to("cuda")
    shared = layout_attention(q, k, v, layout, 0.2)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=allowed.cuda(), scale=0.2).transpose(0, 1)
    torch.testing.assert_close(shared.float(), dense, rtol=2e-2, atol=2e-2)
