"""Reading the published Wan2.2 DiT checkpoints and the Vidar / Vidarc fine-tuned state dicts.

Published layout (e.g. the Wan-AI/Wan2.2-TI2V-5B repository):
    config.json                                          constructor arguments (+ diffusers "_" keys)
    diffusion_pytorch_model.safetensors                  single file, or
    diffusion_pytorch_model-0000i-of-0000n.safetensors   shards listed in
    diffusion_pytorch_model.safetensors.index.json       {"weight_map": {key: shard file}}
"""
from __future__ import annotations

import inspect
import json
import logging
import pickle
import re
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vidartrain.errors import CheckpointError
from vidartrain.models.wan.lora import is_adapter_key

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"


def read_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(content, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(content).__name__}")
    return content


def read_model_config(ckpt_dir: str | Path, model_class: type[nn.Module]) -> dict:
    """Constructor arguments from `config.json`; diffusers bookkeeping keys ("_class_name", ...)
    are dropped, absent keys keep the constructor defaults, unknown keys are an error."""
    path = Path(ckpt_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: a checkpoint directory needs {CONFIG_FILE}")
    config = read_json(path)
    accepted = set(inspect.signature(model_class.__init__).parameters) - {"self"}
    config = {key: value for key, value in config.items() if not key.startswith("_")}
    unknown = sorted(set(config) - accepted)
    if unknown:
        raise CheckpointError(f"{path}: unknown keys {unknown} (expected a subset of {sorted(accepted)})")
    return config


def model_arguments(ckpt_dir: str | Path, model_class: type[nn.Module]) -> dict:
    """Every constructor argument of `model_class` as `ckpt_dir`'s config.json sets it, the
    constructor's defaults for the keys it leaves out (the shape of a model, without building it)."""
    return {**constructor_defaults(model_class), **read_model_config(ckpt_dir, model_class)}


def constructor_defaults(model_class: type[nn.Module]) -> dict:
    """The default constructor arguments of `model_class` (WanModel's: the TI2V-5B shape)."""
    return {name: parameter.default for name, parameter in inspect.signature(model_class.__init__).parameters.items()
            if parameter.default is not inspect.Parameter.empty}


def weight_files(ckpt_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: the shards named by the index, or the
    single file."""
    ckpt_dir = Path(ckpt_dir)
    index_path = ckpt_dir / WEIGHTS_INDEX_FILE
    if index_path.is_file():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: expected a non-empty 'weight_map' object")
        files = [ckpt_dir / name for name in sorted(set(weight_map.values()))]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index_path} lists shards that do not exist: {absent}")
        return files
    if (ckpt_dir / WEIGHTS_FILE).is_file():
        return [ckpt_dir / WEIGHTS_FILE]
    raise CheckpointError(f"{ckpt_dir}: neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE} found")


def build_from_checkpoint_dir(model_class: type[nn.Module], ckpt_dir: str | Path,
                              dtype: torch.dtype = torch.bfloat16,
                              device: torch.device | str = "cpu") -> nn.Module:
    """Build `model_class` on the meta device and assign the checkpoint tensors in place, one shard
    at a time, converted to `dtype` on `device`. Peak memory is the model plus nothing of note:
    there is never a second full copy. Every key must be present once with the expected shape."""
    config = read_model_config(ckpt_dir, model_class)
    with torch.device("meta"):
        model = model_class(**config)
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    loaded: dict[str, Path] = {}
    for path in weight_files(ckpt_dir):
        shard = {}
        with open_safetensors(path, str(device)) as f:
            for key in f.keys():
                if key not in expected:
                    raise CheckpointError(f"{path}: unexpected key {key!r}, not a parameter of "
                                          f"{model_class.__name__}({config})")
                if key in loaded:
                    raise CheckpointError(f"{path}: key {key!r} was already read from {loaded[key]}")
                shape = tuple(f.get_slice(key).get_shape())
                if shape != expected[key]:
                    raise CheckpointError(f"{path}: key {key!r} has shape {list(shape)}, the model built from "
                                          f"{CONFIG_FILE} expects {list(expected[key])}")
                shard[key] = f.get_tensor(key).to(dtype)
                loaded[key] = path
        model.load_state_dict(shard, strict=False, assign=True)
    missing = [key for key in expected if key not in loaded]
    if missing:
        raise CheckpointError(f"{ckpt_dir}: {len(missing)} parameters missing from the checkpoint, "
                              f"first {missing[:5]}")
    return model


def write_checkpoint_dir(state_dict: dict[str, torch.Tensor], config: dict, ckpt_dir: str | Path,
                         num_shards: int = 1) -> Path:
    """Write the published layout: config.json and the weights as one safetensors file, or as
    `diffusion_pytorch_model-0000i-of-0000n.safetensors` shards with their index."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    keys = list(state_dict)
    if num_shards == 1:
        save_file({k: t.contiguous() for k, t in state_dict.items()}, str(ckpt_dir / WEIGHTS_FILE),
                  metadata={"format": "pt"})
    else:
        per_shard = -(-len(keys) // num_shards)
        weight_map = {}
        for i in range(num_shards):
            name = f"diffusion_pytorch_model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
            shard = {k: state_dict[k].contiguous() for k in keys[i * per_shard:(i + 1) * per_shard]}
            save_file(shard, str(ckpt_dir / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in state_dict.values())
        (ckpt_dir / WEIGHTS_INDEX_FILE).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    (ckpt_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return ckpt_dir


class FinetuneLoadResult(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch.save file (memory-mapped, weights only); a file
    that is truncated, corrupt or holds something else is a CheckpointError saying so."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"fine-tuned weights {path} not found")
    if path.suffix == ".safetensors":
        with open_safetensors(path, "cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    state = load_torch_file(path)
    if is_idm_checkpoint(state):
        raise CheckpointError(f"{path} is an IDM checkpoint ({{'model_state_dict': ..., 'step': {state['step']}}}, "
                              f"as idm.pt), not model weights such as the DiT's vidar.pt / vidarc.pt; an idm.pt "
                              f"goes to model.idm_path or vidar-sample --idm")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict (a dict of name -> tensor), got {type(state).__name__}")
    not_tensors = [f"{key!r} ({type(value).__name__})" for key, value in state.items()
                   if not isinstance(value, torch.Tensor)]
    if not_tensors:
        # e.g. a state dict wrapped as {"state_dict": ..., "epoch": ...}: say which entries are the trouble
        raise CheckpointError(f"{path}: expected a state dict (a dict of name -> tensor); these entries are "
                              f"not tensors: {', '.join(not_tensors[:5])}")
    return state


def open_safetensors(path: Path, device: str) -> safe_open:
    """safe_open of `path`; a file whose header does not parse or whose data it does not cover (a truncated
    or corrupt file) is a CheckpointError naming it."""
    try:
        return safe_open(path, framework="pt", device=device)
    except SafetensorError as error:
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt? ({error})") from None


def load_torch_file(path: str | Path, mmap: bool = True) -> object:
    """torch.load of `path` to the CPU, weights only, memory-mapped unless `mmap` is False (which also
    reads torch's pre-zip format); what torch raises for a file it cannot read becomes a CheckpointError
    naming the file."""
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as error:
        raise pickle_refusal(path, error) from None
    except OSError as error:
        if error.filename is not None:
            raise  # unreadable (absent, no permission): the error names the file and why
        # torch's zip reader fails on a truncated file under 64 KiB with a bare EINVAL, naming nothing
        raise CheckpointError(f"{path}: torch.load cannot read it (truncated or corrupt, or not written by "
                              f"torch.save?): {error}") from None
    except Exception as error:  # a truncated or foreign file fails torch.load in many ways (RuntimeError, EOFError, KeyError...)
        # torch's message goes on with paragraphs of advice that do not apply here: keep its first sentence
        reason = re.split(r"\.\s", str(error).strip(), maxsplit=1)[0] or type(error).__name__
        raise CheckpointError(f"{path}: torch.load cannot read it (truncated or corrupt, or not written by "
                              f"torch.save?): {reason}") from None


def pickle_refusal(file: object, error: pickle.UnpicklingError) -> CheckpointError:
    """The error for a file that weights-only unpickling refused: either it pickles more than tensors and
    plain data, so loading it could run code, or its bytes are no pickle at all (a truncated or foreign
    file: "Unsupported operand")."""
    text = str(error)
    # "Unsupported global: GLOBAL x" (a class not allowed), "unsupported GLOBAL x whose module is blocked" (os...)
    found = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", text, re.IGNORECASE)
    detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    what = found.group(1) if found else detail.group(1).strip() if detail else text
    if what.startswith("Unsupported operand"):
        return CheckpointError(f"{file}: torch.load cannot read it (truncated or corrupt, or not written by "
                               f"torch.save?): {what}")
    return CheckpointError(f"{file}: refusing to load it: it pickles more than tensors and plain data (a crafted "
                           f"or foreign file?): {what}")


def is_idm_checkpoint(state: object) -> bool:
    """Whether `state` is laid out as an idm.pt: {"model_state_dict": {...}, "step": N} (upstream's
    train_idm.py), which holds no model weights at its top level."""
    return isinstance(state, dict) and isinstance(state.get("model_state_dict"), dict) and "step" in state


def load_finetuned(model: nn.Module, path: str | Path,
                   state: dict[str, torch.Tensor] | None = None) -> FinetuneLoadResult:
    """Apply a vidar.pt / vidarc.pt style state dict like the published code does
    (`load_state_dict(sd, strict=False)`), but report missing and unexpected keys, and refuse a
    file whose keys match none of the model's or whose shapes differ, and one holding LoRA adapters the
    model does not have (unmerged: loading would silently drop them). `state`: the state dict
    already read from `path` (e.g. gathered from a DeepSpeed checkpoint folder)."""
    state = read_state_dict(path) if state is None else state
    own = model.state_dict()
    adapters = [key for key in state if is_adapter_key(key) and key not in own]
    if adapters:
        raise CheckpointError(f"{path}: holds {len(adapters)} LoRA adapter tensors (e.g. {adapters[0]!r}) that "
                              f"{type(model).__name__} has no layers for: loading it would drop them and keep the "
                              f"base weights. Use the .pt vidar-export writes from that run's checkpoint: it has "
                              f"them merged in")
    matched = [key for key in state if key in own]
    if not matched:
        raise CheckpointError(f"{path}: none of its {len(state)} keys is a parameter of {type(model).__name__} "
                              f"(file has e.g. {list(state)[:3]}, model has e.g. {list(own)[:3]})")
    for key in matched:
        if state[key].shape != own[key].shape:
            raise CheckpointError(f"{path}: key {key!r} has shape {list(state[key].shape)}, "
                                  f"the model's is {list(own[key].shape)}")
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        logger.warning("%s: %d model parameters not in the file, kept as they were (first %s)",
                       path, len(result.missing_keys), result.missing_keys[:5])
    if result.unexpected_keys:
        logger.warning("%s: %d keys ignored, not parameters of the model (first %s)",
                       path, len(result.unexpected_keys), result.unexpected_keys[:5])
    return FinetuneLoadResult(list(result.missing_keys), list(result.unexpected_keys))


def download_checkpoints(repo_id: str, local_dir: str | Path,
                         allow_patterns: list[str] | None = None) -> Path:
    """Fetch a published repository (e.g. "Wan-AI/Wan2.2-TI2V-5B") into `local_dir` with
    huggingface_hub; files already there are not downloaded again."""
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(repo_id=repo_id, local_dir=str(local_dir), allow_patterns=allow_patterns))
