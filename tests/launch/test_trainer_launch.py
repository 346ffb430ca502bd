"""launch/train.py: configuration errors stop it before anything is built; a single process without a
launcher trains on pre-encoded shards; non-finite losses are skipped, counted, and stop the run."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

import launch.train as train_cli
from launch.stage_flags import debug_overrides
from vidartrain.distributed.ds_config import load_profile
from helpers.trainer_launch import CPU_PROFILE, REPO_ROOT, TINY_CONFIG, logged_steps, single_process
from vidartrain.config import load_config
from vidartrain.data.shard_index import INDEX_FORMAT, read_data_info
from vidartrain.distributed.checkpointing import COMPLETE_MARKER, resume_candidates, tag_for_step
from vidartrain.distributed.ds_config import build_deepspeed_config
from vidartrain.errors import ConfigError, DataError
from vidartrain.trainers import base
from vidartrain.trainers.base import RunOptions, free_port, init_distributed
from vidartrain.trainers.vidar_trainer import VidarStage


@pytest.fixture
def nothing_may_be_built(monkeypatch):
    """Fail the test if a process group or a model is started."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a process group or model was built before the configuration was checked")
    monkeypatch.setattr("vidartrain.trainers.base.init_distributed", forbidden)
    monkeypatch.setattr("vidartrain.trainers.vidar_trainer.VidarStage.build_model", forbidden)


@pytest.mark.parametrize("extra, message", [
    (["--set", "training.lrr=1e-4"], "did you mean `training.lr`"),
    (["--set", "training.batch_size=6"], "batch mismatch"),
    (["--ds-config", "ds_configs/no_such_profile.json"], "no_such_profile.json does not exist"),
    (["--max_steps", "0"], "--max_steps 0"),
])
def test_bad_config_or_profile_fails_before_anything_is_built(extra, message, capsys, monkeypatch,
                                                              nothing_may_be_built):
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = ["--config", TINY_CONFIG, "--ds-config", CPU_PROFILE, *extra]
    assert train_cli.main(args) == 2
    assert message in capsys.readouterr().err


def test_sigusr1_prints_every_threads_stack_and_the_run_goes_on():
    program = ("import os, signal, threading, time; from launch.train import dump_stacks_on_sigusr1\n"
               "def waiting_for_a_batch(): time.sleep(30)\n"
               "threading.Thread(target=waiting_for_a_batch, daemon=True).start(); time.sleep(0.2)\n"
               "dump_stacks_on_sigusr1(); os.kill(os.getpid(), signal.SIGUSR1); print('still running')")
    done = subprocess.run([sys.executable, "-c", program], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.rstrip().endswith("still running"), done.stderr
    assert "Current thread" in done.stderr and "in waiting_for_a_batch" in done.stderr, done.stderr


def test_an_export_onto_the_runs_own_weights_is_refused_before_anything_is_built(
        tmp_path, capsys, monkeypatch, nothing_may_be_built):
    monkeypatch.chdir(REPO_ROOT)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "index.json").write_text(json.dumps({  # an empty but valid shard folder
        "format": INDEX_FORMAT, "complete": True, "mode": "raw", "settings": {}, "shards": [], "episodes": [],
        "skipped": []}))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    (tmp_path / "vidar.pt").write_bytes(b"the published weights")
    # its own --output_dir: the config's (demo_run/stage1) holds the demo's checkpoints once the demo has run
    args = ["--config", TINY_CONFIG, "--ds-config", CPU_PROFILE, "--output_dir", str(tmp_path / "run"),
            "--set", f"data.shards={tmp_path / 'shards'}", "--set", "data.val_shards=null",
            "--set", "validation.every=0", "--set", "training.val_every=0",
            "--set", f"model.ckpt_dir={tmp_path / 'ckpt'}",
            "--set", f"model.pt_dir={tmp_path / 'vidar.pt'}", "--set", f"output.save_path={tmp_path / 'vidar.pt'}",
            "--set", "training.batch_size=2"]
    assert train_cli.main(args) == 2
    assert f"`model.pt_dir` = {tmp_path / 'vidar.pt'}" in capsys.readouterr().err
    with pytest.raises(AssertionError, match="was built"):  # --overwrite: the run goes on to start
        train_cli.main([*args, "--overwrite"])
    assert (tmp_path / "vidar.pt").read_bytes() == b"the published weights"


