"""Sequence parallelism through a real launcher (torchrun, gloo, ZeRO-3, float32): 2 ranks as one SP group
train exactly as 1 rank does, and 4 ranks as SP 2 x DP 2 resume exactly after a SIGKILL.

Float32 training (distributed.mixed_precision=fp32) so that differences are summation order only. Step 1
starts from the same weights: loss and gradient norm agree to FIRST_STEP_RTOL. Adam then amplifies the
last-digit differences of near-zero gradient elements (its update is about lr whatever the gradient's
size), so later steps agree to RTOL and the exported weights (bf16 files) to lr x steps plus a bf16
rounding. Per-parameter gradients are compared exactly in tests/distributed/test_sequence_parallel.py."""
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from data_tools.tiny_checkpoint import write_tiny_checkpoint
from helpers.trainer_launch import (BIN, kill_launch, logged_steps, one_rank_command, run, start, torchrun_command,
                                    wait_for_step, write_shards)
from vidartrain.distributed.checkpointing import tag_for_step

STEPS = 3
FIRST_STEP_RTOL = 1e-5  # seen: 2e-6 (stage 1)
RTOL = 2e-4  # seen: 5e-5 (stage 1, step 3)
LR = 1e-3


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("sequence_parallel")
    write_tiny_checkpoint(root / "ckpt")  # 2 heads: SP 2
    write_shards(root, 8, frames=16, val_fraction=0.0)
    return root


def train_args(workspace, output_dir, config, sp, batch_size, *extra):
    """float32, no validation, a global batch of 2 samples per micro-step x accumulation 2."""
    return ["--config", config, "--ds-config", "ds_configs/cpu_debug.json", "--output_dir", str(output_dir),
            "--set", f"model.ckpt_dir={workspace / 'ckpt'}", "--set", f"data.shards={workspace / 'shards'}",
            "--set", "data.val_shards=null", "--set", "validation.every=0", "--set", "training.val_every=0",
            "--set", f"output.save_path={output_dir / 'export.pt'}", "--set", "distributed.mixed_precision=fp32",
            "--set", f"distributed.sequence_parallel_size={sp}", "--set", f"training.batch_size={batch_size}",
            "--set", "training.gradient_accumulation=2", "--set", f"training.num_steps={STEPS}",
            "--set", "training.log_every=1", "--set", "training.warmup=1",
            "--set", f"training.lr={LR}", *extra]


STAGE_2 = ["--set", "model.pt_dir=null", "--set", "model.idm_path=null", "--set", "loss.embodiment_aware=false"]
RUNS = {  # name: (config, overrides)
    "stage_1": ("configs/debug/tiny_vidar.yaml", []),
    "stage_2_teacher_forcing": ("configs/debug/tiny_vidarc.yaml",
                                [*STAGE_2, "--set", "self_forcing.context_mode=ground_truth"]),
    "stage_2_closed_loop": ("configs/debug/tiny_vidarc.yaml", [*STAGE_2, "--set", "self_forcing.closed_loop=true"]),
}


def export_weights(output_dir):
    return load_file(next(output_dir.glob("export*.safetensors")))


@pytest.mark.parametrize("name", list(RUNS))
def test_two_sequence_parallel_ranks_train_as_one_rank(workspace, name):
    config, overrides = RUNS[name]
    single, parallel = workspace / f"{name}_sp1", workspace / f"{name}_sp2"
    run(one_rank_command("launch/train.py", train_args(workspace, single, config, 1, 1, *overrides)),
        workspace / f"{name}_sp1.log")
    run(torchrun_command("launch/train.py", train_args(workspace, parallel, config, 2, 1, *overrides), num_ranks=2),
        workspace / f"{name}_sp2.log")
    reference, steps = logged_steps(single), logged_steps(parallel)
    assert sorted(steps) == sorted(reference) == list(range(1, STEPS + 1))
    for step, record in reference.items():
        rtol = FIRST_STEP_RTOL if step == 1 else RTOL
        assert steps[step]["loss"] == pytest.approx(record["loss"], rel=rtol), step
        assert steps[step]["grad_norm"] == pytest.approx(record["grad_norm"], rel=rtol), step
        assert steps[step]["keys"] == record["keys"], step
    expected, weights = export_weights(single), export_weights(parallel)
    assert weights.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(weights[key].float(), value.float(), rtol=1.6e-2, atol=LR * STEPS, msg=key)


