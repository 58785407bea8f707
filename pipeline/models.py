"""Where checkpoints come from: `tiny://ROLE` (built offline on first use), a local directory, or a hub id.

`tiny://reasoner` and `tiny://listener` are random tiny checkpoints (`pipeline.tiny`); `tiny://reasoner-sft`
is the tiny reasoner warm-started on the answer format (`pipeline.sft`, default settings) and
`tiny://listener-sft` the tiny listener trained to answer from the reasoning it reads (`pipeline.sft`,
role listener, `LISTENER_SFT`; docs/listener.md). Each is built under the cache directory on first use
(it needs Ray, as the driver has, and a few minutes on CPU) and rebuilt when its cached settings are stale.

A local path must exist and hold a `config.json`; a hub id (`org/name`) is passed through to the same
loading code (vLLM, transformers) that local directories use, which resolves it through the hub cache.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import ConfigError

TINY_SCHEME = "tiny://"


def resolve_checkpoint(spec: str, key: str, cache_dir: Path) -> str:
    """The loadable location for config value `spec` (named `key` in errors); builds tiny checkpoints."""
    if spec.startswith(TINY_SCHEME):
        role = spec.removeprefix(TINY_SCHEME)
        if role in ("reasoner-sft", "listener-sft"):
            return str(_ensure_tiny_sft(cache_dir, role.removesuffix("-sft")))
        if role not in ("reasoner", "listener"):
            raise ConfigError(f"{key}: unknown tiny role '{role}' (use tiny://reasoner, tiny://listener, "
                              f"tiny://reasoner-sft or tiny://listener-sft)")
        return str(_ensure_tiny(cache_dir / f"tiny-{role}", role))
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        if not (path / "config.json").is_file():
            raise ConfigError(f"{key}: model path '{spec}' does not exist or has no config.json")
        return str(path.resolve())
    return spec  # a hub id such as Qwen/Qwen2.5-VL-7B-Instruct


def resolve_checkpoints(specs: dict[str, str], cache_dir: Path) -> dict[str, str]:
    """`resolve_checkpoint` for each config key -> value; the tiny warm starts still to build are built at
    the same time (`pipeline.sft.warm_starts`), e.g. a demo's reasoner and listener on first use."""
    from pipeline.sft import default_settings, warm_starts

    roles = warm_starts_to_build(specs, cache_dir)
    if roles:
        warm_starts([(_ensure_tiny(cache_dir / f"tiny-{role}", role), cache_dir / f"tiny-{role}-sft",
                      default_settings(role), role) for role in roles])
    return {key: resolve_checkpoint(spec, key, cache_dir) for key, spec in specs.items()}


def warm_starts_to_build(specs: dict[str, str], cache_dir: Path) -> list[str]:
    """The roles of the `tiny://ROLE-sft` values in `specs` not yet built under `cache_dir`, each once."""
    roles = []
    for spec in specs.values():
        role = spec.removeprefix(TINY_SCHEME).removesuffix("-sft")
        if spec == f"{TINY_SCHEME}{role}-sft" and role in ("reasoner", "listener") and role not in roles \
                and not built_with_default_settings(cache_dir / f"tiny-{role}-sft", role):
            roles.append(role)
    return roles


def _ensure_tiny(out: Path, role: str) -> Path:
    if (out / "tiny_manifest.json").is_file():
        return out
    from pipeline.tiny import make_tiny

    return make_tiny(out, role=role)


def _ensure_tiny_sft(cache_dir: Path, role: str) -> Path:
    from pipeline.sft import default_settings, warm_start

    out = cache_dir / f"tiny-{role}-sft"
    if built_with_default_settings(out, role):
        return out
    return warm_start(_ensure_tiny(cache_dir / f"tiny-{role}", role), out, default_settings(role), role=role).out


def built_with_default_settings(sft_dir: Path, role: str = "reasoner") -> bool:
    """Whether `sft_dir` holds a complete warm start (its manifest is written last) of `role` made with
    today's default settings for it: one cached under older defaults is rebuilt, not silently reused."""
    from dataclasses import asdict

    from pipeline.sft import MANIFEST, default_settings

    manifest = sft_dir / MANIFEST
    if not manifest.is_file():
        return False
    wanted = json.loads(json.dumps(asdict(default_settings(role))))  # tuples become lists, as in the manifest
    written = json.loads(manifest.read_text())
    return written.get("settings") == wanted and written.get("role", "reasoner") == role
