"""Stage 2 (Vidarc): the causal DiT trained with causal flow matching (Eq. 6) and the
embodiment-aware weight (Eq. 7), with ground-truth, self-generated or closed-loop context.

One training sample is a window of `self_forcing.window_frames` consecutive latent frames of a clip, at RoPE
positions 0.. (every window is a fresh video, as after the deployed controller's window reset).
Frame 0 of the window is clean context (timestep 0, no loss); every later frame gets its own noise
level and is predicted from the context frames before it and itself:

- ground_truth    one forward over [clean | noisy] with a block-causal mask (teacher forcing); the
                  published method and the default.
- self_generated  sequential rollout through the KV cache where the context is the model's own
                  few-step prediction of the earlier frames, as at inference (self-forcing).
- mixed           self_generated with probability `self_generated_prob`, else ground_truth: one
                  coin per micro-step, the same on every rank (ZeRO-3 needs every rank to run the
                  same sequence of forwards); a held-out sample's validation loss is the mean over
                  the coin (`SelfForcingStage.validation_loss`).
- closed_loop     (option) the deployed controller's schedule: prefill the first real frame,
                  predict chunks of 4 latent frames, drop them and prefill the real ones, clear and
                  re-prefill the window when it would pass `rollout_bound` video frames.

Loss: `flow_matching_loss` on the noisy frames, weighted by (1 + eta U)^2 for Eq. 7 with U the
IDM mask pooled to the latent grid (from the shards' `idm_mask`, or from a frozen IDM run on the
clean video). TensorBoard adds the loss per rollout position and inside / outside the mask.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from vidartrain.config import Config, ConfigError
from vidartrain.data.shard_index import DataInfo
from vidartrain.losses import (add_noise, context_frame_mask, embodiment_weights, flow_matching_loss,
                               flow_matching_target, mask_region_losses, per_frame_flow_matching_loss, sample_sigmas)
from vidartrain.models.wan.causal import WanModelCausal
from vidartrain.rollouts import (DEPLOYED_FRAMES_PER_CHUNK, ContextMode, RolloutEvent, closed_loop_rollout,
                                 closed_loop_schedule, rollout, sampling_sigmas)
from vidartrain.trainers.conditioning import check_idm_mask_source
from vidartrain.trainers.vidar_trainer import DitStage

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# One training window: which latent frames, which noise levels, which frames are context
# ---------------------------------------------------------------------------------------------

@dataclass
class CausalWindow:
    """`window_frames` consecutive latent frames of a batch, noised frame by frame.

    clean, noise, noisy, target: [B, C, n, H, W]; sigmas: [B, n] float32 with 0 on the context
    frame; loss_mask: [1, 1, n, 1, 1] (0 on context frames, as `flow_matching_loss` takes it);
    start: latent index of the window's first frame in the clip (the window itself sits at RoPE
    positions 0..n-1); mask: the latent-grid IDM mask of the window [B, n, H, W], or None without
    Eq. 7.
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


def prepare_causal_window(latents: torch.Tensor, window_frames: int, shift: float,
                          generator: torch.Generator, num_context_frames: int = 1) -> CausalWindow:
    """Pick a random window of `window_frames` latent frames and noise each of its frames on its own.

    latents: clean [B, C, F, H, W] with F >= window_frames; the window's IDM mask (Eq. 7) is added by
    the stage, for the window's frames only. The first `num_context_frames` frames stay clean
    (sigma 0) and carry no loss; the others get independent shifted sigmas. All randomness comes
    from `generator`, so a resumed run draws the same windows and noise.
    """
    if latents.ndim != 5:
        raise ValueError(f"stage 2 expects latents [B, C, F, H, W], got {tuple(latents.shape)}")
    batch, _, frames = latents.shape[:3]
    if not 1 <= num_context_frames < window_frames:
        raise ValueError(f"num_context_frames = {num_context_frames} must be in [1, window_frames = "
                         f"{window_frames}): at least one frame is context and one is predicted")
    if frames < window_frames:
        raise ConfigError(f"the batch has {frames} latent frames, fewer than self_forcing.window_frames = "
                          f"{window_frames} (raise data.num_frames or lower the window)")
    device = generator.device
    start = int(torch.randint(frames - window_frames + 1, (1,), generator=generator, device=device))
    clean = latents[:, :, start:start + window_frames]
    noise = torch.randn(clean.shape, generator=generator, device=device, dtype=torch.float32).to(clean)
    sigmas = sample_sigmas((batch, window_frames), shift, generator=generator, device=device).to(clean.device)
    sigmas[:, :num_context_frames] = 0.0
    loss_mask = context_frame_mask(1, window_frames, num_context_frames, clean.device)
    return CausalWindow(clean=clean, noise=noise, sigmas=sigmas, noisy=add_noise(clean, noise, sigmas),
                        target=flow_matching_target(clean, noise), loss_mask=loss_mask, start=start,
                        mask=None)


