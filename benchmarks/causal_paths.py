"""Causal DiT paths side by side on a small config (CPU or GPU): time and peak tensor memory.

Training (forward + backward, same loss): one-pass teacher forcing over [clean | noisy] versus
the sequential ground-truth rollout through the KV cache (frame by frame, cache writes with
gradient). Generation (no gradient) of every frame after the first: KV-cached (the static,
in-place cache of generation: denoise the new frame against the cache, append it at t = 0) versus
recomputing the whole prefix for every new frame. Cached cost grows linearly with the number of
frames, recomputation super-linearly; their FLOP ratio (`generation_flops`) is the most the cache
can save at equal FLOP/s, and is reported beside the measured speed-up. The deployed setting
(chunks of 4 latent frames, 4 Euler steps) is timed per generated latent frame. On CUDA also both cached generations with every call
through the static-shape step captured in CUDA graphs (`StaticGenerationStep` under torch.compile
mode "reduce-overhead"; one graph per chunk shape serves every cache fill and frame count, its
compilation timed apart); elsewhere those variants are reported as skipped, with the reason.

Peak memory counts the tensors allocated inside each measured call (a TorchDispatchMode that
follows every storage until it is freed), so it works on CPU too.

    python -m benchmarks.causal_paths [--frames 4 8 16]
"""
from __future__ import annotations

import argparse
import time
import traceback
import weakref
from collections import Counter
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from vidartrain.models.wan.causal import WanModelCausal
from vidartrain.models.wan.kv_cache import StaticKVCache
from vidartrain.plan import DitShape, forward_flops, text_flops
from vidartrain.rollouts import DEPLOYED_FRAMES_PER_CHUNK, StaticGenerationStep, generate_frames, rollout

SMALL_CONFIG = dict(dim=128, ffn_dim=384, num_heads=2, num_layers=2, text_len=16, text_dim=32)
LATENT_HW = (16, 16)  # 8 x 8 = 64 tokens per latent frame
MIB = 2**20
GRAPHED_SKIPPED = "CUDA graphs (torch.compile mode reduce-overhead) need a CUDA device"
CUDA_GRAPHS = {"mode": "reduce-overhead"}


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the context and still alive, and their total.
    An op's output that shares an input's storage (a view, an in-place write) creates nothing."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live and key not in inputs:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.total += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._release, key)
        return out

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


def measure(fn: Callable[[], torch.Tensor], repeats: int = 2) -> dict:
    """Best wall time of `repeats` runs, and the peak tensor memory of one more run (on a GPU, the
    allocator's peak). On a GPU one warm-up run comes first, timed apart as `first_seconds`: kernel
    compilation (and CUDA-graph recording) is paid once, not per generation."""
    cuda = torch.cuda.is_available()
    first = {}
    if cuda:
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        first = {"first_seconds": time.perf_counter() - start}
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    if cuda:  # the allocator's own peak (the dispatch mode below cannot follow flex_attention's operator)
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        value = fn()
        return {"seconds": min(seconds), **first,
                "peak_mib": (torch.cuda.max_memory_allocated() - baseline) / MIB, "value": value}
    with PeakTensorMemory() as memory:
        value = fn()
    return {"seconds": min(seconds), "peak_mib": memory.peak / MIB, "value": value}


