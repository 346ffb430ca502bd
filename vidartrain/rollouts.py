"""Every rollout of the causal DiT through its KV cache: stage-2 training and Vidarc generation.

`WanModelCausal` computes (`forward`, `forward_with_cache`, `forward_teacher_forcing`, `prefill`);
this module decides which frames go through it in which order:

- `teacher_forcing_step`: one chunk of [clean | noisy] frames against the cache, whose clean
  frames are then kept (with or without their gradient);
- `rollout`: the stage-2 computation chunk by chunk, `frames_per_chunk` latent frames at a time,
  with ground-truth or self-generated context (`ContextMode`; the configuration's `mixed` picks
  one of the two per micro-step);
- `self_generated_context`: a chunk's context as the deployed model would see it, generated
  frame by frame with `generate_frames`;
- `RolloutWindow`, `closed_loop_schedule`, `closed_loop_rollout`, `reset_and_reprefill`: the
  deployed controller's window policy and loop, for training and for sampling.

Window vs chunk: stage 2 trains on a window of `self_forcing.window_frames` latent frames; the
deployed controller generates `DEPLOYED_FRAMES_PER_CHUNK` latent frames per call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from vidartrain.losses import shift_sigma
from vidartrain.shapes import MIN_CAUSAL_LATENT_FRAMES
from vidartrain.models.wan.causal import WanModelCausal
from vidartrain.models.wan.kv_cache import (DEPLOYED_FRAMES_PER_CHUNK, VAE_TEMPORAL_STRIDE, KVCache, StaticKVCache,
                                            latent_frames_of, video_frames_of)

# Where the context written into the cache comes from (`self_forcing.context_mode`, after `mixed`
# has picked one of them).
ContextMode = Literal["ground_truth", "self_generated"]
CONTEXT_MODES: tuple[ContextMode, ...] = ("ground_truth", "self_generated")


# ---------------------------------------------------------------------------------------------
# Generation and the sequential (self-forcing) rollout
# ---------------------------------------------------------------------------------------------

def sampling_sigmas(num_steps: int, shift: float) -> list[float]:
    """Noise levels of the few-step sampler that makes self-generated context: `num_steps` Euler
    steps from sigma 1 towards 0, evenly spaced then shifted as Wan's sampler does (the final 0 is
    implied, as `generate_frames` takes them)."""
    if num_steps < 1:
        raise ValueError(f"the sampler needs at least one step, got {num_steps}")
    return shift_sigma(torch.linspace(1.0, 0.0, num_steps + 1), shift)[:-1].tolist()


class StaticGenerationStep:
    """Generation through a `StaticKVCache` at static shapes (`WanModelCausal.forward_static`):
    `velocity` is a denoising call, `prefill` the same call at t = 0 whose keys and values the cache
    then keeps (`StaticKVCache.commit`, no second forward). The cache's fill, the RoPE positions and
    the timesteps enter as tensors, so with `compile_options` (keyword arguments of torch.compile,
    e.g. {"mode": "reduce-overhead"} for CUDA graphs) the step compiles once per chunk shape and
    serves every frame. The first prefill of a cache stays `WanModelCausal.prefill` (it allocates
    the buffers); so do prefills of a different number of frames, which would compile anew."""

    def __init__(self, model: WanModelCausal, compile_options: dict | None = None):
        if model.sequence_parallel is not None:
            raise ValueError("StaticGenerationStep does not run under sequence parallelism; "
                             "generate with forward_with_cache there")
        self.model = model
        self.forward = model.forward_static if compile_options is None else torch.compile(
            model.forward_static, fullgraph=True, dynamic=False, **compile_options)

    def velocity(self, x: torch.Tensor, t: torch.Tensor | float, text: list, cache: StaticKVCache,
                 positions: Sequence[int] | None = None) -> torch.Tensor:
        """Velocity of frames x against the cache (their keys are not kept), as
        `forward_with_cache(x, t, text, cache, positions=positions)`."""
        return self._run(x, t, text, cache, self._positions(x, cache, positions))

    def prefill(self, clean: torch.Tensor, text: list, cache: StaticKVCache,
                positions: Sequence[int] | None = None) -> StaticKVCache:
        """Append clean frames (t = 0), as `WanModelCausal.prefill`."""
        positions = self._positions(clean, cache, positions)
        self._run(clean, 0.0, text, cache, positions)
        return cache.commit(positions)

    def _positions(self, x: torch.Tensor, cache: StaticKVCache, positions: Sequence[int] | None) -> list[int]:
        frames = self.model.token_grid(x)[0]
        positions = list(range(cache.next_position, cache.next_position + frames)) if positions is None \
            else list(positions)
        if len(positions) != frames:
            raise ValueError(f"{len(positions)} positions given for {frames} frames")
        return positions

    @torch.no_grad()
    def _run(self, x: torch.Tensor, t: torch.Tensor | float, text: list, cache: StaticKVCache,
             positions: list[int]) -> torch.Tensor:
        self.model._check_latents(x, "x")
        if not isinstance(cache, StaticKVCache) or not cache.keys:
            raise ValueError("StaticGenerationStep needs a StaticKVCache whose buffers exist: prefill its first "
                             "frames with WanModelCausal.prefill")
        if not (isinstance(text, list) and text and isinstance(text[0], tuple)):
            raise ValueError("StaticGenerationStep takes the text as WanModelCausal.text_key_values(context)")
        grid = self.model.token_grid(x)
        cache.check_frame_grid(grid[1:])
        frame_tokens = grid[1] * grid[2]
        start, slots = cache.cached_tokens(), cache.keys[0].shape[2]
        if start + grid[0] * frame_tokens > slots:
            raise RuntimeError(f"StaticKVCache: {grid[0] * frame_tokens} new tokens do not fit after {start} cached "
                               f"ones in a buffer of {slots} (capacity {cache.capacity} + scratch "
                               f"{cache.scratch_frames} frames): raise scratch_frames")
        device = x.device
        # Contiguous inputs: one memory layout, one graph (a chunk of a larger tensor, or one
        # timestep expanded to every frame, is strided, and the compiled graph guards on strides).
        velocity = self.forward(
            x.contiguous(), self.model.frame_timesteps(t, x.shape[0], grid).contiguous(),
            torch.tensor(positions, device=device), text, cache.keys, cache.values,
            torch.tensor(start, device=device))
        # CUDA graphs overwrite their outputs at the next replay: the caller keeps a copy.
        return velocity.clone()


@torch.no_grad()
def generate_frames(model: WanModelCausal, noise: torch.Tensor, text, cache: KVCache,
                    sigmas: Sequence[float], step: StaticGenerationStep | None = None) -> torch.Tensor:
    """Few-step Euler sampling of new frames against the cache (not appended): from pure noise at
    sigmas[0] down to 0; flow x_sigma = (1 - sigma) x_1 + sigma x_0, velocity x_0 - x_1. With
    `step` (a StaticKVCache and precomputed text) every call goes through it instead of
    `forward_with_cache`."""
    x = noise
    positions = list(range(cache.next_position, cache.next_position + noise.shape[2]))
    for sigma, next_sigma in zip(sigmas, list(sigmas[1:]) + [0.0]):
        if step is None:
            velocity, _ = model.forward_with_cache(x, 1000.0 * sigma, text, cache, positions=positions)
        else:
            velocity = step.velocity(x, 1000.0 * sigma, text, cache, positions)
        x = x + (next_sigma - sigma) * velocity
    return x


def teacher_forcing_step(model: WanModelCausal, clean: torch.Tensor, noisy: torch.Tensor, t_noisy: torch.Tensor,
                         text, cache: KVCache, cache_grad: bool) -> torch.Tensor:
    """Teacher forcing for one chunk against the cache; appends the chunk's clean frames, keeping
    the gradient of the cached keys/values only with `cache_grad`."""
    velocity = model.forward_teacher_forcing(clean, noisy, t_noisy, text, cache=cache)
    if not cache_grad:
        cache.detach()
    return velocity


def rollout(model: WanModelCausal, clean: torch.Tensor, noisy: torch.Tensor, t_noisy: torch.Tensor, context,
            frames_per_chunk: int = 1, context_mode: ContextMode = "ground_truth", num_ground_truth_frames: int = 1,
            cache_grad: bool = False, kv_cache_length: int | None = None, sink: int = 0,
            sigmas: Sequence[float] = (1.0, 0.75, 0.5, 0.25),
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Stage-2 sequential rollout: velocities of all noisy frames [B, C, F, H, W], computed
    `frames_per_chunk` frames at a time through a KV cache like inference.

    Each chunk's noisy frames see the cached context and, as in teacher forcing, the chunk's own
    context frames before them. The context written into the cache is the ground truth `clean`
    (context_mode "ground_truth", or for the first `num_ground_truth_frames` frames) or the
    model's own few-step generation (no gradient) from noise with `sigmas` ("self_generated").
    Cache writes carry gradients only with `cache_grad` (then ground-truth rollout equals
    `forward_teacher_forcing` in loss and gradients). `kv_cache_length` bounds the cache (oldest
    frames evicted, `sink` first frames kept); default: the whole sequence fits.
    """
    if context_mode not in CONTEXT_MODES:
        raise ValueError(f"context_mode must be one of {', '.join(CONTEXT_MODES)}, got {context_mode!r}")
    if frames_per_chunk < 1:
        raise ValueError(f"frames_per_chunk must be >= 1, got {frames_per_chunk}")
    frames = clean.shape[2]
    t_noisy = model.frame_timesteps(t_noisy, clean.shape[0], model.token_grid(clean))
    cache = KVCache(model.num_layers, capacity=kv_cache_length or frames, sink=sink,
                    evict_oldest=kv_cache_length is not None)
    text = model.text_key_values(context)
    velocities = []
    for start in range(0, frames, frames_per_chunk):
        stop = min(start + frames_per_chunk, frames)
        chunk_context = clean[:, :, start:stop]
        if context_mode == "self_generated" and stop > num_ground_truth_frames:
            chunk_context = self_generated_context(model, chunk_context, start, num_ground_truth_frames,
                                                   text, cache, sigmas, generator)
        velocities.append(teacher_forcing_step(model, chunk_context, noisy[:, :, start:stop],
                                               t_noisy[:, start:stop], text, cache, cache_grad))
    return torch.cat(velocities, dim=2)


