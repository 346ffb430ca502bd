"""Offline encoding for pre-encoded shards: VAE latents, umT5 embeddings, IDM masks.

The frozen models run once here, so training reads tensors only. Each episode is cut into fixed
windows of `num_frames` at `stride`; each window becomes one sample with its latents (and pooled
IDM mask). Text embeddings are stored once per distinct instruction, keyed by `text_key`.
"""
from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from vidartrain.data.transforms import resample_indices, resize_frames, to_model_range
from vidartrain.data.video import decode_all_frames
from vidartrain.errors import ArchitectureMismatch, ConfigError
from vidartrain.models.idm import IDM, idm_input_size, load_idm, pool_mask_to_latent
from vidartrain.models.wan.text_encoder import TextEncoder
from vidartrain.models.wan.vae import WanVAE, latent_shape
from vidartrain.shapes import (CLIP_HEIGHT, CLIP_NUM_FRAMES, CLIP_WIDTH, DIT_PATCH_SIZE, PIXELS_PER_TOKEN,
                               VAE_STRIDE)

PRECOMPUTABLE = ("latents", "text", "idm")
VAE_CHECKPOINT_NAME = "Wan2.2_VAE.pth"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def text_key(instruction: str) -> str:
    """Name of an instruction's embedding in text_embeddings.safetensors."""
    return hashlib.sha256(instruction.encode("utf-8")).hexdigest()[:24]


def parse_precompute(value: str) -> tuple[str, ...]:
    parts = tuple(sorted({part.strip() for part in value.split(",") if part.strip()}))
    unknown = [part for part in parts if part not in PRECOMPUTABLE]
    if unknown:
        raise ConfigError(f"--precompute: unknown {unknown}; choose from {', '.join(PRECOMPUTABLE)}")
    if "latents" not in parts:
        raise ConfigError("--precompute must include 'latents' (text and idm are stored alongside them)")
    return parts


@dataclass(frozen=True)
class WindowSettings:
    num_frames: int = CLIP_NUM_FRAMES
    stride: int = 40
    height: int = CLIP_HEIGHT
    width: int = CLIP_WIDTH
    resize: str = "crop"  # vidartrain.data.transforms.resize_frames mode, as data.resize online

    def check(self) -> None:
        try:
            latent_shape(self.num_frames, self.height, self.width)  # raises with the reason when invalid
        except ValueError as error:
            raise ConfigError(f"--num-frames {self.num_frames} --height {self.height} --width {self.width}: "
                              f"{error}") from None
        if self.height % PIXELS_PER_TOKEN or self.width % PIXELS_PER_TOKEN:
            # the VAE would encode them, but no training config could load the windows (data.height/width)
            raise ConfigError(f"--height {self.height} --width {self.width}: must be multiples of {PIXELS_PER_TOKEN} "
                              f"(VAE stride {VAE_STRIDE[1]} x DiT patch {DIT_PATCH_SIZE[1]}), as the training "
                              f"configs' data.height / data.width")
        if self.stride < 1:
            raise ConfigError(f"--stride must be positive, got {self.stride}")


def window_starts(frames: int, window: WindowSettings) -> list[int]:
    return list(range(0, frames - window.num_frames + 1, window.stride))


def episode_windows(video: bytes, video_fps: float, fps: int, frames: int,
                    window: WindowSettings) -> list[tuple[int, np.ndarray]]:
    """(start, uint8 frames [num_frames, 3, height, width]) of every window of the episode's timeline."""
    decoded, _ = decode_all_frames(video)
    timeline = decoded[resample_indices(len(decoded), video_fps, fps)[:frames]]
    resized = resize_frames(torch.from_numpy(timeline).permute(0, 3, 1, 2), window.height, window.width,
                            window.resize).numpy()
    return [(start, resized[start: start + window.num_frames]) for start in window_starts(frames, window)]


@contextmanager
def dimensions_hint(option: str, given: dict | None) -> Iterator[None]:
    """A checkpoint of other dimensions than the published model's, loaded without `option`, is
    refused with a hint: the converter builds the published architecture unless told otherwise."""
    try:
        yield
    except ArchitectureMismatch as error:
        if given is not None:
            raise
        raise ArchitectureMismatch(f"{error}. Without {option} the converter builds the published model's "
                                   f"dimensions; for other ones (a tiny debug checkpoint) give them with {option} "
                                   f"(the training config's model.{option[2:].replace('-', '_')})") from error


