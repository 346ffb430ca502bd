"""Stage 2 (Vidarc) with the design note's flags.

    python launch/train_vidarc.py --ckpt_dir checkpoints/Wan2.2-TI2V-5B \\
        --pt_dir checkpoints/vidar/vidar.pt --debug --max_steps 100

--ckpt_dir / --pt_dir set model.ckpt_dir / model.pt_dir; --debug logs every step and validates and
checkpoints only at the end. Every flag of launch/train.py is accepted too; --config defaults to
configs/vidarc_causal.yaml.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.stage_flags import main_with_stage_flags  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main_with_stage_flags(default_config="configs/vidarc_causal.yaml",
                                           description="Stage 2: Vidarc causal training (WanModelCausal, self-forcing)"))
