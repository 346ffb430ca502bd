"""umT5 encoder, the text encoder of Wan2.2: T5 v1.1 encoder blocks with per-block position bias.

Structure and parameter names follow upstream Wan2.2 ``wan/modules/t5.py`` (``T5Encoder``), so the
published ``models_t5_umt5-xxl-enc-bf16.pth`` (242 tensors) loads strictly:

    x = token_embedding(ids)
    for each block:  x = x + attn(norm1(x), key mask, relative position bias)
                     x = x + ffn(norm2(x))            ffn = fc2(fc1(x) * gelu_tanh(gate(x)))
    x = norm(x)                                        norm = RMS norm, no mean, no bias

T5 particulars: no biases anywhere, no 1/sqrt(d) attention scaling (folded into the weights), the
relative position bias is the only position information, and padded keys are masked by adding the
dtype's most negative number to the bias. Padded query rows are computed like any other row; callers
keep the first ``mask.sum()`` rows of each prompt.
"""
import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from vidartrain.errors import ArchitectureMismatch, CheckpointError
from vidartrain.models.wan.checkpoint import read_state_dict

__all__ = ["UMT5Encoder", "load_umt5_encoder", "check_state_dict_matches"]


class T5RMSNorm(nn.Module):
    """T5 layer norm: scale by the root mean square (in float32), no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


class T5RelativePositionBias(nn.Module):
    """Learned per-head bias indexed by the bucketed key-minus-query distance (bidirectional)."""

    def __init__(self, num_buckets: int, num_heads: int, max_distance: int = 128) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def bucket(self, relative_position: torch.Tensor) -> torch.Tensor:
        """Half the buckets per direction (keys after the query get the upper half); within a half,
        distances below half of it are exact and the rest are log-spaced up to ``max_distance``."""
        buckets_per_side = self.num_buckets // 2
        direction_offset = (relative_position > 0).long() * buckets_per_side
        distance = relative_position.abs()
        max_exact = buckets_per_side // 2
        # Clamp before the log so that exact distances (< max_exact) never reach log(0).
        log_ratio = torch.log(distance.clamp(min=max_exact).float() / max_exact)
        log_bucket = max_exact + (
            log_ratio / math.log(self.max_distance / max_exact) * (buckets_per_side - max_exact)
        ).long()
        log_bucket = log_bucket.clamp(max=buckets_per_side - 1)
        return direction_offset + torch.where(distance < max_exact, distance, log_bucket)

    def forward(self, length: int) -> torch.Tensor:
        """Bias [1, num_heads, length, length] for self-attention over ``length`` tokens."""
        positions = torch.arange(length, device=self.embedding.weight.device)
        relative_position = positions[None, :] - positions[:, None]  # key - query
        bias = self.embedding(self.bucket(relative_position))  # [Lq, Lk, heads]
        return bias.permute(2, 0, 1).unsqueeze(0)


class T5Attention(nn.Module):
    """Multi-head self-attention without scaling; position enters only through the additive bias."""

    def __init__(self, dim: int, dim_attn: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if dim_attn % num_heads:
            raise ValueError(f"dim_attn {dim_attn} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, heads * head_dim] -> [B, heads, L, head_dim]."""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x: [B, L, dim]; bias: [B or 1, heads, L, L] (position bias plus key mask)."""
        q, k, v = (self.split_heads(proj(x)) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        return self.dropout(self.o(out.transpose(1, 2).flatten(2)))


class T5GatedFeedForward(nn.Module):
    """Gated-GELU feed-forward of T5 v1.1: fc2(fc1(x) * gelu_tanh(gate(x)))."""

    def __init__(self, dim: int, dim_ffn: int, dropout: float) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(self.fc1(x) * self.gate(x))))


class T5EncoderBlock(nn.Module):
    """Pre-norm residual block; owns its relative position bias unless it is shared."""

    def __init__(self, dim: int, dim_attn: int, dim_ffn: int, num_heads: int, num_buckets: int,
                 shared_pos: bool, dropout: float) -> None:
        super().__init__()
        self.norm1 = T5RMSNorm(dim)
        self.attn = T5Attention(dim, dim_attn, num_heads, dropout)
        self.norm2 = T5RMSNorm(dim)
        self.ffn = T5GatedFeedForward(dim, dim_ffn, dropout)
        self.pos_embedding = None if shared_pos else T5RelativePositionBias(num_buckets, num_heads)

    def forward(self, x: torch.Tensor, key_mask_bias: torch.Tensor,
                shared_position_bias: torch.Tensor | None) -> torch.Tensor:
        position_bias = (shared_position_bias if self.pos_embedding is None
                         else self.pos_embedding(x.size(1)))
        x = x + self.attn(self.norm1(x), position_bias + key_mask_bias)
        return x + self.ffn(self.norm2(x))


class UMT5Encoder(nn.Module):
    """umT5 encoder (upstream ``T5Encoder``); defaults are umT5-XXL, 5,680,910,336 parameters."""

    def __init__(self, vocab: int = 256384, dim: int = 4096, dim_attn: int = 4096,
                 dim_ffn: int = 10240, num_heads: int = 64, num_layers: int = 24,
                 num_buckets: int = 32, shared_pos: bool = False, dropout: float = 0.1) -> None:
        super().__init__()
        self.dim = dim
        self.token_embedding = nn.Embedding(vocab, dim)
        self.pos_embedding = T5RelativePositionBias(num_buckets, num_heads) if shared_pos else None
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            T5EncoderBlock(dim, dim_attn, dim_ffn, num_heads, num_buckets, shared_pos, dropout)
            for _ in range(num_layers))
        self.norm = T5RMSNorm(dim)

    def key_mask_bias(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[B, L] mask (nonzero = real token) -> additive [B, 1, 1, L] bias hiding padded keys."""
        bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        bias = bias.masked_fill(mask == 0, torch.finfo(dtype).min)
        return bias[:, None, None, :]

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids, mask: [B, L] integer tensors -> hidden states [B, L, dim] (padded rows included)."""
        if ids.ndim != 2:
            raise ValueError(f"ids must have shape [batch, length], got {tuple(ids.shape)}")
        if mask is None:
            mask = torch.ones_like(ids)
        elif mask.shape != ids.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} differs from ids shape "
                             f"{tuple(ids.shape)}")
        x = self.dropout(self.token_embedding(ids))
        key_mask_bias = self.key_mask_bias(mask, x.dtype)
        shared_position_bias = (None if self.pos_embedding is None
                                else self.pos_embedding(ids.size(1)))
        for block in self.blocks:
            x = block(x, key_mask_bias, shared_position_bias)
        return self.dropout(self.norm(x))


def check_state_dict_matches(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                             source: str) -> None:
    """Raise an ArchitectureMismatch naming the offending keys unless names and shapes match exactly."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    if missing or unexpected:
        raise ArchitectureMismatch(f"{source}: state_dict keys do not match {type(model).__name__}: "
                              f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''} "
                              f"({len(missing)} in all), unexpected {unexpected[:10]}"
                              f"{' ...' if len(unexpected) > 10 else ''} ({len(unexpected)} in all)")
    for key, tensor in expected.items():
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise ArchitectureMismatch(f"{source}: key {key!r} has shape {tuple(state_dict[key].shape)}, "
                                  f"{type(model).__name__} expects {tuple(tensor.shape)}")


def load_umt5_encoder(checkpoint: str | Path, dtype: torch.dtype = torch.bfloat16,
                      device: str | torch.device = "cpu",
                      config: Mapping[str, int | float | bool] | None = None) -> UMT5Encoder:
    """Build the encoder on the meta device and load a plain ``torch.save``d state_dict into place.

    ``config`` holds ``UMT5Encoder`` constructor arguments (umT5-XXL when None). The file is memory
    mapped, so the 11 GB bf16 checkpoint is not read into memory twice. Returns the encoder in eval
    mode with gradients off, as the frozen text encoder of training.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise CheckpointError(f"umT5 encoder checkpoint {checkpoint} does not exist")
    with torch.device("meta"):
        model = UMT5Encoder(**(config or {}))
    state_dict = read_state_dict(checkpoint)
    check_state_dict_matches(model, state_dict, str(checkpoint))
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
