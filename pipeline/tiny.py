"""Tiny random Qwen2.5-VL checkpoints, built offline: `python -m pipeline make-tiny --out DIR`.

A byte-level BPE tokenizer is trained locally on a fixed corpus (with Qwen's special tokens and chat
template), a Qwen2.5-VL config of the chosen size is filled with seeded random weights, and everything
is written as a normal checkpoint (config, safetensors, tokenizer, processor) that `AutoProcessor`,
`Qwen2_5_VLForConditionalGeneration` and `vllm.LLM` load. The same (size, seed) gives byte-identical files.

Sizes: `tiny` (about 1M parameters, for tests), `mid` (hidden 512, 8 layers, about 27M, for benchmarks).
The reasoner and listener roles differ only in their default seed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.prompts import LISTENER_INSTRUCTION, REASONER_INSTRUCTION, SYSTEM_PROMPT
from pipeline.synthetic import COLOURS, SHAPES

Role = Literal["reasoner", "listener"]
Size = Literal["tiny", "mid"]

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
ROLE_SEEDS: dict[str, int] = {"reasoner": 0, "listener": 1}
TOKENIZER_VOCAB = 2048

# Qwen2-VL-style chat template: images/videos become <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    + SYSTEM_PROMPT + "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """The shape of a tiny checkpoint."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vision_depth: int
    vision_width: int
    vision_heads: int


SPECS: dict[str, TinySpec] = {
    # head_dim 64 for both, so mrope sections [8, 12, 12] (summing to head_dim / 2) fit.
    "tiny": TinySpec(hidden=128, layers=2, heads=2, kv_heads=1, intermediate=256,
                     vision_depth=2, vision_width=64, vision_heads=2),
    "mid": TinySpec(hidden=512, layers=8, heads=8, kv_heads=2, intermediate=1408,
                    vision_depth=2, vision_width=128, vision_heads=4),
}


def tokenizer_corpus() -> list[str]:
    """A fixed corpus (no file or clock inputs, so the tokenizer is identical everywhere)."""
    lines = [SYSTEM_PROMPT, REASONER_INSTRUCTION, LISTENER_INSTRUCTION]
    for colour, shape in itertools.product(sorted(COLOURS), SHAPES):
        for position in ("1", "2", "one", "two", "first", "second"):
            lines.append(
                f"<think>The prompt asks for a {colour} {shape}. Image {position} shows a {colour} {shape}, "
                f"the other image does not match the colour or the shape.</think><answer>{position}</answer>"
            )
    lines += ["0123456789 .,:;!?()[]{}<>\"'-_/\\ " * 4, "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ"]
    return lines


def build_tokenizer():
    """A byte-level BPE `PreTrainedTokenizerFast` with Qwen's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(tokenizer_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")],
        chat_template=CHAT_TEMPLATE, model_max_length=32768,
    )


def build_config(spec: TinySpec, tokenizer):
    """A Qwen2.5-VL config of `spec`'s shape whose special-token ids match `tokenizer`."""
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = -(-len(tokenizer) // 64) * 64  # padded like real checkpoints; >= the tokenizer's size
    head_dim = spec.hidden // spec.heads
    mrope_section = [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]  # [8, 12, 12] at head_dim 64
    text = dict(
        vocab_size=vocab_size, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        max_position_embeddings=4096, rms_norm_eps=1e-6, max_window_layers=spec.layers,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope_section},
    )
    vision = dict(
        depth=spec.vision_depth, hidden_size=spec.vision_width, intermediate_size=spec.vision_width * 2,
        num_heads=spec.vision_heads, out_hidden_size=spec.hidden, patch_size=14, spatial_merge_size=2,
        temporal_patch_size=2, window_size=112, fullatt_block_indexes=[spec.vision_depth - 1],
    )
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return config


def build_processor(tokenizer, min_pixels: int = 3136, max_pixels: int = 12544):
    """The Qwen2.5-VL processor (image + video processors, tokenizer, chat template)."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    image_processor = Qwen2VLImageProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2)
    video_processor = Qwen2VLVideoProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2)
    return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               video_processor=video_processor, chat_template=CHAT_TEMPLATE)


def make_tiny(out: str | Path, role: Role = "reasoner", size: Size = "tiny", seed: int | None = None) -> Path:
    """Build the checkpoint into `out`, atomically (a sibling temp dir renamed into place)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    if size not in SPECS:
        raise ValueError(f"unknown size {size!r}; known: {sorted(SPECS)}")
    seed = ROLE_SEEDS[role] if seed is None else seed
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = build_config(SPECS[size], tokenizer)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staging = Path(tmp) / "ckpt"
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
        model.save_pretrained(staging, safe_serialization=True)
        build_processor(tokenizer).save_pretrained(staging)
        (staging / "tiny_manifest.json").write_text(json.dumps(
            {"role": role, "size": size, "seed": seed, "parameters": model.num_parameters()}, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    return out


def checkpoint_digest(path: str | Path) -> str:
    """sha256 over every file's relative name and bytes, in sorted order."""
    digest = hashlib.sha256()
    root = Path(path)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(root)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()
