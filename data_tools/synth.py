"""Synthetic robot episodes: real H.264 videos of shapes moved by the actions, plus defective ones.

    python -m data_tools.synth --episodes 8 --out data/episodes [--frames 40 --height 144 --width 128]

Two arms are drawn as squares whose positions follow action dimensions 0-1 (left) and 7-8 (right),
their grippers (dimensions 6 and 13) set their size, so an inverse dynamics model can recover the
actions from the frames. Everything is a function of the seed. Episode folders that already hold
files are refused unless --overwrite, which replaces them whole.
"""
from __future__ import annotations

import argparse
import io
import shutil
import sys
from pathlib import Path

import numpy as np

from data_tools.episodes import actions_to_npy
from vidartrain.data.observation import CAMERA_ORDER
from vidartrain.data.video import encode_mp4
from vidartrain.errors import ConfigError, DataError, listed, reports_errors
from vidartrain.files import make_directory

INSTRUCTIONS = (
    "pick up the red block and place it in the bowl",
    "push the green cube to the left edge of the table",
    "open the drawer with the left arm",
    "stack the blue block on the yellow block",
    "hand the cup from the right arm to the left arm",
)
ACTION_DIM = 14
CAMERA_FILES = tuple(f"{camera}.mp4" for camera in CAMERA_ORDER)


def random_actions(rng: np.random.Generator, frames: int, action_dim: int = ACTION_DIM) -> np.ndarray:
    """A smooth random walk in [-1, 1]: joint targets of two 7-dof arms."""
    steps = rng.normal(scale=0.08, size=(frames, action_dim))
    return np.clip(np.cumsum(steps, axis=0) + rng.uniform(-0.5, 0.5, size=action_dim), -1, 1).astype(np.float32)


def render_frames(actions: np.ndarray, height: int, width: int, background: np.ndarray) -> np.ndarray:
    """uint8 frames [T, H, W, 3] with one square per arm placed by that frame's action (two arms
    with 14 or more action dimensions, one with 7 to 13)."""
    frames = np.empty((len(actions), height, width, 3), dtype=np.uint8)
    rows, cols = np.arange(height)[:, None], np.arange(width)[None, :]
    arms = [arm for arm in ((0, 1, 6, (220, 60, 40)), (7, 8, 13, (40, 90, 220))) if arm[2] < actions.shape[1]]
    for t, action in enumerate(actions):
        frame = np.broadcast_to(background, (height, width, 3)).copy()
        for x_dim, y_dim, grip_dim, colour in arms:
            cy, cx = (action[y_dim] + 1) / 2 * (height - 1), (action[x_dim] + 1) / 2 * (width - 1)
            half = max(2.0, min(height, width) * (0.06 + 0.04 * action[grip_dim]))
            inside = (np.abs(rows - cy) <= half) & (np.abs(cols - cx) <= half)
            frame[inside] = colour
        frames[t] = frame
    return frames


def write_episode(folder: Path, frames: np.ndarray | dict[str, np.ndarray], actions: np.ndarray,
                  instruction: str, fps: int = 10) -> None:
    """Write one episode folder: video.mp4 (or one mp4 per camera when frames is a dict)."""
    folder.mkdir(parents=True, exist_ok=True)
    videos = frames if isinstance(frames, dict) else {"video.mp4": frames}
    for file, video in videos.items():
        (folder / file).write_bytes(encode_mp4(video, fps))
    (folder / "actions.npy").write_bytes(actions_to_npy(actions))
    (folder / "instruction.txt").write_text(instruction + "\n", encoding="utf-8")


def add_sensor_noise(rng: np.random.Generator, frames: np.ndarray, noise: float) -> np.ndarray:
    """Per-pixel Gaussian noise of std `noise` grey levels: camera-like bitrates for benchmarks."""
    noisy = frames.astype(np.float32)
    for frame in noisy:  # frame by frame: a 720x640 episode is too large for one float64 draw
        frame += rng.normal(scale=noise, size=frame.shape).astype(np.float32)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def synthetic_episode(rng: np.random.Generator, frames: int, height: int, width: int, cameras: bool = False,
                      noise: float = 0.0, action_dim: int = ACTION_DIM
                      ) -> tuple[np.ndarray | dict[str, np.ndarray], np.ndarray, str]:
    if action_dim < 7:
        raise ConfigError(f"synthetic robots have at least one arm (x, y, ..., gripper at dim 6): action_dim "
                          f"{action_dim} < 7")
    actions = random_actions(rng, frames, action_dim)
    background = rng.integers(60, 200, size=3, dtype=np.uint8)
    instruction = INSTRUCTIONS[int(rng.integers(len(INSTRUCTIONS)))]
    video = render_frames(actions, height, width, background)
    if noise > 0:
        video = add_sensor_noise(rng, video, noise)
    if not cameras:
        return video, actions, instruction
    # the wrist cameras see the scene mirrored and shifted, enough to tell the views apart
    wrists = {"left_wrist.mp4": np.ascontiguousarray(video[:, :, ::-1]),
              "right_wrist.mp4": np.ascontiguousarray(video[:, ::-1])}
    return {"head.mp4": video, **wrists}, actions, instruction


