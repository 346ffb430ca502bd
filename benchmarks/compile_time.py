"""Compilation time of the static generation step (`StaticGenerationStep` under torch.compile,
inductor) on a narrow causal DiT on the CPU at two depths, with the transformer blocks as one
nested compile region (as shipped: `vidartrain.models.wan.model.run_block`) and unrolled, side by
side, and what a later call costs each way. Each measurement runs in a fresh process with empty
compiler caches, so no variant reuses another's kernels.

    python -m benchmarks.compile_time [--layers 2 30]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

VARIANTS = ("one region", "unrolled")
NARROW = dict(dim=64, ffn_dim=128, num_heads=2, text_len=16, text_dim=32)


def time_calls(layers: int, variant: str, calls: int = 20) -> dict:
    """In this process: build the model and prefill one frame, then time the step's first call
    (compilation) and the median of `calls` later calls (what a generation pays per call)."""
    from vidartrain.models.wan import model as wan_model
    from vidartrain.models.wan.causal import WanModelCausal
    from vidartrain.models.wan.kv_cache import StaticKVCache
    from vidartrain.rollouts import StaticGenerationStep

    if variant == "unrolled":  # what the step compiled before the blocks were a region
        wan_model.run_block = lambda block, *args: block(*args)
    torch.manual_seed(0)
    model = WanModelCausal(**NARROW, num_layers=layers).eval().requires_grad_(False)
    text = model.text_key_values(torch.randn(1, NARROW["text_len"], NARROW["text_dim"]))
    frame = torch.randn(1, 48, 1, 16, 16)
    with torch.no_grad():
        cache = model.prefill(frame, text, StaticKVCache(layers, capacity=4))
    step = StaticGenerationStep(model, {})
    seconds = []
    for _ in range(calls + 1):
        start = time.perf_counter()
        step.velocity(frame, 500.0, text, cache)
        seconds.append(time.perf_counter() - start)
    return {"first_call_s": seconds[0], "call_ms": 1000 * statistics.median(seconds[1:])}


def measure(layers: int, variant: str) -> dict:
    """`time_calls` in a child process whose inductor cache directory is new and empty."""
    with tempfile.TemporaryDirectory() as cache_dir:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir, "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
               "TORCHINDUCTOR_AUTOGRAD_CACHE": "0"}
        out = subprocess.run([sys.executable, "-m", "benchmarks.compile_time", "--child", variant, str(layers)],
                             env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run(layer_counts: tuple[int, ...] = (2, 30)) -> dict:
    return {layers: {variant: measure(layers, variant) for variant in VARIANTS} for layers in layer_counts}


def markdown(results: dict) -> str:
    lines = [f"Static generation step, {NARROW['dim']}-wide causal DiT on the CPU (inductor): the first call "
             "compiles; a later call is the median of 20 (no CUDA graphs here: each block region is a call).", "",
             "| blocks | first call s: one region / unrolled | unrolled / one region "
             "| later call ms: one region / unrolled |", "|---|---|---|---|"]
    for layers, row in results.items():
        region, unrolled = row["one region"], row["unrolled"]
        lines.append(f"| {layers} | {region['first_call_s']:.1f} / {unrolled['first_call_s']:.1f} "
                     f"| {unrolled['first_call_s'] / region['first_call_s']:.2f}x "
                     f"| {region['call_ms']:.1f} / {unrolled['call_ms']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 30])
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "LAYERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(time_calls(int(args.child[1]), args.child[0])))
        return
    print(markdown(run(tuple(args.layers))))


if __name__ == "__main__":
    main()
