"""Calibrate the planner's activation model against measured CPU peak memory.

    python -m benchmarks.plan_calibration

For two small DiT configs (each in every activation checkpointing mode), one training step
(forward + backward, CPU bf16 autocast) runs in a fresh process; the peak resident memory above the
state before the step (model, inputs, gradients already allocated) is compared with the planner's
estimate for the same tokens. The peak is read from the kernel's VmHWM after resetting it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CONFIGS = [  # (name, dim, ffn_dim, heads, layers, micro-batch, latent frames, latent height, width)
    ("small-a", 512, 2048, 8, 4, 2, 4, 32, 32),
    ("small-b", 768, 3072, 12, 6, 1, 8, 32, 32),
]


# glibc keeps freed heap memory (and raises its mmap threshold after large frees), so RSS would
# not follow the tensors. A fixed mmap threshold and no trim threshold make every large tensor an
# mmap that is returned on free: RSS then tracks the live tensors.
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def read_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_step(dim: int, ffn_dim: int, heads: int, layers: int, micro: int, frames: int, height: int,
                 width: int, checkpointing: str) -> dict[str, float]:
    """Run in a child process: peak RSS growth of one training step, in bytes."""
    import torch

    from vidartrain.models.wan.model import WanModel
    from vidartrain.shapes import tokens_per_latent_frame

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = WanModel(dim=dim, ffn_dim=ffn_dim, num_heads=heads, num_layers=layers, text_len=64, text_dim=64,
                     freq_dim=64)
    model.set_checkpointing(checkpointing)
    x = torch.randn(micro, 48, frames, height, width)
    t = torch.rand(micro, frames) * 1000  # per-frame timesteps, as in training
    context = torch.randn(micro, 64, 64)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, t, context).float().pow(2).mean()
        loss.backward()

    step()  # warm-up: gradients and allocator pools exist before the measured step
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = read_status_kib("VmRSS")
    step()
    peak = read_status_kib("VmHWM")
    tokens = micro * frames * tokens_per_latent_frame((height, width))
    return {"measured_bytes": (peak - before) * 1024.0, "tokens": tokens}


def planned_bytes(dim: int, ffn_dim: int, heads: int, layers: int, tokens: int, checkpointing: str) -> float:
    from vidartrain.plan import measure_activation_model

    return tokens * measure_activation_model(dim, ffn_dim, heads).per_token(layers, checkpointing, "cpu")


def run() -> dict:
    rows = []
    for name, dim, ffn, heads, layers, micro, frames, height, width in CONFIGS:
        for checkpointing in ("none", "selective", "full"):
            args = [dim, ffn, heads, layers, micro, frames, height, width, checkpointing]
            child = subprocess.run([sys.executable, "-m", "benchmarks.plan_calibration", "--child", json.dumps(args)],
                                   capture_output=True, text=True, check=True, env=CHILD_ENV,
                                   cwd=Path(__file__).resolve().parents[1])
            measured = json.loads(child.stdout.strip().splitlines()[-1])
            planned = planned_bytes(dim, ffn, heads, layers, measured["tokens"], checkpointing)
            rows.append({"config": name, "dim": dim, "layers": layers, "tokens": measured["tokens"],
                         "checkpointing": checkpointing, "measured_mib": measured["measured_bytes"] / 2**20,
                         "planned_mib": planned / 2**20,
                         "error": planned / measured["measured_bytes"] - 1.0})
    return {"rows": rows}


def markdown(result: dict) -> str:
    lines = ["| config | dim x layers | tokens | checkpointing | measured peak MiB | planned MiB | error |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['config']} | {r['dim']} x {r['layers']} | {r['tokens']} | "
                     f"{r['checkpointing']} | {r['measured_mib']:.1f} | "
                     f"{r['planned_mib']:.1f} | {r['error']:+.1%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(measure_step(*json.loads(sys.argv[2]))))
    else:
        print(markdown(run()))
