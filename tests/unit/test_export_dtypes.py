"""actors/checkpoint.py's export rules, on tensors built here: frozen tensors are the base checkpoint's own
bytes, trained ones never rounded below the wider of the base's dtype and the learner's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from actors.checkpoint import BaseTensors, _set_config_dtype, exported_tensor, safetensors_header, widest


@pytest.fixture()
def base(tmp_path: Path) -> BaseTensors:
    save_file({"visual.w": torch.tensor([0.1, 0.2, 0.3]), "model.w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float32", "text_config": {"dtype": "float32"}}))
    return BaseTensors(str(tmp_path))


def test_base_tensors_reads_dtypes_from_the_header_and_tensors_on_demand(base: BaseTensors, tmp_path) -> None:
    assert base.dtypes == {"visual.w": "float32", "model.w": "bfloat16"} and base.config_dtype == "float32"
    assert safetensors_header(tmp_path / "model.safetensors")["visual.w"]["shape"] == [3]
    assert torch.equal(base.get("visual.w"), torch.tensor([0.1, 0.2, 0.3])) and base.get("missing") is None
    assert BaseTensors("Qwen/Qwen2.5-VL-7B-Instruct").files == {}  # a hub id: nothing local to read


def test_widest_never_rounds_down() -> None:
    assert widest("float32", torch.bfloat16) == "float32"
    assert widest("bfloat16", torch.float32) == "float32"
    assert widest("bfloat16", torch.bfloat16) == "bfloat16"
    assert widest(None, torch.bfloat16) == "bfloat16"


def test_frozen_tensors_are_the_bases_and_trained_ones_are_widened(base: BaseTensors) -> None:
    rounded = torch.tensor([0.1, 0.2, 0.3]).bfloat16()  # what a bf16 learner holds of the frozen tensor
    frozen = exported_tensor("visual.w", rounded, frozen=True, base=base)
    assert frozen.dtype == torch.float32 and torch.equal(frozen, torch.tensor([0.1, 0.2, 0.3]))
    trained = exported_tensor("visual.w", rounded, frozen=False, base=base)  # trained: the learner's values
    assert trained.dtype == torch.float32 and torch.equal(trained, rounded.float())
    kept = exported_tensor("model.w", torch.tensor([1.0078125, 2.0]), frozen=False, base=base)  # bf16 base, fp32 learner
    assert kept.dtype == torch.float32 and kept[0].item() == 1.0078125
    assert exported_tensor("other", rounded, frozen=True, base=None).dtype == torch.bfloat16  # no base: as held


def test_config_dtype_is_set_in_every_sub_config(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"dtype": "bfloat16", "vision_config": {"torch_dtype": "bfloat16"}, "n": 1}))
    _set_config_dtype(path, "float32")
    assert json.loads(path.read_text()) == {"dtype": "float32", "vision_config": {"torch_dtype": "float32"}, "n": 1}
