"""The torchvision import fix: idempotent, refuses an unexpected file, and torchvision imports on CPU."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("fix_torchvision", REPO / "scripts" / "fix_torchvision.py")
fix = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fix)

ORIGINAL = '''import torch
import torchvision.extension


@register_meta("roi_align")
def meta_roi_align():
    pass


@torch.library.register_fake("torchvision::nms")
def meta_nms(dets, scores, iou_threshold):
    pass


@torch.library.register_fake("torchvision::qnms")
def meta_qnms(dets, scores, iou_threshold):
    pass
'''


def test_patch_guards_both_registrations_and_is_idempotent() -> None:
    once = fix.patch(ORIGINAL)
    assert "@torch.library.register_fake(" not in once
    assert once.count("@_register_fake_if_ops(") == 2
    assert fix.patch(once) == once
    compile(once, "_meta_registrations.py", "exec")


def test_unexpected_file_is_an_error_not_a_skip() -> None:
    with pytest.raises(SystemExit, match="unexpected"):
        fix.patch("import torch\n")


def test_torchvision_and_qwen_vl_processor_import_beside_cpu_torch() -> None:
    code = ("import torch, torchvision; from torchvision.transforms import functional; "
            "from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor; "
            "assert '+cpu' in torch.__version__; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_cuda_only_audio_packages_are_kept_out() -> None:
    for name in ("torchaudio", "torchcodec"):
        assert importlib.util.find_spec(name) is None, f"{name} breaks vLLM on CPU; setup must keep it out"
