"""Wan2.2 video VAE (the 48-channel VAE of TI2V-5B).

A causal 3D convolutional autoencoder. A video [B, 3, 4n+1, H, W] is first folded 2x2 in space
("patchify", 3 -> 12 channels), then the encoder compresses it by 8 in space and 4 in time,
into 48 latent channels: overall stride (4, 16, 16). Every temporal convolution is causal, so
the first frame is encoded on its own and later frames only look backwards.

Like upstream, encode and decode run over time in chunks: the encoder sees frame 0, then frames
1-4, 5-8, ...; the decoder sees one latent frame at a time. Each causal convolution carries the
last frames of its input from one chunk to the next in a `FrameCache`. That cache is created
inside each `encode`/`decode` call and never stored on a module, so one model can serve several
calls at once.

Parameter names and shapes equal upstream's `WanVAE_`, so the published `Wan2.2_VAE.pth` loads
strictly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, reduce, repeat

from vidartrain.models.wan.checkpoint import read_state_dict
from vidartrain.errors import CheckpointError
from vidartrain.models.wan.t5 import check_state_dict_matches
from vidartrain.shapes import VAE_STRIDE

LATENT_CHANNELS = 48
PATCH_SIZE = 2  # 2x2 pixel fold before the encoder and after the decoder
CACHED_FRAMES = 2  # a causal temporal kernel of 3 needs the 2 frames before a chunk
FIRST_CHUNK_FRAMES = 1  # the first frame is encoded alone; the temporal stride applies after it

# Published per-channel statistics of Wan2.2 latents (upstream `Wan2_2_VAE`).
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)

# Per call: each causal layer -> the last input frames it saw in the previous chunk.
FrameCache = dict[nn.Module, torch.Tensor]


def latent_shape(num_frames: int, height: int, width: int, *,
                 stride: tuple[int, int, int] = VAE_STRIDE,
                 channels: int = LATENT_CHANNELS) -> tuple[int, int, int, int]:
    """Latent shape [C, T, H, W] for a video of `num_frames` x `height` x `width`.

    81 frames at 736x640 -> (48, 21, 46, 40). Raises ValueError when the video cannot be encoded:
    the frame count must be 1 + stride_t * n and height/width multiples of the spatial stride.
    """
    stride_t, stride_h, stride_w = stride
    if num_frames < 1 or (num_frames - 1) % stride_t != 0:
        raise ValueError(f"video has {num_frames} frames; the VAE needs 1 + {stride_t}*n frames "
                         f"(1, {1 + stride_t}, {1 + 2 * stride_t}, ...)")
    if height < 1 or height % stride_h != 0:
        raise ValueError(f"video height {height} is not a positive multiple of {stride_h}")
    if width < 1 or width % stride_w != 0:
        raise ValueError(f"video width {width} is not a positive multiple of {stride_w}")
    return channels, 1 + (num_frames - 1) // stride_t, height // stride_h, width // stride_w


class CausalConv3d(nn.Conv3d):
    """Conv3d padded in time on the past side only: output frame t never sees input after t.

    With a cache, the frames of the previous chunk stand in for the zero padding, which makes a
    chunked pass identical to one pass over the whole stream.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int],
                 stride: int | tuple[int, int, int] = 1,
                 padding: int | tuple[int, int, int] = 0) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        pad_t, pad_h, pad_w = (padding,) * 3 if isinstance(padding, int) else padding
        self.past_frames = 2 * pad_t
        self.spatial_padding = (pad_w, pad_w, pad_h, pad_h)

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        if cache is not None:
            previous = cache.get(self)
            history = x if previous is None else torch.cat([previous, x], dim=2)
            # clone: a view would keep the whole chunk's activation alive until the next chunk
            cache[self] = history[:, :, -CACHED_FRAMES:].clone()
            zero_frames = self.past_frames - (history.shape[2] - x.shape[2])
            x = history
        else:
            zero_frames = self.past_frames
        return super().forward(F.pad(x, (*self.spatial_padding, zero_frames, 0)))


class RMSNorm(nn.Module):
    """Channel RMS norm: L2-normalise over channels, times sqrt(C) and a learned gain."""

    def __init__(self, dim: int, images: bool = False) -> None:
        super().__init__()
        # gain broadcast over (H, W) for per-frame images, over (T, H, W) for videos
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))
        self.scale = dim ** 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


