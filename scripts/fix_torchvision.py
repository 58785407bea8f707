"""Make PyPI's torchvision importable beside the CPU build of torch (run by scripts/setup_venv.sh).

PyPI's torchvision wheel is built against CUDA torch, so its C++ ops (`torchvision._C`) cannot load
beside torch's CPU build. Its pure-Python part (transforms, io helpers) is all that transformers'
Qwen2.5-VL processor and vLLM need, but `torchvision/_meta_registrations.py` registers fake kernels for
`torchvision::nms` and `torchvision::qnms` without checking that the ops exist, which raises at import.
This script guards those two registrations the way torchvision guards its others (`_has_ops()`).
Idempotent: a patched file is left alone; an unexpected file is an error, never a silent skip.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

MARKER = "# listener-grpo: fake kernels registered only when torchvision's C++ ops loaded"
GUARD = f'''
{MARKER}
def _register_fake_if_ops(op_name):
    def wrapper(fn):
        if torchvision.extension._has_ops():
            return torch.library.register_fake(op_name)(fn)
        return fn

    return wrapper

'''
UNGUARDED = ('@torch.library.register_fake("torchvision::nms")', '@torch.library.register_fake("torchvision::qnms")')


def patch(source: str) -> str:
    if MARKER in source:
        return source
    missing = [line for line in UNGUARDED if line not in source]
    if missing:
        raise SystemExit(f"fix_torchvision: unexpected _meta_registrations.py (no {missing[0]}); "
                         "check the pinned torchvision version")
    anchor = "@register_meta("
    head, sep, tail = source.partition(anchor)
    patched = head + GUARD + sep + tail
    for line in UNGUARDED:
        patched = patched.replace(line, line.replace("@torch.library.register_fake", "@_register_fake_if_ops"))
    return patched


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        print("fix_torchvision: torchvision is not installed; nothing to do", file=sys.stderr)
        return 0
    target = Path(spec.origin).parent / "_meta_registrations.py"
    source = target.read_text()
    patched = patch(source)
    if patched != source:
        target.write_text(patched)
        print(f"fix_torchvision: guarded nms/qnms fake kernels in {target}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
