"""IDM mask pooling to the VAE latent grid and to DiT tokens (Eq. 7), against hand-computed values."""
import pytest
import torch

from vidartrain.models.idm import pool_mask_to_latent, pool_mask_to_tokens


def hand_built_mask() -> torch.Tensor:
    """5 frames of 4x4 pixels; with spatial stride 2 and temporal stride 4 -> 2 latent frames of 2x2."""
    frame0 = torch.tensor([[1., 0., 0., 0.],
                           [0., 0., 0., 0.],
                           [1., 1., 0., 1.],
                           [1., 1., 1., 0.]])
    frame1 = torch.ones(4, 4)
    frame2 = torch.zeros(4, 4)
    frame3 = torch.zeros(4, 4)
    frame3[:2, :2] = 1  # top-left patch only
    frame4 = torch.zeros(4, 4)
    frame4[0] = 1  # top pixel row: half of each top patch
    return torch.stack([frame0, frame1, frame2, frame3, frame4])[None]


def test_pool_mask_to_latent_hand_example():
    latent = pool_mask_to_latent(hand_built_mask(), spatial=2, temporal=4)
    # Latent frame 0 is pixel frame 0 alone: patch means (1+0+0+0)/4, 0, (1+1+1+1)/4, (0+1+1+0)/4.
    # Latent frame 1 averages frames 1..4, whose patch means are
    # [[1, 1], [1, 1]], [[0, 0], [0, 0]], [[1, 0], [0, 0]], [[0.5, 0.5], [0, 0]]:
    # top-left (1+0+1+0.5)/4, top-right (1+0+0+0.5)/4, bottom (1+0+0+0)/4.
    expected = torch.tensor([[[0.25, 0.0], [1.0, 0.5]],
                             [[0.625, 0.375], [0.25, 0.25]]])[None]
    torch.testing.assert_close(latent, expected, rtol=0, atol=1e-7)


def test_pool_mask_to_tokens_hand_example_and_token_order():
    # One token per latent frame here: the 2x2 latent patch averaged.
    tokens = pool_mask_to_tokens(hand_built_mask(), spatial=2, temporal=4, patch=(2, 2))
    expected = torch.tensor([[(0.25 + 0 + 1 + 0.5) / 4, (0.625 + 0.375 + 0.25 + 0.25) / 4]])
    torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-7)
    assert expected.tolist() == [[0.4375, 0.375]]

    # Each token covers 4x4 pixels (spatial 2 x patch 2); give token (row r, col c) the value
    # 10 r + c in frame 0 and 100 more in frames 1..4: tokens come out frame, row, column.
    ids = torch.tensor([[0., 1., 2.], [10., 11., 12.]])
    frame = ids.repeat_interleave(4, dim=0).repeat_interleave(4, dim=1)  # 8 x 12 pixels
    mask = torch.stack([frame] + [frame + 100] * 4)[None]
    tokens = pool_mask_to_tokens(mask, spatial=2, temporal=4, patch=(2, 2))
    assert tokens.tolist() == [[0, 1, 2, 10, 11, 12, 100, 101, 102, 110, 111, 112]]


def test_single_frame_is_one_latent_frame():
    latent = pool_mask_to_latent(hand_built_mask()[:, :1], spatial=2, temporal=4)
    torch.testing.assert_close(latent, torch.tensor([[[[0.25, 0.0], [1.0, 0.5]]]]), rtol=0, atol=1e-7)


def test_pooling_keeps_batch_samples_apart():
    mask = torch.stack([hand_built_mask()[0], 1 - hand_built_mask()[0]])
    latent = pool_mask_to_latent(mask, spatial=2, temporal=4)
    torch.testing.assert_close(latent[1], 1 - latent[0], rtol=0, atol=1e-7)


def test_real_geometry_81_frames_736x640():
    mask = torch.zeros(2, 81, 736, 640, device="meta")
    assert pool_mask_to_latent(mask).shape == (2, 21, 46, 40)
    assert pool_mask_to_tokens(mask).shape == (2, 21 * 23 * 20)


def test_pooling_rejects_shapes_that_do_not_match_the_vae_stride():
    with pytest.raises(ValueError, match="80 frames; expected 1 \\+ 4k"):
        pool_mask_to_latent(torch.zeros(1, 80, 32, 32))
    with pytest.raises(ValueError, match="40x32 is not a multiple of the spatial stride 16"):
        pool_mask_to_latent(torch.zeros(1, 5, 40, 32))
    with pytest.raises(ValueError, match=r"\[B, F, H, W\]"):
        pool_mask_to_latent(torch.zeros(5, 32, 32))
    with pytest.raises(ValueError, match="latent grid \\(3, 2\\) is not a multiple of the patch"):
        pool_mask_to_tokens(torch.zeros(1, 1, 48, 32))
