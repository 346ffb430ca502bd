"""vidartrain/losses.py: flow matching (Eq. 1) in the project's one convention (data x_1, noise x_0,
x = (1-s) x_1 + s x_0), the Eq. 6 / Eq. 7 losses of stage 2 (the eta = 0 identity, values, context
frames, mask regions), and the IDM loss (Eq. 4) with the paper's action accuracy, against
hand-computed values."""
import math

import pytest
import torch

from vidartrain.losses import (NUM_TRAIN_TIMESTEPS, action_accuracy, add_noise, embodiment_weights,
                               flow_matching_loss, flow_matching_target, idm_loss, mask_region_losses,
                               per_frame_flow_matching_loss, sample_sigmas, shift_sigma)
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


def test_idm_loss_hand_example_uses_both_huber_branches_and_the_soft_mask_mean():
    mean = torch.tensor([1.0, -1.0])
    std = torch.tensor([2.0, 0.5])
    pred = torch.tensor([[2.0, -1.0], [1.0, 0.0]])
    target = torch.tensor([[1.0, -1.0], [-3.0, -1.0]])
    soft_mask = torch.tensor([[[[0.2, 0.6], [1.0, 0.2]]]])  # mean 0.5
    loss, action_loss, mask_loss = idm_loss(pred, target, soft_mask, mean, std, mask_weight=0.01)
    # Normalised differences: (2-1)/2 = 0.5, 0, (1-(-3))/2 = 2, (0-(-1))/0.5 = 2.
    # SmoothL1 (beta 1): 0.5 * 0.5^2 = 0.125, 0, 2 - 0.5 = 1.5, 1.5 -> mean 3.125 / 4.
    assert action_loss.item() == pytest.approx(0.78125, abs=1e-7)
    assert mask_loss.item() == pytest.approx(0.005, abs=1e-9)
    assert loss.item() == pytest.approx(0.78625, abs=1e-7)

    with pytest.raises(ValueError, match="differ in shape"):
        idm_loss(pred, target[:1], soft_mask, mean, std)


def test_idm_loss_default_mask_weight_is_3e_3():
    zeros = torch.zeros(1, 3)
    _, action_loss, mask_loss = idm_loss(zeros, zeros, torch.ones(1, 1, 2, 2), zeros[0], zeros[0] + 1)
    assert action_loss.item() == 0
    assert mask_loss.item() == pytest.approx(3e-3)


def test_idm_loss_gradient_reaches_the_soft_mask():
    soft_mask = torch.full((2, 1, 3, 3), 0.5, requires_grad=True)
    pred = torch.zeros(2, 4, requires_grad=True)
    loss, _, _ = idm_loss(pred, torch.ones(2, 4), soft_mask, torch.zeros(4), torch.ones(4))
    loss.backward()
    torch.testing.assert_close(soft_mask.grad, torch.full_like(soft_mask, 3e-3 / 18))
    # d/dpred of mean SmoothL1 at difference -1 (the |d| - 0.5 branch): -1 / 8 each.
    torch.testing.assert_close(pred.grad, torch.full_like(pred, -1 / 8))


def test_action_accuracy_counts_linf_within_joint_and_gripper_tolerances():
    target = torch.zeros(4, 14)
    pred = target.clone()
    pred[0, 0] = 0.05            # joints within 0.06, grippers exact -> right
    pred[1, 3] = 0.07            # one joint off by more than 0.06 -> wrong
    pred[2, 6] = 0.59            # gripper (dim 6) within 0.6 -> right
    pred[2, 13] = -0.5           # gripper (dim 13) within 0.6 -> right
    pred[3, 13] = 0.61           # gripper off by more than 0.6 -> wrong
    assert action_accuracy(pred, target).item() == pytest.approx(0.5)
    # With grippers at dims 0 and 7, sample 0's 0.05 passes as a gripper and sample 2's 0.59 on
    # dim 6 is now a joint error; sample 3's dim 13 as well.
    assert action_accuracy(pred, target, gripper_dims=(0, 7)).item() == pytest.approx(0.25)
    assert action_accuracy(pred, target, joint_tol=1.0, gripper_tol=1.0).item() == 1.0


def test_action_accuracy_rejects_bad_input():
    with pytest.raises(ValueError, match="one shape"):
        action_accuracy(torch.zeros(2, 14), torch.zeros(2, 7))
    with pytest.raises(ValueError, match="outside the 7 action dimensions"):
        action_accuracy(torch.zeros(2, 7), torch.zeros(2, 7))
