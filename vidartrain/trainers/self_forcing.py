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
                  same sequence of forwards).
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
from vidartrain.data.shard_index import read_common_index
from vidartrain.data.transforms import to_model_range
from vidartrain.errors import DataError
from vidartrain.losses import (add_noise, embodiment_weights, flow_matching_loss, flow_matching_target,
                               mask_region_losses, per_frame_flow_matching_loss, sample_sigmas, shift_sigma)
from vidartrain.models.idm import IDM_INPUT_SIZE, load_idm, pool_mask_to_latent
from vidartrain.models.wan.causal import WanModelCausal
from vidartrain.models.wan.checkpoint import load_finetuned
from vidartrain.models.wan.kv_cache import VAE_TEMPORAL_STRIDE
from vidartrain.rollouts import (DEPLOYED_FRAMES_PER_CHUNK, ContextMode, RolloutEvent, RolloutWindow,
                                 closed_loop_rollout, closed_loop_schedule, rollout, sampling_sigmas)
from vidartrain.trainers.idm_trainer import idm_input_size
from vidartrain.trainers.vidar_trainer import FROZEN_DTYPE, VidarStage

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
    loss_mask = torch.ones(1, 1, window_frames, 1, 1, device=clean.device)
    loss_mask[:, :, :num_context_frames] = 0.0
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


class SelfForcingStage(VidarStage):
    """Stage 2: `WanModelCausal` from `model.ckpt_dir` + `model.pt_dir` (vidar.pt), exported as
    vidarc.pt. Data, frozen VAE / umT5 and export are stage 1's."""

    name = "vidarc"
    closed_loop_samples = True

    def __init__(self) -> None:
        super().__init__()
        self.idm_input_size: tuple[int, int] = IDM_INPUT_SIZE
        self.config = Config()
        self.schedule: list[RolloutEvent] = []

    def build_model(self, config: Config) -> nn.Module:
        if config.model.ckpt_dir is None:
            raise ConfigError("`model.ckpt_dir` is not set: stage 2 starts from a Wan2.2-TI2V checkpoint "
                              "directory (and `model.pt_dir`, the stage-1 vidar.pt)")
        if config.data.shards is None:
            raise ConfigError("`data.shards` is not set: the shard directory made by `vidar-shard`")
        self.config, self.shift = config, config.loss.shift
        sf = config.self_forcing
        if sf.closed_loop:
            self.schedule = closed_loop_schedule(
                config.self_forcing.window_frames, RolloutWindow(sf.rollout_bound, sf.rollout_prefill_num))
        # A public reconstruction found the reference recipe's 2e-5 too high for this stage: say which
        # rate this run uses (TensorBoard has it as train/lr).
        log.info("stage 2: learning rate %.3g (training.lr), warmup %d, context %s%s, window %d latent frames, "
                 "Eq. 7 %s", config.training.lr, config.training.warmup, sf.context_mode,
                 " on the closed-loop schedule" if sf.closed_loop else "", config.self_forcing.window_frames,
                 f"eta {config.loss.eta}" if config.loss.embodiment_aware else "off")
        model = WanModelCausal.from_pretrained(config.model.ckpt_dir, dtype=torch.bfloat16, device="cpu")
        if config.model.pt_dir is not None:
            load_finetuned(model, config.model.pt_dir)
        model.attention_backend = config.model.attention
        self.patch_size, self.text_len = model.patch_size, model.text_len
        return model.train().requires_grad_(True)

    def load_frozen(self, config: Config, device: torch.device) -> None:
        """Stage 1's VAE and umT5, plus the IDM for Eq. 7 when the shards carry no masks."""
        super().load_frozen(config, device)
        if not config.loss.embodiment_aware or read_common_index(config.data.shards)["mode"] != "raw":
            return
        if config.model.idm_path is None:
            raise ConfigError("`loss.embodiment_aware` needs IDM masks: set `model.idm_path` to an idm.pt "
                              "(or pre-encode `idm_mask` into the shards)")
        self.idm = load_idm(config.model.idm_path, device=device, dtype=FROZEN_DTYPE).requires_grad_(False)
        self.idm_input_size = idm_input_size(config.data.height, config.data.width)

    @torch.no_grad()
    def window_mask(self, batch: dict[str, Any], start: int, frames: int) -> torch.Tensor:
        """IDM mask U of latent frames [start, start + frames) on the latent grid [B, frames, h, w],
        float32: cut from the pre-encoded masks, or computed by the frozen IDM on the window's video
        frames only."""
        if "idm_mask" in batch:
            return batch["idm_mask"][:, start:start + frames].to(self.device, torch.float32)
        if self.idm is None:
            raise DataError(f"batch {batch['__key__']} has no pre-encoded `idm_mask` and no IDM is loaded "
                            f"(model.idm_path) for the embodiment-aware loss")
        # Latent frame 0 pools video frame 0 alone, latent frame j >= 1 video frames 4j-3..4j. From one
        # frame before the window's first group the clip is 4n+1 frames long; its lone first frame is dropped.
        first = max(0, VAE_TEMPORAL_STRIDE * (start - 1))
        video = batch["video"][:, :, first:VAE_TEMPORAL_STRIDE * (start + frames - 1) + 1].to(self.device)
        if not video.is_floating_point():
            video = to_model_range(video)
        mask = pool_mask_to_latent(self.idm.get_mask(video, input_size=self.idm_input_size).float())
        return mask[:, 1:] if start > 0 else mask

    def training_loss(self, module: nn.Module, batch: dict[str, Any], generator: torch.Generator
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        config, sf = self.config, self.config.self_forcing
        model = unwrap_model(module)
        clean = self.clean_latents(batch)
        context = self.text_context(batch)
        window = prepare_causal_window(clean, config.self_forcing.window_frames, self.shift, generator)
        if config.loss.embodiment_aware:
            window = replace(window, mask=self.window_mask(batch, window.start, window.num_frames))
        # The closed-loop controller always re-prefills real frames: its context is the ground truth.
        source = "ground_truth" if sf.closed_loop else choose_context(sf.context_mode, sf.self_generated_prob,
                                                                        generator)
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

    def tokens_in(self, batch: dict[str, Any]) -> int:
        """DiT tokens of the window: the clean and the noisy copy of `window_frames` latent frames."""
        _, ph, pw = self.patch_size
        if "latents" in batch:
            batch_size, height, width = batch["latents"].shape[0], *batch["latents"].shape[3:]
        else:
            batch_size, height, width = batch["video"].shape[0], *(s // 16 for s in batch["video"].shape[3:])
        return 2 * batch_size * self.config.self_forcing.window_frames * (height // ph) * (width // pw)
