"""Memory and time planner: will this config fit on this hardware, and how long will it take?

    python -m vidartrain.plan --config configs/vidarc_2xh200.yaml --ds-config ds_configs/zero3_2xh200.json

Per-GPU memory = model states (DeepSpeed's own ZeRO estimator) + activations (our DiT block's real
saved tensors, measured at the real width on a few tokens and scaled per token) + frozen encoders +
allocator headroom. Time = training FLOPs per step / (MFU x peak bf16 FLOP/s). Stage 2 is planned in
its one-pass teacher-forcing layout; runs that roll out through the KV cache instead (self-generated
context, the closed loop) are refused (`unplannable`).

Sequence parallelism (distributed.sequence_parallel_size = SP) divides what the blocks keep per GPU
by SP (each rank holds 1/SP of a sample's tokens; what runs outside the blocks - the
patch embedding's input, the gathered residual stream and the head - stays whole), divides the FLOPs
per GPU by SP, and adds the all-to-all traffic of self-attention, timed on NVLink (SP groups are
consecutive ranks, inside one node: groups that would reach across nodes are refused) and not
overlapped with compute.
"""
from __future__ import annotations

import argparse
import copy
import functools
import itertools
import json
import math
import sys
import weakref
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from vidartrain.config import Config, ConfigError, LoraConfig, load_config
from vidartrain.distributed.ds_config import (build_deepspeed_config, checkpointing_mode, load_profile, offloads,
                                              precision_of, profile_world_size)
from vidartrain.distributed.sequence_parallel import (ParallelLayout, check_sequence_parallel_size, divisors,
                                                      group_leaves_node)
from vidartrain.errors import reports_errors
from vidartrain.models.idm import IDM
from vidartrain.models.wan.checkpoint import CONFIG_FILE, constructor_defaults, read_model_config
from vidartrain.models.wan.lora import add_lora
from vidartrain.models.wan.model import CHECKPOINTING_MODES, KEPT_BY_SELECTIVE_CHECKPOINTING, WanModel, latent_grid
from vidartrain.models.wan.t5 import UMT5Encoder
from vidartrain.models.wan.vae import WanVAE

GIB = 1024**3


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    bf16_tflops: float  # dense peak
    nvlink_gb_s: float  # NVLink bandwidth per GPU and direction, as rated (NVLink 4: 900 GB/s both ways)
    gpus_per_node: int = 8  # one NVLink domain (an HGX board): SP groups must stay inside it


GPUS = {
    "h100": Gpu("H100-80G SXM", 80.0, 989.0, 450.0),
    "a100-80g": Gpu("A100-80G SXM", 80.0, 312.0, 300.0),
    "h200": Gpu("H200 (141 GB)", 141.0, 989.0, 450.0),
}

# Share of the rated NVLink bandwidth an all-to-all reaches (assumed; NCCL's all-to-all bus bandwidth
# inside an 8-GPU NVSwitch node is typically 70-85% of the rated per-direction figure).
ALL_TO_ALL_EFFICIENCY = 0.8

# The reference hardware table (docs/training.md): (profile, gpu, world size, expected time in hours).
HARDWARE_TABLE = [
    ("zero3_64xh100", "h100", 64, 2.0),
    ("zero3_8xh100", "h100", 8, 16.0),
    ("zero3_8xa100_80g", "a100-80g", 8, 24.0),
    ("zero3_2xh200", "h200", 2, 48.0),
    ("zero3_1xgpu", "h100", 1, None),
    ("zero3_1xgpu", "h200", 1, None),
]

CUDA_CONTEXT_GIB = 1.5  # CUDA context + NCCL buffers, measured typically 1-2 GiB
FRAGMENTATION = 0.05  # share of device memory the caching allocator loses to fragmentation
# Live activation gradients of the block running backward, per byte the block saved. Fitted to peak
# memory: 0.75 to CPU peak RSS (benchmarks/plan_calibration.py: errors within 13%); 2.0 to the peak
# allocated CUDA memory of real TI2V-5B steps on one H200 (7.7 / 15.2 GiB at micro-batch 1 / 2 with
# checkpointing, 42.6 GiB at 1 without; within 4% with 2.0, where 0.75 under-predicted the
# checkpointed steps by 23%). benchmarks/gpu.py prints the planner beside each GPU measurement.
BACKWARD_WORKSPACE = {"cpu": 0.75, "cuda": 2.0}


def resolve_gpu(gpu: str | None, profile_path: str | Path) -> str:
    """`gpu` if given, else the GPU the profile is named for (zero3_2xh200 -> h200); the any-GPU
    profile zero3_1xgpu names none, and then the caller must."""
    if gpu is not None:
        return gpu
    for key in GPUS:
        if key.replace("-", "_") in Path(profile_path).stem:
            return key
    raise ConfigError(f"{profile_path} is not named for one GPU: pass --gpu ({', '.join(sorted(GPUS))})")


