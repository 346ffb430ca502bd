"""ALOHA-style HDF5: one file per episode, `/observations/images/<camera>` and `/action` (T, D).

Images are raw uint8 (T, H, W, 3) or JPEG bytes (ALOHA's compressed episodes: OpenCV JPEGs of RGB
arrays, zero-padded rows; `--jpeg-channels`). The files store no frame rate (`--fps`, ALOHA records
at 50) and no instruction: `--instruction`, or a sidecar `<file stem>.txt` beside each file.
Episodes are numbered by the number ending the file name (episode_12.hdf5 -> ep_0012).
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Iterator

from data_tools.episodes import EpisodeError, read_instruction
from data_tools.importers.common import ImportSettings, Recording, SourceEpisode, episode_number
from data_tools.importers.hdf5 import check_cameras, open_hdf5, read_actions, read_camera
from vidartrain.errors import DataError

CAMERAS = ("cam_high", "cam_left_wrist", "cam_right_wrist")
CAMERA_DATASET = "observations/images/{camera}"
ACTION_KEY = "action"


@contextmanager
def open_episode(path: Path, settings: ImportSettings, where: str) -> Iterator[Recording]:
    instruction = settings.instruction
    if instruction is None:
        sidecar = path.with_suffix(".txt")
        if not sidecar.is_file():
            raise EpisodeError("missing_file", f"{where}: no instruction (no {sidecar.name} and no --instruction)")
        try:
            instruction = read_instruction(sidecar)
        except EpisodeError as error:
            raise EpisodeError(error.reason, f"{where}: {error.detail}") from error
    with open_hdf5(path) as file:
        actions = read_actions(file, settings.action_key, where)

        def camera_frames(camera, indices):
            return read_camera(file, CAMERA_DATASET.format(camera=camera), indices, len(actions),
                               settings.jpeg_channels, where)

        yield Recording(actions, settings.fps, instruction, camera_frames)


def episodes(source: Path, settings: ImportSettings) -> list[SourceEpisode]:
    files = [(episode_number(path.stem), path) for path in source.glob("*.hdf5")]
    unnumbered = [path.name for number, path in files if number is None]
    if unnumbered:
        raise DataError(f"{source}: files without an episode number at the end of their name: "
                        f"{', '.join(sorted(unnumbered))}")
    if not files:
        raise DataError(f"{source}: no .hdf5 episode files")
    check_cameras([path for _, path in sorted(files)], CAMERA_DATASET, settings.cameras)
    sidecar = settings.instruction is None  # the instruction is read from <file stem>.txt
    return [SourceEpisode(f"ep_{number:04d}", path.name, partial(open_episode, path, settings, path.name),
                          (path.name, path.with_suffix(".txt").name) if sidecar else (path.name,))
            for number, path in sorted(files)]
