"""Tiny datasets in the public formats vidar-import reads, built by the tests themselves.

Every frame's pixels encode its source frame index and its camera, every action row encodes the
same index, so a test can tell exactly which source frame and action row an output frame and row
came from.
"""
from __future__ import annotations

import io
import json
from fractions import Fraction
from pathlib import Path

import av
import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SIZE = 64
ACTION_DIM = 14


def pattern_frame(index: int, camera: int, height: int = SIZE, width: int = SIZE) -> np.ndarray:
    """Left half grey at 12 * index + 4 (luma survives JPEG and H.264 best); right half red-orange with
    green encoding the camera (a swapped channel order turns it blue)."""
    if not 0 <= index < 21:
        raise ValueError(f"frame index {index} does not fit the pattern (0..20)")
    frame = np.empty((height, width, 3), np.uint8)
    frame[:, : width // 2] = 12 * index + 4
    frame[:, width // 2:] = (230, 40 + 80 * camera, 20)
    return frame


def pattern_video(frames: int, camera: int, height: int = SIZE, width: int = SIZE) -> np.ndarray:
    return np.stack([pattern_frame(i, camera, height, width) for i in range(frames)])


def read_pattern(region: np.ndarray) -> tuple[int, int]:
    """(frame index, camera) from a decoded region [H, W, 3]; asserts the channel order is RGB."""
    h, w = region.shape[:2]

    def centre(part: np.ndarray) -> np.ndarray:
        ph, pw = part.shape[:2]
        return part[ph // 4: 3 * ph // 4, pw // 4: 3 * pw // 4].reshape(-1, 3).astype(np.float64).mean(axis=0)

    grey, colour = centre(region[:, : w // 2]), centre(region[:, w // 2:])
    assert colour[0] > 150 and colour[2] < 100, f"channel order: {colour}"
    return int(round((grey.mean() - 4) / 12)), int(round((colour[1] - 40) / 80))


def pattern_actions(frames: int, dim: int = ACTION_DIM) -> np.ndarray:
    """Row i is i + 100 * column: column 0 is the frame index, every column distinct."""
    return (np.arange(frames)[:, None] + 100.0 * np.arange(dim)[None, :]).astype(np.float32)


def jpeg(frame: np.ndarray, opencv_from_rgb: bool = True) -> bytes:
    """JPEG bytes; opencv_from_rgb mimics cv2.imencode of an RGB array (channels stored reversed)."""
    encoder = av.CodecContext.create("mjpeg", "w")
    encoder.width, encoder.height, encoder.pix_fmt = frame.shape[1], frame.shape[0], "yuvj420p"
    encoder.time_base = Fraction(1, 10)
    pixels = np.ascontiguousarray(frame[..., ::-1] if opencv_from_rgb else frame)
    picture = av.VideoFrame.from_ndarray(pixels, format="rgb24").reformat(format="yuvj420p")
    return b"".join(bytes(packet) for packet in encoder.encode(picture) + encoder.encode(None))


def padded_jpegs(frames: np.ndarray, corrupt: int | None = None) -> np.ndarray:
    """RoboTwin's storage: one JPEG per frame as fixed-width zero-padded bytes S{max_len}."""
    encoded = [jpeg(frame) for frame in frames]
    if corrupt is not None:
        encoded[corrupt] = b"\xff\xd8" + b"not a jpeg" * 20
    return np.array(encoded, dtype=f"S{max(map(len, encoded))}")


def write_robotwin_episode(root: Path, number: int, frames: int, cameras: int = 3, instruction: dict | None = None,
                           corrupt_frame: int | None = None, short_camera: bool = False,
                           actions: np.ndarray | None = None) -> None:
    data, instructions = root / "data", root / "instructions"
    data.mkdir(parents=True, exist_ok=True)
    instructions.mkdir(parents=True, exist_ok=True)
    names = ("head_camera", "left_camera", "right_camera")[:cameras]
    with h5py.File(data / f"episode{number}.hdf5", "w") as file:
        for camera, name in enumerate(names):
            count = frames - 2 if short_camera and camera == 1 else frames
            video = pattern_video(count, camera)
            file.create_dataset(f"observation/{name}/rgb",
                                data=padded_jpegs(video, corrupt_frame if camera == 0 else None))
        vector = pattern_actions(frames) if actions is None else actions
        file.create_dataset("joint_action/vector", data=vector)
        file.create_dataset("joint_action/left_arm", data=vector[:, :6])
    if instruction is not False:
        listing = instruction or {"seen": [f"lift block {number}", "other"], "unseen": [f"unseen {number}"]}
        (instructions / f"episode{number}.json").write_text(json.dumps(listing), encoding="utf-8")


def write_aloha_episode(root: Path, number: int, frames: int, compressed: bool = False, sidecar: str | None = None,
                        cameras: tuple[str, ...] = ("cam_high", "cam_left_wrist", "cam_right_wrist")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"episode_{number}.hdf5"
    with h5py.File(path, "w") as file:
        for camera, name in enumerate(cameras):
            video = pattern_video(frames, camera)
            if compressed:  # ALOHA's compressed episodes: uint8 rows of zero-padded OpenCV JPEGs
                encoded = [jpeg(frame) for frame in video]
                rows = np.zeros((frames, max(map(len, encoded))), np.uint8)
                for i, data in enumerate(encoded):
                    rows[i, :len(data)] = np.frombuffer(data, np.uint8)
                file.create_dataset(f"observations/images/{name}", data=rows)
            else:
                file.create_dataset(f"observations/images/{name}", data=video)
        file.create_dataset("action", data=pattern_actions(frames))
        file.create_dataset("observations/qpos", data=pattern_actions(frames))
    if sidecar is not None:
        path.with_suffix(".txt").write_text(sidecar, encoding="utf-8")
    return path


def encode_video(frames: np.ndarray, fps: int, codec: str = "libx264") -> bytes:
    """mp4 whose frame i is shown at i / fps seconds (time base 1/fps)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.options = {"qp": "10"} if codec == "libx264" else {"crf": "10", "preset": "12"}
        for index, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            picture.pts = index
            container.mux(stream.encode(picture))
        container.mux(stream.encode())
    return buffer.getvalue()


def av1_encoder() -> str | None:
    for name in ("libsvtav1", "libaom-av1"):
        try:
            av.codec.Codec(name, "w")
            return name
        except av.codec.codec.UnknownCodecError:
            continue
    return None


CAMERA_KEYS = ("observation.images.top", "observation.images.left_wrist", "observation.images.right_wrist")


def lerobot_info(version: str, fps: int, cameras: int, dim: int) -> dict:
    features = {"action": {"dtype": "float32", "shape": [dim]},
                "observation.state": {"dtype": "float32", "shape": [dim]},
                "timestamp": {"dtype": "float32", "shape": [1]}, "frame_index": {"dtype": "int64", "shape": [1]},
                "episode_index": {"dtype": "int64", "shape": [1]}, "index": {"dtype": "int64", "shape": [1]},
                "task_index": {"dtype": "int64", "shape": [1]}}
    features.update({key: {"dtype": "video", "shape": [SIZE, SIZE, 3]} for key in CAMERA_KEYS[:cameras]})
    if version == "v2.1":
        paths = {"data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
                 "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"}
    else:
        paths = {"data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
                 "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"}
    return {"codebase_version": version, "fps": fps, "chunks_size": 1000, "features": features, **paths}


def episode_table(index: int, frames: int, fps: int, first_row: int, dim: int,
                  timestamps: np.ndarray | None = None) -> pa.Table:
    actions = pattern_actions(frames, dim)
    stamps = np.arange(frames) / fps if timestamps is None else timestamps
    return pa.table({"action": pa.array(list(actions), type=pa.list_(pa.float32())),
                     "observation.state": pa.array(list(actions), type=pa.list_(pa.float32())),
                     "timestamp": pa.array(stamps.astype(np.float32)),
                     "frame_index": pa.array(np.arange(frames), type=pa.int64()),
                     "episode_index": pa.array(np.full(frames, index), type=pa.int64()),
                     "index": pa.array(first_row + np.arange(frames), type=pa.int64()),
                     "task_index": pa.array(np.full(frames, index % 2), type=pa.int64())})


TASKS = ("fold the towel", "open the lid")


def write_lerobot(root: Path, version: str, lengths: list[int], fps: int, cameras: int = 1, dim: int = ACTION_DIM,
                  codec: str = "libx264", video_frames: dict[int, int] | None = None,
                  timestamps: dict[int, np.ndarray] | None = None) -> None:
    """A LeRobot dataset of episodes 0..n-1 with `lengths` frames; `video_frames` shortens an episode's
    videos, `timestamps` replaces an episode's timestamp column (faults)."""
    video_frames, timestamps = video_frames or {}, timestamps or {}
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "meta" / "info.json").write_text(json.dumps(lerobot_info(version, fps, cameras, dim)), encoding="utf-8")
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(int)
    tables = [episode_table(i, n, fps, int(starts[i]), dim, timestamps.get(i)) for i, n in enumerate(lengths)]
    videos = {key: [pattern_video(video_frames.get(i, n), camera) for i, n in enumerate(lengths)]
              for camera, key in enumerate(CAMERA_KEYS[:cameras])}
    if version == "v2.1":
        for i, table in enumerate(tables):
            path = root / f"data/chunk-000/episode_{i:06d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path)
            for key, clips in videos.items():
                video = root / f"videos/chunk-000/{key}/episode_{i:06d}.mp4"
                video.parent.mkdir(parents=True, exist_ok=True)
                video.write_bytes(encode_video(clips[i], fps, codec))
        rows = [{"episode_index": i, "tasks": [TASKS[i % 2]], "length": n} for i, n in enumerate(lengths)]
        (root / "meta/episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        tasks = [{"task_index": i, "task": task} for i, task in enumerate(TASKS)]
        (root / "meta/tasks.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tasks), encoding="utf-8")
        return
    # v3.0: every episode in one parquet file and one mp4 per camera, located by meta/episodes rows
    (root / "data/chunk-000").mkdir(parents=True)
    pq.write_table(pa.concat_tables(tables), root / "data/chunk-000/file-000.parquet")
    seconds = np.concatenate([[0], np.cumsum([len(clip) for clip in next(iter(videos.values()))])]) / fps
    for key, clips in videos.items():
        video = root / f"videos/{key}/chunk-000/file-000.mp4"
        video.parent.mkdir(parents=True, exist_ok=True)
        video.write_bytes(encode_video(np.concatenate(clips), fps, codec))
    rows = []
    for i, n in enumerate(lengths):
        row = {"episode_index": i, "tasks": [TASKS[i % 2]], "length": n, "data/chunk_index": 0,
               "data/file_index": 0, "dataset_from_index": int(starts[i]), "dataset_to_index": int(starts[i + 1])}
        for key in videos:
            row.update({f"videos/{key}/chunk_index": 0, f"videos/{key}/file_index": 0,
                        f"videos/{key}/from_timestamp": float(seconds[i]),
                        f"videos/{key}/to_timestamp": float(seconds[i + 1])})
        rows.append(row)
    (root / "meta/episodes/chunk-000").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "meta/episodes/chunk-000/file-000.parquet")
    pq.write_table(pa.table({"task_index": list(range(len(TASKS))), "__index_level_0__": list(TASKS)}),
                   root / "meta/tasks.parquet")


def expected_sources(frames: int, fps: int, target: int = 10) -> list[int]:
    """The documented rule in exact integer arithmetic: output k shows source floor(k * fps / 10)."""
    count = (frames - 1) * target // fps + 1
    return [k * fps // target for k in range(count)]


def read_episode(folder: Path) -> tuple[np.ndarray, np.ndarray, str]:
    from vidartrain.data.video import decode_all_frames
    frames, info = decode_all_frames((folder / "video.mp4").read_bytes())
    assert info.fps == 10
    return frames, np.load(folder / "actions.npy"), (folder / "instruction.txt").read_text(encoding="utf-8")


def assert_round_trip(folder: Path, expected: list[int], composed: bool) -> None:
    """Frame k (every camera view of it) and action row k carry source index expected[k], for every k."""
    frames, actions, _ = read_episode(folder)
    assert len(frames) == len(actions) == len(expected)
    assert np.array_equal(actions[:, 0], np.asarray(expected, np.float32))
    for k, frame in enumerate(frames):
        if not composed:
            assert read_pattern(frame) == (expected[k], 0), k
            continue
        head, bottom = frame[:SIZE], frame[SIZE:]
        views = [head, bottom[:, :SIZE // 2], bottom[:, SIZE // 2:]]
        assert [read_pattern(view) for view in views] == [(expected[k], camera) for camera in range(3)], k
