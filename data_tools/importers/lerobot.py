"""LeRobot datasets, codebase v2.0 / v2.1 and v3.0.

meta/info.json gives `fps`, `features` (cameras are the features of dtype "video") and the
`data_path` / `video_path` templates. v2.x: meta/episodes.jsonl and meta/tasks.jsonl, one parquet
and one mp4 per camera for each episode (chunk = episode_index // chunks_size). v3.0: rows of
meta/episodes/chunk-*/file-*.parquet locate each episode in parquet and mp4 files that hold
several episodes (data/chunk_index, data/file_index; videos/<camera>/chunk_index, file_index,
from_timestamp, to_timestamp), tasks in meta/tasks.parquet.

A parquet row is one frame: `timestamp` (seconds from the episode's start), `frame_index` and the
action column (`--action-key`, default "action"). Row j's frame of a camera is the video frame
shown at from_timestamp + timestamp[j], matched within a quarter of a frame interval (frames are a
whole interval apart, so at most one can match). Timestamps must increase and sit on the
1 / fps grid; the rows are then resampled like every source (data_tools.importers.common).

Videos are decoded with PyAV: LeRobot encodes AV1 by default, which decord cannot open.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterator

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_tools.episodes import EpisodeError
from data_tools.importers.common import ImportSettings, Recording, SourceEpisode, stack_frames
from vidartrain.errors import DataError

ACTION_KEY = "action"
VERSIONS = ("v2.0", "v2.1", "v3.0")
GRID_TOLERANCE = 0.25  # of a frame interval, for timestamps and video frame times


@dataclass
class EpisodeLocation:
    index: int
    data: Path
    videos: dict[str, tuple[Path, float, float]]  # camera -> (mp4, episode start and end in it, seconds)
    tasks: list[str] = field(default_factory=list)
    length: int | None = None


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: cannot read JSON ({error})") from error


def read_jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: cannot read JSON lines ({error})") from error


def read_parquet_rows(path: Path) -> list[dict]:
    try:
        return pq.read_table(path).to_pylist()
    except (OSError, pa.ArrowException) as error:
        raise DataError(f"{path}: cannot read parquet ({error})") from error


def v2_locations(source: Path, info: dict, cameras: tuple[str, ...]) -> list[EpisodeLocation]:
    chunk_size = int(info.get("chunks_size", 1000))
    locations = []
    for row in read_jsonl(source / "meta" / "episodes.jsonl"):
        index = int(row["episode_index"])
        chunk = index // chunk_size
        videos = {camera: (source / info["video_path"].format(episode_chunk=chunk, video_key=camera,
                                                               episode_index=index), 0.0, np.inf)
                  for camera in cameras}
        locations.append(EpisodeLocation(index, source / info["data_path"].format(episode_chunk=chunk,
                                                                                  episode_index=index),
                                         videos, list(row.get("tasks") or []), row.get("length")))
    return locations


def v3_locations(source: Path, info: dict, cameras: tuple[str, ...]) -> list[EpisodeLocation]:
    files = sorted((source / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        raise DataError(f"{source}/meta/episodes: no chunk-*/file-*.parquet (LeRobot v3.0 episode metadata)")
    locations = []
    for row in (row for file in files for row in read_parquet_rows(file)):
        try:
            data = source / info["data_path"].format(chunk_index=row["data/chunk_index"],
                                                     file_index=row["data/file_index"])
            videos = {camera: (source / info["video_path"].format(video_key=camera,
                                                                  chunk_index=row[f"videos/{camera}/chunk_index"],
                                                                  file_index=row[f"videos/{camera}/file_index"]),
                               float(row[f"videos/{camera}/from_timestamp"]),
                               float(row[f"videos/{camera}/to_timestamp"])) for camera in cameras}
        except KeyError as error:
            raise DataError(f"{source}/meta/episodes: episode {row.get('episode_index')} lacks {error}") from error
        locations.append(EpisodeLocation(int(row["episode_index"]), data, videos, list(row.get("tasks") or []),
                                         row.get("length")))
    return locations


def task_table(source: Path, version: str) -> dict[int, str]:
    """task_index -> task text (v3.0 stores the text as the parquet's pandas index)."""
    if version != "v3.0":
        path = source / "meta" / "tasks.jsonl"
        return {int(row["task_index"]): row["task"] for row in read_jsonl(path)} if path.exists() else {}
    path = source / "meta" / "tasks.parquet"
    if not path.exists():
        return {}
    rows = read_parquet_rows(path)
    text_column = next((c for c in ("task", "__index_level_0__") if rows and c in rows[0]), None)
    return {int(row["task_index"]): row[text_column] for row in rows} if text_column else {}


def read_rows(location: EpisodeLocation, settings: ImportSettings, where: str) -> tuple[np.ndarray, np.ndarray, list]:
    """(actions, timestamps, task indices) of the episode's rows, in frame order."""
    if not location.data.is_file():
        raise EpisodeError("missing_file", f"{where}: no data file {location.data.name}")
    columns = [settings.action_key, "timestamp", "frame_index", "episode_index"]
    try:
        names = pq.read_schema(location.data).names
        columns += ["task_index"] if "task_index" in names else []
        table = pq.read_table(location.data, columns=columns, filters=[("episode_index", "=", location.index)])
    except (OSError, pa.ArrowException) as error:
        raise EpisodeError("actions_invalid", f"{where}: {location.data.name}: {error}") from error
    if table.num_rows == 0:
        raise EpisodeError("missing_file", f"{where}: {location.data.name} has no rows of episode {location.index}")
    frame_index = np.asarray(table.column("frame_index").to_pylist())
    order = np.argsort(frame_index, kind="stable")
    if not np.array_equal(frame_index[order], np.arange(len(frame_index))):
        raise EpisodeError("actions_invalid", f"{where}: frame_index is not 0..{len(frame_index) - 1}")
    if location.length is not None and int(location.length) != table.num_rows:
        raise EpisodeError("length_mismatch", f"{where}: {table.num_rows} rows, the episode metadata says "
                                              f"{location.length}")
    try:
        actions = np.asarray(table.column(settings.action_key).to_pylist(), dtype=np.float64)[order]
    except (TypeError, ValueError) as error:  # ragged rows, nulls, strings
        raise EpisodeError("actions_invalid", f"{where}: column {settings.action_key} is not a table of numbers "
                                              f"({error})") from error
    timestamps = np.asarray(table.column("timestamp").to_pylist(), dtype=np.float64)[order]
    tasks = table.column("task_index").to_pylist() if "task_index" in columns else []
    return actions, timestamps, tasks


def check_timestamps(timestamps: np.ndarray, fps: float, where: str) -> None:
    steps = np.diff(timestamps)
    if not np.isfinite(timestamps).all() or (steps <= 0).any():
        row = int(np.argmax(~(steps > 0))) + 1 if len(steps) else 0
        raise EpisodeError("actions_invalid", f"{where}: timestamps are not increasing (row {row})")
    off_grid = np.abs(timestamps - np.arange(len(timestamps)) / fps) > GRID_TOLERANCE / fps
    if off_grid.any():
        row = int(np.argmax(off_grid))
        raise EpisodeError("actions_invalid", f"{where}: row {row} at {timestamps[row]:.6f} s is off the 1/{fps:g} s "
                                              f"grid ({row / fps:.6f} s expected)")


def video_frames(path: Path, span: tuple[float, float], timestamps: np.ndarray, indices: np.ndarray, fps: float,
                 where: str) -> np.ndarray:
    """Frames of rows `indices` from the mp4 holding the episode in `span` = [start, end) seconds (see the
    module doc); the frame at `end` is the next episode's first."""
    if not path.is_file():
        raise EpisodeError("missing_file", f"{where}: no video {path.name}")
    tolerance = GRID_TOLERANCE / fps
    wanted, inverse = np.unique(indices, return_inverse=True)
    start, stop = span
    wanted_times = start + timestamps[wanted]
    end = min(start + timestamps[-1] + tolerance, stop - tolerance)
    times, kept = [], {}
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            if start > 0:
                container.seek(int((start - tolerance) / stream.time_base), stream=stream, backward=True)
            for frame in container.decode(stream):
                if frame.time is None:
                    raise EpisodeError("video_unreadable", f"{where}: {path.name} has frames without timestamps")
                if frame.time > end:
                    break
                if frame.time < start - tolerance:
                    continue
                times.append(frame.time)
                nearest = int(np.abs(wanted_times - frame.time).argmin())
                if abs(wanted_times[nearest] - frame.time) <= tolerance:
                    kept[nearest] = frame.to_ndarray(format="rgb24")
    except (av.FFmpegError, OSError, IndexError) as error:
        raise EpisodeError("video_unreadable", f"{where}: {path.name}: {error}") from error
    if len(times) != len(timestamps):
        raise EpisodeError("length_mismatch", f"{where}: {path.name} has {len(times)} frames in the episode's "
                                              f"span, the data {len(timestamps)} rows")
    unmatched = np.abs(np.asarray(times) - (start + timestamps)) > tolerance
    if unmatched.any():
        row = int(np.argmax(unmatched))
        raise EpisodeError("length_mismatch", f"{where}: {path.name} has no frame at {start + timestamps[row]:.6f} s "
                                              f"(row {row}); nearest {times[row]:.6f} s")
    return stack_frames([kept[position] for position in range(len(wanted))], f"{where} {path.name}")[inverse]


@contextmanager
def open_episode(location: EpisodeLocation, tasks: dict[int, str], fps: float, settings: ImportSettings,
                 where: str) -> Iterator[Recording]:
    actions, timestamps, task_indices = read_rows(location, settings, where)
    check_timestamps(timestamps, fps, where)
    instruction = settings.instruction
    if instruction is None:
        named = location.tasks or [tasks[i] for i in task_indices[:1] if i in tasks]
        if not named:
            raise EpisodeError("instruction_invalid", f"{where}: no task for episode {location.index}")
        instruction = named[0]

    def camera_frames(camera: str, indices: np.ndarray) -> np.ndarray:
        path, start, stop = location.videos[camera]
        return video_frames(path, (start, stop), timestamps, indices, fps, f"{where} {camera}")

    yield Recording(actions, fps, instruction, camera_frames)


def dataset_info(source: Path) -> dict:
    info = read_json(source / "meta" / "info.json")
    version = info.get("codebase_version")
    if version not in VERSIONS:
        raise DataError(f"{source}/meta/info.json: codebase_version {version!r}; vidar-import reads {VERSIONS}")
    for key in ("fps", "features", "data_path", "video_path"):
        if key not in info:
            raise DataError(f"{source}/meta/info.json has no {key!r}")
    return info


def video_keys(source: Path) -> list[str]:
    return [key for key, feature in dataset_info(source)["features"].items() if feature.get("dtype") == "video"]


def episodes(source: Path, settings: ImportSettings) -> list[SourceEpisode]:
    info = dataset_info(source)
    cameras = video_keys(source)
    unknown = [camera for camera in settings.cameras if camera not in cameras]
    if unknown:
        raise DataError(f"{source}: no video feature {', '.join(unknown)}; the cameras are {', '.join(cameras)}")
    if settings.action_key not in info["features"]:
        raise DataError(f"{source}: no feature {settings.action_key!r}; the features are "
                        f"{', '.join(info['features'])}")
    version = info["codebase_version"]
    locate = v3_locations if version == "v3.0" else v2_locations
    locations = sorted(locate(source, info, settings.cameras), key=lambda location: location.index)
    tasks = task_table(source, version)
    fps = float(info["fps"])
    meta = metadata_files(source, version)
    return [SourceEpisode(f"ep_{location.index:04d}", f"episode {location.index}",
                          partial(open_episode, location, tasks, fps, settings, f"episode {location.index}"),
                          source_files(source, location, meta))
            for location in locations]


def metadata_files(source: Path, version: str) -> tuple[str, ...]:
    """The meta/ files `episodes` reads (frame rate, episode spans and lengths, tasks), relative to `source`."""
    if version == "v3.0":
        paths = [source / "meta" / "info.json", *sorted((source / "meta" / "episodes").glob("chunk-*/file-*.parquet")),
                 source / "meta" / "tasks.parquet"]
    else:
        paths = [source / "meta" / name for name in ("info.json", "episodes.jsonl", "tasks.jsonl")]
    return tuple(str(path.relative_to(source)) for path in paths)


def source_files(source: Path, location: EpisodeLocation, meta: tuple[str, ...]) -> tuple[str, ...]:
    """Every file an episode is read from: its data file, its cameras' videos and the metadata. A change
    to a file several episodes share (meta/, v3.0 data and videos) imports each of them again."""
    own = [location.data, *(path for path, _, _ in location.videos.values())]
    return (*(str(path.relative_to(source)) for path in own), *meta)
