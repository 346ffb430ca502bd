"""EMA pieces that need no process group; the EMA under ZeRO-3 is tested end to end in
tests/trainers/test_trainer_vidar_freeze_ema.py."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vidartrain.config import Config, ConfigError
from vidartrain.trainers import base, ema
from vidartrain.trainers.ema import PartitionEMA, check_ema_config, ema_device, unpartition


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


class LossScaledEngine:
    """The part of DeepSpeed's engine `Trainer.train_step` uses, with fp16 dynamic loss scaling's skip: the
    steps in `overflowing` had gradients that overflowed, so `step()` leaves the weights as they were and
    `was_step_applied()` says so (DeepSpeed's `_step_applied`)."""

    def __init__(self, module: nn.Module, overflowing: set[int]):
        self.module, self.overflowing = module, overflowing
        self.optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
        self.steps, self.applied = 0, False

    def train(self) -> None:
        pass

    def get_lr(self) -> list[float]:
        return [0.5]

    def set_gradient_accumulation_boundary(self, boundary: bool) -> None:
        pass

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.applied = self.steps not in self.overflowing
        if self.applied:
            self.optimizer.step()
        self.optimizer.zero_grad()
        self.steps += 1

    def was_step_applied(self) -> bool:
        return self.applied


class SquaredOutput:
    """A stage whose loss is the mean square of the module's output on the batch's `x`."""

    def training_loss(self, engine, batch, generator):
        return engine.module(batch["x"]).pow(2).mean(), {}

    def tokens_in(self, batch) -> int:
        return len(batch["x"])


def test_a_step_skipped_for_overflowing_gradients_does_not_move_the_ema(monkeypatch):
    """fp16 loss scaling skips the update of a step whose gradients overflowed. The EMA counted that step as an
    update: it folded in the unchanged weights and advanced its warm-up, so the average lagged and its decay ran
    ahead of the updates actually made."""
    monkeypatch.setattr(base.dist, "all_reduce", lambda tensor, op=None: None)  # one rank: the sum is itself
    monkeypatch.setattr(base.dist, "all_gather_object", lambda gathered, obj: gathered.__setitem__(0, obj))
    # the module's own parameters stand in for ZeRO-3's fp32 master partitions
    monkeypatch.setattr(ema, "safe_get_local_fp32_param", lambda param: param.detach())
    torch.manual_seed(0)
    module = nn.Linear(3, 2)
    trainer = object.__new__(base.Trainer)
    trainer.config, trainer.device, trainer.accumulation = Config(), torch.device("cpu"), 1
    trainer.rank, trainer.world_size = 0, 1
    trainer.layout = SimpleNamespace(dp_rank=0, dp_size=1, sp_size=1)
    trainer.stage, trainer.engine = SquaredOutput(), LossScaledEngine(module, overflowing={1})
    trainer.nonfinite_in_a_row = trainer.nonfinite_total = 0
    trainer.ema = PartitionEMA(module, decay=0.9, warmup=4, device=torch.device("cpu"))
    expected = {name: p.detach().clone() for name, p in module.named_parameters()}
    batches = iter({"__key__": [str(step)], "x": torch.randn(1, 3)} for step in range(3))
    applied = 0
    for step in range(3):
        trainer.step = step
        before = {name: p.detach().clone() for name, p in module.named_parameters()}
        record = trainer.train_step(batches)
        assert record["finite"]
        moved = any(not torch.equal(before[name], p) for name, p in module.named_parameters())
        assert moved == (step != 1)
        if moved:  # the weights the EMA folds in: those after an applied step, with the decay of its count
            applied += 1
            decay = trainer.ema.decay_at(applied)
            expected = {name: decay * expected[name] + (1 - decay) * p.detach()
                        for name, p in module.named_parameters()}
        assert trainer.ema.updates == applied
        for name, shadow in trainer.ema.shadow.items():
            torch.testing.assert_close(shadow, expected[name], rtol=0, atol=1e-7)
