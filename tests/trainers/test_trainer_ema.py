"""EMA pieces that need no process group; the EMA under ZeRO-3 is tested end to end in
tests/trainers/test_trainer_vidar_freeze_ema.py."""
import pytest
import torch

from vidartrain.config import Config, ConfigError
from vidartrain.trainers.ema import check_ema_config, ema_device, unpartition


def test_ema_needs_zero3():
    config = Config()
    config.training.ema_decay = 0.999
    with pytest.raises(ConfigError, match="needs ZeRO stage 3.*has stage 2"):
        check_ema_config(config, {"zero_optimization": {"stage": 2}})
    check_ema_config(config, {"zero_optimization": {"stage": 3}})
    config.training.ema_decay = 0.0
    check_ema_config(config, {"zero_optimization": {"stage": 2}})


def test_validating_the_ema_needs_partitions_in_memory():
    config = Config()
    config.training.ema_decay, config.training.validate_ema = 0.999, True
    zero = {"stage": 3, "offload_param": {"device": "nvme"}}
    with pytest.raises(ConfigError, match="offload_param.device = nvme keeps on disk"):
        check_ema_config(config, {"zero_optimization": zero})
    check_ema_config(config, {"zero_optimization": {**zero, "offload_param": {"device": "cpu"}}})
    config.training.validate_ema = False
    check_ema_config(config, {"zero_optimization": zero})


def test_unpartition_reverses_zero3_slicing_with_padding():
    full = torch.arange(15.0).view(3, 5)
    world = 4
    size = -(-full.numel() // world)  # ZeRO-3: equal partitions, the last one padded
    padded = torch.cat([full.flatten(), torch.full((size * world - full.numel(),), -1.0)])
    assert torch.equal(unpartition(list(padded.split(size)), full.shape), full)


def test_the_ema_lives_with_the_master_weights():
    gpu = torch.device("cuda", 0)
    assert ema_device({"zero_optimization": {"stage": 3}}, gpu) == gpu
    offloaded = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    assert ema_device(offloaded, gpu) == torch.device("cpu")
    assert ema_device({"zero_optimization": {"offload_optimizer": {"device": "none"}}}, gpu) == gpu
