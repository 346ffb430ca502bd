"""Training losses of the Vidar models; each a self-contained function of tensors."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# Masked inverse dynamics model (Eq. 4)
# ---------------------------------------------------------------------------------------------

def idm_loss(actions_pred: torch.Tensor, actions_target: torch.Tensor, soft_mask: torch.Tensor,
             train_mean: torch.Tensor, train_std: torch.Tensor, mask_weight: float = 3e-3
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 4: Huber(a_hat - a) + lambda * ||m||_1, returned as (loss, action_loss, mask_loss).

    Both actions [B, A] are normalised with the IDM's own statistics, (a - mean) / std, before a
    SmoothL1 loss (beta 1, mean over all B x A values), as `train_idm.py --use_normalization` does;
    the mask term is `mask_weight` times the mean of the soft mask (it pushes the mask towards 0,
    i.e. towards looking at as few pixels as possible).
    """
    if actions_pred.shape != actions_target.shape:
        raise ValueError(f"idm_loss: predicted actions {tuple(actions_pred.shape)} and target "
                         f"actions {tuple(actions_target.shape)} differ in shape")
    action_loss = F.smooth_l1_loss((actions_pred - train_mean) / train_std,
                                   (actions_target - train_mean) / train_std, beta=1.0)
    mask_loss = mask_weight * soft_mask.mean()
    return action_loss + mask_loss, action_loss, mask_loss


def action_accuracy(pred: torch.Tensor, target: torch.Tensor, joint_tol: float = 0.06,
                    gripper_tol: float = 0.6, gripper_dims: Sequence[int] = (6, 13)) -> torch.Tensor:
    """Fraction of samples whose action is right, as the paper counts it: the max abs error
    (L-infinity) over the joint dimensions is below `joint_tol` and over the gripper dimensions
    below `gripper_tol`. pred, target: de-normalised actions [B, A]; returns a 0-dim tensor."""
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(f"action_accuracy expects pred and target [B, A] of one shape, got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")
    num_dims = pred.shape[1]
    if any(not 0 <= d < num_dims for d in gripper_dims):
        raise ValueError(f"action_accuracy: gripper_dims {tuple(gripper_dims)} outside the "
                         f"{num_dims} action dimensions")
    is_gripper = torch.zeros(num_dims, dtype=torch.bool, device=pred.device)
    is_gripper[list(gripper_dims)] = True
    error = (pred - target).abs()
    # Errors are >= 0, so zeroing the other group's dimensions leaves each group's maximum.
    joints_ok = error.masked_fill(is_gripper, 0).amax(dim=1) < joint_tol
    grippers_ok = error.masked_fill(~is_gripper, 0).amax(dim=1) < gripper_tol
    return (joints_ok & grippers_ok).float().mean()


# ---------------------------------------------------------------------------------------------
# Flow matching (Eq. 1), one convention everywhere (docs/conventions.md):
#   data x_1, noise x_0 ~ N(0, I), noisy x = (1 - sigma) x_1 + sigma x_0,
#   model timestep = 1000 * sigma, target velocity v = x_0 - x_1.
# ---------------------------------------------------------------------------------------------

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan's timestep shift sigma' = s*sigma / (1 + (s-1)*sigma); s > 1 moves mass towards noise."""
    if shift <= 0:
        raise ValueError(f"shift_sigma: shift must be > 0, got {shift}")
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def sample_sigmas(shape: Sequence[int] | int, shift: float, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Training sigmas: uniform in [0, 1), then shifted; float32 of the given shape."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    uniform = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    return shift_sigma(uniform, shift)


def _broadcast_sigma(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """sigma [B] or [B, F] -> a view that broadcasts over latents [B, C, F, H, W]."""
    if sigma.dim() == 1:
        return sigma.view(-1, *([1] * (like.dim() - 1)))
    if sigma.dim() == 2 and like.dim() == 5 and sigma.shape[1] == like.shape[2]:
        return sigma[:, None, :, None, None]
    raise ValueError(f"sigma of shape {tuple(sigma.shape)} does not match latents {tuple(like.shape)}: "
                     f"expected [B] or [B, F]")


def add_noise(clean: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x = (1 - sigma) x_1 + sigma x_0 with sigma per sample [B] or per latent frame [B, F]."""
    if clean.shape != noise.shape:
        raise ValueError(f"add_noise: clean {tuple(clean.shape)} and noise {tuple(noise.shape)} differ in shape")
    s = _broadcast_sigma(sigma, clean).to(clean.dtype)
    return (1.0 - s) * clean + s * noise


