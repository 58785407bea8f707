"""On CPU the learner starts DeepSpeed without JIT-compiling its shared-memory all-reduce op
(actors/learner.py `skip_shm_allreduce_build`): compiling it cost each learner start about 40 s of two
compiler processes whenever the build cache was missing or invalidated. Real DeepSpeed, in a fresh process
with an empty extension cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = """
from actors.learner_setup import skip_shm_allreduce_build
from deepspeed.comm.torch import build_shm_op
skip_shm_allreduce_build()
print("OP", build_shm_op())
"""


def test_deepspeed_starts_without_building_the_shm_allreduce_op(tmp_path: Path) -> None:
    cache = tmp_path / "torch_extensions"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(cache)}
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=REPO, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OP None" in result.stdout
    assert not cache.exists() or not any(cache.rglob("*")), "an extension was built"