def frames_as_images(layer: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D `layer` to every frame of a video [B, C, T, H, W]."""
    frames = x.shape[2]
    images = layer(rearrange(x, "b c t h w -> (b t) c h w"))
    return rearrange(images, "(b t) c h w -> b c t h w", t=frames)


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, dropout: float) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim),
            nn.SiLU(),
            nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        h = self.shortcut(x)
        for layer in self.residual:
            x = layer(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no attention across time)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def attend(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        qkv = self.to_qkv(self.norm(images))
        q, k, v = rearrange(qkv, "n (three c) h w -> three n 1 (h w) c", three=3)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "n 1 (h w) c -> n c h w", h=height, w=width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + frames_as_images(self.attend, x)


class Downsample(nn.Module):
    """Halve height and width; with `temporal`, also halve time (after the lone first frame)."""

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor, cache: FrameCache, first_chunk: bool) -> torch.Tensor:
        x = frames_as_images(self.resample, x)
        if self.time_conv is None:
            return x
        previous = cache.get(self)
        cache[self] = x[:, :, -1:].clone()
        if first_chunk:
            return x  # the first frame stays a frame of its own
        # 2k frames -> k: each output frame sees one frame of context before its pair
        return self.time_conv(torch.cat([previous, x], dim=2))


class Upsample(nn.Module):
    """Double height and width; with `temporal`, also double time (except for the first frame)."""

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                      nn.Conv2d(dim, dim, 3, padding=1))
        self.time_conv = (CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
                          if temporal else None)

    def forward(self, x: torch.Tensor, cache: FrameCache, first_chunk: bool) -> torch.Tensor:
        if self.time_conv is not None and not first_chunk:
            # each frame yields two: the conv's 2C output channels are two frames of C channels
            x = rearrange(self.time_conv(x, cache), "b (two c) t h w -> b c (t two) h w", two=2)
        return frames_as_images(self.resample, x)


class AverageDownsample3d(nn.Module):
    """Parameter-free shortcut: fold space-time blocks into channels, average channel groups."""

    def __init__(self, out_channels: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.factor_t = factor_t
        self.factor_s = factor_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the causal side gets the padding: a lone first frame is paired with a zero frame
        x = F.pad(x, (0, 0, 0, 0, (-x.shape[2]) % self.factor_t, 0))
        x = rearrange(x, "b c (t ft) (h fh) (w fw) -> b (c ft fh fw) t h w",
                      ft=self.factor_t, fh=self.factor_s, fw=self.factor_s)
        return reduce(x, "b (c group) t h w -> b c t h w", "mean", c=self.out_channels)


class DuplicateUpsample3d(nn.Module):
    """Parameter-free shortcut: repeat channels, unfold them into space-time blocks."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.repeats = out_channels * factor_t * factor_s * factor_s // in_channels
        self.factor_t = factor_t
        self.factor_s = factor_s

    def forward(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        x = repeat(x, "b c t h w -> b (c r) t h w", r=self.repeats)
        x = rearrange(x, "b (c ft fh fw) t h w -> b c (t ft) (h fh) (w fw)",
                      ft=self.factor_t, fh=self.factor_s, fw=self.factor_s)
        # the first latent frame decodes to one frame, not factor_t
        return x[:, :, self.factor_t - 1:] if first_chunk else x


class DownBlock(nn.Module):
    """Residual blocks then an optional downsample, plus an averaging shortcut around them."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float, num_res_blocks: int,
                 temporal: bool, spatial: bool) -> None:
        super().__init__()
        self.avg_shortcut = AverageDownsample3d(out_dim, factor_t=2 if temporal else 1,
                                                factor_s=2 if spatial else 1)
        layers: list[nn.Module] = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim, dropout)
                                   for i in range(num_res_blocks)]
        if spatial:
            layers.append(Downsample(out_dim, temporal))
        self.downsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: FrameCache, first_chunk: bool) -> torch.Tensor:
        shortcut = self.avg_shortcut(x)
        for layer in self.downsamples:
            x = layer(x, cache, first_chunk) if isinstance(layer, Downsample) else layer(x, cache)
        return x + shortcut


class UpBlock(nn.Module):
    """Residual blocks then an optional upsample, plus a duplicating shortcut when upsampling."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float, num_res_blocks: int,
                 temporal: bool, spatial: bool) -> None:
        super().__init__()
        self.avg_shortcut = (DuplicateUpsample3d(in_dim, out_dim, factor_t=2 if temporal else 1,
                                                 factor_s=2) if spatial else None)
        layers: list[nn.Module] = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim, dropout)
                                   for i in range(num_res_blocks)]
        if spatial:
            layers.append(Upsample(out_dim, temporal))
        self.upsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: FrameCache, first_chunk: bool) -> torch.Tensor:
        shortcut = None if self.avg_shortcut is None else self.avg_shortcut(x, first_chunk)
        for layer in self.upsamples:
            x = layer(x, cache, first_chunk) if isinstance(layer, Upsample) else layer(x, cache)
        return x if shortcut is None else x + shortcut


