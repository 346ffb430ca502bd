"""IDM training: the masked inverse dynamics model on (frame, action) pairs of the same shards.

Loss (Eq. 4, as upstream `train_idm.py --use_normalization`): SmoothL1 (beta 1) between predicted
and true actions, both normalised with the IDM's own statistics, plus `loss.mask_weight` (lambda,
3e-3) times the mean soft mask. Reported as well: the two terms, the mean mask, and the paper's
action accuracy (max abs error < 0.06 on joints and < 0.6 on the grippers, `idm.gripper_dims`).

Precision: the IDM's BatchNorm keeps float32 running statistics, which ZeRO-3 leaves unconverted,
so the engine must hold float32 weights (`distributed.mixed_precision: fp32`); on accelerators the
forward runs under bf16 autocast, as upstream's `--mixed_precision bf16` does.

Input size: the published IDM sees 518x518 frames. Frames smaller than that in both dimensions
(debug configs) are fed at their own size instead of being blown up; the IDM works at any size.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vidartrain.config import Config, ConfigError
from vidartrain.losses import action_accuracy, idm_loss
from vidartrain.data.shard_index import DataInfo, merge_action_statistics
from vidartrain.errors import DataError
from vidartrain.models.idm import (IDM, IdmArchitecture, idm_input_size, load_idm, preprocess_frames,
                                   save_idm_state_dict)
from vidartrain.trainers.base import Stage

log = logging.getLogger(__name__)


def action_space(config: Config, data: DataInfo) -> tuple[list[float], list[float]]:
    """Mean and std the IDM de-normalises its actions with: `idm.action_mean` / `idm.action_std` when
    set, else the exact statistics of the training shards' actions (pooled over a mixture)."""
    if config.idm.action_mean is not None:
        check_data_action_dim(data, len(config.idm.action_mean), "`idm.action_mean` / `idm.action_std`")
        log.info("IDM: action statistics from the config (%d dimensions)", len(config.idm.action_mean))
        return list(config.idm.action_mean), list(config.idm.action_std)
    try:
        stats = merge_action_statistics(data.action_statistics(), "`data.shards`")
    except ValueError as error:
        raise ConfigError(str(error)) from None
    constant = [dim for dim, std in enumerate(stats["std"]) if std == 0]
    if constant:  # the IDM divides by the std: its loss would be NaN on every step
        raise ConfigError(f"the actions of `data.shards` ({', '.join(path for path, _ in data.actions)}) never vary "
                          f"in dimension(s) {constant} (std 0), which the IDM cannot normalise: set "
                          f"`idm.action_mean` and `idm.action_std` (a std > 0 there, e.g. 1.0), or drop the "
                          f"dimension from the actions")
    log.info("IDM: action statistics of the training shards: %d dimensions over %d action rows",
             stats["dim"], stats["count"])
    return stats["mean"], stats["std"]


def check_data_action_dim(data: DataInfo, num_actions: int, source: str) -> None:
    """The IDM predicts `num_actions` actions (the length of the statistics of `source`): the shards must
    have as many, or the first step would fail after the engine is built."""
    for path, dim in data.action_dims():
        if dim != num_actions:
            raise ConfigError(f"{source}: the IDM predicts {num_actions} action dimensions, the shards {path} "
                              f"hold {dim}")


def check_no_other_statistics(config: Config, model: IDM) -> None:
    """A fine-tuned idm.pt keeps the action statistics its head was trained with: `idm.action_mean` /
    `idm.action_std` asking for others would otherwise be ignored without a word."""
    if config.idm.action_mean is None:
        return
    asked = (torch.tensor(config.idm.action_mean, dtype=torch.float32),
             torch.tensor(config.idm.action_std, dtype=torch.float32))
    if asked[0].shape != model.train_mean.shape or not (torch.equal(asked[0], model.train_mean)
                                                        and torch.equal(asked[1], model.train_std)):
        raise ConfigError(f"`idm.action_mean` / `idm.action_std` are set, but `model.idm_path` = "
                          f"{config.model.idm_path} is fine-tuned with its own statistics (train_mean "
                          f"{[round(v, 4) for v in model.train_mean.tolist()]}): drop them, or train a new IDM "
                          f"(model.idm_path: null)")


def check_gripper_dims(gripper_dims: list[int], num_actions: int, whose: str = "the IDM's") -> None:
    outside = [d for d in gripper_dims if d >= num_actions]
    if outside:
        raise ConfigError(f"`idm.gripper_dims` = {gripper_dims}: {outside} outside {whose} {num_actions} "
                          f"action dimensions (the default [6, 13] is the 14-dim bimanual layout; set "
                          f"--set idm.gripper_dims=[...] for this robot, [] for none)")


def unwrap_idm(module: nn.Module) -> IDM:
    """The IDM inside a DeepSpeed engine, or the bare IDM."""
    model = getattr(module, "module", module)
    if not isinstance(model, IDM):
        raise TypeError(f"the IDM stage trains an IDM, got {type(model).__name__}")
    return model


