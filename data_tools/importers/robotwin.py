"""RoboTwin 2.0: `<task>/<setting>/data/episode{N}.hdf5` and `instructions/episode{N}.json`.

Each camera's `/observation/<camera>/rgb` holds one JPEG per frame (written by OpenCV from RGB
arrays, hence `--jpeg-channels bgr`), `/joint_action/vector` one action row per frame (left arm 6
+ gripper, right arm 6 + gripper); frame i of every camera and action row i are the same instant.
The files store no frame rate: `--fps` gives it. The instruction is entry `--instruction-index`
of the `--instruction-set` list ("seen" or "unseen") of the episode's JSON file.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Iterator

from data_tools.episodes import EpisodeError
from data_tools.importers.common import ImportSettings, Recording, SourceEpisode, episode_number
from data_tools.importers.hdf5 import check_cameras, open_hdf5, read_actions, read_camera
from vidartrain.errors import DataError

CAMERAS = ("head_camera", "left_camera", "right_camera")
CAMERA_DATASET = "observation/{camera}/rgb"
ACTION_KEY = "joint_action/vector"


def instruction_of(path: Path, settings: ImportSettings, where: str) -> str:
    if not path.is_file():
        raise EpisodeError("missing_file", f"{where}: no instruction file {path.name}")
    try:
        listing = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EpisodeError("instruction_invalid", f"{where}: {path.name} is not UTF-8 JSON ({error})") from error
    choices = listing.get(settings.instruction_set) if isinstance(listing, dict) else None
    if not isinstance(choices, list) or not choices:
        raise EpisodeError("instruction_invalid", f"{where}: {path.name} has no {settings.instruction_set!r} list "
                                                  f"of instructions")
    if settings.instruction_index >= len(choices):
        raise EpisodeError("instruction_invalid", f"{where}: {path.name} has {len(choices)} "
                                                  f"{settings.instruction_set!r} instructions, --instruction-index "
                                                  f"is {settings.instruction_index}")
    chosen = choices[settings.instruction_index]
    if not isinstance(chosen, str) or not chosen.strip():
        raise EpisodeError("instruction_invalid", f"{where}: {path.name} {settings.instruction_set}"
                                                  f"[{settings.instruction_index}] is not a non-empty string")
    return chosen


@contextmanager
def open_episode(path: Path, instructions: Path, settings: ImportSettings, where: str) -> Iterator[Recording]:
    instruction = settings.instruction or instruction_of(instructions, settings, where)
    with open_hdf5(path) as file:
        actions = read_actions(file, settings.action_key, where)

        def camera_frames(camera, indices):
            return read_camera(file, CAMERA_DATASET.format(camera=camera), indices, len(actions),
                               settings.jpeg_channels, where)

        yield Recording(actions, settings.fps, instruction, camera_frames)


def episodes(source: Path, settings: ImportSettings) -> list[SourceEpisode]:
    data = source / "data"
    files = [(episode_number(path.stem), path) for path in data.glob("episode*.hdf5")]
    unnumbered = [path.name for number, path in files if number is None]
    if unnumbered:
        raise DataError(f"{data}: files without an episode number: {', '.join(sorted(unnumbered))}")
    if not files:
        raise DataError(f"{data}: no episode{{N}}.hdf5 files (expected a RoboTwin 2.0 <task>/<setting> directory)")
    check_cameras([path for _, path in sorted(files)], CAMERA_DATASET, settings.cameras)
    return [SourceEpisode(f"ep_{number:04d}", f"data/{path.name}",
                          partial(open_episode, path, source / "instructions" / f"episode{number}.json", settings,
                                  f"data/{path.name}"),
                          (f"data/{path.name}",) if settings.instruction else
                          (f"data/{path.name}", f"instructions/episode{number}.json"))
            for number, path in sorted(files)]
