"""The frozen models both DiT stages condition on, as one object: the VAE (clean latents of raw
video), umT5 (text context of raw captions) and the IDM (Eq. 7 masks of a stage-2 window), in bf16
with requires_grad False, outside the optimizer.

Each model is loaded only where the shards do not hold its output pre-encoded (`load`), or for
validation samples, which decode latents, encode the negative prompt and score actions
(`load_for_validation`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vidartrain.config import Config, ConfigError
from vidartrain.data.shard_index import DataInfo
from vidartrain.data.transforms import to_model_range
from vidartrain.errors import DataError
from vidartrain.models.idm import IDM, IDM_INPUT_SIZE, idm_input_size, load_idm, pool_mask_to_latent
from vidartrain.models.wan.kv_cache import VAE_TEMPORAL_STRIDE
from vidartrain.models.wan.text_encoder import TextEncoder
from vidartrain.models.wan.vae import WanVAE

VAE_FILE = "Wan2.2_VAE.pth"
FROZEN_DTYPE = torch.bfloat16


@dataclass
class FrozenConditioner:
    """The frozen VAE, umT5 and IDM (None until loaded) on `device`, and what a stage gets from them
    for a batch: `clean_latents`, `text_context`, `window_mask`."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    vae: WanVAE | None = None
    text_encoder: TextEncoder | None = None
    idm: IDM | None = None
    idm_input_size: tuple[int, int] = IDM_INPUT_SIZE

    def load(self, config: Config, data: DataInfo, text_len: int, device: torch.device, idm_masks: bool) -> None:
        """For training: the VAE and umT5 unless the shards hold latents / text embeddings; with
        `idm_masks` (Eq. 7) the IDM unless the shards hold the masks."""
        self.device = device
        if data.raw:
            self.vae = load_vae(config, device)
        if data.raw or not data.text_embeddings:
            self.text_encoder = load_text_encoder(config, text_len, device)
        if not idm_masks or data.idm_masks:
            return
        check_idm_mask_source(config, data)
        self.idm = load_frozen_idm(config.model.idm_path, device)
        self.idm_input_size = idm_input_size(config.data.height, config.data.width)

    def load_for_validation(self, config: Config, text_len: int, device: torch.device) -> None:
        """The VAE and umT5 (also when the shards are pre-encoded: samples are decoded and need the
        negative prompt), and the IDM of `model.idm_path` for action errors."""
        self.device = device
        if self.vae is None:
            self.vae = load_vae(config, device)
        if self.text_encoder is None:
            self.text_encoder = load_text_encoder(config, text_len, device)
        if self.idm is None and config.model.idm_path is not None:
            self.idm = load_frozen_idm(config.model.idm_path, device)

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


def check_idm_mask_source(config: Config, data: DataInfo) -> None:
    """`loss.embodiment_aware` weights the loss by IDM masks (Eq. 7): from pre-encoded shards that hold
    them, or from the IDM of `model.idm_path` run on raw shards' frames. Checked when the stage is
    built, before any model: otherwise the first step fails."""
    if not config.loss.embodiment_aware or data.idm_masks:
        return
    if not data.raw:
        raise ConfigError(f"`loss.embodiment_aware` needs IDM masks, and the pre-encoded shards of `data.shards` "
                          f"({config.data.shards}) hold none (the IDM runs on video frames, which they do not keep): "
                          f"pre-encode them with the IDM (vidar-shard --precompute latents,text,idm --idm "
                          f"IDM.pt), train on raw shards with `model.idm_path`, or set `loss.embodiment_aware: false`")
    if config.model.idm_path is None:
        raise ConfigError("`loss.embodiment_aware` needs IDM masks: set `model.idm_path` to an idm.pt "
                          "(or pre-encode `idm_mask` into the shards)")


def load_vae(config: Config, device: torch.device) -> WanVAE:
    return WanVAE.from_pretrained(Path(config.model.ckpt_dir) / VAE_FILE, dtype=FROZEN_DTYPE, device=device,
                                  **(config.model.vae_config or {}))


def load_text_encoder(config: Config, text_len: int, device: torch.device) -> TextEncoder:
    return TextEncoder.from_pretrained(Path(config.model.ckpt_dir), dtype=FROZEN_DTYPE, device=device,
                                       text_len=text_len, encoder_config=config.model.t5_config)


def load_frozen_idm(path: str, device: torch.device) -> IDM:
    return load_idm(path, device=device, dtype=FROZEN_DTYPE).requires_grad_(False)
