"""Finding episode folders and validating each one before it is written to a shard.

An episode folder holds `video.mp4` (or one video per camera), `actions.npy` of shape (T, 14) and
`instruction.txt`. `load_episode` either returns a `ValidEpisode` ready to be written, with video
and actions on the same 10 fps timeline, or raises `EpisodeError` with one of `SKIP_REASONS`.

A video at another frame rate is resampled onto the timeline (`resample_indices`). Its actions.npy
holds one row per video frame, resampled with the same frame indices (the importers' frame-rate
rule, data_tools.importers.common), or one row per frame of the timeline, used as it is; whichever
count the rows are nearer to decides, and they must still be within one of it.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np

from vidartrain.data.observation import compose_observation
from vidartrain.data.transforms import resample_indices
from vidartrain.data.video import VideoReadError, encode_mp4, open_video, read_frames, video_info
from vidartrain.errors import DataError

SKIP_REASONS = (
    "empty_episode",        # a folder with none of the episode files
    "missing_file",         # some files, not all (or a manifest entry without a folder)
    "video_unreadable",     # zero bytes, truncated, not a video, unknown frame rate, a size H.264 cannot store
    "video_too_short",      # fewer than 2 frames (after resampling)
    "actions_invalid",      # non-finite, wrong rank or width, non-numeric or pickled object
    "length_mismatch",      # frames and action rows differ by more than one
    "instruction_invalid",  # empty or not UTF-8
)
DECODE_CHUNK = 32
NPY_MAGIC = b"\x93NUMPY"


class EpisodeError(DataError):
    """An episode that cannot be used; `reason` is one of SKIP_REASONS, `detail` says why."""

    def __init__(self, reason: str, detail: str):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {SKIP_REASONS}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class EpisodeLayout:
    """File names inside an episode folder and what the converter does with the video."""

    video: str = "video.mp4"
    actions: str = "actions.npy"
    instruction: str = "instruction.txt"
    # head, left wrist, right wrist videos composed into the unified observation frame
    cameras: tuple[str, str, str] | None = None
    action_dim: int | None = 14  # columns of actions.npy; None: any (vidar-sample reads any robot's episode)
    fps: int = 10
    reencode: bool = False
    qp: int = 20  # x264 constant quantiser when re-encoding (lower = better, larger)

    def video_files(self) -> tuple[str, ...]:
        return self.cameras if self.cameras is not None else (self.video,)

    def files(self) -> tuple[str, ...]:
        return (*self.video_files(), self.actions, self.instruction)


@dataclass
class ValidEpisode:
    name: str
    video: bytes          # mp4 on the `fps` timeline (the original bytes, or re-encoded)
    video_fps: float      # frame rate of the stored mp4
    frames: int           # usable frames on the `fps` timeline; equals len(actions)
    fps: int
    source_fps: float     # frame rate of the source video
    source: str           # source files, relative to the episodes directory
    actions: np.ndarray   # float32 [frames, action_dim]
    instruction: str
    reencoded: bool

    def metadata(self) -> dict:
        return {"episode": self.name, "frames": self.frames, "fps": self.fps, "video_fps": self.video_fps,
                "source_fps": self.source_fps, "source": self.source, "reencoded": self.reencoded}


def discover_episodes(episodes_dir: Path, manifest: Path | None = None) -> list[str]:
    """Episode folder names, from the manifest when there is one, else every subfolder that is not
    hidden (vidar-import's unfinished `.ep_XXXX.partial` folders, `.git`, ...), sorted.

    A manifest is a JSON list of names, or {"episodes": [...]} whose items are names or objects
    with an "episode", "name" or "path" field.
    """
    if manifest is None and (episodes_dir / "manifest.json").exists():
        manifest = episodes_dir / "manifest.json"
    if manifest is None:
        return sorted(p.name for p in episodes_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    try:
        listing = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"manifest {manifest}: cannot read JSON: {error}") from error
    entries = listing.get("episodes") if isinstance(listing, dict) else listing
    if not isinstance(entries, list):
        raise DataError(f"manifest {manifest}: expected a list of episodes or {{\"episodes\": [...]}}")
    names, positions = [], {}
    for position, entry in enumerate(entries):
        if isinstance(entry, dict):
            entry = entry.get("episode", entry.get("name", entry.get("path")))
        if not isinstance(entry, str) or not entry:
            raise DataError(f"manifest {manifest}: entry {position} has no episode name")
        check_inside(manifest, position, entry)
        folder = str(PurePosixPath(entry))  # 'ep_0000/' and './ep_0000' are the folder ep_0000 too
        if folder in positions:  # it would be converted twice, two samples under one key
            raise DataError(f"manifest {manifest}: entries {positions[folder]} and {position} both name episode "
                            f"{folder!r}; list each episode once")
        positions[folder] = position
        names.append(entry)
    return names


def check_inside(manifest: Path, position: int, entry: str) -> None:
    """A manifest names folders inside the episodes directory: an absolute path or a `..` would make
    the converter read (and copy into shards) files from anywhere on the machine."""
    path = PurePosixPath(entry)
    if path.is_absolute() or ".." in path.parts:
        raise DataError(f"manifest {manifest}: entry {position} ({entry!r}) points outside the episodes "
                        f"directory; entries must be folder names relative to it, without '..'")


def read_instruction(path: Path) -> str:
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a byte-order mark (Windows editors) is not text
    except OSError as error:
        raise EpisodeError("instruction_invalid", f"cannot read {path.name} ({error})") from error
    except UnicodeDecodeError as error:
        raise EpisodeError("instruction_invalid", f"{path.name} is not UTF-8 ({error})") from error
    if not text.strip():
        raise EpisodeError("instruction_invalid", f"{path.name} is empty")
    return text.strip()


def read_actions(path: Path, action_dim: int | None) -> np.ndarray:
    try:
        with open(path, "rb") as stream:
            magic = stream.read(len(NPY_MAGIC))
    except OSError as error:
        raise EpisodeError("actions_invalid", f"cannot read {path.name} ({error})") from error
    if magic != NPY_MAGIC:
        raise EpisodeError("actions_invalid", f"{path.name} is not a .npy file (no NumPy header)")
    try:
        actions = np.load(path, allow_pickle=False)
    except ValueError as error:  # numpy's refusal to unpickle an object array
        raise EpisodeError("actions_invalid", f"{path.name} holds a pickled object array ({error})") from error
    except (OSError, EOFError) as error:
        raise EpisodeError("actions_invalid", f"{path.name} is not a .npy array ({error})") from error
    if not isinstance(actions, np.ndarray) or actions.dtype.kind not in "iuf":
        kind = actions.dtype if isinstance(actions, np.ndarray) else type(actions).__name__
        raise EpisodeError("actions_invalid", f"{path.name} has non-numeric dtype {kind}")
    if actions.ndim != 2 or (action_dim is not None and actions.shape[1] != action_dim):
        expected = "(T, D)" if action_dim is None else f"(T, {action_dim}) (--action-dim {action_dim})"
        raise EpisodeError("actions_invalid", f"{path.name} has shape {actions.shape}, expected {expected}")
    return finite_float32(actions, path.name)


def finite_float32(actions: np.ndarray, where: str) -> np.ndarray:
    """Numeric actions [T, D] as the float32 they are stored as, checked finite after the cast: a
    float64 beyond float32's range (about 3.4e38) is finite before it and inf after."""
    with np.errstate(over="ignore"):  # the overflow is reported below, as the episode's skip reason
        values = actions.astype(np.float32)
    if not np.isfinite(values).all():
        rows = int((~np.isfinite(values)).any(axis=1).sum())
        raise EpisodeError("actions_invalid", f"{where} has non-finite values (as float32) in {rows} rows")
    return values


class DecodedVideo(NamedTuple):
    frames: np.ndarray | None  # on the fps timeline; None unless kept (see decode_on_timeline)
    length: int                # frames on the fps timeline
    source_frames: int
    source_fps: float


def decode_on_timeline(path: Path, data: bytes, fps: int, keep_frames: bool) -> DecodedVideo:
    """Decode every frame (so a broken stream is caught here, not in training) and resample to `fps`.

    The frames are kept only when asked or when the frame rate differs (the video must then be
    re-encoded); otherwise they are None, so a long episode is checked chunk by chunk without
    holding it in memory.
    """
    try:
        reader = open_video(data)
        info = video_info(reader)
    except VideoReadError as error:
        raise EpisodeError("video_unreadable", f"{path.name}: {error}") from error
    if not np.isfinite(info.fps) or info.fps <= 0:
        raise EpisodeError("video_unreadable", f"{path.name}: unknown frame rate ({info.fps})")
    if info.num_frames < 2:
        raise EpisodeError("video_too_short", f"{path.name} has {info.num_frames} frame(s), need at least 2")
    timeline = resample_indices(info.num_frames, info.fps, fps)
    if len(timeline) < 2:
        raise EpisodeError("video_too_short", f"{path.name} has {len(timeline)} frame(s) at {fps} fps "
                                              f"({info.num_frames} at {info.fps:g} fps), need at least 2")
    keep_frames = keep_frames or info.fps != fps
    kept = []
    try:
        for start in range(0, info.num_frames, DECODE_CHUNK):
            chunk = read_frames(reader, np.arange(start, min(start + DECODE_CHUNK, info.num_frames)))
            if keep_frames:
                kept.append(chunk)
    except VideoReadError as error:
        raise EpisodeError("video_unreadable", f"{path.name}: {error}") from error
    frames = np.concatenate(kept)[timeline] if keep_frames else None
    return DecodedVideo(frames, len(timeline), info.num_frames, info.fps)


def read_video_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise EpisodeError("video_unreadable", f"cannot read {path.name} ({error})") from error


def encode_views(views: list[np.ndarray], fps: int, qp: int, where: str) -> tuple[bytes, tuple[int, int]]:
    """One camera as it is, or three composed into the unified observation, as H.264 mp4 bytes, and
    the frame's (height, width). A size H.264 or the composition cannot take is video_unreadable:
    that episode is skipped, the run goes on."""
    try:
        frames = views[0] if len(views) == 1 else compose_observation(*views)
        return encode_mp4(frames, fps, qp=qp), frames.shape[1:3]
    except ValueError as error:
        raise EpisodeError("video_unreadable", f"{where}: {error}") from error


def actions_on_timeline(actions: np.ndarray, head: DecodedVideo, fps: int) -> np.ndarray:
    """Rows recorded one per frame of the head camera's video are resampled with the video's frame
    indices; rows on the `fps` timeline, or of any other count (align_lengths refuses those), are
    returned as they are."""
    off_source = abs(len(actions) - head.source_frames)
    if off_source <= 1 and off_source < abs(len(actions) - head.length):
        return actions[resample_indices(len(actions), head.source_fps, fps)]
    return actions


def align_lengths(name: str, counts: dict[str, int], expected: str = "") -> int:
    """Frame counts that agree to within one are trimmed to the shortest; anything else is a mismatch
    (`expected` says what the counts should have been)."""
    if max(counts.values()) - min(counts.values()) > 1:
        described = ", ".join(f"{source} {count}" for source, count in counts.items())
        raise EpisodeError("length_mismatch", f"{name}: lengths differ by more than one ({described}){expected}")
    return min(counts.values())


def check_files(folder: Path, layout: EpisodeLayout) -> None:
    if not folder.is_dir():
        raise EpisodeError("missing_file", f"episode folder {folder} does not exist")
    present = [name for name in layout.files() if (folder / name).is_file()]
    if not present:
        raise EpisodeError("empty_episode", f"none of {', '.join(layout.files())} in {folder.name}")
    missing = [name for name in layout.files() if name not in present]
    if missing:
        raise EpisodeError("missing_file", f"{folder.name} lacks {', '.join(missing)}")


def load_episode(episodes_dir: Path, name: str, layout: EpisodeLayout) -> ValidEpisode:
    """Validate one episode and put video and actions on the same `layout.fps` timeline."""
    folder = episodes_dir / name
    check_files(folder, layout)
    instruction = read_instruction(folder / layout.instruction)
    actions = read_actions(folder / layout.actions, layout.action_dim)
    videos = {file: read_video_file(folder / file) for file in layout.video_files()}
    composing = layout.cameras is not None
    decoded = {}
    for file, data in videos.items():
        if len(data) == 0:
            raise EpisodeError("video_unreadable", f"{file} is empty (0 bytes)")
        decoded[file] = decode_on_timeline(Path(file), data, layout.fps, keep_frames=composing or layout.reencode)
    # every camera is already on the fps timeline, whatever its own frame rate; the first one (the
    # head camera) is the one recorded as the source rate, and the one actions may follow
    head_file = layout.video_files()[0]
    head = decoded[head_file]
    fps_of_source = head.source_fps
    actions = actions_on_timeline(actions, head, layout.fps)
    expected = (f"; at {fps_of_source:g} fps, {layout.actions} needs one row per frame of {head_file} "
                f"({head.source_frames}) or per frame of the {layout.fps} fps timeline ({head.length})"
                if fps_of_source != layout.fps else "")
    counts = {file: video.length for file, video in decoded.items()}
    length = align_lengths(name, {**counts, layout.actions: len(actions)}, expected)
    if length < 2:
        raise EpisodeError("video_too_short", f"{name}: {length} usable frame(s) after trimming, need at least 2")
    reencode = composing or layout.reencode or fps_of_source != layout.fps
    if reencode:
        views = [decoded[file].frames[:length] for file in layout.video_files()]
        video, _ = encode_views(views, layout.fps, layout.qp, f"{name} ({', '.join(layout.video_files())})")
    else:
        video = videos[layout.video]
    return ValidEpisode(
        name=name, video=video, video_fps=float(layout.fps) if reencode else fps_of_source, frames=length,
        fps=layout.fps, source_fps=fps_of_source,
        source=",".join(f"{name}/{file}" for file in layout.video_files()),
        actions=actions[:length], instruction=instruction, reencoded=reencode)


def actions_to_npy(actions: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, actions, allow_pickle=False)
    return buffer.getvalue()
