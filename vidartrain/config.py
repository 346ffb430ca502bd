"""Training configuration: plain dataclasses, loaded from YAML, with `--set section.key=value` overrides.

Every error is raised here, before any model is built or any GPU time is spent:
unknown keys (with the closest valid name), wrong types (path, value, expected type) and
impossible values (which, and why).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vidartrain.data.shard_index import check_shard_files, read_index, shard_sources
from vidartrain.errors import ConfigError, cwd_note
from vidartrain.shapes import (CLIP_HEIGHT, CLIP_NUM_FRAMES, CLIP_WIDTH, DIT_PATCH_SIZE, MIN_CAUSAL_LATENT_FRAMES,
                               MIN_CAUSAL_VIDEO_FRAMES, PIXELS_PER_TOKEN, VAE_STRIDE, tokens_per_latent_frame)


CAUSAL_LOSS = "causal_flow_matching"  # the loss.type of stage 2 (Vidarc, WanModelCausal)
STAGE_2_CONFIG = "configs/vidarc_causal.yaml"


@dataclass
class ModelConfig:
    ckpt_dir: str | None = None  # Wan2.2-TI2V-5B layout: config.json, DiT safetensors, VAE, T5, tokenizer
    pt_dir: str | None = None  # fine-tuned DiT state dict applied on top (vidar.pt for stage 2)
    # Activation checkpointing of the DiT's blocks: "full" keeps each block's input, "selective" the
    # outputs of its matmuls and attention, "none" everything (YAML alias: gradient_checkpointing true
    # = full, false = none)
    checkpointing: Literal["none", "selective", "full"] = "full"
    compile: bool | None = None  # torch.compile each DiT block; None: on CUDA yes, elsewhere no
    vae_config: dict[str, Any] | None = None  # WanVAE constructor overrides (tiny debug checkpoints)
    t5_config: dict[str, Any] | None = None  # UMT5Encoder constructor overrides (tiny debug checkpoints)
    idm_path: str | None = None  # idm.pt for the embodiment-aware loss (None: masks come from shards)
    attention: Literal["auto", "sdpa", "flex"] = "auto"  # causal attention backend
    # IDM widths (vidartrain.models.idm.IdmArchitecture overrides; tiny debug configs). None: the
    # published 92.7M-parameter IDM. A checkpoint in idm_path keeps its own.
    idm_config: dict[str, Any] | None = None


@dataclass
class TrainingConfig:
    num_steps: int = 14000
    # Global batch (samples per optimizer step). When gradient_accumulation is given too, batch_size is
    # the batch of one micro-step over all ranks and the global batch is batch_size * gradient_accumulation
    # (configs/vidarc_2xh200.yaml: batch_size 16 = 8 per GPU, accumulation 8 -> 128).
    batch_size: int = 128
    gradient_accumulation: int | None = None
    lr: float = 2.0e-5
    warmup: int = 200
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1.0e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # fnmatch patterns of trained parameters kept frozen (e.g. `text_embedding.*`, `blocks.[0-9].*`);
    # t5, vae and idm name the helper models, which are always frozen (vidartrain/trainers/freezing.py);
    # BatchNorm running statistics of a frozen part still update (they are buffers, not parameters)
    freeze: list[str] = field(default_factory=lambda: ["t5", "vae"])
    seed: int = 42
    log_every: int = 10
    log_seconds: float = 30.0  # without a terminal: a progress line at least this often
    save_every: int = 500
    keep_last: int = 3
    val_every: int = 0  # 0 disables periodic validation
    # held-out samples each validation evaluates: the first ones of data.val_shards (all of them if it holds
    # fewer; null: all), whatever the world size and micro-batch
    val_samples: int | None = 32
    max_nonfinite_steps: int = 5  # consecutive non-finite losses before the run stops
    # EMA of the trained weights (vidartrain/trainers/ema.py): 0 = off; the decay ramps up linearly
    # over the first ema_warmup optimizer steps (0 = full decay from the first step)
    ema_decay: float = 0.0
    ema_warmup: int = 0
    # the periodic validation (val_every) also evaluates the EMA, logged as val/ema_loss (needs ema_decay > 0)
    validate_ema: bool = False


@dataclass
class LoraConfig:
    """LoRA adapters on the DiT's linear layers (vidartrain/models/wan/lora.py): the base model stays
    frozen, only the adapters are trained. rank 0 = off (full fine-tuning)."""

    rank: int = 0
    alpha: float | None = None  # the update is scaled by alpha / rank; None: alpha = rank (scale 1)
    dropout: float = 0.0  # dropout on the adapters' input
    # fnmatch patterns over module names; every match must be an nn.Linear. Default: self- and
    # cross-attention q/k/v/o and both FFN linears of every block (the usual Wan LoRA targets)
    target_modules: list[str] = field(default_factory=lambda: [
        "blocks.*.self_attn.[qkvo]", "blocks.*.cross_attn.[qkvo]", "blocks.*.ffn.0", "blocks.*.ffn.2"])

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def effective_alpha(self) -> float:
        return float(self.rank) if self.alpha is None else self.alpha


@dataclass
class LossConfig:
    # The stage follows from this alone: flow_matching trains Vidar (WanModel, stage 1),
    # causal_flow_matching Vidarc (WanModelCausal, stage 2), idm the inverse dynamics model.
    type: Literal["flow_matching", "causal_flow_matching", "idm"] = "flow_matching"
    embodiment_aware: bool = False
    eta: float = 3.0  # Eq. 7 weight (1 + eta * U)
    shift: float = 5.0  # Wan's sigma shift: sigma' = s*sigma / (1 + (s-1)*sigma)
    mask_weight: float = 3.0e-3  # Eq. 4 lambda on the IDM soft mask


@dataclass
class SelfForcingConfig:
    """Stage 2 only (loss.type causal_flow_matching)."""

    # latent frames of one stage-2 training window (YAML aliases: self_forcing.chunk_size, model.chunk_size)
    window_frames: int = 16
    kv_cache_length: int = 64  # cache capacity in latent frames
    context_mode: Literal["ground_truth", "self_generated", "mixed"] = "ground_truth"
    self_generated_prob: float = 0.5  # 'mixed': probability of a self-generated context
    denoising_steps: int = 4  # few-step sampler that produces self-generated context
    closed_loop: bool = False  # train on the deployed schedule (generate 4, pop, re-prefill real)
    rollout_bound: int = 60  # video frames in the window before clear + re-prefill
    rollout_prefill_num: int = 33  # real video frames re-prefilled after a window reset
    sink_frames: int = 0


@dataclass
class DataConfig:
    # directory with index.json and the training shards, or a mixture: a list of {path, weight}
    # (each sample drawn from source i with probability weight_i / sum of weights)
    shards: str | list[dict[str, Any]] | None = None
    val_shards: str | None = None
    num_frames: int = CLIP_NUM_FRAMES
    height: int = CLIP_HEIGHT
    width: int = CLIP_WIDTH
    # frames of another aspect ratio than height x width: scale and cut the centre (crop), scale and
    # pad black borders (pad), or scale each axis on its own (stretch); pre-encoded shards must match
    resize: Literal["crop", "pad", "stretch"] = "crop"
    fps: int = 10
    cfg_prob: float = 0.1  # text dropout for classifier-free guidance
    num_workers: int = 2  # DataLoader worker processes per rank of the training loader (held-out batches: none)
    seed: int = 0
    # samples that fail to decode are skipped (logged, counted as data/skipped_samples); more, summed over
    # ranks, stop the run with a checkpoint
    max_bad_samples: int = 100

    @property
    def shard_sources(self) -> list[tuple[str, float]]:
        """(directory, weight) of every training source: the one directory with weight 1, or the
        mixture's entries (validated by `validate`)."""
        return [] if self.shards is None else shard_sources(self.shards)


