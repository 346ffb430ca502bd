"""Stage 1 (Vidar) with the reference recipe's flags (docs/training.md).

    python launch/train_vidar.py --ckpt_dir checkpoints/Wan2.2-TI2V-5B --ds-config ds_configs/zero3_1xgpu.json \\
        --set data.shards=data/shards --debug --max_steps 100
    deepspeed --num_gpus 8 launch/train_vidar.py --ckpt_dir checkpoints/Wan2.2-TI2V-5B \\
        --ds-config ds_configs/zero3_8xh100.json --set data.shards=data/shards --output_dir outputs/vidar

--ckpt_dir / --pt_dir set model.ckpt_dir / model.pt_dir; --debug logs every step, validates nothing and
checkpoints only at the end (for short debugging runs on the real model). Every flag of
launch/train.py is accepted too; --config defaults to configs/vidar_finetune.yaml.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO_ROOT))

from launch.stage_flags import main_with_stage_flags  # noqa: E402
from vidartrain.errors import reports_errors  # noqa: E402


@reports_errors
def main(argv: list[str] | None = None) -> int:
    return main_with_stage_flags(default_config=str(REPO_ROOT / "configs" / "vidar_finetune.yaml"),
                                 description="Stage 1: Vidar fine-tuning (WanModel, flow matching)", argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
