"""Sampling: the flow-matching solvers, TI2V generation with `WanModel`, and Vidarc's cached,
closed-loop generation with `WanModelCausal`, the IDM turning generated frames into actions.

Flow convention (as in training): x_sigma = (1 - sigma) x_1 + sigma x_0 with x_1 the clean latent
and x_0 noise; the model predicts the velocity x_0 - x_1 at timestep 1000 * sigma.

Solvers (`make_solver`):
- "unipc": Wan2.2's flow UniPC multistep solver as its TI2V sampler configures it
  (`FlowUniPCMultistepScheduler(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)`,
  then `set_timesteps(steps, shift=shift)`): B(h) = expm1(h) ("bh2"), updates on the predicted
  x_1 ("predict_x0"), order 2 with a first-order warm-up step and a first-order last step
  ("lower_order_final"), the UniC corrector after every step but the first. Rewritten from the
  math; float32 like upstream, so results match it to float32 rounding.
- "euler": plain Euler steps over the same timesteps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch

from vidartrain.data.video import encode_mp4
from vidartrain.files import write_atomically
from vidartrain.losses import NUM_TRAIN_TIMESTEPS, shift_sigma
from vidartrain.models.idm import IDM, preprocess_frames
from vidartrain.models.wan.causal import WanModelCausal
from vidartrain.models.wan.kv_cache import KVCache, StaticKVCache, latent_frames_of
from vidartrain.rollouts import (DEPLOYED_FRAMES_PER_CHUNK, RolloutWindow, StaticGenerationStep, closed_loop_schedule,
                                 reset_and_reprefill)
from vidartrain.models.wan.model import WanModel
from vidartrain.models.wan.vae import WanVAE
# Wan2.2 TI2V-5B sampling defaults (upstream wan/configs/wan_ti2v_5B.py).
DEFAULT_STEPS = 50
DEFAULT_SHIFT = 5.0
DEFAULT_GUIDE_SCALE = 5.0
# Upstream's shared negative prompt (wan/configs/shared_config.py), used by TI2V when none is given.
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")

SolverName = Literal["unipc", "euler"]


# ---------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------

def flow_schedule(steps: int, shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Model timesteps (int64 [steps]) and noise levels (float32 [steps + 1], ending at 0) of
    Wan's flow sampler with `steps` steps and timestep shift `shift`.

    The training grid is sigma = 1 - linspace(1, 1/N, N) reversed, so it spans [0, 1 - 1/N] in
    float32; sampling takes `steps` evenly spaced values from its largest to its smallest (the
    last dropped), shifts them (s * sigma / (1 + (s - 1) * sigma), in float64), and truncates
    1000 * sigma to integers for the model, as upstream does."""
    if steps < 1:
        raise ValueError(f"the sampler needs at least one step, got steps={steps}")
    training_sigmas = torch.from_numpy(
        1.0 - np.linspace(1, 1 / num_train_timesteps, num_train_timesteps)[::-1].copy()).float()
    sigma_max, sigma_min = training_sigmas[0].item(), training_sigmas[-1].item()
    sigmas = shift_sigma(np.linspace(sigma_max, sigma_min, steps + 1)[:-1], shift)
    timesteps = torch.from_numpy(sigmas * num_train_timesteps).to(torch.int64)
    return timesteps, torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))


# ---------------------------------------------------------------------------------------------
# Solvers: `step(velocity, sample)` moves the sample from sigmas[i] to sigmas[i + 1]
# ---------------------------------------------------------------------------------------------

@dataclass
class FlowEulerSolver:
    """x <- x + (sigma_next - sigma) * velocity."""

    timesteps: torch.Tensor
    sigmas: torch.Tensor
    step_index: int = 0

    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
        self.step_index += 1
        return (sample + (sigma_next - sigma) * velocity).to(sample.dtype)