@dataclass
class IdmConfig:
    """The robot's action space as the IDM sees it."""

    # Per-dimension statistics the IDM de-normalises its output with. None: the exact mean/std of
    # the training shards' actions (index.json "actions"). A fine-tuned idm.pt keeps its own (others
    # set here beside model.idm_path are refused).
    action_mean: list[float] | None = None
    action_std: list[float] | None = None
    # Gripper dimensions for the action accuracy (error < 0.6 there, < 0.06 on the others);
    # default: the 14-dim bimanual layout, 2 x (6 joints + 1 gripper).
    gripper_dims: list[int] = field(default_factory=lambda: [6, 13])


@dataclass
class OutputConfig:
    # exported weights (vidar.pt / vidarc.pt + .safetensors, or idm.pt); None: OUTPUT_DIR/export/<stage>.pt.
    # Refused when it would overwrite an input (model.pt_dir, model.idm_path, inside model.ckpt_dir)
    # unless the run is started with --overwrite.
    save_path: str | None = None
    output_dir: str = "outputs/run"  # DeepSpeed checkpoints, TensorBoard events, logs


@dataclass
class DistributedConfig:
    ds_config: str | None = None  # DeepSpeed JSON profile (ds_configs/*.json); the CLI flag wins
    zero_stage: int | None = None
    # The reference recipe's FSDP words (docs/training.md), translated onto DeepSpeed (distributed/ds_config.py).
    use_fsdp: bool | None = None
    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"] | None = None
    mixed_precision: Literal["bf16", "fp16", "fp32", "no"] | None = None
    activation_checkpointing: bool | None = None
    cpu_offload: bool | None = None
    # Ulysses sequence parallelism (distributed/sequence_parallel.py): groups of this many consecutive
    # ranks split every sample's tokens; data parallelism runs over world / this many groups. It must
    # divide the world size, the DiT's attention heads (24: 1, 2, 3, 4, 6, 8, 12, 24) and the tokens
    # of every sequence the DiT runs (`sequence_parallel_problems`).
    sequence_parallel_size: int = 1


