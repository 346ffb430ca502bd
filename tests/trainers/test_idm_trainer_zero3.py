"""IDM training end to end on CPU: the deepspeed launcher (the killed and resumed run: torchrun), 2 gloo
ranks, ZeRO-3 (float32 weights), (frame, action) pairs of shards made from synthetic mp4 episodes;
TensorBoard metrics, SIGKILL + resume exactness (BatchNorm statistics included) and the upstream
idm.pt export."""

import subprocess

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers.trainer_launch import (BIN, REPO_ROOT, deepspeed_command, kill_launch, launcher_env, logged_steps, run,
                                    start, torchrun_command, wait_for_step, write_shards)
from vidartrain.distributed.export import main as export_main
from vidartrain.distributed.export import read_checkpoint_weights, resolve_checkpoint
from vidartrain.models.idm import load_idm

STEPS = 2


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("idm")
    write_shards(root, 6, frames=12, val_fraction=0.0)
    return root


def train_args(workspace, output_dir, *extra):
    # 64x64 frames: the tiny IDM sees them at their own size, cheap on CPU. (Smaller
    # frames leave 1x1 maps at the bottom of the U-Net, which BatchNorm cannot train on in micro-batches of 1.)
    return ["--config", "configs/debug/tiny_idm.yaml", "--ds-config", "ds_configs/cpu_debug.json",
            "--output_dir", str(output_dir), "--set", f"data.shards={workspace / 'shards'}",
            "--set", "data.val_shards=null", "--set", "training.val_every=0",
            "--set", f"output.save_path={output_dir / 'export' / 'idm.pt'}",
            "--set", f"training.num_steps={STEPS}", "--set", "training.warmup=1", "--set", "training.save_every=1",
            "--set", "training.log_every=1", *extra]


@pytest.fixture(scope="module")
def reference_run(workspace):
    output_dir = workspace / "reference"
    run(deepspeed_command("launch/train.py", train_args(workspace, output_dir)), workspace / "reference.log",
        timeout=600)
    return output_dir


def test_a_dry_run_of_the_idm_runs_one_step_without_a_plan(workspace, tmp_path):
    """--dry-run is accepted by every stage: the planner models the DiT, so the IDM gets its one real step
    and the measured memory only (it used to fail on the planner)."""
    args = train_args(workspace, tmp_path, "--dry-run", "--set", "training.batch_size=1",
                      "--set", "training.gradient_accumulation=2")  # one process: micro 1 x 2 steps
    result = subprocess.run([str(BIN / "python"), "launch/train_idm.py", *args], cwd=REPO_ROOT, env=launcher_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "dry run: no plan (the planner plans the DiT stages" in result.stdout
    assert "dry run: one step done" in result.stdout and "planned" not in result.stdout
    assert sorted(logged_steps(tmp_path / "dry_run")) == [1]


def test_idm_run_logs_accuracy_and_exports_an_upstream_idm_pt(reference_run):
    steps = logged_steps(reference_run)
    assert sorted(steps) == list(range(1, STEPS + 1))
    for record in steps.values():
        assert record["finite"] and len(record["keys"]) == 4 and record["tokens"] == 4  # frames per step
        assert 0.0 <= record["action_accuracy"] <= 1.0 and 0.0 < record["mask_mean"] < 1.0
        assert record["loss"] == pytest.approx(record["action_loss"] + record["mask_loss"], rel=1e-4)
    tags = set(EventAccumulator(str(reference_run / "tensorboard")).Reload().Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/action_loss", "train/mask_loss", "train/action_accuracy"):
        assert tag in tags, f"{tag} missing from TensorBoard events ({sorted(tags)})"

    payload = torch.load(reference_run / "export" / "idm.pt", map_location="cpu", weights_only=True)
    assert sorted(payload) == ["model_state_dict", "step"] and payload["step"] == STEPS
    state = payload["model_state_dict"]
    assert len(state) == 240 and all(v.dtype in (torch.float32, torch.int64) for v in state.values())
    # BatchNorm statistics moved with training (train mode), and every key loads strictly.
    assert int(state["model.mask_model.in_conv.1.num_batches_tracked"]) == STEPS * 2  # 2 micro-steps per step
    load_idm(reference_run / "export" / "idm.pt")
    # float32 export: exactly the fp32 weights of the final DeepSpeed checkpoint, not bf16-rounded
    master = read_checkpoint_weights(*resolve_checkpoint(reference_run / "checkpoints"), torch.float32)
    weight = "model.mask_model.in_conv.0.weight"
    assert torch.equal(state[weight], master[weight])
    assert not torch.equal(state[weight], state[weight].bfloat16().float())


def test_the_log_reads_once_per_run(reference_run, workspace):
    log = (workspace / "reference.log").read_text(errors="replace")
    # at most the deepspeed launcher's two processes warn (before train.py runs); the ranks do not
    assert log.count("Setting accelerator to CPU") <= 2
    assert "is deprecated" not in log  # torch's notes on the collectives DeepSpeed calls
    assert "disagrees with DeepSpeed profile" not in log  # our IDM config on the bf16 CPU profile
    for phase in ("starting the process group", "building the DeepSpeed engine", "the first step is slower",
                  "saving checkpoint"):
        assert phase in log


def test_vidar_export_of_the_idm_checkpoint_writes_the_trainers_idm_pt(reference_run, tmp_path):
    assert export_main([str(reference_run / "checkpoints"), "--out", str(tmp_path / "idm.pt")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idm.pt"]
    assert (tmp_path / "idm.pt").read_bytes() == (reference_run / "export" / "idm.pt").read_bytes()


def test_kill_and_resume_reproduces_the_idm_run_exactly(workspace, reference_run):
    output_dir, log = workspace / "killed", workspace / "killed.log"
    process = start(torchrun_command("launch/train.py", train_args(workspace, output_dir)), log)
    wait_for_step(process, output_dir, 1, log, timeout=600)
    kill_launch(process)
    run(torchrun_command("launch/train.py", train_args(workspace, output_dir, "--resume", "auto")), log, timeout=600)
    resumed, reference = logged_steps(output_dir), logged_steps(reference_run)
    assert {s: r["loss"] for s, r in resumed.items()} == {s: r["loss"] for s, r in reference.items()}
    exported = torch.load(output_dir / "export" / "idm.pt", weights_only=True)["model_state_dict"]
    expected = torch.load(reference_run / "export" / "idm.pt", weights_only=True)["model_state_dict"]
    assert all(torch.equal(exported[k], expected[k]) for k in expected)
