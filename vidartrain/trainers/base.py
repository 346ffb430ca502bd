"""The DeepSpeed training engine every stage runs on.

A stage (Vidar stage 1, Vidarc self-forcing, the IDM) says *what* is trained; `Trainer` says *how*:
engine, optimizer, schedule, accumulation, checkpoints, monitoring. The trainer drives a `Stage`:

    class MyStage(Stage):
        name = "vidar"
        def __init__(self, config, data)
            # The run's Config and its training shards' DataInfo (index.json, read once per run):
            # everything training_loss needs is set here, nothing later but the frozen models.
        def build_model(self) -> nn.Module
            # The trainable module, handed to deepspeed.initialize. Built identically on every rank
            # (the trainer seeds torch with the same seed first): ZeRO-3 keeps each rank's own slice
            # of the parameters it is given, so ranks must agree on them.
        def load_frozen(self, device) -> None
            # Frozen helpers (VAE, umT5, IDM) in bf16, requires_grad False, outside the optimizer;
            # nothing when the shards hold pre-encoded tensors.
        loader_options = {...}  # optional: extra vidartrain.data.dataset.build_loader arguments
            # for the "train" loader (data.shards: infinite, shuffled) and the "val" loader
            # (data.val_shards: one pass). Batches are dicts with "__key__": list[str].
        def training_loss(self, module, batch, generator) -> (loss, metrics)
            # loss: 0-dim float tensor of this micro-batch. generator: torch.Generator seeded by
            # (seed, step, micro-batch, rank) - all noise must come from it, which makes resumed
            # runs bit-identical. metrics: name -> tensor([sum, count]) summed over micro-batches
            # and ranks, logged as sum / count (e.g. loss per sigma bucket).
        def validation_loss(self, module, batch, generator) -> (loss, metrics)
            # optional: the same for one held-out sample (a batch of one), `generator` seeded by its key;
            # by default its training loss.
        def tokens_in(self, batch) -> int          # DiT tokens of the batch, for tokens/s
        def export(self, state_dict, path) -> None  # write the final weights (rank 0 only)

The model never sees DeepSpeed; the trainer never sees tar files.

ZeRO-3 construction: "load, then partition". Every rank builds the model in bf16 on the CPU (the
real checkpoint is read from memory-mapped safetensors straight into bf16 tensors, so a node's
ranks share the page cache and nothing exists in fp32), then `deepspeed.zero.Init(module=model)`
partitions it one parameter at a time (moved to the device, broadcast from rank 0, cut), so the
whole model never sits on one GPU either. The fp32 master weights and Adam moments exist only as
each rank's 1/world slice inside DeepSpeed's optimizer.

Gradient accumulation draws a fresh micro-batch from the loader for every micro-step
(metrics.jsonl records every sample key of every step, so this is checked). The accumulation
boundary is set explicitly so that a step with a non-finite loss on any rank can be dropped whole:
its gradients are discarded, the weights and the learning-rate schedule stay where they were, and
the step is counted; `training.max_nonfinite_steps` such steps in a row stop the run with a
checkpoint.

Checkpoints: output_dir/checkpoints/step_XXXXXXXX, written by `engine.save_checkpoint` on all
ranks (ZeRO shards, optimizer, LR scheduler, client_state = step, loader position, RNG states).
A checkpoint counts only once every rank has finished writing: then rank 0 writes its COMPLETE
marker (with the size and sha256 of every file, hashed by all ranks in turn, and the resolved config)
and atomically replaces `latest`. `--resume auto` only ever picks complete checkpoints whose files
still match, and loads them with weights-only unpickling. A checkpoint is never written of weights
that are not finite.

Resuming is not starting: the config is compared with the one the checkpoint was saved with. Settings
that may change (learning rate, schedule, length, cadences, ...) are applied - also to the optimizer's
param groups and the LR scheduler, which DeepSpeed restores from the checkpoint - and logged as
`training.lr: 0.001 -> 1e-05`; a change of one that cannot (model shape, sample layout, seed, global
batch) stops the run before training, listing them.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import copy
import hashlib
import importlib
import itertools
import logging
import math
import os
import random
import secrets
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Protocol

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from torch import nn

from vidartrain.config import (
    Config, ConfigError, check_export_path, export_path, resume_changes)
from vidartrain.data.dataset import BadSampleLimitError, build_loader
from vidartrain.data.shard_index import DataInfo
from vidartrain.distributed.checkpointing import (
    SHARED_MARKER, CheckpointRef, checkpoint_files, checkpoint_problems, checkpoints_dir, file_digests, first_intact,
    hashing_shares, latest_complete, mark_complete, prune_checkpoints, recorded_run, remove_checkpoints,
    resume_candidates, save_failure, saved_checkpoints, sees_shared_marker, set_aside_checkpoints_after, tag_for_step,
    weights_only_loads, write_shared_marker)
from vidartrain.distributed.ds_config import checkpointing_mode, fixed_by_checkpoint, offloads, precision_of
from vidartrain.distributed.export import gather_state_dict
from vidartrain.distributed.sequence_parallel import (ParallelLayout, SequenceParallel, apply_sequence_parallel,
                                                      divisors, group_leaves_node, new_sequence_parallel_groups)
from vidartrain.errors import CheckpointError, DataError
from vidartrain.models.wan.lora import add_lora, export_lora
from vidartrain.models.wan.model import WanModel
from vidartrain.trainers.ema import PartitionEMA, check_ema_config, ema_device
from vidartrain.trainers.freezing import freeze_parameters
from vidartrain.trainers.monitoring import TrainingMonitor, peak_memory_bytes

log = logging.getLogger(__name__)


class ResumableLoader(Protocol):
    source_names: list[str]  # the shard directories read (several: a mixture)

    def __iter__(self) -> Iterator[dict[str, Any]]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def samples_by_source(self) -> dict[str, int]: ...


class Stage(ABC):
    """What one training stage provides; see the module docstring for the contract. A stage is
    built whole from the run's config and its training shards' `DataInfo` (read once per run, once
    `config.check_inputs_exist` has found them)."""

    name: str = "stage"
    export_dtype: torch.dtype = torch.bfloat16  # dtype of the exported weights
    loader_options: ClassVar[dict[str, Any]] = {}  # further `build_loader` arguments of this stage
    train_actions: ClassVar[bool] = True  # whether training clips carry their actions (held-out ones always do)

    def __init__(self, config: Config, data: DataInfo) -> None:
        self.config, self.data = config, data
        self.device = torch.device("cpu")  # the trainer's device, from load_frozen on

    @abstractmethod
    def build_model(self) -> nn.Module:
        ...

    @abstractmethod
    def load_frozen(self, device: torch.device) -> None:
        ...

    def build_loader(self, split: str, micro_batch_size: int, rank: int, world_size: int) -> ResumableLoader | None:
        """The shard loader of `split`: "train" (data.shards, read by `data.num_workers` worker processes)
        or "val" (data.val_shards, read in this process; None without).

        Held-out batches are read without workers because they are read mid-run: a validation reads a
        few batches, and a rank that forks workers while its other threads run can leave a worker
        deadlocked at birth (CPython before 3.11.10, python/cpython#112275; seen in this project's tests).
        The training loader forks its workers once, before the first step."""
        train = split == "train"
        shards = self.config.data.shards if train else self.config.data.val_shards
        if shards is None:
            return None
        return build_loader(shards, self.config.data, micro_batch_size, rank=rank, world_size=world_size,
                            train=train, actions=self.train_actions or not train, num_workers=None if train else 0,
                            **self.loader_options)

    @abstractmethod
    def training_loss(self, module: nn.Module, batch: dict[str, Any], generator: torch.Generator
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ...

    def validation_loss(self, module: nn.Module, batch: dict[str, Any], generator: torch.Generator
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`training_loss` of one held-out sample (a batch of one), every draw from `generator`
        (`held_out_generator`: seeded by the sample's key)."""
        return self.training_loss(module, batch, generator)

    @abstractmethod
    def tokens_in(self, batch: dict[str, Any]) -> int:
        ...

    @abstractmethod
    def export(self, state_dict: dict[str, torch.Tensor], path: Path) -> None:
        ...

    def load_validation(self, device: torch.device) -> None:
        """Frozen helpers the validation samples need beyond `load_frozen` (`validation.every` > 0)."""
        raise NotImplementedError(f"the {self.name} stage renders no validation samples")

    def validation_sample(self, module: nn.Module, batch: dict[str, Any], index: int) -> "ValidationSample":
        """Generate one video from a held-out batch of one clip with the current weights. Runs on
        every rank with the same batch (ZeRO-3 forwards are collective)."""
        raise NotImplementedError(f"the {self.name} stage renders no validation samples")


@dataclass
class ValidationSample:
    """A generated video (uint8 [T, H, W, 3]), the held-out clip's frames and the metrics."""

    key: str
    frames: np.ndarray
    ground_truth: np.ndarray
    metrics: dict[str, float]


@dataclass
class RunOptions:
    """What the command line adds to the YAML config."""

    ds_config: dict[str, Any]  # this run's DeepSpeed config: the profile merged with the YAML (build_deepspeed_config)
    output_dir: str | None = None  # None: config.output.output_dir
    resume: str | None = None  # None, "auto" or a checkpoint path
    max_steps: int | None = None  # stop (with a checkpoint) after this step; None: training.num_steps
    # replace what exists: an input of the run by the export (model.pt_dir, model.idm_path, model.ckpt_dir),
    # an earlier run's checkpoints in output_dir by a run that does not resume them, an earlier run's export
    overwrite: bool = False


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss."""


class NonFiniteWeightsError(RuntimeError):
    """The weights themselves are no longer finite; no checkpoint is written of them."""


def init_distributed() -> None:
    """Process group from the launcher's environment (deepspeed, torchrun or SLURM): nccl on GPUs,
    gloo on CPU (DeepSpeed picks the accelerator's backend). Started without a launcher
    (`python launch/train.py ...`), the process is a group of one."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    if not dist.is_initialized():
        if get_accelerator().device_name() == "cpu":
            skip_cpu_shared_memory_allreduce()
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))