@dataclass
class ValidationConfig:
    """Validation samples: videos generated from held-out clips (data.val_shards) with the current
    weights, written to OUTPUT/samples/step_N/ and TensorBoard with PSNR (and IDM action errors)."""

    every: int = 0  # steps between sample sets; 0 renders none
    num_samples: int = 2  # held-out clips (the first ones of data.val_shards, the same every time)
    steps: int = 4  # denoising steps (per 4-latent-frame chunk for the causal model)
    num_frames: int = CLIP_NUM_FRAMES  # generated video frames, 4k+1, at most data.num_frames
    guide_scale: float = 5.0
    shift: float = 5.0
    solver: Literal["unipc", "euler"] = "unipc"
    seed: int = 0  # sample i uses seed + i at every evaluation, so sets are comparable over the run
    negative_prompt: str | None = None  # None: upstream Wan2.2's negative prompt


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    self_forcing: SelfForcingConfig = field(default_factory=SelfForcingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    idm: IdmConfig = field(default_factory=IdmConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    @property
    def global_batch_size(self) -> int:
        accumulation = self.training.gradient_accumulation or 1
        return self.training.batch_size * accumulation

    @property
    def causal(self) -> bool:
        """Whether this is stage 2 (the causal DiT): loss.type alone says so."""
        return self.loss.type == CAUSAL_LOSS

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply `section.key=value` overrides, type-check and validate it."""
    path = Path(path)
    raw = read_yaml_with_base(path, seen=())
    for override in overrides or []:
        apply_override(raw, override)
    try:
        return config_from_dict(raw)
    except ConfigError as err:
        # errors name their keys in backticks: those an override set are named with it (not the file's fault)
        culprits = " ".join(f"--set {o}" for o in overrides or [] if f"`{o.split('=', 1)[0].strip()}`" in str(err))
        raise ConfigError(f"{path}{f' ({culprits})' if culprits else ''}: {err}") from None


def read_yaml_with_base(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    """Read a YAML mapping; a top-level `base: other.yaml` (relative to this file) is read first and
    this file's sections are merged over it key by key."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist{cwd_note(path)}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: `base` chain loops back to itself")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    base = raw.pop("base", None)
    raw = map_window_aliases(raw)  # per file, so that a file's window overrides its base's, whatever the name
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: `base` = {base!r}: expected the path of another YAML config")
    merged = read_yaml_with_base(path.parent / base, seen + (path.resolve(),))
    for section, values in raw.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from a plain (YAML-shaped) dictionary."""
    check_replaced_keys(raw)
    config = build_dataclass(Config, map_aliases(raw), prefix="")
    check_stage_2_keys(raw, config)
    validate(config)
    return config


def check_replaced_keys(raw: dict[str, Any]) -> None:
    """Refuse a key of an earlier version whose setting now means something else, saying what replaced it."""
    training = raw.get("training")
    if isinstance(training, dict) and "val_batches" in training:
        raise ConfigError(f"`training.val_batches` = {training['val_batches']!r} is replaced by "
                          f"`training.val_samples`, the number of held-out samples each validation evaluates "
                          f"(counted per rank in micro-batches, the validation loss changed with the world size): "
                          f"for as many as before, set val_samples = val_batches x micro-batch x data-parallel "
                          f"ranks (null: every held-out sample)")


def map_aliases(raw: dict[str, Any]) -> dict[str, Any]:
    """YAML keys that name a field's value another way, mapped onto that one field (a contradiction
    between them is an error):

    - `model.gradient_checkpointing: true | false` is `model.checkpointing: full | none`;
    - `model.model_class` and `self_forcing.causal` say what `loss.type` says (WanModelCausal / true:
      causal_flow_matching); they are checked against it and dropped;
    - `self_forcing.chunk_size` and `model.chunk_size` are `self_forcing.window_frames`
      (`map_window_aliases`, file by file: the 2x H200 overlay's `model.chunk_size` wins over its
      base's `self_forcing.chunk_size`).

    Stage-2 settings (the `self_forcing` section, `model.chunk_size`, a causal model class) in a
    config whose loss.type is not causal_flow_matching would be ignored: `check_stage_2_keys` refuses them."""
    raw = map_gradient_checkpointing(raw)
    model, self_forcing, loss = (raw.get(key) for key in ("model", "self_forcing", "loss"))
    if not all(isinstance(section, (dict, type(None))) for section in (model, self_forcing, loss)):
        return raw  # build_dataclass names the section that is not a mapping
    model, self_forcing = dict(model or {}), dict(self_forcing or {})
    loss_type = (loss or {}).get("type", LossConfig.type)
    causal = loss_type == CAUSAL_LOSS
    said = f"`loss.type` = {loss_type}"
    for key, value, causal_value in (("model.model_class", model.pop("model_class", None), "WanModelCausal"),
                                     ("self_forcing.causal", self_forcing.pop("causal", None), True)):
        if value is None:
            continue
        expected = ("WanModel", "WanModelCausal") if key == "model.model_class" else (False, True)
        if value not in expected or isinstance(value, bool) != (key == "self_forcing.causal"):
            raise ConfigError(f"`{key}` = {value!r}: expected one of {', '.join(map(repr, expected))}")
        if (value == causal_value) != causal:
            if value == causal_value and "type" not in (loss or {}):
                continue  # a stage-2 overlay without its base: check_stage_2_keys says so
            raise ConfigError(f"`{key}` = {value!r} contradicts {said}: the stage follows from loss.type "
                              f"({CAUSAL_LOSS} trains WanModelCausal, flow_matching WanModel); drop `{key}` "
                              f"or make it agree")
    mapped = {**raw, "model": model}
    if self_forcing or "self_forcing" in raw:
        mapped["self_forcing"] = self_forcing
    return map_window_aliases(mapped)


def map_window_aliases(layer: dict[str, Any]) -> dict[str, Any]:
    """`self_forcing.chunk_size` and `model.chunk_size` of one YAML layer (a file, an override) as
    `self_forcing.window_frames`; mapped layer by layer, so that a later layer's window wins over an
    earlier one's whatever name either uses. Two different windows in one layer are an error."""
    model, self_forcing = layer.get("model"), layer.get("self_forcing")
    if not isinstance(model, (dict, type(None))) or not isinstance(self_forcing, (dict, type(None))):
        return layer  # build_dataclass names the section that is not a mapping
    model, self_forcing = dict(model or {}), dict(self_forcing or {})
    given = {f"{section}.{key}": values.pop(key) for section, values, key in
             (("self_forcing", self_forcing, "window_frames"), ("self_forcing", self_forcing, "chunk_size"),
              ("model", model, "chunk_size")) if key in values}
    if not given:
        return layer
    if len({json.dumps(value) for value in given.values()}) > 1:
        raise ConfigError(f"{' and '.join(f'`{key}` = {value!r}' for key, value in given.items())} name the same "
                          f"setting, the stage-2 training window in latent frames: keep one of them")
    self_forcing["window_frames"] = next(iter(given.values()))
    return {**layer, "model": model, "self_forcing": self_forcing}


def check_stage_2_keys(raw: dict[str, Any], config: Config) -> None:
    """Stage-2 (Vidarc) settings in a YAML mapping `raw` (before `map_aliases`) of a config that
    trains another stage would be ignored: refuse them, saying how to layer a stage-2 overlay."""
    if config.causal:
        return
    model, self_forcing = raw.get("model") or {}, raw.get("self_forcing") or {}
    keys = [f"`self_forcing.{key}`" + (" (YAML: model.chunk_size or self_forcing.chunk_size)"
                                       if key == "window_frames" else "") for key in self_forcing]
    keys += ["`model.model_class`"] if model.get("model_class") == "WanModelCausal" else []
    if keys:
        given = "type" in (raw.get("loss") or {})
        raise ConfigError(f"{', '.join(keys)}: stage-2 (Vidarc) settings in a config whose "
                          f"`loss.type` = {config.loss.type}{'' if given else ' (the default)'} trains another "
                          f"stage, where they would be ignored. A stage-2 overlay goes on top of the stage-2 "
                          f"config: add `base: vidarc_causal.yaml` (the path of {STAGE_2_CONFIG} relative to "
                          f"this file) or set `loss.type: {CAUSAL_LOSS}`")


def map_gradient_checkpointing(raw: dict[str, Any]) -> dict[str, Any]:
    """`model.gradient_checkpointing: true | false` is `model.checkpointing: full | none`."""
    model = raw.get("model")
    if not isinstance(model, dict) or "gradient_checkpointing" not in model:
        return raw
    model = dict(model)
    enabled = model.pop("gradient_checkpointing")
    if not isinstance(enabled, bool):
        raise ConfigError(f"`model.gradient_checkpointing` = {enabled!r}: expected true or false")
    asked = model.get("checkpointing")
    if asked is not None and (asked != "none") != enabled:
        raise ConfigError(f"`model.gradient_checkpointing` = {enabled} contradicts `model.checkpointing` = "
                          f"{asked!r}: keep one of them")
    model.setdefault("checkpointing", "full" if enabled else "none")
    return {**raw, "model": model}


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one `section.key=value` override; the value is parsed as YAML (typed later)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    dotted, text = override.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {override!r}: key must be section.key (e.g. training.lr=1e-5)")
    section, key = parts
    value = yaml.safe_load(text) if text.strip() else None
    for section, values in map_window_aliases({section: {key: value}}).items():
        target = raw.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"override {override!r}: section {section!r} in the file is not a mapping")
        target.update(values)


def build_dataclass(cls: type, raw: Any, prefix: str) -> Any:
    """Instantiate dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    where = prefix.rstrip(".") or "top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown key `{path}`{did_you_mean(key, names, prefix)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = build_dataclass(hint, value, prefix=f"{path}.")
        else:
            kwargs[key] = coerce(value, hint, path)
    return cls(**kwargs)


def did_you_mean(key: str, names: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    if close:
        return f"; did you mean `{prefix}{close[0]}`?"
    return f"; valid keys here: {', '.join(names)}"


def coerce(value: Any, hint: Any, path: str) -> Any:
    """Check `value` against a type hint; ints are accepted for floats, lists for tuples."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(value, option, path)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"`{path}` = {value!r}: expected one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise type_error(path, value, f"a list of {args[0].__name__}")
        return [coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise type_error(path, value, f"a list of {len(args)} numbers")
        return tuple(coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise type_error(path, value, "a mapping")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise type_error(path, value, "a boolean (true/false)")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise type_error(path, value, "an integer")
        return value
    if hint is float:
        if isinstance(value, str):
            value = parse_float_literal(value, path)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise type_error(path, value, "a number")
        if not math.isfinite(value):
            raise ConfigError(f"`{path}` = {value}: must be a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise type_error(path, value, "a string")
        return value
    raise ConfigError(f"`{path}`: unsupported type {hint!r} in the config schema")


def parse_float_literal(text: str, path: str) -> float:
    """PyYAML reads `1e-5` (no dot) as a string; accept it as the number the user meant."""
    try:
        return float(text)
    except ValueError:
        raise type_error(path, text, "a number") from None


def type_error(path: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"`{path}` = {value!r} ({type(value).__name__}): expected {expected}")


# ----------------------------------------------------------------------------------------------
# Inputs on disk (checked when a run starts, not when a config is merely loaded)


def check_inputs_exist(config: Config) -> None:
    """Every file and folder the run will read exists, or one error lists all that are missing."""
    model, data = config.model, config.data
    shard_dirs = [(f"data.shards[{i}].path" if isinstance(data.shards, list) else "data.shards", path)
                  for i, (path, _) in enumerate(data.shard_sources)]
    shard_dirs += [("data.val_shards", data.val_shards)] if data.val_shards is not None else []
    needed: list[tuple[str, str | None, str]] = [
        *((key, path, "index.json") for key, path in shard_dirs),
        ("model.pt_dir", model.pt_dir, ""),
        ("model.idm_path", model.idm_path, ""),
    ]
    if config.loss.type != "idm":
        needed.append(("model.ckpt_dir", model.ckpt_dir, "config.json"))
    if data.shards is None:
        raise ConfigError("`data.shards` is not set: point it at a directory written by `vidar-shard`")
    absent = [(key, value, Path(value) / inside) for key, value, inside in needed
              if value is not None and not (Path(value) / inside).exists()]
    if absent:
        raise ConfigError(f"missing inputs{cwd_note(*(value for _, value, _ in absent))}:\n  " + "\n  ".join(
            f"`{key}` = {value}: {path} does not exist" for key, value, path in absent))
    for key, shards in shard_dirs:
        try:  # an unfinished conversion or a lost shard fails here, before any model is built
            check_shard_files(read_index(shards), shards)
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"`{key}` = {shards}: {error}") from error


def export_path(config: Config, output_dir: Path, stage_name: str) -> Path:
    """Where the run exports its weights: `output.save_path`, or OUTPUT_DIR/export/<stage>.pt."""
    if config.output.save_path is not None:
        return Path(config.output.save_path)
    return output_dir / "export" / f"{stage_name}.pt"


def check_export_path(config: Config, path: Path, overwrite: bool, resuming: bool) -> None:
    """Refuse an export that would replace the run's own inputs (e.g. the published weights the
    README downloads into checkpoints/), or, in a run that resumes no checkpoint, an earlier run's
    export (a save_path that --output_dir does not move), unless the user asked for it with --overwrite."""
    if overwrite:
        return
    written = [path.resolve(), path.with_suffix(".safetensors").resolve()]
    model = config.model
    clashes = [f"`model.{key}` = {value}" for key, value in (("pt_dir", model.pt_dir), ("idm_path", model.idm_path))
               if value is not None and Path(value).resolve() in written]
    if model.ckpt_dir is not None and any(file.is_relative_to(Path(model.ckpt_dir).resolve()) for file in written):
        clashes.append(f"inside `model.ckpt_dir` = {model.ckpt_dir}")
    if clashes:
        raise ConfigError(f"the export path {path} (`output.save_path`) would overwrite an input of this run: "
                          f"{'; '.join(clashes)}. Choose another output.save_path (default: OUTPUT_DIR/export/), "
                          f"or pass --overwrite to replace it")
    existing = [str(file) for file in written if file.exists()]
    if existing and not resuming:
        raise ConfigError(f"the export path {path} (`output.save_path`) would overwrite an earlier run's export "
                          f"({', '.join(existing)}) at the end of this run, which resumes no checkpoint. Choose "
                          f"another output.save_path (default: OUTPUT_DIR/export/), or pass --overwrite to replace it")


# ----------------------------------------------------------------------------------------------
# Validation of values


def validate(config: Config) -> None:
    """Reject impossible values, naming the key and the reason."""
    problems = list(value_problems(config))
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


def value_problems(config: Config) -> typing.Iterator[str]:
    t, loss, sf, data = config.training, config.loss, config.self_forcing, config.data
    positive = {
        "training.num_steps": t.num_steps, "training.batch_size": t.batch_size,
        "training.lr": t.lr, "training.eps": t.eps, "training.log_every": t.log_every,
        "training.save_every": t.save_every, "training.keep_last": t.keep_last,
        "training.log_seconds": t.log_seconds,
        "training.max_nonfinite_steps": t.max_nonfinite_steps,
        "loss.shift": loss.shift,
        "data.fps": data.fps, "self_forcing.kv_cache_length": sf.kv_cache_length,
        "self_forcing.denoising_steps": sf.denoising_steps, "self_forcing.rollout_bound": sf.rollout_bound,
        "self_forcing.rollout_prefill_num": sf.rollout_prefill_num,
    }
    for key, value in positive.items():
        if value <= 0:
            yield f"`{key}` = {value}: must be > 0"
    if t.val_samples is not None and t.val_samples <= 0:
        yield f"`training.val_samples` = {t.val_samples}: must be > 0 (null: every held-out sample)"
    non_negative = {
        "training.warmup": t.warmup, "training.weight_decay": t.weight_decay, "training.min_lr": t.min_lr,
        "training.grad_clip": t.grad_clip, "training.val_every": t.val_every,
        "loss.eta": loss.eta, "loss.mask_weight": loss.mask_weight,
        "data.num_workers": data.num_workers, "data.max_bad_samples": data.max_bad_samples,
        "self_forcing.sink_frames": sf.sink_frames, "training.seed": t.seed, "data.seed": data.seed,
        "validation.seed": config.validation.seed,
    }
    for key, value in non_negative.items():
        if value < 0:
            yield f"`{key}` = {value}: must be >= 0"
    if loss.embodiment_aware and not config.causal:
        yield (f"`loss.embodiment_aware` = true weights stage 2's loss by the IDM's masks (Eq. 7), but `loss.type` = "
               f"{loss.type} trains another stage, where it would be ignored: set it false, or train stage 2 "
               f"(`loss.type: {CAUSAL_LOSS}`)")
    if t.gradient_accumulation is not None and t.gradient_accumulation < 1:
        yield f"`training.gradient_accumulation` = {t.gradient_accumulation}: must be >= 1"
    if t.warmup > t.num_steps:
        yield f"`training.warmup` = {t.warmup} exceeds `training.num_steps` = {t.num_steps}"
    if t.min_lr > t.lr:
        yield f"`training.min_lr` = {t.min_lr} exceeds `training.lr` = {t.lr}"
    if t.min_lr > 0 and t.lr_schedule == "constant":
        yield (f"`training.min_lr` = {t.min_lr} is where the cosine schedule ends, and `training.lr_schedule` = "
               f"constant has none: set lr_schedule: cosine, or min_lr: 0")
    for i, beta in enumerate(t.betas):
        if not 0.0 <= beta < 1.0:
            yield f"`training.betas[{i}]` = {beta}: must be in [0, 1)"
    if not 0.0 <= t.ema_decay < 1.0:
        yield f"`training.ema_decay` = {t.ema_decay}: must be in [0, 1) (0 turns the EMA off)"
    if t.ema_warmup < 0:
        yield f"`training.ema_warmup` = {t.ema_warmup}: must be >= 0"
    if t.validate_ema and t.ema_decay == 0:
        yield "`training.validate_ema` = true evaluates the EMA of the weights, but `training.ema_decay` = 0 keeps none"
    if t.validate_ema and t.val_every == 0:
        yield ("`training.validate_ema` = true evaluates the EMA at the periodic validation, but "
               "`training.val_every` = 0 runs none")
    if t.val_every and data.val_shards is None:
        yield (f"`training.val_every` = {t.val_every} but `data.val_shards` is not set: the validation loss is "
               f"measured on held-out shards (set them, or training.val_every=0)")
    if any(not pattern.strip() for pattern in t.freeze):
        yield (f"`training.freeze` = {t.freeze}: entries are parameter-name patterns (e.g. `blocks.[0-9].*`) "
               f"or t5/vae/idm, never empty")
    if not 0.0 <= data.cfg_prob <= 1.0:
        yield f"`data.cfg_prob` = {data.cfg_prob}: must be a probability in [0, 1]"
    if not 0.0 <= sf.self_generated_prob <= 1.0:
        yield f"`self_forcing.self_generated_prob` = {sf.self_generated_prob}: must be in [0, 1]"
    frame_stride = VAE_STRIDE[0]
    if data.num_frames < 1 or (data.num_frames - 1) % frame_stride != 0:
        yield (f"`data.num_frames` = {data.num_frames}: must be {frame_stride}n+1 (the VAE keeps frame 0 and "
               f"compresses each further group of {frame_stride}), e.g. {CLIP_NUM_FRAMES}")
    for key, value in (("data.height", data.height), ("data.width", data.width)):
        if value <= 0 or value % PIXELS_PER_TOKEN != 0:
            yield (f"`{key}` = {value}: must be a positive multiple of {PIXELS_PER_TOKEN} "
                   f"(VAE stride {VAE_STRIDE[1]} x DiT patch {DIT_PATCH_SIZE[1]}), e.g. {CLIP_HEIGHT}x{CLIP_WIDTH}")
    window = sf.window_frames
    if window < MIN_CAUSAL_LATENT_FRAMES:
        yield (f"`self_forcing.window_frames` = {window}: must be >= {MIN_CAUSAL_LATENT_FRAMES} (frame 0 is clean "
               f"context, the later ones are predicted)")
    if config.causal:
        latent_frames = (data.num_frames - 1) // frame_stride + 1
        if window > latent_frames:
            yield (f"`self_forcing.window_frames` = {window} latent frames, but `data.num_frames` = "
                   f"{data.num_frames} gives only {latent_frames} latent frames per sample")
        if window > sf.kv_cache_length:
            yield (f"`self_forcing.window_frames` = {window} exceeds `self_forcing.kv_cache_length` = "
                   f"{sf.kv_cache_length}")
        yield from rollout_window_problems(sf)
        if sf.closed_loop and sf.context_mode != "ground_truth":
            yield (f"`self_forcing.closed_loop` = true trains on the deployed schedule, whose context is the real "
                   f"frames, so `self_forcing.context_mode` = {sf.context_mode} would be ignored: set it to "
                   f"ground_truth, or closed_loop to false")
    yield from validation_problems(config)
    yield from sequence_parallel_problems(config)
    yield from lora_problems(config)
    yield from idm_problems(config.idm)
    yield from mixture_problems(data)


def rollout_window_problems(sf: SelfForcingConfig) -> typing.Iterator[str]:
    """The deployed window policy's rules (`vidartrain.rollouts.RolloutWindow`, which stage 2 builds
    from these keys): the re-prefilled real frames are whole latent frames and fewer than the bound."""
    if (sf.rollout_prefill_num - 1) % VAE_STRIDE[0]:
        yield (f"`self_forcing.rollout_prefill_num` = {sf.rollout_prefill_num}: must be {VAE_STRIDE[0]}n+1 video "
               f"frames (the re-prefilled frames are VAE latent frames), e.g. 33")
    if sf.rollout_prefill_num >= sf.rollout_bound:
        yield (f"`self_forcing.rollout_prefill_num` = {sf.rollout_prefill_num} must be below "
               f"`self_forcing.rollout_bound` = {sf.rollout_bound} (the window is re-prefilled when it would pass it)")


def sequence_parallel_problems(config: Config) -> typing.Iterator[str]:
    """Each rank of a sequence-parallel group holds tokens / SP of every sequence the DiT runs
    (distributed/sequence_parallel.py): an SP size that does not divide one of them would pass every
    other check and fail at the first forward, after the model is loaded. (The world size and the
    heads are checked where they are known; the IDM stage refuses SP > 1 itself.)"""
    size = config.distributed.sequence_parallel_size
    if size <= 1 or config.loss.type == "idm":
        return
    for what, tokens in dit_sequences(config).items():
        if tokens % size:
            yield (f"`distributed.sequence_parallel_size` = {size} does not divide the {tokens:,} tokens of {what} "
                   f"(each rank holds tokens / SP of them): use an SP size that divides {tokens}, or change "
                   f"data.num_frames / height / width")


def dit_sequences(config: Config) -> dict[str, int]:
    """The token counts of the sequences the DiT runs in training and validation, by what they are."""
    data, sf = config.data, config.self_forcing
    per_frame = tokens_per_latent_frame((data.height // VAE_STRIDE[1], data.width // VAE_STRIDE[2]))

    def clip(frames: int) -> int:
        return (1 + (frames - 1) // VAE_STRIDE[0]) * per_frame

    if not config.causal:  # stage 1 runs whole clips, training and validation samples alike
        sequences = {f"a training clip (data.num_frames = {data.num_frames})": clip(data.num_frames)}
        if config.validation.every:
            sequences[f"a validation sample (validation.num_frames = {config.validation.num_frames})"] = \
                clip(config.validation.num_frames)
        return sequences
    if sf.context_mode == "ground_truth" and not sf.closed_loop and not config.validation.every:
        return {f"a teacher-forcing window ([clean | noisy], 2 x self_forcing.window_frames = {sf.window_frames})":
                2 * sf.window_frames * per_frame}
    # cached rollouts, the closed loop and closed-loop validation samples prefill single frames
    return {f"one latent frame ({data.height}x{data.width})": per_frame}


def validation_problems(config: Config) -> typing.Iterator[str]:
    v = config.validation
    if v.every < 0:
        yield f"`validation.every` = {v.every}: must be >= 0 (0 renders no samples)"
    if not v.every:
        return
    if config.loss.type == "idm":
        yield "`validation.every` is set, but validation samples are videos: the IDM stage renders none (set it to 0)"
    if config.data.val_shards is None:
        yield "`validation.every` is set but `data.val_shards` is not: samples are generated from held-out clips"
    for key, value in (("validation.num_samples", v.num_samples), ("validation.steps", v.steps),
                       ("validation.shift", v.shift)):
        if value <= 0:
            yield f"`{key}` = {value}: must be > 0"
    if v.num_frames < 1 or (v.num_frames - 1) % VAE_STRIDE[0]:
        yield f"`validation.num_frames` = {v.num_frames}: must be {VAE_STRIDE[0]}n+1, e.g. {CLIP_NUM_FRAMES}"
    elif config.causal and v.num_frames < MIN_CAUSAL_VIDEO_FRAMES:
        yield (f"`validation.num_frames` = {v.num_frames}: stage 2 samples latent frames after the clip's first one, "
               f"so at least {MIN_CAUSAL_VIDEO_FRAMES}")
    elif v.num_frames > config.data.num_frames:
        yield (f"`validation.num_frames` = {v.num_frames} exceeds `data.num_frames` = {config.data.num_frames} "
               f"(the held-out clips are that long)")


def lora_problems(config: Config) -> typing.Iterator[str]:
    lora = config.lora
    if lora.rank < 0:
        yield f"`lora.rank` = {lora.rank}: must be >= 0 (0 turns LoRA off)"
    if not lora.enabled:
        return
    if lora.alpha is not None and lora.alpha <= 0:
        yield f"`lora.alpha` = {lora.alpha}: must be > 0 (or null for alpha = rank)"
    if not 0.0 <= lora.dropout < 1.0:
        yield f"`lora.dropout` = {lora.dropout}: must be in [0, 1)"
    if not lora.target_modules or any(not pattern.strip() for pattern in lora.target_modules):
        yield (f"`lora.target_modules` = {lora.target_modules}: give module-name patterns, "
               f"e.g. `blocks.*.self_attn.[qkvo]`")
    if config.loss.type == "idm":
        yield "`lora.rank` is set, but LoRA adapts the DiT: the IDM stage trains the IDM in full (set it to 0)"


def idm_problems(idm: IdmConfig) -> typing.Iterator[str]:
    if (idm.action_mean is None) != (idm.action_std is None):
        yield "`idm.action_mean` and `idm.action_std` go together: set both or neither"
    elif idm.action_mean is not None and len(idm.action_mean) != len(idm.action_std):
        yield (f"`idm.action_mean` has {len(idm.action_mean)} entries, `idm.action_std` "
               f"{len(idm.action_std)}: one per action dimension each")
    if idm.action_std is not None and min(idm.action_std, default=1.0) <= 0:
        yield f"`idm.action_std` = {idm.action_std}: every entry must be > 0"
    if any(d < 0 for d in idm.gripper_dims) or len(set(idm.gripper_dims)) != len(idm.gripper_dims):
        yield f"`idm.gripper_dims` = {idm.gripper_dims}: distinct action indices >= 0 expected"


def mixture_problems(data: DataConfig) -> typing.Iterator[str]:
    if not isinstance(data.shards, list):
        return
    if not data.shards:
        yield "`data.shards` is an empty list: give a directory or a list of {path, weight}"
    for i, entry in enumerate(data.shards):
        if set(entry) != {"path", "weight"}:
            yield f"`data.shards[{i}]` = {entry}: expected exactly the keys path and weight"
            continue
        if not isinstance(entry["path"], str):
            yield f"`data.shards[{i}].path` = {entry['path']!r}: expected a directory path"
        weight = entry["weight"]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
            yield f"`data.shards[{i}].weight` = {weight!r}: expected a finite number > 0"
    paths = [entry.get("path") for entry in data.shards]
    if len(set(map(str, paths))) != len(paths):
        yield f"`data.shards` names a directory twice: {paths}"


# ----------------------------------------------------------------------------------------------
# Changes on resume

# What a resumed run may change: the optimizer's hyper-parameters, schedule and length, cadences, loss
# weights, paths (folders move) and engine knobs that change the numbers at most by rounding (checkpointing,
# compilation and the attention kernel reorder floating-point sums: under ZeRO-3 a resumed step-2 loss moved
# by 1e-4 between selective and full checkpointing; an unchanged knob resumes bit-exactly). Everything else - model
# shape, sample layout, seeds, the global batch, precision and ZeRO partitioning - is fixed by the
# checkpoint. A key not listed is fixed; one the saved config lacks (added to the schema since) is not compared.
CHANGEABLE_ON_RESUME = frozenset({
    "model.ckpt_dir", "model.pt_dir", "model.idm_path", "model.checkpointing",
    "model.compile", "model.attention",
    "training.num_steps", "training.lr", "training.warmup", "training.lr_schedule", "training.min_lr",
    "training.betas", "training.eps", "training.weight_decay", "training.grad_clip", "training.log_every",
    "training.save_every", "training.keep_last", "training.val_every", "training.val_samples",
    "training.max_nonfinite_steps", "training.log_seconds", "training.ema_decay", "training.ema_warmup",
    "training.validate_ema",
    "loss.embodiment_aware", "loss.eta", "loss.shift", "loss.mask_weight",
    "self_forcing.context_mode", "self_forcing.self_generated_prob", "self_forcing.denoising_steps",
    "data.shards", "data.val_shards", "data.cfg_prob", "data.num_workers", "data.max_bad_samples",
    "output.save_path", "output.output_dir", "lora.dropout",
    "distributed.ds_config", "distributed.activation_checkpointing",
    # compared as their product, the global batch (the world size may change through a universal checkpoint)
    "training.batch_size", "training.gradient_accumulation",
    # validation samples are rendered from the weights, they do not change them
    *(f"validation.{f.name}" for f in dataclasses.fields(ValidationConfig)),
})


def resume_changes(saved: dict[str, Any], config: Config) -> tuple[list[str], list[str]]:
    """Compare `config` with the one a checkpoint was saved with (`Config.to_dict()` as stored in JSON).
    Returns (changes that apply, changes that cannot), each as lines `section.key: old -> new`. A
    config saved under a key's earlier name (`self_forcing.chunk_size`, `model.gradient_checkpointing`)
    is compared under today's."""
    current = json.loads(json.dumps(config.to_dict()))
    saved = map_window_aliases(map_gradient_checkpointing(saved))
    applied, refused = [], []
    for section, values in current.items():
        for key, value in values.items():
            dotted = f"{section}.{key}"
            if key not in saved.get(section, {}) or saved[section][key] == value:
                continue
            line = f"{dotted}: {json.dumps(saved[section][key])} -> {json.dumps(value)}"
            (applied if dotted in CHANGEABLE_ON_RESUME else refused).append(line)
    saved_training = saved.get("training", {})
    if "val_batches" in saved_training:  # an earlier version's per-rank budget (check_replaced_keys)
        applied.append(f"training.val_batches: {json.dumps(saved_training['val_batches'])} -> training.val_samples: "
                       f"{json.dumps(config.training.val_samples)} (from here on the validation loss is over other "
                       f"held-out samples and noise)")
    if "batch_size" in saved_training:
        saved_batch = saved_training["batch_size"] * (saved_training.get("gradient_accumulation") or 1)
        if saved_batch != config.global_batch_size:
            refused.append(f"global batch (training.batch_size x training.gradient_accumulation): "
                           f"{saved_batch} -> {config.global_batch_size}")
    return applied, refused
