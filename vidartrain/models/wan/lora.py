"""LoRA adapters on the DiT's linear layers (`lora:` in the config), and their files.

A targeted `nn.Linear` keeps its own weight and bias (same names, same dtype, frozen) and gets two
children and a forward hook:

    y = linear(x) + (alpha / rank) * lora_B(lora_A(dropout(x)))

lora_A [rank, in] starts as nn.Linear's default (Kaiming-uniform) initialisation, lora_B [out, rank]
at zero, so the adapted model starts equal to the base. The adapters are added in place, before
ZeRO-3 partitions the model: parameter names of the base model do not change (`blocks.0.self_attn.q.weight`),
the adapters sit beside them (`blocks.0.self_attn.q.lora_A.weight`), and DeepSpeed partitions,
gathers, checkpoints and resumes them as any other parameter. We do not use peft's
`inject_adapter_in_model`: it replaces each target by a wrapper (renaming `q.weight` to
`q.base_layer.weight`, so checkpoints, exports and `load_finetuned` would all need a key map), and it
would treat `ffn.2` - a GeluTanhLinear that applies the GELU inside its forward - as a plain Linear
and feed the adapter the pre-GELU input: a LoRA of another function than the layer computes.

Files, in the Wan LoRA convention that diffusers (`_convert_non_diffusers_wan_lora_to_diffusers`) and
ComfyUI load: for each adapted linear with upstream name NAME (e.g. `blocks.7.cross_attn.k`),

    diffusion_model.NAME.lora_A.weight   [rank, in_features]
    diffusion_model.NAME.lora_B.weight   [out_features, rank]
    diffusion_model.NAME.alpha           0-dim float32; the update is alpha / rank * B @ A

A merged state dict (`merge_lora`) holds W + alpha / rank * B @ A in place of W and no adapter keys:
it loads strictly into WanModel and upstream's code. docs/training.md ("LoRA") documents both files.
"""
from __future__ import annotations

import fnmatch
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from vidartrain.config import LoraConfig
from vidartrain.errors import CheckpointError, ConfigError
from vidartrain.files import write_atomically
from vidartrain.models.wan.model import GeluTanhLinear

FILE_PREFIX = "diffusion_model."
A_SUFFIX, B_SUFFIX, ALPHA_SUFFIX = ".lora_A.weight", ".lora_B.weight", ".alpha"

Adapters = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A [rank, in], B [out, rank])


def target_modules(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the modules matching `patterns`; each pattern must match, and only nn.Linear layers."""
    modules = dict(model.named_modules())
    unmatched = [pattern for pattern in patterns if not any(fnmatch.fnmatchcase(name, pattern) for name in modules)]
    if unmatched:
        raise ConfigError(f"`lora.target_modules` patterns {unmatched} match no module of the {type(model).__name__} "
                          f"(names look like blocks.0.self_attn.q, blocks.0.ffn.0)")
    names = [name for name in modules if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)]
    not_linear = [f"{name} ({type(modules[name]).__name__})" for name in names
                  if not isinstance(modules[name], nn.Linear)]
    if not_linear:
        raise ConfigError(f"`lora.target_modules` {patterns} match modules that are not linear layers: "
                          f"{', '.join(not_linear[:4])}; LoRA adapts nn.Linear only")
    return names


def add_lora(model: nn.Module, config: LoraConfig) -> list[str]:
    """Freeze every parameter of `model` and attach trainable adapters to the linear layers named by
    `config.target_modules`; returns their names."""
    names = target_modules(model, config.target_modules)
    model.requires_grad_(False)
    modules = dict(model.named_modules())
    for name in names:
        attach_adapter(modules[name], config.rank, config.effective_alpha, config.dropout)
    return names


class AdapterLinear(nn.Linear):
    """An adapter's A or B: takes its input in its own dtype (a Float32Linear of a bf16 model - time
    embedding, head - gets float32 inputs). The weight is read inside this forward, where ZeRO-3 has
    gathered it: reading it in the hook outside would make ZeRO-3 fetch it there, differently in the
    forward and in its recomputation, which selective activation checkpointing refuses."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight)


