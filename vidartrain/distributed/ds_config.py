"""DeepSpeed JSON profiles: loading, the YAML's FSDP words mapped onto ZeRO, and batch arithmetic.

A profile (ds_configs/*.json) holds what depends on the hardware: micro-batch, accumulation, ZeRO
knobs. The YAML holds the rest. Where both speak about the same thing and disagree, the YAML wins and
a warning names both values.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

from vidartrain.config import Config, ConfigError
from vidartrain.errors import cwd_note
from vidartrain.distributed.sequence_parallel import check_sequence_parallel_size

log = logging.getLogger(__name__)

ZERO_STAGE_OF_SHARDING = {"FULL_SHARD": 3, "SHARD_GRAD_OP": 2, "NO_SHARD": 0}


def load_profile(path: str | Path) -> dict[str, Any]:
    """Read a DeepSpeed JSON profile with a clear error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed profile {path} does not exist{cwd_note(path)} (profiles live in ds_configs/)")
    try:
        profile = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"DeepSpeed profile {path}: not valid JSON: {err}") from err
    if not isinstance(profile, dict):
        raise ConfigError(f"DeepSpeed profile {path}: expected a JSON object at the top level, "
                          f"got {type(profile).__name__}")
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "zero_optimization"):
        if key not in profile:
            raise ConfigError(f"DeepSpeed profile {path}: missing `{key}`")
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        value = profile.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"DeepSpeed profile {path}: `{key}` = {json.dumps(value)} "
                              f"({type(value).__name__}): expected a positive integer")
    per_rank = profile["train_micro_batch_size_per_gpu"] * profile["gradient_accumulation_steps"]
    if profile.get("train_batch_size", per_rank) % per_rank:
        raise ConfigError(f"DeepSpeed profile {path}: `train_batch_size` = {profile['train_batch_size']} is not a "
                          f"multiple of micro-batch {profile['train_micro_batch_size_per_gpu']} x gradient "
                          f"accumulation {profile['gradient_accumulation_steps']}: no whole number of ranks "
                          f"(the world size it is written for)")
    zero = profile["zero_optimization"]
    if not isinstance(zero, dict):
        raise ConfigError(f"DeepSpeed profile {path}: `zero_optimization` = {json.dumps(zero)}: expected an "
                          f"object, e.g. {{\"stage\": {json.dumps(zero)}}}")
    check_precision_sections(path, profile)
    check_section_types(path, profile)
    return profile


def check_precision_sections(path: Path, profile: dict[str, Any]) -> None:
    """One precision section each: DeepSpeed's older name `bfloat16` is taken as `bf16` (as DeepSpeed
    reads it; the planner, the resume record and the IDM's float32 rule read `bf16`), and bf16 and fp16
    enabled together are refused now rather than when the engine is built."""
    if "bfloat16" in profile:
        if "bf16" in profile:
            raise ConfigError(f"DeepSpeed profile {path}: both `bf16` and its older name `bfloat16`; keep `bf16`")
        profile["bf16"] = profile.pop("bfloat16")
    enabled = [key for key in ("bf16", "fp16") if isinstance(profile.get(key), dict) and profile[key].get("enabled")]
    if len(enabled) == 2:
        raise ConfigError(f"DeepSpeed profile {path}: `bf16.enabled` and `fp16.enabled` are both true; enable one "
                          f"(bf16 on Ampere and newer GPUs)")


def check_section_types(path: Path, profile: dict[str, Any]) -> None:
    """The ZeRO stage is compared with integers, and the offload and precision sections are read as
    objects (`offloads`, `precision_of`): a string "3", 2.5 or true there is refused here, naming the
    key, instead of failing or silently meaning another stage later."""
    zero = profile["zero_optimization"]
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"DeepSpeed profile {path}: `zero_optimization.stage` = {json.dumps(stage)}: expected "
                          f"an integer 0, 1, 2 or 3")
    sections = [(f"zero_optimization.{key}", zero.get(key), '{"device": "cpu"}')
                for key in ("offload_optimizer", "offload_param")]
    sections += [(key, profile.get(key), '{"enabled": true}') for key in ("bf16", "fp16")]
    for key, value, example in sections:
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"DeepSpeed profile {path}: `{key}` = {json.dumps(value)}: expected an object, "
                              f"e.g. {example}")


