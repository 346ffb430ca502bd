"""Export of trained weights as 16-bit state dicts with the model's own (upstream) key names.

Two sources, both DeepSpeed's own machinery:
- a live ZeRO-3 engine: `gather_state_dict` all-gathers each parameter with
  `deepspeed.zero.GatheredParameters` and keeps a CPU copy on rank 0;
- a saved DeepSpeed checkpoint (any ZeRO stage): `deepspeed.utils.zero_to_fp32` rebuilds the fp32
  master weights offline, without a process group, which are then cast to bf16 (under ZeRO-0/1/2 what
  the partitions lack comes from the module state rank 0 saved, `read_checkpoint_weights`).

    python -m vidartrain.distributed.export OUTPUT/checkpoints[/step_00000030] --out vidar.pt

writes vidar.pt (torch.save of the state dict) and vidar.safetensors, each atomically (files already
there only with --overwrite; --out must name the .pt); for an IDM
checkpoint, the float32 idm.pt the IDM trainer writes ({"model_state_dict", "step"}); for a LoRA run,
the weights with the adapters merged in and the adapters as vidar_lora.safetensors (Wan LoRA keys).
`--ema` exports the EMA of the trained weights (training.ema_decay) instead.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import deepspeed
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import save_file
from torch import nn

from vidartrain.config import LoraConfig
from vidartrain.distributed.checkpointing import TAG_PATTERN, read_complete, resolve_resume, weights_only_loads
from vidartrain.errors import CheckpointError, ConfigError, reports_errors
from vidartrain.files import check_outputs, make_directory, write_atomically
from vidartrain.models.idm import is_idm_state_dict, save_idm_state_dict
from vidartrain.models.wan.lora import adapter_path, export_lora, is_adapter_key
from vidartrain.trainers.ema import ema_state_dict_from_checkpoint

EXPORT_DTYPE = torch.bfloat16
MODULE_STATES = "mp_rank_00_model_states.pt"  # ZeRO stages 0-2: the module's whole state dict, saved by rank 0


def gather_state_dict(module: nn.Module, rank: int, dtype: torch.dtype = EXPORT_DTYPE) -> dict[str, torch.Tensor]:
    """Full state dict of a (possibly ZeRO-3 partitioned) module on rank 0, parameters in `dtype`
    (bf16 for the DiT; float32 for the IDM, whose engine trains float32 weights); {} on other ranks.

    Collective: every rank must call it. Parameters are gathered one at a time, so no rank ever
    holds more than one full tensor beyond its own partition (rank 0 keeps the copies)."""
    state: dict[str, torch.Tensor] = {}
    parameters = dict(module.named_parameters())
    for name, param in parameters.items():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if rank == 0:
                state[name] = param.detach().to("cpu", dtype, copy=True)
    if rank == 0:
        # Persistent buffers are not partitioned by ZeRO; state_dict() names exactly the persistent ones.
        for name, value in module.state_dict().items():
            if name not in parameters:
                state[name] = value.detach().to("cpu", copy=True)
    return state


def write_state_dict(state_dict: dict[str, torch.Tensor], path: str | Path) -> tuple[Path, Path]:
    """Write `path` (torch.save, loadable by upstream `load_state_dict(torch.load(p), strict=False)`)
    and the same tensors as `path` with suffix .safetensors; each file appears whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    contiguous = {name: tensor.contiguous() for name, tensor in state_dict.items()}
    safetensors_path = path.with_suffix(".safetensors")
    write_atomically(path, lambda tmp: torch.save(contiguous, tmp))
    write_atomically(safetensors_path, lambda tmp: save_file(contiguous, tmp))
    return path, safetensors_path