def random_inputs(model: WanModelCausal, generator: torch.Generator, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    """Standard normal tensors drawn on the CPU (the same numbers on every device), on the model's device."""
    device = next(model.parameters()).device
    return [torch.randn(shape, generator=generator).to(device) for shape in shapes]


def training_paths(model: WanModelCausal, frames: int, generator: torch.Generator,
                   latent_hw: tuple[int, int] = LATENT_HW) -> dict:
    clean, noisy, target = random_inputs(model, generator, *[(1, 48, frames, *latent_hw)] * 3)
    t = torch.rand(1, frames, generator=generator).to(clean.device) * 1000
    text = random_inputs(model, generator, (8, model.text_dim))

    def step(velocity_fn) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            model.zero_grad(set_to_none=True)
            loss = (velocity_fn() - target).pow(2).mean()
            loss.backward()
            return loss.detach()
        return run

    with torch.no_grad():
        velocity_difference = (model.forward_teacher_forcing(clean, noisy, t, text) -
                               rollout(model, clean, noisy, t, text)).abs().max().item()
    return {
        "teacher_forcing": measure(step(lambda: model.forward_teacher_forcing(clean, noisy, t, text))),
        "sequential": measure(step(lambda: rollout(model, clean, noisy, t, text, cache_grad=True))),
        "training_velocity_max_difference": velocity_difference,
    }


DEPLOYED_SIGMAS = (1.0, 0.75, 0.5, 0.25)  # the deployed Vidarc setting: 4 Euler steps per chunk


def generation_flops(shape: DitShape, frames: int, tokens_per_frame: int, frames_per_chunk: int = 1,
                     calls_per_chunk: int = 1) -> dict[str, dict[str, float]]:
    """Forward FLOPs (split as `forward_flops`) of generating latent frames 1..frames-1 after a first
    real frame, `frames_per_chunk` at a time in `calls_per_chunk` denoising calls each, by both paths.
    "cached": the first frame prefilled; every call runs the chunk against the KV cache, one more
    call at t = 0 appends it; the text's keys and values computed once. "recompute": every call runs
    the whole prefix with the chunk last, text included. At 1 frame and 1 call per chunk this is
    what `generation_paths` times: one new frame costs two frames' worth of matmuls either way the
    cache is filled, so the ratio stays far below the frame count."""
    def call(query_frames: int, cached_frames: int, with_text: bool, times: int = 1) -> Counter:
        pairs = (query_frames * cached_frames + query_frames * (query_frames + 1) // 2) * tokens_per_frame**2
        flops = Counter(forward_flops(shape, query_frames * tokens_per_frame, pairs, query_frames))
        if not with_text:
            flops["linear"] -= text_flops(shape)
        return Counter({part: times * value for part, value in flops.items()})

    cached, recompute = Counter(linear=text_flops(shape)) + call(1, 0, with_text=False), Counter()
    for start in range(1, frames, frames_per_chunk):
        chunk = min(frames_per_chunk, frames - start)
        cached += call(chunk, start, with_text=False, times=calls_per_chunk + 1)
        recompute += call(start + chunk, 0, with_text=True, times=calls_per_chunk)
    return {"cached": dict(cached), "recompute": dict(recompute)}


def flop_ratio(shape: DitShape, frames: int, tokens_per_frame: int, frames_per_chunk: int = 1,
               calls_per_chunk: int = 1) -> float:
    """Recomputation's FLOPs over the cached generation's: the cache's speed-up at equal FLOP/s."""
    flops = generation_flops(shape, frames, tokens_per_frame, frames_per_chunk, calls_per_chunk)
    return sum(flops["recompute"].values()) / sum(flops["cached"].values())


def generation_paths(model: WanModelCausal, frames: int, generator: torch.Generator,
                     latent_hw: tuple[int, int] = LATENT_HW, graphed: GraphedGeneration | None = None) -> dict:
    first, new_frames = random_inputs(model, generator, (1, 48, 1, *latent_hw), (1, 48, frames - 1, *latent_hw))
    t_new = torch.tensor([500.0], device=first.device)
    text = random_inputs(model, generator, (8, model.text_dim))

    def cached() -> torch.Tensor:
        return frame_by_frame_generation(model, first, new_frames, t_new, text,
                                         StaticKVCache(model.num_layers, capacity=frames))

    def recompute() -> torch.Tensor:
        return recompute_generation(model, first, new_frames, t_new, text)

    def deployed() -> torch.Tensor:
        return deployed_generation(model, first, new_frames, text,
                                   StaticKVCache(model.num_layers, capacity=frames))

    results = {"cached_generation": measure(cached), "recompute_generation": measure(recompute),
               "deployed_generation": measure(deployed)}
    if graphed is not None:
        for name, run in (("graphed_generation", lambda: frame_by_frame_generation(
                                model, first, new_frames, t_new, text, graphed.cache, graphed.step)),
                          ("graphed_deployed_generation", lambda: deployed_generation(
                                model, first, new_frames, text, graphed.cache, graphed.step))):
            try:
                results[name] = measure(run)
            except Exception as error:  # reported in the row; the eager variants still are
                print(f"{name} failed: {traceback.format_exc()}", flush=True)
                results[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    return results


@torch.no_grad()
def frame_by_frame_generation(model: WanModelCausal, first: torch.Tensor, new_frames: torch.Tensor,
                              t_new: torch.Tensor, text: list[torch.Tensor], cache: StaticKVCache,
                              step: StaticGenerationStep | None = None) -> torch.Tensor:
    """After a first real frame, each new frame denoised once at `t_new` against the cache, then
    prefilled; returns the velocities. Every call through `step` when given."""
    text_kv = model.text_key_values(text)
    prefill = model.prefill if step is None else step.prefill
    prefill(first, text_kv, cache.reset())
    velocities = []
    for i in range(new_frames.shape[2]):
        frame = new_frames[:, :, i:i + 1]
        velocities.append(model.forward_with_cache(frame, t_new, text_kv, cache)[0] if step is None
                          else step.velocity(frame, t_new, text_kv, cache))
        prefill(frame, text_kv, cache)
    return torch.cat(velocities, dim=2)


@torch.no_grad()
def recompute_generation(model: WanModelCausal, first: torch.Tensor, new_frames: torch.Tensor, t_new: torch.Tensor,
                         text: list[torch.Tensor]) -> torch.Tensor:
    """Without a cache: for each new frame, the whole sequence up to it (the earlier frames at t = 0,
    itself at `t_new`); returns its velocities, as `frame_by_frame_generation`'s."""
    velocities = []
    for i in range(new_frames.shape[2]):
        sequence = torch.cat([first, new_frames[:, :, :i + 1]], dim=2)
        t = torch.cat([torch.zeros(1, i + 1, device=first.device), t_new[:, None]], dim=1)
        velocities.append(model(sequence, t, text)[:, :, -1:])
    return torch.cat(velocities, dim=2)


@torch.no_grad()
def deployed_generation(model: WanModelCausal, first: torch.Tensor, new_frames: torch.Tensor, text: list[torch.Tensor],
                        cache: StaticKVCache, step: StaticGenerationStep | None = None) -> torch.Tensor:
    """The deployed Vidarc setting after a first real frame: chunks of 4 latent frames, 4 Euler
    steps each, then prefilled; every call through `step` when given."""
    text_kv = model.text_key_values(text)
    prefill = model.prefill if step is None else step.prefill
    prefill(first, text_kv, cache.reset())
    chunks = []
    for start in range(0, new_frames.shape[2], DEPLOYED_FRAMES_PER_CHUNK):
        chunk = generate_frames(model, new_frames[:, :, start:start + DEPLOYED_FRAMES_PER_CHUNK], text_kv, cache,
                                sigmas=DEPLOYED_SIGMAS, step=step)
        prefill(chunk, text_kv, cache)
        chunks.append(chunk)
    return torch.cat(chunks, dim=2)


class GraphedGeneration:
    """The static step in CUDA graphs (`StaticGenerationStep` under torch.compile mode
    "reduce-overhead") and its cache, through which `generation_paths` runs every call of both
    cached generations, the first prefill included. One step and one cache of `capacity` frames
    serve every frame count: the step compiles once per chunk shape (1 frame; 4 and the last
    chunk's frames when deployed), and the graphs keep writing into the same buffers (a new buffer
    address would record them again). The cache holds more frames than a shorter generation fills;
    flex_attention skips the empty tiles. `compile_options`: torch.compile's (None: the step runs
    eagerly, which checks this code on CPU)."""

    def __init__(self, model: WanModelCausal, capacity: int, latent_hw: tuple[int, int],
                 compile_options: dict | None = CUDA_GRAPHS):
        self.step = StaticGenerationStep(model, compile_options)
        device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
        with torch.no_grad():  # the buffers exist from here on
            self.cache = model.prefill(torch.zeros(1, 48, 1, *latent_hw, device=device, dtype=dtype),
                                       model.text_key_values([torch.zeros(1, model.text_dim, device=device)]),
                                       StaticKVCache(model.num_layers, capacity=capacity))


def measure_causal_paths(frame_counts: tuple[int, ...] = (4, 8, 16), seed: int = 0, model_config: dict | None = None,
                         latent_hw: tuple[int, int] = LATENT_HW, device: str = "cpu",
                         paths: tuple[str, ...] = ("training", "generation")) -> dict:
    """{frames: {path: {seconds, peak_mib}}} plus the agreement of the paths being compared.
    `paths`: "training" (teacher forcing vs sequential rollout), "generation" (cached vs recompute)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = WanModelCausal(**(model_config or SMALL_CONFIG))
    if device != "cpu":
        model.to(torch.bfloat16)
    generator = torch.Generator().manual_seed(seed)
    graphed = GraphedGeneration(model, max(frame_counts), latent_hw) \
        if "generation" in paths and torch.device(device).type == "cuda" else None
    results = {}
    for frames in frame_counts:
        row = {}
        if "training" in paths:
            training = training_paths(model, frames, generator, latent_hw)
            row.update({name: {"seconds": p["seconds"], "peak_mib": p["peak_mib"]}
                        for name, p in training.items() if isinstance(p, dict)})
            row["teacher_forcing_loss"] = training["teacher_forcing"]["value"].item()
            row["sequential_loss"] = training["sequential"]["value"].item()
            row["training_velocity_max_difference"] = training["training_velocity_max_difference"]
        if "generation" in paths:
            row.update(generation_row(model, generation_paths(model, frames, generator, latent_hw, graphed), frames,
                                      device))
        results[frames] = row
    return results


def generation_row(model: WanModelCausal, generation: dict, frames: int, device: str) -> dict:
    """The generation results of one frame count as reported: times and memory, per-frame costs,
    and how far the cached and graphed velocities are from recomputation's / the eager cache's."""
    row = {name: {key: p[key] for key in ("seconds", "first_seconds", "peak_mib") if key in p} if "seconds" in p else p
           for name, p in generation.items()}
    row["deployed_ms_per_latent_frame"] = 1000 * generation["deployed_generation"]["seconds"] / (frames - 1)
    row["generation_velocity_max_difference"] = (generation["cached_generation"]["value"] -
                                                 generation["recompute_generation"]["value"]).abs().max().item()
    if "graphed_generation" not in generation:
        row["graphed_generation"] = row["graphed_deployed_generation"] = {"skipped": GRAPHED_SKIPPED}
        return row
    if "value" in generation["graphed_generation"]:
        row["graphed_generation"]["attention"] = model.resolved_attention_backend(torch.device(device))
        row["graphed_velocity_max_difference"] = (generation["cached_generation"]["value"] -
                                                  generation["graphed_generation"]["value"]).abs().max().item()
    if "value" in generation["graphed_deployed_generation"]:
        row["graphed_deployed_ms_per_latent_frame"] = (
            1000 * generation["graphed_deployed_generation"]["seconds"] / (frames - 1))
        row["graphed_deployed_max_difference"] = (generation["deployed_generation"]["value"] -
                                                  generation["graphed_deployed_generation"]["value"]).abs().max().item()
    return row


PATHS = ("teacher_forcing", "sequential", "cached_generation", "recompute_generation")


def run() -> dict:
    """The benchmark at its default sizes (the `python -m benchmarks` entry)."""
    return measure_causal_paths()


def markdown(results: dict) -> str:
    tokens_per_frame = LATENT_HW[0] * LATENT_HW[1] // 4
    lines = [f"Small causal DiT {SMALL_CONFIG['dim']}x{SMALL_CONFIG['num_layers']} layers, "
             f"{tokens_per_frame} tokens per latent frame, CPU. FLOP ratio: recomputation's FLOPs over the cached "
             "generation's (`generation_flops`), the most the cache can save at equal FLOP/s.", "",
             "| latent frames | teacher forcing s / MiB | sequential s / MiB | speed-up | cached generation s / MiB "
             "| recompute prefix s / MiB | speed-up | FLOP ratio | same loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    for frames, row in results.items():
        tf, seq, cached, recompute = (row[name] for name in PATHS)
        lines.append(
            f"| {frames} | {tf['seconds']:.3f} / {tf['peak_mib']:.1f} | {seq['seconds']:.3f} / {seq['peak_mib']:.1f} "
            f"| {seq['seconds'] / tf['seconds']:.2f}x | {cached['seconds']:.3f} / {cached['peak_mib']:.1f} "
            f"| {recompute['seconds']:.3f} / {recompute['peak_mib']:.1f} | {recompute['seconds'] / cached['seconds']:.2f}x "
            f"| {flop_ratio(DitShape(**SMALL_CONFIG), int(frames), tokens_per_frame):.2f}x "
            f"| {row['teacher_forcing_loss']:.6f} = {row['sequential_loss']:.6f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16])
    args = parser.parse_args()
    print(markdown(measure_causal_paths(tuple(args.frames))))


if __name__ == "__main__":
    main()
