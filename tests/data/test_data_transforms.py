"""Frames of another aspect ratio: data.resize crop (centred) / pad / stretch, the same in the
converter's pre-encoding and in the loader's online decoding."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_tools import shard as shard_tool
from data_tools.precompute import WindowSettings, episode_windows
from data_tools.synth import write_synthetic_episodes
from vidartrain.config import DataConfig
from vidartrain.data.dataset import build_loader
from vidartrain.data.transforms import resize_frames


def banded_frame(height=48, width=64):
    """Grey frame with red bands on the 6 leftmost and rightmost columns, as [1, 3, H, W] uint8."""
    frame = torch.full((1, 3, height, width), 128, dtype=torch.uint8)
    frame[..., :6] = frame[..., -6:] = torch.tensor([255, 0, 0], dtype=torch.uint8).view(1, 3, 1, 1)
    return frame


def test_crop_keeps_the_aspect_and_cuts_the_sides_evenly():
    cropped = resize_frames(banded_frame(), 32, 32, "crop")  # 48x64 -> 32x43, centre 32 columns
    assert cropped.shape == (1, 3, 32, 32)
    assert (cropped == 128).all()  # both red bands (outside the centre 48x48 of the source) are cut
    wide = resize_frames(banded_frame(), 16, 32, "crop")  # wider target: rows are cut instead
    assert wide.shape == (1, 3, 16, 32) and (wide[0, 0, :, 0] > 200).all() and (wide[0, 0, :, -1] > 200).all()


def test_pad_keeps_the_aspect_with_black_borders_centred():
    padded = resize_frames(banded_frame(), 32, 32, "pad")  # 48x64 -> 24x32, 4 black rows above and below
    assert padded.shape == (1, 3, 32, 32)
    assert (padded[..., :4, :] == 0).all() and (padded[..., 28:, :] == 0).all()
    assert (padded[0, :, 4:28, :].amax(dim=0) > 0).all()  # no black pixel inside
    assert (padded[0, 0, 4:28, 0] > 200).all()  # the red bands survive, at the edges


def test_stretch_scales_each_axis_and_equal_aspects_agree():
    frame = banded_frame()
    expected = F.interpolate(frame, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    assert torch.equal(resize_frames(frame, 32, 32, "stretch"), expected)
    same_aspect = [resize_frames(frame, 24, 32, mode) for mode in ("crop", "pad", "stretch")]
    assert all(torch.equal(same_aspect[0], other) for other in same_aspect[1:])
    with pytest.raises(ValueError, match="resize mode 'squash'"):
        resize_frames(frame, 24, 32, "squash")


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_converter_and_loader_resize_alike(tmp_path, mode):
    (folder,) = write_synthetic_episodes(tmp_path / "episodes", 1, frames=9, height=48, width=64, seed=4)
    assert shard_tool.main(["--episodes", str(tmp_path / "episodes"), "--out", str(tmp_path / "shards")]) == 0
    data = DataConfig(shards=str(tmp_path / "shards"), num_frames=9, height=32, width=32, resize=mode,
                      cfg_prob=0.0, num_workers=0)
    batch = next(iter(build_loader(data.shards, data, 1, rank=0, world_size=1, train=False,
                                   video_dtype=torch.uint8)))
    window = WindowSettings(num_frames=9, stride=9, height=32, width=32, resize=mode)
    ((start, frames),) = episode_windows((folder / "video.mp4").read_bytes(), 10.0, 10, 9, window)
    assert start == 0
    np.testing.assert_array_equal(batch["video"][0].transpose(0, 1).numpy(), frames)  # [F, 3, H, W]
