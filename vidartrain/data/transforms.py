"""Frame-rate resampling, clip windows and the pixel transform the model sees."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def resample_indices(num_frames: int, source_fps: float, target_fps: float) -> np.ndarray:
    """Source frame index shown at each tick of the target clock (nearest earlier frame).

    A 30 fps video of 90 frames played at 10 fps is frames 0, 3, 6, ..., 87; a 5 fps video at 10 fps
    repeats every frame. The result covers the same duration as the source.
    """
    if num_frames <= 0:
        return np.zeros(0, dtype=np.int64)
    if source_fps <= 0 or target_fps <= 0:
        raise ValueError(f"frame rates must be positive, got source {source_fps}, target {target_fps}")
    step = source_fps / target_fps
    count = int(np.floor((num_frames - 1) / step + 1e-6)) + 1
    # the epsilon keeps exact ratios (30 -> 10) from landing one frame early through rounding
    return np.minimum(np.floor(np.arange(count) * step + 1e-6).astype(np.int64), num_frames - 1)


def window_start(rng: np.random.Generator, length: int, window: int) -> int:
    """Uniformly random start of a window of `window` steps inside a sequence of `length`."""
    if window > length:
        raise ValueError(f"window of {window} frames does not fit a sequence of {length} frames")
    return int(rng.integers(0, length - window + 1))


RESIZE_MODES = ("crop", "pad", "stretch")


def resize_frames(frames: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """Resize uint8 frames [N, 3, h, w] to [N, 3, height, width], staying in uint8.

    mode "crop": scale to cover height x width keeping the aspect ratio, then cut the centre;
    "pad": scale to fit inside keeping the aspect ratio, then pad the borders black, centred;
    "stretch": scale each axis on its own (the aspect ratio changes unless it already matches).
    torch's uint8 bilinear+antialias kernel is several times faster on CPU than the float one and
    differs from it by at most one grey level.
    """
    if frames.dtype != torch.uint8:
        raise TypeError(f"resize_frames expects uint8 frames, got {frames.dtype}")
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode {mode!r}: expected one of {', '.join(RESIZE_MODES)}")
    source_height, source_width = frames.shape[-2:]
    if (source_height, source_width) == (height, width):
        return frames
    if mode == "stretch":
        return bilinear(frames, height, width)
    pick = max if mode == "crop" else min
    scale = pick(height / source_height, width / source_width)
    # the side that decides the scale lands exactly on the target; the other rounds toward it
    scaled_height = height if scale == height / source_height else round(source_height * scale)
    scaled_width = width if scale == width / source_width else round(source_width * scale)
    scaled = bilinear(frames, scaled_height, scaled_width)
    if mode == "crop":
        top, left = (scaled_height - height) // 2, (scaled_width - width) // 2
        return scaled[..., top: top + height, left: left + width]
    top, left = (height - scaled_height) // 2, (width - scaled_width) // 2
    padded = frames.new_zeros((*frames.shape[:-2], height, width))
    padded[..., top: top + scaled_height, left: left + scaled_width] = scaled
    return padded


def bilinear(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if tuple(frames.shape[-2:]) == (height, width):
        return frames
    return F.interpolate(frames, size=(height, width), mode="bilinear", antialias=True, align_corners=False)


def to_model_range(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return frames.to(torch.float32).div_(127.5).sub_(1.0)


def video_to_model_input(frames: np.ndarray, height: int, width: int,
                         dtype: torch.dtype = torch.float32, resize: str = "crop") -> torch.Tensor:
    """uint8 frames [F, H, W, 3] from decord -> video [3, F, height, width] (`resize_frames` mode).

    float32: in [-1, 1], ready for the VAE. uint8: the same pixels, a quarter of the bytes to move
    from loader workers to the trainer, which applies `to_model_range` on its device.
    """
    if dtype not in (torch.float32, torch.uint8):
        raise ValueError(f"video dtype must be torch.float32 or torch.uint8, got {dtype}")
    resized = resize_frames(torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2), height, width,
                            resize)
    video = torch.empty((3, len(frames), height, width), dtype=dtype)
    # one pass converts and reorders frame-major -> channel-major (half the time of two passes)
    video.copy_(resized.transpose(0, 1))
    return video if dtype == torch.uint8 else video.div_(127.5).sub_(1.0)