def self_generated_context(model: WanModelCausal, ground_truth: torch.Tensor, start: int, num_ground_truth: int,
                           text, cache: KVCache, sigmas: Sequence[float],
                           generator: torch.Generator | None) -> torch.Tensor:
    """Context of a chunk generated by the model itself: frames generated one by one with the few-step Euler
    sampler (not the deployed one, which denoises 4 latent frames together, by default with UniPC and
    guidance), each appended (no gradient) for the next to a fork of `cache`. The caller's cache stays as it
    was, for the caller to write the chunk once: appending to it without gradient would replace its tensors
    by ones that carry no gradient of the earlier frames, and in a bounded cache the generated frames would
    evict real context frames that dropping them afterwards cannot bring back."""
    frames = []
    generation_cache = cache.fork()
    with torch.no_grad():
        for i in range(ground_truth.shape[2]):
            if start + i < num_ground_truth:
                frame = ground_truth[:, :, i:i + 1]
            else:
                noise = torch.randn(ground_truth[:, :, i:i + 1].shape, generator=generator,
                                    device=ground_truth.device, dtype=ground_truth.dtype)
                frame = generate_frames(model, noise, text, generation_cache, sigmas)
            model.prefill(frame, text, generation_cache)
            frames.append(frame)
    return torch.cat(frames, dim=2)