def _log_snr(sigma: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha / sigma) with alpha = 1 - sigma (+inf at sigma = 0)."""
    return torch.log(1 - sigma) - torch.log(sigma)


@dataclass
class FlowUniPCSolver:
    """Wan2.2's flow UniPC (bh2, predict_x0, order 2, lower_order_final); see the module docstring.

    Works on the predicted clean latent m = x - sigma * velocity. With h = lambda_next - lambda
    and B = expm1(-h), the predictor is
        x_next = sigma_next / sigma * x - alpha_next * B * (m + rho_p * D1)     (rho_p = 1/2)
    where D1 = (m - m_prev) / r, r = (lambda_prev - lambda) / h (order 2; D1 = 0 at order 1);
    the corrector, run when the next velocity arrives, redoes the last step with the new
    prediction m_new: x = x_pred_from(last) - alpha * B * (rho_c[:-1] . D1s + rho_c[-1] (m_new - m)),
    rho_c solving the order conditions (1/2 at order 1).
    """

    timesteps: torch.Tensor
    sigmas: torch.Tensor
    order: int = 2
    lower_order_final: bool = True
    step_index: int = 0
    predictions: list[torch.Tensor] = field(default_factory=list)  # predicted x_1, newest last
    last_sample: torch.Tensor | None = None
    last_order: int = 0

    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        i = self.step_index
        prediction = sample - self.sigmas[i] * velocity
        if i > 0 and self.last_sample is not None:
            sample = self._correct(prediction)
        self.predictions = (self.predictions + [prediction])[-self.order:]
        order = self.order
        if self.lower_order_final:
            order = min(order, len(self.timesteps) - i)
        order = min(order, len(self.predictions))  # warm-up: the first step has one prediction
        self.last_sample, self.last_order = sample, order
        self.step_index += 1
        return self._predict(sample, order)

    def _coefficients(self, target: int, source: int, order: int) -> tuple[torch.Tensor, ...]:
        """alpha_t, sigma_t / sigma_s, h, B(h) = expm1(-h), and the order conditions (R, b) of a
        step from sigmas[source] to sigmas[target] using `order` predictions (float32)."""
        sigma_t, sigma_s = self.sigmas[target], self.sigmas[source]
        h = _log_snr(sigma_t) - _log_snr(sigma_s)
        hh = -h  # predict_x0 works with -h
        h_phi_1 = torch.expm1(hh)
        b_h = h_phi_1  # bh2: B(h) = expm1(-h), the same value as h * phi_1
        ratios = [(_log_snr(self.sigmas[source - k]) - _log_snr(sigma_s)) / h for k in range(1, order)]
        r = torch.tensor(ratios + [1.0])
        rows, rhs = [], []
        h_phi_k, factorial = h_phi_1 / hh - 1, 1
        for k in range(1, order + 1):
            rows.append(torch.pow(r, k - 1))
            rhs.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        return 1 - sigma_t, sigma_t / sigma_s, h_phi_1, b_h, r, torch.stack(rows), torch.tensor(rhs)

    def _differences(self, r: torch.Tensor, newest: int) -> list[torch.Tensor]:
        """D_k = (m_{-k} - m_0) / r_k for the older predictions, m_0 = predictions[newest]."""
        m0 = self.predictions[newest]
        return [(self.predictions[newest - k] - m0) / r[k - 1] for k in range(1, len(r))]

    def _predict(self, sample: torch.Tensor, order: int) -> torch.Tensor:
        i = self.step_index - 1
        alpha_t, ratio, h_phi_1, b_h, r, _, _ = self._coefficients(i + 1, i, order)
        x_next = ratio * sample - alpha_t * h_phi_1 * self.predictions[-1]
        if order == 2:
            x_next = x_next - alpha_t * b_h * (0.5 * self._differences(r, -1)[0])
        elif order > 2:
            raise NotImplementedError("Wan's TI2V sampler uses UniPC order <= 2")
        return x_next.to(sample.dtype)

    def _correct(self, prediction: torch.Tensor) -> torch.Tensor:
        i, order = self.step_index, self.last_order
        alpha_t, ratio, h_phi_1, b_h, r, rows, rhs = self._coefficients(i, i - 1, order)
        x = self.last_sample
        m0 = self.predictions[-1]
        rho = torch.tensor([0.5]) if order == 1 else torch.linalg.solve(rows, rhs)
        corrected = ratio * x - alpha_t * h_phi_1 * m0
        residual = rho[-1] * (prediction - m0)
        for rho_k, d_k in zip(rho[:-1], self._differences(r, -1)):
            residual = residual + rho_k * d_k
        return (corrected - alpha_t * b_h * residual).to(x.dtype)


Solver = FlowEulerSolver | FlowUniPCSolver


def make_solver(name: SolverName, steps: int, shift: float) -> Solver:
    """A fresh solver (they carry state across steps: make one per generation)."""
    timesteps, sigmas = flow_schedule(steps, shift)
    if name == "unipc":
        return FlowUniPCSolver(timesteps, sigmas)
    if name == "euler":
        return FlowEulerSolver(timesteps, sigmas)
    raise ValueError(f"unknown solver {name!r}: expected 'unipc' or 'euler'")


def denoise(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], latent: torch.Tensor,
            solver: Solver, after_step: Callable[[torch.Tensor], torch.Tensor] | None = None,
            on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Run every step of `solver`: velocity(latent, timestep) -> velocity, then the solver's step,
    then `after_step` (e.g. re-imposing the conditioning frame). `on_step(i, velocity, latent)`
    sees each step's result."""
    for i, timestep in enumerate(solver.timesteps):
        predicted = velocity(latent, timestep)
        latent = solver.step(predicted, latent)
        if after_step is not None:
            latent = after_step(latent)
        if on_step is not None:
            on_step(i, predicted, latent)
    return latent