def end_distributed() -> None:
    """Destroy the process group before the interpreter exits. Left to the destructors, its threads
    (gloo's, NCCL's watchdog) can abort the process at exit ("terminate called without an active
    exception"), turning a refusal's exit status 2 into a crash, and NCCL warns of lost operations."""
    if dist.is_initialized():
        dist.destroy_process_group()


def skip_cpu_shared_memory_allreduce() -> None:
    """CPU process groups start without DeepSpeed's shared-memory allreduce op. Only DeepSpeed's
    inference all-reduce uses it (ZeRO's collectives go through torch.distributed and gloo), yet
    building it JIT-compiles C++, maps a 66 MB /dev/shm buffer per rank that is never unlinked, and
    its start-up busy-waits for every peer's buffer: with more ranks than cores the spinning ranks
    starved the others, and a 4-rank run on 2 cores hung for good."""
    backend = importlib.import_module("deepspeed.comm.torch")  # the attribute of that name is torch itself
    if not hasattr(backend, "build_shm_op"):
        raise RuntimeError("deepspeed.comm.torch.build_shm_op is gone: check how this DeepSpeed version "
                           "starts its CPU shared-memory allreduce before running on CPU")
    backend.build_shm_op = lambda: None


# What process managers that start many copies of a command set in each (task count first, then the
# copy's place): srun, Open MPI's mpirun, MPICH's / Intel MPI's.
PROCESS_MANAGER_TASKS = (("srun", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID"),
                         ("mpirun (Open MPI)", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
                         ("mpirun (MPICH / Intel MPI)", "PMI_SIZE", "PMI_RANK"))


def world_size_of_launch() -> int:
    """The number of ranks the launcher started (deepspeed, torchrun and SLURM via torchrun set
    WORLD_SIZE; none: one process). A copy of many that srun or mpirun started without a torch
    launcher is refused: with no RANK it would be a group of one (`init_distributed`), and every copy
    would train alone, all of them into the same output_dir."""
    if "RANK" not in os.environ:
        for manager, tasks, place in PROCESS_MANAGER_TASKS:
            if int(os.environ.get(tasks, "1")) > 1:
                raise ConfigError(f"this process is task {os.environ.get(place, '?')} of {os.environ[tasks]} that "
                                  f"{manager} started ({tasks}), but no launcher set RANK and WORLD_SIZE: each task "
                                  f"would train alone, into the same output_dir. Start one torchrun per node under "
                                  f"{manager} (launch/slurm_multi_node.sbatch, launch/torchrun_node.sh) or use the "
                                  f"deepspeed launcher (launch/multi_node.sh)")
    return int(os.environ.get("WORLD_SIZE", "1"))


def node_position_of_launch() -> tuple[int, int] | None:
    """(local rank, ranks on this node) as the launcher set them (torchrun: LOCAL_WORLD_SIZE, deepspeed:
    LOCAL_SIZE); None when it says nothing of nodes (one process without a launcher)."""
    ranks_on_node = os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE"))
    if ranks_on_node is None or "LOCAL_RANK" not in os.environ:
        return None
    return int(os.environ["LOCAL_RANK"]), int(ranks_on_node)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


TRAIN_STREAM, VALIDATION_STREAM, DROPOUT_STREAM = 0, 1, 2


def micro_batch_seed(seed: int, stream: int, step: int, micro: int, rank: int) -> int:
    """The seed of one micro-batch's random stream on one rank: a function of where it is in the run
    only, so a resumed run draws exactly the numbers an uninterrupted one would."""
    return int(np.random.SeedSequence([seed, stream, step, micro, rank]).generate_state(1, np.uint64)[0])


def micro_batch_generator(seed: int, stream: int, step: int, micro: int, rank: int,
                          device: torch.device) -> torch.Generator:
    """A generator seeded with `micro_batch_seed`."""
    generator = torch.Generator(device=device)
    generator.manual_seed(micro_batch_seed(seed, stream, step, micro, rank))
    return generator


def held_out_generator(key: str, device: torch.device) -> torch.Generator:
    """The generator of one held-out sample's draws (noise, noise level, window), seeded by its key alone:
    its validation loss is a function of the weights and the sample, whatever the world size, the rank
    that evaluates it and the micro-batch - and the training seed, so that the curves of runs compare."""
    digest = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    generator = torch.Generator(device=device)
    generator.manual_seed(int(np.random.SeedSequence([VALIDATION_STREAM, digest]).generate_state(1, np.uint64)[0]))
    return generator


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based): linear warmup over
    `warmup` steps, then constant or cosine down to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def add_metrics(total: dict[str, torch.Tensor], metrics: dict[str, torch.Tensor]) -> None:
    """Add a micro-batch's [sum, count] metric pairs to `total` (float64 on the CPU; `Trainer.reduce_metrics`
    turns them into means over all ranks)."""
    for name, value in metrics.items():
        total[name] = total.get(name, 0) + value.detach().double().cpu()


def build_optimizer(parameters: Any, config: Config) -> torch.optim.Optimizer:
    """AdamW with torch's fused kernel: DeepSpeed steps it over flat fp32 partitions, on the GPU or, with the
    optimizer offloaded, on the host, where the default per-tensor loop is several times slower
    (`python -m benchmarks.optimizer_step`)."""
    t = config.training
    return torch.optim.AdamW(parameters, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay, fused=True)


def build_scheduler(optimizer: torch.optim.Optimizer, config: Config) -> torch.optim.lr_scheduler.LambdaLR:
    t = config.training
    min_ratio = t.min_lr / t.lr
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, t.warmup, t.num_steps, t.lr_schedule, min_ratio))