def test_a_run_refused_after_its_process_group_started_destroys_it(tmp_path, capsys, monkeypatch):
    # Left to the destructors at exit, gloo's threads could abort the process ("terminate called without an
    # active exception"), and a refusal's exit status 2 became a crash.
    monkeypatch.chdir(REPO_ROOT)
    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(name, value)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "index.json").write_text(json.dumps({
        "format": INDEX_FORMAT, "complete": True, "mode": "raw", "settings": {}, "shards": [], "episodes": [],
        "skipped": []}))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")

    class RefusedOnceStarted:
        def __init__(self, *args, **kwargs):
            init_distributed()
            raise ConfigError("refused once the process group has started")

    monkeypatch.setattr(train_cli, "Trainer", RefusedOnceStarted)
    args = ["--config", TINY_CONFIG, "--ds-config", CPU_PROFILE, "--output_dir", str(tmp_path / "run"),
            "--set", f"data.shards={tmp_path / 'shards'}", "--set", "data.val_shards=null",
            "--set", "validation.every=0", "--set", "training.val_every=0", "--set", "training.batch_size=2",
            "--set", f"model.ckpt_dir={tmp_path / 'ckpt'}"]
    assert train_cli.main(args) == 2
    assert "refused once the process group has started" in capsys.readouterr().err
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("manager", [
    {"SLURM_STEP_NUM_TASKS": "64", "SLURM_PROCID": "63"},
    {"OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_RANK": "3"},
    {"PMI_SIZE": "8", "PMI_RANK": "7"},
])
def test_a_task_of_srun_or_mpirun_without_a_torch_launcher_is_refused(manager, refused, monkeypatch,
                                                                      nothing_may_be_built):
    # `srun python launch/train.py` on 8 nodes x 8 tasks: no RANK, so each of the 64 tasks was a group of one
    # and trained alone, all of them into the same output_dir; a global batch that one rank makes (here 2 = 1 x 2
    # x 1; --debug's follows the ranks launched) left the batch check nothing to catch
    monkeypatch.chdir(REPO_ROOT)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in manager.items():
        monkeypatch.setenv(name, value)
    refused(r"task \d+ of \d+ that (srun|mpirun).* no launcher set RANK and WORLD_SIZE: each task would train alone",
            train_cli.main, ["--config", TINY_CONFIG, "--ds-config", CPU_PROFILE, "--set", "training.batch_size=2"])
    monkeypatch.setenv("RANK", "3")  # under torchrun (one per node, as launch/slurm_multi_node.sbatch runs it)
    monkeypatch.setenv("WORLD_SIZE", "64")
    assert base.world_size_of_launch() == 64


def as_rank_of(monkeypatch, rank: int, world_size: int) -> None:
    """Build a Trainer in this process as rank `rank` of `world_size`, with no process group: the collectives
    of its start give rank 0's answers (the output dir is shared, rank 0's checkpoints are this rank's)."""
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setattr(base, "init_distributed", lambda: None)
    monkeypatch.setattr(base.dist, "get_rank", lambda group=None: rank)
    monkeypatch.setattr(base.dist, "get_world_size", lambda group=None: world_size)
    monkeypatch.setattr(base.dist, "broadcast_object_list", lambda objects, src: None)
    monkeypatch.setattr(base.Trainer, "check_output_dir_shared", lambda self: None)


def stage_1_run(pre_encoded, tmp_path, world_size: int, resume: str | None = None) -> tuple:
    """Trainer arguments of the tiny stage 1 on the 4 pre-encoded samples, over `world_size` ranks (cpu_debug's
    micro-batch 1 x accumulation 2), into tmp_path/run."""
    config = load_config(TINY_CONFIG, [
        f"model.ckpt_dir={pre_encoded / 'ckpt'}", f"data.shards={pre_encoded / 'shards'}", "data.val_shards=null",
        "training.val_every=0", "validation.every=0", f"training.batch_size={2 * world_size}",
        f"output.save_path={tmp_path / 'vidar.pt'}"])
    ds_config, _ = build_deepspeed_config(config, load_profile(CPU_PROFILE), world_size)
    stage = VidarStage(config, read_data_info(config.data.shards))
    return config, stage, RunOptions(ds_config=ds_config, output_dir=str(tmp_path / "run"), resume=resume)


def test_too_few_samples_for_64_ranks_are_refused_before_any_model_is_built(pre_encoded, tmp_path, monkeypatch,
                                                                          nothing_may_be_built):
    # Rank 63 of 64 (no process group: its rank and world size are faked) on 4 samples. Found at the first
    # step, the shortage would cost building the model and the engine on 64 GPUs first.
    as_rank_of(monkeypatch, 63, 64)
    with pytest.raises(DataError, match="4 samples cannot fill one batch of 1 on each of 64 ranks"):
        base.Trainer(*stage_1_run(pre_encoded, tmp_path, 64))


def test_every_rank_resumes_the_checkpoint_rank_0_sees(pre_encoded, tmp_path, monkeypatch, nothing_may_be_built):
    # Rank 3 of 4 lists the shared checkpoints folder with a lag (step 20 is not in its listing yet): it resumed
    # step 10 while rank 0 resumed step 20, each loading its ZeRO partition of another step, silently
    root = tmp_path / "run" / "checkpoints"
    for step in (10, 20):
        (root / tag_for_step(step)).mkdir(parents=True)
        (root / tag_for_step(step) / COMPLETE_MARKER).write_text("{}")
    rank_zeros_view = resume_candidates("auto", root)
    shutil.rmtree(root / tag_for_step(20))  # rank 3's view
    as_rank_of(monkeypatch, 3, 4)
    monkeypatch.setattr(base.dist, "broadcast_object_list",
                        lambda objects, src: objects.__setitem__(0, rank_zeros_view))
    monkeypatch.setattr(base.Trainer, "checkpoint_problems", lambda self, path: [])

    class Resumes(Exception):
        pass

    def check_resumable(self, ref):
        raise Resumes(ref.tag)

    monkeypatch.setattr(base.Trainer, "check_resumable", check_resumable)
    with pytest.raises(Resumes, match=tag_for_step(20)):
        base.Trainer(*stage_1_run(pre_encoded, tmp_path, 4, resume="auto"))


