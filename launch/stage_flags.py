"""The design note's per-stage flags (--ckpt_dir, --pt_dir, --debug) on top of launch/train.py."""
from __future__ import annotations

from launch.train import build_parser, run_reporting_config_errors


def main_with_stage_flags(default_config: str, description: str, argv: list[str] | None = None) -> int:
    parser = build_parser(description, default_config=default_config)
    parser.add_argument("--ckpt_dir", default=None, help="Wan2.2-TI2V-5B checkpoint directory (model.ckpt_dir)")
    parser.add_argument("--pt_dir", default=None, help="fine-tuned DiT weights applied on top (model.pt_dir)")
    parser.add_argument("--debug", action="store_true",
                        help="log every step; validate and checkpoint only at the end")
    args = parser.parse_args(argv)
    if args.ckpt_dir is not None:
        args.overrides.insert(0, f"model.ckpt_dir={args.ckpt_dir}")
    if args.pt_dir is not None:
        args.overrides.insert(0, f"model.pt_dir={args.pt_dir}")
    if args.debug:
        args.overrides[:0] = ["training.log_every=1", "training.val_every=0", "training.save_every=1000000000"]
    return run_reporting_config_errors(args)
