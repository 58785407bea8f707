"""Learner checkpoints: DeepSpeed state for exact resume + a safetensors export of the policy, atomically.

Every learner rank calls `save_checkpoint` (DeepSpeed's save is collective: under ZeRO-3 each rank writes
its own parameter and optimizer partitions, under ZeRO-2 its optimizer partition; the replicated model
states are written once). Layout of `ROOT/step-00000012/`:

    manifest.json         step, data position, world size, files (written last, before the rename)
    deepspeed/state/      DeepSpeed checkpoint: partitions, optimizer, scheduler, engine counters
    rng/rank-N.json       python / numpy / torch (and CUDA) RNG states of rank N, as JSON
    policy/               config, `model-0000k-of-0000n.safetensors` + index, processor and tokenizer files:
                          loadable by `from_pretrained` and `vllm.LLM`

Everything is written into `ROOT/.tmp-step-00000012/` and renamed into place by rank 0 after a barrier,
so a crash never leaves a half checkpoint under a final name; then only the last `keep` are kept. ROOT must
be on a filesystem every rank sees (local disk for one node, a shared volume on a cluster).

Loading never unpickles arbitrary objects: our files are JSON and safetensors, and DeepSpeed's own
`torch.load` calls go through `SafeTorchCheckpointEngine` (`weights_only=True`, with the few DeepSpeed
classes its checkpoints hold allow-listed); during a resume any other `torch.load` raises.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.types import CheckpointInfo

DS_TAG = "state"
MANIFEST = "manifest.json"
EXPORT_SHARD_BYTES = 512 * 2**20  # the export's safetensors shard size (= its gather bucket)


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Finished checkpoints under `root` (those with a manifest), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith("step-") and (p / MANIFEST).is_file()]
    return sorted(done, key=lambda p: p.name)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(engine, processor, root: str, step: int, data_position: dict, keep: int, *, rank: int,
                    model_path: str, run_config: str = "") -> CheckpointInfo:
    """All ranks: write checkpoint `step` atomically, then prune to the last `keep`. Returns its info.

    `run_config` (the run's resolved YAML) goes to `policy/run_config.yaml`, so `evaluate` uses the
    image bounds, token budget and dtype the policy was trained with."""
    import torch.distributed as dist

    root_path = Path(root)
    final = root_path / step_dir_name(step)
    staging = root_path / f".tmp-{step_dir_name(step)}"
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    client_state = {"step": step, "data_position": json.dumps(data_position)}
    engine.save_checkpoint(str(staging / "deepspeed"), tag=DS_TAG, client_state=client_state, save_latest=False)
    (staging / "rng").mkdir(exist_ok=True)
    (staging / "rng" / f"rank-{rank}.json").write_text(json.dumps(rng_state()))
    export_policy(engine.module, processor, staging / "policy", rank=rank, base_path=model_path)
    dist.barrier()
    if rank == 0:
        if run_config:
            (staging / "policy" / "run_config.yaml").write_text(run_config)
        write_manifest(staging, step, data_position, dist.get_world_size(), model_path)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        prune(root_path, keep)
    dist.barrier()
    return CheckpointInfo(path=str(final), step=step, data_position=data_position)


def load_checkpoint(engine, path: str, *, rank: int) -> CheckpointInfo:
    """All ranks: restore model, optimizer, scheduler, engine counters and this rank's RNG states."""
    checkpoint = Path(path)
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    import torch.distributed as dist

    if manifest["world_size"] != dist.get_world_size():
        raise ValueError(f"{path}: saved with {manifest['world_size']} learner ranks, resuming with "
                         f"{dist.get_world_size()}; DeepSpeed's partitioned states need the same count")
    engine.checkpoint_engine = SafeTorchCheckpointEngine()
    with only_weights_only_loads():
        load_path, _ = engine.load_checkpoint(str(checkpoint / "deepspeed"), tag=DS_TAG,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise FileNotFoundError(f"{path}: no DeepSpeed state under deepspeed/{DS_TAG}")
    set_rng_state(json.loads((checkpoint / "rng" / f"rank-{rank}.json").read_text()))
    return CheckpointInfo(path=str(checkpoint), step=int(manifest["step"]), data_position=manifest["data_position"])


@contextmanager
def only_weights_only_loads() -> Iterator[None]:
    """While resuming, any `torch.load` that would unpickle arbitrary objects raises instead."""
    import torch

    original = torch.load

    def guarded(*args: Any, weights_only: bool | None = None, **kwargs: Any) -> Any:
        if weights_only is not True:
            raise RuntimeError("refusing torch.load(weights_only=False) while loading a checkpoint")
        return original(*args, weights_only=True, **kwargs)

    torch.load = guarded
    try:
        yield
    finally:
        torch.load = original


def export_policy(model, processor, out: Path, *, rank: int, base_path: str | None = None) -> None:
    """All ranks (under ZeRO-3 the gather is collective; below 3 the parameters are whole on every rank and
    `iter_gathered_buckets` reads them as they are); rank 0 writes sharded safetensors + config + processor.

    With `base_path` (the checkpoint training started from) the frozen tensors (the vision tower under
    `freeze_vision`) are the base's own bytes: a bf16 learner started from an fp32 checkpoint holds them
    rounded to bf16, and they never trained. The trained tensors are the policy the rollout engines run (the
    learner's weights, bf16-valued under bf16 mixed precision), in the base's dtype or the learner's,
    whichever is wider (never rounded down), and the config's dtype follows."""
    from safetensors.torch import save_file

    from actors.weight_sync import checkpoint_names, iter_gathered_buckets, plan_buckets

    total = len(plan_buckets(model, EXPORT_SHARD_BYTES, include_frozen=True))
    names = checkpoint_names(model)
    frozen = {names[name] for name, param in model.named_parameters() if not param.requires_grad}
    base = BaseTensors(base_path) if rank == 0 and base_path else None
    weight_map: dict[str, str] = {}
    total_bytes = 0
    for index, named in enumerate(iter_gathered_buckets(model, EXPORT_SHARD_BYTES, include_frozen=True), start=1):
        if rank != 0:
            continue
        shard = f"model-{index:05d}-of-{total:05d}.safetensors"
        tensors = {name: exported_tensor(name, t, name in frozen, base) for name, t in named}
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
        weight_map.update({name: shard for name in tensors})
        total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
    if rank == 0:
        index_json = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")
        model.config.save_pretrained(out)
        if base is not None and base.config_dtype:  # not the training dtype: the wider of it and the base's
            learner_dtype = next(model.parameters()).dtype
            _set_config_dtype(out / "config.json", widest(base.config_dtype, learner_dtype))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out)
        processor.save_pretrained(out)


def exported_tensor(name: str, tensor, frozen: bool, base: "BaseTensors | None"):
    """What the export writes for checkpoint tensor `name`: a frozen tensor the base holds is the base's;
    any other is the learner's, in the wider of the base's dtype for it and the learner's."""
    import torch

    stored = base.get(name) if base is not None and frozen else None
    if stored is not None and stored.shape == tensor.shape:
        return stored.contiguous()
    dtype = base.dtypes.get(name) if base is not None else None
    return tensor.detach().to("cpu", dtype=getattr(torch, widest(dtype, tensor.dtype))).contiguous().clone()


def widest(base_dtype: str | None, learner_dtype) -> str:
    """The dtype name of the wider of a base checkpoint's dtype (a name, or None) and the learner's."""
    import torch

    learner = str(learner_dtype).removeprefix("torch.")
    if base_dtype is None or not hasattr(torch, base_dtype):
        return learner
    return str(torch.promote_types(getattr(torch, base_dtype), getattr(torch, learner))).removeprefix("torch.")


SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}