def profile_world_size(profile: dict[str, Any]) -> int | None:
    """The world size a profile is written for: train_batch / (micro * accumulation), if it says."""
    if "train_batch_size" not in profile:
        return None
    per_rank = profile["train_micro_batch_size_per_gpu"] * profile["gradient_accumulation_steps"]
    return profile["train_batch_size"] // per_rank


def build_deepspeed_config(config: Config, profile: dict[str, Any], world_size: int) -> tuple[dict[str, Any], list[str]]:
    """Merge the YAML config into a copy of the profile for `world_size` ranks. Pure: neither the
    config nor the profile changes (the activation checkpointing the run uses is
    `checkpointing_mode(config)`). A run calls it once (launch/train.py) and hands the result down.

    Returns the DeepSpeed config dict and the warnings issued (also logged).
    """
    ds = copy.deepcopy(profile)
    ds.pop("_comment", None)
    warnings: list[str] = []
    apply_zero_stage(config, ds, warnings)
    apply_cpu_offload(config, ds, warnings)
    allow_offloaded_client_optimizer(ds)
    apply_precision(config, ds, warnings)
    apply_activation_checkpointing(config, warnings)
    sequence_parallel = config.distributed.sequence_parallel_size
    check_sequence_parallel_size(sequence_parallel, world_size)
    apply_batch_sizes(config, ds, world_size, warnings)
    # DeepSpeed counts every rank of a sequence-parallel group as a data-parallel rank (they see the
    # same samples; distributed/sequence_parallel.py says why its gradient average is still right).
    ds["train_batch_size"] *= sequence_parallel
    apply_gradient_clipping(config, ds, warnings)
    for message in warnings:
        log.warning(message)
    return ds, warnings


def disagree(warnings: list[str], yaml_key: str, yaml_value: Any, json_key: str, json_value: Any) -> None:
    warnings.append(f"YAML `{yaml_key}` = {yaml_value!r} disagrees with DeepSpeed profile "
                    f"`{json_key}` = {json_value!r}; using the YAML value")


def apply_gradient_clipping(config: Config, ds: dict[str, Any], warnings: list[str]) -> None:
    """`training.grad_clip` (the YAML always has one: default 1.0) replaces the profile's clipping."""
    current = ds.get("gradient_clipping")
    if current is not None and current != config.training.grad_clip:
        disagree(warnings, "training.grad_clip", config.training.grad_clip, "gradient_clipping", current)
    ds["gradient_clipping"] = config.training.grad_clip


def yaml_zero_stage(config: Config) -> tuple[str, Any, int] | None:
    """The ZeRO stage the YAML asks for, with the key and value that asked; None if it is silent.
    Words that ask for different stages are refused: one of them would be dropped unsaid."""
    dist = config.distributed
    asked = []
    if dist.zero_stage is not None:
        asked.append(("distributed.zero_stage", dist.zero_stage, dist.zero_stage))
    if dist.use_fsdp is False:
        asked.append(("distributed.use_fsdp", False, 0))
    if dist.sharding_strategy is not None:
        asked.append(("distributed.sharding_strategy", dist.sharding_strategy,
                      ZERO_STAGE_OF_SHARDING[dist.sharding_strategy]))
    elif dist.use_fsdp:
        asked.append(("distributed.use_fsdp", True, 3))  # FSDP's default strategy is FULL_SHARD
    for key, value, stage in asked[1:]:
        first_key, first_value, first_stage = asked[0]
        if stage != first_stage:
            raise ConfigError(f"`{first_key}` = {first_value!r} (ZeRO-{first_stage}) and `{key}` = {value!r} "
                              f"(ZeRO-{stage}) ask for different ZeRO stages: keep one of them")
    return asked[0] if asked else None


def apply_zero_stage(config: Config, ds: dict[str, Any], warnings: list[str]) -> None:
    asked = yaml_zero_stage(config)
    if asked is None:
        return
    key, value, stage = asked
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"`{key}` = {value!r}: ZeRO stage must be 0, 1, 2 or 3")
    current = ds["zero_optimization"].get("stage", 0)
    if current != stage:
        disagree(warnings, key, value, "zero_optimization.stage", current)
        ds["zero_optimization"]["stage"] = stage


