"""Causal DiT paths side by side on a small config (CPU or GPU): time and peak tensor memory.

Training (forward + backward, same loss): one-pass teacher forcing over [clean | noisy] versus
the sequential ground-truth rollout through the KV cache (frame by frame, cache writes with
gradient). Generation (no gradient) of every frame after a first real one, in three settings
(`GENERATION_SETTINGS`: one denoising call per frame, 4 calls per frame, and the deployed chunks of
4 frames with 4 calls each): through the static, in-place KV cache of generation (each chunk
denoised against the cache, then appended at t = 0) versus recomputing the whole prefix for every
call. Cached cost grows linearly with the number of frames, recomputation super-linearly; their
FLOP ratio (`generation_flops`) is the most the cache can save at equal FLOP/s, and is reported
beside the measured speed-up. On CUDA each setting also runs with every call through the
static-shape step captured in CUDA graphs (`StaticGenerationStep` under torch.compile mode
"reduce-overhead"; one graph per chunk shape serves every cache fill, setting and frame count, its
compilation timed apart); elsewhere that variant is reported as skipped, with the reason.

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
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from vidartrain.models.wan.causal import WanModelCausal
from vidartrain.models.wan.kv_cache import StaticKVCache
from vidartrain.plan import DitShape, forward_flops, text_flops
from vidartrain.rollouts import DEPLOYED_FRAMES_PER_CHUNK, StaticGenerationStep, generate_frames, rollout
from vidartrain.shapes import tokens_per_latent_frame
from vidartrain.trainers.base import compile_blocks

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


def measure(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int = 2) -> dict:
    """Best wall time of `repeats` runs of `fn` (which computes on `device`) and a peak of memory. On
    a GPU one warm-up run comes first, timed apart as `first_seconds` (kernel compilation and
    CUDA-graph recording are paid once, not per generation), and the peak is the allocator's over
    the last timed run. Elsewhere one more run counts the peak tensor memory (`PeakTensorMemory`,
    too slow to time): the CUDA allocator does not see CPU tensors, even where a GPU is present."""
    cuda = device.type == "cuda"
    first, seconds, peak = {}, [], 0
    if cuda:
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        first = {"first_seconds": time.perf_counter() - start}
    for _ in range(repeats):
        if cuda:  # the allocator's own peak (the dispatch mode cannot follow flex_attention's operator)
            baseline = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        value = fn()
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        if cuda:
            peak = torch.cuda.max_memory_allocated() - baseline
    if not cuda:
        with PeakTensorMemory() as memory:
            value = fn()
        peak = memory.peak
    return {"seconds": min(seconds), **first, "peak_mib": peak / MIB, "value": value}


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
        "teacher_forcing": measure(step(lambda: model.forward_teacher_forcing(clean, noisy, t, text)), clean.device),
        "sequential": measure(step(lambda: rollout(model, clean, noisy, t, text, cache_grad=True)), clean.device),
        "training_velocity_max_difference": velocity_difference,
    }


DEPLOYED_SIGMAS = (1.0, 0.75, 0.5, 0.25)  # the deployed Vidarc setting: 4 Euler steps per chunk


@dataclass(frozen=True)
class GenerationSetting:
    """How the frames after the first are generated: `frames_per_chunk` at a time, from noise by one
    denoising call per sigma (Euler from sigmas[0] down to 0); with a cache, each chunk is then
    prefilled at t = 0, without one the next chunk recomputes it."""
    frames_per_chunk: int
    sigmas: tuple[float, ...]


GENERATION_SETTINGS = {
    "one call per frame": GenerationSetting(1, (0.5,)),  # what the cache saves per model call
    "4 calls per frame": GenerationSetting(1, DEPLOYED_SIGMAS),
    "deployed": GenerationSetting(DEPLOYED_FRAMES_PER_CHUNK, DEPLOYED_SIGMAS),  # chunks of 4, 4 steps each
}


def generation_flops(shape: DitShape, frames: int, tokens_per_frame: int,
                     setting: GenerationSetting) -> dict[str, dict[str, float]]:
    """Forward FLOPs (split as `forward_flops`) of generating latent frames 1..frames-1 after a first
    real frame, by both paths. "cached": the first frame prefilled; every call runs the chunk against
    the KV cache, one more call at t = 0 appends it; the text's keys and values computed once.
    "recompute": every call runs the whole prefix with the chunk last, text included. One new frame
    costs the cache two frames' worth of matmuls at one call per frame, so the ratio stays far below
    the frame count there."""
    def call(query_frames: int, cached_frames: int, with_text: bool, times: int = 1) -> Counter:
        pairs = (query_frames * cached_frames + query_frames * (query_frames + 1) // 2) * tokens_per_frame**2
        flops = Counter(forward_flops(shape, query_frames * tokens_per_frame, pairs, query_frames))
        if not with_text:
            flops["linear"] -= text_flops(shape)
        return Counter({part: times * value for part, value in flops.items()})

    calls = len(setting.sigmas)
    cached, recompute = Counter(linear=text_flops(shape)) + call(1, 0, with_text=False), Counter()
    for start in range(1, frames, setting.frames_per_chunk):
        chunk = min(setting.frames_per_chunk, frames - start)
        cached += call(chunk, start, with_text=False, times=calls + 1)
        recompute += call(start + chunk, 0, with_text=True, times=calls)
    return {"cached": dict(cached), "recompute": dict(recompute)}


def flop_ratio(shape: DitShape, frames: int, tokens_per_frame: int, setting: GenerationSetting) -> float:
    """Recomputation's FLOPs over the cached generation's: the cache's speed-up at equal FLOP/s."""
    flops = generation_flops(shape, frames, tokens_per_frame, setting)
    return sum(flops["recompute"].values()) / sum(flops["cached"].values())


