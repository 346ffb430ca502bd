"""Flow matching (Eq. 1) in the project's one convention: data x_1, noise x_0, x = (1-s) x_1 + s x_0."""
import math

import pytest
import torch

from vidartrain.losses import (NUM_TRAIN_TIMESTEPS, add_noise, flow_matching_loss, flow_matching_target,
                               sample_sigmas, shift_sigma)
from vidartrain.trainers.vidar_trainer import first_frame_conditioning, sigma_bucket_metrics


def test_shift_sigma_matches_wan_formula_and_keeps_endpoints():
    sigma = torch.tensor([0.0, 0.25, 0.5, 1.0])
    shifted = shift_sigma(sigma, 5.0)
    assert shifted[0] == 0.0 and shifted[-1] == 1.0
    assert math.isclose(float(shifted[2]), 5 * 0.5 / (1 + 4 * 0.5), rel_tol=1e-6)
    assert torch.equal(shift_sigma(sigma, 1.0), sigma)
    with pytest.raises(ValueError, match="shift must be > 0"):
        shift_sigma(sigma, 0.0)


def test_sample_sigmas_is_seeded_and_shift_moves_mass_towards_noise():
    a = sample_sigmas(4096, 3.0, generator=torch.Generator().manual_seed(1))
    b = sample_sigmas(4096, 3.0, generator=torch.Generator().manual_seed(1))
    plain = sample_sigmas(4096, 1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert a.mean() > plain.mean() + 0.15  # shift 3 pushes sigmas towards 1 (noise)


def test_add_noise_endpoints_and_velocity_integrates_from_data_to_noise():
    clean, noise = torch.randn(2, 4, 3, 2, 2), torch.randn(2, 4, 3, 2, 2)
    assert torch.equal(add_noise(clean, noise, torch.zeros(2)), clean)
    assert torch.equal(add_noise(clean, noise, torch.ones(2)), noise)
    sigma = torch.tensor([0.3, 0.7])
    x = add_noise(clean, noise, sigma)
    v = flow_matching_target(clean, noise)
    # dx/dsigma = x_0 - x_1 = v: one Euler step of size (1 - sigma) lands exactly on the noise
    torch.testing.assert_close(x + (1 - sigma).view(2, 1, 1, 1, 1) * v, noise)


def test_add_noise_per_frame_sigma_and_shape_errors():
    clean, noise = torch.randn(1, 4, 3, 2, 2), torch.randn(1, 4, 3, 2, 2)
    x = add_noise(clean, noise, torch.tensor([[0.0, 0.5, 1.0]]))
    assert torch.equal(x[:, :, 0], clean[:, :, 0]) and torch.equal(x[:, :, 2], noise[:, :, 2])
    with pytest.raises(ValueError, match="does not match latents"):
        add_noise(clean, noise, torch.zeros(1, 5))
    with pytest.raises(ValueError, match="differ in shape"):
        add_noise(clean, noise[:, :2], torch.zeros(1))


def test_flow_matching_loss_mask_excludes_frames_without_diluting_the_mean():
    pred, target = torch.zeros(1, 2, 3, 1, 1), torch.ones(1, 2, 3, 1, 1)
    target[:, :, 0] = 10.0  # the conditioning frame's error is huge but masked out
    mask = torch.tensor([0.0, 1.0, 1.0]).view(1, 1, 3, 1, 1)
    assert float(flow_matching_loss(pred, target, loss_mask=mask)) == 1.0
    assert float(flow_matching_loss(pred, target)) == pytest.approx((2 * 100 + 4) / 6)
    weights = torch.tensor([1.0, 4.0, 1.0]).view(1, 1, 3, 1, 1)
    assert float(flow_matching_loss(pred, target, loss_mask=mask, weights=weights)) == 2.5
    with pytest.raises(ValueError, match="differ in shape"):
        flow_matching_loss(pred, target[:, :1])


def test_first_frame_conditioning_gives_timestep_zero_and_no_loss_to_frame_zero():
    frame_sigma, mask = first_frame_conditioning(torch.tensor([0.4, 0.9]), 3)
    assert torch.equal(NUM_TRAIN_TIMESTEPS * frame_sigma,
                       torch.tensor([[0.0, 400.0, 400.0], [0.0, 900.0, 900.0]]))
    assert mask.shape == (2, 1, 3, 1, 1) and mask[:, :, 0].sum() == 0 and mask[:, :, 1:].sum() == 4


def test_sigma_buckets_sum_and_count_every_bucket():
    metrics = sigma_bucket_metrics(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64),
                                   torch.tensor([0.1, 0.2, 1.0]))
    assert metrics["loss_by_sigma/0.00-0.25"].tolist() == [3.0, 2.0]
    assert metrics["loss_by_sigma/0.75-1.00"].tolist() == [4.0, 1.0]
    assert metrics["loss_by_sigma/0.25-0.50"].tolist() == [0.0, 0.0]
