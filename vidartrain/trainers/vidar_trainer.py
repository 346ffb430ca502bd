"""Stage 1 (Vidar): full fine-tuning of the bidirectional WanModel with flow matching (Eq. 1).

Per micro-batch: clean latents x_1 (VAE-encoded online when the shards hold raw video), text
embeddings (umT5 online, or pre-encoded), noise x_0, one sigma per sample (uniform, then Wan's
shift). TI2V conditioning: the first latent frame stays clean and its tokens get timestep 0; it
is left out of the loss. Text dropout for classifier-free guidance happens in the loader (an
empty prompt with probability data.cfg_prob).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vidartrain.config import Config, ConfigError
from vidartrain.data.shard_index import read_common_index
from vidartrain.data.transforms import to_model_range
from vidartrain.distributed.export import write_state_dict
from vidartrain.errors import DataError
from vidartrain.losses import (NUM_TRAIN_TIMESTEPS, add_noise, flow_matching_loss, flow_matching_target,
                               sample_sigmas)
from vidartrain.models.idm import IDM, load_idm
from vidartrain.models.wan.checkpoint import load_finetuned
from vidartrain.rollouts import RolloutWindow
from vidartrain.models.wan.model import WanModel
from vidartrain.models.wan.text_encoder import TextEncoder
from vidartrain.models.wan.vae import WanVAE
from vidartrain.sampling import (DEFAULT_NEGATIVE_PROMPT, SamplingOptions, action_metrics, generate_video,
                                 idm_actions, psnr, video_to_uint8)
from vidartrain.trainers.base import Stage, ValidationSample
from vidartrain.trainers.idm_trainer import idm_input_size

VAE_FILE = "Wan2.2_VAE.pth"
FROZEN_DTYPE = torch.bfloat16
SIGMA_BUCKETS = (0.0, 0.25, 0.5, 0.75, 1.0)


def first_frame_conditioning(sigma: torch.Tensor, num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample sigma [B] -> per-frame sigma [B, F] with frame 0 clean (sigma 0), and the loss
    mask [B, 1, F, 1, 1] that leaves frame 0 out."""
    frame_sigma = sigma[:, None].repeat(1, num_frames)
    frame_sigma[:, 0] = 0.0
    mask = torch.ones(sigma.shape[0], 1, num_frames, 1, 1, device=sigma.device)
    mask[:, :, 0] = 0.0
    return frame_sigma, mask


def sigma_bucket_metrics(per_sample_loss: torch.Tensor, sigma: torch.Tensor) -> dict[str, torch.Tensor]:
    """[sum, count] of the per-sample loss in each sigma bucket (every bucket named, even if empty,
    so that all ranks reduce the same list)."""
    metrics = {}
    for low, high in zip(SIGMA_BUCKETS[:-1], SIGMA_BUCKETS[1:]):
        inside = (sigma >= low) & ((sigma < high) if high < 1.0 else (sigma <= high))
        metrics[f"loss_by_sigma/{low:.2f}-{high:.2f}"] = torch.stack(
            [per_sample_loss[inside].sum(), inside.sum().to(per_sample_loss.dtype)])
    return metrics


