"""Stage 2 end to end on CPU: torchrun, 2 gloo ranks, ZeRO-3, from a tiny Wan2.2
checkpoint plus a stage-1 style vidar.pt, with the embodiment-aware loss from a frozen IDM.

One 'mixed' run (both the teacher-forcing and the self-generated path, chosen per micro-step, the
same on both ranks) is the reference; a run killed with SIGKILL and resumed must reproduce its
losses and export exactly; a closed-loop run exercises the deployed schedule with a window reset.
"""

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data_tools.tiny_checkpoint import write_tiny_checkpoint
from helpers.trainer_launch import (kill_launch, logged_steps, run, start, tiny_idm, torchrun_command, wait_for_step,
                                    write_shards)
from vidartrain.distributed.export import write_state_dict
from vidartrain.models.idm import save_idm
from vidartrain.models.wan.causal import WanModelCausal
from vidartrain.models.wan.checkpoint import read_model_config
from vidartrain.models.wan.model import WanModel

STEPS = 3


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2")
    write_tiny_checkpoint(root / "ckpt")
    # A stage-1 export stand-in: the tiny DiT with moved weights, as vidar.pt.
    model = WanModel.from_pretrained(root / "ckpt", dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01)
    write_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, root / "vidar.pt")
    torch.manual_seed(0)
    save_idm(tiny_idm(), root / "idm.pt")
    write_shards(root, 10, frames=24, val_fraction=0.4)
    return root


def train_args(workspace, output_dir, *extra):
    return ["--config", "configs/debug/tiny_vidarc.yaml", "--ds-config", "ds_configs/cpu_debug.json",
            "--output_dir", str(output_dir),
            "--set", f"model.ckpt_dir={workspace / 'ckpt'}", "--set", f"model.pt_dir={workspace / 'vidar.pt'}",
            "--set", f"model.idm_path={workspace / 'idm.pt'}", "--set", f"data.shards={workspace / 'shards'}",
            "--set", f"data.val_shards={workspace / 'shards' / 'val'}", "--set", f"training.val_every={STEPS}",
            "--set", f"output.save_path={output_dir / 'export' / 'vidarc.pt'}",
            "--set", f"training.num_steps={STEPS}", "--set", "training.warmup=1", "--set", "training.save_every=1",
            "--set", "training.log_every=1", "--set", "self_forcing.context_mode=mixed",
            "--set", "self_forcing.self_generated_prob=0.5", "--set", "self_forcing.denoising_steps=2", *extra]


@pytest.fixture(scope="module")
def reference_run(workspace):
    output_dir = workspace / "reference"
    run(torchrun_command("launch/train.py", train_args(workspace, output_dir)), workspace / "reference.log",
        timeout=600)
    return output_dir


def test_mixed_run_uses_both_contexts_logs_stage2_metrics_and_exports(workspace, reference_run):
    steps = logged_steps(reference_run)
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert all(record["finite"] and record["loss"] > 0 for record in steps.values())
    # Per step: the fraction of micro-steps (2 per step, shared by both ranks) with self-generated context.
    shares = [steps[s]["context_self_generated"] for s in sorted(steps)]
    assert set(shares) <= {0.0, 0.5, 1.0} and 0 < sum(shares) < STEPS, shares
    # A held-out sample flips no coin: its loss is the mean over both contexts (self_generated_prob 0.5).
    rows = [json.loads(line) for line in (reference_run / "metrics.jsonl").read_text().splitlines()]
    assert [row["val_context_self_generated"] for row in rows if "val_loss" in row] == [0.5]

    tags = set(EventAccumulator(str(reference_run / "tensorboard")).Reload().Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "val/loss", "train/loss_by_position/01", "train/loss_by_position/02",
                "train/loss_in_mask", "train/loss_out_of_mask", "train/context_self_generated"):
        assert tag in tags, f"{tag} missing from TensorBoard events ({sorted(tags)})"

    exported = torch.load(reference_run / "export" / "vidarc.pt", map_location="cpu", weights_only=True)
    config = read_model_config(workspace / "ckpt", WanModel)
    WanModelCausal(**config).to(torch.bfloat16).load_state_dict(exported, strict=True)
    WanModel(**config).to(torch.bfloat16).load_state_dict(exported, strict=True)
    start_weights = torch.load(workspace / "vidar.pt", map_location="cpu", weights_only=True)
    assert not torch.equal(exported["head.head.weight"], start_weights["head.head.weight"])


def test_kill_and_resume_reproduces_the_run_exactly(workspace, reference_run):
    output_dir, log = workspace / "killed", workspace / "killed.log"
    process = start(torchrun_command("launch/train.py", train_args(workspace, output_dir)), log)
    wait_for_step(process, output_dir, 1, log, timeout=600)
    kill_launch(process)
    assert max(logged_steps(output_dir)) < STEPS
    run(torchrun_command("launch/train.py", train_args(workspace, output_dir, "--resume", "auto")), log, timeout=600)
    resumed, reference = logged_steps(output_dir), logged_steps(reference_run)
    assert {s: r["loss"] for s, r in resumed.items()} == {s: r["loss"] for s, r in reference.items()}
    assert {s: r["keys"] for s, r in resumed.items()} == {s: r["keys"] for s, r in reference.items()}
    exported = torch.load(output_dir / "export" / "vidarc.pt", weights_only=True)
    expected = torch.load(reference_run / "export" / "vidarc.pt", weights_only=True)
    assert all(torch.equal(exported[k], expected[k]) for k in expected)


def test_closed_loop_schedule_with_a_window_reset_trains(workspace):
    # 21 frames = 6 latent frames: prefill 1, predict 4 (17 video frames <= 17), then the window
    # would reach 21 > 17: clear, re-prefill the last 5 video frames (2 latents), predict the last.
    output_dir = workspace / "closed_loop"
    run(torchrun_command("launch/train.py", train_args(
        workspace, output_dir, "--set", "training.num_steps=1", "--set", "training.warmup=0",
        "--set", "self_forcing.closed_loop=true", "--set", "self_forcing.context_mode=ground_truth",
        "--set", "data.num_frames=21",
        "--set", "self_forcing.chunk_size=6", "--set", "self_forcing.kv_cache_length=8",
        "--set", "self_forcing.rollout_bound=17", "--set", "self_forcing.rollout_prefill_num=5")),
        workspace / "closed_loop.log", timeout=600)
    record = logged_steps(output_dir)[1]
    assert record["finite"] and record["context_self_generated"] == 0.0
    assert sorted(k for k in record if k.startswith("loss_by_position/")) == [f"loss_by_position/0{i}" for i in range(1, 6)]
    assert (output_dir / "export" / "vidarc.pt").is_file()
