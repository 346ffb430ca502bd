"""Reading published DiT checkpoint directories and applying vidar.pt-style fine-tunes."""
import json
import os
import re

import pytest
import torch
from conftest import fixture_path
from safetensors.torch import load_file, save_file
from test_wan_dit import tiny_config, write_published_layout

from vidartrain.errors import CheckpointError
from vidartrain.models.wan.checkpoint import load_finetuned, read_model_config, read_state_dict
from vidartrain.models.wan.model import WanModel


@pytest.fixture(scope="module")
def state():
    return load_file(fixture_path("wan_reference", "dit_tiny_weights.safetensors"))


def write_single_file(directory, config: dict, state: dict) -> None:
    save_file(state, directory / "diffusion_pytorch_model.safetensors")
    (directory / "config.json").write_text(json.dumps(config))


def test_config_round_trips_through_config_json(tmp_path, state):
    with torch.device("meta"):
        config = WanModel(**tiny_config()).config()
    assert config == tiny_config()
    write_single_file(tmp_path, config, state)
    assert WanModel.from_pretrained(tmp_path, dtype=torch.float32).config() == config


def test_single_file_in_bf16_loads_every_tensor(tmp_path, state):
    write_single_file(tmp_path, tiny_config(), state)
    model = WanModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    assert all(p.dtype == torch.bfloat16 and not p.is_meta and p.requires_grad for p in model.parameters())
    for key, tensor in state.items():
        assert torch.equal(loaded[key], tensor.to(torch.bfloat16)), key


def test_sharded_layout_loads_like_the_single_file(tmp_path, state):
    write_published_layout(tmp_path, tiny_config(), state)
    model = WanModel.from_pretrained(tmp_path, dtype=torch.float32)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[key]), key


def test_absent_config_keys_take_the_ti2v_defaults(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "WanModel", "dim": 96, "num_heads": 3}))
    assert read_model_config(tmp_path, WanModel) == {"dim": 96, "num_heads": 3}
    with torch.device("meta"):
        model = WanModel(**read_model_config(tmp_path, WanModel))
    assert (model.dim, model.num_heads) == (96, 3)
    assert (model.in_dim, model.out_dim, model.ffn_dim, model.num_layers, model.text_len, model.text_dim) == \
        (48, 48, 14336, 30, 512, 4096)


def test_unknown_config_key_is_an_error(tmp_path, state):
    write_single_file(tmp_path, {**tiny_config(), "hidden_size": 5}, state)
    with pytest.raises(CheckpointError, match="unknown keys \\['hidden_size'\\]"):
        WanModel.from_pretrained(tmp_path)


def test_missing_key_is_named(tmp_path, state):
    write_single_file(tmp_path, tiny_config(), {k: v for k, v in state.items() if k != "head.modulation"})
    with pytest.raises(CheckpointError, match="head.modulation"):
        WanModel.from_pretrained(tmp_path)


def test_unexpected_key_is_named(tmp_path, state):
    write_single_file(tmp_path, tiny_config(), {**state, "blocks.9.norm3.weight": torch.ones(96)})
    with pytest.raises(CheckpointError, match="unexpected key 'blocks.9.norm3.weight'"):
        WanModel.from_pretrained(tmp_path)


def test_wrong_shape_is_named(tmp_path, state):
    write_single_file(tmp_path, tiny_config(), {**state, "head.head.bias": torch.zeros(7)})
    with pytest.raises(CheckpointError, match=r"'head.head.bias' has shape \[7\].*expects \[192\]"):
        WanModel.from_pretrained(tmp_path)


def test_missing_checkpoint_files_are_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config()))
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors"):
        WanModel.from_pretrained(tmp_path)


@pytest.fixture
def tiny_model(state):
    model = WanModel(**tiny_config())
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_finetune_applies_and_reports_missing_and_unexpected(tmp_path, tiny_model, suffix):
    delta = {"head.head.bias": torch.full((192,), 0.5), "blocks.1.modulation": torch.zeros(1, 6, 96),
             "extra.step": torch.zeros(1)}
    path = tmp_path / f"vidar{suffix}"
    torch.save(delta, path) if suffix == ".pt" else save_file(delta, path)
    result = load_finetuned(tiny_model, path)
    assert result.unexpected_keys == ["extra.step"]
    assert len(result.missing_keys) == 69 - 2 and "head.head.bias" not in result.missing_keys
    assert torch.equal(tiny_model.head.head.bias, delta["head.head.bias"])
    assert torch.equal(tiny_model.blocks[1].modulation, delta["blocks.1.modulation"])


