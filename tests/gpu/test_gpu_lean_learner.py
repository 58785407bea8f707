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
