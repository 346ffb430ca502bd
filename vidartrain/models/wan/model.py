"""Wan2.2 TI2V-5B diffusion transformer (DiT), with upstream parameter names and numerics.

    x -> patch_embedding (Conv3d, patch 1x2x2) -> tokens [B, L, dim]           (frame-major order)
    t -> sinusoid(256) -> time_embedding -> e ; time_projection(e) -> e0 [.., 6, dim]   (float32)
    text -> zero-pad to text_len -> text_embedding
    30 x block:  x += gate_sa  * self_attn(LN(x) * (1 + scale_sa)  + shift_sa)     (3D RoPE)
                 x += cross_attn(norm3(x), text)
                 x += gate_ffn * ffn(LN(x) * (1 + scale_ffn) + shift_ffn)
    head: Linear(LN(x) * (1 + scale) + shift) -> unpatchify -> velocity [B, 48, F, H, W]

Differences from upstream that do not change the numbers:
- Modulation is computed once per group of tokens that share a timestep (a latent frame, or a
  whole sample) and broadcast, instead of a float32 [B, L, 6, dim] tensor per block.
- Norm + modulation, q/k RMSNorm + RoPE and the FFN activation are recomputed in backward
  instead of stored (`recompute_in_backward`), so a block keeps about half the activations. Under
  torch.compile these are plain calls (one graph per block; the compiler picks what to recompute).
- Activation checkpointing per block has three modes (`set_checkpointing`): "none"; "selective"
  keeps only the outputs of the matmuls and attention and recomputes everything else in backward;
  "full" keeps only the block's input.
- A batch with one timestep per sample works for B > 1.
- RoPE angles are computed in float64 and applied in float32 (upstream rotates in complex128).
The model knows nothing of DeepSpeed; every parameter is used inside its own module's forward so
that ZeRO-3 parameter gathering (module hooks) sees it.
"""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from vidartrain.shapes import DIT_PATCH_SIZE, VAE_STRIDE

if TYPE_CHECKING:
    from vidartrain.distributed.sequence_parallel import SequenceParallel

try:
    from flash_attn import flash_attn_func
except ImportError:  # optional: PyTorch's SDPA has its own flash kernel on CUDA
    flash_attn_func = None

# Rope = (cos, sin), each float32 [B or 1, L, 1, head_dim // 2].
Rope = tuple[torch.Tensor, torch.Tensor]
# Attention mask for self-attention: boolean (True = attend) for SDPA, or a flex BlockMask.
AttentionMask = torch.Tensor | BlockMask | None


