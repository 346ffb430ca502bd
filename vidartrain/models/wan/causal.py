"""Vidarc causal DiT: the Wan2.2 DiT with block-causal attention over latent frames.

Same parameters and block code as `WanModel` (a vidar.pt loads unchanged, and back). A block is
one latent frame: every token sees all tokens of its own and earlier frames. RoPE positions are
absolute frame indices in every path.

Paths that give the same numbers:
- `forward(x, t, context)`: the whole sequence with a block-causal mask;
- `forward_with_cache(x, t, context, cache)`: frames through an explicit `KVCache` (inference:
  prefill clean frames at t = 0, denoise a new frame against the cache, append it at t = 0);
- `forward_static(...)`: the same against a `StaticKVCache` at static shapes (the whole buffer,
  a mask from a tensor fill mark), for a compiled generation step (`rollouts.StaticGenerationStep`);
- `forward_teacher_forcing(clean, noisy, t_noisy, context[, cache])`: one pass over [clean | noisy]
  where noisy frame i sees clean frames < i and itself (stage-2 training with ground-truth
  context); with a cache, one chunk of a rollout (`vidartrain.rollouts`, which holds every
  rollout: the sequential and self-generated ones, generation, the deployed closed loop).

Attention masks: an SDPA boolean mask (CPU, default there), or a flex_attention BlockMask
(block-sparse; default on CUDA). Block masks are built once per frame layout and reused.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from .kv_cache import KeyValue, KVCache, StaticStepLayer
from .model import WanModel, group_timesteps, rope_for_grid

AttentionBackend = Literal["auto", "sdpa", "flex"]


@dataclass(frozen=True)
class FrameLayout:
    """Per latent frame of a token sequence: its slot in the causal order and whether it is a
    noisy copy (teacher forcing). Noisy frame in slot i sees context frames in slots < i and
    itself; a context frame in slot i sees context frames in slots <= i."""

    slots: tuple[int, ...]
    noisy: tuple[bool, ...]

    @classmethod
    def context(cls, first_slot: int, frames: int) -> "FrameLayout":
        return cls(tuple(range(first_slot, first_slot + frames)), (False,) * frames)

    def __add__(self, other: "FrameLayout") -> "FrameLayout":
        return FrameLayout(self.slots + other.slots, self.noisy + other.noisy)

    def as_noisy(self) -> "FrameLayout":
        return FrameLayout(self.slots, (True,) * len(self.slots))


def frame_visibility(query: FrameLayout, key: FrameLayout) -> torch.Tensor:
    """Boolean [query frames, key frames]: may a token of query frame q attend to key frame k."""
    q_slot, k_slot = torch.tensor(query.slots)[:, None], torch.tensor(key.slots)[None, :]
    q_noisy, k_noisy = torch.tensor(query.noisy)[:, None], torch.tensor(key.noisy)[None, :]
    sees_context = (k_slot < q_slot) | ((k_slot == q_slot) & ~q_noisy)
    sees_itself = q_noisy & (k_slot == q_slot)
    return torch.where(k_noisy, sees_itself, sees_context)


def sdpa_mask(query: FrameLayout, key: FrameLayout, tokens_per_frame: int,
              device: torch.device) -> torch.Tensor | None:
    """Token-level boolean mask [Lq, Lk] for scaled_dot_product_attention; None if all visible."""
    visible = frame_visibility(query, key)
    if bool(visible.all()):
        return None
    return visible.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1).to(device)


@functools.lru_cache(maxsize=64)
def flex_block_mask(query: FrameLayout, key: FrameLayout, tokens_per_frame: int, device: str) -> BlockMask:
    """Block-sparse mask for flex_attention, built once per (layout, frame size, device): training
    shapes repeat, so the mask (and the kernels compiled for it) are reused."""
    visible = frame_visibility(query, key).to(device)

    def mask_mod(batch, head, q_index, k_index):
        return visible[q_index // tokens_per_frame, k_index // tokens_per_frame]

    return create_block_mask(mask_mod, None, None, len(query.slots) * tokens_per_frame,
                             len(key.slots) * tokens_per_frame, device=device)


# flex_attention's default tile: rows of queries and columns of keys it skips or computes whole.
FLEX_BLOCK_SIZE = 128


def static_cache_mask(cached_tokens: torch.Tensor, frame_tokens: int, query_tokens: int, key_tokens: int,
                      backend: Literal["sdpa", "flex"]) -> torch.Tensor | BlockMask:
    """Mask of the static generation step: `query_tokens` new tokens (whole frames, written after
    the `cached_tokens` cached ones, a 0-d tensor) over all `key_tokens` slots of the buffer. A
    query sees the cached tokens and those of its own and earlier new frames. Built from tensors
    only (one compiled graph for every fill): a boolean [Lq, Lk] for SDPA, or a flex BlockMask
    whose tiles stop after the last visible key, so attention skips the unfilled slots."""
    device = cached_tokens.device

    def visible(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        return key < cached_tokens + (query // frame_tokens + 1) * frame_tokens

    if backend == "sdpa":
        return visible(torch.arange(query_tokens, device=device)[:, None], torch.arange(key_tokens, device=device))
    query_blocks, key_blocks = -(-query_tokens // FLEX_BLOCK_SIZE), -(-key_tokens // FLEX_BLOCK_SIZE)
    last_query = (torch.arange(query_blocks, device=device) * FLEX_BLOCK_SIZE + FLEX_BLOCK_SIZE - 1).clamp(
        max=query_tokens - 1)
    visible_keys = cached_tokens + (last_query // frame_tokens + 1) * frame_tokens  # of each tile's last query
    key_tiles = -(-visible_keys // FLEX_BLOCK_SIZE)
    tile_indices = torch.arange(key_blocks, device=device, dtype=torch.int32).expand(1, 1, query_blocks, key_blocks)
    return BlockMask.from_kv_blocks(key_tiles.to(torch.int32).view(1, 1, query_blocks), tile_indices,
                                    BLOCK_SIZE=FLEX_BLOCK_SIZE, mask_mod=lambda b, h, q, k: visible(q, k),
                                    seq_lengths=(query_tokens, key_tokens))


class WanModelCausal(WanModel):
    """Block-causal Wan2.2 DiT (Vidarc). `attention_backend`: "auto" (flex on CUDA, SDPA
    elsewhere), "sdpa" or "flex"."""

    attention_backend: AttentionBackend = "auto"

    # --- masks, text, timesteps

    def resolved_attention_backend(self, device: torch.device) -> Literal["sdpa", "flex"]:
        backend = self.attention_backend
        if backend not in ("auto", "sdpa", "flex"):
            raise ValueError(f"attention_backend must be 'auto', 'sdpa' or 'flex', got {backend!r}")
        if backend == "auto":
            return "flex" if device.type == "cuda" else "sdpa"
        return backend

    def attention_mask(self, query: FrameLayout, key: FrameLayout, tokens_per_frame: int,
                       device: torch.device) -> torch.Tensor | BlockMask | None:
        if self.resolved_attention_backend(device) == "sdpa" or bool(frame_visibility(query, key).all()):
            return sdpa_mask(query, key, tokens_per_frame, device)
        return flex_block_mask(query, key, tokens_per_frame, str(device))

    def text_key_values(self, context: torch.Tensor | Sequence[torch.Tensor]) -> list[KeyValue]:
        """Cross-attention keys/values of the text for every block: compute once per prompt and
        pass as `context` to the cached calls of a rollout."""
        text = self.embed_text(context)
        return [block.cross_attn.context_key_value(text) for block in self.blocks]

    def _text(self, context) -> torch.Tensor | list[KeyValue]:
        if isinstance(context, list) and context and isinstance(context[0], tuple):
            if len(context) != self.num_layers:
                raise ValueError(f"precomputed text key/values cover {len(context)} blocks, "
                                 f"the model has {self.num_layers}")
            return context
        return self.embed_text(context)

    def frame_timesteps(self, t: torch.Tensor | float, batch: int, grid: tuple[int, int, int]) -> torch.Tensor:
        """t as [B, F]: the causal model needs one timestep per latent frame (or coarser)."""
        frames = grid[0]
        if not isinstance(t, torch.Tensor):
            t = torch.tensor(float(t), device=self.patch_embedding.weight.device)
        if t.dim() == 0:
            t = t.expand(batch)
        grouped = group_timesteps(t.float(), batch, grid)
        if grouped.shape[1] == 1:
            return grouped.expand(batch, frames)
        if grouped.shape[1] != frames:
            raise ValueError("the causal model needs one timestep per latent frame; "
                             f"got timesteps that vary inside a frame, t shape {list(t.shape)}")
        return grouped

    # --- the one computation every path uses

    def _forward_frames(self, x: torch.Tensor, t: torch.Tensor, positions: torch.Tensor, text,
                        cache: KVCache | None = None, noisy: torch.Tensor | None = None,
                        t_noisy: torch.Tensor | None = None) -> tuple[torch.Tensor, list[KeyValue]]:
        """Context frames x [B, C, f, H, W] (timesteps t [B, f], RoPE frame positions [f]) attend
        to the cache and block-causally to each other. Optional noisy copies at the same positions
        (timesteps t_noisy) each see the context before them and themselves. Returns the velocity
        of the noisy frames if given, else of x, and every layer's (k, v) of the context frames."""
        tokens, grid = self.embed_video(x)
        frames, height, width = grid
        frame_tokens = height * width
        cached = cache.num_frames if cache is not None else 0
        if cached:
            # The mask counts every frame at this call's size; one frame needs no mask at all.
            cache.check_frame_grid((height, width))
        query = FrameLayout.context(cached, frames)
        t_all, all_positions = t, positions
        if noisy is not None:
            noisy_tokens, _ = self.embed_video(noisy)
            tokens = torch.cat([tokens, noisy_tokens], dim=1)
            query = query + query.as_noisy()
            t_all = torch.cat([t, t_noisy], dim=1)
            all_positions = torch.cat([positions, positions])
        key = FrameLayout.context(0, cached) + query
        mask = self.attention_mask(query, key, frame_tokens, tokens.device)
        e, e0 = self.embed_time(t_all)
        rope = rope_for_grid(all_positions.to(tokens.device), height, width, self.head_dim)
        past = [cache.layer(i) for i in range(self.num_layers)] if cached else None
        hidden, key_values = self.run_blocks(tokens, e0, text, rope, mask, past)
        context_tokens = frames * frame_tokens
        key_values = [(k[:, :, :context_tokens], v[:, :, :context_tokens]) for k, v in key_values]
        first = frames if noisy is not None else 0
        head = self.head(hidden[:, first * frame_tokens:(first + frames) * frame_tokens],
                         e[:, first:first + frames])
        return self.unpatchify(head, grid), key_values

    # --- public paths

    def forward(self, x: torch.Tensor, t: torch.Tensor, context) -> torch.Tensor:
        """Whole sequence [B, C, F, H, W] with block-causal attention; frames at positions 0..F-1."""
        self._check_latents(x, "x")
        grid = self.token_grid(x)
        positions = torch.arange(grid[0])
        velocity, _ = self._forward_frames(x, self.frame_timesteps(t, x.shape[0], grid), positions,
                                           self._text(context))
        return velocity

    def forward_with_cache(self, x: torch.Tensor, t: torch.Tensor | float, context, cache: KVCache,
                           update_cache: bool = False, positions: Sequence[int] | None = None
                           ) -> tuple[torch.Tensor, KVCache]:
        """Frames x [B, C, f, H, W] attending to everything in `cache` and block-causally to each
        other, at RoPE positions `positions` (default: right after the last cached frame). With
        `update_cache` their keys/values are appended (do that at t = 0 for clean frames)."""
        self._check_latents(x, "x")
        grid = self.token_grid(x)
        positions = list(range(cache.next_position, cache.next_position + grid[0])) \
            if positions is None else list(positions)
        if len(positions) != grid[0]:
            raise ValueError(f"{len(positions)} positions given for {grid[0]} frames")
        velocity, key_values = self._forward_frames(
            x, self.frame_timesteps(t, x.shape[0], grid), torch.tensor(positions), self._text(context), cache)
        if update_cache:
            cache.append(key_values, positions, grid[1:])
        return velocity, cache

    def prefill(self, clean: torch.Tensor, context, cache: KVCache,
                positions: Sequence[int] | None = None) -> KVCache:
        """Append clean frames (t = 0) to the cache."""
        return self.forward_with_cache(clean, 0.0, context, cache, update_cache=True, positions=positions)[1]

    def forward_static(self, x: torch.Tensor, t: torch.Tensor, positions: torch.Tensor, text: list[KeyValue],
                       keys: list[torch.Tensor], values: list[torch.Tensor], cached_tokens: torch.Tensor
                       ) -> torch.Tensor:
        """The per-chunk generation step at static shapes, capturable by CUDA graphs: frames x
        [B, C, f, H, W] at timesteps t [B, f] and RoPE positions [f] attend to the first
        `cached_tokens` (0-d int64 tensor) tokens of a StaticKVCache's buffers `keys`/`values` (per
        layer [B, N, slots, D]) and block-causally to each other, as `forward_with_cache` does;
        their keys/values are written into the slots after the cached ones (`StaticKVCache.commit`
        keeps them). Every shape is fixed by the buffers and the chunk, and the fill enters as a
        tensor, so one compiled graph serves every fill (`static_cache_mask`: with flex_attention,
        CUDA's default, the unfilled tiles are skipped; SDPA computes them masked). `text`:
        `text_key_values`. Returns the velocity of x."""
        tokens, grid = self.embed_video(x)
        frames, height, width = grid
        frame_tokens = height * width
        mask = static_cache_mask(cached_tokens, frame_tokens, tokens.shape[1], keys[0].shape[2],
                                 self.resolved_attention_backend(tokens.device))
        slots = cached_tokens + torch.arange(tokens.shape[1], device=tokens.device)
        past = [StaticStepLayer(k, v, slots) for k, v in zip(keys, values)]
        e, e0 = self.embed_time(t)
        rope = rope_for_grid(positions, height, width, self.head_dim)
        hidden, _ = self.run_blocks(tokens, e0, text, rope, mask, past)
        return self.unpatchify(self.head(hidden, e), grid)

    def forward_teacher_forcing(self, clean: torch.Tensor, noisy: torch.Tensor, t_noisy: torch.Tensor,
                                context, cache: KVCache | None = None) -> torch.Tensor:
        """One pass over [clean | noisy] (the same RoPE positions for both copies): clean frames
        block-causal at t = 0, noisy frame i sees clean frames < i and itself. Returns the velocity
        of the noisy frames [B, C, F, H, W]. Without a cache: positions 0..F-1, no state between
        calls. With one: both copies also see the cached frames, take the positions after them, and
        the clean frames' keys/values are appended (a rollout's chunk)."""
        self._check_latents(clean, "clean")
        if noisy.shape != clean.shape:
            raise ValueError(f"noisy {list(noisy.shape)} and clean {list(clean.shape)} must have the same shape")
        grid = self.token_grid(clean)
        t_noisy = self.frame_timesteps(t_noisy, clean.shape[0], grid)
        first = cache.next_position if cache is not None else 0
        positions = list(range(first, first + grid[0]))
        velocity, key_values = self._forward_frames(clean, torch.zeros_like(t_noisy), torch.tensor(positions),
                                                    self._text(context), cache, noisy=noisy, t_noisy=t_noisy)
        if cache is not None:
            cache.append(key_values, positions, grid[1:])
        return velocity

    def _check_latents(self, x: torch.Tensor, name: str) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[1] != self.in_dim:
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a latent tensor [B, {self.in_dim}, F, H, W], got {shape}")

    def token_grid(self, x: torch.Tensor) -> tuple[int, int, int]:
        """(F, H, W) token grid of latents [B, C, F, H, W]."""
        pt, ph, pw = self.patch_size
        return x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw
