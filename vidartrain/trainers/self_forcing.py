"""Stage 2 (Vidarc): the causal DiT trained with causal flow matching (Eq. 6) and the
embodiment-aware weight (Eq. 7), with ground-truth, self-generated or closed-loop context.

One training sample is a window of `chunk_size` consecutive latent frames of a clip. Frame 0 of the
window is clean context (timestep 0, no loss); every later frame i gets its own noise level and is
predicted from clean (or self-generated) frames < i plus itself:

- ground_truth  one forward over [clean | noisy] with a block-causal mask (teacher forcing); the
                published method and the default.
- self_generated  sequential rollout through the KV cache: each frame's context is the model's own
                few-step prediction of the previous frames, as at inference (self-forcing).
- mixed         self_generated with probability `self_generated_prob`, else ground_truth; the
                choice is one coin per step, shared by all ranks.
- closed_loop   (option) the deployed controller's schedule: prefill real frames, predict chunks of
                4 latent frames, pop them and prefill the real ones, reset the window when it would
                pass `rollout_bound` video frames.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from vidartrain.losses import add_noise, flow_matching_target, sample_sigmas, shift_sigma

# The deployed controller generates this many latent frames (16 video frames) per call.
DEPLOYED_CHUNK_LATENT_FRAMES = 4
# The VAE's temporal stride: latent frame 0 is video frame 0, each later one 4 video frames.
VAE_TEMPORAL_STRIDE = 4


# ---------------------------------------------------------------------------------------------
# One training window: which latent frames, which noise levels, which frames are context
# ---------------------------------------------------------------------------------------------

@dataclass
class CausalWindow:
    """`chunk_size` consecutive latent frames of a batch, noised frame by frame.

    clean, noise, noisy, target: [B, C, n, H, W]; sigmas: [B, n] float32 with 0 on the context
    frame; loss_mask: [1, 1, n, 1, 1] (0 on context frames, as `flow_matching_loss` takes it);
    start: absolute latent index of the window's first frame (its RoPE position); mask: the
    latent-grid IDM mask of the window [B, n, H, W], or None without Eq. 7.
    """

    clean: torch.Tensor
    noise: torch.Tensor
    sigmas: torch.Tensor
    noisy: torch.Tensor
    target: torch.Tensor
    loss_mask: torch.Tensor
    start: int
    mask: torch.Tensor | None

    @property
    def num_frames(self) -> int:
        return self.clean.shape[2]

    @property
    def timesteps(self) -> torch.Tensor:
        """Model timesteps [B, n] = 1000 * sigma (0 on the context frame)."""
        return self.sigmas * 1000.0


def prepare_causal_window(latents: torch.Tensor, chunk_size: int, shift: float,
                          generator: torch.Generator, mask: torch.Tensor | None = None,
                          num_context_frames: int = 1) -> CausalWindow:
    """Pick a random window of `chunk_size` latent frames and noise each of its frames on its own.

    latents: clean [B, C, F, H, W] with F >= chunk_size; mask: IDM mask on the same latent grid
    [B, F, H, W] (cut to the same window). The first `num_context_frames` frames stay clean
    (sigma 0) and carry no loss; the others get independent shifted sigmas. All randomness comes
    from `generator`, so a resumed run draws the same windows and noise.
    """
    if latents.ndim != 5:
        raise ValueError(f"stage 2 expects latents [B, C, F, H, W], got {tuple(latents.shape)}")
    batch, _, frames, height, width = latents.shape
    if not 1 <= num_context_frames < chunk_size:
        raise ValueError(f"num_context_frames = {num_context_frames} must be in [1, chunk_size = "
                         f"{chunk_size}): at least one frame is context and one is predicted")
    if frames < chunk_size:
        raise ValueError(f"the batch has {frames} latent frames, fewer than self_forcing.chunk_size = "
                         f"{chunk_size} (raise data.num_frames or lower the chunk size)")
    if mask is not None and mask.shape != (batch, frames, height, width):
        raise ValueError(f"IDM mask {tuple(mask.shape)} does not match the latent grid "
                         f"{(batch, frames, height, width)}")
    start = int(torch.randint(frames - chunk_size + 1, (1,), generator=generator))
    clean = latents[:, :, start:start + chunk_size]
    noise = torch.randn(clean.shape, generator=generator, dtype=torch.float32).to(clean)
    sigmas = sample_sigmas((batch, chunk_size), shift, generator=generator).to(clean.device)
    sigmas[:, :num_context_frames] = 0.0
    loss_mask = torch.ones(1, 1, chunk_size, 1, 1, device=clean.device)
    loss_mask[:, :, :num_context_frames] = 0.0
    return CausalWindow(clean=clean, noise=noise, sigmas=sigmas, noisy=add_noise(clean, noise, sigmas),
                        target=flow_matching_target(clean, noise), loss_mask=loss_mask, start=start,
                        mask=None if mask is None else mask[:, start:start + chunk_size])


# ---------------------------------------------------------------------------------------------
# Few-step sampler for self-generated context
# ---------------------------------------------------------------------------------------------

def sampling_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """Sigmas 1 -> 0 in `num_steps` Euler steps, evenly spaced then shifted as Wan's sampler does:
    [num_steps + 1] float32, first 1, last 0."""
    if num_steps < 1:
        raise ValueError(f"the sampler needs at least one step, got {num_steps}")
    return shift_sigma(torch.linspace(1.0, 0.0, num_steps + 1), shift)


@torch.no_grad()
def euler_sample(velocity: Callable[[torch.Tensor, float], torch.Tensor], noise: torch.Tensor,
                 sigmas: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Integrate the flow from noise (sigma = sigmas[0]) to data (sigmas[-1]) with Euler steps.

    With x = (1 - sigma) x_1 + sigma x_0 the velocity is dx/dsigma = x_0 - x_1, so one step is
    x <- x + (sigma_next - sigma) * v(x, sigma). `velocity(x, sigma)` is the model's prediction at
    noise level sigma (timestep 1000 * sigma).
    """
    sigmas = [float(s) for s in sigmas]
    x = noise
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (sigma_next - sigma) * velocity(x, sigma).to(x.dtype)
    return x