# ---------------------------------------------------------------------------------------------
# The deployed controller: its window policy and its closed loop
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RolloutWindow:
    """The deployed controller's window policy, in video frames: before adding `new` frames to a
    window of `cached` frames, if `cached + new > rollout_bound` the cache is cleared and re-filled
    with the last `rollout_prefill_num` real frames."""

    rollout_bound: int = 60
    rollout_prefill_num: int = 33

    def __post_init__(self):
        latent_frames_of(self.rollout_prefill_num)
        if self.rollout_prefill_num >= self.rollout_bound:
            raise ValueError(f"rollout_prefill_num ({self.rollout_prefill_num}) must be below "
                             f"rollout_bound ({self.rollout_bound})")

    def needs_reset(self, cached_video_frames: int, new_video_frames: int) -> bool:
        return cached_video_frames + new_video_frames > self.rollout_bound

    @property
    def prefill_latent_frames(self) -> int:
        """Latent frames re-prefilled after a reset (33 video frames -> 9)."""
        return latent_frames_of(self.rollout_prefill_num)


def reset_and_reprefill(model: WanModelCausal, real_latents: torch.Tensor, context, cache: KVCache,
                        first_position: int = 0) -> KVCache:
    """The deployed window reset: clear the cache, then prefill the latents of the last
    `rollout_prefill_num` real frames. The published server starts a fresh state, so the
    re-prefilled frames take positions first_position.. (0 by default)."""
    cache.reset()
    positions = range(first_position, first_position + real_latents.shape[2])
    return model.prefill(real_latents, context, cache, positions=positions)


