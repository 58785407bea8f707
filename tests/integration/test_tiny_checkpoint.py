"""`make-tiny` checkpoints: byte-identical per seed, and loadable by AutoProcessor, transformers and vLLM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.prompts import REASONER_INSTRUCTION, chat_messages, reasoner_prompt
from pipeline.synthetic import synthetic_pair
from pipeline.tiny import checkpoint_digest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def _make_tiny(out: Path, *args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pipeline", "make-tiny", "--out", str(out), *args],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_same_seed_is_byte_identical_and_another_seed_is_not(tmp_path: Path, tiny_reasoner_dir: Path) -> None:
    _make_tiny(tmp_path / "again", "--role", "reasoner")
    _make_tiny(tmp_path / "seed7", "--seed", "7")
    assert checkpoint_digest(tmp_path / "again") == checkpoint_digest(tiny_reasoner_dir)
    assert checkpoint_digest(tmp_path / "seed7") != checkpoint_digest(tiny_reasoner_dir)


def test_tiny_has_about_a_million_parameters(tiny_reasoner_dir: Path) -> None:
    manifest = json.loads((tiny_reasoner_dir / "tiny_manifest.json").read_text())
    assert 3e5 < manifest["parameters"] < 3e6


def test_transformers_loads_processor_and_model_and_generates(tiny_reasoner_dir: Path) -> None:
    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_reasoner_dir)
    pair = synthetic_pair(0, 0)
    text = reasoner_prompt(pair.prompt)
    rendered = processor.apply_chat_template(
        chat_messages(REASONER_INSTRUCTION.format(prompt=pair.prompt), 2), add_generation_prompt=True,
        tokenize=False)
    assert rendered == text, "our prompt renderer and the checkpoint's chat template disagree"
    inputs = processor(text=[text], images=[pair.image_1, pair.image_2], return_tensors="pt")
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    merged = int(inputs["image_grid_thw"].prod(dim=-1).sum()) // 4
    assert int((inputs["input_ids"] == image_pad).sum()) == merged
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_reasoner_dir)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4


VLLM_SCRIPT = r"""
import json, sys
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
from vllm import LLM, SamplingParams
from pipeline.prompts import reasoner_prompt
from pipeline.synthetic import synthetic_pair
ckpt = sys.argv[1]
pair = synthetic_pair(0, 1)
text = reasoner_prompt(pair.prompt)
llm = LLM(model=ckpt, enforce_eager=True, dtype="float32", max_model_len=1024, seed=0,
          limit_mm_per_prompt={"image": 2})
out = llm.generate([{"prompt": text, "multi_modal_data": {"image": [pair.image_1, pair.image_2]}}],
                   SamplingParams(max_tokens=6, temperature=0.0))[0]
processor = AutoProcessor.from_pretrained(ckpt)
inputs = processor(text=[text], images=[pair.image_1, pair.image_2], return_tensors="pt")
hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt).generate(**inputs, max_new_tokens=6, do_sample=False)
print("RESULT " + json.dumps({
    "vllm_prompt": list(out.prompt_token_ids), "hf_prompt": inputs["input_ids"][0].tolist(),
    "vllm_tokens": list(out.outputs[0].token_ids), "hf_tokens": hf[0, inputs["input_ids"].shape[1]:].tolist()}))
"""


def test_vllm_loads_it_and_generates_with_two_images_like_transformers(tiny_reasoner_dir: Path) -> None:
    # A subprocess keeps the in-process vLLM engine (no multiprocessing on CPU) out of the test runner.
    result = subprocess.run([sys.executable, "-c", VLLM_SCRIPT, str(tiny_reasoner_dir)], capture_output=True,
                            text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    seen = json.loads(line.removeprefix("RESULT "))
    assert seen["vllm_prompt"] == seen["hf_prompt"]
    assert seen["vllm_tokens"] == seen["hf_tokens"]
    assert len(seen["vllm_tokens"]) == 6