# ---------------------------------------------------------------------------------------------
# TI2V generation with the bidirectional WanModel (Vidar)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplingOptions:
    """How to sample: solver, steps, timestep shift, guidance scale and seed; for the causal model,
    whether each denoising call and chunk prefill runs as one CUDA graph (`compile_generation`:
    `StaticGenerationStep` under torch.compile mode "reduce-overhead"; CUDA only, compiles on first
    use)."""

    steps: int = DEFAULT_STEPS
    shift: float = DEFAULT_SHIFT
    guide_scale: float = DEFAULT_GUIDE_SCALE
    solver: SolverName = "unipc"
    seed: int = 0
    compile_generation: bool = False

    def make_solver(self) -> Solver:
        return make_solver(self.solver, self.steps, self.shift)


def seeded_noise(shape: tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    """float32 N(0, 1) noise drawn from a generator seeded with `seed` on `device`, as upstream
    draws its initial latent (same seed, same noise on the same device)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)


def guided(cond: torch.Tensor, uncond: torch.Tensor, guide_scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + guide_scale * (cond - uncond)."""
    return uncond + guide_scale * (cond - uncond)


@torch.no_grad()
def ti2v_latents(model: WanModel, first_frame: torch.Tensor, context: list[torch.Tensor],
                 null_context: list[torch.Tensor], num_latent_frames: int, options: SamplingOptions
                 ) -> torch.Tensor:
    """Wan2.2 TI2V sampling: latents [B, C, F, h, w] whose frame 0 is the image latent.

    first_frame: VAE latent of the image [B, C, 1, h, w]. As upstream: the noise is drawn first
    (seeded), frame 0 is replaced by the image latent before the loop and after every step, and
    frame 0's tokens get timestep 0 while the others get the step's timestep. The conditional and
    unconditional (negative prompt) predictions run as one batch of 2B."""
    batch, channels, _, height, width = first_frame.shape
    if len(context) != batch or len(null_context) != batch:
        raise ValueError(f"{batch} images but {len(context)} prompts and {len(null_context)} negative prompts")
    device = first_frame.device
    noise = seeded_noise((batch, channels, num_latent_frames, height, width), options.seed, device)
    keep = torch.ones_like(noise)
    keep[:, :, 0] = 0.0
    condition = (1 - keep) * first_frame.float()

    def velocity(latent: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        t = torch.full((2 * batch, num_latent_frames), float(timestep), device=device)
        t[:, 0] = 0.0
        both = model(torch.cat([latent, latent]), t, list(context) + list(null_context)).float()
        return guided(both[:batch], both[batch:], options.guide_scale)

    return denoise(velocity, condition + keep * noise, options.make_solver(),
                   after_step=lambda latent: condition + keep * latent)


# ---------------------------------------------------------------------------------------------
# Vidarc: causal generation through the KV cache, as the deployed controller runs it
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def vidarc_latents(model: WanModelCausal, observed: torch.Tensor, context: list[torch.Tensor], null_context: list[torch.Tensor],
                   num_latent_frames: int, options: SamplingOptions, window: RolloutWindow,
                   closed_loop: bool, recompute: bool = False, static_step: StaticGenerationStep | None = None
                   ) -> torch.Tensor:
    """Latents [B, C, num_latent_frames, h, w] generated by `WanModelCausal` chunk by chunk.

    The deployed controller's loop (`closed_loop_schedule`): prefill latent frame 0, predict the
    next 4 latent frames (each chunk denoised from seeded noise with `options`' solver, steps and
    guidance), then prefill the observed frames at the same positions; when the window would pass
    `window.rollout_bound` video frames, clear the cache and re-prefill the last
    `window.rollout_prefill_num` observed frames from position 0.

    closed_loop: `observed` [B, C, >= num_latent_frames, h, w] are the real observations (an
    episode's latents): the generated chunks are replaced by them in the cache. Otherwise only
    `observed[:, :, :1]` is used and the generated frames are what the model observes next.
    The result holds observed frame 0 and every generated chunk (what was predicted before the
    real frames arrived).

    CFG keeps two caches as one batch of 2B (conditional rows, then negative-prompt rows): the
    cached keys/values depend on the text through cross-attention. `recompute` runs every
    forward over the window's frames from scratch instead of the cache (the reference the cache
    is tested against). `static_step` runs the predictions, and the prefills once the cache has its
    buffers (the first prefill allocates them; re-prefills after a window reset stay eager too),
    at static shapes (see `StaticGenerationStep`)."""
    if closed_loop and observed.shape[2] < num_latent_frames:
        raise ValueError(f"closed loop over {num_latent_frames} latent frames needs as many observed frames, "
                         f"got {observed.shape[2]}")
    device = observed.device
    text = model.text_key_values(list(context) + list(null_context))
    # In-place buffers: no step copies the cache (the schedule's chunks are at most 4 latent frames)
    cache = StaticKVCache(model.num_layers, capacity=num_latent_frames, scratch_frames=DEPLOYED_FRAMES_PER_CHUNK)
    generator = torch.Generator(device=device).manual_seed(options.seed)
    latents = torch.zeros(observed.shape[:2] + (num_latent_frames,) + observed.shape[3:], device=device)
    latents[:, :, :1] = observed[:, :, :1].float()
    source = observed.float() if closed_loop else latents
    window_start = 0

    def doubled(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x])

    # Without the static step, every call of this loop has its own shapes (chunk, cache fill) and
    # Python ints (layer, fill): blocks that training compiled in place (`model.compile`) would
    # compile a graph for almost each one and use up the recompile limit that its rollouts need.
    # flex_attention stays compiled (`attention`).
    with torch.compiler.set_stance("default" if static_step is not None else "force_eager"):
        for event in closed_loop_schedule(num_latent_frames, window):
            frames = slice(event.frames.start, event.frames.stop)
            if event.kind == "reprefill":
                window_start = event.frames.start
                if not recompute:
                    cache = reset_and_reprefill(model, doubled(source[:, :, frames]), text, cache)
            elif event.kind == "prefill":
                if not recompute:
                    clean = doubled(source[:, :, frames])
                    positions = range(event.position, event.position + len(event.frames))
                    if static_step is not None and cache.keys:
                        cache = static_step.prefill(clean, text, cache, positions)
                    else:
                        cache = model.prefill(clean, text, cache, positions=positions)
            else:
                context_frames = source[:, :, window_start:event.frames.start]
                noise = torch.randn(latents[:, :, frames].shape, generator=generator, device=device)
                latents[:, :, frames] = denoise(
                    _chunk_velocity(model, doubled(context_frames), text, cache, event.position, options.guide_scale,
                                    recompute, static_step), noise, options.make_solver())
    return latents


def _chunk_velocity(model: WanModelCausal, context_frames: torch.Tensor, text, cache: KVCache, position: int,
                    guide_scale: float, recompute: bool, static_step: StaticGenerationStep | None = None
                    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Guided velocity of a chunk at RoPE positions from `position`: against the cache, or by
    recomputing the clean window frames (`context_frames`, positions 0..) at t = 0 with it."""

    def velocity(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        x2 = torch.cat([x, x])
        batch, chunk = x.shape[0], x.shape[2]
        t = torch.full((2 * batch, chunk), float(timestep), device=x.device)
        if recompute:
            whole = torch.cat([context_frames, x2], dim=2)
            t_whole = torch.cat([torch.zeros(2 * batch, context_frames.shape[2], device=x.device), t], dim=1)
            out = model(whole, t_whole, text)[:, :, -chunk:]
        elif static_step is not None:
            out = static_step.velocity(x2, t, text, cache, range(position, position + chunk))
        else:
            out, _ = model.forward_with_cache(x2, t, text, cache, positions=range(position, position + chunk))
        out = out.float()
        return guided(out[:batch], out[batch:], guide_scale)

    return velocity


@torch.no_grad()
def generate_video(model: WanModel, vae: WanVAE, video: torch.Tensor, context: list[torch.Tensor],
                   null_context: list[torch.Tensor], num_frames: int, options: SamplingOptions,
                   closed_loop: bool = False, window: RolloutWindow = RolloutWindow()) -> torch.Tensor:
    """Generate `num_frames` video frames [B, 3, num_frames, H, W] in [-1, 1] from `video`
    [B, 3, T, H, W] in [-1, 1]: its first frame is the image to continue (TI2V with `WanModel`,
    chunk-wise causal generation with `WanModelCausal`); with `closed_loop` (causal model only)
    its first `num_frames` frames are the real observations."""
    latent_frames = latent_frames_of(num_frames)
    causal = isinstance(model, WanModelCausal)
    if closed_loop and not causal:
        raise ValueError("a closed-loop rollout needs the causal model (vidarc.pt), got the bidirectional WanModel")
    if closed_loop and video.shape[2] < num_frames:
        raise ValueError(f"a closed-loop rollout of {num_frames} frames needs as many real frames, "
                         f"the video has {video.shape[2]}")
    if options.compile_generation and not causal:
        raise ValueError("compile_generation is for the causal model's cached generation (vidarc.pt)")
    static_step = cuda_graph_step(model, model.patch_embedding.weight.device) if options.compile_generation else None
    observed = vae.encode(video[:, :, :num_frames] if closed_loop else video[:, :, :1])
    if causal:
        latents = vidarc_latents(model, observed, context, null_context, latent_frames, options, window,
                                 closed_loop, static_step=static_step)
    else:
        latents = ti2v_latents(model, observed, context, null_context, latent_frames, options)
    return vae.decode(latents)


def cuda_graph_step(model: WanModelCausal, device: torch.device) -> StaticGenerationStep:
    """The generation step compiled into CUDA graphs (`compile_generation`); refused off CUDA, where
    there are no CUDA graphs to capture."""
    if device.type != "cuda":
        raise ValueError(f"compile_generation captures CUDA graphs and needs a CUDA device, got {device}")
    return StaticGenerationStep(model, {"mode": "reduce-overhead"})


# ---------------------------------------------------------------------------------------------
# Frames, videos, actions and metrics
# ---------------------------------------------------------------------------------------------

def video_to_uint8(video: torch.Tensor) -> np.ndarray:
    """Decoded video [B, 3, T, H, W] in [-1, 1] -> uint8 frames [B, T, H, W, 3]."""
    pixels = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 4, 1).cpu().numpy()


def write_mp4(path: str | Path, frames: np.ndarray, fps: int) -> Path:
    """uint8 frames [T, H, W, 3] -> H.264 mp4 at `path` (written whole or not at all)."""
    data = encode_mp4(frames, fps)
    return write_atomically(path, lambda tmp: Path(tmp).write_bytes(data))


def frame_strip(generated: np.ndarray, ground_truth: np.ndarray | None = None) -> np.ndarray:
    """First, middle and last frame side by side [H or 2H, 3W, 3]; the ground truth's below when given."""
    def row(frames: np.ndarray) -> np.ndarray:
        picks = [0, (len(frames) - 1) // 2, len(frames) - 1]
        return np.concatenate([frames[i] for i in picks], axis=1)

    rows = [row(generated)] + ([row(ground_truth)] if ground_truth is not None else [])
    return np.concatenate(rows, axis=0)


def psnr(generated: np.ndarray, ground_truth: np.ndarray) -> float:
    """PSNR in dB of uint8 frames against the ground truth (same shape)."""
    if generated.shape != ground_truth.shape:
        raise ValueError(f"PSNR of frames {generated.shape} against ground truth {ground_truth.shape}")
    mse = float(np.mean((generated.astype(np.float64) - ground_truth.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@torch.no_grad()
def idm_actions(idm: IDM, video: torch.Tensor, input_size: tuple[int, int], frames_per_batch: int = 16) -> torch.Tensor:
    """The IDM's action for every frame of `video` [B, 3, T, H, W] in [-1, 1] -> [B, T, A] float32, the
    frames `frames_per_batch` at a time."""
    batch, _, frames = video.shape[:3]
    weight = next(idm.parameters())
    flat = video.transpose(1, 2).flatten(0, 1)
    actions = [idm(preprocess_frames(chunk.to(weight.device), input_size).to(weight.dtype)).float()
               for chunk in flat.split(frames_per_batch)]
    return torch.cat(actions).reshape(batch, frames, -1)


def action_metrics(predicted: np.ndarray, actual: np.ndarray, gripper_dims: Sequence[int] = (6, 13)
                   ) -> dict[str, float | list[float]]:
    """Predicted vs the episode's actions [T, A]: L1 per dimension and overall, and gripper
    open/close accuracy (each gripper dimension split at the midpoint of the episode's range; none
    without gripper dimensions, rather than the NaN mean of nothing)."""
    if predicted.shape != actual.shape:
        raise ValueError(f"predicted actions {predicted.shape} and the episode's {actual.shape} differ in shape")
    if any(not 0 <= d < actual.shape[1] for d in gripper_dims):
        raise ValueError(f"gripper dimensions {tuple(gripper_dims)} outside the {actual.shape[1]} action dimensions")
    l1 = np.abs(predicted - actual).mean(axis=0)
    metrics = {"action_l1": float(l1.mean()), "action_l1_per_dim": [float(v) for v in l1]}
    correct = []
    for d in gripper_dims:
        threshold = (actual[:, d].min() + actual[:, d].max()) / 2
        correct.append((predicted[:, d] > threshold) == (actual[:, d] > threshold))
    if correct:
        metrics["gripper_accuracy"] = float(np.mean(correct))
    return metrics