# ---------------------------------------------------------------------------------------------
# Velocity of the window's noisy frames under each context mode
# ---------------------------------------------------------------------------------------------

def choose_context(mode: str, self_generated_prob: float, generator: torch.Generator) -> ContextMode:
    """The context of this micro-step. For `mixed`, rank 0's coin is broadcast so that every rank
    takes the same path (ZeRO-3 gathers parameters collectively, forward by forward)."""
    if mode in ("ground_truth", "self_generated"):
        return mode
    if mode != "mixed":
        raise ValueError(f"self_forcing.context_mode = {mode!r}: expected ground_truth, self_generated or mixed")
    draw = torch.rand(1, generator=generator, device=generator.device)
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(draw, src=0)
    return "self_generated" if float(draw) < self_generated_prob else "ground_truth"


def teacher_forcing_velocity(model: WanModelCausal, window: CausalWindow, context: Any) -> torch.Tensor:
    """Ground-truth context in one pass over [clean | noisy] (noisy frame i sees clean frames < i)."""
    return model.forward_teacher_forcing(window.clean, window.noisy, window.timesteps, context)


def self_generated_velocity(model: WanModelCausal, window: CausalWindow, context: Any, sigmas: list[float],
                            kv_cache_length: int, sink_frames: int, generator: torch.Generator) -> torch.Tensor:
    """Self-forcing: frames after the first are replaced, as context, by the model's own few-step
    generation through the KV cache, chunk by chunk as the deployed controller generates them.
    Gradients flow through the cached keys/values of the context, as in teacher forcing."""
    return rollout(model, window.clean, window.noisy, window.timesteps, context,
                   frames_per_chunk=DEPLOYED_FRAMES_PER_CHUNK, context_mode="self_generated",
                   num_ground_truth_frames=1, cache_grad=True, kv_cache_length=kv_cache_length,
                   sink=sink_frames, sigmas=sigmas, generator=generator)


def closed_loop_velocity(model: WanModelCausal, window: CausalWindow, context: Any,
                         events: list[RolloutEvent], kv_cache_length: int) -> torch.Tensor:
    """The deployed controller's `closed_loop_schedule` over the window (`closed_loop_rollout`)."""
    return closed_loop_rollout(model, window.clean, window.noisy, window.timesteps, context, events, kv_cache_length)


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------

def unwrap_model(module: nn.Module) -> WanModelCausal:
    """The causal DiT inside a DeepSpeed engine (or the bare model): stage 2 calls its teacher-forcing
    and cache methods, not only `forward`."""
    model = module.module if isinstance(module, deepspeed.DeepSpeedEngine) else module
    if not isinstance(model, WanModelCausal):
        raise TypeError(f"stage 2 trains a WanModelCausal, got {type(model).__name__}")
    return model