class IdmStage(Stage):
    """Trains `IDM` from scratch (or from `model.idm_path`); exports idm.pt in the upstream format."""

    name = "idm"
    export_dtype = torch.float32  # upstream idm.pt holds float32 weights; the engine trains float32
    loader_options = {"mode": "frames"}  # (frame, action) pairs

    def __init__(self, config: Config, data: DataInfo) -> None:
        super().__init__(config, data)
        if config.distributed.sequence_parallel_size != 1:
            raise ConfigError(f"`distributed.sequence_parallel_size` = {config.distributed.sequence_parallel_size}: "
                              f"sequence parallelism splits the DiT's tokens; the IDM trains with 1")
        if config.model.checkpointing != "none":
            raise ConfigError(f"`model.checkpointing` is {config.model.checkpointing!r}, but activation "
                              f"checkpointing is for the DiT: set `model.checkpointing: none` (or "
                              f"`model.gradient_checkpointing: false`) for the IDM")
        if config.model.compile:
            raise ConfigError("`model.compile` is true, but it compiles the DiT's blocks: leave it unset for the IDM")
        self.input_size = idm_input_size(config.data.height, config.data.width)

    def build_model(self) -> nn.Module:
        config = self.config
        try:
            architecture = IdmArchitecture.from_config(config.model.idm_config, "`model.idm_config`")
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if config.model.idm_path is not None:
            model = load_idm(config.model.idm_path)
            if config.model.idm_config is not None and model.architecture != architecture:
                raise ConfigError(f"`model.idm_config` asks for {architecture}, but `model.idm_path` = "
                                  f"{config.model.idm_path} holds {model.architecture}: drop one of them")
            log.info("IDM: fine-tuning %s (its own action statistics)", config.model.idm_path)
            check_data_action_dim(self.data, model.train_mean.numel(), f"`model.idm_path` = {config.model.idm_path}")
            check_no_other_statistics(config, model)
        else:
            mean, std = action_space(config, self.data)
            model = IDM(mean, std, architecture)
        check_gripper_dims(config.idm.gripper_dims, model.train_mean.numel())
        log.info("IDM: %s, %d action dimensions (grippers %s), %.1fM parameters", model.architecture,
                 model.train_mean.numel(), config.idm.gripper_dims,
                 sum(p.numel() for p in model.parameters()) / 1e6)
        log.info("IDM: learning rate %.3g, warmup %d, weight decay %.3g, lambda %.3g, frames %dx%d -> input %dx%d",
                 config.training.lr, config.training.warmup, config.training.weight_decay,
                 config.loss.mask_weight, config.data.height, config.data.width, *self.input_size)
        return model.train().requires_grad_(True)

    def load_frozen(self, device: torch.device) -> None:
        """Nothing is frozen: the IDM reads pixels."""
        self.device = device

    def training_loss(self, module: nn.Module, batch: dict[str, Any], generator: torch.Generator
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        idm = unwrap_idm(module)
        weight_dtype = idm.model.mask_model.out.weight.dtype
        if weight_dtype != torch.float32:
            raise ConfigError(f"the IDM's weights are {weight_dtype}: its BatchNorm statistics stay float32, "
                              f"so train it with float32 weights (distributed.mixed_precision: fp32)")
        actions = batch["action"].to(self.device, torch.float32)
        num_actions = idm.train_mean.numel()
        if actions.ndim != 2 or actions.shape[1] != num_actions:
            raise DataError(f"batch {batch['__key__'][:3]}: actions {tuple(actions.shape)}, the IDM predicts "
                            f"{num_actions} action dimensions")
        images = preprocess_frames(batch["frame"].to(self.device), self.input_size)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type != "cpu"):
            predicted, mask = module(images, return_mask=True)
        predicted, mask = predicted.float(), mask.float()
        loss, action_loss, mask_loss = idm_loss(predicted, actions, mask, idm.train_mean, idm.train_std,
                                                self.config.loss.mask_weight)
        count = torch.tensor(float(actions.shape[0]))
        metrics = {name: torch.stack([value.detach().cpu() * count, count]) for name, value in (
            ("action_loss", action_loss), ("mask_loss", mask_loss), ("mask_mean", mask.mean()),
            ("action_accuracy", action_accuracy(predicted.detach(), actions,
                                                gripper_dims=self.config.idm.gripper_dims)))}
        return loss, metrics

    def tokens_in(self, batch: dict[str, Any]) -> int:
        """Frames of the batch (the IDM's unit of work)."""
        return int(batch["frame"].shape[0])

    def export(self, state_dict: dict[str, torch.Tensor], path: Path) -> None:
        """idm.pt as upstream's `train_idm.py` writes it ({"model_state_dict", "step"}; the ZeRO-3
        optimizer state is partitioned and lives in the DeepSpeed checkpoint), float32 tensors."""
        save_idm_state_dict(state_dict, path, step=self.config.training.num_steps)