def write_synthetic_episodes(out: Path, episodes: int, frames: int = 40, height: int = 144, width: int = 128,
                             fps: int = 10, seed: int = 0, cameras: bool = False, noise: float = 0.0,
                             action_dim: int = ACTION_DIM, defects: bool = False, overwrite: bool = False
                             ) -> list[Path]:
    """Write `episodes` folders ep_0000, ep_0001, ... under `out` (and, with `defects`, one broken
    episode bad_<kind> of every kind in DEFECTS); returns the paths of the good ones."""
    check_sizes(frames, height, width, fps, cameras)
    folders = [out / f"ep_{index:04d}" for index in range(episodes)]
    broken = {kind: out / f"bad_{kind}" for kind in DEFECTS} if defects else {}
    claim_folders(out, folders + list(broken.values()), overwrite)
    rng = np.random.default_rng(seed)
    for folder in folders:
        video, actions, instruction = synthetic_episode(rng, frames, height, width, cameras, noise, action_dim)
        write_episode(folder, video, actions, instruction, fps)
    for kind, folder in broken.items():
        write_defective_episode(kind, folder, seed=seed)
    return folders


def check_sizes(frames: int, height: int, width: int, fps: int, cameras: bool) -> None:
    """Before anything is written: sizes H.264 yuv420p can store and the converter can use."""
    if frames < 2 or fps < 1:
        raise ConfigError(f"--frames {frames} --fps {fps}: an episode needs at least 2 frames (the converter "
                          f"skips shorter ones) at a positive frame rate")
    if height < 2 or width < 2 or height % 2 or width % 2:
        raise ConfigError(f"--height {height} --width {width}: frame sizes must be positive and even "
                          f"(H.264 yuv420p)")
    if cameras and height % 4:
        raise ConfigError(f"--cameras --height {height}: the head camera's height must be a multiple of 4, so that "
                          f"vidar-shard --cameras can compose it with the half-size wrist views into a frame of "
                          f"even size")


def claim_folders(out: Path, folders: list[Path], overwrite: bool) -> None:
    """Refuse to write into episode folders that already hold something, unless `overwrite`: they are
    then removed whole, so no file of the old episode (a camera video the new one lacks) survives."""
    make_directory(out, "--out")
    taken = [folder for folder in folders
             if folder.is_symlink() or folder.is_file() or (folder.is_dir() and any(folder.iterdir()))]
    if taken and not overwrite:
        raise DataError(f"--out {out} already holds {listed([folder.name for folder in taken])}; use "
                        f"--overwrite to replace them, or another --out")
    for folder in taken:
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder)
        else:
            folder.unlink()


# Every way an episode can be broken, and the skip reason the converter must give it.
DEFECTS = {
    "empty_folder": "empty_episode",
    "missing_video": "missing_file",
    "missing_actions": "missing_file",
    "missing_instruction": "missing_file",
    "video_zero_bytes": "video_unreadable",
    "video_truncated": "video_unreadable",
    "video_not_a_video": "video_unreadable",
    "video_one_frame": "video_too_short",
    "actions_nan": "actions_invalid",
    "actions_inf": "actions_invalid",
    "actions_rank_1": "actions_invalid",
    "actions_wrong_width": "actions_invalid",
    "actions_strings": "actions_invalid",
    "actions_pickled_object": "actions_invalid",
    "actions_not_npy": "actions_invalid",
    "length_mismatch": "length_mismatch",
    "instruction_empty": "instruction_invalid",
    "instruction_whitespace": "instruction_invalid",
    "instruction_not_utf8": "instruction_invalid",
}


