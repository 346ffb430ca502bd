"""vidar-import: public robot datasets -> the converter's episode folders (or straight to shards).

    vidar-import robotwin data/stack_bowls_two/demo_clean --fps 25 --out data/episodes
    vidar-import lerobot ~/datasets/aloha_static_coffee --cameras observation.images.cam_high,\
observation.images.cam_left_wrist,observation.images.cam_right_wrist --out data/episodes
    vidar-import aloha ~/aloha_episodes --fps 50 --instruction "put the cup on the plate" --shards data/shards

Writes EPISODES_DIR/ep_XXXX/{video.mp4, actions.npy, instruction.txt} on the 10 fps timeline (the
frame-rate rule is in data_tools.importers.common) and EPISODES_DIR/import.json; with --shards,
then runs the converter (data_tools.shard) on them. Options this command does not know are passed
to the converter (e.g. --val-fraction 0.05, --append).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_tools import shard
from data_tools.importers import aloha, lerobot, robotwin
from data_tools.importers.common import ImportSettings, import_episodes, parse_columns, summary
from vidartrain.errors import ConfigError, DataError, reports_errors

FORMATS = {"robotwin": robotwin, "lerobot": lerobot, "aloha": aloha}
DEFAULT_CAMERAS = {"robotwin": robotwin.CAMERAS, "aloha": aloha.CAMERAS}
SHARDS_EPISODES = "episodes"  # EPISODES_DIR inside --shards when --out is not given


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="vidar-import", description=__doc__.split("\n")[0])
    parser.add_argument("format", choices=sorted(FORMATS), help="layout of SRC")
    parser.add_argument("source", type=Path, metavar="SRC",
                        help="RoboTwin <task>/<setting> directory, LeRobot dataset root, or folder of ALOHA .hdf5")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"EPISODES_DIR for the ep_XXXX folders (default with --shards: SHARDS/{SHARDS_EPISODES})")
    parser.add_argument("--shards", type=Path, default=None, help="also convert the episodes into shards here")
    parser.add_argument("--cameras", default=None,
                        help="one camera, or head,left_wrist,right_wrist composed into the unified observation "
                             f"(default RoboTwin {','.join(robotwin.CAMERAS)}; ALOHA {','.join(aloha.CAMERAS)}; "
                             "LeRobot: the only video feature)")
    parser.add_argument("--action-key", default=None,
                        help=f"actions: HDF5 dataset (RoboTwin {robotwin.ACTION_KEY}, ALOHA {aloha.ACTION_KEY}) or "
                             f"LeRobot column (default {lerobot.ACTION_KEY})")
    parser.add_argument("--action-columns", default=None, help="columns kept, in order, e.g. 0-5,13 (default all)")
    parser.add_argument("--fps", type=float, default=None,
                        help="source frame rate, required for RoboTwin and ALOHA (LeRobot: from meta/info.json)")
    parser.add_argument("--instruction", default=None, help="one instruction for every episode")
    parser.add_argument("--instruction-set", choices=("seen", "unseen"), default="seen",
                        help="RoboTwin: instruction list of instructions/episode{N}.json (default seen)")
    parser.add_argument("--instruction-index", type=int, default=0,
                        help="RoboTwin: entry of that list (default 0, the first)")
    parser.add_argument("--jpeg-channels", choices=("bgr", "rgb"), default="bgr",
                        help="HDF5 JPEGs: bgr (default) when written by OpenCV from RGB arrays, as RoboTwin and "
                             "ALOHA do; rgb for standard JPEGs")
    parser.add_argument("--qp", type=int, default=20, help="x264 constant quantiser of video.mp4 (default 20)")
    parser.add_argument("--strict", action="store_true", help="stop at the first faulty source episode")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the episode folders and import record in EPISODES_DIR (and the shards)")
    return parser.parse_known_args(argv)


def settings_from_args(args: argparse.Namespace) -> ImportSettings:
    if args.format == "lerobot" and args.fps is not None:
        raise ConfigError("vidar-import lerobot: the frame rate comes from meta/info.json; drop --fps")
    if args.format != "lerobot" and (args.fps is None or args.fps <= 0):
        raise ConfigError(f"vidar-import {args.format}: the files store no frame rate; give it with --fps N")
    if args.instruction is not None and not args.instruction.strip():
        raise ConfigError("vidar-import: --instruction is empty")
    if args.instruction_index < 0:
        raise ConfigError("vidar-import: --instruction-index must be >= 0")
    if args.cameras is not None:
        cameras = tuple(part.strip() for part in args.cameras.split(","))
    elif args.format == "lerobot":
        keys = lerobot.video_keys(args.source)
        if len(keys) != 1:
            raise DataError(f"vidar-import lerobot: {args.source} has cameras {', '.join(keys) or 'none'}; "
                            f"choose one or three (head,left_wrist,right_wrist) with --cameras")
        cameras = tuple(keys)
    else:
        cameras = DEFAULT_CAMERAS[args.format]
    if len(cameras) not in (1, 3) or not all(cameras):
        raise ConfigError(f"vidar-import: --cameras takes one camera or three (head,left_wrist,right_wrist), "
                          f"got {args.cameras!r}")
    columns = parse_columns(args.action_columns) if args.action_columns else None
    action_key = args.action_key or FORMATS[args.format].ACTION_KEY
    return ImportSettings(format=args.format, source=str(args.source.resolve()), cameras=cameras,
                          action_key=action_key, action_columns=columns, fps=args.fps,
                          instruction=args.instruction, instruction_set=args.instruction_set,
                          instruction_index=args.instruction_index, jpeg_channels=args.jpeg_channels, qp=args.qp)


@reports_errors
def main(argv: list[str] | None = None) -> int:
    args, converter_args = parse_args(argv)
    if converter_args and args.shards is None:
        raise ConfigError(f"vidar-import: unrecognized arguments {' '.join(converter_args)} (options for the "
                          f"converter need --shards)")
    if args.out is None and args.shards is None:
        raise ConfigError("vidar-import: give --out EPISODES_DIR, --shards OUT, or both")
    if not args.source.is_dir():
        raise DataError(f"vidar-import: SRC {args.source} is not a directory")
    settings = settings_from_args(args)
    out = args.out if args.out is not None else args.shards / SHARDS_EPISODES
    result = import_episodes(FORMATS[args.format].episodes(args.source, settings), out, settings,
                             overwrite=args.overwrite, strict=args.strict)
    print(summary(result), file=sys.stderr)
    if not result["episodes"]:
        raise DataError(f"vidar-import: no episode of {args.source} could be imported (the summary above gives "
                        f"each one's reason)")
    if args.shards is None:
        return 0
    action_dim = result["episodes"][0]["action_dim"]
    overwrite = ["--overwrite"] if args.overwrite else []
    return shard.main(["--episodes", str(out), "--out", str(args.shards), "--action-dim", str(action_dim),
                       *overwrite, *converter_args])


if __name__ == "__main__":
    sys.exit(main())
