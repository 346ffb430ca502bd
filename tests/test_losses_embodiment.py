"""Eq. 6 / Eq. 7 losses of stage 2: the eta = 0 identity, values, context frames, mask regions."""
import pytest
import torch

from vidartrain.losses import (embodiment_weights, flow_matching_loss, mask_region_losses,
                               per_frame_flow_matching_loss)


def velocities(seed: int = 0, shape=(2, 4, 3, 2, 3)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


# Frame 0 of every sample is clean context (no loss); frames 1 and 2 are predicted.
NOISY_FRAMES = torch.tensor([0.0, 1.0, 1.0]).view(1, 1, 3, 1, 1)


def test_eq7_with_eta_zero_equals_eq6_exactly():
    pred, target = velocities()
    mask = torch.rand(2, 3, 2, 3, generator=torch.Generator().manual_seed(1))
    eq6 = flow_matching_loss(pred, target, NOISY_FRAMES)
    eq7 = flow_matching_loss(pred, target, NOISY_FRAMES, embodiment_weights(mask, eta=0.0))
    assert torch.equal(eq6, eq7)
    assert eq6 > 0
    assert not torch.equal(eq6, flow_matching_loss(pred, target, NOISY_FRAMES, embodiment_weights(mask, 3.0)))


def test_eq6_is_mean_squared_error_over_the_noisy_frames_only():
    pred, target = velocities()
    expected = (pred[:, :, 1:] - target[:, :, 1:]).square().mean()
    torch.testing.assert_close(flow_matching_loss(pred, target, NOISY_FRAMES), expected)
    # The context frame's prediction carries no loss and no gradient.
    pred.requires_grad_(True)
    flow_matching_loss(pred, target, NOISY_FRAMES, embodiment_weights(torch.rand(2, 3, 2, 3), 3.0)).backward()
    assert torch.count_nonzero(pred.grad[:, :, 0]) == 0
    assert torch.count_nonzero(pred.grad[:, :, 1:]) == pred.grad[:, :, 1:].numel()


def test_eq7_weights_the_residual_inside_the_norm():
    pred = torch.zeros(1, 2, 2, 1, 2)
    target = torch.ones(1, 2, 2, 1, 2)
    mask = torch.tensor([[[[0.0, 1.0]], [[0.5, 0.0]]]])  # [B=1, F=2, H=1, W=2]
    weights = embodiment_weights(mask, eta=3.0)
    assert weights.shape == (1, 1, 2, 1, 2)
    loss = flow_matching_loss(pred, target, weights=weights)
    # ||(1 + 3U) * 1||^2 per element: U = 0, 1, 0.5, 0 -> 1, 16, 6.25, 1.
    assert loss.item() == pytest.approx((1 + 16 + 6.25 + 1) / 4)


def test_per_frame_loss_is_one_value_per_rollout_position():
    pred, target = velocities()
    per_frame = per_frame_flow_matching_loss(pred, target)
    assert per_frame.shape == (3,)
    torch.testing.assert_close(per_frame[2], (pred[:, :, 2] - target[:, :, 2]).square().mean())
    torch.testing.assert_close(per_frame[1:].mean(), flow_matching_loss(pred, target, NOISY_FRAMES))


def test_mask_region_losses_split_the_error_by_the_mask():
    pred = torch.zeros(1, 1, 2, 1, 2)
    target = torch.tensor([[[[[1.0, 3.0]], [[5.0, 7.0]]]]])  # squared errors 1, 9 | 25, 49
    mask = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    both = torch.ones(1, 1, 2, 1, 1)
    inside, outside = mask_region_losses(pred, target, mask, both)
    assert inside.item() == pytest.approx((1 + 49) / 2)
    assert outside.item() == pytest.approx((9 + 25) / 2)
    inside, outside = mask_region_losses(pred, target, mask, torch.tensor([0.0, 1.0]).view(1, 1, 2, 1, 1))
    assert (inside.item(), outside.item()) == (49.0, 25.0)
    # A soft mask splits each position's error between the two regions.
    inside, outside = mask_region_losses(pred, target, torch.full((1, 2, 1, 2), 0.25), both)
    assert inside.item() == pytest.approx(21.0) and outside.item() == pytest.approx(21.0)


def test_bad_inputs_raise_clear_errors():
    pred, target = velocities()
    with pytest.raises(ValueError, match="latent-grid mask"):
        embodiment_weights(torch.rand(2, 1, 3, 2, 3), eta=3.0)
    with pytest.raises(ValueError, match="does not match the latent grid"):
        mask_region_losses(pred, target, torch.rand(2, 3, 3, 2), NOISY_FRAMES)
    with pytest.raises(ValueError, match="of one shape"):
        per_frame_flow_matching_loss(pred, target[:, :, :2])