class SelfForcingStage(DitStage):
    """Stage 2: `WanModelCausal` from `model.ckpt_dir` + `model.pt_dir` (vidar.pt), exported as
    vidarc.pt; data, frozen conditioner, export and validation as every DiT stage (`DitStage`)."""

    name = "vidarc"
    model_class = WanModelCausal
    closed_loop_samples = True
    start_note = " (and `model.pt_dir`, the stage-1 vidar.pt)"

    def __init__(self, config: Config, data: DataInfo) -> None:
        super().__init__(config, data)
        check_idm_mask_source(config, data)
        sf = config.self_forcing
        self.uses_idm_masks = config.loss.embodiment_aware
        self.schedule: list[RolloutEvent] = (closed_loop_schedule(sf.window_frames, self.rollout_window)
                                             if sf.closed_loop else [])
        # A public reconstruction found the reference recipe's 2e-5 too high for this stage: say which
        # rate this run uses (TensorBoard has it as train/lr).
        log.info("stage 2: learning rate %.3g (training.lr), warmup %d, context %s%s, window %d latent frames, "
                 "Eq. 7 %s", config.training.lr, config.training.warmup, sf.context_mode,
                 " on the closed-loop schedule" if sf.closed_loop else "", sf.window_frames,
                 f"eta {config.loss.eta}" if config.loss.embodiment_aware else "off")

    def build_model(self) -> nn.Module:
        model = super().build_model()
        model.attention_backend = self.config.model.attention
        return model

    def latent_frames_per_sample(self, latent_frames: int) -> tuple[int, int]:
        """The window, twice: its clean and its noisy copy."""
        return self.config.self_forcing.window_frames, 2

    def training_loss(self, module: nn.Module, batch: dict[str, Any], generator: torch.Generator
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        sf = self.config.self_forcing
        model, window, context = self.sample_window(module, batch, generator)
        # The closed-loop controller always re-prefills real frames: its context is the ground truth.
        source = "ground_truth" if sf.closed_loop else choose_context(sf.context_mode, sf.self_generated_prob,
                                                                        generator)
        return self.window_loss(model, window, context, source, generator)

    def validation_loss(self, module: nn.Module, batch: dict[str, Any], generator: torch.Generator
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`mixed`: the loss (and metrics) under either context, weighted by `self_generated_prob` - the
        mean over the coin. Ranks evaluate different held-out samples together and ZeRO-3 needs them on
        one path: a coin of each sample's own would split them, rank 0's would tie a sample's loss to
        the sample rank 0 holds."""
        sf = self.config.self_forcing
        if sf.closed_loop or sf.context_mode != "mixed":
            return self.training_loss(module, batch, generator)
        model, window, context = self.sample_window(module, batch, generator)
        weights = {"ground_truth": 1.0 - sf.self_generated_prob, "self_generated": sf.self_generated_prob}
        loss, metrics = torch.zeros(()), {}
        for source, weight in weights.items():
            source_loss, source_metrics = self.window_loss(model, window, context, source, generator)
            loss = loss + weight * source_loss.detach().float().cpu()
            for name, value in source_metrics.items():
                metrics[name] = metrics.get(name, 0) + weight * value
        return loss, metrics

    def sample_window(self, module: nn.Module, batch: dict[str, Any], generator: torch.Generator
                      ) -> tuple[WanModelCausal, CausalWindow, Any]:
        """The causal DiT, the batch's training window (with its IDM mask for Eq. 7) and its text context."""
        model = unwrap_model(module)
        clean = self.conditioner.clean_latents(batch)
        context = self.conditioner.text_context(batch)
        window = prepare_causal_window(clean, self.config.self_forcing.window_frames, self.shift, generator)
        if self.config.loss.embodiment_aware:
            window = replace(window, mask=self.conditioner.window_mask(batch, window.start, window.num_frames))
        return model, window, context

    def window_loss(self, model: WanModelCausal, window: CausalWindow, context: Any, source: ContextMode,
                    generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Eq. 6 (weighted by Eq. 7) of the window's noisy frames predicted from the `source` context."""
        config, sf = self.config, self.config.self_forcing
        if sf.closed_loop:
            velocity = closed_loop_velocity(model, window, context, self.schedule, sf.kv_cache_length)
        elif source == "ground_truth":
            velocity = teacher_forcing_velocity(model, window, context)
        else:
            velocity = self_generated_velocity(model, window, context,
                                               sampling_sigmas(sf.denoising_steps, self.shift),
                                               sf.kv_cache_length, sf.sink_frames, generator)
        weights = embodiment_weights(window.mask, config.loss.eta) if window.mask is not None else None
        loss = flow_matching_loss(velocity, window.target, loss_mask=window.loss_mask, weights=weights)
        return loss, self.step_metrics(velocity.detach(), window, source)

    def step_metrics(self, velocity: torch.Tensor, window: CausalWindow, source: ContextMode
                     ) -> dict[str, torch.Tensor]:
        """[value, 1] pairs (averaged over micro-batches and ranks): unweighted loss per rollout
        position and inside / outside the IDM mask, and how often the context was self-generated."""
        one = torch.ones(())
        metrics = {"context_self_generated": torch.stack([one * (source == "self_generated"), one])}
        per_position = per_frame_flow_matching_loss(velocity, window.target).cpu()
        for position in range(1, window.num_frames):
            metrics[f"loss_by_position/{position:02d}"] = torch.stack([per_position[position], one])
        if window.mask is not None:
            inside, outside = mask_region_losses(velocity, window.target, window.mask, window.loss_mask)
            metrics["loss_in_mask"] = torch.stack([inside.cpu(), one])
            metrics["loss_out_of_mask"] = torch.stack([outside.cpu(), one])
        return metrics