class Precomputer:
    """Runs the frozen VAE (and IDM, and umT5 for instructions) on the converter's main process."""

    def __init__(self, what: tuple[str, ...], vae: WanVAE, text_encoder: TextEncoder | None = None,
                 idm: IDM | None = None, latent_dtype: torch.dtype = torch.bfloat16):
        if "text" in what and text_encoder is None:
            raise ValueError("precompute 'text' needs a text encoder")
        if "idm" in what and idm is None:
            raise ValueError("precompute 'idm' needs an IDM checkpoint (--idm)")
        self.what, self.vae, self.text_encoder, self.idm = what, vae, text_encoder, idm
        self.latent_dtype = latent_dtype

    @classmethod
    def from_checkpoints(cls, what: tuple[str, ...], ckpt_dir: Path, idm_path: Path | None, device: str,
                         latent_dtype: str, vae_config: dict | None = None, t5_config: dict | None = None
                         ) -> "Precomputer":
        with dimensions_hint("--vae-config", vae_config):
            vae = WanVAE.from_pretrained(ckpt_dir / VAE_CHECKPOINT_NAME, device=device, **(vae_config or {}))
        with dimensions_hint("--t5-config", t5_config):
            text_encoder = (TextEncoder.from_pretrained(ckpt_dir, device=device, encoder_config=t5_config)
                            if "text" in what else None)
        idm = load_idm(idm_path, device=device) if "idm" in what and idm_path is not None else None
        return cls(what, vae, text_encoder, idm, DTYPES[latent_dtype])

    @torch.no_grad()
    def window_tensors(self, frames: np.ndarray) -> dict[str, torch.Tensor]:
        """uint8 window [F, 3, H, W] -> latents [48, F_lat, H/16, W/16] (+ idm_mask [F_lat, H/16, W/16])."""
        device = self.vae.conv1.weight.device
        video = to_model_range(torch.from_numpy(frames)).permute(1, 0, 2, 3).unsqueeze(0).to(device)
        tensors = {"latents": self.vae.encode(video)[0].to(self.latent_dtype).cpu().contiguous()}
        if "idm" in self.what:
            # the size training uses online (Eq. 7), so pre-encoded and online masks agree
            mask = self.idm.get_mask(video, input_size=idm_input_size(*frames.shape[-2:])).float()
            tensors["idm_mask"] = pool_mask_to_latent(mask)[0].to(self.latent_dtype).cpu().contiguous()
        return tensors

    @torch.no_grad()
    def text_embeddings(self, texts: dict[str, str], batch: int = 8) -> dict[str, torch.Tensor]:
        """{text_key: [L, dim]} for {text_key: instruction}, in a fixed (sorted) order."""
        keys = sorted(texts)
        embeddings = {}
        for start in range(0, len(keys), batch):
            chunk = keys[start: start + batch]
            for key, embedding in zip(chunk, self.text_encoder([texts[k] for k in chunk])):
                embeddings[key] = embedding.to(self.latent_dtype).cpu().contiguous()
        return embeddings


def in_current_form(settings: dict | None) -> dict | None:
    """Conversion settings (ConversionSettings.as_dict) as this version records them. Earlier versions
    recorded one square `idm_input_size` for every pre-encoded folder (518 unless --idm-input-size said
    otherwise), IDM masks or not: it reads as [n, n] with masks and null without, so their folders still
    resume and take --append where nothing that decides the bytes changed."""
    record = (settings or {}).get("precompute")
    if record is None or not isinstance(record.get("idm_input_size"), int):
        return settings
    size = record["idm_input_size"]
    current = [size, size] if "idm" in record["precompute"] else None
    return {**settings, "precompute": {**record, "idm_input_size": current}}


def settings_record(what: tuple[str, ...], window: WindowSettings, ckpt_dir: Path | None, idm_path: Path | None,
                    latent_dtype: str, vae_config: dict | None = None, t5_config: dict | None = None) -> dict:
    """What decides the pre-encoded bytes, for index.json."""
    return json.loads(json.dumps({
        "precompute": list(what), "num_frames": window.num_frames, "stride": window.stride,
        "height": window.height, "width": window.width, "resize": window.resize, "latent_dtype": latent_dtype,
        "ckpt_dir": str(ckpt_dir) if ckpt_dir else None, "idm": str(idm_path) if idm_path else None,
        "vae_config": vae_config, "t5_config": t5_config,
        "idm_input_size": list(idm_input_size(window.height, window.width)) if "idm" in what else None}))
