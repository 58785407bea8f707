"""Benchmarks: `python -m bench` (`make bench`) runs them all; each is also `python -m bench.NAME`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_result(result: dict[str, Any], out: str | Path) -> Path:
    """A benchmark's JSON result file (indented, one trailing newline), its folder made if needed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out
