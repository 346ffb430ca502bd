"""Exponential moving average of the trained weights under ZeRO-3 (`training.ema_decay`).

Each rank keeps the EMA of its own partition of the fp32 master weights, the slices DeepSpeed's
ZeRO-3 optimizer steps (`safe_get_local_fp32_param`), so an update is local element-wise work,
no gather: after every optimizer step that was taken,

    ema = d * ema + (1 - d) * master,   d = ema_decay * min(1, updates / ema_warmup)

(`ema_warmup` = 0: d = ema_decay from the first update), starting from the master weights the run
starts from. Frozen parameters (`training.freeze`) have no master copy and need no average. The EMA
lives where the master weights live: on the GPU, or in CPU memory when the optimizer is offloaded
(4 bytes per trained parameter / world size either way).

The partitions travel in each rank's DeepSpeed checkpoint file (`zero_pp_rank_R_mp_rank_00_model_states.pt`,
client state "ema") and come back bit-exactly on resume with the same number of ranks. At the end of
a run they are gathered into a full state dict and exported beside the raw weights (`vidar_ema.pt`).

With `training.validate_ema` the periodic validation also runs on the EMA (`PartitionEMA.swapped_in`):
each rank writes its EMA partitions into the module's ZeRO-3 partitions for the evaluation and puts
the training partitions back afterwards, bit-for-bit.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import safe_get_local_fp32_param
from torch import nn

from vidartrain.config import Config, ConfigError
from vidartrain.distributed.checkpointing import weights_only_loads
from vidartrain.distributed.ds_config import offloads
from vidartrain.errors import CheckpointError


def check_ema_config(config: Config, ds_config: dict[str, Any]) -> None:
    """EMA needs ZeRO-3's per-parameter fp32 partitions; fail before any process group exists."""
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if config.training.ema_decay > 0 and stage != 3:
        raise ConfigError(f"`training.ema_decay` = {config.training.ema_decay} needs ZeRO stage 3 (the EMA is kept "
                          f"per rank over ZeRO-3's fp32 partitions), the DeepSpeed profile has stage {stage}")
    offload = ds_config.get("zero_optimization", {}).get("offload_param") or {}
    if config.training.validate_ema and offload.get("device") == "nvme":
        raise ConfigError("`training.validate_ema` writes the EMA into the parameters' ZeRO-3 partitions, which "
                          "zero_optimization.offload_param.device = nvme keeps on disk; offload the parameters to "
                          "cpu (or none) or set training.validate_ema=false")


def ema_device(ds_config: dict[str, Any], device: torch.device) -> torch.device:
    """Where the fp32 master partitions live: the CPU with an offloaded optimizer, else `device`."""
    return torch.device("cpu") if offloads(ds_config, "offload_optimizer") else device


