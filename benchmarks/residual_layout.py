"""DiT training step with the residual stream token-major (each token's features contiguous in
memory: what `WanModel.embed_video` gives the blocks) vs feature-major (the transposed view of the
patch embedding's output that the blocks got before; a block's output keeps its input's strides,
so every block ran on it and its layer norms reduced over a strided axis), eager and with
compiled blocks, side by side in one run. The values are the same: the velocities of both
layouts on one input are compared.

    python -m benchmarks.residual_layout                  # small CPU-sized DiT
    python -m benchmarks.residual_layout --device cuda --dim 3072 --ffn-dim 14336 --heads 24 \\
        --layers 4 --frames 21 --height 46 --width 40     # real 5B block width, 9,660 tokens (GPU)

One step as in `benchmarks.train_step` (forward + backward, no checkpointing, no optimizer).
"""
from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Callable

import torch

from benchmarks.train_step import StepBenchmark, add_step_arguments, build_model, time_steps
from vidartrain.models.wan.model import WanModel
from vidartrain.trainers.base import compile_blocks

LAYOUTS = ("token-major", "feature-major")
DEFAULT = StepBenchmark(dim=512, ffn_dim=2048, num_heads=8, num_layers=2, latent_frames=8, steps=5)


def feature_major(embed_video: Callable) -> Callable:
    """`embed_video` whose tokens [B, L, dim] are laid out as the transposed view was: same values,
    strides (L * dim, 1, L)."""
    def embed(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        tokens, grid = embed_video(x)
        return tokens.transpose(1, 2).contiguous().transpose(1, 2), grid
    return embed


def model_for(settings: StepBenchmark, layout: str, compiled: bool) -> WanModel:
    model = build_model(settings)
    if layout == "feature-major":
        model.embed_video = feature_major(model.embed_video)
    if compiled:
        compile_blocks(model)
    return model


@torch.no_grad()
def velocity(model: WanModel, settings: StepBenchmark) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    latents = torch.randn(1, 48, settings.latent_frames, settings.latent_height, settings.latent_width,
                          generator=generator)
    context = torch.randn(1, settings.text_len, settings.text_dim, generator=generator)
    device = torch.device(settings.device)
    return model(latents.to(device), torch.tensor([500.0], device=device), context.to(device)).float()


def run(settings: StepBenchmark | None = None, compiled: tuple[bool, ...] = (False, True)) -> dict[str, object]:
    """Both layouts, eager and compiled, on the same weights and inputs in this process."""
    settings = settings or DEFAULT
    results: dict[str, object] = {"settings": asdict(settings), "tokens_per_step": settings.tokens_per_step}
    for is_compiled in compiled:
        models = {layout: model_for(settings, layout, is_compiled) for layout in LAYOUTS}
        rows = {layout: time_steps(model, settings, "none") for layout, model in models.items()}
        velocities = [velocity(model, settings) for model in models.values()]
        results["compiled" if is_compiled else "eager"] = {
            **rows, "feature_major_over_token_major": rows["feature-major"]["step_s"] / rows["token-major"]["step_s"],
            "velocity_max_difference": (velocities[0] - velocities[1]).abs().max().item()}
    return results


def markdown(results: dict[str, object]) -> str:
    settings = results["settings"]
    lines = [f"WanModel dim {settings['dim']}, {settings['num_layers']} blocks, {results['tokens_per_step']} tokens "
             f"per step, bf16, {settings['device']}, no checkpointing.", "",
             "| blocks | token-major step (s) | feature-major step (s) | feature-major / token-major "
             "| velocity max difference |", "|---|---|---|---|---|"]
    for mode in ("eager", "compiled"):
        if mode in results:
            row = results[mode]
            lines.append(f"| {mode} | {row['token-major']['step_s']:.3f} | {row['feature-major']['step_s']:.3f} "
                         f"| **x{row['feature_major_over_token_major']:.2f}** | {row['velocity_max_difference']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_arguments(parser, DEFAULT)
    parser.add_argument("--eager-only", action="store_true", help="skip the compiled blocks (no compiler needed)")
    args = vars(parser.parse_args(argv))
    eager_only = args.pop("eager_only")
    results = run(StepBenchmark(**args), compiled=(False,) if eager_only else (False, True))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