def test_one_gpu_profile_trains_with_the_optimizer_offloaded(pre_encoded, tmp_path):
    # ds_configs/zero3_1xgpu.json: ZeRO-3 with torch's AdamW stepping the CPU-offloaded partitions
    result = single_process(pre_encoded, tmp_path, "--ds-config", "ds_configs/zero3_1xgpu.json",
                            "--set", "training.batch_size=2", "--set", "training.gradient_accumulation=2",
                            "--set", "training.num_steps=2", "--set", "training.warmup=1")
    assert result.returncode == 0, result.stderr[-4000:]
    steps = logged_steps(tmp_path)
    assert sorted(steps) == [1, 2] and all(r["finite"] for r in steps.values())
    assert steps[1]["loss"] != steps[2]["loss"]


def test_single_process_trains_on_pre_encoded_shards(pre_encoded, tmp_path):
    # a mixture of two shard directories (the second a copy), weights 3:1, counted per source
    shutil.copytree(pre_encoded / "shards", tmp_path / "copy")
    mixture = f"data.shards=[{{path: {pre_encoded / 'shards'}, weight: 3}}, {{path: {tmp_path / 'copy'}, weight: 1}}]"
    result = single_process(pre_encoded, tmp_path, "--set", "training.num_steps=3", "--set", "training.warmup=1",
                            "--set", mixture)
    assert result.returncode == 0, result.stderr[-4000:]
    steps = logged_steps(tmp_path)
    assert sorted(steps) == [1, 2, 3] and all(r["finite"] for r in steps.values())
    assert (tmp_path / "vidar.pt").is_file() and (tmp_path / "vidar.safetensors").is_file()
    counts = steps[3]["samples_by_source"]  # 3 steps x 4 samples, 8 per epoch: 6 + 2, then 3 + 1
    assert counts == {str(pre_encoded / "shards"): 9, str(tmp_path / "copy"): 3}
    assert "samples per source so far" in result.stderr
    assert "is deprecated" not in result.stderr  # torch's notes on the collectives DeepSpeed calls, once a step


def test_non_finite_losses_are_skipped_counted_and_stop_the_run(pre_encoded, tmp_path):
    # lr 1e30: the first update throws the bf16 weights to ~1e30, every later loss overflows
    result = single_process(pre_encoded, tmp_path, "--set", "training.num_steps=10", "--set", "training.warmup=0",
                            "--set", "training.lr=1e30", "--set", "training.max_nonfinite_steps=2")
    assert result.returncode != 0
    assert "2 consecutive steps had a non-finite loss" in result.stderr
    steps = logged_steps(tmp_path)
    assert steps[1]["finite"] and not steps[2]["finite"] and not steps[3]["finite"]
    assert max(steps) == 3 and steps[3]["nonfinite_total"] == 2
    # the final checkpoint holds the weights of the last finite step
    assert (tmp_path / "checkpoints" / tag_for_step(3) / COMPLETE_MARKER).is_file()
    assert not (tmp_path / "vidar.pt").exists()


def test_reference_recipe_flags_map_onto_config_overrides(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setenv("WORLD_SIZE", "2")
    overrides = debug_overrides(load_profile(CPU_PROFILE))
    # batch 128 of the real config shrinks to what cpu_debug gives on 2 ranks: 1 x 2 x 2
    assert "training.batch_size=2" in overrides and "training.gradient_accumulation=2" in overrides
    config = load_config("configs/vidar_finetune.yaml", overrides)
    assert config.global_batch_size == 4 and config.training.log_every == 1 and config.training.val_every == 0
    # no validation at all: a config that validates its EMA still loads
    config = load_config("configs/vidar_finetune.yaml", ["training.ema_decay=0.999", "training.validate_ema=true",
                                                         "training.val_every=10", "data.val_shards=/data/val",
                                                         "validation.every=10", *overrides])
    assert not config.training.validate_ema and config.training.val_every == 0 and config.validation.every == 0


def test_dry_run_prints_the_plan_runs_one_step_and_reports_measured_memory(pre_encoded, tmp_path):
    result = single_process(pre_encoded, tmp_path, "--dry-run", "--gpu", "h100")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "verdict: fits" in result.stdout and "memory per GPU (GiB)" in result.stdout
    assert "dry run: one step done" in result.stdout and "planned" in result.stdout
    assert sorted(logged_steps(tmp_path / "dry_run")) == [1]
    assert not (tmp_path / "vidar.pt").exists()  # the real export path is left alone