class BaseTensors:
    """A local safetensors checkpoint's tensors by name: their dtypes from the files' headers, each tensor read
    on demand (none when `path` is not a local directory, e.g. a hub id)."""

    def __init__(self, path: str) -> None:
        root = Path(path)
        self.files: dict[str, Path] = {}
        self.dtypes: dict[str, str] = {}
        for file in sorted(root.glob("*.safetensors")) if root.is_dir() else []:
            for name, info in safetensors_header(file).items():
                if name != "__metadata__" and info.get("dtype") in SAFETENSORS_DTYPES:
                    self.files[name], self.dtypes[name] = file, SAFETENSORS_DTYPES[info["dtype"]]
        config = root / "config.json"
        fields = json.loads(config.read_text()) if config.is_file() else {}
        self.config_dtype: str | None = fields.get("dtype") or fields.get("torch_dtype")

    def get(self, name: str):
        from safetensors import safe_open

        if name not in self.files:
            return None
        with safe_open(str(self.files[name]), framework="pt") as f:
            return f.get_tensor(name)


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (8-byte little-endian length, then the JSON)."""
    with path.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(length))


def _set_config_dtype(config_path: Path, dtype: str) -> None:
    """Every `dtype`/`torch_dtype` field of a saved config (its sub-configs' too) set to `dtype`."""
    def reset(fields: dict) -> dict:
        return {k: dtype if k in ("dtype", "torch_dtype") else reset(v) if isinstance(v, dict) else v
                for k, v in fields.items()}

    config_path.write_text(json.dumps(reset(json.loads(config_path.read_text())), indent=2, sort_keys=True) + "\n")


def write_manifest(directory: Path, step: int, data_position: dict, world_size: int, model_path: str) -> None:
    files = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}
    manifest = {"format": 1, "step": step, "data_position": data_position, "world_size": world_size,
                "base_model": model_path, "deepspeed_dir": "deepspeed", "deepspeed_tag": DS_TAG,
                "policy_dir": "policy", "created_unix": time.time(), "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def prune(root: Path, keep: int) -> None:
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """This process's RNG states as JSON-able values."""
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": _to_lists(random.getstate()), "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _to_lists(value: Any) -> Any:
    return [_to_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _safe_globals() -> list[Any]:
    """The non-tensor classes a checkpoint of ours holds at ZeRO stage 0, 2 or 3 (found by loading them)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _make_safe_engine_class():
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class _Safe(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            import torch

            with torch.serialization.safe_globals(_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    return _Safe


def SafeTorchCheckpointEngine():  # noqa: N802 - a factory standing in for a class (deepspeed imported lazily)
    """DeepSpeed's torch checkpoint engine, loading with `weights_only=True`."""
    return _make_safe_engine_class()()