def apply_cpu_offload(config: Config, ds: dict[str, Any], warnings: list[str]) -> None:
    """FSDP's CPU offload: the optimizer, and under ZeRO-3 the parameters too, on the CPU (or neither)."""
    wanted = config.distributed.cpu_offload
    if wanted is None:
        return
    zero = ds["zero_optimization"]
    sections = ("offload_optimizer", "offload_param") if zero.get("stage", 0) == 3 else ("offload_optimizer",)
    if any(offloads(ds, key) != wanted for key in sections):
        keys = " and ".join(f"zero_optimization.{key}" for key in sections)
        disagree(warnings, "distributed.cpu_offload", wanted, keys, {key: zero.get(key) for key in sections})
    if wanted:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if zero.get("stage", 0) == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    else:
        zero.pop("offload_optimizer", None)
        zero.pop("offload_param", None)


def offloads(ds: dict[str, Any], what: str) -> bool:
    """Whether ZeRO's `what` ("offload_optimizer" or "offload_param") moves off the GPU: present with
    a device other than "none" (DeepSpeed's own reading)."""
    offload = ds.get("zero_optimization", {}).get(what) or {}
    return offload.get("device", "none") != "none"


def allow_offloaded_client_optimizer(ds: dict[str, Any]) -> None:
    """The trainer hands DeepSpeed torch's AdamW (trainers/base.py `build_optimizer`), which steps the
    offloaded partitions on the CPU. With the optimizer offloaded, deepspeed.initialize refuses any
    optimizer but its own CPU Adam unless `zero_force_ds_cpu_optimizer` is false, so it is set false
    here (the YAML's cpu_offload and a profile's offload alike); a profile that forces it, and an
    offload at ZeRO stage 0, are refused now, not found out when the engine is built or runs."""
    if not offloads(ds, "offload_optimizer"):
        return
    stage = ds["zero_optimization"].get("stage", 0)
    if stage == 0:  # DeepSpeed offloads through its ZeRO optimizer alone and would ignore the section
        raise ConfigError(f"`zero_optimization.offload_optimizer` (YAML distributed.cpu_offload or the profile) needs "
                          f"ZeRO stage 1, 2 or 3, but the stage is {stage}: DeepSpeed would keep the optimizer "
                          f"on the GPU")
    if ds.get("zero_force_ds_cpu_optimizer", False):
        raise ConfigError("DeepSpeed profile `zero_force_ds_cpu_optimizer` = true refuses the trainer's optimizer "
                          "(torch's AdamW, stepping the offloaded partitions on the CPU): remove it or set it false")
    ds["zero_force_ds_cpu_optimizer"] = False


def precision_of(ds: dict[str, Any]) -> str:
    """bf16, fp16 or fp32, as DeepSpeed reads the sections (a null one as absent)."""
    enabled = {key: (ds.get(key) or {}).get("enabled") for key in ("bf16", "fp16")}
    return "bf16" if enabled["bf16"] else "fp16" if enabled["fp16"] else "fp32"