def test_finetune_with_no_matching_key_is_refused(tmp_path, tiny_model):
    path = tmp_path / "vidar.pt"
    torch.save({"module.head.head.bias": torch.zeros(192)}, path)
    with pytest.raises(CheckpointError, match="none of its 1 keys.*module.head.head.bias"):
        load_finetuned(tiny_model, path)


def test_finetune_with_wrong_shape_is_refused_and_nothing_changes(tmp_path, tiny_model, state):
    path = tmp_path / "vidarc.pt"
    torch.save({"head.head.bias": torch.zeros(192), "blocks.0.ffn.0.weight": torch.zeros(384, 96)}, path)
    with pytest.raises(CheckpointError, match=r"'blocks.0.ffn.0.weight' has shape \[384, 96\].*\[192, 96\]"):
        load_finetuned(tiny_model, path)
    assert torch.equal(tiny_model.head.head.bias, state["head.head.bias"])


def test_finetune_with_unmerged_lora_adapters_is_refused_and_nothing_changes(tmp_path, tiny_model, state):
    path = tmp_path / "vidar.pt"
    torch.save({"head.head.bias": torch.zeros(192), "blocks.0.ffn.0.lora_A.weight": torch.zeros(4, 96),
                "blocks.0.ffn.0.lora_B.weight": torch.zeros(384, 4)}, path)
    with pytest.raises(CheckpointError, match=r"holds 2 LoRA adapter tensors .*'blocks.0.ffn.0.lora_A.weight'.*"
                                              r"would drop them"):
        load_finetuned(tiny_model, path)
    assert torch.equal(tiny_model.head.head.bias, state["head.head.bias"])


def test_finetune_file_that_is_not_a_state_dict_is_refused(tmp_path, tiny_model):
    path = tmp_path / "vidar.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_finetuned(tiny_model, path)
    # A state dict wrapped in another dict was reported as "got dict": name what is not a tensor.
    torch.save({"state_dict": {"head.head.bias": torch.zeros(192)}, "epoch": 3}, path)
    with pytest.raises(CheckpointError, match=r"expected a state dict .*not tensors: 'state_dict' \(dict\), "
                                              r"'epoch' \(int\)"):
        load_finetuned(tiny_model, path)


def truncated(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


@pytest.mark.parametrize("suffix, reason", [(".pt", "torch.load cannot read it .*: PytorchStreamReader failed"),
                                            (".safetensors", "not a readable safetensors file, truncated or corrupt")])
def test_truncated_weights_are_a_checkpoint_error_naming_the_file(tmp_path, tiny_model, state, suffix, reason):
    path = tmp_path / f"vidar{suffix}"
    torch.save(state, path) if suffix == ".pt" else save_file(state, path)
    truncated(path)
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))}: {reason}"):
        load_finetuned(tiny_model, path)


def test_truncated_small_torch_file_is_a_checkpoint_error_naming_it(tmp_path):
    # Under 64 KiB torch's zip reader fails with a bare OSError (EINVAL) that names no file.
    path = tmp_path / "idm.pt"
    torch.save({"weight": torch.zeros(64, 64)}, path)
    truncated(path)
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))}: torch.load cannot read it"):
        read_state_dict(path)


def test_truncated_published_shard_is_a_checkpoint_error_naming_it(tmp_path, state):
    write_single_file(tmp_path, tiny_config(), state)
    truncated(tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors: not a readable safetensors"):
        WanModel.from_pretrained(tmp_path)


def test_an_idm_checkpoint_given_as_dit_weights_is_named_as_such(tmp_path, tiny_model):
    path = tmp_path / "idm.pt"
    torch.save({"model_state_dict": {"train_mean": torch.zeros(14)}, "step": 7}, path)
    with pytest.raises(CheckpointError, match=r"idm.pt is an IDM checkpoint \(\{'model_state_dict': ..., 'step': 7\}"
                                              r".*not model weights"):
        load_finetuned(tiny_model, path)


def test_weights_that_pickle_code_are_refused_unrun(tmp_path, tiny_model):
    path = tmp_path / "vidar.pt"
    torch.save({"head.head.bias": RunsCode()}, path)
    with pytest.raises(CheckpointError, match="vidar.pt: refusing to load it: .*: posix.system"):
        load_finetuned(tiny_model, path)


class RunsCode:
    def __reduce__(self):
        return os.system, ("false",)
