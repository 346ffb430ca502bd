"""The DiT stages' common part (`DitStage`) and stage 1 (Vidar): full fine-tuning of the
bidirectional WanModel with flow matching (Eq. 1).

Per micro-batch: clean latents x_1 (VAE-encoded online when the shards hold raw video), text
embeddings (umT5 online, or pre-encoded), noise x_0, one sigma per sample (uniform, then Wan's
shift). TI2V conditioning: the first latent frame stays clean and its tokens get timestep 0; it
is left out of the loss. Text dropout for classifier-free guidance happens in the loader (an
empty prompt with probability data.cfg_prob).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from vidartrain.config import Config, ConfigError
from vidartrain.data.shard_index import DataInfo, read_data_info
from vidartrain.data.transforms import to_model_range
from vidartrain.distributed.export import write_state_dict
from vidartrain.distributed.sequence_parallel import check_sequence_parallel_size
from vidartrain.losses import (NUM_TRAIN_TIMESTEPS, add_noise, context_frame_mask, flow_matching_loss,
                               flow_matching_target, sample_sigmas)
from vidartrain.models.idm import idm_input_size
from vidartrain.models.wan.checkpoint import load_finetuned, model_arguments
from vidartrain.models.wan.model import WanModel
from vidartrain.shapes import VAE_STRIDE
from vidartrain.rollouts import RolloutWindow
from vidartrain.sampling import (DEFAULT_NEGATIVE_PROMPT, SamplingOptions, action_metrics, generate_video,
                                 idm_actions, psnr, video_to_uint8)
from vidartrain.trainers.base import Stage, ValidationSample
from vidartrain.trainers.conditioning import FrozenConditioner
from vidartrain.trainers.idm_trainer import check_data_action_dim, check_gripper_dims

SIGMA_BUCKETS = (0.0, 0.25, 0.5, 0.75, 1.0)


def first_frame_conditioning(sigma: torch.Tensor, num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample sigma [B] -> per-frame sigma [B, F] with frame 0 clean (sigma 0), and the loss
    mask [B, 1, F, 1, 1] that leaves frame 0 out."""
    frame_sigma = sigma[:, None].repeat(1, num_frames)
    frame_sigma[:, 0] = 0.0
    return frame_sigma, context_frame_mask(sigma.shape[0], num_frames, 1, sigma.device)


def sigma_bucket_metrics(per_sample_loss: torch.Tensor, sigma: torch.Tensor) -> dict[str, torch.Tensor]:
    """[sum, count] of the per-sample loss in each sigma bucket (every bucket named, even if empty,
    so that all ranks reduce the same list)."""
    metrics = {}
    for low, high in zip(SIGMA_BUCKETS[:-1], SIGMA_BUCKETS[1:]):
        inside = (sigma >= low) & ((sigma < high) if high < 1.0 else (sigma <= high))
        metrics[f"loss_by_sigma/{low:.2f}-{high:.2f}"] = torch.stack(
            [per_sample_loss[inside].sum(), inside.sum().to(per_sample_loss.dtype)])
    return metrics


