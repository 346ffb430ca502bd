"""Where the time of eager cached generation goes: the host issuing operators, or the GPU running them.

Cached generation without CUDA graphs (the static KV cache, eager blocks: `vidar-sample`'s default
and the training run's validation samples) makes one model call per denoising step and one per
prefill, each a few hundred small operators over one chunk of tokens. This profiles one whole
generation per setting of `benchmarks.causal_paths.GENERATION_SETTINGS` and reports per model call
its wall time, the operators the host issued (aten ops not called by another one), the CUDA kernels launched and
the share of the wall time the GPU is busy (the summed kernel time of a profiled generation over
the wall time of an unprofiled one). A GPU busy far below 100% means the host bounds the call:
fewer operators per block, or CUDA graphs (`--compile-generation`), make it faster; a faster GPU
would not. On the CPU the GPU columns are reported as skipped.

    python -m benchmarks.gpu --sections generation_profile    # real sizes on a GPU
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.causal_paths import GENERATION_SETTINGS, GenerationSetting, cached_generation, random_inputs
from vidartrain.models.wan.causal import WanModelCausal
from vidartrain.models.wan.kv_cache import StaticKVCache

NO_GPU = "the model is not on a CUDA device: nothing runs on a GPU"
TOP_HOST_OPS = 6


def count_model_calls(model: WanModelCausal, run: Callable[[], object]) -> int:
    """Model calls during `run()`: the forward calls of its first block."""
    calls = 0

    def count(module, args) -> None:
        nonlocal calls
        calls += 1

    handle = model.blocks[0].register_forward_pre_hook(count)
    try:
        run()
    finally:
        handle.remove()
    return calls


def called_by_aten(event: torch.autograd.profiler_util.FunctionEvent) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_setting(model: WanModelCausal, frames: int, latent_hw: tuple[int, int], setting: GenerationSetting,
                    generator: torch.Generator) -> dict:
    """One generation of `frames` latent frames in `setting`, eager static cache: per model call its
    wall time, operators, kernels and the GPU's busy share, and the host's costliest operators."""
    first, noise = random_inputs(model, generator, (1, 48, 1, *latent_hw), (1, 48, frames - 1, *latent_hw))
    text = random_inputs(model, generator, (8, model.text_dim))
    cache = StaticKVCache(model.num_layers, capacity=frames)
    device = first.device

    def run() -> torch.Tensor:
        return cached_generation(model, first, noise, text, cache, setting)

    calls = count_model_calls(model, run)  # also the warm-up: kernels compiled, buffers allocated
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    wall = time.perf_counter() - start
    cuda = device.type == "cuda"  # a model on the CPU launches no kernels, even where a GPU is present
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as profiled:
        run()
        synchronize(device)
    # Operators the host issued: aten ops not called by another one (a linear counts once, not again as its addmm).
    issued = sum(1 for e in profiled.events() if e.name.startswith("aten::") and not called_by_aten(e))
    events = profiled.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    host = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CPU),
                  key=lambda e: e.self_cpu_time_total, reverse=True)[:TOP_HOST_OPS]
    row = {"model_calls": calls, "ms_per_call": 1e3 * wall / calls,
           "operators_per_call": issued / calls,
           "top_host_ops": [{"name": e.key, "calls_per_call": e.count / calls,
                             "self_cpu_ms_per_call": e.self_cpu_time_total / 1e3 / calls} for e in host]}
    if cuda:
        busy_s = sum(e.self_device_time_total for e in kernels) / 1e6
        row.update(kernels_per_call=sum(e.count for e in kernels) / calls, gpu_busy=busy_s / wall)
    else:
        row["gpu"] = {"skipped": NO_GPU}
    return row


def profile_generation(model: WanModelCausal, frames: int, latent_hw: tuple[int, int], seed: int = 0) -> dict:
    """{setting: profile_setting(...)} for every generation setting, under no gradient."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return {name: profile_setting(model, frames, latent_hw, setting, generator)
                for name, setting in GENERATION_SETTINGS.items()}


def markdown(profiled: dict, frames: int, num_layers: int) -> list[str]:
    """The profile as a table, and the host's costliest operators of the first setting."""
    lines = [f"**Eager cached generation, where the time goes** ({frames} latent frames, {num_layers} blocks, "
             "one profiled generation per setting; GPU busy = summed kernel time / wall time)", "",
             "| setting | model calls | ms per call | operators per call | kernels per call | GPU busy |",
             "|---|---|---|---|---|---|"]
    for name, row in profiled.items():
        gpu = (f"{row['kernels_per_call']:.0f} | {row['gpu_busy']:.0%}" if "gpu_busy" in row
               else f"- | skipped: {row['gpu']['skipped']}")
        lines.append(f"| {name} | {row['model_calls']} | {row['ms_per_call']:.2f} | {row['operators_per_call']:.0f} "
                     f"| {gpu} |")
    name, row = next(iter(profiled.items()))
    costliest = ", ".join(f"{op['name']} {op['self_cpu_ms_per_call']:.2f} ms ({op['calls_per_call']:.0f}x)"
                          for op in row["top_host_ops"])
    return lines + ["", f"Host time per model call ({name}), costliest operators first: {costliest}."]