class Encoder3d(nn.Module):
    """12 patchified channels -> `out_dim` channels (mean | log-variance), stride (4, 8, 8)."""

    def __init__(self, dim: int, out_dim: int, dim_mult: Sequence[int], num_res_blocks: int,
                 temperal_downsample: Sequence[bool], dropout: float) -> None:
        super().__init__()
        dims = [dim * m for m in [1, *dim_mult]]
        last = len(dim_mult) - 1
        self.conv1 = CausalConv3d(3 * PATCH_SIZE ** 2, dims[0], 3, padding=1)
        self.downsamples = nn.Sequential(*[
            DownBlock(dims[i], dims[i + 1], dropout, num_res_blocks,
                      temporal=i < len(temperal_downsample) and temperal_downsample[i],
                      spatial=i != last)
            for i in range(len(dim_mult))])
        self.middle = nn.Sequential(ResidualBlock(dims[-1], dims[-1], dropout),
                                    AttentionBlock(dims[-1]),
                                    ResidualBlock(dims[-1], dims[-1], dropout))
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(),
                                  CausalConv3d(dims[-1], out_dim, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: FrameCache, first_chunk: bool) -> torch.Tensor:
        x = self.conv1(x, cache)
        for block in self.downsamples:
            x = block(x, cache, first_chunk)
        residual1, attention, residual2 = self.middle
        x = residual2(attention(residual1(x, cache)), cache)
        norm, act, conv = self.head
        return conv(act(norm(x)), cache)


class Decoder3d(nn.Module):
    """`z_dim` latent channels -> 12 patchified channels, upsampling (4, 8, 8)."""

    def __init__(self, dim: int, z_dim: int, dim_mult: Sequence[int], num_res_blocks: int,
                 temperal_upsample: Sequence[bool], dropout: float) -> None:
        super().__init__()
        dims = [dim * m for m in [dim_mult[-1], *reversed(dim_mult)]]
        last = len(dim_mult) - 1
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0], dropout),
                                    AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0], dropout))
        # one residual block more per level than the encoder
        self.upsamples = nn.Sequential(*[
            UpBlock(dims[i], dims[i + 1], dropout, num_res_blocks + 1,
                    temporal=i < len(temperal_upsample) and temperal_upsample[i],
                    spatial=i != last)
            for i in range(len(dim_mult))])
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(),
                                  CausalConv3d(dims[-1], 3 * PATCH_SIZE ** 2, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: FrameCache, first_chunk: bool) -> torch.Tensor:
        x = self.conv1(x, cache)
        residual1, attention, residual2 = self.middle
        x = residual2(attention(residual1(x, cache)), cache)
        for block in self.upsamples:
            x = block(x, cache, first_chunk)
        norm, act, conv = self.head
        return conv(act(norm(x)), cache)


def patchify(video: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, C*4, T, H/2, W/2]; channel order (c, pw, ph) as upstream."""
    return rearrange(video, "b c t (h ph) (w pw) -> b (c pw ph) t h w",
                     ph=PATCH_SIZE, pw=PATCH_SIZE)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `patchify`."""
    return rearrange(x, "b (c pw ph) t h w -> b c t (h ph) (w pw)", ph=PATCH_SIZE, pw=PATCH_SIZE)