@torch.no_grad()
def cached_generation(model: WanModelCausal, first: torch.Tensor, noise: torch.Tensor, text: list[torch.Tensor],
                      cache: StaticKVCache, setting: GenerationSetting,
                      step: StaticGenerationStep | None = None) -> torch.Tensor:
    """Prefill the real frame `first`, then generate the frames of `noise` chunk by chunk against the
    cache and prefill each chunk; every call through `step` when given. Returns the generated frames."""
    text_kv = model.text_key_values(text)
    prefill = model.prefill if step is None else step.prefill
    prefill(first, text_kv, cache.reset())
    chunks = []
    for start in range(0, noise.shape[2], setting.frames_per_chunk):
        chunk = generate_frames(model, noise[:, :, start:start + setting.frames_per_chunk], text_kv, cache,
                                sigmas=setting.sigmas, step=step)
        prefill(chunk, text_kv, cache)
        chunks.append(chunk)
    return torch.cat(chunks, dim=2)


@torch.no_grad()
def recompute_generation(model: WanModelCausal, first: torch.Tensor, noise: torch.Tensor, text: list[torch.Tensor],
                         setting: GenerationSetting) -> torch.Tensor:
    """`cached_generation` without a cache: every denoising call runs the whole sequence, the real
    and generated frames so far at t = 0 and the chunk last at its noise level."""
    frames = first
    for start in range(0, noise.shape[2], setting.frames_per_chunk):
        x = noise[:, :, start:start + setting.frames_per_chunk]
        for sigma, next_sigma in zip(setting.sigmas, [*setting.sigmas[1:], 0.0]):
            t = torch.cat([torch.zeros(1, frames.shape[2]), torch.full((1, x.shape[2]), 1000.0 * sigma)], dim=1)
            velocity = model(torch.cat([frames, x], dim=2), t.to(x.device), text)[:, :, frames.shape[2]:]
            x = x + (next_sigma - sigma) * velocity
        frames = torch.cat([frames, x], dim=2)
    return frames[:, :, 1:]


def generation_paths(model: WanModelCausal, frames: int, generator: torch.Generator,
                     latent_hw: tuple[int, int] = LATENT_HW, graphed: GraphedGeneration | None = None) -> dict:
    """{setting: {"cached", "recompute", "graphed": measured}}: each setting generated from the same
    first frame and noise by the eager cache, without a cache, and through the CUDA-graph step
    (given `graphed`), each the best of the same number of timed runs: a ratio of a best-of-two to a
    single run would favour the cache."""
    first, noise = random_inputs(model, generator, (1, 48, 1, *latent_hw), (1, 48, frames - 1, *latent_hw))
    text = random_inputs(model, generator, (8, model.text_dim))
    device = first.device
    results = {}
    for name, setting in GENERATION_SETTINGS.items():
        results[name] = {
            "cached": measure(lambda: cached_generation(model, first, noise, text,
                                                        StaticKVCache(model.num_layers, capacity=frames), setting),
                              device),
            "recompute": measure(lambda: recompute_generation(model, first, noise, text, setting), device)}
        if graphed is None:
            continue
        try:
            results[name]["graphed"] = measure(lambda: cached_generation(model, first, noise, text, graphed.cache,
                                                                         setting, graphed.step), device)
        except Exception as error:  # reported in the row; the eager variants still are
            print(f"graphed generation ({name}) failed: {traceback.format_exc()}", flush=True)
            results[name]["graphed"] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    return results


