"""IDM loss (Eq. 4) and the paper's action accuracy, against hand-computed values."""
import pytest
import torch

from vidartrain.losses import action_accuracy, idm_loss


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