def flow_matching_target(clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Target velocity v = x_0 - x_1 (noise minus data)."""
    return noise - clean


def context_frame_mask(batch: int, num_frames: int, num_context_frames: int, device: torch.device) -> torch.Tensor:
    """Loss mask [batch, 1, num_frames, 1, 1]: 0 on the first `num_context_frames` frames (clean
    conditioning: stage 1's first frame, stage 2's window context), 1 on the frames predicted."""
    mask = torch.ones(batch, 1, num_frames, 1, 1, device=device)
    mask[:, :, :num_context_frames] = 0.0
    return mask


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor, loss_mask: torch.Tensor | None = None,
                       weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared velocity error in float32 over the elements the loss counts.

    loss_mask (0/1, broadcast against pred, e.g. [B, 1, F, 1, 1] with 0 on conditioning frames)
    selects the elements averaged over, so masked frames neither count nor dilute the mean.
    weights (broadcast against pred, e.g. Eq. 7's (1 + eta*U)^2) multiply the squared error.
    """
    if pred.shape != target.shape:
        raise ValueError(f"flow_matching_loss: prediction {tuple(pred.shape)} and target "
                         f"{tuple(target.shape)} differ in shape")
    error = (pred.float() - target.float()).pow(2)
    if weights is not None:
        error = error * weights.float()
    if loss_mask is None:
        return error.mean()
    mask = loss_mask.float().expand_as(error)
    return (error * mask).sum() / mask.sum().clamp_min(1.0)


# ---------------------------------------------------------------------------------------------
# Causal and embodiment-aware flow matching (Eq. 6, Eq. 7): `flow_matching_loss` with a loss mask
# that leaves out the clean context frames (Eq. 6) and, for Eq. 7, `embodiment_weights`.
# ---------------------------------------------------------------------------------------------

def embodiment_weights(mask_latent: torch.Tensor, eta: float) -> torch.Tensor:
    """Eq. 7 weights on the squared error: (1 + eta * U)^2, float32 [B, 1, F, H, W].

    Eq. 7 puts (1 + eta * U) inside the norm, ||(1 + eta U) * (v_pred - v)||^2, which is the squared
    error weighted by (1 + eta U)^2 (the `weights` of `flow_matching_loss`); eta = 0 gives weights of
    exactly 1, i.e. Eq. 6. mask_latent: the IDM soft mask of the clean frames pooled to the latent
    grid, [B, F, H, W] in [0, 1] (`vidartrain.models.idm.pool_mask_to_latent`); the result
    broadcasts over the latent channels.
    """
    if mask_latent.ndim != 4:
        raise ValueError(f"embodiment_weights expects a latent-grid mask [B, F, H, W], got "
                         f"{tuple(mask_latent.shape)}")
    return (1.0 + eta * mask_latent.float()).square().unsqueeze(1)


def per_frame_flow_matching_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Unweighted squared velocity error of each latent frame, averaged over the batch: [F].
    Logged per rollout position (frame index within the stage-2 window)."""
    if pred.shape != target.shape or pred.ndim != 5:
        raise ValueError(f"per_frame_flow_matching_loss: expected two latents [B, C, F, H, W] of one "
                         f"shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    return (pred.float() - target.float()).square().mean(dim=(0, 1, 3, 4))


def mask_region_losses(pred: torch.Tensor, target: torch.Tensor, mask_latent: torch.Tensor,
                       loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unweighted squared velocity error inside and outside the IDM mask, on the frames with loss.

    pred, target: [B, C, F, H, W]; mask_latent: soft mask U [B, F, H, W]; loss_mask: 0/1
    broadcastable to [B, 1, F, H, W] (as for `flow_matching_loss`). With e the error averaged over
    channels: inside = sum(U e) / sum(U), outside = sum((1 - U) e) / sum(1 - U). A region with no
    weight at all (U all 0 or all 1 on those frames) gives NaN rather than a made-up number.
    """
    if pred.shape != target.shape or pred.ndim != 5:
        raise ValueError(f"mask_region_losses: expected two latents [B, C, F, H, W] of one shape, got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")
    batch, _, frames, height, width = pred.shape
    if mask_latent.shape != (batch, frames, height, width):
        raise ValueError(f"mask_region_losses: mask {tuple(mask_latent.shape)} does not match the "
                         f"latent grid {(batch, frames, height, width)}")
    error = (pred.float() - target.float()).square().mean(dim=1, keepdim=True)  # [B, 1, F, H, W]
    selected = loss_mask.float().expand_as(error)
    inside = mask_latent.float().unsqueeze(1) * selected
    outside = selected - inside
    return (inside * error).sum() / inside.sum(), (outside * error).sum() / outside.sum()
