"""The optimizer step as DeepSpeed runs it: AdamW over one flat fp32 partition, torch's default
implementation (a loop over tensors on the CPU, `foreach` on CUDA; what the trainer ran before) vs its
fused kernel (`fused=True`, what `build_optimizer` asks for), side by side in one run.

    python -m benchmarks.optimizer_step [--millions 50 --steps 5]

On this CPU it is the step of an offloaded optimizer (`distributed.cpu_offload`, `zero3_1xgpu`): DeepSpeed
hands the trainer's optimizer the fp32 partitions and their gradients on the host. Both variants update the
same values; the largest difference after the timed steps is reported beside the times.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from vidartrain.config import TrainingConfig

VARIANTS = {"default": {}, "fused": {"fused": True}}


def adamw(parameter: torch.nn.Parameter, **implementation: bool) -> torch.optim.AdamW:
    t = TrainingConfig()  # the shipped hyperparameters: they decide nothing about speed, but are the real ones
    return torch.optim.AdamW([parameter], lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay,
                             **implementation)


def time_steps(implementation: dict[str, bool], values: torch.Tensor, gradient: torch.Tensor,
               steps: int) -> tuple[float, torch.Tensor]:
    """Seconds per step after one warm-up step (which also creates the Adam moments), and the values."""
    parameter = torch.nn.Parameter(values.clone())
    parameter.grad = gradient
    optimizer = adamw(parameter, **implementation)
    optimizer.step()
    started = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return (time.perf_counter() - started) / steps, parameter.detach()


def run(millions: float = 50, steps: int = 5) -> dict:
    generator = torch.Generator().manual_seed(0)
    count = int(millions * 1e6)
    values, gradient = torch.randn(count, generator=generator), torch.randn(count, generator=generator)
    seconds, updated = {}, {}
    for name, implementation in VARIANTS.items():
        seconds[name], updated[name] = time_steps(implementation, values, gradient, steps)
    return {"parameters": count, "steps": steps, "threads": torch.get_num_threads(),
            "seconds_per_step": seconds, "fused_speedup": seconds["default"] / seconds["fused"],
            "max_abs_difference": float((updated["default"] - updated["fused"]).abs().max())}


def markdown(result: dict) -> str:
    s = result["seconds_per_step"]
    return "\n".join([
        f"AdamW over one flat fp32 partition of {result['parameters'] / 1e6:,.0f}M values on the CPU "
        f"({result['threads']} threads; an offloaded optimizer's step), mean of {result['steps']} steps:", "",
        "| implementation | s / step | |", "|---|---|---|",
        f"| torch's default (a loop over tensors on the CPU; before) | {s['default']:.3f} | 1.00x |",
        f"| `fused=True` (`build_optimizer`) | {s['fused']:.3f} | {result['fused_speedup']:.2f}x faster |", "",
        f"Largest difference of the updated values: {result['max_abs_difference']:.1e}."])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--millions", type=float, default=50, help="values in the partition, in millions")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per implementation")
    args = parser.parse_args()
    result = run(args.millions, args.steps)
    print(json.dumps(result, indent=2))
    print(markdown(result))


if __name__ == "__main__":
    main()