class WanVAE(nn.Module):
    """Wan2.2 VAE: `encode` videos in [-1, 1] to normalised latents, `decode` them back.

    Constructor arguments are upstream `WanVAE_`'s, with the real VAE as defaults;
    `latents_mean`/`latents_std` default to the published Wan2.2 statistics.
    """

    def __init__(self, dim: int = 160, dec_dim: int = 256, z_dim: int = LATENT_CHANNELS,
                 dim_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 attn_scales: Sequence[float] = (),
                 temperal_downsample: Sequence[bool] = (False, True, True), dropout: float = 0.0,
                 latents_mean: Sequence[float] | torch.Tensor | None = None,
                 latents_std: Sequence[float] | torch.Tensor | None = None) -> None:
        super().__init__()
        if len(attn_scales) != 0:
            raise ValueError(f"attn_scales={list(attn_scales)}: the Wan VAE has attention only in "
                             f"its middle blocks (upstream accepts and ignores attn_scales)")
        num_temporal = sum(map(bool, temperal_downsample))
        if len(temperal_downsample) != len(dim_mult) - 1 or num_temporal != 2:
            raise ValueError(
                f"temperal_downsample={list(temperal_downsample)}: expected {len(dim_mult) - 1} "
                f"flags (one per downsampling level of dim_mult={list(dim_mult)}) with exactly two "
                f"True, since encode feeds the frames after the first in chunks of 4")
        self.z_dim = z_dim
        spatial_stride = PATCH_SIZE * 2 ** (len(dim_mult) - 1)
        self.stride = (2 ** num_temporal, spatial_stride, spatial_stride)
        self.encoder = Encoder3d(dim, z_dim * 2, dim_mult, num_res_blocks, temperal_downsample,
                                 dropout)
        self.conv1 = CausalConv3d(z_dim * 2, z_dim * 2, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(dec_dim, z_dim, dim_mult, num_res_blocks,
                                 list(reversed(temperal_downsample)), dropout)
        self.set_latent_stats(WAN22_LATENTS_MEAN if latents_mean is None else latents_mean,
                              WAN22_LATENTS_STD if latents_std is None else latents_std)

    def set_latent_stats(self, mean: Sequence[float] | torch.Tensor,
                         std: Sequence[float] | torch.Tensor) -> None:
        """Per-channel statistics used to normalise latents: z = (mu - mean) / std."""
        # explicit CPU float32: stays exact whatever device/dtype the model is built or cast to
        mean = torch.as_tensor(mean, dtype=torch.float32, device="cpu").flatten()
        std = torch.as_tensor(std, dtype=torch.float32, device="cpu").flatten()
        for name, stat in (("latents_mean", mean), ("latents_std", std)):
            if stat.numel() != self.z_dim:
                raise ValueError(f"{name} has {stat.numel()} values, expected z_dim={self.z_dim}")
        if not bool((std > 0).all()):
            raise ValueError("latents_std must be positive in every channel")
        self.latents_mean = mean
        # upstream multiplies by the stored reciprocal and divides by it to undo; kept for parity
        self.latents_inv_std = 1.0 / std

    def _latent_stat(self, stat: torch.Tensor, device: torch.device) -> torch.Tensor:
        return stat.to(device).view(1, self.z_dim, 1, 1, 1)

    def encode(self, video: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Video [B, 3, 4n+1, H, W] in [-1, 1] -> float32 latents [B, z_dim, n+1, H/16, W/16].

        `normalize=False` returns the raw encoder mean instead of (mean - latents_mean) / std.
        """
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, T, H, W], got shape {tuple(video.shape)}")
        if not video.is_floating_point():
            raise TypeError(f"video must be floating point in [-1, 1], got {video.dtype}")
        latent_shape(*video.shape[2:], stride=self.stride, channels=self.z_dim)
        x = patchify(video.to(self.conv1.weight.dtype))
        # a one-frame video (TI2V's image) is the first chunk alone; split would add an empty one
        later = x[:, :, FIRST_CHUNK_FRAMES:]
        chunks = [x[:, :, :FIRST_CHUNK_FRAMES], *(later.split(self.stride[0], dim=2) if later.shape[2] else ())]
        cache: FrameCache = {}
        features = torch.cat([self.encoder(chunk, cache, first_chunk=i == 0)
                              for i, chunk in enumerate(chunks)], dim=2)
        # the first z_dim channels are the mean; the log-variance half is not needed
        mu = self.conv1(features)[:, :self.z_dim].float()
        if not normalize:
            return mu
        return ((mu - self._latent_stat(self.latents_mean, mu.device))
                * self._latent_stat(self.latents_inv_std, mu.device))

    def decode(self, z: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Normalised latents [B, z_dim, T, h, w] -> float32 video [B, 3, 4(T-1)+1, 16h, 16w].

        Clamped to [-1, 1] as upstream's wrapper does; `clamp=False` gives the raw decoder output.
        """
        if z.dim() != 5 or z.shape[1] != self.z_dim:
            raise ValueError(f"latents must be [B, {self.z_dim}, T, h, w], "
                             f"got shape {tuple(z.shape)}")
        if z.shape[2] < 1:
            raise ValueError("latents have no frames")
        z = (z.float() / self._latent_stat(self.latents_inv_std, z.device)
             + self._latent_stat(self.latents_mean, z.device))
        x = self.conv2(z.to(self.conv2.weight.dtype))
        cache: FrameCache = {}
        frames = [self.decoder(x[:, :, i:i + 1], cache, first_chunk=i == 0)
                  for i in range(x.shape[2])]
        video = unpatchify(torch.cat(frames, dim=2)).float()
        return video.clamp(-1.0, 1.0) if clamp else video

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu",
                        latents_mean: Sequence[float] | torch.Tensor | None = None,
                        latents_std: Sequence[float] | torch.Tensor | None = None,
                        **config: object) -> "WanVAE":
        """Load `Wan2.2_VAE.pth` (or a `.safetensors` with the same keys), frozen, in eval mode.

        The model is built on the meta device and the checkpoint tensors are put in place, so no
        memory is spent on a random initialisation. `config` overrides constructor arguments.
        """
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"VAE checkpoint {path} does not exist")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point type, got {dtype}")
        state_dict = read_state_dict(path)
        with torch.device("meta"):
            model = cls(latents_mean=latents_mean, latents_std=latents_std, **config)
        check_state_dict_matches(model, state_dict, str(path))
        model.load_state_dict(state_dict, strict=True, assign=True)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)