def fixed_by_checkpoint(ds: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint saved under the DeepSpeed config `ds` fixes for a run that resumes it: how the
    optimizer states are partitioned (the ZeRO stage) and the precision of the weights (which states
    exist). A resume under another profile is refused before the engine is built, where DeepSpeed's
    loader would fail on missing files."""
    return {"zero_stage": ds.get("zero_optimization", {}).get("stage", 0), "precision": precision_of(ds)}


def apply_precision(config: Config, ds: dict[str, Any], warnings: list[str]) -> None:
    wanted = config.distributed.mixed_precision
    current = precision_of(ds)
    normalised = "fp32" if wanted == "no" else wanted
    if config.loss.type == "idm":
        normalised = idm_precision(normalised, current)
    elif normalised is None:
        return
    elif normalised != current:
        disagree(warnings, "distributed.mixed_precision", wanted, "bf16/fp16.enabled", current)
    ds["bf16"] = {"enabled": normalised == "bf16"}
    ds["fp16"] = {"enabled": normalised == "fp16"}


def idm_precision(wanted: str | None, profile: str) -> str:
    """The IDM's BatchNorm keeps float32 statistics, so its engine always holds float32 weights (the
    forward runs under bf16 autocast on accelerators): a bf16 profile is expected, not a conflict."""
    if wanted not in (None, "fp32"):
        raise ConfigError(f"`distributed.mixed_precision` = {wanted!r}: the IDM trains float32 weights "
                          f"(BatchNorm statistics are float32; bf16 autocast applies on GPUs); set it to fp32")
    if profile != "fp32":
        log.info("IDM: float32 weights under the %s profile, its forward under bf16 autocast on GPUs (BatchNorm "
                 "statistics are float32)", profile)
    return "fp32"


def checkpointing_mode(config: Config) -> str:
    """The DiT's activation checkpointing for this run: `model.checkpointing`, unless the FSDP word
    `distributed.activation_checkpointing` (a boolean: "selective" and "full" both count as on)
    disagrees with it; then the FSDP word's "full" or "none"."""
    wanted = config.distributed.activation_checkpointing
    if wanted is None or wanted == (config.model.checkpointing != "none"):
        return config.model.checkpointing
    return "full" if wanted else "none"


def apply_activation_checkpointing(config: Config, warnings: list[str]) -> None:
    """Say so when the FSDP word overrules `model.checkpointing` (see `checkpointing_mode`)."""
    mode = checkpointing_mode(config)
    if mode != config.model.checkpointing:
        warnings.append(f"YAML `distributed.activation_checkpointing` = {config.distributed.activation_checkpointing!r} "
                        f"disagrees with `model.checkpointing` = {config.model.checkpointing!r}; using {mode!r}")


def apply_batch_sizes(config: Config, ds: dict[str, Any], world_size: int, warnings: list[str]) -> None:
    """Check global batch = micro x accumulation x data-parallel ranks, with the numbers in the error.
    Under sequence parallelism the data-parallel ranks are the world / SP groups, and the errors say so:
    "world size 32" would puzzle whoever launched 64 ranks."""
    micro = ds["train_micro_batch_size_per_gpu"]
    accumulation = ds["gradient_accumulation_steps"]
    training = config.training
    sequence_parallel = config.distributed.sequence_parallel_size
    data_parallel = world_size // sequence_parallel
    ranks = (f"world size {world_size}" if sequence_parallel == 1 else
             f"{data_parallel} data-parallel groups ({world_size} ranks / sequence_parallel_size {sequence_parallel})")
    if training.gradient_accumulation is not None:
        # The YAML fixes the per-step batch over all data-parallel ranks and the accumulation itself.
        if training.batch_size % data_parallel:
            raise ConfigError(f"`training.batch_size` = {training.batch_size} (one micro-step over all ranks) "
                              f"is not divisible by the {ranks}")
        yaml_micro = training.batch_size // data_parallel
        if yaml_micro != micro:
            disagree(warnings, "training.batch_size / world size", yaml_micro, "train_micro_batch_size_per_gpu", micro)
            micro = yaml_micro
        if training.gradient_accumulation != accumulation:
            disagree(warnings, "training.gradient_accumulation", training.gradient_accumulation,
                     "gradient_accumulation_steps", accumulation)
            accumulation = training.gradient_accumulation
    global_batch = config.global_batch_size
    if micro * accumulation * data_parallel != global_batch:
        raise ConfigError(
            f"batch mismatch: the YAML asks for a global batch of {global_batch}, but micro-batch {micro} "
            f"x gradient accumulation {accumulation} x {ranks} = "
            f"{micro * accumulation * data_parallel}. Use the profile written for this world size, or set "
            f"training.batch_size / training.gradient_accumulation to match")
    written = ds.get("train_batch_size")  # the profile's global batch, for the world size it is written for
    if written is not None and written != global_batch:
        key = "training.batch_size" + ("" if training.gradient_accumulation is None else
                                       " x training.gradient_accumulation")
        disagree(warnings, key, global_batch, "train_batch_size", written)
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = accumulation
    ds["train_batch_size"] = global_batch