WAN_DEFAULTS = constructor_defaults(WanModel)


@dataclass(frozen=True)
class DitShape:
    """The WanModel constructor arguments that size a DiT's parameters and work (`meta_dit` builds
    the model from all of them); defaults: WanModel's own (TI2V-5B)."""

    dim: int = WAN_DEFAULTS["dim"]
    ffn_dim: int = WAN_DEFAULTS["ffn_dim"]
    num_heads: int = WAN_DEFAULTS["num_heads"]
    num_layers: int = WAN_DEFAULTS["num_layers"]
    text_len: int = WAN_DEFAULTS["text_len"]
    text_dim: int = WAN_DEFAULTS["text_dim"]
    in_dim: int = WAN_DEFAULTS["in_dim"]
    out_dim: int = WAN_DEFAULTS["out_dim"]
    freq_dim: int = WAN_DEFAULTS["freq_dim"]
    patch_size: tuple[int, ...] = tuple(WAN_DEFAULTS["patch_size"])
    qk_norm: bool = WAN_DEFAULTS["qk_norm"]
    cross_attn_norm: bool = WAN_DEFAULTS["cross_attn_norm"]


# ----------------------------------------------------------------------------------------------
# Geometry and FLOPs


def attended_pairs(frames: int, per_frame: int, layout: str) -> int:
    """Query-key pairs self-attention computes: dense, block-causal, or one-pass teacher forcing
    ([clean | noisy]: clean frame i sees clean <= i; noisy frame i sees clean < i and itself)."""
    if layout == "dense":
        return (frames * per_frame) ** 2
    causal = frames * (frames + 1) // 2 * per_frame**2
    if layout == "causal":
        return causal
    if layout == "teacher_forcing":
        noisy = (frames * (frames - 1) // 2 + frames) * per_frame**2
        return causal + noisy
    raise ValueError(f"unknown attention layout {layout!r}")


def text_flops(shape: DitShape) -> float:
    """FLOPs a forward call spends on the text alone: its embedding and every block's
    cross-attention keys and values (a KV-cached generation computes them once, not per call)."""
    d = shape.dim
    return float(2 * shape.text_len * (shape.text_dim * d + d * d) + shape.num_layers * 2 * shape.text_len * 2 * d * d)


def forward_flops(shape: DitShape, tokens: int, pairs: int, frames: int) -> dict[str, float]:
    """Forward FLOPs of one sample (2 per multiply-add), split as the planner reports them."""
    d, f, n = shape.dim, shape.ffn_dim, shape.num_layers
    linear = n * 2 * tokens * (4 * d * d + 2 * d * d + 2 * d * f) + text_flops(shape)
    embeddings = 2 * tokens * d * math.prod(shape.patch_size) * (shape.in_dim + shape.out_dim)  # patch embedding + head
    embeddings += 2 * frames * (shape.freq_dim * d + d * d + 6 * d * d)  # time MLPs, once per frame
    self_attention = n * 2 * 2 * pairs * d  # QK^T and AV
    cross_attention = n * 2 * 2 * tokens * shape.text_len * d
    return {"linear": float(linear + embeddings), "self_attention": float(self_attention),
            "cross_attention": float(cross_attention)}


# ----------------------------------------------------------------------------------------------
# Activation memory: our block's saved tensors, measured


def saved_bytes(fn: Any, parameters: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves while running `fn()` and still holds for the
    backward of its result. Tensors shaped like a parameter (the parameters themselves and autocast's
    casts of them) are weights, not activations. A storage is followed until it is freed: parts of the
    graph that do not lead to the result are freed during `fn`, and their addresses reused (keyed by
    address alone, a reused one would replace a live entry, and the count would depend on the allocator)."""
    parameter_shapes = {tuple(p.shape) for p in parameters}
    alive: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if tuple(t.shape) not in parameter_shapes:
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in alive:
                alive[key] = storage.nbytes()
                weakref.finalize(storage, alive.pop, key, None)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
        held = sum(alive.values())
    del result
    return held


def kept_by_selective_bytes(fn: Any) -> int:
    """Bytes of the distinct storages selective checkpointing keeps while running `fn()`: the outputs
    of the matmuls and attention (the ops the model's selective policy saves). They are held until
    `fn` returns, as the checkpoint holds them, so no address is reused by a later tensor."""
    storages: dict[int, torch.UntypedStorage] = {}

    class CountKeptOutputs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in KEPT_BY_SELECTIVE_CHECKPOINTING:
                for tensor in tree_flatten(out)[0]:
                    if isinstance(tensor, torch.Tensor):
                        storage = tensor.untyped_storage()
                        storages[storage.data_ptr()] = storage
            return out

    with CountKeptOutputs():
        fn()
    return sum(storage.nbytes() for storage in storages.values())


@dataclass(frozen=True)
class ActivationModel:
    """Bytes per token of saved activations, measured on our model at the real width."""
    block: float  # one transformer block without checkpointing
    selective_block: float  # what selective checkpointing keeps of a block: its input, matmul and attention outputs
    outside_blocks: float  # patch embedding, head and the rest, once per forward
    checkpointed_block: float  # what full checkpointing keeps of a block: its input residual stream

    def per_token(self, num_layers: int, checkpointing: str, device_type: str = "cuda") -> float:
        return self.per_block_token(num_layers, checkpointing, device_type) + self.outside_blocks

    def per_block_token(self, num_layers: int, checkpointing: str, device_type: str = "cuda") -> float:
        """Bytes per token the blocks hold at the peak (what sequence parallelism divides)."""
        # While a block runs backward, the gradients of its intermediates are alive too; with
        # checkpointing, the block running backward first recomputes everything it did not keep.
        backward_workspace = BACKWARD_WORKSPACE[device_type] * self.block
        recomputed = 0.0 if checkpointing == "none" else self.block
        return num_layers * self.kept(checkpointing) + recomputed + backward_workspace

    def kept(self, checkpointing: str) -> float:
        """Bytes per token one block keeps for backward."""
        return {"none": self.block, "selective": self.selective_block, "full": self.checkpointed_block}[checkpointing]


@functools.lru_cache(maxsize=8)
def measure_activation_model(dim: int, ffn_dim: int, num_heads: int, text_len: int = 64) -> ActivationModel:
    """Run a one-block WanModel of the given width under CPU bf16 autocast with per-frame timesteps,
    at 2 and 4 latent frames of 4x4 tokens, and count what autograd saves and what selective
    checkpointing keeps. Slopes between the two sizes cancel what does not grow with tokens (the text
    embedding, the time MLPs)."""
    torch.manual_seed(0)
    model = WanModel(dim=dim, ffn_dim=ffn_dim, num_heads=num_heads, num_layers=1, text_len=text_len,
                     text_dim=64, freq_dim=64)
    context = torch.randn(1, text_len, 64)
    t = torch.full((1,), 500.0)
    counted: dict[str, list[int]] = {"saved": [], "saved_outside": [], "kept": [], "kept_outside": []}
    residual_bytes = 0
    for frames in (2, 4):
        x = torch.randn(1, model.in_dim, frames, 8, 8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for suffix in ("", "_outside"):
                blocks = model.blocks
                if suffix:
                    model.blocks = torch.nn.ModuleList()
                try:
                    counted["saved" + suffix].append(saved_bytes(lambda: model(x, t, context), model.parameters()))
                    counted["kept" + suffix].append(kept_by_selective_bytes(lambda: model(x, t, context)))
                finally:
                    model.blocks = blocks
            residual_bytes = model.embed_video(x)[0].element_size()

    def slope(name: str) -> float:
        tokens = 2 * 16  # token difference between 4 and 2 frames of 4x4 tokens
        return (counted[name][1] - counted[name][0]) / tokens

    outside = slope("saved_outside")
    checkpointed = residual_bytes * dim
    return ActivationModel(block=slope("saved") - outside,
                           selective_block=checkpointed + slope("kept") - slope("kept_outside"),
                           outside_blocks=outside, checkpointed_block=checkpointed)


# ----------------------------------------------------------------------------------------------
# The plan


@dataclass
class Plan:
    profile: str
    gpu: str
    world_size: int
    trained_parameters: int  # all of the DiT, or the LoRA adapters only
    lora_rank: int  # 0: full fine-tuning
    micro_batch: int
    accumulation: int
    tokens_per_sample: int
    checkpointing: str
    memory_gib: dict[str, float]
    total_gib: float
    device_gib: float
    fits: bool
    margin_gib: float
    max_micro_batch: int
    flops_per_sample: dict[str, float]
    step_seconds: float
    run_hours: float
    num_steps: int
    mfu: float
    sequence_parallel: int = 1
    all_to_all_gib: float = 0.0  # sent per GPU per step (sequence parallelism)
    all_to_all_seconds: float = 0.0  # its time per step on NVLink, included in step_seconds

    def verdict(self) -> str:
        word = "fits" if self.fits else "does NOT fit"
        return (f"{word}: {self.total_gib:.1f} of {self.device_gib:.0f} GiB per GPU "
                f"(margin {self.margin_gib:+.1f} GiB); largest micro-batch that fits: {self.max_micro_batch}")


def check_groups_within_nodes(sequence_parallel: int, world_size: int, gpu: Gpu) -> None:
    """The all-to-alls are timed on NVLink: refuse SP groups that would reach across nodes of
    `gpu.gpus_per_node` (the trainer refuses them too, from the launcher's ranks per node)."""
    per_node = min(world_size, gpu.gpus_per_node)
    if any(group_leaves_node(ParallelLayout.of(rank, world_size, sequence_parallel), rank, rank % per_node, per_node)
           for rank in range(world_size)):
        raise ConfigError(f"`distributed.sequence_parallel_size` = {sequence_parallel} on {world_size} {gpu.name}: "
                          f"groups of consecutive ranks would reach across nodes of {per_node} GPUs, whose "
                          f"all-to-alls cross the network (the trainer refuses them); use one of {divisors(per_node)}")


def sample_layout(config: Config) -> tuple[int, int, str]:
    """(latent frames, tokens per frame, attention layout) of one training sample."""
    data = config.data
    frames, h, w = latent_grid(data.num_frames, data.height, data.width)
    if config.causal:
        return config.self_forcing.window_frames, h * w, "teacher_forcing"
    return frames, h * w, "dense"


def sequence_tokens(frames: int, per_frame: int, layout: str) -> int:
    return frames * per_frame * (2 if layout == "teacher_forcing" else 1)


def model_state_gib(params: int, largest_layer: int, stage: int, world: int, offload_optimizer: bool,
                    offload_params: bool = False, trainable: int | None = None) -> dict[str, float]:
    """Parameters, gradients and optimizer states per GPU in DeepSpeed's accounting: bf16 parameters
    (2 bytes), fp32 gradient partitions (4), fp32 master weights + Adam moments (12); ZeRO-1 shards
    the optimizer, ZeRO-2 also the gradients, ZeRO-3 also the parameters. For ZeRO-3 the total is
    DeepSpeed's own estimator, which adds the largest layer gathered in full (it has no case of the
    parameters offloaded without the optimizer: that total is ours alone). `trainable` (default:
    all `params`): the parameters that have gradients and optimizer states - with LoRA the adapters
    only; the frozen base keeps its bf16 partitions and nothing else. DeepSpeed's estimator assumes
    every parameter trains, so it checks full fine-tuning only."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    trainable = params if trainable is None else trainable

    def per_gpu(bytes_per_param: int, count: int, sharded_from_stage: int) -> float:
        return bytes_per_param * count / (world if stage >= sharded_from_stage else 1)

    parts = {"parameters": per_gpu(2, params, 3), "gradients": per_gpu(4, trainable, 2),
             "optimizer": per_gpu(12, trainable, 1), "gathered_layer": 0.0}
    if offload_optimizer:  # gradient partitions and the optimizer live on the CPU
        parts["gradients"] = parts["optimizer"] = 0.0
    if offload_params and stage == 3:
        parts["parameters"] = 0.0
    if stage == 3:
        # Its GPU side depends on the number of GPUs alone (nodes x GPUs per node), which the planner
        # knows; how they split into nodes (its CPU side) the planner neither knows nor uses.
        _, gpu_bytes, largest = estimate_zero3_model_states_mem_needs(
            params, largest_layer, num_gpus_per_node=world, num_nodes=1,
            cpu_offload=offload_optimizer, cpu_offload_params=offload_optimizer and offload_params)
        parts["gathered_layer"] = float(largest)
        estimated = trainable == params and (offload_optimizer or not offload_params)
        if estimated and abs(sum(parts.values()) - gpu_bytes) > world:
            raise RuntimeError(f"planner disagrees with DeepSpeed's ZeRO-3 estimator: {sum(parts.values())} vs {gpu_bytes}")
    return {name: value / GIB for name, value in parts.items()}


def frozen_gib(config: Config, precomputed: bool) -> float:
    """umT5, VAE (and the IDM for Eq. 7) in bf16, as the config builds them, unless the shards
    hold their outputs."""
    if precomputed:
        return 0.0
    with torch.device("meta"):
        frozen = [UMT5Encoder(**(config.model.t5_config or {})), WanVAE(**(config.model.vae_config or {}))]
        if config.loss.embodiment_aware:
            frozen.append(IDM())
    return sum(p.numel() for model in frozen for p in model.parameters()) * 2 / GIB


def dit_shape_of(config: Config) -> DitShape:
    """The DiT the config trains: its checkpoint's config.json when there is one, else TI2V-5B."""
    ckpt_dir = config.model.ckpt_dir
    if not ckpt_dir or not (Path(ckpt_dir) / CONFIG_FILE).is_file():
        return DitShape()
    arguments = read_model_config(ckpt_dir, WanModel)
    if "patch_size" in arguments:  # a JSON list
        arguments["patch_size"] = tuple(arguments["patch_size"])
    return DitShape(**{f.name: arguments[f.name] for f in fields(DitShape) if f.name in arguments})


def activation_gib(shape: DitShape, tokens: int, micro: int, checkpointing: str, sequence_parallel: int = 1) -> float:
    """Peak activation memory per GPU (CUDA calibration); the blocks' part is divided over the
    sequence-parallel group."""
    model = measure_activation_model(shape.dim, shape.ffn_dim, shape.num_heads)
    per_sample = (tokens / sequence_parallel * model.per_block_token(shape.num_layers, checkpointing, "cuda")
                  + tokens * model.outside_blocks)
    return micro * per_sample / GIB


def saved_activation_bytes(shape: DitShape, tokens: int, micro: int, checkpointing: str,
                           sequence_parallel: int = 1) -> float:
    """What autograd keeps per GPU at the end of a forward (`saved_bytes` of the forward, no backward
    workspace): the blocks' share of the tokens, and everything outside them whole."""
    model = measure_activation_model(shape.dim, shape.ffn_dim, shape.num_heads)
    return micro * (tokens / sequence_parallel * shape.num_layers * model.kept(checkpointing)
                    + tokens * model.outside_blocks)


def all_to_all_bytes(shape: DitShape, tokens: int, checkpointing: str, sequence_parallel: int) -> float:
    """Bytes one rank sends per sample and training pass under sequence parallelism: per block and
    pass, q, k, v to the head split and the output back (4 bf16 tensors of tokens/SP x dim, of which
    (SP-1)/SP leaves the rank); passes: forward, backward, and the recompute of checkpointing (the
    all-to-alls are not among what selective checkpointing keeps); plus the float32 residual stream
    gathered after the blocks (all-gather) and its gradient summed in backward (all-reduce)."""
    if sequence_parallel == 1:
        return 0.0
    leaving = (sequence_parallel - 1) / sequence_parallel
    passes = 2 if checkpointing == "none" else 3
    blocks = shape.num_layers * passes * 4 * tokens / sequence_parallel * shape.dim * 2 * leaving
    gather = tokens * shape.dim * 4 * leaving * (1 + 2)
    return blocks + gather


@functools.lru_cache(maxsize=8)
def dit_parameters(shape: DitShape) -> tuple[int, int]:
    """(total parameters, largest single layer) of the DiT, counted on the meta device (once per shape:
    `vidar-plan --table` plans the same DiT for every profile)."""
    model = meta_dit(shape)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def lora_parameters(shape: DitShape, lora: LoraConfig) -> int:
    """Parameters of the adapters `lora` adds to the DiT (0 when LoRA is off)."""
    if not lora.enabled:
        return 0
    model = meta_dit(shape)
    add_lora(model, lora)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def meta_dit(shape: DitShape) -> WanModel:
    with torch.device("meta"):
        return WanModel(**asdict(shape))


def unplannable(config: Config, ds: dict[str, Any] | None = None) -> str | None:
    """Why the planner cannot plan this run (None: it can). It models the DiT stages with 16-bit
    weights (`ds`, the run's DeepSpeed config, says which precision it trains)."""
    if config.loss.type == "idm":
        return ("the planner plans the DiT stages (loss.type flow_matching or causal_flow_matching), "
                "not the 92M-parameter IDM")
    rollout = rollout_layout(config)
    if rollout is not None:
        return (f"the planner plans stage 2's one-pass teacher forcing (self_forcing.context_mode ground_truth), "
                f"but {rollout} runs a sequential rollout through the KV cache: each chunk keeps what it saw of "
                f"the cache for backward (growing with the square of the window), and self-generated context "
                f"adds the generation's forward passes. Plan the teacher-forcing layout with --set "
                f"self_forcing.context_mode=ground_truth --set self_forcing.closed_loop=false, and measure one "
                f"real step with launch/train.py --dry-run")
    if ds is not None and precision_of(ds) == "fp32":
        return ("the planner models 16-bit (bf16 or fp16) DiT training, but this DeepSpeed config trains float32 "
                "weights (distributed.mixed_precision fp32, or a profile with neither bf16 nor fp16 enabled): its "
                "weights, gradients and activations hold about twice the bytes")
    return None


def rollout_layout(config: Config) -> str | None:
    """The setting that makes stage 2 train through the KV cache instead of teacher forcing (None:
    teacher forcing, as `sample_layout` plans)."""
    if not config.causal:
        return None
    sf = config.self_forcing
    if sf.closed_loop:
        return "self_forcing.closed_loop"
    if sf.context_mode == "self_generated" or (sf.context_mode == "mixed" and sf.self_generated_prob > 0):
        return f"self_forcing.context_mode {sf.context_mode}"
    return None


def check_plans_dit(config: Config, ds: dict[str, Any] | None = None) -> None:
    reason = unplannable(config, ds)
    if reason is not None:
        raise ConfigError(reason)


def make_plan(config: Config, profile_name: str, profile: dict[str, Any], gpu_key: str, world_size: int,
              mfu: float = 0.4, checkpointing: str | None = None, precomputed: bool = False,
              shape: DitShape | None = None) -> Plan:
    """The plan of `config` on the DeepSpeed profile `profile` over `world_size` GPUs."""
    check_plans_dit(config)  # before the profile is merged: the IDM's precision rules do not matter here
    ds, _ = build_deepspeed_config(config, profile, world_size)
    return plan_for_ds_config(config, profile_name, ds, gpu_key, world_size, mfu, checkpointing, precomputed, shape)


def plan_for_ds_config(config: Config, profile_name: str, ds: dict[str, Any], gpu_key: str, world_size: int,
                       mfu: float = 0.4, checkpointing: str | None = None, precomputed: bool = False,
                       shape: DitShape | None = None) -> Plan:
    """`make_plan` for a DeepSpeed config already built for `world_size` ranks (a run's own)."""
    check_plans_dit(config, ds)
    shape = shape or DitShape()
    gpu = GPUS[gpu_key]
    micro, accumulation = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    checkpointing = checkpointing or checkpointing_mode(config)
    if checkpointing not in CHECKPOINTING_MODES:
        raise ValueError(f"checkpointing must be one of {CHECKPOINTING_MODES}, got {checkpointing!r}")
    frames, per_frame, layout = sample_layout(config)
    tokens = sequence_tokens(frames, per_frame, layout)
    sp = config.distributed.sequence_parallel_size
    check_sequence_parallel_size(sp, world_size, shape.num_heads)
    check_groups_within_nodes(sp, world_size, gpu)
    params, largest = dit_parameters(shape)
    adapters = lora_parameters(shape, config.lora)
    frozen = frozen_gib(config, precomputed)  # built once: memory_for runs for every micro-batch size tried
    zero = ds["zero_optimization"]

    def memory_for(m: int) -> dict[str, float]:
        # LoRA: activations as for full fine-tuning (an upper bound; the adapters' own [tokens, rank]
        # outputs are negligible, the frozen base's weight-gradient inputs need not be kept)
        parts = model_state_gib(params + adapters, largest, zero.get("stage", 0), world_size,
                                offloads(ds, "offload_optimizer"), offloads(ds, "offload_param"),
                                trainable=adapters if config.lora.enabled else None)
        parts["activations"] = activation_gib(shape, tokens, m, checkpointing, sp)
        parts["frozen_encoders"] = frozen
        parts["headroom"] = CUDA_CONTEXT_GIB + FRAGMENTATION * gpu.memory_gib
        return parts

    memory = memory_for(micro)
    total = sum(memory.values())
    max_micro = 0
    while sum(memory_for(max_micro + 1).values()) <= gpu.memory_gib and max_micro < 1024:
        max_micro += 1
    flops = forward_flops(shape, tokens, attended_pairs(frames, per_frame, layout), frames)
    # forward + backward (2x: input and weight gradients), + the recomputed forward with full
    # checkpointing (selective recomputes element-wise work only, no matmul FLOPs); LoRA computes no
    # weight gradient of the frozen base (the adapters' FLOPs are negligible at small rank)
    passes = (4 if checkpointing == "full" else 3) - (1 if config.lora.enabled else 0)
    step_flops = sum(flops.values()) * passes * micro * accumulation / sp  # per GPU
    sent = all_to_all_bytes(shape, tokens, checkpointing, sp) * micro * accumulation
    all_to_all_seconds = sent / (gpu.nvlink_gb_s * 1e9 * ALL_TO_ALL_EFFICIENCY)
    step_seconds = step_flops / (mfu * gpu.bf16_tflops * 1e12) + all_to_all_seconds
    return Plan(profile=profile_name, gpu=gpu.name, world_size=world_size, micro_batch=micro,
                trained_parameters=adapters if config.lora.enabled else params, lora_rank=config.lora.rank,
                accumulation=accumulation, tokens_per_sample=tokens, checkpointing=checkpointing,
                memory_gib=memory, total_gib=total, device_gib=gpu.memory_gib, fits=total <= gpu.memory_gib,
                margin_gib=gpu.memory_gib - total, max_micro_batch=max_micro, flops_per_sample=flops,
                step_seconds=step_seconds, run_hours=step_seconds * config.training.num_steps / 3600,
                num_steps=config.training.num_steps, mfu=mfu, sequence_parallel=sp, all_to_all_gib=sent / GIB,
                all_to_all_seconds=all_to_all_seconds)


# ----------------------------------------------------------------------------------------------
# Report


def format_plan(plan: Plan) -> str:
    lines = [f"{plan.profile} on {plan.world_size} x {plan.gpu}: micro-batch {plan.micro_batch} x accumulation "
             f"{plan.accumulation}, {plan.tokens_per_sample:,} tokens per sample, activation checkpointing "
             f"{plan.checkpointing}, {training_of(plan)}" + (f", sequence parallelism {plan.sequence_parallel}"
                                                            if plan.sequence_parallel > 1 else ""),
             "  memory per GPU (GiB):"]
    for name, gib in plan.memory_gib.items():
        lines.append(f"    {name:<16} {gib:8.2f}")
    lines.append(f"    {'total':<16} {plan.total_gib:8.2f}  of {plan.device_gib:.0f}")
    lines.append(f"  verdict: {plan.verdict()}")
    total_flops = sum(plan.flops_per_sample.values())
    shares = ", ".join(f"{k} {v / total_flops:.0%}" for k, v in plan.flops_per_sample.items())
    lines.append(f"  forward FLOPs per sample: {total_flops:.3g} ({shares})")
    if plan.sequence_parallel > 1:
        lines.append(f"  all-to-all: {plan.all_to_all_gib:.1f} GiB sent per GPU per step, "
                     f"{plan.all_to_all_seconds:.1f} s on NVLink at {ALL_TO_ALL_EFFICIENCY:.0%} of its rated "
                     f"bandwidth (included below)")
    lines.append(f"  time at {plan.mfu:.0%} MFU: {plan.step_seconds:.1f} s per step, "
                 f"{plan.run_hours:.1f} h for {plan.num_steps:,} steps")
    return "\n".join(lines)


def training_of(plan: Plan) -> str:
    trained = f"{plan.trained_parameters / 1e6:,.1f}M parameters trained"
    return f"LoRA rank {plan.lora_rank} ({trained})" if plan.lora_rank else f"full fine-tuning ({trained})"


# Sequence-parallel sizes the table plans beside SP 1, per profile.
TABLE_SEQUENCE_PARALLEL = {"zero3_2xh200": (2,)}


def with_sequence_parallel(config: Config, sequence_parallel: int, micro: int, global_batch: int,
                           world_size: int) -> Config:
    """`config` with `sequence_parallel` and the batch settings that keep micro-batch `micro` per
    sequence-parallel group and the global batch: fewer data-parallel groups, more accumulation."""
    groups = world_size // sequence_parallel
    if global_batch % (micro * groups):
        raise ConfigError(f"a global batch of {global_batch} does not split into micro-batches of {micro} "
                          f"over {groups} data-parallel group(s)")
    config = copy.deepcopy(config)
    config.distributed.sequence_parallel_size = sequence_parallel
    config.training.batch_size = micro * groups
    config.training.gradient_accumulation = global_batch // (micro * groups)
    return config


def hardware_table(config: Config, mfu: float = 0.4, precomputed: bool = False) -> list[dict[str, Any]]:
    """The planner beside the reference hardware table (docs/training.md), for every GPU profile, with
    sequence parallelism where TABLE_SEQUENCE_PARALLEL names it (same micro-batch and global batch)."""
    repo = Path(__file__).resolve().parents[1]
    rows = []
    for name, gpu, world, reference_hours in HARDWARE_TABLE:
        check_plans_dit(config)
        profile = load_profile(repo / "ds_configs" / f"{name}.json")
        ds, _ = build_deepspeed_config(config, profile, world)
        variants = [(config, ds)]
        for sequence_parallel in TABLE_SEQUENCE_PARALLEL.get(name, ()):
            sp_config = with_sequence_parallel(config, sequence_parallel, ds["train_micro_batch_size_per_gpu"],
                                               config.global_batch_size, world)
            variants.append((sp_config, build_deepspeed_config(sp_config, profile, world)[0]))
        for (variant, variant_ds), checkpointing in itertools.product(variants, CHECKPOINTING_MODES):
            plan = plan_for_ds_config(variant, name, variant_ds, gpu, world, mfu, checkpointing, precomputed,
                                      dit_shape_of(config))
            rows.append({"profile": name + (f" + LoRA r{plan.lora_rank}" if plan.lora_rank else ""),
                         "gpus": f"{world}x {GPUS[gpu].name}", "checkpointing": checkpointing,
                         "sp": plan.sequence_parallel, "accumulation": plan.accumulation,
                         "micro_batch": plan.micro_batch, "total_gib": round(plan.total_gib, 1),
                         "device_gib": plan.device_gib, "fits": plan.fits,
                         "max_micro_batch": plan.max_micro_batch, "step_s": round(plan.step_seconds, 1),
                         "hours": round(plan.run_hours, 1), "reference_hours": reference_hours})
    return rows


def hours_or_dash(hours: float | None) -> str:
    return "-" if hours is None else f"~{hours:.0f} h"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = ("| profile | GPUs | SP | act. ckpt | micro x accum. | GiB/GPU | fits | max micro | s/step | hours | "
              "reference |\n|---|---|---|---|---|---|---|---|---|---|---|")
    body = [f"| {r['profile']} | {r['gpus']} | {r['sp']} | {r['checkpointing']} | "
            f"{r['micro_batch']} x {r['accumulation']} | "
            f"{r['total_gib']} / {r['device_gib']:.0f} | {'yes' if r['fits'] else 'no'} | {r['max_micro_batch']} | "
            f"{r['step_s']} | {r['hours']} | {hours_or_dash(r['reference_hours'])} |" for r in rows]
    return "\n".join([header, *body])


# The flags --table does not use: it plans every profile on its own GPUs and world size, in every mode.
NOT_WITH_TABLE = {"ds_config": "--ds-config", "gpu": "--gpu", "world_size": "--world-size",
                  "checkpointing": "--checkpointing", "best": "--best"}


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse numbers the planner cannot use and flags that contradict each other, naming them."""
    if not 0 < args.mfu <= 1:  # also refuses nan
        raise ConfigError(f"--mfu {args.mfu}: the share of the GPU's peak bf16 FLOP/s a step reaches, in (0, 1] "
                          f"(e.g. 0.4 for 40%)")
    if args.world_size is not None and args.world_size < 1:
        raise ConfigError(f"--world-size {args.world_size}: the number of GPUs, at least 1")
    if args.best and args.checkpointing not in (None, "all"):
        raise ConfigError(f"--best picks the fastest of all three checkpointing modes that fits, --checkpointing "
                          f"{args.checkpointing} plans that mode alone: pass one of the two")
    ignored = [flag for name, flag in NOT_WITH_TABLE.items() if args.table and getattr(args, name) not in (None, False)]
    if ignored:
        raise ConfigError(f"--table plans every DeepSpeed profile on its own GPUs and world size, in every "
                          f"checkpointing mode: {', '.join(ignored)} cannot be used with it")


@reports_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vidar-plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML training config")
    parser.add_argument("--ds-config", help="DeepSpeed JSON profile (default: distributed.ds_config)")
    parser.add_argument("--world-size", type=int, help="number of GPUs (default: the profile's own)")
    parser.add_argument("--gpu", choices=sorted(GPUS),
                        help="the GPU (default: the one the profile is named for, e.g. zero3_2xh200 -> h200)")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation")
    parser.add_argument("--precomputed", action="store_true", help="shards hold latents/embeddings/masks")
    parser.add_argument("--checkpointing", choices=[*CHECKPOINTING_MODES, "all"],
                        help="activation checkpointing mode(s) to plan (default: all three)")
    parser.add_argument("--best", action="store_true",
                        help="plan all three checkpointing modes and name the fastest that fits (none, then "
                             "selective, then full)")
    parser.add_argument("--table", action="store_true",
                        help="every GPU profile beside the reference hardware table (each profile on its own GPUs, "
                             "every checkpointing mode)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    check_arguments(args)
    config = load_config(args.config, args.set)
    if args.table:
        rows = hardware_table(config, args.mfu, args.precomputed)
        print(json.dumps(rows, indent=2) if args.json else markdown_table(rows))
        return 0
    profile_path = args.ds_config or config.distributed.ds_config
    if not profile_path:
        raise ConfigError("no DeepSpeed profile: pass --ds-config or set distributed.ds_config")
    profile = load_profile(profile_path)
    world = args.world_size if args.world_size is not None else profile_world_size(profile)
    if not world:
        raise ConfigError(f"{profile_path} has no train_batch_size to infer its world size: pass --world-size")
    gpu = resolve_gpu(args.gpu, profile_path)
    modes = CHECKPOINTING_MODES if args.checkpointing in (None, "all") else [args.checkpointing]
    check_plans_dit(config)
    ds, _ = build_deepspeed_config(config, profile, world)  # once: the modes share it
    plans = [plan_for_ds_config(config, Path(profile_path).stem, ds, gpu, world, args.mfu, c, args.precomputed,
                                dit_shape_of(config))
             for c in modes]
    best = next((p for p in plans if p.fits), None)  # plans run from the fastest mode to the leanest
    if args.json:
        print(json.dumps({"plans": [asdict(p) for p in plans], "best": best and best.checkpointing}
                         if args.best else [asdict(p) for p in plans], indent=2))
        return 0
    print("\n\n".join(format_plan(p) for p in plans))
    if args.best:
        print(f"\nbest: activation checkpointing {best.checkpointing} (the fastest mode that fits)" if best else
              "\nbest: no checkpointing mode fits at this micro-batch; lower it or add GPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
