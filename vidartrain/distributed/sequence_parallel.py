"""Ulysses sequence parallelism: the tokens of one sample split across a group of ranks.

`distributed.sequence_parallel_size` = SP ranks form a group (consecutive global ranks) that works
on the same samples; data parallelism runs over the world / SP groups. Inside a group, rank r holds
tokens [r L/SP, (r+1) L/SP) of every sample through the transformer blocks: norms, modulation, MLPs
and cross attention (the text is replicated) are per token and need nothing from the others. Self
attention needs every token, so q, k and v go through an all-to-all that trades the sequence split
for a head split ([B, N, L/SP, D] -> [B, N/SP, L, D]); each rank attends over the whole sequence for
its N/SP heads with the full-sequence mask (SDPA or flex), and a second all-to-all brings the output
back to the sequence split. The keys and values a block returns (for the causal model's KV cache)
stay in the head split, so cached rollouts need no further communication.

The model is parallelised from outside (`apply_sequence_parallel`): `WanModel.run_blocks` shards
the tokens, their RoPE tables and timestep groups before the blocks and gathers after them, and
the self-attention modules move q, k and v to the head split and the output back. Nothing else in
the model changes.

Gradients. Every rank of a group computes the same loss on the same gathered output. The gather's
backward sums the output gradient over the group (an all-reduce; gloo has no reduce-scatter), so a
rank's parameter gradient is SP x the part of dL/dtheta that flows through its own tokens, and the
sum over the group is SP x dL/dtheta. DeepSpeed treats all world ranks as data parallel (ZeRO
partitions over all of them, as DeepSpeed's own Ulysses does) and averages gradients over the
world: (1 / (DP x SP)) x sum over groups of SP x dL/dtheta = the mean over the DP groups of
dL/dtheta, the gradient of an SP = 1 run with the same samples.

No `mpu` goes to `deepspeed.initialize`: with one, DeepSpeed 0.19.8 reduces over the same world-wide
group but divides by world / SP in some paths (`DeepSpeedEngine._reduce_non_expert_gradients`), a
convention each ZeRO stage would have to share; DeepSpeed's plain data-parallel view plus the summing
gather gives the SP = 1 gradient without it (tested with ZeRO-3).

DeepSpeed's `deepspeed.sequence.layer.DistributedAttention` is not used: it takes [B, L, N, D]
tensors and runs the attention itself, but the causal model concatenates cached keys and values
between the all-to-all and the attention and keeps this call's head-split keys and values for its
cache, which a wrapper around the attention call cannot give.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vidartrain.errors import ConfigError


def divisors(n: int) -> list[int]:
    """The sizes that split `n` (heads, ranks of a node) evenly: what an error offers instead."""
    return [d for d in range(1, n + 1) if n % d == 0]


def check_sequence_parallel_size(size: int, world_size: int | None = None, num_heads: int | None = None) -> None:
    """Refuse an SP size that cannot split the world into groups or the heads across a group."""
    if size < 1:
        raise ConfigError(f"`distributed.sequence_parallel_size` = {size}: must be >= 1")
    if world_size is not None and world_size % size:
        raise ConfigError(f"`distributed.sequence_parallel_size` = {size} does not divide the world size "
                          f"{world_size}: ranks form groups of {size} consecutive ranks")
    if num_heads is not None and num_heads % size:
        raise ConfigError(f"`distributed.sequence_parallel_size` = {size} does not divide the DiT's {num_heads} "
                          f"attention heads (each rank attends with heads / SP of them); use one of "
                          f"{divisors(num_heads)}")


@dataclass(frozen=True)
class ParallelLayout:
    """Where a rank sits: its SP group (consecutive ranks) and its data-parallel index."""

    sp_size: int
    sp_rank: int  # index inside the SP group
    dp_size: int  # number of SP groups
    dp_rank: int  # which SP group (what the loader and the noise are keyed by)

    @classmethod
    def of(cls, rank: int, world_size: int, sp_size: int) -> "ParallelLayout":
        check_sequence_parallel_size(sp_size, world_size)
        return cls(sp_size, rank % sp_size, world_size // sp_size, rank // sp_size)


def group_leaves_node(layout: ParallelLayout, rank: int, local_rank: int, ranks_on_node: int) -> bool:
    """Whether the SP group of `rank` reaches beyond its node, which holds ranks rank - local_rank ..
    rank - local_rank + ranks_on_node - 1 (deepspeed and torchrun number a node's ranks consecutively).
    Such a group's all-to-alls, two per block and pass, cross the network instead of NVLink."""
    first_on_node = rank - local_rank
    first_in_group = layout.dp_rank * layout.sp_size
    return first_in_group < first_on_node or first_in_group + layout.sp_size > first_on_node + ranks_on_node


def new_sequence_parallel_groups(layout: ParallelLayout) -> dist.ProcessGroup | None:
    """The process group of this rank's SP group (None for SP = 1). Every rank creates every group,
    as torch.distributed requires."""
    if layout.sp_size == 1:
        return None
    mine = None
    for first in range(0, layout.sp_size * layout.dp_size, layout.sp_size):
        group = dist.new_group(list(range(first, first + layout.sp_size)))
        if first == layout.dp_rank * layout.sp_size:
            mine = group
    return mine


# ----------------------------------------------------------------------------- autograd collectives


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Split `x` [B, N, L, D] along scatter_dim into group-size pieces, send piece j to rank j, and
    concatenate the received pieces (in rank order) along gather_dim. The result is laid out as
    [B, L, N, D] in memory (a transposed view, like the projections' outputs), so the attention
    output's `transpose(1, 2).flatten(2)` for the output projection is a view, not a second copy
    that backward would keep."""
    size = dist.get_world_size(group)
    pieces = [piece.contiguous() for piece in x.chunk(size, dim=scatter_dim)]
    received = [torch.empty_like(pieces[0]) for _ in range(size)]
    dist.all_to_all(received, pieces, group=group)
    return torch.cat([piece.transpose(1, 2) for piece in received], dim=3 - gather_dim).transpose(1, 2)


class _AllToAll(torch.autograd.Function):
    """All-to-all whose backward is the reverse all-to-all (gather_dim <-> scatter_dim)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, gather_dim, scatter_dim, ctx.group), None, None, None


class _GatherSequence(torch.autograd.Function):
    """All-gather of the sequence pieces along `dim`; backward sums the gradient of the whole
    sequence over the group and returns this rank's piece (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        pieces = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(pieces, x.contiguous(), group=group)
        return torch.cat(pieces, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        piece = grad.chunk(dist.get_world_size(ctx.group), dim=ctx.dim)[dist.get_rank(ctx.group)]
        return piece.contiguous(), None, None


# ----------------------------------------------------------------------------- the model's side


class SequenceParallel:
    """A rank's view of its SP group, for the model: which tokens it holds, and the collectives."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def local_range(self, length: int) -> tuple[int, int]:
        """[start, stop) of this rank's tokens in a sequence of `length` tokens."""
        if length % self.size:
            raise ValueError(f"sequence parallelism over {self.size} ranks needs a token count divisible by "
                             f"{self.size}, got {length} tokens (change the frame count or resolution)")
        piece = length // self.size
        return self.rank * piece, (self.rank + 1) * piece

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of a replicated [.., L, ..] tensor (backward: zeros elsewhere), as a
        copy: a view saved for backward would keep the whole sequence alive."""
        start, stop = self.local_range(x.shape[dim])
        return x.narrow(dim, start, stop - start).clone()

    def shard_groups(self, e: torch.Tensor, length: int) -> torch.Tensor:
        """Timestep groups e [B, G, ...] (G equal groups of consecutive tokens) for this rank's tokens,
        as groups of gcd(L/G, L/SP) tokens, so that a group never straddles two ranks."""
        groups = e.shape[1]
        group_tokens = length // groups
        start, stop = self.local_range(length)
        local_tokens = math.gcd(group_tokens, stop - start)
        first = torch.arange(start, stop, local_tokens, device=e.device) // group_tokens
        return e.index_select(1, first)

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The whole sequence from every rank's tokens along `dim`."""
        return _GatherSequence.apply(x, dim, self.group)

    def heads_to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N/SP, L, D] (head split) -> [B, N, L/SP, D] (sequence split)."""
        return _AllToAll.apply(x, 2, 1, self.group)

    def sequence_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, L/SP, D] (sequence split) -> [B, N/SP, L, D] (head split)."""
        if x.shape[1] % self.size:
            raise ValueError(f"{x.shape[1]} heads do not split over {self.size} sequence-parallel ranks")
        return _AllToAll.apply(x, 1, 2, self.group)


def apply_sequence_parallel(model: torch.nn.Module, sequence_parallel: SequenceParallel | None) -> None:
    """Run `model` (a WanModel) with its tokens split over `sequence_parallel`'s group (None: undo)."""
    if sequence_parallel is not None and model.num_heads % sequence_parallel.size:
        raise ConfigError(f"sequence parallelism over {sequence_parallel.size} ranks does not divide the DiT's "
                          f"{model.num_heads} heads")
    model.sequence_parallel = sequence_parallel
    for block in model.blocks:
        block.self_attn.sequence_parallel = sequence_parallel