@dataclass(frozen=True)
class RolloutEvent:
    """One operation of a closed-loop rollout over a window's latent frames.

    prefill:    write the clean real frames `frames` into the cache at positions from `position`.
    reprefill:  clear the cache, then prefill the real frames `frames` from position 0.
    predict:    the noisy frames `frames` (positions from `position`) attend to the cache and carry
                the loss; they are not kept (the controller prefills the real frames next).
    """

    kind: Literal["prefill", "reprefill", "predict"]
    frames: range
    position: int


def closed_loop_schedule(num_frames: int, window: RolloutWindow,
                         chunk: int = DEPLOYED_FRAMES_PER_CHUNK) -> list[RolloutEvent]:
    """The deployed controller's loop over `num_frames` latent frames, as a list of events.

    It starts from the first real frame, then repeatedly predicts the next `chunk` latent frames
    (fewer at the end) and prefills the real ones at the same positions. Before a prediction that
    would make the window longer than `window.rollout_bound` video frames, the cache is cleared and
    the latents of the last `window.rollout_prefill_num` real video frames are prefilled from 0.
    Prefills that no later prediction reads (the last one of each window) are left out: in training
    they would only cost time.
    """
    if num_frames < MIN_CAUSAL_LATENT_FRAMES:
        raise ValueError(f"a closed-loop rollout needs at least {MIN_CAUSAL_LATENT_FRAMES} latent frames, "
                         f"got {num_frames}")
    events = [RolloutEvent("prefill", range(0, 1), 0)]
    window_start, next_frame = 0, 1
    while next_frame < num_frames:
        new = min(chunk, num_frames - next_frame)
        if window.needs_reset(video_frames_of(next_frame - window_start), VAE_TEMPORAL_STRIDE * new):
            window_start = max(0, next_frame - window.prefill_latent_frames)
            events.append(RolloutEvent("reprefill", range(window_start, next_frame), 0))
        predicted = range(next_frame, next_frame + new)
        position = next_frame - window_start
        events += [RolloutEvent("predict", predicted, position), RolloutEvent("prefill", predicted, position)]
        next_frame += new
    return [event for i, event in enumerate(events) if event.kind != "prefill" or is_read_later(events, i)]


def is_read_later(events: list[RolloutEvent], index: int) -> bool:
    """Whether a prediction after event `index` sees the cache it leaves (no reprefill in between)."""
    for event in events[index + 1:]:
        if event.kind != "prefill":
            return event.kind == "predict"
    return False


def closed_loop_rollout(model: WanModelCausal, clean: torch.Tensor, noisy: torch.Tensor, t_noisy: torch.Tensor,
                        context, events: list[RolloutEvent], kv_cache_length: int) -> torch.Tensor:
    """Run a `closed_loop_schedule` over a window of latent frames (clean, noisy [B, C, n, H, W],
    timesteps t_noisy [B, n]). Real frames enter the cache as fixed context, without gradient, as at
    inference (a prefill forward whose velocity output is unused would also leave ZeRO-3 with a
    forward that gets no gradient); each predicted chunk sees the cache and, block-causally, its own
    noisy frames, and carries the loss. Frame 0 is never predicted; its slot holds zeros."""
    text = model.text_key_values(context)
    cache = KVCache(model.num_layers, capacity=kv_cache_length)
    predicted: dict[int, torch.Tensor] = {}
    for event in events:
        frames = slice(event.frames.start, event.frames.stop)
        positions = range(event.position, event.position + len(event.frames))
        if event.kind == "reprefill":
            with torch.no_grad():
                cache = reset_and_reprefill(model, clean[:, :, frames], text, cache)
        elif event.kind == "prefill":
            with torch.no_grad():
                cache = model.prefill(clean[:, :, frames], text, cache, positions=positions)
        else:
            velocity, cache = model.forward_with_cache(noisy[:, :, frames], t_noisy[:, frames],
                                                       text, cache, positions=positions)
            predicted[event.frames.start] = velocity
    first = next(iter(predicted.values()))
    pieces = [torch.zeros_like(first[:, :, :1])] + [predicted[start] for start in sorted(predicted)]
    return torch.cat(pieces, dim=2)