def unpartition(partitions: list[torch.Tensor], shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """A full tensor from the ZeRO-3 partitions of all ranks (rank order; the last one padded)."""
    numel = int(torch.Size(shape).numel())
    return torch.cat([part.reshape(-1) for part in partitions])[:numel].view(shape)


class PartitionEMA:
    """The EMA of this rank's fp32 master partitions of `module`'s trainable parameters."""

    def __init__(self, module: nn.Module, decay: float, warmup: int, device: torch.device):
        self.decay, self.warmup = decay, warmup
        self.parameters = {name: p for name, p in module.named_parameters() if p.requires_grad}
        self.shadow = {name: safe_get_local_fp32_param(p).detach().to(device, copy=True)
                       for name, p in self.parameters.items()}
        self.updates = 0

    def decay_at(self, update: int) -> float:
        """The decay of the `update`-th update (1-based)."""
        return self.decay if self.warmup == 0 else self.decay * min(1.0, update / self.warmup)

    @torch.no_grad()
    def update(self) -> None:
        """Fold in the master weights after an optimizer step."""
        self.updates += 1
        decay = self.decay_at(self.updates)
        for name, param in self.parameters.items():
            shadow = self.shadow[name]
            shadow.mul_(decay).add_(safe_get_local_fp32_param(param).to(shadow.device), alpha=1.0 - decay)

    @contextlib.contextmanager
    def swapped_in(self, optimizer: Any) -> Iterator[None]:
        """Inside the block the module computes with the EMA: each trained parameter's ZeRO-3 partition
        (`ds_tensor`) holds its EMA cast to the partition's dtype (as the export rounds it); on leaving,
        the training partitions come back bit-for-bit. Collective: every rank must enter it.

        A forward gathers a parameter from the partitions, but ZeRO-3 keeps small "persistent" parameters
        (stage3_param_persistence_threshold) gathered in full between steps, so writing a partition alone
        would not change what they compute. `optimizer` (DeepSpeed's ZeRO-3 optimizer) releases every
        gathered parameter and re-gathers the persistent ones on both sides of each write, with the calls
        its engine makes around a checkpoint save (which leave the training bit-identical)."""
        training = {name: param.ds_tensor.detach().clone() for name, param in self.parameters.items()}

        def write(partitions: dict[str, torch.Tensor]) -> None:
            optimizer.checkpoint_event_prologue()  # every parameter released to its partition
            for name, param in self.parameters.items():
                param.ds_tensor.copy_(partitions[name])
            optimizer.checkpoint_event_epilogue()  # persistent parameters gathered from the new partitions

        write(self.shadow)
        try:
            yield
        finally:
            write(training)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates,
                "world_size": dist.get_world_size(), "rank": dist.get_rank(),
                "shapes": {name: tuple(p.ds_shape) for name, p in self.parameters.items()},
                "partitions": {name: shadow.detach().cpu().clone() for name, shadow in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any] | None, source: Path) -> None:
        """Restore the partitions saved by the same rank of a run with as many ranks and the same
        trainable parameters; anything else is an error (partitions cannot be re-cut here)."""
        if state is None:
            raise CheckpointError(f"{source} holds no EMA (saved with training.ema_decay=0); resume with "
                                  f"training.ema_decay=0 or start a new run")
        if state["world_size"] != dist.get_world_size() or state["rank"] != dist.get_rank():
            raise CheckpointError(f"{source}: the EMA was saved as partitions of {state['world_size']} ranks, this run "
                                  f"has {dist.get_world_size()}; resume on {state['world_size']} ranks, or set "
                                  f"training.ema_decay=0 to continue without the EMA")
        if state["partitions"].keys() != self.shadow.keys():
            raise CheckpointError(f"{source}: the EMA covers other parameters than this run trains "
                                  f"(was training.freeze changed?)")
        for name, shadow in self.shadow.items():
            shadow.copy_(state["partitions"][name])
        self.updates = int(state["updates"])

    @torch.no_grad()
    def full_state_dict(self, rank: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The EMA of every trainable parameter, gathered one at a time, in `dtype` on rank 0
        ({} elsewhere). Collective: every rank must call it."""
        full: dict[str, torch.Tensor] = {}
        for name, shadow in self.shadow.items():
            # collectives run on the accelerator (nccl), wherever the EMA lives
            local = shadow.to(get_accelerator().current_device_name())
            parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, local)
            if rank == 0:
                full[name] = unpartition(parts, self.parameters[name].ds_shape).to("cpu", dtype, copy=True)
        return full


def ema_state_dict_from_checkpoint(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The fp32 EMA of every trainable parameter from a saved checkpoint folder (step_XXXXXXXX),
    from the partitions in its per-rank model-state files."""
    checkpoint = Path(checkpoint)
    files = sorted(checkpoint.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"),
                   key=lambda path: int(path.name.split("_")[3]))
    if not files:
        raise CheckpointError(f"{checkpoint}: no ZeRO-3 model-state files (zero_pp_rank_*_mp_rank_00_model_states.pt)")
    with weights_only_loads():  # DeepSpeed's files hold a few plain Python objects besides tensors; nothing that runs
        states = [torch.load(path, map_location="cpu").get("ema") for path in files]
    if any(state is None for state in states):
        raise CheckpointError(f"{checkpoint} holds no EMA (the run had training.ema_decay=0)")
    if len(states) != states[0]["world_size"]:
        raise CheckpointError(f"{checkpoint}: {len(states)} rank files, but the EMA was saved by "
                              f"{states[0]['world_size']}")
    return {name: unpartition([state["partitions"][name] for state in states], shape)
            for name, shape in states[0]["shapes"].items()}