def write_defective_episode(kind: str, folder: Path, frames: int = 12, height: int = 48, width: int = 64,
                            seed: int = 0) -> str:
    """Write an episode broken in the way `kind` names (a key of DEFECTS); returns the expected reason."""
    if kind not in DEFECTS:
        raise ValueError(f"unknown defect {kind!r}; expected one of {sorted(DEFECTS)}")
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "empty_folder":
        return DEFECTS[kind]
    video, actions, instruction = synthetic_episode(np.random.default_rng(seed), frames, height, width)
    if kind == "video_one_frame":
        video = video[:1]
    if kind == "length_mismatch":
        actions = np.concatenate([actions, actions[: frames // 2]])
    write_episode(folder, video, actions, instruction)
    video_path, actions_path, text_path = folder / "video.mp4", folder / "actions.npy", folder / "instruction.txt"
    broken_actions = {
        "actions_nan": lambda: actions_to_npy(np.where(np.arange(frames)[:, None] == 3, np.nan, actions)),
        "actions_inf": lambda: actions_to_npy(np.where(np.arange(frames)[:, None] == 5, np.inf, actions)),
        "actions_rank_1": lambda: actions_to_npy(actions[:, 0]),
        "actions_wrong_width": lambda: actions_to_npy(actions[:, :7]),
        "actions_strings": lambda: actions_to_npy(actions.astype(str)),
        "actions_pickled_object": lambda: pickled_object_npy(actions),
        "actions_not_npy": lambda: b"this is not a numpy file",
    }
    if kind.startswith("missing_"):
        {"video": video_path, "actions": actions_path, "instruction": text_path}[kind[len("missing_"):]].unlink()
    elif kind == "video_zero_bytes":
        video_path.write_bytes(b"")
    elif kind == "video_truncated":
        video_path.write_bytes(video_path.read_bytes()[: video_path.stat().st_size // 2])
    elif kind == "video_not_a_video":
        video_path.write_bytes(b"GIF89a certainly not an mp4 " * 64)
    elif kind in broken_actions:
        actions_path.write_bytes(broken_actions[kind]())
    elif kind == "instruction_empty":
        text_path.write_bytes(b"")
    elif kind == "instruction_whitespace":
        text_path.write_bytes(b"  \n\t\n")
    elif kind == "instruction_not_utf8":
        text_path.write_bytes("pick up the bl\u00f6ck".encode("latin-1") + b"\xff\xfe")
    return DEFECTS[kind]


def pickled_object_npy(actions: np.ndarray) -> bytes:
    """An object-dtype .npy (rows as Python lists) that only np.load(allow_pickle=True) can read."""
    buffer = io.BytesIO()
    np.save(buffer, np.array([list(row) for row in actions] + [None], dtype=object), allow_pickle=True)
    return buffer.getvalue()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vidar-synth", description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, required=True, help="number of episodes to write")
    parser.add_argument("--out", type=Path, required=True, help="directory for ep_XXXX folders")
    parser.add_argument("--frames", type=int, default=40, help="frames per episode (default 40)")
    parser.add_argument("--height", type=int, default=144, help="frame height (default 144; 720 for real size)")
    parser.add_argument("--width", type=int, default=128, help="frame width (default 128; 640 for real size)")
    parser.add_argument("--fps", type=int, default=10,
                        help="frame rate of the videos (default 10); actions.npy has one row per video frame, "
                             "which vidar-shard resamples to 10 fps with the video")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cameras", action="store_true",
                        help="write head.mp4, left_wrist.mp4, right_wrist.mp4 instead of video.mp4")
    parser.add_argument("--noise", type=float, default=0.0,
                        help="std of per-pixel noise in grey levels (0: flat shapes; ~6: camera-like bitrate)")
    parser.add_argument("--action-dim", type=int, default=ACTION_DIM,
                        help="columns of actions.npy (default 14: two arms; 7 to 13: one arm)")
    parser.add_argument("--defects", action="store_true",
                        help="also write one broken episode of every defect kind (bad_<kind>)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace episode folders that already exist in --out (default: refuse)")
    return parser.parse_args(argv)


@reports_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    write_synthetic_episodes(args.out, args.episodes, args.frames, args.height, args.width, args.fps,
                             args.seed, args.cameras, args.noise, args.action_dim, args.defects, args.overwrite)
    extra = f" and {len(DEFECTS)} defective episodes" if args.defects else ""
    print(f"wrote {args.episodes} episodes{extra} to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
