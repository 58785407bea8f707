"""The local cluster the driver starts runs its actors on tcmalloc (real Ray, a real driver process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.placement import tcmalloc_path

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

# The driver's own connection code starts the cluster; an actor reports the allocator mapped into it.
PROBE = """
import ray
from pipeline.config import load_config
from pipeline.driver import _connect_ray

assert _connect_ray(load_config(None, []))

@ray.remote(num_cpus=0)
def mapped_allocators():
    return sorted({line.split()[-1] for line in open("/proc/self/maps") if "malloc" in line.split()[-1]})

print("ALLOCATORS", ray.get(mapped_allocators.remote()))
ray.shutdown()
"""


def _probe(environ: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "RAY_ADDRESS")}
    env.update(environ)
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return next(line for line in result.stdout.splitlines() if line.startswith("ALLOCATORS"))


@pytest.mark.skipif(tcmalloc_path() is None, reason="tcmalloc is not installed here (.ci/run installs it)")
def test_a_cpu_runs_actors_run_on_tcmalloc_and_the_opt_out_leaves_glibc() -> None:
    assert tcmalloc_path() in _probe({})
    assert "tcmalloc" not in _probe({"LISTENER_GRPO_TCMALLOC": "0"})
