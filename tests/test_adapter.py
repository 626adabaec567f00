"""adapter.py: finding the adapter folder, validating adapter_config.json, reading tensors (header or pickle)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import edit_json
from stream_merge.adapter import AdapterReader, find_adapter_dir, load_adapter
from stream_merge.errors import InputError, UnsupportedAdapterError


def test_the_folder_or_its_single_named_subfolder(pair: tuple[Path, Path], tmp_path: Path) -> None:
    _, adapter = pair
    assert find_adapter_dir(adapter) == adapter
    wrapper = tmp_path / "wrap"
    shutil.copytree(adapter, wrapper / "my-adapter")
    assert find_adapter_dir(wrapper) == wrapper / "my-adapter"
    shutil.copytree(adapter, wrapper / "other")
    with pytest.raises(InputError, match="holds 2 adapters"):
        find_adapter_dir(wrapper)
    with pytest.raises(InputError, match="not found"):
        find_adapter_dir(tmp_path / "nowhere")
    with pytest.raises(InputError, match="not a file"):
        find_adapter_dir(adapter / "adapter_config.json")
    with pytest.raises(InputError, match="no adapter_config.json"):
        find_adapter_dir(_empty(tmp_path))


def _empty(tmp_path: Path) -> Path:
    d = tmp_path / "empty"
    d.mkdir()
    return d


@pytest.mark.parametrize("field,value,match", [
    ("r", 0, "positive integer"), ("r", 2.5, "positive integer"), ("r", "8", "finite number"),
    ("lora_alpha", float("nan"), "finite number"), ("bias", "some", "bias must be"),
    ("rank_pattern", ["q_proj"], "must be an object"), ("alpha_pattern", {"q_proj": -1}, "positive number"),
])
def test_invalid_values_name_their_key(field: str, value: object, match: str, pair: tuple[Path, Path]) -> None:
    _, adapter = pair
    edit_json(adapter / "adapter_config.json", **{field: value})
    with pytest.raises(InputError, match=match) as exc:
        load_adapter(adapter)
    assert exc.value.key == field


def test_dora_with_lora_bias_and_mutating_inits_are_refused(pair: tuple[Path, Path]) -> None:
    _, adapter = pair
    edit_json(adapter / "adapter_config.json", use_dora=True, lora_bias=True)
    with pytest.raises(InputError, match="cannot be combined"):
        load_adapter(adapter)
    edit_json(adapter / "adapter_config.json", use_dora=False, lora_bias=False, init_lora_weights="pissa_niter_4")
    with pytest.raises(UnsupportedAdapterError, match="residual base") as exc:
        load_adapter(adapter)
    assert "path_initial_model_for_weight_conversion" in exc.value.one_line()


def test_settings_and_tensor_headers(pair: tuple[Path, Path]) -> None:
    _, adapter = pair
    edit_json(adapter / "adapter_config.json", modules_to_save="lm_head", use_rslora=True)
    spec = load_adapter(adapter, weight=0.5, label="mine")
    assert spec.settings.r == 4 and spec.settings.use_rslora and spec.settings.modules_to_save == ("lm_head",)
    assert spec.weight == 0.5 and spec.label == "mine" and len(spec.tensors) == 28
    assert all(t.dtype == "F32" for t in spec.tensors)


def test_pickled_weights_need_allow_pickle_and_read_the_same(pair: tuple[Path, Path]) -> None:
    _, adapter = pair
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(sd, adapter / "adapter_model.bin")
    with pytest.raises(InputError, match="pickle"):
        load_adapter(adapter)
    spec = load_adapter(adapter, allow_pickle=True)
    reader = AdapterReader(spec)
    key = next(iter(sd))
    assert torch.equal(reader.tensor(key), sd[key]) and torch.equal(reader.rows(key, 1, 3), sd[key][1:3])
    reader.close()


def test_missing_or_empty_weights(pair: tuple[Path, Path]) -> None:
    _, adapter = pair
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(InputError, match="no adapter_model.safetensors"):
        load_adapter(adapter)
    torch.save({}, adapter / "adapter_model.bin")
    with pytest.raises(InputError, match="holds no tensors"):
        load_adapter(adapter, allow_pickle=True)