# The weights' dtype under each precision of a DeepSpeed profile (`precision_of`).
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_engine(model: nn.Module, ds_config: dict[str, Any], config: Config) -> deepspeed.DeepSpeedEngine:
    """The DeepSpeed engine around `model`'s trainable parameters, with AdamW and the LR schedule."""
    # The weights in the profile's precision (a no-op for bf16 checkpoints loaded in bf16): ZeRO-3 partitions
    # them in the dtype it finds and DeepSpeed casts nothing under fp32, so a bf16 DiT under an fp16 profile
    # failed at its first forward, and under an fp32 one trained bf16 weights (at ZeRO 0-2 without a master copy).
    model.to(PRECISION_DTYPES[precision_of(ds_config)])
    if ds_config["zero_optimization"].get("stage", 0) == 3:
        # Partition now, one parameter at a time (to the device, broadcast from rank 0, cut into
        # slices), so that the whole model never sits on one device.
        deepspeed.zero.Init(module=model, config_dict_or_path=ds_config)
        # zero.Init moves parameters only, and deepspeed.initialize then leaves a partitioned module
        # where it is: buffers (BatchNorm statistics, ...) would stay on the CPU.
        move_buffers(model, torch.device(get_accelerator().current_device_name()))
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=trainable, config=ds_config,
        optimizer=lambda params: build_optimizer(params, config),
        lr_scheduler=lambda optimizer: build_scheduler(optimizer, config))
    check_placement(engine.module, engine.device, offloaded_partitions=offloads(ds_config, "offload_param"))
    return engine


def discard_gradients(optimizer: Any) -> None:
    """Drop every gradient accumulated since the last optimizer step. zero_grad() clears the parameters'
    gradients; ZeRO-1/2's optimizer also sums each micro-step's reduced gradients into `all_grad_tensors`
    and keeps them until the step, which would apply a skipped step's gradients with the next one's."""
    optimizer.zero_grad()
    pending = getattr(optimizer, "all_grad_tensors", None)
    for group in pending or {}:
        pending[group] = None


def compiles_blocks(config: Config, device: torch.device) -> bool:
    """`model.compile`, where None means: on CUDA yes (fused element-wise kernels), elsewhere no."""
    return device.type == "cuda" if config.model.compile is None else config.model.compile


# Graphs that one compiled block function may hold. Stage 2 calls the blocks in up to 20 distinct
# ways (with and without gradient, with and without a KV cache, and sizes of 1 apart from larger
# ones, on which the compiler specializes), a run of one context mode with its validation loss in up
# to 15: more than dynamo's default of 8, past which the remaining calls would run uncompiled.
BLOCK_RECOMPILE_LIMIT = 32