def in_export_dtype(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating tensors in the export's bf16 (LoRA adapters are merged at that precision)."""
    return {name: t.to(EXPORT_DTYPE) if t.is_floating_point() else t for name, t in state_dict.items()}


def resolve_checkpoint(checkpoint: str | Path) -> tuple[Path, str]:
    """(checkpoints directory, tag) of a checkpoint folder, or of a directory's latest complete one; its
    files verified against its COMPLETE record."""
    ref = resolve_resume(str(checkpoint), Path(checkpoint))
    if ref.universal:
        raise CheckpointError(f"{checkpoint}: a universal checkpoint (ds_to_universal), which is for resuming; "
                              f"read the weights from the DeepSpeed checkpoint it was converted from")
    return ref.root, ref.tag


def read_checkpoint_weights(root: Path, tag: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The weights of checkpoint root/tag (floating tensors cast to `dtype`), unpickled weights-only: a
    crafted file is refused, not run. The fp32 master weights of ZeRO's optimizer partitions, completed
    from the module state that rank 0 saves under ZeRO stages 0 to 2 (MODULE_STATES): stage 0 has no
    partitions, so everything comes from there, and at stage 1 DeepSpeed records nothing else of the
    parameters outside the optimizer (training.freeze, the base under LoRA; from stage 2 on it does)."""
    folder = root / tag
    with weights_only_loads():
        module = (torch.load(folder / MODULE_STATES, map_location="cpu", mmap=True)["module"]
                  if (folder / MODULE_STATES).is_file() else {})
        partitioned = any(folder.glob("*_optim_states.pt"))
        master = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag) if partitioned else {}
    weights = {**module, **master}
    return {name: tensor.to(dtype) if tensor.is_floating_point() else tensor for name, tensor in weights.items()}


def lora_alpha(checkpoint: Path) -> float:
    """The LoRA alpha a checkpoint was trained with, from the config its COMPLETE record holds."""
    saved = read_complete(checkpoint).get("config", {}).get("lora")
    if saved is None:
        raise CheckpointError(f"{checkpoint} holds LoRA adapters, but its COMPLETE record has no `lora` config "
                              f"to take their alpha from")
    return LoraConfig(**saved).effective_alpha


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an --out the export cannot or may not write, before the checkpoint is read: a name that
    is not the .pt (the .safetensors twin is written beside it), a directory, an existing file
    without --overwrite. Creates its folder."""
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory: name the .pt file to write, e.g. {out / 'vidar.pt'}")
    if out.suffix != ".pt":
        raise ConfigError(f"--out {out}: name the .pt file (e.g. {out.with_suffix('.pt')}); the .safetensors twin "
                          f"is written beside it")
    check_outputs([out], overwrite, "the export")
    make_directory(out.parent, "the folder of --out")


def dit_files(out: Path, lora: bool) -> list[Path]:
    """The files an export of DiT weights to `out` writes: the .pt, its .safetensors twin, and with LoRA
    the adapters."""
    return [out, out.with_suffix(".safetensors"), *([adapter_path(out)] if lora else [])]


def export_idm(state_dict: dict[str, torch.Tensor], tag: str, out: Path) -> None:
    """The float32 idm.pt the IDM trainer writes at that step (the IDM trains float32 weights)."""
    save_idm_state_dict(state_dict, out, step=int(TAG_PATTERN.match(tag)[1]))
    count = sum(t.numel() for t in state_dict.values())
    print(f"exported the IDM ({len(state_dict)} tensors, {count:,} values, float32) to {out}")


def export_dit(state_dict: dict[str, torch.Tensor], alpha: float | None, out: Path) -> None:
    """The bf16 .pt and .safetensors; with LoRA (`alpha` given) the adapters merged in, and the adapters
    alone beside them."""
    count = sum(t.numel() for t in state_dict.values())
    state_dict = in_export_dtype(state_dict)
    if alpha is not None:
        state_dict, lora_path = export_lora(state_dict, alpha, out)
        print(f"exported the LoRA adapters to {lora_path}; the weights below have them merged in")
    pt_path, st_path = write_state_dict(state_dict, out)
    print(f"exported {len(state_dict)} tensors ({count:,} values) to {pt_path} and {st_path}")


@reports_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a DeepSpeed checkpoint as a bf16 state dict "
                                                 "(.pt and .safetensors) with upstream key names; an IDM "
                                                 "checkpoint as the float32 idm.pt the IDM trainer writes.")
    parser.add_argument("checkpoint", help="checkpoint folder (…/checkpoints/step_XXXXXXXX) or checkpoints directory")
    parser.add_argument("--out", required=True, help="output .pt path (a .safetensors is written beside it)")
    parser.add_argument("--ema", action="store_true",
                        help="the EMA of the trained weights (training.ema_decay) instead of the weights")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace files of an earlier export (the .pt, .safetensors, _lora.safetensors)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    check_out(out, args.overwrite)
    root, tag = resolve_checkpoint(args.checkpoint)
    state_dict = read_checkpoint_weights(root, tag, torch.float32)
    if args.ema:
        state_dict.update(ema_state_dict_from_checkpoint(root / tag))
    if is_idm_state_dict(state_dict):
        export_idm(state_dict, tag, out)
        return 0
    lora = any(map(is_adapter_key, state_dict))
    # the .pt was checked; now that the kind is known, the rest
    check_outputs(dit_files(out, lora), args.overwrite, "the export")
    export_dit(state_dict, lora_alpha(root / tag) if lora else None, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