# Four CPU ranks need four cores: gloo's transport thread polls while it waits for a peer, and on two cores
# two waiting ranks took both and starved the other two (a run hung for good, pytest's timeout too).
FOUR_RANKS = pytest.mark.skipif((os.cpu_count() or 1) < 4, reason=f"4 CPU ranks on {os.cpu_count()} cores "
                                "livelock (gloo's transport polls while waiting); needs 4 cores")


@pytest.fixture(scope="module")
def sp2_dp2_run(workspace):
    """SP 2 x DP 2 on 4 ranks, checkpoints every 2 steps, SIGKILLed after step 3 and resumed to step 4.
    Returns (output dir, the steps the killed run logged, the training arguments)."""
    output_dir, log = workspace / "sp2_dp2", workspace / "sp2_dp2.log"
    args = train_args(workspace, output_dir, "configs/debug/tiny_vidar.yaml", 2, 2, "--set", "training.num_steps=4",
                      "--set", "training.save_every=2")
    process = start(torchrun_command("launch/train.py", args, num_ranks=4), log)
    wait_for_step(process, output_dir, 3, log)
    kill_launch(process)
    killed = logged_steps(output_dir)
    run(torchrun_command("launch/train.py", [*args, "--resume", "auto"], num_ranks=4), log)
    return output_dir, killed


@FOUR_RANKS
def test_four_ranks_as_two_sequence_parallel_groups_resume_exactly_after_a_kill(sp2_dp2_run):
    """The steps run again after the resume from step 2 log the losses, gradient norms and samples the
    killed run logged for them, bit for bit."""
    output_dir, killed = sp2_dp2_run
    resumed = logged_steps(output_dir)
    assert sorted(resumed) == [1, 2, 3, 4]
    assert len(resumed[1]["keys"]) == 4  # 2 data-parallel groups x micro-batch 1 x accumulation 2
    assert set(killed) & {3, 4}
    for step in set(killed) & {3, 4}:
        for name in ("loss", "grad_norm", "keys"):
            assert resumed[step][name] == killed[step][name], (step, name)
    assert any(output_dir.glob("export*.safetensors"))


@FOUR_RANKS
def test_universal_checkpoint_of_sp2_dp2_resumes_on_one_sequence_parallel_group(workspace, sp2_dp2_run):
    """The step-2 checkpoint of 4 ranks, made universal, resumes on 2 ranks (SP 2, one data-parallel group,
    accumulation 4 for the same global batch): the same samples and schedule at step 3; other noise draws
    (the noise follows the data-parallel index), so a loss of the same size."""
    output_dir, _ = sp2_dp2_run
    source = output_dir / "checkpoints" / tag_for_step(2)
    universal = source.with_name(f"{source.name}_universal")  # beside its source, whose record the resume checks
    subprocess.run([str(BIN / "python"), "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                    str(source), "--output_folder", str(universal)], check=True, capture_output=True)
    resumed_dir = workspace / "sp2_dp1"
    args = train_args(workspace, resumed_dir, "configs/debug/tiny_vidar.yaml", 2, 1, "--set", "training.num_steps=4",
                      "--set", "training.gradient_accumulation=4", "--resume", str(universal), "--max_steps", "3")
    run(torchrun_command("launch/train.py", args, num_ranks=2), workspace / "sp2_dp1.log")
    resumed, reference = logged_steps(resumed_dir), logged_steps(output_dir)
    assert sorted(resumed) == [3]
    assert sorted(resumed[3]["keys"]) == sorted(reference[3]["keys"])
    assert resumed[3]["lr"] == reference[3]["lr"]
    assert resumed[3]["loss"] == pytest.approx(reference[3]["loss"], rel=0.2)
