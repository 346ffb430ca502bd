"""`training.freeze` on the model alone (no process group): which parameters freeze, which errors."""
import pytest
import torch
from torch import nn

from vidartrain.config import ConfigError
from vidartrain.trainers.freezing import freeze_parameters


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    model.text_embedding = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4))
    model.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(12))
    return model


def test_patterns_freeze_the_matching_parameters_and_helper_names_are_no_ops():
    model = small_model()
    frozen = freeze_parameters(model, ["t5", "vae", "text_embedding.*", "blocks.[0-9].*"])
    assert frozen == ["text_embedding.0.weight", "text_embedding.0.bias", "text_embedding.2.weight",
                      "text_embedding.2.bias"] + [f"blocks.{i}.{k}" for i in range(10) for k in ("weight", "bias")]
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["blocks.10.weight", "blocks.10.bias", "blocks.11.weight", "blocks.11.bias"]
    assert freeze_parameters(small_model(), ["t5", "vae", "idm"]) == []


def test_a_pattern_matching_nothing_is_an_error_naming_it():
    with pytest.raises(ConfigError, match=r"\['text_embeding\.\*'\] match no parameter"):
        freeze_parameters(small_model(), ["text_embeding.*", "blocks.0.*"])


def test_freezing_everything_is_an_error():
    with pytest.raises(ConfigError, match="freezes every trained parameter"):
        freeze_parameters(small_model(), ["*"])
