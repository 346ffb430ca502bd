"""What every importer shares: the frame-rate rule, one episode folder per source episode, the run's record.

A format module lists a source's episodes (`SourceEpisode`) and opens each one as a `Recording`:
every action row, the source frame rate, the instruction and a way to read chosen frames of a
camera. `import_episodes` does the rest alike for every format.

Frame-rate rule (the converter's `resample_indices`): output frame k, at time k / 10 s, is source
frame floor(k * source_fps / 10) -- the latest source frame at or before that time -- and action
row k is that same source frame's action row. The output covers the source's duration: frames
k = 0 .. floor((T - 1) * 10 / source_fps). A 30 fps source gives source frames 0, 3, 6, ...; a
5 fps source shows every frame twice.

Every fault of a source episode is an `EpisodeError` with one of the converter's skip reasons
(data_tools.episodes.SKIP_REASONS); the episode is skipped and listed, the run goes on. The run is
recorded in EPISODES_DIR/import.json (settings, imported and skipped episodes, and the sizes and
modification times of each episode's source files); while it runs, a journal (.import.jsonl) records
each finished episode, so a run started again keeps the episode folders whose source files are
unchanged and whose checksums still match, and imports the rest (skipped episodes are tried again).
A folder the record lists whose episode is gone from the source, or skipped now, is removed, so the
converter does not pick it up. Same source and options give byte-identical folders.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from collections import Counter
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import av
import numpy as np

from data_tools.episodes import EpisodeError, actions_to_npy, encode_views, finite_float32
from data_tools.shard import Progress
from vidartrain.data.transforms import resample_indices
from vidartrain.errors import ConfigError, DataError
from vidartrain.files import Journal, files_fingerprint, make_directory, write_atomically

IMPORT_FILE = "import.json"
IMPORT_JOURNAL = ".import.jsonl"
IMPORT_FORMAT = "vidartrain-import/1"
EPISODE_FILES = ("video.mp4", "actions.npy", "instruction.txt")
EPISODE_NAME = re.compile(r"ep_\d+")
PARTIAL_SUFFIX = ".partial"


@dataclass(frozen=True)
class ImportSettings:
    """Everything that decides the bytes of the episode folders; recorded and compared on resume."""

    format: str
    source: str                        # the source directory, resolved
    cameras: tuple[str, ...]           # one camera as it is, or head, left wrist, right wrist composed
    action_key: str                    # HDF5 dataset path or LeRobot parquet column
    action_columns: tuple[int, ...] | None = None  # the columns kept, in this order (None: all)
    fps: float | None = None           # source frame rate where the format stores none (RoboTwin, ALOHA)
    instruction: str | None = None     # one instruction for every episode, instead of the source's
    instruction_set: str = "seen"      # RoboTwin: which list of instructions/episode{N}.json
    instruction_index: int = 0         # RoboTwin: which entry of that list
    jpeg_channels: str = "bgr"         # HDF5 JPEGs: channel order a standard decoder returns (see decode_jpeg)
    target_fps: int = 10               # the converter's timeline
    qp: int = 20                       # x264 constant quantiser of video.mp4

    def as_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


@dataclass
class Recording:
    """One source episode, open. `read_camera(camera, indices)` returns uint8 frames [N, H, W, 3] of
    those source frames, or raises EpisodeError (a camera without one frame per action row is a
    length_mismatch, a frame that does not decode is video_unreadable)."""

    actions: np.ndarray                # every source action row, as stored
    fps: float
    instruction: str
    read_camera: Callable[[str, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class SourceEpisode:
    name: str                          # the episode folder, ep_XXXX (XXXX: the source's episode number)
    source: str                        # where it comes from, relative to the source directory
    open: Callable[[], AbstractContextManager[Recording]]
    files: tuple[str, ...]             # every source file it is read from, relative to the source directory


def decode_jpeg(data: bytes, where: str, channels: str) -> np.ndarray:
    """uint8 [H, W, 3] RGB from JPEG bytes (trailing zero padding allowed), decoded with PyAV.

    channels="bgr": the JPEG was written by OpenCV from an RGB array (RoboTwin, ALOHA), so a
    standard decoder returns the channels reversed and they are put back.
    """
    try:
        decoder = av.CodecContext.create("mjpeg", "r")
        frames = decoder.decode(av.Packet(data)) + decoder.decode(None)
    except av.FFmpegError as error:
        raise EpisodeError("video_unreadable", f"{where}: JPEG does not decode ({error})") from error
    if len(frames) != 1:
        raise EpisodeError("video_unreadable", f"{where}: JPEG of {len(data)} bytes decodes to {len(frames)} images")
    image = frames[0].to_ndarray(format="rgb24")
    return np.ascontiguousarray(image[..., ::-1]) if channels == "bgr" else image


def gather(read_unique: Callable[[np.ndarray], np.ndarray], indices: np.ndarray) -> np.ndarray:
    """Frames at `indices` (which may repeat) from a reader of sorted distinct indices."""
    unique, inverse = np.unique(indices, return_inverse=True)
    return read_unique(unique)[inverse]


def stack_frames(frames: list[np.ndarray], where: str) -> np.ndarray:
    shapes = {frame.shape for frame in frames}
    if len(shapes) != 1:
        raise EpisodeError("video_unreadable", f"{where}: frames of different sizes {sorted(shapes)}")
    return np.stack(frames)


def select_actions(actions: np.ndarray, settings: ImportSettings, where: str) -> np.ndarray:
    """float32 (T, D) of the chosen columns; a non-numeric, non-finite or wrongly shaped source is actions_invalid."""
    if actions.dtype.kind not in "iuf":
        raise EpisodeError("actions_invalid", f"{where}: {settings.action_key} has non-numeric dtype {actions.dtype}")
    if actions.ndim != 2:
        raise EpisodeError("actions_invalid", f"{where}: {settings.action_key} has shape {actions.shape}, "
                                              f"expected (T, D)")
    if settings.action_columns is not None:
        outside = [c for c in settings.action_columns if c >= actions.shape[1]]
        if outside:
            raise EpisodeError("actions_invalid", f"{where}: {settings.action_key} has {actions.shape[1]} columns, "
                                                  f"--action-columns asks for {outside}")
        actions = actions[:, list(settings.action_columns)]
    return finite_float32(actions, f"{where}: {settings.action_key}")


def episode_files(recording: Recording, settings: ImportSettings, where: str) -> tuple[dict[str, bytes], dict]:
    """The folder's files on the 10 fps timeline (see the module's frame-rate rule) and its record."""
    actions = select_actions(recording.actions, settings, where)
    if not np.isfinite(recording.fps) or recording.fps <= 0:
        raise EpisodeError("video_unreadable", f"{where}: unknown frame rate ({recording.fps})")
    indices = resample_indices(len(actions), recording.fps, settings.target_fps)
    if len(indices) < 2:
        raise EpisodeError("video_too_short", f"{where}: {len(actions)} source frame(s) at {recording.fps:g} fps "
                                              f"give {len(indices)} at {settings.target_fps} fps, need at least 2")
    instruction = recording.instruction.strip()
    if not instruction:
        raise EpisodeError("instruction_invalid", f"{where}: the instruction is empty")
    views = [recording.read_camera(camera, indices) for camera in settings.cameras]
    video, (height, width) = encode_views(views, settings.target_fps, settings.qp, where)
    files = {"video.mp4": video, "actions.npy": actions_to_npy(actions[indices]),
             "instruction.txt": (instruction + "\n").encode("utf-8")}
    record = {"source_frames": len(actions), "source_fps": float(recording.fps), "frames": len(indices),
              "action_dim": int(actions.shape[1]), "height": int(height), "width": int(width),
              "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}}
    return files, record


def write_folder(out: Path, name: str, files: dict[str, bytes]) -> None:
    """Write the files into a hidden partial folder, fsync, then rename it: a folder is whole or absent
    (partial folders of a killed run are removed when the import starts again)."""
    partial = out / f".{name}{PARTIAL_SUFFIX}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    for file, data in files.items():
        with open(partial / file, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
    target = out / name
    if target.exists():  # an altered folder of an earlier run, imported again: moved aside, then removed
        altered = out / f".{name}.altered{PARTIAL_SUFFIX}"
        shutil.rmtree(altered, ignore_errors=True)
        os.replace(target, altered)
        os.replace(partial, target)
        shutil.rmtree(altered)
    else:
        os.replace(partial, target)


def folder_intact(out: Path, record: dict) -> bool:
    folder = out / record["episode"]
    return all((folder / file).is_file() and hashlib.sha256((folder / file).read_bytes()).hexdigest() == digest
               for file, digest in record["sha256"].items())


def clear_output(out: Path) -> None:
    """--overwrite: remove what an import writes (episode folders, partial folders, its records), nothing else."""
    for entry in out.iterdir():
        name = entry.name
        ours = (entry.is_dir() and (EPISODE_NAME.fullmatch(name) or name.endswith(PARTIAL_SUFFIX))
                or name in (IMPORT_FILE, IMPORT_JOURNAL))
        if ours:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def previous_records(out: Path, settings: ImportSettings) -> list[dict]:
    """Records of an earlier run of the same import into `out` (its journal, else its import.json)."""
    journal, index = Journal(out / IMPORT_JOURNAL), out / IMPORT_FILE
    if journal.exists():
        header, records = journal.read()
        stored = header["settings"]
    elif index.exists():
        try:
            previous = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(f"{index}: unreadable ({error}); use --overwrite or another --out") from error
        stored, records = previous.get("settings"), previous.get("episodes", []) + previous.get("skipped", [])
    else:
        foreign = sorted(entry.name for entry in out.iterdir() if not entry.name.endswith(PARTIAL_SUFFIX))
        if foreign:
            raise DataError(f"{out} is not empty and holds no import ({', '.join(foreign[:5])}...); use an empty "
                            f"--out, or --overwrite to replace the episode folders in it")
        return []
    if stored != settings.as_dict():
        differences = [f"{key}: {stored.get(key)!r} in the folder, {value!r} now"
                       for key, value in settings.as_dict().items() if (stored or {}).get(key) != value]
        raise DataError(f"{out} holds an import made with other settings ({'; '.join(differences)}); use another "
                        f"--out or --overwrite")
    return records


def import_episodes(episodes: list[SourceEpisode], out: Path, settings: ImportSettings, overwrite: bool = False,
                    strict: bool = False) -> dict:
    """Write one folder per valid source episode into `out`; returns the run's record (also out/import.json)."""
    make_directory(out, "EPISODES_DIR")
    if overwrite:
        clear_output(out)
    for partial in out.glob(f".*{PARTIAL_SUFFIX}"):  # left by a run killed while writing a folder
        shutil.rmtree(partial)
    names = [episode.name for episode in episodes]
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise DataError(f"{settings.source}: several source episodes map to {', '.join(duplicates)}")
    fingerprints = {episode.name: files_fingerprint(Path(settings.source), episode.files) for episode in episodes}
    done = kept_records(out, previous_records(out, settings), fingerprints)
    journal = Journal(out / IMPORT_JOURNAL)
    journal.start({"settings": settings.as_dict()}, [done[name] for name in names if name in done])
    records = []
    progress = Progress("import", len(episodes))
    for episode in episodes:
        record = done.get(episode.name) or import_one(episode, out, settings, records, fingerprints[episode.name])
        records.append(record)
        if episode.name not in done:
            journal.append(record)
        progress.update(skipped="reason" in record)
        if strict and "reason" in record:
            raise DataError(f"vidar-import --strict: {episode.source}: {record['reason']}: {record['detail']}")
    imported = [r for r in records if "reason" not in r]
    result = {"format": IMPORT_FORMAT, "settings": settings.as_dict(), "episodes": imported,
              "skipped": [r for r in records if "reason" in r],
              "totals": {"source_episodes": len(episodes), "imported": len(imported),
                         "skipped": len(records) - len(imported)}}
    text = json.dumps(result, indent=1, sort_keys=True)
    write_atomically(out / IMPORT_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    journal.remove()
    return result


def kept_records(out: Path, previous: list[dict], fingerprints: dict[str, str]) -> dict[str, dict]:
    """The earlier run's imported episodes whose source files and folder are unchanged, by name.

    Every other folder that run wrote is removed now, before the new journal forgets it: an episode
    gone from the source, or now skipped, must not stay where the converter would pick it up; a
    changed one is imported again. Only folders an import record lists are touched.
    """
    done = {}
    for record in previous:
        name = record["episode"]
        if "reason" in record:  # skipped episodes are tried again: their source may have been repaired
            continue
        if name not in fingerprints:
            why = f"was imported from {record['source']}, which is gone from the source: removing it"
        elif record.get("source_fingerprint") != fingerprints[name]:
            why = "was imported from source files that changed since (size or modification time): importing it again"
        elif not folder_intact(out, record):
            why = "is missing or does not match its checksums: importing it again"
        else:
            done[name] = record
            continue
        print(f"{out / name} {why}", file=sys.stderr)
        remove_episode_folder(out, name)
    return done


def remove_episode_folder(out: Path, name: str) -> None:
    # the name comes from a record on disk: never let an edited one point rmtree anywhere else
    if not EPISODE_NAME.fullmatch(name):
        raise DataError(f"{out}: the import record lists episode {name!r}, not a folder name vidar-import writes "
                        f"(ep_XXXX); use --overwrite or another --out")
    try:
        shutil.rmtree(out / name)
    except FileNotFoundError:
        pass  # already gone (removed by hand, or by a run killed after removing it)
    except OSError as error:
        raise DataError(f"{out / name}: cannot remove it ({error}); it must go before vidar-shard reads "
                        f"{out}") from error


def import_one(episode: SourceEpisode, out: Path, settings: ImportSettings, earlier: list[dict],
               fingerprint: str) -> dict:
    """Import one episode; its record (with the `fingerprint` of its source files, taken before they
    were read), or a skip record {episode, source, reason, detail}."""
    try:
        with episode.open() as recording:
            files, record = episode_files(recording, settings, episode.source)
        first = next((r for r in earlier if "reason" not in r), None)
        if first is not None and first["action_dim"] != record["action_dim"]:
            raise EpisodeError("actions_invalid", f"{episode.source}: {record['action_dim']} action columns, "
                                                  f"{first['episode']} has {first['action_dim']}")
    except EpisodeError as error:
        return {"episode": episode.name, "source": episode.source, "reason": error.reason, "detail": error.detail}
    write_folder(out, episode.name, files)
    return {"episode": episode.name, "source": episode.source, "source_fingerprint": fingerprint, **record}


def summary(result: dict) -> str:
    reasons = Counter(skip["reason"] for skip in result["skipped"])
    skipped = ", ".join(f"{reason} {count}" for reason, count in sorted(reasons.items())) or "none"
    lines = [f"imported {result['totals']['imported']} of {result['totals']['source_episodes']} episodes; "
             f"skipped: {skipped}"]
    lines += [f"  skipped {skip['source']}: {skip['reason']}: {skip['detail']}" for skip in result["skipped"]]
    return "\n".join(lines)


def parse_columns(text: str) -> tuple[int, ...]:
    """'0-5,13' -> (0, 1, 2, 3, 4, 5, 13): column numbers and inclusive ranges, in the order given."""
    columns = []
    for part in text.split(","):
        bounds = part.strip().split("-")
        if len(bounds) not in (1, 2) or not all(bound.strip().isdigit() for bound in bounds):
            raise ConfigError(f"--action-columns: {part!r} is not a column number or a range a-b")
        low, high = int(bounds[0]), int(bounds[-1])
        if high < low:
            raise ConfigError(f"--action-columns: range {part!r} runs backwards")
        columns += range(low, high + 1)
    return tuple(columns)


def episode_number(name: str) -> int | None:
    """The number at the end of a file stem (episode12 -> 12, episode_000012 -> 12), or None."""
    match = re.search(r"(\d+)$", name)
    return int(match.group(1)) if match else None