def compile_blocks(model: WanModel, **compile_options: Any) -> None:
    """torch.compile every transformer block in place (its checkpointing included): the blocks share
    one compiled graph per way they are called; parameter names, and so checkpoints and exports, do
    not change. `compile_options`: torch.compile's keyword arguments."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, BLOCK_RECOMPILE_LIMIT)
    for block in model.blocks:
        block.compile(**compile_options)


def move_buffers(module: nn.Module, device: torch.device) -> None:
    """Move every buffer of `module` (not its parameters) to `device`."""
    for submodule in module.modules():
        for name, buffer in submodule._buffers.items():
            if buffer is not None:
                submodule._buffers[name] = buffer.to(device)


def check_placement(module: nn.Module, device: torch.device, offloaded_partitions: bool = False) -> None:
    """Fail, naming them, if parameters (their ZeRO-3 slice) or buffers of `module` are not on `device`.
    `offloaded_partitions` (zero_optimization.offload_param): the slices may be in CPU memory too, where
    ZeRO-3 keeps all but the small persistent ones (NVMe offload swaps through CPU buffers)."""
    def placed(tensor: torch.Tensor, partition: bool) -> bool:
        if partition and offloaded_partitions and tensor.device.type == "cpu":
            return True
        return tensor.device.type == device.type and tensor.device.index in (None, device.index)

    tensors = [(name, getattr(p, "ds_tensor", p), hasattr(p, "ds_tensor")) for name, p in module.named_parameters()]
    tensors += [(name, buffer, False) for name, buffer in module.named_buffers()]
    misplaced = [f"{name} ({tensor.device})" for name, tensor, partition in tensors if not placed(tensor, partition)]
    if misplaced:
        raise RuntimeError(f"{len(misplaced)} tensors of the engine's module are not on its device {device}: "
                           + ", ".join(misplaced[:8]))


def check_fresh_start(output_dir: Path, options: RunOptions) -> bool:
    """Whether this run replaces an earlier one's checkpoints in `output_dir` (--overwrite, no --resume);
    refuses to start over them otherwise. Rank 0 deletes them once the process group exists."""
    earlier = saved_checkpoints(checkpoints_dir(output_dir)) if options.resume is None else []
    if earlier and not options.overwrite:
        raise ConfigError(f"{checkpoints_dir(output_dir)} holds {len(earlier)} checkpoints of an earlier run (newest "
                          f"{earlier[-1]}): continue it with --resume auto, start this run in another --output_dir, "
                          f"or pass --overwrite to replace that run (its checkpoints are deleted)")
    return bool(earlier)


class Trainer:
    """Runs one stage on a DeepSpeed engine; `train()` is the whole loop, top to bottom."""

    def __init__(self, config: Config, stage: Stage, options: RunOptions):
        self.config, self.stage, self.options = config, stage, options
        self.output_dir = Path(options.output_dir or config.output.output_dir)
        self.max_steps = options.max_steps or config.training.num_steps
        # Everything that can be wrong with the configuration fails here, before any process group or
        # model exists (every launcher - deepspeed, torchrun, SLURM via torchrun - sets WORLD_SIZE).
        self.world_size = world_size_of_launch()
        self.ds_config = copy.deepcopy(options.ds_config)  # a resume from a universal checkpoint adds to it
        check_ema_config(config, self.ds_config)
        candidates = resume_candidates(options.resume, checkpoints_dir(self.output_dir))
        self.replaces_earlier_run = check_fresh_start(self.output_dir, options)
        self.save_path = export_path(config, self.output_dir, stage.name)
        check_export_path(config, self.save_path, options.overwrite, resuming=bool(candidates))
        log.info("starting the process group of %d rank(s)", self.world_size)
        init_distributed()
        self.rank = dist.get_rank()
        self.device = torch.device(get_accelerator().device_name())
        if dist.get_world_size() != self.world_size:
            raise RuntimeError(f"WORLD_SIZE={self.world_size} but the process group has {dist.get_world_size()} ranks")
        self.check_output_dir_shared()
        # Which checkpoints exist is rank 0's view, on every rank: a node whose listing of the shared folder lags
        # (NFS caches directory entries) would resume another checkpoint, or pair other files in the checks below.
        shared = [candidates]
        dist.broadcast_object_list(shared, src=0)
        candidates = shared[0]
        # Ranks of a sequence-parallel group work on the same samples: the loader, the noise and the
        # seeds follow the data-parallel index `layout.dp_rank`, not the global rank.
        self.layout = ParallelLayout.of(self.rank, self.world_size, config.distributed.sequence_parallel_size)
        self.validates = bool(config.training.val_every) and config.data.val_shards is not None
        self.val_samples = self.validation_sample_count() if self.validates else 0
        self.check_sequence_parallel_groups_within_nodes()
        sequence_parallel_group = new_sequence_parallel_groups(self.layout)
        if self.replaces_earlier_run and self.rank == 0:
            removed = remove_checkpoints(checkpoints_dir(self.output_dir))
            log.warning("--overwrite: deleted the %d checkpoints of the earlier run in %s (%s ... %s)", len(removed),
                        self.output_dir, removed[0], removed[-1])
        self.resume_from: CheckpointRef | None = first_intact(candidates, options.resume, self.checkpoint_problems)
        if self.resume_from is not None:
            self.check_resumable(self.resume_from)
        if self.resume_from is not None and self.resume_from.universal:
            self.ds_config.setdefault("checkpoint", {})["load_universal"] = True
        # The loader before any model: too few samples for this many ranks is refused here (workers fork
        # later); after the resume's check, which names every setting that changed (data.height among them).
        self.micro_batch_size = self.ds_config["train_micro_batch_size_per_gpu"]
        self.accumulation = self.ds_config["gradient_accumulation_steps"]
        self.train_loader = stage.build_loader("train", self.micro_batch_size, self.layout.dp_rank,
                                               self.layout.dp_size)
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.sigterm_received = False  # on this rank, by `request_stop`, at any moment
        self.stopping = False  # agreed by every rank after each step (`after_step`)
        self.last_saved_step: int | None = None

        seed_everything(config.training.seed)  # same on every rank: randomly initialised parts agree
        model = stage.build_model()
        if config.lora.enabled:
            self.add_lora(model)
        frozen = freeze_parameters(model, config.training.freeze)
        if frozen:
            log.info("training.freeze: %d parameter tensors frozen (%s ...)", len(frozen), ", ".join(frozen[:4]))
        if isinstance(model, WanModel):  # the DiT's blocks; the IDM stage refuses these settings
            model.set_checkpointing(checkpointing_mode(config))
            if sequence_parallel_group is not None:
                apply_sequence_parallel(model, SequenceParallel(sequence_parallel_group))
            if compiles_blocks(config, self.device):
                log.info("model.compile: each DiT block is compiled during the first step (a minute or more)")
                compile_blocks(model)
        log.info("building the DeepSpeed engine (ZeRO stage %d over %d rank(s))",
                 self.ds_config["zero_optimization"].get("stage", 0), self.world_size)
        self.engine = build_engine(model, self.ds_config, config)
        t = config.training
        self.ema = (PartitionEMA(self.engine.module, t.ema_decay, t.ema_warmup, ema_device(self.ds_config, self.device))
                    if t.ema_decay > 0 else None)
        seed_everything(config.training.seed + self.layout.dp_rank)
        stage.load_frozen(self.device)
        if config.validation.every:
            stage.load_validation(self.device)

        if self.resume_from is not None:
            self.load_checkpoint(self.resume_from)
        self.monitor = TrainingMonitor(self.output_dir, enabled=self.rank == 0, start_step=self.step,
                                       total_steps=self.max_steps, log_seconds=config.training.log_seconds)

    def add_lora(self, model: nn.Module) -> None:
        """`lora:` the base model frozen, adapters on its linear layers (the only trained parameters)."""
        if not isinstance(model, WanModel):
            raise ConfigError(f"`lora.rank` = {self.config.lora.rank}: LoRA adapts the DiT, the {self.stage.name} "
                              f"stage trains a {type(model).__name__}")
        names = add_lora(model, self.config.lora)
        adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("lora: rank %d, alpha %g on %d linear layers (%s ...): %s adapter parameters trained, the %s of the "
                 "base frozen", self.config.lora.rank, self.config.lora.effective_alpha, len(names),
                 ", ".join(names[:3]), f"{adapters:,}", f"{sum(p.numel() for p in model.parameters()) - adapters:,}")

    def check_output_dir_shared(self) -> None:
        """Refuse, on every rank, an output_dir that is not one folder for all ranks (each node's own
        disk): checkpoints would be split over the nodes and never complete, resumes would disagree."""
        if self.world_size == 1:
            return
        token = [secrets.token_hex(16) if self.rank == 0 else None]
        dist.broadcast_object_list(token, src=0)
        if self.rank == 0:
            write_shared_marker(self.output_dir, token[0])
        dist.barrier()
        blind = torch.tensor([0.0 if sees_shared_marker(self.output_dir, token[0]) else 1.0], device=self.device)
        dist.all_reduce(blind)
        if self.rank == 0:
            (self.output_dir / SHARED_MARKER).unlink(missing_ok=True)  # every rank has looked (the all-reduce)
        if blind.item() > 0:
            raise ConfigError(f"output_dir {self.output_dir} is not the same folder on every node: {int(blind.item())} "
                              f"of the {self.world_size} ranks do not see what rank 0 wrote there. Checkpoints need "
                              f"storage all nodes share (the same path on each, e.g. NFS or Lustre)")

    def check_sequence_parallel_groups_within_nodes(self) -> None:
        """Refuse, on every rank, SP groups that reach across nodes (SP 3 or 16 on nodes of 8 GPUs): their
        all-to-alls, two per block and pass, would run over the network at a fraction of NVLink's speed,
        which the planner does not count on."""
        position = node_position_of_launch()
        if self.layout.sp_size == 1 or position is None:
            return
        local_rank, ranks_on_node = position
        leaving = torch.tensor([float(group_leaves_node(self.layout, self.rank, local_rank, ranks_on_node))],
                               device=self.device)
        dist.all_reduce(leaving)  # nodes may differ in size (a hostfile's slots): every rank learns the verdict
        if leaving.item() > 0:
            raise ConfigError(f"`distributed.sequence_parallel_size` = {self.layout.sp_size}: {int(leaving.item())} "
                              f"of the {self.world_size} ranks are in groups of consecutive ranks that reach across "
                              f"nodes (this one has {ranks_on_node} ranks), whose all-to-alls in every self-attention "
                              f"would cross the network; use a size that divides the ranks per node, one of "
                              f"{divisors(ranks_on_node)}")

    # ------------------------------------------------------------------------------------------
    # The loop

    def train(self) -> int:
        """Train to `max_steps` (or until preempted); returns the last completed step."""
        previous_handler = signal.signal(signal.SIGTERM, self.request_stop)
        batches = iter(self.train_loader)
        log.info("training from step %d to %d; the first step is slower (data workers start, DeepSpeed sets "
                 "up its ZeRO hooks)", self.step, self.max_steps)
        try:
            while self.step < self.max_steps:
                record = self.train_step(batches)
                self.step += 1
                self.after_step(record)
                if self.stopping:
                    log.warning("SIGTERM received: saving a checkpoint at step %d and exiting", self.step)
                    break
            if self.last_saved_step != self.step:  # not saved by after_step (save_every) already
                self.save_checkpoint()
            # a run stopped at its last step is finished too: its export follows the checkpoint
            if self.step >= self.config.training.num_steps:
                self.export(self.save_path)
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
            self.monitor.close()
        return self.step

    def train_step(self, batches: Iterator[dict[str, Any]]) -> dict[str, Any]:
        """One optimizer step: `accumulation` micro-batches, each a new batch from the loader."""
        engine, stage = self.engine, self.stage
        engine.train()
        lr = engine.get_lr()[0]  # the rate this step's update uses (the scheduler moves on in step())
        # The whole step's data first, so that the data wait is timed apart from the compute.
        start = time.perf_counter()
        micro_batches = [next(batches) for _ in range(self.accumulation)]
        data_wait = time.perf_counter() - start
        start = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64)
        metrics: dict[str, torch.Tensor] = {}
        finite = True
        for micro, batch in enumerate(micro_batches):
            engine.set_gradient_accumulation_boundary(micro == self.accumulation - 1)
            generator = micro_batch_generator(self.config.training.seed, TRAIN_STREAM, self.step, micro,
                                              self.layout.dp_rank, self.device)
            # modules that draw from the global RNG (LoRA's dropout; activation checkpointing restores
            # it for the recomputation) get a stream that is a function of the position in the run too
            # (per global rank: the ranks of a sequence-parallel group drop out on different tokens)
            torch.manual_seed(micro_batch_seed(self.config.training.seed, DROPOUT_STREAM, self.step, micro, self.rank))
            loss, micro_metrics = stage.training_loss(engine, batch, generator)
            # One all-reduce tells every rank both the mean loss and whether any rank went non-finite
            # (then every rank must skip backward, or ZeRO-3's collectives would hang).
            global_loss = loss.detach().double().reshape(1).cpu().to(self.device)
            dist.all_reduce(global_loss)
            if not torch.isfinite(global_loss).all():
                finite = False
                break
            engine.backward(loss)
            loss_sum += global_loss.cpu()[0]
            add_metrics(metrics, micro_metrics)
        if finite:
            engine.step()
            # fp16 loss scaling skips the update of a step whose gradients overflowed: the weights did not
            # move, and neither does the EMA nor its warm-up count
            if self.ema is not None and engine.was_step_applied():
                self.ema.update()
            self.nonfinite_in_a_row = 0
        else:
            discard_gradients(engine.optimizer)  # of the micro-batches before the bad one
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
        compute = time.perf_counter() - start
        keys = [key for batch in micro_batches for key in batch["__key__"]]
        # The ranks of a sequence-parallel group hold the same loss: the mean over all ranks is the
        # mean over the data-parallel groups.
        loss = float(loss_sum) / (self.world_size * self.accumulation) if finite else float("nan")
        return {"finite": finite, "lr": lr, "loss": loss, "metrics": self.reduce_metrics(metrics),
                "keys": self.gather_keys(keys), "data_wait": data_wait, "compute": compute,
                "tokens": sum(stage.tokens_in(batch) for batch in micro_batches) * self.layout.dp_size,
                "samples": len(keys) * self.layout.dp_size}

    def after_step(self, record: dict[str, Any]) -> None:
        """Logging, stop decisions, validation and checkpoints, identical on every rank."""
        stop = torch.tensor([1.0 if self.sigterm_received else 0.0], device=self.device)
        dist.all_reduce(stop)  # a SIGTERM seen by any rank stops all of them at the same step
        # Only this vote decides: a SIGTERM arriving after it (during the bookkeeping below) waits
        # for the next step's vote, else its rank would save alone while the others train on.
        self.stopping = bool(stop.item() > 0)
        record.update(step=self.step, nonfinite_total=self.nonfinite_total,
                      grad_norm=self.grad_norm() if record["finite"] else float("nan"),
                      peak_memory=peak_memory_bytes())
        record["skipped_samples"] = self.skipped_samples()
        log_now = self.step % self.config.training.log_every == 0 or self.step == self.max_steps
        if log_now and len(self.train_loader.source_names) > 1:  # a mixture: how much of each source
            record["samples_by_source"] = self.train_loader.samples_by_source()
        self.monitor.log_step(record, log_scalars=log_now)
        if self.nonfinite_in_a_row >= self.config.training.max_nonfinite_steps:
            self.save_checkpoint()  # raises NonFiniteWeightsError if the weights themselves went non-finite
            raise NonFiniteLossError(
                f"step {self.step}: {self.nonfinite_in_a_row} consecutive steps had a non-finite loss "
                f"({self.nonfinite_total} in total); the weights are finite - those after step "
                f"{self.step - self.nonfinite_in_a_row}, which the skipped steps did not change - and were saved "
                f"to {checkpoints_dir(self.output_dir) / tag_for_step(self.step)}. Lower training.lr, check the "
                f"data (metrics.jsonl lists each step's sample keys) or raise training.max_nonfinite_steps")
        if record["skipped_samples"] > self.config.data.max_bad_samples:  # the same sum on every rank
            self.save_checkpoint()
            raise BadSampleLimitError(
                f"step {self.step}: {record['skipped_samples']} samples failed to decode on all ranks, more than "
                f"data.max_bad_samples = {self.config.data.max_bad_samples}; the log names each ('skipped sample "
                f"KEY in SHARD'), the run was saved to {checkpoints_dir(self.output_dir) / tag_for_step(self.step)}. "
                f"Run vidar-inspect on the shards, repair or re-convert them (or raise data.max_bad_samples) and "
                f"resume with --resume auto")
        val_every = self.config.training.val_every
        if self.validates and self.step % val_every == 0:
            batches = self.validation_batches()
            self.monitor.log_validation(self.step, self.validate(batches))
            if self.config.training.validate_ema:
                with self.ema.swapped_in(self.engine.optimizer):
                    self.monitor.log_validation(self.step, self.validate(batches), prefix="ema_")
        if self.config.validation.every and self.step % self.config.validation.every == 0:
            self.render_validation_samples()
        if self.step % self.config.training.save_every == 0:
            self.save_checkpoint()

    def skipped_samples(self) -> int:
        """Bad samples the training loaders of all ranks have skipped so far (data.max_bad_samples)."""
        count = torch.tensor([float(self.train_loader.skipped_samples)], device=self.device)
        dist.all_reduce(count)
        return int(count.item()) // self.layout.sp_size  # a sequence-parallel group's ranks share a loader

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def reduce_metrics(self, metrics: dict[str, torch.Tensor]) -> dict[str, float]:
        """Sum [sum, count] pairs over ranks (every rank reports the same names) -> means."""
        names = sorted(metrics)
        if not names:
            return {}
        packed = torch.stack([metrics[name] for name in names]).to(self.device)
        dist.all_reduce(packed)
        return {name: float(s / c) for name, (s, c) in zip(names, packed.cpu().tolist()) if c > 0}

    def gather_keys(self, keys: list[str]) -> list[str]:
        gathered: list[list[str] | None] = [None] * self.world_size
        dist.all_gather_object(gathered, keys)
        # one list per data-parallel group: its sequence-parallel ranks hold the same samples
        return [key for rank_keys in gathered[::self.layout.sp_size] for key in rank_keys]

    def validation_sample_count(self) -> int:
        """The held-out samples each validation evaluates: the first `training.val_samples` of
        data.val_shards (all of them if it holds fewer). Refused before training if the data-parallel ranks
        outnumber them: every rank evaluates one at least (ZeRO-3's forwards are collective)."""
        asked, shards = self.config.training.val_samples, self.config.data.val_shards
        held_out = len(self.stage.build_loader("val", 1, rank=0, world_size=1).stream.refs)
        count = held_out if asked is None else min(asked, held_out)
        if count < self.layout.dp_size:
            # raising training.val_samples helps only while the held-out set holds more than it asks
            remedy = ("raise training.val_samples, " if held_out >= self.layout.dp_size else "") + \
                "add held-out samples"
            raise ConfigError(f"validation evaluates {count} held-out samples (`training.val_samples` = {asked}, "
                              f"{shards} holds {held_out}) on {self.layout.dp_size} data-parallel ranks, and every "
                              f"rank evaluates one at least: {remedy}, or set training.val_every=0")
        if asked is not None and held_out < asked:
            log.info("validation: %s holds %d held-out samples, fewer than training.val_samples = %d: each "
                     "validation evaluates all of them", shards, held_out, asked)
        return count

    def validation_batches(self) -> list[dict[str, Any]]:
        """This rank's share of the `val_samples` first held-out samples, one per batch: held-out sample i
        goes to data-parallel rank i mod dp_size, whatever the micro-batch."""
        dp_rank, dp_size = self.layout.dp_rank, self.layout.dp_size
        loader = self.stage.build_loader("val", 1, dp_rank, dp_size)
        return list(itertools.islice(loader, len(range(dp_rank, self.val_samples, dp_size))))

    @torch.no_grad()
    def validate(self, batches: list[dict[str, Any]]) -> dict[str, float]:
        """The mean over the held-out samples of every rank's `batches` (one sample each) of the loss and of
        the stage's metrics of its training steps (the IDM's action accuracy, stage 1's loss by noise level,
        ...). Each sample draws from its own `held_out_generator`, so its loss is the same at every
        evaluation and on any number of ranks. Every rank runs as many forwards as rank 0 (ZeRO-3 gathers
        each layer for all ranks together): a rank with a sample fewer evaluates its last one again,
        left out of the mean."""
        self.engine.eval()
        metrics: dict[str, torch.Tensor] = {"loss": torch.zeros(2, dtype=torch.float64)}
        for index in range(len(range(0, self.val_samples, self.layout.dp_size))):
            batch = batches[min(index, len(batches) - 1)]
            if len(batch["__key__"]) != 1:
                raise ValueError(f"validation evaluates one held-out sample at a time, got a batch of "
                                 f"{len(batch['__key__'])} ({batch['__key__']})")
            generator = held_out_generator(batch["__key__"][0], self.device)
            loss, sample_metrics = self.stage.validation_loss(self.engine, batch, generator)
            if index < len(batches):
                metrics["loss"] += torch.tensor([loss.item(), 1.0], dtype=torch.float64)
                add_metrics(metrics, sample_metrics)
        self.engine.train()
        return self.reduce_metrics(metrics)

    @torch.no_grad()
    def render_validation_samples(self) -> None:
        """`validation.num_samples` videos from the first held-out clips, generated by every rank
        from the same clips with the same seeds (ZeRO-3 gathers each layer for all ranks together);
        rank 0 writes them to OUTPUT/samples/step_N/ and TensorBoard. Their time is logged apart
        from the training step's."""
        start = time.perf_counter()
        loader = self.stage.build_loader("val", 1, rank=0, world_size=1)
        batches = list(itertools.islice(loader, self.config.validation.num_samples))
        if not batches:
            raise DataError(f"{self.config.data.val_shards} holds no held-out clip for validation samples")
        self.engine.eval()
        samples = [self.stage.validation_sample(self.engine.module, batch, index) for index, batch in enumerate(batches)]
        self.engine.train()
        self.monitor.log_samples(self.step, samples, self.config.data.fps, time.perf_counter() - start)
        dist.barrier()

    def request_stop(self, signum: int, frame: Any) -> None:
        """SIGTERM (preemption): finish the step, save, exit."""
        # The launcher (or the scheduler) may send the same SIGTERM to the DataLoader workers: they
        # leave it to their rank (vidartrain.data.dataset.leave_sigterm_to_the_rank).
        self.sigterm_received = True

    # ------------------------------------------------------------------------------------------
    # Checkpoints and export

    def client_state(self) -> dict[str, Any]:
        return {"step": self.step, "nonfinite_total": self.nonfinite_total,
                "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "loader": self.train_loader.state_dict(), "skipped_samples_total": self.skipped_samples(),
                "world_size": self.world_size,
                "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                        "torch": torch.get_rng_state()},
                "ema": self.ema.state_dict() if self.ema is not None else None}

    def weights_are_finite(self) -> bool:
        """Every rank's part of the weights is finite (ZeRO-3 keeps a rank's slice in `ds_tensor`)."""
        finite = all(bool(torch.isfinite(getattr(p, "ds_tensor", p)).all()) for p in self.engine.module.parameters())
        flag = torch.tensor([0.0 if finite else 1.0], device=self.device)
        dist.all_reduce(flag)
        return flag.item() == 0

    def save_checkpoint(self) -> None:
        root = checkpoints_dir(self.output_dir)
        tag = tag_for_step(self.step)
        if not self.weights_are_finite():
            raise NonFiniteWeightsError(
                f"step {self.step}: the weights are not finite (an optimizer update overflowed them; training.lr = "
                f"{self.config.training.lr} too high?), so no checkpoint was written of them; the newest "
                f"checkpoint is {latest_complete(root) or 'none'}")
        log.info("saving checkpoint %s (every rank writes its partition of weights and optimizer)", root / tag)
        try:
            self.engine.save_checkpoint(str(root), tag=tag, client_state=self.client_state(), save_latest=False)
        except (OSError, RuntimeError) as err:
            raise save_failure(root / tag, err) from err
        dist.barrier()  # every rank's files are on disk before the checkpoint counts
        # Every rank hashes its share of the files any rank lists (the folder is on storage all ranks see).
        listings: list[list[str] | None] = [None] * self.world_size
        dist.all_gather_object(listings, checkpoint_files(root / tag))
        digests = file_digests(root / tag, hashing_shares(listings)[self.rank])
        gathered: list[dict[str, Any] | None] = [None] * self.world_size
        dist.all_gather_object(gathered, digests)
        if self.rank == 0:
            files = {name: digest for part in gathered for name, digest in part.items()}
            mark_complete(root, tag, {"step": self.step, "world_size": self.world_size,
                                      "config": self.config.to_dict(), "deepspeed": fixed_by_checkpoint(self.ds_config),
                                      "files": files})
            prune_checkpoints(root, keep_last=self.config.training.keep_last)
        dist.barrier()
        self.last_saved_step = self.step
        log.info("checkpoint %s saved", root / tag)

    def checkpoint_problems(self, path: Path) -> list[str]:
        """`path` checked against its COMPLETE record, the files shared out among the ranks; every rank
        gets every problem found."""
        gathered: list[list[str] | None] = [None] * self.world_size
        dist.all_gather_object(gathered, checkpoint_problems(path, self.rank, self.world_size))
        return [problem for problems in gathered for problem in problems]

    def check_resumable(self, ref: CheckpointRef) -> None:
        """Refuse a checkpoint this run cannot continue (another world size with partitioned ZeRO states,
        a changed setting that cannot change) and log the settings that change."""
        info = recorded_run(ref)
        saved_world = info.get("world_size", self.world_size)
        if (not ref.universal and saved_world != self.world_size
                and self.ds_config["zero_optimization"].get("stage", 0) > 0):
            universal = ref.path.with_name(f"{ref.tag}_universal")
            raise CheckpointError(
                f"{ref.path} was saved by {saved_world} ranks and this run has {self.world_size}: ZeRO's partitioned "
                f"optimizer states load only on the world size that wrote them. Convert the checkpoint once with\n"
                f"  python -m deepspeed.checkpoint.ds_to_universal --input_folder {ref.path} --output_folder "
                f"{universal}\nand resume with --resume {universal}")
        if "config" not in info:
            log.warning("%s records no config (saved by an older version): changed settings are not checked",
                        ref.path)
            return
        applied, refused = resume_changes(info["config"], self.config)
        fixed, now = info.get("deepspeed", {}), fixed_by_checkpoint(self.ds_config)
        refused += [f"DeepSpeed profile {key}: {fixed[key]} -> {now[key]}" for key in now
                    if key in fixed and fixed[key] != now[key]]
        if refused:
            raise ConfigError(f"resuming from {ref.path}: these settings cannot change on a resume (start a new "
                              f"run in another output_dir, or set them back):\n  " + "\n  ".join(refused))
        if applied:
            log.info("resuming from %s with changed settings, applied:\n  %s", ref.path, "\n  ".join(applied))

    def load_checkpoint(self, ref: CheckpointRef) -> None:
        with weights_only_loads():
            load_dir, client = self.engine.load_checkpoint(str(ref.root), tag=ref.tag, load_optimizer_states=True,
                                                           load_lr_scheduler_states=True)
        if load_dir is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint {ref.path}")
        self.apply_optimizer_settings()
        self.partition_persistent_parameters()
        self.step = int(client["step"])
        self.nonfinite_total = int(client["nonfinite_total"])
        self.nonfinite_in_a_row = int(client["nonfinite_in_a_row"])
        self.last_saved_step = self.step
        try:
            self.train_loader.load_state_dict(client["loader"])
        except DataError as error:
            raise DataError(f"resuming from {ref.path}: {error}") from None
        if "skipped_samples_total" in client:
            # The run's count, not this rank's: under ZeRO-0/1/2 every rank reads rank 0's client state, and
            # the world size may have changed. The first data-parallel group carries it, the others count anew.
            self.train_loader.skipped_samples = client["skipped_samples_total"] if self.layout.dp_rank == 0 else 0
        if self.ema is not None:
            self.ema.load_state_dict(client.get("ema"), ref.path)
        elif client.get("ema") is not None:
            log.warning("%s holds an EMA of the weights; training.ema_decay=0 drops it from here on", ref.path)
        if client["world_size"] == self.world_size:
            rng = client["rng"]
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
        log.info("resumed from %s at step %d", ref.path, self.step)
        if self.rank == 0:
            root = checkpoints_dir(self.output_dir)
            moved = set_aside_checkpoints_after(root, self.step, time.strftime("%Y%m%d-%H%M%S"))
            if moved is not None:
                log.warning("%s held checkpoints after step %d, of a run that went on from there (or saves that "
                            "--resume auto skipped): moved to %s, so that this run's saves at those steps neither "
                            "overwrite them nor are pruned in their favour", root, self.step, moved)

    def partition_persistent_parameters(self) -> None:
        """Leave ZeRO-3's persistent (small, never released) parameters partitioned, as in a process that
        has not yet run a step: DeepSpeed's checkpoint loader gathers them, and the first forward after
        a resume would then gather none of them while its recomputation in backward gathers some -
        which selective activation checkpointing refuses (it replays exactly the forward's operations:
        "aten.slice.Tensor encountered during backward but not found in storage")."""
        persistent = getattr(self.engine.optimizer, "persistent_parameters", None)
        if persistent:
            persistent[0].partition(persistent)

    def apply_optimizer_settings(self) -> None:
        """DeepSpeed restores the optimizer's param groups (lr, betas, eps, weight decay) and the scheduler's
        base rates from the checkpoint: put this run's config back in (the schedule's shape comes from
        the config already, through the scheduler's lambda)."""
        t = self.config.training
        scheduler = self.engine.lr_scheduler
        scheduler.base_lrs = [t.lr] * len(scheduler.base_lrs)
        for group, lr_lambda in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
            group.update(betas=t.betas, eps=t.eps, weight_decay=t.weight_decay, initial_lr=t.lr,
                         lr=t.lr * lr_lambda(scheduler.last_epoch))

    def export(self, path: Path) -> None:
        """Gather the weights from the ZeRO-3 partitions in the stage's export dtype and let the stage
        write them (with LoRA: merged into the base, the adapters beside them)."""
        state_dict = gather_state_dict(self.engine.module, rank=self.rank, dtype=self.stage.export_dtype)
        if self.rank == 0:
            self.write_export(state_dict, path)
        if self.ema is not None:
            # the EMA of the trained parameters; frozen ones and buffers as they are
            ema = self.ema.full_state_dict(self.rank, self.stage.export_dtype)
            if self.rank == 0:
                self.write_export({**state_dict, **ema}, path.with_name(f"{path.stem}_ema{path.suffix}"))
                log.info("the EMA averages %d tensors", len(ema))
        dist.barrier()

    def write_export(self, state_dict: dict[str, torch.Tensor], path: Path) -> None:
        if self.config.lora.enabled:
            state_dict, adapter_path = export_lora(state_dict, self.config.lora.effective_alpha, path)
            log.info("exported the LoRA adapters to %s", adapter_path)
        self.stage.export(state_dict, path)
        log.info("exported %d tensors to %s", len(state_dict), path)
