"""End to end through the command lines: synth -> shard -> inspect -> load."""
import json
import subprocess
import sys
from pathlib import Path

from vidartrain.config import DataConfig
from vidartrain.data.dataset import build_loader

REPO = Path(__file__).resolve().parents[2]


def run_module(module: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_synth_shard_inspect_load(tmp_path):
    episodes, shards = tmp_path / "episodes", tmp_path / "shards"
    made = run_module("data_tools.synth", "--episodes", 5, "--frames", 16, "--height", 48, "--width", 64,
                      "--out", episodes, "--defects")
    assert made.returncode == 0, made.stderr
    sharded = run_module("data_tools.shard", "--episodes", episodes, "--out", shards, "--samples-per-shard", 2,
                         "--val-fraction", 0.2, "--workers", 2)
    assert sharded.returncode == 0, sharded.stderr
    assert "ep/s" in sharded.stderr and "skipped:" in sharded.stderr
    inspected = run_module("data_tools.inspect", shards)
    assert inspected.returncode == 0, inspected.stderr
    assert "OK" in inspected.stdout and "skipped: 19" in inspected.stdout
    index = json.loads((shards / "index.json").read_text())
    assert index["totals"] == {"input_episodes": 24, "train_episodes": 4, "val_episodes": 1, "skipped": 19}
    config = DataConfig(shards=str(shards), val_shards=str(shards / "val"), num_frames=9, height=64, width=64,
                        num_workers=1)
    train = list(build_loader(config.shards, config, 2, rank=0, world_size=1, epochs=1))
    assert [b["video"].shape for b in train] == [(2, 3, 9, 64, 64)] * 2
    val = list(build_loader(config.val_shards, config, 2, rank=0, world_size=1, train=False))
    assert len(val) == 1 and len(val[0]["__key__"]) == 1


def test_loader_benchmark_runs_at_a_tiny_size_and_says_so(capsys):
    from benchmarks.loader import main
    results = main(["--episodes", "2", "--frames", "12", "--num-frames", "5", "--height", "32", "--width", "32",
                    "--samples", "2", "--gpu-samples-per-s", "2.5"])
    caption = capsys.readouterr().out.splitlines()[0]
    assert caption.startswith("5x32x32 clips, 1 worker process(es)") and "~2.5 samples/s (--gpu-samples-per-s)" in caption
    assert set(results) == {"raw", "raw_uint8", "pre_encoded"}
    assert results["raw"]["batch_tensor_bytes"] == 3 * 5 * 32 * 32 * 4  # float32 video [1, 3, 5, 32, 32]
    assert results["raw_uint8"]["batch_tensor_bytes"] == 3 * 5 * 32 * 32
    assert results["pre_encoded"]["batch_tensor_bytes"] == 48 * 2 * 2 * 2 * 2  # bf16 latents [1, 48, 2, 2, 2]
    assert all(r["samples_per_s"] > 0 and r["workers_per_gpu"] > 0 for r in results.values())