# ---------------------------------------------------------------------------------------------
# The deployed controller's closed-loop schedule, in latent frames
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RolloutEvent:
    """One operation of a closed-loop rollout over a window's latent frames.

    reset:    clear the KV cache; positions restart at 0 (the controller starts a fresh video).
    prefill:  write clean real frames `frames` into the cache at RoPE positions from `position`.
    predict:  noisy frames `frames` at positions from `position` attend to the cache, carry the
              loss, and are popped again (the controller then prefills the real frames).
    """

    kind: Literal["reset", "prefill", "predict"]
    frames: range
    position: int


def video_frames_of(latent_frames: int) -> int:
    """Video frames that `latent_frames` latent frames stand for (1 + 4k -> 1 + k)."""
    return 1 + VAE_TEMPORAL_STRIDE * (latent_frames - 1)


def latent_frames_of(video_frames: int) -> int:
    """Latent frames of `video_frames` video frames: the first alone, then groups of 4 (rounded up)."""
    return 1 + -(-(video_frames - 1) // VAE_TEMPORAL_STRIDE)


def closed_loop_schedule(num_frames: int, rollout_bound: int, rollout_prefill_num: int,
                         chunk: int = DEPLOYED_CHUNK_LATENT_FRAMES) -> list[RolloutEvent]:
    """The deployed controller's loop over `num_frames` latent frames, as a list of events.

    It starts from the first real frame, then repeatedly predicts the next `chunk` latent frames
    (fewer at the end), pops them and prefills the real ones at the same positions. Before a
    prediction that would make the window longer than `rollout_bound` video frames (the
    controller's `num_conditional_frames + num_new_frames > rollout_bound`), the cache is cleared
    and the last `rollout_prefill_num` real video frames are prefilled from position 0.
    """
    if num_frames < 2:
        raise ValueError(f"a closed-loop rollout needs at least 2 latent frames, got {num_frames}")
    if rollout_prefill_num > rollout_bound:
        raise ValueError(f"rollout_prefill_num = {rollout_prefill_num} exceeds rollout_bound = {rollout_bound}")
    prefill_latents = latent_frames_of(rollout_prefill_num)
    events = [RolloutEvent("reset", range(0, 0), 0), RolloutEvent("prefill", range(0, 1), 0)]
    window_start, next_frame = 0, 1
    while next_frame < num_frames:
        new = min(chunk, num_frames - next_frame)
        window_video_frames = video_frames_of(next_frame - window_start)
        if window_video_frames + VAE_TEMPORAL_STRIDE * new > rollout_bound:
            window_start = max(0, next_frame - prefill_latents)
            events += [RolloutEvent("reset", range(0, 0), 0),
                       RolloutEvent("prefill", range(window_start, next_frame), 0)]
        predicted = range(next_frame, next_frame + new)
        position = next_frame - window_start
        events += [RolloutEvent("predict", predicted, position),
                   RolloutEvent("prefill", predicted, position)]
        next_frame += new
    return events
