"""IDM training (the masked inverse dynamics model) with the defaults of configs/idm.yaml.

    deepspeed --num_gpus 8 launch/train_idm.py --ds-config ds_configs/zero3_8xh100.json \\
        --set data.shards=data/shards [--set model.idm_path=checkpoints/vidar/idm.pt] [--resume auto] [--max_steps N]

Every flag of launch/train.py is accepted; --config defaults to configs/idm.yaml.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script by deepspeed / torchrun: make the repo importable
    sys.path.insert(0, str(REPO_ROOT))

from launch.train import build_parser, run  # noqa: E402
from vidartrain.errors import reports_errors  # noqa: E402


@reports_errors
def main(argv: list[str] | None = None) -> int:
    parser = build_parser("IDM training: masked inverse dynamics model on (frame, action) pairs (Eq. 4)",
                          default_config=str(REPO_ROOT / "configs" / "idm.yaml"))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