def attach_adapter(linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
    """Give `linear` the children lora_A, lora_B (in its weight's dtype and device) and the hook
    that adds their output."""
    factory = {"dtype": linear.weight.dtype, "device": linear.weight.device}
    linear.lora_A = AdapterLinear(linear.in_features, rank, bias=False, **factory)
    linear.lora_B = AdapterLinear(rank, linear.out_features, bias=False, **factory)
    nn.init.zeros_(linear.lora_B.weight)
    linear.lora_scale = alpha / rank
    linear.lora_dropout = dropout
    linear.register_forward_hook(add_adapter_output)


def add_adapter_output(linear: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    """Forward hook: output + scale * B(A(dropout(x))). The adapters run as modules, so ZeRO-3's
    hooks gather and release their parameters as for any layer; dropout draws from the global RNG,
    which activation checkpointing restores for the recomputation."""
    x = inputs[0]
    if isinstance(linear, GeluTanhLinear):  # its weight multiplies GELU(x): so does the adapter's
        x = F.gelu(x, approximate="tanh")
    x = F.dropout(x, linear.lora_dropout, linear.training)
    return output + linear.lora_B(linear.lora_A(x)) * linear.lora_scale


def is_adapter_key(name: str) -> bool:
    return name.endswith((A_SUFFIX, B_SUFFIX))


def split_lora(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Adapters]:
    """(the base model's tensors, the adapters by module name) of an adapted model's state dict."""
    base = {name: tensor for name, tensor in state_dict.items() if not is_adapter_key(name)}
    modules = sorted({name[:-len(A_SUFFIX)] for name in state_dict if name.endswith(A_SUFFIX)})
    missing = [name + B_SUFFIX for name in modules if name + B_SUFFIX not in state_dict]
    if missing or len(base) + 2 * len(modules) != len(state_dict):
        raise CheckpointError(f"adapter tensors come in lora_A / lora_B pairs; unpaired: "
                              f"{missing or 'lora_B without lora_A'}")
    return base, {name: (state_dict[name + A_SUFFIX], state_dict[name + B_SUFFIX]) for name in modules}


@torch.no_grad()
def merge_lora(base: dict[str, torch.Tensor], adapters: Adapters, alphas: dict[str, float]) -> dict[str, torch.Tensor]:
    """`base` with W + alpha / rank * B @ A in place of each adapted weight, computed in float32 and
    rounded to W's dtype once."""
    merged = dict(base)
    for name, (a, b) in adapters.items():
        weight = base[f"{name}.weight"]
        delta = (b.float() @ a.float()) * (alphas[name] / a.shape[0])
        merged[f"{name}.weight"] = (weight.float() + delta).to(weight.dtype)
    return merged


def wan_lora_state_dict(adapters: Adapters, alphas: dict[str, float]) -> dict[str, torch.Tensor]:
    """The adapters under the Wan LoRA file keys (see the module docstring)."""
    state = {}
    for name, (a, b) in adapters.items():
        state[FILE_PREFIX + name + A_SUFFIX] = a.contiguous()
        state[FILE_PREFIX + name + B_SUFFIX] = b.contiguous()
        state[FILE_PREFIX + name + ALPHA_SUFFIX] = torch.tensor(float(alphas[name]), dtype=torch.float32)
    return state


def write_wan_lora(adapters: Adapters, alphas: dict[str, float], path: str | Path) -> Path:
    """Write the adapters as a Wan LoRA safetensors file, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = wan_lora_state_dict(adapters, alphas)
    write_atomically(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    return path


def read_wan_lora(path: str | Path) -> tuple[Adapters, dict[str, float]]:
    """(adapters, alpha by module name) from a Wan LoRA safetensors file; a key outside the
    convention, or a module without all three entries, is an error naming it."""
    state = load_file(str(path))
    stray = [key for key in state if not key.startswith(FILE_PREFIX) or not key.endswith(
        (A_SUFFIX, B_SUFFIX, ALPHA_SUFFIX))]
    if stray:
        raise CheckpointError(f"{path}: keys outside the Wan LoRA convention (diffusion_model.NAME.lora_A.weight / "
                         f".lora_B.weight / .alpha): {stray[:4]}")
    names = sorted({key[len(FILE_PREFIX):-len(A_SUFFIX)] for key in state if key.endswith(A_SUFFIX)})
    expected = {FILE_PREFIX + name + suffix for name in names for suffix in (A_SUFFIX, B_SUFFIX, ALPHA_SUFFIX)}
    if set(state) != expected:
        raise CheckpointError(f"{path}: every adapted module needs lora_A, lora_B and alpha; "
                         f"incomplete: {sorted(set(state) ^ expected)[:4]}")
    adapters = {name: (state[FILE_PREFIX + name + A_SUFFIX], state[FILE_PREFIX + name + B_SUFFIX]) for name in names}
    # B [out, r] must take A's rank: a [out, 1] B would otherwise broadcast over A's rank when loaded
    unpaired = [f"{name} (lora_A {list(a.shape)}, lora_B {list(b.shape)})" for name, (a, b) in adapters.items()
                if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]]
    if unpaired:
        raise CheckpointError(f"{path}: lora_A must be [rank, in_features] and lora_B [out_features, rank] of the "
                              f"same rank; not so for {unpaired[:4]}")
    return adapters, {name: float(state[FILE_PREFIX + name + ALPHA_SUFFIX]) for name in names}


def load_wan_lora(model: nn.Module, path: str | Path) -> list[str]:
    """Attach the adapters of a Wan LoRA file to `model` (a WanModel with its base weights, without
    adapters) and load them; returns the adapted module names. Every adapter is checked before any is
    attached, so a refused file leaves the model as it was."""
    adapters, alphas = read_wan_lora(path)
    modules = dict(model.named_modules())
    for name, (a, b) in adapters.items():
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear) or a.shape[1] != linear.in_features or b.shape[0] != linear.out_features:
            raise CheckpointError(f"{path}: adapter {name} ({list(b.shape)} @ {list(a.shape)}) fits no linear layer of the "
                             f"{type(model).__name__}")
        if hasattr(linear, "lora_A"):  # a second hook would add both adapters' updates
            raise CheckpointError(f"{path}: {name} of the {type(model).__name__} already has a LoRA adapter (from "
                                  f"another file or training); load the file into a model without adapters")
    for name, (a, b) in adapters.items():
        linear = modules[name]
        attach_adapter(linear, a.shape[0], alphas[name])
        linear.lora_A.weight.data.copy_(a)
        linear.lora_B.weight.data.copy_(b)
    return list(adapters)


def uniform_alphas(adapters: Adapters, alpha: float) -> dict[str, float]:
    """The same alpha for every adapter (the trainer's `lora.alpha`)."""
    return {name: alpha for name in adapters}


def adapter_path(path: str | Path) -> Path:
    """Where the adapters of the export `path` go: vidar.pt -> vidar_lora.safetensors."""
    path = Path(path)
    return path.with_name(f"{path.stem}_lora.safetensors")


def merge_adapters(state_dict: dict[str, torch.Tensor], alpha: float
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float]]:
    """An adapted model's `state_dict` with its adapters (all trained with `alpha`) merged into the
    base weights; also the adapters and their alphas."""
    base, adapters = split_lora(state_dict)
    alphas = uniform_alphas(adapters, alpha)
    return merge_lora(base, adapters, alphas), adapters, alphas


def export_lora(state_dict: dict[str, torch.Tensor], alpha: float, path: str | Path
                ) -> tuple[dict[str, torch.Tensor], Path]:
    """Write the adapters of an adapted model's `state_dict` beside the export `path` (a Wan LoRA
    file); returns the merged state dict, for `path`, and the adapter file's path."""
    merged, adapters, alphas = merge_adapters(state_dict, alpha)
    return merged, write_wan_lora(adapters, alphas, adapter_path(path))
