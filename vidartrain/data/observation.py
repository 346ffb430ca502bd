"""The unified observation space: one frame that shows every camera of the robot.

Vidar trains on a single video stream, so a multi-camera robot is seen through one composed frame:
the head camera at full size on top, the left and right wrist cameras at half size side by side
below. Three 480x640 (HxW) cameras give a 720x640 frame, which the loader resizes to the model's
736x640.
"""
from __future__ import annotations

import numpy as np
import torch

from vidartrain.data.transforms import resize_frames

UNIFIED_HEIGHT, UNIFIED_WIDTH = 720, 640
CAMERA_ORDER = ("head", "left_wrist", "right_wrist")


def _resize_uint8(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    return resize_frames(tensor, height, width, "stretch").permute(0, 2, 3, 1).numpy()


def compose_observation(head: np.ndarray, left_wrist: np.ndarray, right_wrist: np.ndarray) -> np.ndarray:
    """uint8 camera videos [T, H, W, 3] -> unified frames [T, 3H/2, W, 3].

    All three must have the same frame count; the wrist views may have any size (they are resized
    to half the head camera's height and width). The head camera's height must be a multiple of 4
    and its width even: the frame is stored as H.264 yuv420p, which needs an even 3H/2 x W.
    """
    views = {"head": head, "left_wrist": left_wrist, "right_wrist": right_wrist}
    for name, view in views.items():
        if view.ndim != 4 or view.shape[-1] != 3 or view.dtype != np.uint8:
            raise ValueError(f"camera {name}: expected uint8 frames [T, H, W, 3], got {view.dtype} {view.shape}")
    counts = {name: len(view) for name, view in views.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(f"cameras have different frame counts: {counts}")
    height, width = head.shape[1:3]
    if height % 4 or width % 2:
        raise ValueError(f"head camera size {height}x{width} would compose a {height + height // 2}x{width} frame; "
                         f"H.264 needs an even size, so the head camera's height must be a multiple of 4 "
                         f"and its width even")
    half_h, half_w = height // 2, width // 2
    bottom = np.concatenate([_resize_uint8(left_wrist, half_h, half_w),
                             _resize_uint8(right_wrist, half_h, half_w)], axis=2)
    return np.concatenate([head, bottom], axis=1)
