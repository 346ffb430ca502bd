"""Loader throughput: raw-video shards vs pre-encoded shards, side by side in one run.

    python -m benchmarks.loader [--episodes 4 --frames 90 --num-frames 81 --height 736 --width 640]

Writes synthetic 720x640 episodes to a temporary directory, shards them twice (raw mp4; pre-encoded
with random latents / IDM masks / text embeddings of the real shapes: this measures reading, not
encoding), then times the training loader over each: samples/s and MB/s of shard bytes for ONE
DataLoader worker process, and how many such workers one GPU needs to keep up with a given
consumption rate (default 1.1 samples/s: one H100 at ~40% MFU in stage 1).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from data_tools import shard as shard_tool
from data_tools.precompute import WindowSettings, settings_record
from data_tools.synth import write_synthetic_episodes
from vidartrain.data.dataset import build_loader
from vidartrain.models.wan.vae import latent_shape

H100_SAMPLES_PER_S = 1.1
TEXT_DIM, TEXT_TOKENS = 4096, 24


class RandomTensors:
    """Stands in for data_tools.precompute.Precomputer: the real shapes and dtype, random values."""

    what = ("idm", "latents", "text")

    def __init__(self, window: WindowSettings, seed: int = 0):
        self.shape = latent_shape(window.num_frames, window.height, window.width)
        self.generator = torch.Generator().manual_seed(seed)

    def window_tensors(self, frames: np.ndarray) -> dict[str, torch.Tensor]:
        latents = torch.randn(self.shape, generator=self.generator).to(torch.bfloat16)
        mask = torch.rand(self.shape[1:], generator=self.generator).to(torch.bfloat16)
        return {"latents": latents, "idm_mask": mask}

    def text_embeddings(self, texts: dict[str, str]) -> dict[str, torch.Tensor]:
        return {key: torch.randn(TEXT_TOKENS, TEXT_DIM, generator=self.generator).to(torch.bfloat16)
                for key in sorted(texts)}


def make_shards(root: Path, episodes: int, frames: int, window: WindowSettings, noise: float) -> tuple[Path, Path]:
    """Raw and pre-encoded shard directories of the same synthetic 720x640 episodes."""
    write_synthetic_episodes(root / "episodes", episodes, frames=frames, height=720, width=640, seed=0, noise=noise)
    raw, pre_encoded = root / "raw", root / "pre_encoded"
    shard_tool.convert(root / "episodes", raw, shard_tool.ConversionSettings())
    record = settings_record(("idm", "latents", "text"), window, None, None, "bfloat16")
    shard_tool.convert(root / "episodes", pre_encoded, shard_tool.ConversionSettings(precompute=record),
                       precomputer=RandomTensors(window))
    return raw, pre_encoded


def measure(shards: Path, window: WindowSettings, samples: int, workers: int,
            video_dtype: torch.dtype = torch.float32) -> dict:
    """Time `samples` micro-batches of one sample from a loader with `workers` worker processes."""
    config = SimpleNamespace(num_frames=window.num_frames, height=window.height, width=window.width, fps=10,
                             resize=window.resize, cfg_prob=0.1, num_workers=workers, seed=0, max_bad_samples=0)
    index = json.loads((shards / "index.json").read_text())
    sizes = {e["key"]: e["size"] for s in index["shards"] for e in s["entries"]}
    loader = iter(build_loader(shards, config, 1, rank=0, world_size=1, video_dtype=video_dtype))
    next(loader)  # worker start-up and first read are not throughput
    read_bytes = 0
    start = time.perf_counter()
    for _ in range(samples):
        batch = next(loader)
        read_bytes += sum(sizes[key] for key in batch["__key__"])
    seconds = time.perf_counter() - start
    tensor = batch["video"] if "video" in batch else batch["latents"]
    return {"samples_per_s": samples / seconds, "mb_per_s": read_bytes / seconds / 1e6,
            "sample_bytes_on_disk": read_bytes / samples, "batch_tensor_bytes": tensor.numel() * tensor.element_size()}


def run(episodes: int = 4, frames: int = 90, num_frames: int = 81, height: int = 736, width: int = 640,
        samples: int = 8, workers: int = 1, gpu_samples_per_s: float = H100_SAMPLES_PER_S,
        noise: float = 6.0) -> dict:
    """{'raw': {...}, 'raw_uint8': {...}, 'pre_encoded': {...}}: throughput of a loader with `workers`
    worker processes over raw shards (float32 video, or uint8 video mapped to [-1, 1] by the
    consumer) and over pre-encoded shards."""
    window = WindowSettings(num_frames=num_frames, stride=num_frames, height=height, width=width)
    window.check()
    if frames < num_frames:
        raise ValueError(f"--frames {frames} must be at least --num-frames {num_frames}")
    with tempfile.TemporaryDirectory(prefix="vidar-loader-bench-") as tmp:
        raw, pre_encoded = make_shards(Path(tmp), episodes, frames, window, noise)
        results = {"raw": measure(raw, window, samples, workers),
                   "raw_uint8": measure(raw, window, samples, workers, torch.uint8),
                   "pre_encoded": measure(pre_encoded, window, samples, workers)}
    for result in results.values():
        per_worker = result["samples_per_s"] / max(workers, 1)
        result["workers_per_gpu"] = gpu_samples_per_s / per_worker
    return results


def markdown(results: dict, workers: int = 1, gpu_samples_per_s: float = H100_SAMPLES_PER_S,
             clip: tuple[int, int, int] = (81, 736, 640)) -> str:
    consumer = ("one H100 at ~40% MFU in stage 1" if gpu_samples_per_s == H100_SAMPLES_PER_S
                else "--gpu-samples-per-s")
    lines = [f"{clip[0]}x{clip[1]}x{clip[2]} clips, {max(workers, 1)} worker process(es), micro-batch 1; one GPU "
             f"consumes ~{gpu_samples_per_s:g} samples/s ({consumer}).", "",
             "| shards | samples/s | MB/s read | MB/sample on disk | batch MB | workers per GPU |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['samples_per_s']:.2f} | {r['mb_per_s']:.1f} | {r['sample_bytes_on_disk'] / 1e6:.2f} "
                     f"| {r['batch_tensor_bytes'] / 1e6:.1f} | {r['workers_per_gpu']:.2f} |")
    ratio = results["pre_encoded"]["samples_per_s"] / results["raw"]["samples_per_s"]
    lines += ["", f"Pre-encoded / raw samples per second: **{ratio:.0f}x**."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--frames", type=int, default=90, help="frames per synthetic episode")
    parser.add_argument("--num-frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=736)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--samples", type=int, default=8, help="timed samples per shard kind")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader worker processes")
    parser.add_argument("--gpu-samples-per-s", type=float, default=H100_SAMPLES_PER_S)
    parser.add_argument("--noise", type=float, default=6.0,
                        help="per-pixel noise of the synthetic videos (camera-like mp4 bitrate; 0: flat shapes)")
    args = parser.parse_args(argv)
    results = run(args.episodes, args.frames, args.num_frames, args.height, args.width, args.samples, args.workers,
                  args.gpu_samples_per_s, args.noise)
    print(markdown(results, args.workers, args.gpu_samples_per_s, (args.num_frames, args.height, args.width)))
    return results


if __name__ == "__main__":
    main()
