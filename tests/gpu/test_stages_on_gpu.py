"""The three tiny stages end to end on one GPU through `python launch/train.py` (one process, NCCL):
stage 1, the IDM (BatchNorm statistics must follow its ZeRO-3 parameters onto the GPU), stage 2 in
every context mode with that IDM's export for Eq. 7, and a SIGKILLed run resumed to the same losses."""
import subprocess
import sys

import pytest
import torch

from data_tools.tiny_checkpoint import write_tiny_checkpoint
from helpers.trainer_launch import (REPO_ROOT, kill_launch, launcher_env, logged_steps, start, tail, wait, wait_for_step,
                                    write_shards)

PROFILE = "ds_configs/cpu_debug.json"  # ZeRO-3, bf16; one process: micro 1 x accumulation 2


def train_command(config: str, output_dir, data, *overrides: str) -> list[str]:
    return [sys.executable, "launch/train.py", "--config", config, "--ds-config", PROFILE,
            "--output_dir", str(output_dir), "--set", f"model.ckpt_dir={data / 'ckpt'}",
            "--set", f"data.shards={data / 'shards'}", "--set", f"data.val_shards={data / 'shards' / 'val'}",
            "--set", f"output.save_path={output_dir / 'export.pt'}", "--set", "training.batch_size=1",
            "--set", "training.gradient_accumulation=2", "--set", "training.log_every=1",
            "--set", "training.warmup=1", *overrides]


def train(command: list[str], output_dir) -> dict[int, dict]:
    result = subprocess.run(command, cwd=REPO_ROOT, env=launcher_env(accelerator=None), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    steps = logged_steps(output_dir)
    assert steps and all(record["finite"] for record in steps.values())
    return steps


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_data")
    write_shards(root, episodes=6, frames=24, val_fraction=0.34)
    write_tiny_checkpoint(root / "ckpt")
    return root


@pytest.fixture(scope="module")
def stage1(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    steps = train(train_command("configs/debug/tiny_vidar.yaml", out, data, "--set", "training.num_steps=4"), out)
    assert (out / "export.pt").is_file()
    return out, steps


@pytest.fixture(scope="module")
def idm(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("idm")
    train(train_command("configs/debug/tiny_idm.yaml", out, data, "--set", "training.num_steps=4"), out)
    exported = torch.load(out / "export.pt", map_location="cpu", weights_only=True)
    assert all(t.dtype == torch.float32 for t in exported["model_state_dict"].values() if t.is_floating_point())
    return out / "export.pt"


def test_stage_1_trains_validates_and_exports_on_the_gpu(stage1):
    out, steps = stage1
    assert sorted(steps) == [1, 2, 3, 4]
    assert steps[1]["loss"] != steps[4]["loss"]


def test_idm_trains_on_the_gpu_with_its_batchnorm_statistics_there(idm):
    assert idm.is_file()


@pytest.mark.parametrize("mode", ["ground_truth", "self_generated", "mixed", "closed_loop"])
def test_stage_2_trains_in_every_context_mode_with_the_idm_export(mode, data, stage1, idm, tmp_path):
    context = ["--set", "self_forcing.closed_loop=true"] if mode == "closed_loop" else [
        "--set", f"self_forcing.context_mode={mode}"]
    command = train_command("configs/debug/tiny_vidarc.yaml", tmp_path, data, "--set", "training.num_steps=3",
                            "--set", f"model.pt_dir={stage1[0] / 'export.pt'}", "--set", f"model.idm_path={idm}",
                            *context)
    assert sorted(train(command, tmp_path)) == [1, 2, 3]
    assert (tmp_path / "export.pt").is_file()


def test_sigkilled_run_resumes_to_the_uninterrupted_losses(data, stage1, tmp_path):
    _, reference = stage1
    command = train_command("configs/debug/tiny_vidar.yaml", tmp_path, data, "--set", "training.num_steps=4",
                            "--set", "training.save_every=1")
    log = tmp_path / "log.txt"
    process = start(command, log, accelerator=None)
    wait_for_step(process, tmp_path, 2, log)
    kill_launch(process)
    assert wait(start([*command, "--resume", "auto"], log, accelerator=None), log) == 0, tail(log)
    resumed = logged_steps(tmp_path)
    assert sorted(resumed) == [1, 2, 3, 4]
    assert [resumed[s]["loss"] for s in range(1, 5)] == [reference[s]["loss"] for s in range(1, 5)]
