"""The reference recipe's per-stage flags (--ckpt_dir, --pt_dir, --debug) on top of launch/train.py;
see docs/training.md."""
from __future__ import annotations

from typing import Any

from launch.train import build_parser, run
from vidartrain.trainers.base import world_size_of_launch


def debug_overrides(profile: dict[str, Any]) -> list[str]:
    """--debug: log every step, no validation, a checkpoint only at the end, and a global batch of just
    what the DeepSpeed profile gives on this many ranks (micro-batch x accumulation x world size)."""
    # with gradient_accumulation set, training.batch_size is one micro-step over all ranks
    return ["training.log_every=1", "training.val_every=0", "training.validate_ema=false", "validation.every=0",
            "training.save_every=1000000000",
            f"training.batch_size={profile['train_micro_batch_size_per_gpu'] * world_size_of_launch()}",
            f"training.gradient_accumulation={profile['gradient_accumulation_steps']}"]


def main_with_stage_flags(default_config: str, description: str, argv: list[str] | None = None) -> int:
    parser = build_parser(description, default_config=default_config)
    parser.add_argument("--ckpt_dir", default=None, help="Wan2.2-TI2V-5B checkpoint directory (model.ckpt_dir)")
    parser.add_argument("--pt_dir", default=None, help="fine-tuned DiT weights applied on top (model.pt_dir)")
    parser.add_argument("--debug", action="store_true",
                        help="short debugging run: log every step, no validation (loss, EMA or samples), checkpoint only "
                             "at the end, global batch = the profile's micro-batch x accumulation x world size")
    args = parser.parse_args(argv)
    # flags first, so that explicit --set overrides still win
    flags = [f"model.{name}={value}" for name, value in (("ckpt_dir", args.ckpt_dir), ("pt_dir", args.pt_dir))
             if value is not None]
    args.overrides[:0] = flags
    return run(args, debug_overrides if args.debug else None)
