"""Stage-2 pieces that need no model: window preparation, sampler sigmas, closed-loop schedule."""
import pytest
import torch

from vidartrain.errors import ConfigError
from vidartrain.losses import shift_sigma
from vidartrain.rollouts import RolloutEvent, RolloutWindow, closed_loop_schedule, sampling_sigmas
from vidartrain.trainers.self_forcing import choose_context, prepare_causal_window


def test_window_keeps_context_clean_and_noises_each_frame_on_its_own():
    latents = torch.randn(2, 4, 6, 2, 2)
    window = prepare_causal_window(latents, window_frames=4, shift=3.0, generator=torch.Generator().manual_seed(0))
    assert window.clean.shape == (2, 4, 4, 2, 2) and window.sigmas.shape == (2, 4)
    torch.testing.assert_close(window.clean, latents[:, :, window.start:window.start + 4])
    assert torch.all(window.sigmas[:, 0] == 0) and torch.all(window.sigmas[:, 1:] > 0)
    assert window.sigmas[:, 1:].unique().numel() == 6  # independent per sample and frame
    assert torch.equal(window.noisy[:, :, 0], window.clean[:, :, 0])
    sigma = window.sigmas[1, 2]
    torch.testing.assert_close(window.noisy[1, :, 2], (1 - sigma) * window.clean[1, :, 2] + sigma * window.noise[1, :, 2])
    torch.testing.assert_close(window.target, window.noise - window.clean)
    assert window.loss_mask.flatten().tolist() == [0.0, 1.0, 1.0, 1.0]
    torch.testing.assert_close(window.timesteps, window.sigmas * 1000)


def test_window_draws_are_reproducible_and_cover_every_start():
    latents = torch.randn(1, 2, 5, 2, 2)
    first = prepare_causal_window(latents, 3, 3.0, torch.Generator().manual_seed(7))
    again = prepare_causal_window(latents, 3, 3.0, torch.Generator().manual_seed(7))
    assert first.start == again.start and torch.equal(first.noisy, again.noisy)
    generator = torch.Generator().manual_seed(1)
    starts = {prepare_causal_window(latents, 3, 3.0, generator).start for _ in range(40)}
    assert starts == {0, 1, 2}


def test_window_rejects_what_cannot_work():
    with pytest.raises(ConfigError, match="fewer than self_forcing.window_frames"):
        prepare_causal_window(torch.randn(1, 2, 2, 2, 2), 3, 3.0, torch.Generator())
    with pytest.raises(ValueError, match="num_context_frames"):
        prepare_causal_window(torch.randn(1, 2, 4, 2, 2), 3, 3.0, torch.Generator(), num_context_frames=3)


def test_sampler_sigmas_are_shifted_and_end_before_zero():
    sigmas = sampling_sigmas(4, shift=5.0)
    assert len(sigmas) == 4 and sigmas[0] == 1.0
    assert sigmas == pytest.approx(shift_sigma(torch.linspace(1, 0, 5), 5.0)[:-1].tolist())
    assert sigmas == sorted(sigmas, reverse=True) and sigmas[-1] > 0
    with pytest.raises(ValueError, match="at least one step"):
        sampling_sigmas(0, 5.0)


def test_context_choice_single_process():
    generator = torch.Generator().manual_seed(0)
    assert choose_context("ground_truth", 1.0, generator) == "ground_truth"
    assert choose_context("self_generated", 0.0, generator) == "self_generated"
    draws = [choose_context("mixed", 0.3, generator) for _ in range(400)]
    assert 0.2 < draws.count("self_generated") / 400 < 0.4
    assert {choose_context("mixed", 1.0, generator) for _ in range(20)} == {"self_generated"}
    with pytest.raises(ValueError, match="context_mode"):
        choose_context("teacher", 0.5, generator)


def test_closed_loop_schedule_follows_the_deployed_controller():
    # Deployed values: rollout_bound 60, rollout_prefill_num 33 (9 latent frames), chunks of 4.
    events = closed_loop_schedule(21, RolloutWindow(rollout_bound=60, rollout_prefill_num=33))
    compact = [(e.kind, e.frames.start, e.frames.stop, e.position) for e in events]
    assert compact == [
        ("prefill", 0, 1, 0),
        ("predict", 1, 5, 1), ("prefill", 1, 5, 1),      # window 1 + 16 = 17 video frames
        ("predict", 5, 9, 5), ("prefill", 5, 9, 5),      # 33
        ("predict", 9, 13, 9),                           # 49; next 49 + 16 = 65 > 60: reset
        ("reprefill", 4, 13, 0),                         # the last 33 real video frames
        ("predict", 13, 17, 9),                          # 33 + 16 = 49
        ("reprefill", 8, 17, 0),                         # 49 + 16 > 60: reset again
        ("predict", 17, 21, 9),
    ]  # a prefill that no prediction reads (the window is reset, or the rollout ends) is left out
    predicted = [i for e in events if e.kind == "predict" for i in e.frames]
    assert predicted == list(range(1, 21))  # every frame but the first is predicted exactly once


def test_closed_loop_schedule_short_window_and_errors():
    window = RolloutWindow(rollout_bound=60, rollout_prefill_num=33)
    assert closed_loop_schedule(3, window) == [RolloutEvent("prefill", range(0, 1), 0),
                                               RolloutEvent("predict", range(1, 3), 1)]
    # A small window: bound 20, prefill 5 video frames (2 latent frames), chunks of 4.
    events = closed_loop_schedule(9, RolloutWindow(rollout_bound=20, rollout_prefill_num=5))
    assert [(e.kind, e.frames.start, e.frames.stop, e.position) for e in events] == [
        ("prefill", 0, 1, 0),
        ("predict", 1, 5, 1),                            # 1 + 16 <= 20
        ("reprefill", 3, 5, 0), ("predict", 5, 9, 2)]    # 17 + 16 > 20
    with pytest.raises(ValueError, match="at least 2 latent frames"):
        closed_loop_schedule(1, window)