class DitStage(Stage):
    """What both DiT stages share: the checks of their inputs, the DiT built from `model.ckpt_dir`
    (+ `model.pt_dir`), the frozen conditioner, tokens per batch, the export and the validation
    samples. A stage adds its `training_loss` (and the latent frames one sample trains on)."""

    model_class: ClassVar[type[WanModel]] = WanModel
    start_note = ""  # what else the stage starts from, for the error on a missing model.ckpt_dir
    uses_idm_masks = False  # whether training_loss needs the IDM's masks (stage 2 with Eq. 7)
    closed_loop_samples = False  # validation samples: TI2V (stage 2: the deployed closed loop)
    # raw video travels from the loader workers as uint8 (4x fewer bytes) and is scaled on the device
    loader_options = {"video_dtype": torch.uint8}
    # The DiT learns video: training clips leave their actions out, so a mixture may join robots of
    # other action spaces. Held-out clips keep them for the samples' action metrics.
    train_actions = False

    def __init__(self, config: Config, data: DataInfo) -> None:
        super().__init__(config, data)
        if config.model.ckpt_dir is None:
            raise ConfigError(f"`model.ckpt_dir` is not set: the {self.name} stage starts from a Wan2.2-TI2V "
                              f"checkpoint directory{self.start_note}")
        dit = model_arguments(config.model.ckpt_dir, self.model_class)
        check_sequence_parallel_size(config.distributed.sequence_parallel_size, num_heads=dit["num_heads"])
        self.patch_size: tuple[int, int, int] = tuple(dit["patch_size"])
        self.text_len: int = dit["text_len"]
        self.shift = config.loss.shift
        self.conditioner = FrozenConditioner()
        self.rollout_window = RolloutWindow(config.self_forcing.rollout_bound,
                                            config.self_forcing.rollout_prefill_num)
        if config.validation.every and config.model.idm_path is not None and config.data.val_shards is not None:
            # the samples' gripper accuracy reads the held-out clips' actions: checked before any model is built
            # (load_validation checks the IDM against them too, once it is loaded)
            for _, dim in read_data_info(config.data.val_shards).action_dims():
                check_gripper_dims(config.idm.gripper_dims, dim, whose="the held-out shards'")

    def build_model(self) -> nn.Module:
        model = self.model_class.from_pretrained(self.config.model.ckpt_dir, dtype=torch.bfloat16, device="cpu")
        if self.config.model.pt_dir is not None:
            load_finetuned(model, self.config.model.pt_dir)
        return model.train().requires_grad_(True)

    def load_frozen(self, device: torch.device) -> None:
        """VAE and umT5 (and for Eq. 7 the IDM), frozen in bf16, only for what the shards do not hold
        pre-encoded."""
        self.device = device
        self.conditioner.load(self.config, self.data, self.text_len, device, idm_masks=self.uses_idm_masks)

    def latent_frames_per_sample(self, latent_frames: int) -> tuple[int, int]:
        """(latent frames, copies) the DiT runs on for a clip of `latent_frames` latent frames."""
        return latent_frames, 1

    def tokens_in(self, batch: dict[str, Any]) -> int:
        """DiT tokens of the batch."""
        pt, ph, pw = self.patch_size
        if "latents" in batch:
            batch_size, _, frames, height, width = batch["latents"].shape
        else:
            batch_size, _, num_frames, video_h, video_w = batch["video"].shape
            frames = (num_frames - 1) // VAE_STRIDE[0] + 1
            height, width = video_h // VAE_STRIDE[1], video_w // VAE_STRIDE[2]
        frames, copies = self.latent_frames_per_sample(frames)
        return copies * batch_size * (frames // pt) * (height // ph) * (width // pw)

    def export(self, state_dict: dict[str, torch.Tensor], path: Path) -> None:
        write_state_dict(state_dict, path)

    # --- validation samples

    def load_validation(self, device: torch.device) -> None:
        """The frozen models of the samples; an IDM scoring their actions must fit `idm.gripper_dims`
        and the held-out shards' actions (the samples' robot: a training mixture may join others), or
        the first validation would fail, steps into the run."""
        self.device = device
        self.conditioner.load_for_validation(self.config, self.text_len, device)
        idm = self.conditioner.idm
        if idm is not None:
            source = f"`model.idm_path` = {self.config.model.idm_path}"
            check_gripper_dims(self.config.idm.gripper_dims, idm.train_mean.numel())
            check_data_action_dim(read_data_info(self.config.data.val_shards), idm.train_mean.numel(), source)

    @torch.no_grad()
    def validation_sample(self, module: nn.Module, batch: dict[str, Any], index: int) -> ValidationSample:
        """TI2V from the clip's first frame and instruction (the causal stage: closed loop against the
        clip's frames); PSNR of the generated frames after the first, and with an IDM the action L1
        and gripper accuracy against the clip's actions."""
        v, frozen = self.config.validation, self.conditioner
        if "video" in batch:
            video = to_model_range(batch["video"][:, :, :v.num_frames].to(self.device))
        else:
            video = frozen.vae.decode(batch["latents"][:, :, :(v.num_frames - 1) // VAE_STRIDE[0] + 1].to(self.device))
        options = SamplingOptions(steps=v.steps, shift=v.shift, guide_scale=v.guide_scale, solver=v.solver,
                                  seed=v.seed + index)
        negative = frozen.text_encoder([DEFAULT_NEGATIVE_PROMPT if v.negative_prompt is None else v.negative_prompt])
        generated = generate_video(module, frozen.vae, video, frozen.text_context(batch)[:1], negative, v.num_frames,
                                   options, closed_loop=self.closed_loop_samples, window=self.rollout_window)
        frames, truth = video_to_uint8(generated)[0], video_to_uint8(video)[0]
        metrics = {"psnr": psnr(frames[1:], truth[1:])}  # frame 0 is given, not generated
        if frozen.idm is not None:
            size = idm_input_size(self.config.data.height, self.config.data.width)
            predicted = idm_actions(frozen.idm, generated, size)[0].cpu().numpy()
            actual = batch["actions"][0, 1:v.num_frames].numpy()
            metrics.update(action_metrics(predicted[1:], actual, self.config.idm.gripper_dims))
        return ValidationSample(batch["__key__"][0], frames, truth, metrics)


class VidarStage(DitStage):
    name = "vidar"

    def training_loss(self, module: nn.Module, batch: dict[str, Any], generator: torch.Generator
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        clean = self.conditioner.clean_latents(batch)
        context = self.conditioner.text_context(batch)
        batch_size, _, num_frames = clean.shape[:3]
        noise = torch.randn(clean.shape, generator=generator, device=self.device, dtype=clean.dtype)
        sigma = sample_sigmas(batch_size, self.shift, generator=generator, device=self.device)
        frame_sigma, loss_mask = first_frame_conditioning(sigma, num_frames)
        noisy = add_noise(clean, noise, frame_sigma)
        pred = module(noisy, NUM_TRAIN_TIMESTEPS * frame_sigma, context)
        target = flow_matching_target(clean, noise)
        loss = flow_matching_loss(pred, target, loss_mask=loss_mask)
        with torch.no_grad():
            mask = loss_mask.expand_as(pred)
            per_sample = ((pred.float() - target).pow(2) * mask).flatten(1).sum(1) / mask.flatten(1).sum(1)
        return loss, sigma_bucket_metrics(per_sample.cpu().double(), sigma.cpu())
