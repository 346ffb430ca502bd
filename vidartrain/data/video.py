"""Reading mp4 bytes with decord and writing H.264 mp4 with PyAV.

Every video in this project goes through these two functions: decord is the fast reader used by
the converter's validation and the training loader; PyAV writes (synthetic episodes, re-encoding,
composed multi-camera observations), because decord cannot encode.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass

import av
import decord
import numpy as np

from vidartrain.errors import DataError

# ffmpeg prints every broken-container complaint to stderr; the callers report errors themselves.
decord.logging.set_level(decord.logging.QUIET)

# decord reports a file it cannot open as DECORDError and a stream it cannot read as RuntimeError.
VIDEO_READ_ERRORS = (decord.DECORDError, RuntimeError)


class VideoReadError(DataError):
    """A video that cannot be opened or decoded."""


def describe_decord_error(error: Exception) -> str:
    """decord's message without its clock times and source locations, so reports are reproducible
    (an error passed on by a decoder thread has one such prefix per level: "[06:35:40] a.cc:292:
    [06:35:40] b.cc:218: Check failed: ...")."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", first_line)[:300]


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    height: int
    width: int


def open_video(data: bytes) -> decord.VideoReader:
    """A decord reader over mp4 bytes held in memory (no temporary file)."""
    if len(data) == 0:
        raise VideoReadError("video is empty (0 bytes)")
    try:
        return decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
    except VIDEO_READ_ERRORS as error:
        raise VideoReadError(f"cannot open video ({len(data)} bytes): {describe_decord_error(error)}") from error


def video_info(reader: decord.VideoReader) -> VideoInfo:
    """Frame count, rate and size; the size comes from decoding frame 0, so a video whose first frame
    does not decode raises VideoReadError here."""
    height, width = read_frames(reader, [0]).shape[1:3] if len(reader) else (0, 0)
    return VideoInfo(num_frames=len(reader), fps=float(reader.get_avg_fps()), height=height, width=width)


def read_frames(reader: decord.VideoReader, indices: np.ndarray | list[int]) -> np.ndarray:
    """uint8 frames [N, H, W, 3] at the given indices."""
    try:
        return reader.get_batch(list(map(int, indices))).asnumpy()
    except VIDEO_READ_ERRORS as error:
        detail = describe_decord_error(error)
        raise VideoReadError(f"cannot decode frames {indices[0]}..{indices[-1]}: {detail}") from error


def decode_all_frames(data: bytes, chunk: int = 64) -> tuple[np.ndarray, VideoInfo]:
    """Every frame of the video (uint8 [T, H, W, 3]) and its metadata; raises VideoReadError."""
    reader = open_video(data)
    info = video_info(reader)
    chunks = [read_frames(reader, np.arange(start, min(start + chunk, info.num_frames)))
              for start in range(0, info.num_frames, chunk)]
    frames = np.concatenate(chunks) if chunks else np.zeros((0, info.height, info.width, 3), np.uint8)
    return frames, info


def encode_mp4(frames: np.ndarray, fps: int, qp: int = 20, preset: str = "veryfast") -> bytes:
    """H.264 (yuv420p) mp4 bytes of uint8 frames [T, H, W, 3].

    Constant quantiser, one encoder thread and ffmpeg's bitexact flags make the bytes a function of
    the frames and the settings alone, so converting the same episodes twice gives byte-identical
    shards. (x264's CRF rate control, driven through PyAV, gave different bytes from run to run.)
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"H.264 yuv420p needs even height and width, got {height}x{width}")
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.thread_count = 1
        stream.codec_context.options = {"qp": str(qp), "preset": preset}
        for index, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            picture.pts = index  # explicit timestamps: x264's rate control reads them
            container.mux(stream.encode(picture))
        container.mux(stream.encode())
    return buffer.getvalue()