class VidarStage(Stage):
    name = "vidar"
    closed_loop_samples = False  # validation samples: TI2V (stage 2: the deployed closed loop)
    # raw video travels from the loader workers as uint8 (4x fewer bytes) and is scaled on the device
    loader_options = {"video_dtype": torch.uint8}

    def __init__(self) -> None:
        self.vae: WanVAE | None = None
        self.text_encoder: TextEncoder | None = None
        self.device = torch.device("cpu")
        self.shift = 1.0
        self.patch_size: tuple[int, int, int] = (1, 2, 2)
        self.text_len = 512
        self.idm: IDM | None = None
        self.validation_config = Config().validation
        self.gripper_dims = Config().idm.gripper_dims
        self.rollout_window = RolloutWindow()
        self.frame_size = (0, 0)

    def build_model(self, config: Config) -> nn.Module:
        if config.model.ckpt_dir is None:
            raise ConfigError("`model.ckpt_dir` is not set: stage 1 starts from a Wan2.2-TI2V checkpoint directory")
        if config.data.shards is None:
            raise ConfigError("`data.shards` is not set: the shard directory made by `vidar-shard`")
        self.shift = config.loss.shift
        model = WanModel.from_pretrained(config.model.ckpt_dir, dtype=torch.bfloat16, device="cpu")
        if config.model.pt_dir is not None:
            load_finetuned(model, config.model.pt_dir)
        self.patch_size, self.text_len = model.patch_size, model.text_len
        return model.train().requires_grad_(True)

    def load_frozen(self, config: Config, device: torch.device) -> None:
        """VAE and umT5, frozen in bf16, only for what the shards do not hold pre-encoded."""
        self.device = device
        index = read_common_index(config.data.shards)
        ckpt_dir = Path(config.model.ckpt_dir)
        if index["mode"] == "raw":
            self.vae = WanVAE.from_pretrained(ckpt_dir / VAE_FILE, dtype=FROZEN_DTYPE, device=device,
                                              **(config.model.vae_config or {}))
        if index["mode"] == "raw" or not index.get("text_embeddings"):
            self.text_encoder = TextEncoder.from_pretrained(ckpt_dir, dtype=FROZEN_DTYPE, device=device,
                                                            text_len=self.text_len,
                                                            encoder_config=config.model.t5_config)

    @torch.no_grad()
    def clean_latents(self, batch: dict[str, Any]) -> torch.Tensor:
        if "latents" in batch:
            return batch["latents"].to(self.device, torch.float32)
        if self.vae is None:
            raise DataError(f"batch {batch['__key__']} has neither pre-encoded `latents` nor a VAE to encode `video`")
        return self.vae.encode(to_model_range(batch["video"].to(self.device)))

    @torch.no_grad()
    def text_context(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        if "text_emb" in batch:
            return [emb.to(self.device) for emb in batch["text_emb"]]
        if self.text_encoder is None:
            raise DataError(f"batch {batch['__key__']} has neither pre-encoded `text_emb` nor a text encoder")
        return self.text_encoder(batch["text"])

    def training_loss(self, module: nn.Module, batch: dict[str, Any], generator: torch.Generator
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        clean = self.clean_latents(batch)
        context = self.text_context(batch)
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

    def tokens_in(self, batch: dict[str, Any]) -> int:
        pt, ph, pw = self.patch_size
        if "latents" in batch:
            batch_size, _, frames, height, width = batch["latents"].shape
        else:
            batch_size, _, num_frames, video_h, video_w = batch["video"].shape
            frames, height, width = (num_frames - 1) // 4 + 1, video_h // 16, video_w // 16
        return batch_size * (frames // pt) * (height // ph) * (width // pw)

    def export(self, state_dict: dict[str, torch.Tensor], path: Path) -> None:
        write_state_dict(state_dict, path)

    # --- validation samples

    def load_validation(self, config: Config, device: torch.device) -> None:
        """The VAE and umT5 (also when the shards are pre-encoded: samples are decoded and need the
        negative prompt), and the IDM of `model.idm_path` for action errors."""
        self.device, self.validation_config, self.gripper_dims = device, config.validation, config.idm.gripper_dims
        self.rollout_window = RolloutWindow(config.self_forcing.rollout_bound, config.self_forcing.rollout_prefill_num)
        self.frame_size = (config.data.height, config.data.width)
        ckpt_dir = Path(config.model.ckpt_dir)
        if self.vae is None:
            self.vae = WanVAE.from_pretrained(ckpt_dir / VAE_FILE, dtype=FROZEN_DTYPE, device=device,
                                              **(config.model.vae_config or {}))
        if self.text_encoder is None:
            self.text_encoder = TextEncoder.from_pretrained(ckpt_dir, dtype=FROZEN_DTYPE, device=device,
                                                            text_len=self.text_len,
                                                            encoder_config=config.model.t5_config)
        if self.idm is None and config.model.idm_path is not None:
            self.idm = load_idm(config.model.idm_path, device=device, dtype=FROZEN_DTYPE).requires_grad_(False)

    @torch.no_grad()
    def validation_sample(self, module: nn.Module, batch: dict[str, Any], index: int) -> ValidationSample:
        """TI2V from the clip's first frame and instruction (the causal stage: closed loop against the
        clip's frames); PSNR of the generated frames after the first, and with an IDM the action L1
        and gripper accuracy against the clip's actions."""
        v = self.validation_config
        if "video" in batch:
            video = to_model_range(batch["video"][:, :, :v.num_frames].to(self.device))
        else:
            video = self.vae.decode(batch["latents"][:, :, :(v.num_frames - 1) // 4 + 1].to(self.device))
        options = SamplingOptions(steps=v.steps, shift=v.shift, guide_scale=v.guide_scale, solver=v.solver,
                                  seed=v.seed + index)
        negative = self.text_encoder([DEFAULT_NEGATIVE_PROMPT if v.negative_prompt is None else v.negative_prompt])
        generated = generate_video(module, self.vae, video, self.text_context(batch)[:1], negative, v.num_frames,
                                   options, closed_loop=self.closed_loop_samples, window=self.rollout_window)
        frames, truth = video_to_uint8(generated)[0], video_to_uint8(video)[0]
        metrics = {"psnr": psnr(frames[1:], truth[1:])}  # frame 0 is given, not generated
        if self.idm is not None:
            predicted = idm_actions(self.idm, generated, idm_input_size(*self.frame_size))[0].cpu().numpy()
            actual = batch["actions"][0, 1:v.num_frames].numpy()
            metrics.update(action_metrics(predicted[1:], actual, self.gripper_dims))
        return ValidationSample(batch["__key__"][0], frames, truth, metrics)
