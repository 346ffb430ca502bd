"""DiT training-step throughput and peak memory in each activation checkpointing mode (none,
selective, full), measured side by side in one run.

    python -m benchmarks.train_step                       # small CPU-sized DiT
    python -m benchmarks.train_step --dim 3072 --ffn-dim 14336 --heads 24 --layers 4 \\
        --frames 21 --height 46 --width 40                # real 5B block width, 9,660 tokens (GPU)

One step = flow-matching forward + backward of a WanModel (bf16 weights, fp32 time path as
upstream), without the optimizer (identical in every variant). Activation memory: on a GPU the
allocator's peak above the model's own footprint during a step; on CPU (no allocator statistics;
the process RSS is dominated by library and arena overheads) the bytes autograd saves for backward
(vidartrain.plan.saved_bytes; with selective checkpointing plus the matmul and attention outputs it
keeps in its own cache, vidartrain.plan.kept_by_selective_bytes), which leaves out the block inputs
that non-reentrant checkpointing keeps for recomputation (one [B, L, dim] float32 tensor per block). `run(settings)` returns
the numbers as a dict; `markdown(results)` formats them.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from vidartrain.losses import add_noise, flow_matching_loss, flow_matching_target, sample_sigmas
from vidartrain.models.wan.model import CHECKPOINTING_MODES, WanModel
from vidartrain.plan import kept_by_selective_bytes, saved_bytes
from vidartrain.shapes import tokens_per_latent_frame


@dataclass
class StepBenchmark:
    dim: int = 256
    ffn_dim: int = 1024
    num_heads: int = 4
    num_layers: int = 4
    text_len: int = 64
    text_dim: int = 64
    latent_frames: int = 5
    latent_height: int = 32
    latent_width: int = 32
    batch_size: int = 1
    steps: int = 3
    device: str = "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.latent_frames * tokens_per_latent_frame((self.latent_height, self.latent_width))


def build_model(settings: StepBenchmark) -> WanModel:
    """The benchmark's WanModel in bf16, initialised on its device (a real-size model never sits on the CPU)."""
    torch.manual_seed(0)
    with torch.device(settings.device):
        model = WanModel(dim=settings.dim, ffn_dim=settings.ffn_dim, num_heads=settings.num_heads,
                         num_layers=settings.num_layers, text_len=settings.text_len, text_dim=settings.text_dim,
                         freq_dim=min(256, settings.dim))
    return model.to(torch.bfloat16)


def time_steps(model: WanModel, settings: StepBenchmark, checkpointing: str) -> dict[str, float]:
    """Time `settings.steps` training steps of `model` after one warm-up step, and the activation memory."""
    device = torch.device(settings.device)
    model.set_checkpointing(checkpointing)
    generator = torch.Generator(device).manual_seed(1)
    shape = (settings.batch_size, 48, settings.latent_frames, settings.latent_height, settings.latent_width)
    clean = torch.randn(shape, generator=generator, device=device)
    noise = torch.randn(shape, generator=generator, device=device)
    context = torch.randn(settings.batch_size, settings.text_len, settings.text_dim, generator=generator,
                          device=device)
    sigma = sample_sigmas(settings.batch_size, 5.0, generator=generator, device=device)

    def loss() -> torch.Tensor:
        pred = model(add_noise(clean, noise, sigma), 1000 * sigma, context)
        return flow_matching_loss(pred, flow_matching_target(clean, noise))

    measured = time_loss(model, loss, settings.steps, device, selective=checkpointing == "selective")
    return {**measured, "tokens_per_s": settings.tokens_per_step / measured["step_s"]}


def time_loss(model: torch.nn.Module, loss: Callable[[], torch.Tensor], steps: int, device: torch.device,
              selective: bool = False) -> dict[str, float]:
    """Seconds per `loss().backward()` over `steps` steps after one warm-up step, and the activation
    memory of one step (`selective`: the model checkpoints selectively, count what it keeps)."""
    def step() -> None:
        loss().backward()
        model.zero_grad(set_to_none=False)  # keep the gradient buffers: part of every step's footprint

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        activation_bytes = torch.cuda.max_memory_allocated(device) - baseline
    else:
        activation_bytes = saved_bytes(loss, model.parameters())
        if selective:
            activation_bytes += kept_by_selective_bytes(loss)
    return {"step_s": elapsed / steps, "activation_memory_bytes": activation_bytes}


def run_variant(settings: StepBenchmark, checkpointing: str) -> dict[str, float]:
    return time_steps(build_model(settings), settings, checkpointing)


def run(settings: StepBenchmark | None = None) -> dict[str, object]:
    """Every checkpointing mode side by side in this process, on the same inputs."""
    settings = settings or StepBenchmark()
    results: dict[str, object] = {"settings": asdict(settings), "tokens_per_step": settings.tokens_per_step}
    for mode in CHECKPOINTING_MODES:
        results[mode] = run_variant(settings, mode)
    plain = results["none"]
    for mode in ("selective", "full"):
        results[f"{mode}_memory_ratio"] = results[mode]["activation_memory_bytes"] / max(1, plain["activation_memory_bytes"])
        results[f"{mode}_speed_ratio"] = results[mode]["tokens_per_s"] / plain["tokens_per_s"]
    return results


def markdown(results: dict[str, object]) -> str:
    settings = results["settings"]
    memory = "GPU allocator peak" if torch.device(settings["device"]).type == "cuda" else "bytes saved for backward"
    lines = [f"WanModel dim {settings['dim']}, {settings['num_layers']} blocks, {results['tokens_per_step']} tokens "
             f"per step, bf16, {settings['device']}; activation memory = {memory}.", "",
             "| checkpointing | tokens/s | step (s) | activation memory (MiB) |", "|---|---|---|---|"]
    for mode in CHECKPOINTING_MODES:
        r = results[mode]
        lines.append(f"| {mode} | {r['tokens_per_s']:.1f} | {r['step_s']:.3f} | "
                     f"{r['activation_memory_bytes'] / 2**20:.1f} |")
    lines.append("")
    lines += [f"{mode.capitalize()} / none: memory **x{results[f'{mode}_memory_ratio']:.2f}**, "
              f"speed **x{results[f'{mode}_speed_ratio']:.2f}**." for mode in ("selective", "full")]
    return "\n".join(lines)


def add_step_arguments(parser: argparse.ArgumentParser, defaults: StepBenchmark) -> None:
    """One flag per `StepBenchmark` field (what `StepBenchmark(**vars(args))` takes), `defaults` as defaults."""
    for flag, field in (("--dim", "dim"), ("--ffn-dim", "ffn_dim"), ("--heads", "num_heads"),
                        ("--layers", "num_layers"), ("--frames", "latent_frames"), ("--height", "latent_height"),
                        ("--width", "latent_width"), ("--batch", "batch_size"), ("--steps", "steps")):
        parser.add_argument(flag, dest=field, type=int, default=getattr(defaults, field))
    parser.add_argument("--device", default=defaults.device)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_arguments(parser, StepBenchmark())
    results = run(StepBenchmark(**vars(parser.parse_args(argv))))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
