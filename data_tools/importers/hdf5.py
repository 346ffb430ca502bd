"""Reading episodes stored as one HDF5 file each (RoboTwin 2.0, ALOHA): actions and camera frames.

A camera dataset is one of: raw uint8 frames (T, H, W, 3); JPEG bytes, one per frame, as fixed-width
zero-padded strings `S{max_len}` (RoboTwin) or variable-length bytes; or uint8 rows (T, N) of
zero-padded JPEG bytes (ALOHA's compressed episodes). A format names its camera datasets with a
pattern, e.g. "observations/images/{camera}".
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from data_tools.episodes import EpisodeError
from data_tools.importers.common import decode_jpeg, gather, stack_frames
from vidartrain.errors import DataError


@contextmanager
def open_hdf5(path: Path) -> Iterator[h5py.File]:
    try:
        file = h5py.File(path, "r")
    except OSError as error:
        raise EpisodeError("video_unreadable", f"{path.name}: cannot open as HDF5 ({error})") from error
    with file:
        yield file


def check_cameras(paths: list[Path], camera_dataset: str, cameras: tuple[str, ...]) -> None:
    """The `cameras` have their datasets (`camera_dataset` filled in) in the first of `paths` that opens,
    checked before any episode is imported: a camera named wrong would otherwise skip every episode, one
    by one. Files that do not open are passed over (each is skipped as its episode is imported)."""
    for path in paths:
        try:
            with open_hdf5(path) as file:
                present = cameras_in(file, camera_dataset)
        except EpisodeError:
            continue
        missing = [camera for camera in cameras if camera not in present]
        if missing:
            absent = ", ".join(f"/{camera_dataset.format(camera=camera)} for camera {camera}" for camera in missing)
            raise DataError(f"{path}: no dataset {absent}; the cameras of this file: {', '.join(present) or 'none'} "
                            f"(/{camera_dataset.format(camera='*')}). Choose one camera, or three "
                            f"(head,left_wrist,right_wrist), with --cameras")
        return


def cameras_in(file: h5py.File, camera_dataset: str) -> list[str]:
    """The cameras whose dataset `camera_dataset` names are in `file`, e.g. the members of
    /observations/images for "observations/images/{camera}"."""
    parent = file.get(camera_dataset.split("{camera}")[0].rstrip("/"))
    if not isinstance(parent, h5py.Group):
        return []
    return [name for name in parent if isinstance(file.get(camera_dataset.format(camera=name)), h5py.Dataset)]


def member(file: h5py.File, key: str, reason: str, where: str) -> h5py.Dataset:
    item = file.get(key)
    if not isinstance(item, h5py.Dataset):
        present = "a group" if item is not None else "absent"
        raise EpisodeError(reason, f"{where}: /{key.lstrip('/')} is {present}, expected a dataset")
    return item


def read_actions(file: h5py.File, key: str, where: str) -> np.ndarray:
    dataset = member(file, key, "actions_invalid", where)
    try:
        return np.asarray(dataset[()])
    except (OSError, TypeError, ValueError) as error:
        raise EpisodeError("actions_invalid", f"{where}: /{key} cannot be read ({error})") from error


def read_camera(file: h5py.File, key: str, indices: np.ndarray, length: int, channels: str, where: str) -> np.ndarray:
    """uint8 RGB frames [N, H, W, 3] of the camera dataset `key` at `indices` (one frame per action row)."""
    dataset = member(file, key, "video_unreadable", where)
    if len(dataset) != length:
        raise EpisodeError("length_mismatch", f"{where}: /{key} has {len(dataset)} frames, the actions "
                                              f"{length} rows")
    raw = dataset.dtype == np.uint8 and dataset.ndim == 4 and dataset.shape[-1] == 3
    padded_rows = dataset.dtype == np.uint8 and dataset.ndim == 2
    encoded = dataset.ndim == 1 and (dataset.dtype.kind == "S" or h5py.check_vlen_dtype(dataset.dtype) is bytes)
    if not (raw or padded_rows or encoded):
        raise EpisodeError("video_unreadable", f"{where}: /{key} has dtype {dataset.dtype} and shape {dataset.shape}; "
                                               f"expected uint8 (T, H, W, 3) frames or JPEG bytes")

    def read_unique(unique: np.ndarray) -> np.ndarray:
        try:
            stored = dataset[unique]
        except (OSError, TypeError, ValueError) as error:
            raise EpisodeError("video_unreadable", f"{where}: /{key} cannot be read ({error})") from error
        if raw:
            return stored
        images = [decode_jpeg(bytes(item) if not padded_rows else item.tobytes(),
                              f"{where} /{key} frame {index}", channels) for index, item in zip(unique, stored)]
        return stack_frames(images, f"{where} /{key}")

    return gather(read_unique, indices)
