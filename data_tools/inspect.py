"""Re-verify a shard directory and print what it holds.

    python -m data_tools.inspect data/shards [--no-decode]

Checks every shard's size and sha256 against index.json and (unless --no-decode) that every
sample's members are all there, its instruction is UTF-8 and its video decodes to at least the
recorded number of frames. A shard whose checksum does not match is decoded all the same (when its
size does), so that the samples damaged in it are named.
Exits non-zero when anything does not match.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch

from vidartrain.data.dataset import SAMPLE_ERRORS, SampleRef, ShardStream
from vidartrain.data.shard_index import file_sha256, read_index, shard_file_problem
from vidartrain.data.video import VideoReadError, open_video, read_frames
from vidartrain.errors import reports_errors
from vidartrain.shapes import VAE_STRIDE

MEMBERS = {"raw": ("mp4", "actions.npy", "txt", "json"),
           "latents": ("tensors.safetensors", "actions.npy", "txt", "json")}


@dataclass
class Report:
    episodes: int = 0
    samples: int = 0
    frames: int = 0
    shards: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)


def check_video(sample: dict, frames: int) -> str | None:
    try:
        reader = open_video(sample["mp4"])
        for start in range(0, len(reader), 64):
            read_frames(reader, np.arange(start, min(start + 64, len(reader))))
    except VideoReadError as error:
        return f"video does not decode ({error})"
    if len(reader) < frames:
        return f"video has {len(reader)} frames, index.json says {frames}"
    return None


def check_text(sample: dict) -> str | None:
    """The instruction and metadata decode as the loader decodes them."""
    try:
        if not sample["txt"].decode("utf-8").strip():
            return "instruction (txt) is empty"
    except UnicodeDecodeError as error:
        return f"instruction (txt) is not UTF-8 ({error})"
    try:
        json.loads(sample["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"metadata (json) does not parse ({error})"
    return None


def check_tensors(sample: dict, precompute: dict) -> str | None:
    try:
        tensors = safetensors.torch.load(sample["tensors.safetensors"])
    except Exception as error:  # safetensors raises its own error types for malformed bytes
        return f"tensors.safetensors does not load ({error})"
    stride_t, stride_h, stride_w = VAE_STRIDE
    expected = (1 + (precompute["num_frames"] - 1) // stride_t, precompute["height"] // stride_h,
                precompute["width"] // stride_w)
    if "latents" not in tensors or tuple(tensors["latents"].shape[1:]) != expected:
        found = tuple(tensors["latents"].shape) if "latents" in tensors else "none"
        return f"latents of shape {found}, expected (C, {', '.join(map(str, expected))})"
    if "idm" in precompute["precompute"] and tuple(tensors.get("idm_mask", np.zeros(0)).shape) != expected:
        return f"idm_mask missing or not of shape {expected}"
    return None


def check_samples(directory: Path, shard: dict, index: dict) -> list[str]:
    """Every sample has its members and a video that decodes to its recorded frame count (or loadable
    latents of the recorded window size)."""
    problems = []
    for entry in shard["entries"]:
        ref = SampleRef(str(directory / shard["name"]), entry["offset"], entry["size"], entry["key"], entry["frames"])
        problem = check_sample(ref, index)
        if problem:
            problems.append(f"{ref.shard}: sample {ref.key}: {problem}")
    return problems


def check_sample(ref: SampleRef, index: dict) -> str | None:
    """What is wrong with one sample, or None; each is read on its own, as the loader reads it, so a
    damaged tar header costs that sample and the others are still checked."""
    try:
        sample = ShardStream.read(ref)
    except SAMPLE_ERRORS as error:
        return f"cannot be read at its offset ({type(error).__name__}: {error})"
    missing = [member for member in MEMBERS[index["mode"]] if member not in sample]
    if missing:
        return f"lacks members {missing}"
    return check_text(sample) or (check_video(sample, ref.frames) if index["mode"] == "raw"
                                  else check_tensors(sample, index["settings"]["precompute"]))


def check_text_embeddings(directory: Path, index: dict) -> list[str]:
    """Every sample's instruction has its embedding in the split's embeddings file."""
    if not index.get("text_embeddings"):
        return []
    path = directory / index["text_embeddings"]
    if not path.is_file():
        return [f"{path}: missing"]
    with safetensors.safe_open(str(path), framework="pt") as stored:
        keys = set(stored.keys())
    wanted = {entry["text_key"] for shard in index["shards"] for entry in shard["entries"]}
    wanted |= {index["null_text_key"]} if index.get("null_text_key") else set()
    return [f"{path}: no embedding for text_key {key}" for key in sorted(wanted - keys)]


def inspect_split(directory: Path, decode: bool) -> tuple[dict | None, Report]:
    report = Report()
    try:
        index = read_index(directory)
    except (FileNotFoundError, ValueError) as error:
        report.problems.append(str(error))
        return None, report
    for shard in index["shards"]:
        report.shards += 1
        report.bytes += shard["bytes"]
        report.samples += shard["samples"]
        problem = shard_file_problem(directory, shard)
        if problem:  # missing, or of another size: the recorded offsets say nothing about its bytes
            report.problems.append(problem)
            continue
        if file_sha256(directory / shard["name"]) != shard["sha256"]:
            report.problems.append(f"{directory / shard['name']}: sha256 does not match index.json")
        if decode:
            report.problems.extend(check_samples(directory, shard, index))
    report.problems.extend(check_text_embeddings(directory, index))
    report.episodes = len(index["episodes"])
    report.frames = sum(episode["frames"] for episode in index["episodes"])
    return index, report


def describe(name: str, report: Report, fps: int) -> str:
    hours = report.frames / fps / 3600
    return (f"{name:5s}: {report.episodes} episodes, {report.samples} samples, {report.frames} frames "
            f"({hours:.2f} h at {fps} fps), {report.shards} shards, {report.bytes:,} bytes")


def inspect(shards_dir: Path, decode: bool = True) -> tuple[str, list[str]]:
    """(summary text, problems) for a shard directory and its validation split."""
    index, train = inspect_split(shards_dir, decode)
    if index is None:
        return f"{shards_dir}: unreadable", train.problems
    fps = index["settings"]["layout"]["fps"]
    lines = [describe(index.get("split", "train"), train, fps)]  # a val/ directory holds the val split
    problems = list(train.problems)
    if index.get("val"):
        _, val = inspect_split(shards_dir / index["val"], decode)
        lines.append(describe("val", val, fps))
        problems += val.problems
    kind = "pre-encoded latents" if index["mode"] == "latents" else "video"
    lines.append(f"samples: {kind}, actions of {index['settings']['layout']['action_dim']} dimensions")
    reasons = Counter(skip["reason"] for skip in index["skipped"])
    lines.append(f"skipped: {sum(reasons.values())}" + "".join(f"\n  {reason}: {count}"
                                                              for reason, count in sorted(reasons.items())))
    return "\n".join(lines), problems


@reports_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vidar-inspect", description=__doc__.split("\n")[0])
    parser.add_argument("shards", type=Path, nargs="+",
                        help="directories with index.json (several: e.g. the sources of a mixture)")
    parser.add_argument("--no-decode", action="store_true", help="check checksums only, do not decode videos")
    args = parser.parse_args(argv)
    problems = []
    for shards in args.shards:
        text, found = inspect(shards, decode=not args.no_decode)
        print(f"{shards}:\n  " + text.replace("\n", "\n  ") if len(args.shards) > 1 else text)
        problems += found
    for problem in problems:
        print(f"PROBLEM {problem}", file=sys.stderr)
    print("OK" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
