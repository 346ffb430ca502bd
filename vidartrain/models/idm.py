"""Masked inverse dynamics model (IDM) of Vidar: which action moved the robot in this frame?

A U-Net looks at one frame and predicts a soft mask m = (1 + tanh(logits)) / 2 of the pixels that
matter for the action (the arms and grippers). The mask is thresholded at 0.5; a straight-through
estimator keeps the hard mask in the forward pass and the soft mask's gradient in the backward pass.
A ResNet-50-style head reads the masked frame and regresses the normalised action, which is
de-normalised with the action statistics stored as buffers (`train_mean`, `train_std`).

Module and parameter names follow the published `idm.pt` (`model.mask_model.*`,
`model.resnet_model.*`, `train_mean`, `train_std`: 456 state-dict entries, 92,713,423 trainable
parameters), so it loads strictly and our exports load into the upstream code.

The same soft mask, resized back to the video's frame size and pooled to the VAE's latent grid,
weights the embodiment-aware diffusion loss (Eq. 7): see `IDM.get_mask` and `pool_mask_to_latent`.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vidartrain.errors import CheckpointError
from vidartrain.files import write_atomically
from vidartrain.models.wan.checkpoint import load_torch_file

# Action statistics of the published IDM (14 = 2 arms x (6 joints + 1 gripper)); a checkpoint's
# buffers replace them.
DEFAULT_ACTION_MEAN = (-0.21462356, 1.08612859, 0.79082996, -0.32984692, 0.06043469, -0.02821355,
                       0.67331159, 0.23655808, 1.11126196, 0.82665974, -0.34555018, -0.01577058,
                       0.00672665, 0.67294836)
DEFAULT_ACTION_STD = (0.32683188, 0.99261242, 0.78208578, 0.66655099, 0.24993508, 0.57341701,
                      0.45221126, 0.31501710, 1.01746464, 0.80794698, 0.71788806, 0.26377317,
                      0.62372464, 0.45181707)

IDM_INPUT_SIZE = (518, 518)


def idm_input_size(height: int, width: int) -> tuple[int, int]:
    """IDM input size for frames of height x width: the published 518x518, or the frame's own size
    when it is smaller in both dimensions (tiny debug runs: not blown up; the IDM works at any size).
    The one rule for every caller (IDM training, Eq. 7 masks online and pre-encoded, sampling), so a
    mask does not depend on where it was computed."""
    if height < IDM_INPUT_SIZE[0] and width < IDM_INPUT_SIZE[1]:
        return height, width
    return IDM_INPUT_SIZE
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------
# Mask network: a 5-level U-Net (base width 64) ending in one logit per pixel.
# ---------------------------------------------------------------------------------------------

class DoubleConv(nn.Sequential):
    """(conv 3x3 -> BN -> ReLU) twice, convolutions without bias."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None):
        mid_channels = mid_channels or out_channels
        super().__init__(
            nn.Conv2d(in_channels, mid_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """Halve the resolution (max-pool, floor on odd sizes), then a DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.MaxPool2d(2, 2), DoubleConv(in_channels, out_channels))


class Up(nn.Module):
    """Upsample the deeper map to the skip connection's size, concatenate [upsampled, skip], convolve.

    The target size is the skip's size on every call (not a fixed factor of 2), so odd input sizes
    whose max-pools floored come back to exactly the right size, and one model serves any size.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = DoubleConv(in_channels, out_channels, in_channels // 2)

    def forward(self, deeper: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        upsampled = F.interpolate(deeper, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        return self.conv(torch.cat([upsampled, skip], dim=1))


class UNet(nn.Module):
    """Pixel-wise mask logits of an image: [B, 3, H, W] -> [B, 1, H, W]."""

    def __init__(self, in_channels: int = 3, out_channels: int = 1, base: int = 64):
        super().__init__()
        widths = [base, base * 2, base * 4, base * 8, base * 16]  # 64 .. 1024
        self.in_conv = DoubleConv(in_channels, widths[0])
        # The bottleneck keeps 1024 channels, so its Up sees 1024 + 1024 = 2048.
        self.downs = nn.ModuleList(
            [Down(widths[k], widths[k + 1]) for k in range(4)] + [Down(widths[4], widths[4])])
        self.ups = nn.ModuleList([
            Up(widths[4] * 2, widths[3]),
            Up(widths[3] * 2, widths[2]),
            Up(widths[2] * 2, widths[1]),
            Up(widths[1] * 2, widths[0]),
            Up(widths[0] * 2, widths[0]),
        ])
        self.out = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.in_conv(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.out(x)


# ---------------------------------------------------------------------------------------------
# Action head: ResNet-50 layout (bottlenecks 3, 4, 6, 3) regressing the normalised action.
# ---------------------------------------------------------------------------------------------

class Bottleneck(nn.Module):
    """1x1 -> BN -> 3x3 (stride) -> BN -> ReLU -> 1x1 (x4) -> BN, plus shortcut, then ReLU.

    As published, there is no ReLU between the first BN and the 3x3 convolution; the Sequential
    indices (0, 1, 2, 3, 5, 6 hold weights) are part of the checkpoint format.
    """

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int):
        super().__init__()
        out_channels = width * self.expansion
        self.residual_function = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.residual_function(x) + self.shortcut(x))


def bottleneck_stage(in_channels: int, width: int, num_blocks: int, stride: int) -> nn.Sequential:
    """One ResNet stage: the first block changes stride and width, the others keep them."""
    blocks = [Bottleneck(in_channels, width, stride)]
    blocks += [Bottleneck(width * Bottleneck.expansion, width, 1) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


class ResNetActionHead(nn.Module):
    """Normalised action of a (masked) image: [B, 3, H, W] -> [B, num_actions].

    `width` is the stem's width (64 in ResNet-50); stage k works at width * 2**k with
    `blocks[k]` bottlenecks ((3, 4, 6, 3) in ResNet-50)."""

    def __init__(self, num_actions: int, in_channels: int = 3, width: int = 64,
                 blocks: Sequence[int] = (3, 4, 6, 3)):
        super().__init__()
        if len(blocks) != 4 or min(blocks) < 1:
            raise ValueError(f"ResNetActionHead: blocks {tuple(blocks)}: expected 4 stages of >= 1 block")
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        expanded = width * Bottleneck.expansion
        self.conv2_x = bottleneck_stage(width, width, blocks[0], stride=1)
        self.conv3_x = bottleneck_stage(expanded, width * 2, blocks[1], stride=2)
        self.conv4_x = bottleneck_stage(expanded * 2, width * 4, blocks[2], stride=2)
        self.conv5_x = bottleneck_stage(expanded * 4, width * 8, blocks[3], stride=2)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(expanded * 8, num_actions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv5_x(self.conv4_x(self.conv3_x(self.conv2_x(self.conv1(x)))))
        return self.fc(self.avg_pool(x).flatten(1))


# ---------------------------------------------------------------------------------------------
# Masked IDM
# ---------------------------------------------------------------------------------------------

def soft_mask_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Soft mask in (0, 1): (1 + tanh(logits)) / 2."""
    return (1 + torch.tanh(logits)) / 2


def straight_through_hard_mask(soft_mask: torch.Tensor) -> torch.Tensor:
    """Forward value: the hard mask (soft >= 0.5 -> 1, else 0); gradient: that of the soft mask."""
    hard = (soft_mask >= 0.5).to(soft_mask.dtype)
    return (hard - soft_mask).detach() + soft_mask


class MaskedActionNet(nn.Module):
    """U-Net mask -> hard mask (straight-through) -> masked image -> ResNet -> normalised action."""

    def __init__(self, num_actions: int, architecture: IdmArchitecture):
        super().__init__()
        self.mask_model = UNet(3, 1, base=architecture.unet_width)
        self.resnet_model = ResNetActionHead(num_actions, 3, architecture.resnet_width,
                                             architecture.resnet_blocks)

    def soft_mask(self, images: torch.Tensor) -> torch.Tensor:
        return soft_mask_from_logits(self.mask_model(images))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = self.soft_mask(images)
        normalized_actions = self.resnet_model(images * straight_through_hard_mask(mask))
        return normalized_actions, mask


@dataclass(frozen=True)
class IdmArchitecture:
    """Widths of the IDM's two networks; the defaults are the published 92.7M-parameter model.

    Smaller widths (`model.idm_config` in a training config, e.g. the tiny debug configs) give the
    same model at a fraction of the cost. A checkpoint's architecture is read back from its tensor
    shapes (`IdmArchitecture.of_state_dict`), so `idm.pt` needs no extra fields."""

    unet_width: int = 64  # U-Net base width (levels at 1, 2, 4, 8, 16 times it)
    resnet_width: int = 64  # ResNet stem width (stages at 1, 2, 4, 8 times it)
    resnet_blocks: tuple[int, ...] = (3, 4, 6, 3)  # bottlenecks per ResNet stage

    @classmethod
    def from_config(cls, overrides: Mapping | None, source: str) -> "IdmArchitecture":
        """Defaults replaced by the entries of `overrides` (a config mapping); unknown keys or
        non-positive widths raise a ValueError naming `source`."""
        overrides = dict(overrides or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"{source}: unknown IDM architecture keys {unknown}; expected some of {sorted(known)}")
        if "resnet_blocks" in overrides:
            overrides["resnet_blocks"] = tuple(overrides["resnet_blocks"])
        architecture = cls(**overrides)
        widths = (architecture.unet_width, architecture.resnet_width, *architecture.resnet_blocks)
        if len(architecture.resnet_blocks) != 4 or not all(isinstance(w, int) and w >= 1 for w in widths):
            raise ValueError(f"{source}: {architecture}: widths must be positive integers and resnet_blocks "
                             f"4 positive integers")
        return architecture

    @classmethod
    def of_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> "IdmArchitecture":
        """The architecture an IDM state dict was saved from (published: the defaults)."""
        unet = state_dict.get("model.mask_model.in_conv.0.weight")
        resnet = state_dict.get("model.resnet_model.conv1.0.weight")
        if unet is None or resnet is None:
            return cls()  # not an IDM state dict: the strict load that follows names the keys
        blocks = []
        for stage in ("conv2_x", "conv3_x", "conv4_x", "conv5_x"):
            prefix = f"model.resnet_model.{stage}."
            blocks.append(len({key[len(prefix):].split(".")[0] for key in state_dict if key.startswith(prefix)}))
        return cls(int(unet.shape[0]), int(resnet.shape[0]), tuple(blocks))


class IDM(nn.Module):
    """Masked inverse dynamics model: preprocessed frames [B, 3, H, W] -> actions [B, num_actions].

    `action_mean` / `action_std` are the statistics the head's output is de-normalised with; their
    length is the action dimension. `architecture` sets the widths (default: the published IDM).
    """

    def __init__(self, action_mean: Sequence[float] = DEFAULT_ACTION_MEAN,
                 action_std: Sequence[float] = DEFAULT_ACTION_STD,
                 architecture: IdmArchitecture = IdmArchitecture()):
        super().__init__()
        if len(action_mean) != len(action_std):
            raise ValueError(f"IDM: action_mean has {len(action_mean)} entries but action_std has "
                             f"{len(action_std)}; they must describe the same action dimensions")
        self.architecture = architecture
        self.model = MaskedActionNet(len(action_mean), architecture)
        self.register_buffer("train_mean", torch.tensor(action_mean, dtype=torch.float32))
        self.register_buffer("train_std", torch.tensor(action_std, dtype=torch.float32))

    def forward(self, images: torch.Tensor, return_mask: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Actions of preprocessed frames (see `preprocess_frames`), and the soft mask [B, 1, H, W]
        when `return_mask`."""
        normalized_actions, mask = self.model(images)
        actions = normalized_actions * self.train_std + self.train_mean
        return (actions, mask) if return_mask else actions

    @torch.no_grad()
    def get_mask(self, frames: torch.Tensor, frames_per_batch: int = 16,
                 input_size: tuple[int, int] = IDM_INPUT_SIZE) -> torch.Tensor:
        """Soft IDM mask of every frame of a video, at the video's own frame size.

        frames: [B, 3, F, H, W] in [-1, 1] (the clean video). Returns [B, F, H, W] in the model's
        dtype. Frames go through the mask network `frames_per_batch` at a time to bound memory, at
        `input_size` (the published IDM works at 518x518); the mask is resized back to H x W
        (bilinear, antialiased, as the Vidar server does).
        """
        if self.training:
            raise RuntimeError("IDM.get_mask runs the frozen mask network: call idm.eval() first "
                               "(train mode would normalise with batch statistics and update them)")
        if frames.ndim != 5 or frames.shape[1] != 3:
            raise ValueError(f"IDM.get_mask expects frames [B, 3, F, H, W], got {tuple(frames.shape)}")
        batch, _, num_frames, height, width = frames.shape
        weight = self.model.mask_model.out.weight
        flat = frames.transpose(1, 2).flatten(0, 1)  # [B*F, 3, H, W], frame-major per sample
        masks = []
        for chunk in flat.split(frames_per_batch):
            images = preprocess_frames(chunk.to(weight.device), input_size).to(weight.dtype)
            mask = self.model.soft_mask(images).float()
            mask = F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=False,
                                 antialias=True)
            masks.append(mask.to(weight.dtype))
        return torch.cat(masks).reshape(batch, num_frames, height, width)


def preprocess_frames(frames: torch.Tensor, size: tuple[int, int] = IDM_INPUT_SIZE) -> torch.Tensor:
    """Frames [N, 3, H, W] in [-1, 1] -> IDM input [N, 3, 518, 518] float32, as the Vidar server
    does it: clamp and map to [0, 1], bilinear antialiased resize to `size` (aspect ratio not
    kept), ImageNet normalisation. Computed in float32 (CPU has no 16-bit antialiased resize)."""
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"preprocess_frames expects frames [N, 3, H, W], got {tuple(frames.shape)}")
    if not frames.is_floating_point():
        raise TypeError(f"preprocess_frames expects floating-point frames in [-1, 1], got {frames.dtype} "
                        f"(map uint8 video with vidartrain.data.transforms.to_model_range first)")
    images = frames.float().clamp(-1, 1).add(1).div(2)
    images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


# ---------------------------------------------------------------------------------------------
# Mask pooling to the VAE latent grid and to DiT tokens (Eq. 7)
# ---------------------------------------------------------------------------------------------

def pool_mask_to_latent(mask: torch.Tensor, spatial: int = 16, temporal: int = 4) -> torch.Tensor:
    """Per-frame pixel mask [B, F, H, W] -> latent grid [B, 1 + (F-1)/temporal, H/spatial, W/spatial].

    Matches the VAE's causal stride: latent frame 0 is pixel frame 0 alone, each later latent frame
    the mean of the next `temporal` frames; spatially the mean over each spatial x spatial patch.
    81 frames at 736x640 -> [B, 21, 46, 40].
    """
    if mask.ndim != 4:
        raise ValueError(f"pool_mask_to_latent expects a mask [B, F, H, W], got {tuple(mask.shape)}")
    _, num_frames, height, width = mask.shape
    if (num_frames - 1) % temporal:
        raise ValueError(f"pool_mask_to_latent: {num_frames} frames; expected 1 + {temporal}k "
                         f"(first frame alone, then groups of {temporal})")
    if height % spatial or width % spatial:
        raise ValueError(f"pool_mask_to_latent: frame size {height}x{width} is not a multiple of "
                         f"the spatial stride {spatial}")
    volume = mask.unsqueeze(1)  # [B, 1, F, H, W] for 3-d pooling
    pooled = [F.avg_pool3d(volume[:, :, :1], kernel_size=(1, spatial, spatial))]
    if num_frames > 1:
        pooled.append(F.avg_pool3d(volume[:, :, 1:], kernel_size=(temporal, spatial, spatial)))
    return torch.cat(pooled, dim=2).squeeze(1)


def pool_mask_to_tokens(mask: torch.Tensor, spatial: int = 16, temporal: int = 4,
                        patch: tuple[int, int] = (2, 2)) -> torch.Tensor:
    """Per-frame pixel mask [B, F, H, W] -> one value per DiT token [B, L].

    Pools to the latent grid, then averages each patch of the DiT's patch embedding (1, 2, 2);
    tokens are ordered (frame, row, column) as the DiT flattens them. 81 frames at 736x640 ->
    L = 21 * 23 * 20 = 9,660.
    """
    latent = pool_mask_to_latent(mask, spatial, temporal)
    if latent.shape[-2] % patch[0] or latent.shape[-1] % patch[1]:
        raise ValueError(f"pool_mask_to_tokens: latent grid {tuple(latent.shape[-2:])} is not a "
                         f"multiple of the patch {patch}")
    return F.avg_pool2d(latent, kernel_size=patch).flatten(1)


# ---------------------------------------------------------------------------------------------
# Checkpoints (upstream `idm.pt` format)
# ---------------------------------------------------------------------------------------------

def save_idm(model: IDM, path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None,
             step: int = 0) -> None:
    """Write `{"model_state_dict", "optimizer_state_dict" (when given), "step"}` as upstream's
    `train_idm.py` does; atomically (temporary file in the same folder, then `os.replace`)."""
    path = Path(path)
    checkpoint = {"model_state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                  "step": int(step)}
    if optimizer is not None:
        checkpoint["optimizer_state_dict"] = optimizer.state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: torch.save(checkpoint, tmp))


def save_idm_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, step: int) -> None:
    """idm.pt of an IDM state dict (e.g. gathered from a training engine): the model it fits, in
    float32, written by `save_idm` as upstream's `train_idm.py` does ({"model_state_dict", "step"})."""
    num_actions = state_dict["train_mean"].numel()
    model = IDM([0.0] * num_actions, [1.0] * num_actions, IdmArchitecture.of_state_dict(state_dict))
    model.load_state_dict(state_dict, strict=True)
    save_idm(model.float(), path, step=step)


def is_idm_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return "train_mean" in state_dict and "model.mask_model.in_conv.0.weight" in state_dict


def idm_state_dict_from_checkpoint(checkpoint: Mapping, source: str) -> Mapping[str, torch.Tensor]:
    """The model state dict inside an `idm.pt` payload: `{"model_state_dict": ...}` or bare."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{source}: expected an IDM state dict (or a dict with 'model_state_dict'), "
                              f"got a {type(checkpoint).__name__}")
    if "model_state_dict" in checkpoint:
        checkpoint = checkpoint["model_state_dict"]
    not_tensors = [k for k, v in checkpoint.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{source}: expected an IDM state dict (or a dict with 'model_state_dict'); "
                              f"these entries are not tensors: {not_tensors[:10]}")
    return checkpoint


def load_idm(path: str | os.PathLike, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> IDM:
    """Load a published or exported `idm.pt` strictly; returns the IDM in eval mode, its networks in
    `dtype` and its action statistics (`train_mean`, `train_std`) in float32, as trained: the actions
    come out de-normalised in float32 (in bf16 the statistics alone would move them by up to ~0.01).

    The action dimension follows the checkpoint's `train_mean`, the widths its tensor shapes. Missing, unexpected or mis-shaped
    keys raise a CheckpointError that names them.
    """
    state_dict = idm_state_dict_from_checkpoint(load_torch_file(path, mmap=False), str(path))
    num_actions = state_dict["train_mean"].numel() if "train_mean" in state_dict else 14
    with torch.device("meta"):
        model = IDM([0.0] * num_actions, [1.0] * num_actions, IdmArchitecture.of_state_dict(state_dict))
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = [f"{k}: {tuple(state_dict[k].shape)} (expected {tuple(expected[k])})"
                  for k in sorted(set(expected) & set(state_dict)) if state_dict[k].shape != expected[k]]
    if missing or unexpected or mis_shaped:
        raise CheckpointError(f"{path} does not match the IDM: missing keys {missing[:10]} "
                              f"({len(missing)}), unexpected keys {unexpected[:10]} ({len(unexpected)}), "
                              f"mis-shaped {mis_shaped[:10]}")
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.model.to(dtype=dtype)
    return model.to(device=device).eval()
