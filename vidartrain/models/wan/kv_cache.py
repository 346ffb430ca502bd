"""Self-attention KV cache of the causal DiT: an explicit object, passed in and returned.

Per layer it holds the keys and values (after RoPE) of the cached latent frames, shape
[B, heads, frames * tokens_per_frame, head_dim], and the absolute frame index (RoPE position) of
each cached frame. Nothing is stored in the model. Capacity is counted in latent frames
(`kv_cache_length`); past it the cache either refuses (default) or evicts its oldest frames,
keeping `sink` first frames.

The deployed Vidarc controller (published inference code) counts video frames: when
`cached + new > rollout_bound` it clears the cache and re-prefills the VAE latents of the last
`rollout_prefill_num` real frames (`vidartrain.rollouts.RolloutWindow`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from vidartrain.shapes import VAE_STRIDE

VAE_TEMPORAL_STRIDE = VAE_STRIDE[0]

KeyValue = tuple[torch.Tensor, torch.Tensor]

# The deployed controller generates this many latent frames (16 video frames) per call.
DEPLOYED_FRAMES_PER_CHUNK = 4


def video_frames_of(latent_frames: int) -> int:
    """Video frames covered by `latent_frames` latent frames (the first one stands alone)."""
    return 0 if latent_frames == 0 else 1 + VAE_TEMPORAL_STRIDE * (latent_frames - 1)


def latent_frames_of(video_frames: int) -> int:
    """Latent frames the VAE makes of `video_frames` video frames (4k+1 -> k+1)."""
    if video_frames < 1 or (video_frames - 1) % VAE_TEMPORAL_STRIDE:
        raise ValueError(f"a video of {video_frames} frames is not 4k+1 frames long")
    return 1 + (video_frames - 1) // VAE_TEMPORAL_STRIDE


@dataclass
class KVCache:
    """Keys/values of cached latent frames for every layer (see module docstring).

    Operations return the cache itself, so calls read `cache = cache.append(...)` like the model's
    `forward_with_cache`. Tensors are replaced, never written in place, so a cache filled with
    gradients enabled back-propagates into the frames that produced it."""

    num_layers: int
    capacity: int
    sink: int = 0
    evict_oldest: bool = False
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    frame_grid: tuple[int, int] | None = None  # (height, width) in tokens of every cached frame

    def __post_init__(self):
        if self.capacity < 1:
            raise ValueError(f"KV cache capacity must be at least 1 frame, got {self.capacity}")
        if not 0 <= self.sink < self.capacity:
            raise ValueError(f"sink frames ({self.sink}) must be fewer than the capacity ({self.capacity})")

    @property
    def num_frames(self) -> int:
        return len(self.positions)

    @property
    def video_frames(self) -> int:
        return video_frames_of(self.num_frames)

    @property
    def tokens_per_frame(self) -> int:
        return self.frame_grid[0] * self.frame_grid[1] if self.frame_grid else 0

    @property
    def next_position(self) -> int:
        """RoPE position of a frame appended now: one past the last cached frame."""
        return self.positions[-1] + 1 if self.positions else 0

    def layer(self, index: int) -> KeyValue | None:
        """(keys, values) of layer `index`, or None when the cache is empty."""
        return (self.keys[index], self.values[index]) if self.positions else None

    def append(self, key_values: Sequence[KeyValue], positions: Sequence[int],
               frame_grid: tuple[int, int]) -> "KVCache":
        """Add frames: one (k, v) [B, N, frames*S, D] per layer, their absolute positions, and their
        (height, width) token grid (S = height * width)."""
        if len(key_values) != self.num_layers:
            raise ValueError(f"expected key/values for {self.num_layers} layers, got {len(key_values)}")
        tokens = key_values[0][0].shape[2]
        if tokens != len(positions) * frame_grid[0] * frame_grid[1]:
            raise ValueError(f"{tokens} tokens are not {len(positions)} frames of {frame_grid[0]}x{frame_grid[1]}")
        if self.positions:
            self.check_frame_grid(frame_grid)
        overflow = self._overflow(len(positions))
        if overflow > 0:
            self._drop_frames(self.sink, self.sink + overflow)
        self.frame_grid = tuple(frame_grid)
        self._store(key_values)
        self.positions = self.positions + list(positions)
        return self

    def check_frame_grid(self, frame_grid: tuple[int, int]) -> None:
        """Refuse frames whose token grid differs from the cached frames': a 4x6 frame has as many
        tokens as a 6x4 one, but their keys carry other spatial RoPE positions."""
        if tuple(frame_grid) != self.frame_grid:
            raise ValueError(f"frames of {frame_grid[0]}x{frame_grid[1]} tokens cannot join a cache of "
                             f"{self.frame_grid[0]}x{self.frame_grid[1]}-token frames")

    def _overflow(self, new_frames: int) -> int:
        """Frames to evict before `new_frames` more fit (0 if they fit); refuses what the cache cannot do."""
        overflow = self.num_frames + new_frames - self.capacity
        if overflow > 0:
            if not self.evict_oldest:
                raise RuntimeError(f"KV cache full: {self.num_frames} of {self.capacity} frames cached, "
                                   f"{new_frames} more do not fit (pop, reset, or enable evict_oldest)")
            if new_frames > self.capacity - self.sink:
                raise RuntimeError(f"{new_frames} new frames do not fit beside {self.sink} sink frames "
                                   f"in a cache of {self.capacity}")
        return max(overflow, 0)

    def _store(self, key_values: Sequence[KeyValue]) -> None:
        """Add the new frames' keys and values after the cached ones (new tensors: autograd sees them)."""
        if self.positions:
            self.keys = [torch.cat([old, k], dim=2) for old, (k, _) in zip(self.keys, key_values)]
            self.values = [torch.cat([old, v], dim=2) for old, (_, v) in zip(self.values, key_values)]
        else:
            # Copies, so that a slice of a larger tensor does not keep all of it alive.
            self.keys = [k.clone() for k, _ in key_values]
            self.values = [v.clone() for _, v in key_values]

    def fork(self) -> "KVCache":
        """A cache of the same frames whose appends, pops and evictions leave this one as it is:
        the key/value tensors are shared, and neither cache writes them in place."""
        return replace(self, keys=list(self.keys), values=list(self.values), positions=list(self.positions))

    def detach(self) -> "KVCache":
        """Drop the autograd history of every cached key/value (a rollout without cache gradients)."""
        self.keys = [k.detach() for k in self.keys]
        self.values = [v.detach() for v in self.values]
        return self

    def pop_last(self, n: int) -> "KVCache":
        """Remove the `n` most recent frames (the controller replaces generated frames by real ones)."""
        if not 0 <= n <= self.num_frames:
            raise ValueError(f"cannot pop {n} frames from a cache of {self.num_frames}")
        self._drop_frames(self.num_frames - n, self.num_frames)
        return self

    def reset(self) -> "KVCache":
        """Forget every frame."""
        self.keys, self.values, self.positions, self.frame_grid = [], [], [], None
        return self

    def _drop_frames(self, start: int, stop: int) -> None:
        if stop - start == self.num_frames:
            self.reset()
            return
        keep = torch.cat([torch.arange(0, start), torch.arange(stop, self.num_frames)])
        token_index = (keep[:, None] * self.tokens_per_frame +
                       torch.arange(self.tokens_per_frame)).flatten().to(self.keys[0].device)
        # index_select copies, so the dropped frames' memory is released.
        self.keys = [k.index_select(2, token_index) for k in self.keys]
        self.values = [v.index_select(2, token_index) for v in self.values]
        self.positions = [self.positions[i] for i in keep.tolist()]

    def cached_tokens(self) -> int:
        return self.keys[0].shape[2] if self.positions else 0