class KeyValueBuffer(Protocol):
    """A static KV cache's layer: writes a call's keys and values after the cached ones, in place,
    and returns views of all of them (no concatenation)."""

    def extend(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


# Self-attention keys/values of cached tokens: (keys, values) [B, N, Lp, D] to concatenate, or a buffer.
PastKeyValue = tuple[torch.Tensor, torch.Tensor] | KeyValueBuffer


def latent_grid(num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Token grid (F, H, W) of a video of `num_frames` x `height` x `width` pixels."""
    if (num_frames - 1) % VAE_STRIDE[0] != 0:
        raise ValueError(f"num_frames must be 4k+1 for the VAE's temporal stride 4, got {num_frames}")
    cell_h, cell_w = VAE_STRIDE[1] * DIT_PATCH_SIZE[1], VAE_STRIDE[2] * DIT_PATCH_SIZE[2]
    if height % cell_h or width % cell_w:
        raise ValueError(f"height and width must be multiples of {cell_h} and {cell_w} "
                         f"(VAE stride x patch), got {height}x{width}")
    return 1 + (num_frames - 1) // VAE_STRIDE[0], height // cell_h, width // cell_w


def num_tokens(num_frames: int, height: int, width: int) -> int:
    """DiT sequence length of one sample, e.g. 81 frames at 736x640 (HxW) -> 21*23*20 = 9660."""
    return math.prod(latent_grid(num_frames, height, width))


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """Dtype of matmul inputs: the autocast dtype when autocast is on, else the weights' dtype."""
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


class _RecomputeInBackward(torch.autograd.Function):
    """Runs a cheap function without recording its graph, keeps only its inputs, and re-runs it in
    backward. Unlike torch.utils.checkpoint the inputs go through save_for_backward, so saved-tensor
    hooks (memory accounting, CPU offload) see exactly what is kept. Autocast is off inside: the
    function states its dtypes, so forward and recompute give the same numbers."""

    @staticmethod
    def forward(ctx, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor | None) -> torch.Tensor:
        ctx.fn = fn
        ctx.save_for_backward(*inputs)
        with torch.autocast(_device_type(inputs), enabled=False):
            return fn(*inputs)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        inputs = [None if x is None else x.detach().requires_grad_(needs)
                  for x, needs in zip(ctx.saved_tensors, ctx.needs_input_grad[1:])]
        wanted = [x for x, needs in zip(inputs, ctx.needs_input_grad[1:]) if needs]
        with torch.enable_grad(), torch.autocast(_device_type(inputs), enabled=False):
            output = ctx.fn(*inputs)
        grads = iter(torch.autograd.grad(output, wanted, grad_output))
        return (None, *(next(grads) if needs else None for needs in ctx.needs_input_grad[1:]))


def _device_type(tensors: Sequence[torch.Tensor | None]) -> str:
    return next(x for x in tensors if x is not None).device.type


def recompute_in_backward(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor | None) -> torch.Tensor:
    """fn(*inputs), storing only the inputs for backward (see `_RecomputeInBackward`). Under
    torch.compile the call is plain (autocast off all the same): the custom function's backward
    would break the graph, and the compiler's own partitioner recomputes element-wise work. Without
    gradient (generation) it is plain too."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():  # nothing to save for a backward
        with torch.autocast(_device_type(inputs), enabled=False):
            return fn(*inputs)
    return _RecomputeInBackward.apply(fn, *inputs)


# What "selective" checkpointing keeps: the outputs of matmuls and SDPA attention (the expensive
# ops); everything else in a block is element-wise and recomputed in backward. flex_attention (the
# causal model's block masks on CUDA) is recomputed too: kept, it broke both paths on an H100
# (torch 2.11): compiled blocks misassigned saved tensors (a shape error), and eager checkpointing
# could not compile flex_attention inside the region. Recomputed, the stage-2 step ran at 42% MFU.
KEPT_BY_SELECTIVE_CHECKPOINTING = {
    torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}
# The flash-attn package's kernel (`attention` on CUDA where it is installed) as the operator it registers
# (flash-attn >= 2.6 on torch >= 2.4), kept like SDPA's: unlisted, backward recomputed every attention.
FLASH_ATTN_FORWARD = "flash_attn::_flash_attn_forward"


def _keep_matmuls_and_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in KEPT_BY_SELECTIVE_CHECKPOINTING or (flash_attn_func is not None and op.name() == FLASH_ATTN_FORWARD):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_checkpoint_context():
    return create_selective_checkpoint_contexts(_keep_matmuls_and_attention)


CHECKPOINTING_MODES = ("none", "selective", "full")


# ----------------------------------------------------------------------------- embeddings


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Timestep sinusoid [.., dim]: dim/2 cosines then dim/2 sines, in float64, returned float32."""
    half = dim // 2
    t = t.to(torch.float64)
    frequencies = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.unsqueeze(-1) * frequencies
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1).float()


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels of a head rotated by frame, row and column index (44/42/42 for head_dim 128)."""
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def rope_for_grid(frame_positions: torch.Tensor, height: int, width: int, head_dim: int) -> Rope:
    """RoPE cos/sin [1, F*H*W, 1, head_dim/2] for a frame-major token grid.

    `frame_positions` holds the absolute frame index of each of the F frames (the causal model
    gives frames their true positions also when they arrive one at a time). Angles are computed in
    float64 like upstream, then stored in float32."""
    device = frame_positions.device
    positions = (frame_positions.to(torch.float64),
                 torch.arange(height, dtype=torch.float64, device=device),
                 torch.arange(width, dtype=torch.float64, device=device))
    angles = []
    for axis, (pos, axis_dim) in enumerate(zip(positions, rope_axis_dims(head_dim))):
        inv_freq = 1.0 / torch.pow(10000.0, torch.arange(0, axis_dim, 2, dtype=torch.float64,
                                                         device=device) / axis_dim)
        axis_angles = torch.outer(pos, inv_freq)
        shape = [1, 1, 1, axis_angles.shape[-1]]
        shape[axis] = axis_angles.shape[0]
        angles.append(axis_angles.view(shape).expand(len(frame_positions), height, width, -1))
    angles = torch.cat(angles, dim=-1).reshape(1, -1, 1, head_dim // 2)
    return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of every head: x [B, L, dim] float32 -> same shape."""
    cos, sin = rope
    pairs = x.unflatten(-1, (-1, cos.shape[-1], 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return rotated.flatten(-3)


# ----------------------------------------------------------------------------- norms and linears


class Float32Linear(nn.Linear):
    """Linear layer that always computes in float32 (upstream runs the time embedding, time
    projection and head under float32 autocast), whatever the parameter dtype or autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float(), self.bias.float())


class WanRMSNorm(nn.Module):
    """RMSNorm over the full width (before the head split), optionally followed by RoPE."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, rope: Rope | None = None,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
        cos, sin = rope if rope is not None else (None, None)
        fn = functools.partial(_rms_norm_rope, eps=self.eps, out_dtype=out_dtype or x.dtype)
        return recompute_in_backward(fn, x, self.weight, cos, sin)


def _rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor | None,
                   sin: torch.Tensor | None, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    # Upstream: normalise in float32, round back to x's dtype, then multiply by the weight.
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype) * weight
    if cos is not None:
        normed = apply_rope(normed.float(), (cos, sin))
    return normed.to(out_dtype)


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (affine only for norm3), output in `out_dtype`."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, elementwise_affine=elementwise_affine, eps=eps)

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        fn = functools.partial(_layer_norm, eps=self.eps, out_dtype=out_dtype or x.dtype)
        return recompute_in_backward(fn, x, self.weight, self.bias)

    def modulated(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                  out_dtype: torch.dtype) -> torch.Tensor:
        """LN(x) * (1 + scale) + shift in float32. x [B, G, S, dim]; shift, scale [B, G, 1, dim]."""
        fn = functools.partial(_modulated_layer_norm, eps=self.eps, out_dtype=out_dtype)
        return recompute_in_backward(fn, x, shift, scale)


def _layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    weight = None if weight is None else weight.float()
    bias = None if bias is None else bias.float()
    return F.layer_norm(x.float(), x.shape[-1:], weight, bias, eps).to(out_dtype)


def _modulated_layer_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                          eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    normed = F.layer_norm(x.float(), x.shape[-1:], eps=eps)
    return (normed * (1 + scale) + shift).to(out_dtype)


class GeluTanhLinear(nn.Linear):
    """Linear(GELU-tanh(x)): the activation is recomputed in backward instead of stored, which
    saves the largest activation of the block ([L, ffn_dim])."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return recompute_in_backward(_gelu_tanh_linear, x, self.weight, self.bias)


def _gelu_tanh_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    # x is already in the matmul dtype (the output of ffn.0); cast the weights as autocast would.
    return F.linear(F.gelu(x, approximate="tanh"), weight.to(x.dtype), bias.to(x.dtype))


# ----------------------------------------------------------------------------- attention


@functools.cache
def _compiled_flex_attention() -> Callable[..., torch.Tensor]:
    # Uncompiled flex_attention materialises the full score matrix; compiled, it is block-sparse.
    # Default dynamic-shape policy: a second sequence length (a growing cache) compiles one
    # dynamic kernel instead of one kernel per length.
    return torch.compile(flex_attention)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask = None) -> torch.Tensor:
    """Softmax attention on [B, N, L, D] tensors. A BlockMask selects flex_attention (block-sparse,
    for the causal model on GPU); unmasked 16-bit CUDA attention uses the flash-attn package when it
    is installed (as upstream does); everything else goes to scaled_dot_product_attention."""
    if mask is None and flash_attn_func is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        # flash-attn takes [B, L, N, D]; our [B, N, L, D] tensors are transposed views of that layout.
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    if isinstance(mask, BlockMask):
        # The plain call: on the CPU (tests), and under torch.compile, which traces it into the
        # caller's graph and compiles it there (tracing the cached compiled function instead made
        # dynamo warn on CUDA that it ignores the function's lru_cache).
        if not q.is_cuda or torch.compiler.is_compiling():
            return flex_attention(q, k, v, block_mask=mask)
        # Compiled also where the caller runs compiled code eagerly (torch.compiler.set_stance, as the
        # cached generation does with training's compiled blocks): it is the kernel, not a speed-up.
        with torch.compiler.set_stance("default"):
            return _compiled_flex_attention()(q, k, v, block_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class WanSelfAttention(nn.Module):

    # Set from outside by distributed.sequence_parallel.apply_sequence_parallel: x holds this rank's
    # share of the tokens, and attention runs over all of them for a share of the heads.
    sequence_parallel: "SequenceParallel | None" = None

    def __init__(self, dim: int, num_heads: int, window_size: tuple[int, int] = (-1, -1),
                 qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if tuple(window_size) != (-1, -1):
            raise ValueError(f"only global attention (window_size (-1, -1)) is supported, got {window_size}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = tuple(window_size)
        self.qk_norm = qk_norm
        self.eps = eps
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, dim] -> [B, N, L, D] (a view: heads stay interleaved in memory)."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def project_query_key(self, x: torch.Tensor, linear: nn.Linear, norm: nn.Module,
                          rope: Rope | None) -> torch.Tensor:
        """norm(linear(x)) then RoPE, returned in x's dtype, [B, N, L, D]."""
        y = linear(x)
        if self.qk_norm:
            y = norm(y, rope, out_dtype=x.dtype)
        elif rope is not None:
            y = recompute_in_backward(lambda a, c, s: apply_rope(a.float(), (c, s)).to(a.dtype), y, *rope)
        return self.split_heads(y)

    def forward(self, x: torch.Tensor, rope: Rope, mask: AttentionMask = None,
                past_key_value: PastKeyValue | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x [B, L, dim] (matmul dtype). `past_key_value` (the causal model's KV cache, after RoPE)
        comes before this call's keys and values; the mask then covers [L, Lp + L]. Returns the
        output and this call's (key, value) after RoPE. Under sequence parallelism x, rope and the
        output cover this rank's tokens, the mask and the keys and values (returned and cached)
        all tokens of this rank's heads."""
        q = self.project_query_key(x, self.q, self.norm_q, rope)
        k = self.project_query_key(x, self.k, self.norm_k, rope)
        v = self.split_heads(self.v(x))
        sp = self.sequence_parallel
        if sp is not None:
            q, k, v = sp.sequence_to_heads(q), sp.sequence_to_heads(k), sp.sequence_to_heads(v)
        keys, values = k, v
        if isinstance(past_key_value, tuple):
            keys = torch.cat([past_key_value[0], k], dim=2)
            values = torch.cat([past_key_value[1], v], dim=2)
        elif past_key_value is not None:
            keys, values = past_key_value.extend(k, v)
        out = attention(q, keys, values, mask)
        if sp is not None:
            out = sp.heads_to_sequence(out)
        return self.o(out.transpose(1, 2).flatten(2)), (k, v)


class WanCrossAttention(WanSelfAttention):

    def context_key_value(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the text [B, N, text_len, D]; constant over a rollout, so cacheable."""
        k = self.project_query_key(context, self.k, self.norm_k, rope=None)
        return k, self.split_heads(self.v(context))

    def forward(self, x: torch.Tensor, context: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
                ) -> torch.Tensor:
        """x [B, L, dim]; context [B, text_len, dim] or its precomputed (key, value). Upstream
        attends to all text_len rows, zero padding included, so there is no mask."""
        q = self.project_query_key(x, self.q, self.norm_q, rope=None)
        k, v = context if isinstance(context, tuple) else self.context_key_value(context)
        out = attention(q, k, v)
        return self.o(out.transpose(1, 2).flatten(2))


class WanAttentionBlock(nn.Module):

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, window_size: tuple[int, int] = (-1, -1),
                 qk_norm: bool = True, cross_attn_norm: bool = False, eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.ffn_dim = ffn_dim
        self.num_heads = num_heads
        self.cross_attn_norm = cross_attn_norm
        self.eps = eps
        self.norm1 = WanLayerNorm(dim, eps)
        self.self_attn = WanSelfAttention(dim, num_heads, window_size, qk_norm, eps)
        self.norm3 = WanLayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.cross_attn = WanCrossAttention(dim, num_heads, (-1, -1), qk_norm, eps)
        self.norm2 = WanLayerNorm(dim, eps)
        # Index 1 keeps upstream's key names ffn.0 / ffn.2; the GELU lives inside ffn.2 so that its
        # output is recomputed instead of stored.
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.Identity(), GeluTanhLinear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.checkpointing = "none"  # one of CHECKPOINTING_MODES, set by WanModel.set_checkpointing

    def forward(self, x: torch.Tensor, e: torch.Tensor, context: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                rope: Rope, mask: AttentionMask = None,
                past_key_value: PastKeyValue | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x [B, L, dim] float32 residual stream; e [B, G, 6, dim] float32 time projection for G
        groups of L/G consecutive tokens that share a timestep. Returns the new x and the
        self-attention (key, value) of these tokens after RoPE. The checkpoint is taken here, inside
        the block, so that a compiled block contains it."""
        args = (x, e, context, rope, mask, past_key_value)
        if self.checkpointing == "none" or not torch.is_grad_enabled():
            return self.layers(*args)
        if self.checkpointing == "selective":
            return checkpoint(self.layers, *args, use_reentrant=False, context_fn=_selective_checkpoint_context)
        return checkpoint(self.layers, *args, use_reentrant=False)

    def layers(self, x: torch.Tensor, e: torch.Tensor, context: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
               rope: Rope, mask: AttentionMask, past_key_value: PastKeyValue | None
               ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The block's computation (see `forward`)."""
        batch, length, dim = x.shape
        groups = e.shape[1]
        dtype = compute_dtype(self.self_attn.q.weight)
        shift_sa, scale_sa, gate_sa, shift_ffn, scale_ffn, gate_ffn = (
            self.modulation.float().unsqueeze(0) + e).unsqueeze(3).unbind(2)

        def grouped(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, groups, length // groups, dim)

        def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
            return x + (grouped(y) * gate).view(batch, length, dim)

        y = self.norm1.modulated(grouped(x), shift_sa, scale_sa, dtype).view(batch, length, dim)
        y, key_value = self.self_attn(y, rope, mask, past_key_value)
        x = gated_residual(x, y, gate_sa)
        normed = self.norm3(x, out_dtype=dtype) if self.cross_attn_norm else x.to(dtype)
        x = x + self.cross_attn(normed, context)
        y = self.norm2.modulated(grouped(x), shift_ffn, scale_ffn, dtype).view(batch, length, dim)
        x = gated_residual(x, self.ffn(y), gate_ffn)
        return x, key_value


@torch.compiler.nested_compile_region
def run_block(block: WanAttentionBlock, x: torch.Tensor, e: torch.Tensor,
              context: torch.Tensor | tuple[torch.Tensor, torch.Tensor], rope: Rope, mask: AttentionMask,
              past_key_value: PastKeyValue | None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """`block(x, e, context, rope, mask, past_key_value)`. Eager, a plain call. Inside a torch.compile
    of the whole model (the static generation step) the compiler traces and compiles one block and
    stamps that code out for every block, instead of unrolling all of them: compile time no longer
    grows with depth (`python -m benchmarks.compile_time`)."""
    return block(x, e, context, rope, mask, past_key_value)


class Head(nn.Module):

    def __init__(self, dim: int, out_dim: int, patch_size: tuple[int, int, int], eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.out_dim = out_dim
        self.patch_size = tuple(patch_size)
        self.eps = eps
        self.norm = WanLayerNorm(dim, eps)
        self.head = Float32Linear(dim, math.prod(patch_size) * out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim]; e [B, G, dim] time embedding (not the projection). Float32 throughout."""
        batch, length, dim = x.shape
        shift, scale = (self.modulation.float().unsqueeze(0) + e.unsqueeze(2)).unsqueeze(3).unbind(2)
        x = x.view(batch, e.shape[1], length // e.shape[1], dim)
        return self.head(self.norm.modulated(x, shift, scale, torch.float32)).view(batch, length, -1)


# ----------------------------------------------------------------------------- the model


class WanModel(nn.Module):
    """Wan2.2 DiT. Defaults are the TI2V-5B configuration (4,999,787,712 parameters)."""

    # Set from outside by distributed.sequence_parallel.apply_sequence_parallel: the blocks then run
    # on this rank's share of the tokens (see run_blocks).
    sequence_parallel: "SequenceParallel | None" = None

    def __init__(self, model_type: str = "ti2v", patch_size: Sequence[int] = DIT_PATCH_SIZE, text_len: int = 512,
                 in_dim: int = 48, dim: int = 3072, ffn_dim: int = 14336, freq_dim: int = 256,
                 text_dim: int = 4096, out_dim: int = 48, num_heads: int = 24, num_layers: int = 30,
                 window_size: Sequence[int] = (-1, -1), qk_norm: bool = True, cross_attn_norm: bool = True,
                 eps: float = 1e-6):
        super().__init__()
        if model_type not in ("t2v", "ti2v"):
            raise ValueError(f"model_type must be 't2v' or 'ti2v' (no image/audio conditioning "
                             f"channels here), got {model_type!r}")
        if (dim // num_heads) % 2:
            raise ValueError(f"head_dim = dim / num_heads must be even for RoPE, got {dim}/{num_heads}")
        self.model_type = model_type
        self.patch_size = tuple(patch_size)
        self.text_len = text_len
        self.in_dim = in_dim
        self.dim = dim
        self.ffn_dim = ffn_dim
        self.freq_dim = freq_dim
        self.text_dim = text_dim
        self.out_dim = out_dim
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.window_size = tuple(window_size)
        self.qk_norm = qk_norm
        self.cross_attn_norm = cross_attn_norm
        self.eps = eps

        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(Float32Linear(freq_dim, dim), nn.SiLU(), Float32Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), Float32Linear(dim, dim * 6))
        self.blocks = nn.ModuleList([
            WanAttentionBlock(dim, ffn_dim, num_heads, self.window_size, qk_norm, cross_attn_norm, eps)
            for _ in range(num_layers)])
        self.head = Head(dim, out_dim, self.patch_size, eps)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def config(self) -> dict:
        """Constructor arguments (the keys of a checkpoint's config.json)."""
        return dict(model_type=self.model_type, patch_size=list(self.patch_size), text_len=self.text_len,
                    in_dim=self.in_dim, dim=self.dim, ffn_dim=self.ffn_dim, freq_dim=self.freq_dim,
                    text_dim=self.text_dim, out_dim=self.out_dim, num_heads=self.num_heads,
                    num_layers=self.num_layers, window_size=list(self.window_size), qk_norm=self.qk_norm,
                    cross_attn_norm=self.cross_attn_norm, eps=self.eps)

    @property
    def checkpointing(self) -> str:
        return self.blocks[0].checkpointing if len(self.blocks) else "none"

    def set_checkpointing(self, mode: str) -> None:
        """Activation checkpointing of every block: "none", "selective" (keep matmul and attention
        outputs, recompute the element-wise work) or "full" (keep the block input; non-reentrant)."""
        if mode not in CHECKPOINTING_MODES:
            raise ValueError(f"checkpointing must be one of {CHECKPOINTING_MODES}, got {mode!r}")
        for block in self.blocks:
            block.checkpointing = mode

    @classmethod
    def from_pretrained(cls, ckpt_dir, dtype: torch.dtype = torch.bfloat16,
                        device: torch.device | str = "cpu") -> "WanModel":
        """Build from a published checkpoint directory (config.json + safetensors, sharded or not)
        without a second full-precision copy: parameters are created on the meta device and the
        file tensors are assigned in place."""
        from .checkpoint import build_from_checkpoint_dir
        return build_from_checkpoint_dir(cls, ckpt_dir, dtype=dtype, device=device)

    # --- pieces shared with the causal model

    def embed_video(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """[B, C, F, H, W] latents -> float32 tokens [B, F*H/2*W/2, dim] and the token grid."""
        sizes = list(x.shape[2:])
        if any(size % patch for size, patch in zip(sizes, self.patch_size)):
            # The strided patch convolution would drop the rows and columns left over, and the
            # velocity would come back smaller than the latents.
            raise ValueError(f"latent grid {sizes} (F, H, W) must be a multiple of the patch size "
                             f"{list(self.patch_size)}: video height and width multiples of "
                             f"{VAE_STRIDE[1] * self.patch_size[1]}")
        x = self.patch_embedding(x.to(compute_dtype(self.patch_embedding.weight)))
        grid = tuple(x.shape[2:])
        # A new token-major tensor, not the transposed view of the convolution's output. A block's
        # output keeps its input's strides, so from the view every block ran on a feature-major
        # residual stream, its norms reducing over a strided axis (benchmarks/residual_layout.py);
        # and blocks compiled with dynamic shapes (stage 2's rollouts) guard on an input's view
        # base, so the first block compiled a second graph of each.
        tokens = x.flatten(2).transpose(1, 2)
        return tokens.to(torch.float32, memory_format=torch.contiguous_format, copy=True), grid

    def embed_text(self, context: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Zero-pad each prompt to text_len rows, then the text MLP -> [B, text_len, dim]."""
        if isinstance(context, torch.Tensor):
            if context.dim() != 3 or context.shape[-1] != self.text_dim:
                raise ValueError(f"context must be [B, text_len, {self.text_dim}], got {list(context.shape)}")
            context = list(context)
        rows = []
        for i, c in enumerate(context):
            if c.dim() != 2 or c.shape[-1] != self.text_dim or c.shape[0] > self.text_len:
                raise ValueError(f"context[{i}] must be [L <= {self.text_len}, {self.text_dim}], "
                                 f"got {list(c.shape)}")
            rows.append(F.pad(c, (0, 0, 0, self.text_len - c.shape[0])))
        padded = torch.stack(rows).to(compute_dtype(self.text_embedding[0].weight))
        return self.text_embedding(padded)

    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B, G] -> e [B, G, dim] (for the head) and e0 [B, G, 6, dim] (for the blocks), float32."""
        e = self.time_embedding(sinusoidal_embedding(t, self.freq_dim))
        e0 = self.time_projection(e).unflatten(-1, (6, self.dim))
        return e, e0

    def rope(self, grid: tuple[int, int, int]) -> Rope:
        """RoPE tables for a [F, H, W] token grid with frames at positions 0..F-1."""
        frames, height, width = grid
        positions = torch.arange(frames, device=self.patch_embedding.weight.device)
        return rope_for_grid(positions, height, width, self.head_dim)

    def run_blocks(self, x: torch.Tensor, e0: torch.Tensor, context, rope: Rope, mask: AttentionMask = None,
                   past_key_values: Sequence[PastKeyValue] | None = None
                   ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """All transformer blocks; `context` is the embedded text or one precomputed (k, v) per
        block. Returns the residual stream and every block's self-attention (key, value).

        Under sequence parallelism the tokens, their RoPE angles and timestep groups are cut to this
        rank's share before the blocks and the residual stream is gathered after them; the keys and
        values (and `past_key_values`) are then the head split of all tokens."""
        # Cross-attention would broadcast one prompt over the whole batch without a word.
        text_batch = (context[0][0] if isinstance(context, list) else context).shape[0]
        if text_batch != x.shape[0]:
            raise ValueError(f"text of {text_batch} prompts for a batch of {x.shape[0]} samples: "
                             f"give one text embedding per sample")
        sp = self.sequence_parallel
        if sp is not None:
            length = x.shape[1]
            x, e0, rope = sp.shard(x), sp.shard_groups(e0, length), (sp.shard(rope[0]), sp.shard(rope[1]))
        key_values = []
        for i, block in enumerate(self.blocks):
            x, key_value = run_block(block, x, e0, context[i] if isinstance(context, list) else context, rope, mask,
                                     past_key_values[i] if past_key_values is not None else None)
            key_values.append(key_value)
        if sp is not None:
            x = sp.gather(x)
        return x, key_values

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Head features [B, F*H*W, pt*ph*pw*C] ((pt, ph, pw, c) order, c fastest) -> [B, C, F*pt, H*ph, W*pw]."""
        pt, ph, pw = self.patch_size
        frames, height, width = grid
        return rearrange(x, "b (f h w) (pt ph pw c) -> b c (f pt) (h ph) (w pw)",
                         f=frames, h=height, w=width, pt=pt, ph=ph, pw=pw)

    # --- forward

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor], t: torch.Tensor,
                context: torch.Tensor | Sequence[torch.Tensor], seq_len: int | None = None
                ) -> torch.Tensor | list[torch.Tensor]:
        """Velocity prediction.

        x: latents [B, in_dim, F, H, W], or a list of [in_dim, F_i, H_i, W_i] (upstream style; the
           token sequences are zero-padded to `seq_len` (default: the longest) and self-attention
           ignores keys beyond each sample's length).
        t: [B] one timestep per sample, [B, F] one per latent frame, or [B, L] one per token.
        context: [B, text_len, text_dim] or a list of [L_i, text_dim] text embeddings.
        Returns float32 [B, out_dim, F, H, W] (a list of [out_dim, F_i, H_i, W_i] for list input).
        """
        if isinstance(x, torch.Tensor):
            if x.dim() != 5 or x.shape[1] != self.in_dim:
                raise ValueError(f"x must be [B, {self.in_dim}, F, H, W], got {list(x.shape)}")
            return self._forward_batch(x, t, context)
        return self._forward_list(list(x), t, context, seq_len)

    def _forward_batch(self, x: torch.Tensor, t: torch.Tensor, context) -> torch.Tensor:
        tokens, grid = self.embed_video(x)
        t_groups = group_timesteps(t, x.shape[0], grid)
        e, e0 = self.embed_time(t_groups)
        x_out, _ = self.run_blocks(tokens, e0, self.embed_text(context), self.rope(grid))
        return self.unpatchify(self.head(x_out, e), grid)

    def _forward_list(self, xs: list[torch.Tensor], t: torch.Tensor, context, seq_len: int | None
                      ) -> list[torch.Tensor]:
        embedded = [self.embed_video(u.unsqueeze(0)) for u in xs]
        grids = [grid for _, grid in embedded]
        lengths = [math.prod(grid) for grid in grids]
        seq_len = seq_len or max(lengths)
        if max(lengths) > seq_len:
            raise ValueError(f"seq_len {seq_len} is shorter than the longest sample ({max(lengths)} tokens)")
        tokens = torch.cat([F.pad(u, (0, 0, 0, seq_len - u.shape[1])) for u, _ in embedded])
        # Tokens share a timestep per latent frame only if every sample has the same frame size.
        frame_sizes = {grid[1] * grid[2] for grid in grids}
        frame_size = min(frame_sizes) if len(frame_sizes) == 1 and seq_len % min(frame_sizes) == 0 else 1
        padded_grid = (seq_len // frame_size, frame_size, 1)
        e, e0 = self.embed_time(group_timesteps(t, len(xs), padded_grid))
        rope = self._padded_rope(grids, seq_len)
        mask = None
        if min(lengths) < seq_len:
            key_positions = torch.arange(seq_len, device=tokens.device)
            mask = (key_positions < torch.tensor(lengths, device=tokens.device)[:, None]).view(len(xs), 1, 1, seq_len)
        x_out, _ = self.run_blocks(tokens, e0, self.embed_text(context), rope, mask)
        head = self.head(x_out, e)
        return [self.unpatchify(head[i:i + 1, :length], grid)[0]
                for i, (length, grid) in enumerate(zip(lengths, grids))]

    def _padded_rope(self, grids: list[tuple[int, int, int]], seq_len: int) -> Rope:
        """Per-sample RoPE tables padded to seq_len; padding positions are left unrotated."""
        cos_rows, sin_rows = [], []
        for grid in grids:
            cos, sin = self.rope(grid)
            pad = seq_len - cos.shape[1]
            cos_rows.append(F.pad(cos, (0, 0, 0, 0, 0, pad), value=1.0))
            sin_rows.append(F.pad(sin, (0, 0, 0, 0, 0, pad), value=0.0))
        return torch.cat(cos_rows), torch.cat(sin_rows)


def group_timesteps(t: torch.Tensor, batch: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """Timesteps [B, G] for G equal groups of consecutive tokens that share one timestep.

    t [B] -> one group per sample; [B, F] -> one per latent frame; [B, L] per token -> per frame
    when every frame's tokens agree (all training paths: the modulation is then computed per frame
    instead of per token), else per token."""
    frames, height, width = grid
    length = frames * height * width
    if t.dim() == 1 and t.shape[0] == batch:
        return t.view(batch, 1)
    if t.dim() == 2 and t.shape[0] == batch and t.shape[1] == frames:
        return t
    if t.dim() == 2 and t.shape[0] == batch and t.shape[1] == length:
        per_frame = t.view(batch, frames, height * width)
        if bool((per_frame == per_frame[..., :1]).all()):
            return per_frame[..., 0]
        return t
    raise ValueError(f"t must be [B], [B, F] or [B, L] with B={batch}, F={frames}, L={length}; "
                     f"got {list(t.shape)}")