class GraphedGeneration:
    """The static step in CUDA graphs (`StaticGenerationStep` under torch.compile mode
    "reduce-overhead") and its cache, through which `generation_paths` runs every call of a cached
    generation, the first prefill included. One step and one cache of `capacity` frames serve every
    setting and frame count: the step compiles once per chunk shape (1 frame; 4 and the last
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
                         paths: tuple[str, ...] = ("training", "generation"),
                         on_row: Callable[[int, dict], None] = lambda frames, row: None,
                         compile_options: dict | None = None) -> dict:
    """{frames: {path: {seconds, peak_mib}}} plus the agreement of the paths being compared.
    `paths`: "training" (teacher forcing vs sequential rollout), "generation" (cached vs recompute,
    under "generation" by setting: `generation_row`). `on_row(frames, row)` after each frame count.
    `compile_options`: the blocks compiled with them, as the trainer compiles them (None: eager)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = WanModelCausal(**(model_config or SMALL_CONFIG))
    if device != "cpu":
        model.to(torch.bfloat16)
    if compile_options is not None:
        compile_blocks(model, **compile_options)
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
            row["generation"] = generation_row(model, generation_paths(model, frames, generator, latent_hw, graphed),
                                               device)
        results[frames] = row
        on_row(frames, row)
    return results


def generation_row(model: WanModelCausal, generation: dict, device: str) -> dict:
    """The generation results of one frame count as reported: per setting, each variant's times and
    memory (or why it is missing), and how far recomputation's and the CUDA graphs' generated frames
    are from the eager cache's."""
    row = {}
    for name, variants in generation.items():
        cached = variants["cached"]["value"]
        reported = {variant: {key: m[key] for key in ("seconds", "first_seconds", "peak_mib") if key in m}
                    if "value" in m else m for variant, m in variants.items()}
        reported["recompute_max_difference"] = (variants["recompute"]["value"] - cached).abs().max().item()
        reported.setdefault("graphed", {"skipped": GRAPHED_SKIPPED})
        if "value" in variants.get("graphed", {}):
            reported["graphed"]["attention"] = model.resolved_attention_backend(torch.device(device))
            reported["graphed_max_difference"] = (variants["graphed"]["value"] - cached).abs().max().item()
        row[name] = reported
    return row


TRAINING_PATHS = ("teacher_forcing", "sequential")


def run() -> dict:
    """The benchmark at its default sizes (the `python -m benchmarks` entry)."""
    return measure_causal_paths()


def markdown(results: dict) -> str:
    tokens_per_frame = tokens_per_latent_frame(LATENT_HW)
    lines = [f"Small causal DiT {SMALL_CONFIG['dim']}x{SMALL_CONFIG['num_layers']} layers, "
             f"{tokens_per_frame} tokens per latent frame, CPU.", "",
             "| latent frames | teacher forcing s / MiB | sequential s / MiB | speed-up | same loss |",
             "|---|---|---|---|---|"]
    for frames, row in results.items():
        tf, seq = (row[name] for name in TRAINING_PATHS)
        lines.append(f"| {frames} | {tf['seconds']:.3f} / {tf['peak_mib']:.1f} "
                     f"| {seq['seconds']:.3f} / {seq['peak_mib']:.1f} | {seq['seconds'] / tf['seconds']:.2f}x "
                     f"| {row['teacher_forcing_loss']:.6f} = {row['sequential_loss']:.6f} |")
    lines += ["", "Generation of every frame after the first: cached vs recomputing the prefix. FLOP ratio: "
              "recomputation's FLOPs over the cache's (`generation_flops`), the most the cache can save at equal "
              "FLOP/s.", "",
              "| latent frames | generation | cached s / MiB | recompute s / MiB | speed-up | FLOP ratio |",
              "|---|---|---|---|---|---|"]
    for frames, row in results.items():
        for name, measured in row["generation"].items():
            cached, recompute = measured["cached"], measured["recompute"]
            ratio = flop_ratio(DitShape(**SMALL_CONFIG), int(frames), tokens_per_frame, GENERATION_SETTINGS[name])
            lines.append(f"| {frames} | {name} | {cached['seconds']:.3f} / {cached['peak_mib']:.1f} "
                         f"| {recompute['seconds']:.3f} / {recompute['peak_mib']:.1f} "
                         f"| {recompute['seconds'] / cached['seconds']:.2f}x | {ratio:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16],
                        help="latent frame counts to measure, each at least 2 (a first frame and one more)")
    args = parser.parse_args()
    if min(args.frames) < 2:
        parser.error(f"--frames {' '.join(map(str, args.frames))}: each count must be at least 2 (a first frame and "
                     f"one more)")
    print(markdown(measure_causal_paths(tuple(args.frames))))


if __name__ == "__main__":
    main()