@dataclass
class StaticKVCache(KVCache):
    """A KV cache for generation without gradient: per layer one buffer of `capacity +
    scratch_frames` frames, allocated at the first append. Frames are written in place at their
    slot; `pop_last` and `reset` only move the fill mark, eviction moves the frames after the sink
    down. Attention (`layer(i).extend`) writes the new tokens into the slots after the cached ones
    and reads the filled part as a view: no step copies the cache. `scratch_frames` is the most
    frames one call may add on top of a full cache (the generation chunk). The static-shape step
    (`WanModelCausal.forward_static`, through `StaticStepLayer`) writes into the same slots and
    reads the whole buffer; `commit` keeps what it wrote."""

    scratch_frames: int = DEPLOYED_FRAMES_PER_CHUNK

    def fork(self) -> "StaticKVCache":
        raise TypeError("a StaticKVCache writes its buffers in place, so a fork would change with it; "
                        "fork a KVCache")

    def layer(self, index: int) -> "StaticLayer | None":
        return StaticLayer(self, index) if self.positions else None

    def cached_tokens(self) -> int:
        return self.num_frames * self.tokens_per_frame

    def reset(self) -> "StaticKVCache":
        self.positions = []  # the buffers stay for the next frames
        return self

    def _store(self, key_values: Sequence[KeyValue]) -> None:
        key = key_values[0][0]
        slots = (self.capacity + self.scratch_frames) * self.tokens_per_frame
        shape = (*key.shape[:2], slots, key.shape[3])
        if not self.keys or self.keys[0].shape != shape or self.keys[0].dtype != key.dtype:
            # Zeros, not empty: the static step attends to every slot and masks the unfilled ones,
            # and a masked NaN left in memory would still turn 0 * NaN into NaN.
            self.keys = [torch.zeros(shape, dtype=key.dtype, device=key.device) for _ in range(self.num_layers)]
            self.values = [torch.zeros_like(k) for k in self.keys]
            for buffer in self.keys + self.values:
                # Written in place by the static step: CUDA graphs may mutate only inputs whose
                # address is fixed. A new buffer (another cache) re-records the graph, no recompile.
                torch._dynamo.mark_static_address(buffer)
        start = self.cached_tokens()
        for buffer_k, buffer_v, (k, v) in zip(self.keys, self.values, key_values):
            buffer_k[:, :, start:start + k.shape[2]].copy_(k)
            buffer_v[:, :, start:start + v.shape[2]].copy_(v)

    def commit(self, positions: Sequence[int]) -> "StaticKVCache":
        """Keep the frames that the last static step (`StaticStepLayer`) wrote after the cached ones,
        at RoPE positions `positions`: a prefill at t = 0 without a second forward. Past the
        capacity the oldest frames after the sink are evicted, as `append` does."""
        if not self.keys:
            raise RuntimeError("StaticKVCache.commit: no buffers yet; prefill the first frames with "
                               "WanModelCausal.prefill, which allocates them")
        overflow = self._overflow(len(positions))
        self.positions = self.positions + list(positions)  # the scratch slots hold them meanwhile
        if overflow > 0:
            self._drop_frames(self.sink, self.sink + overflow)
        return self

    def _drop_frames(self, start: int, stop: int) -> None:
        size, tokens = self.tokens_per_frame, self.cached_tokens()
        if stop < self.num_frames:  # eviction: the frames after the dropped ones move down
            for buffer in self.keys + self.values:
                buffer[:, :, start * size:tokens - (stop - start) * size] = buffer[:, :, stop * size:tokens].clone()
        self.positions = self.positions[:start] + self.positions[stop:]


@dataclass(frozen=True)
class StaticLayer:
    """One layer of a StaticKVCache as self-attention sees it (`extend`)."""

    cache: StaticKVCache
    index: int

    def extend(self, key: torch.Tensor, value: torch.Tensor) -> KeyValue:
        """Write this call's keys/values after the cached tokens (not committed: `append` does
        that) and return views of cached + new tokens."""
        if torch.is_grad_enabled() and (key.requires_grad or value.requires_grad):
            raise RuntimeError("StaticKVCache writes in place and is for generation without gradient; "
                               "use KVCache where gradients flow through cached keys")
        start = self.cache.cached_tokens()
        stop = start + key.shape[2]
        buffer_k, buffer_v = self.cache.keys[self.index], self.cache.values[self.index]
        if stop > buffer_k.shape[2]:
            raise RuntimeError(f"StaticKVCache: {key.shape[2]} new tokens do not fit after {start} cached ones "
                               f"in a buffer of {buffer_k.shape[2]} (capacity {self.cache.capacity} + scratch "
                               f"{self.cache.scratch_frames} frames): raise scratch_frames")
        buffer_k[:, :, start:stop].copy_(key)
        buffer_v[:, :, start:stop].copy_(value)
        return buffer_k[:, :, :stop], buffer_v[:, :, :stop]


@dataclass
class StaticStepLayer:
    """One layer of a StaticKVCache as the static-shape generation step sees it
    (`WanModelCausal.forward_static`): this call's keys/values are written at the token `slots`
    given as a tensor (the fill mark is a tensor, so the offset is not baked into a compiled
    graph), and attention reads the whole buffer, whose unfilled slots the step's mask hides."""

    keys: torch.Tensor
    values: torch.Tensor
    slots: torch.Tensor

    def extend(self, key: torch.Tensor, value: torch.Tensor) -> KeyValue:
        self.keys.index_copy_(2, self.slots, key)
        self.values.index_copy_(2, self.slots, value)
        return self.keys, self.values
