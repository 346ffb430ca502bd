"""Faults a user or a cluster meets in training, each injected as it happens: a learning rate changed
on resume, checkpoint files overwritten, truncated or deleted, a checkpoint pickle that runs code,
impossible config and profile values, weights gone NaN, a full disk, a resume on another world size,
preemption of the launcher script, steps logged twice after a resume.

Runs are single processes (`python launch/train.py`, pre-encoded shards) where distribution does not
matter; one 2-rank run through launch/single_node.sh is preempted and its checkpoint is the one
resumed on another world size."""
import json
import os
import shutil
import signal
import subprocess
from types import SimpleNamespace

import psutil
import pytest
import torch

from launch.forward_sigterm import ranks_under
import launch.train as train_cli
from helpers.trainer_launch import (CPU_PROFILE, TINY_CONFIG, cpu_train_args, single_process, single_process_flags,
                                    start, torchrun_command)
from helpers.trainer_launch import BIN, REPO_ROOT, free_port, launcher_env, logged_steps, tail, wait, wait_for_step
from vidartrain.config import ConfigError, load_config
from vidartrain.distributed.checkpointing import (COMPLETE_MARKER, checkpoint_files, complete_checkpoints,
                                                  file_digests, latest_complete, mark_complete, resolve_resume,
                                                  tag_for_step)
from vidartrain.distributed.ds_config import load_profile
from vidartrain.distributed.export import dit_files
from vidartrain.distributed.export import main as export_main
from vidartrain.errors import CheckpointError
from vidartrain.files import check_outputs

# checkpoints at steps 2 and 4 (and wherever --max_steps stops), all kept
SHORT_RUN = ("--set", "training.num_steps=4", "--set", "training.save_every=2", "--set", "training.warmup=1",
             "--set", "training.keep_last=3")
FAULTY_TRAINER = str(REPO_ROOT / "tests" / "helpers" / "faulty_trainer_script.py")


def train(root, output_dir, *flags, script=("launch/train.py",)):
    return single_process(root, output_dir, *SHORT_RUN, *flags, script=script)


def succeeded(result):
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def metrics_steps(output_dir):
    """The step of every row of metrics.jsonl, in file order."""
    return [json.loads(line)["step"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(pre_encoded, tmp_path_factory):
    """first: 4 steps at lr 1e-3, a checkpoint after each (2, 3 and 4 kept). changed_lr: a copy of it that lost
    checkpoints 3 and 4 (steps 3 and 4 are logged, then redone), resumed from step 2 to 4 with
    --set training.lr=1e-5."""
    root = tmp_path_factory.mktemp("runs")
    first, changed = root / "first", root / "changed_lr"
    every_step = ("--set", "training.save_every=1")
    succeeded(train(pre_encoded, first, *every_step))
    shutil.copytree(first, changed)
    for step in (3, 4):
        shutil.rmtree(changed / "checkpoints" / tag_for_step(step))
    changed_log = succeeded(train(pre_encoded, changed, *every_step, "--resume", "auto",
                                  "--set", "training.lr=1e-5")).stderr
    return SimpleNamespace(first=first, changed=changed, changed_log=changed_log)


# ---------------------------------------------------------------------------------------------------
# Resume: changed settings, duplicate rows


def test_resume_applies_a_changed_learning_rate_and_says_so(runs):
    assert "training.lr: 0.001 -> 1e-05" in runs.changed_log
    first, changed = logged_steps(runs.first), logged_steps(runs.changed)
    assert [first[step]["lr"] for step in (3, 4)] == [1e-3, 1e-3]
    assert [changed[step]["lr"] for step in (3, 4)] == [1e-5, 1e-5]
    # the same weights at step 3; its update used the new rate, so step 4 starts from other weights
    assert changed[3]["loss"] == first[3]["loss"]
    assert changed[4]["loss"] != first[4]["loss"]


def test_steps_redone_after_a_resume_are_logged_once(runs):
    assert metrics_steps(runs.changed) == [1, 2, 3, 4]


def test_resume_refuses_settings_that_cannot_change(pre_encoded, runs, tmp_path):
    shutil.copytree(runs.first, tmp_path, dirs_exist_ok=True)
    result = train(pre_encoded, tmp_path, "--resume", "auto", "--set", "training.seed=7", "--set", "data.height=128")
    assert result.returncode == 2, result.stderr[-4000:]
    assert "cannot change on a resume" in result.stderr
    assert "training.seed: 42 -> 7" in result.stderr and "data.height: 64 -> 128" in result.stderr
    assert metrics_steps(tmp_path) == metrics_steps(runs.first)  # nothing trained, nothing logged
    # what the DeepSpeed profile fixes, refused before the engine is built (DeepSpeed's loader failed on files)
    profile = load_profile(REPO_ROOT / CPU_PROFILE)
    profile["bf16"]["enabled"] = False
    profile["zero_optimization"]["stage"] = 2
    changed_profile = tmp_path / "changed_profile.json"
    changed_profile.write_text(json.dumps(profile))
    result = train(pre_encoded, tmp_path, "--resume", "auto", "--ds-config", str(changed_profile))
    assert result.returncode == 2, result.stderr[-4000:]
    assert ("DeepSpeed profile zero_stage: 3 -> 2" in result.stderr
            and "DeepSpeed profile precision: bf16 -> fp32" in result.stderr)


def test_a_run_that_does_not_resume_does_not_start_over_an_earlier_run(pre_encoded, runs, tmp_path, monkeypatch,
                                                                      refused):
    shutil.copytree(runs.first, tmp_path, dirs_exist_ok=True)
    before = {tag: (tmp_path / "checkpoints" / tag / COMPLETE_MARKER).read_text() for tag in complete_checkpoints(
        tmp_path / "checkpoints")}
    # refused before the process group exists, so launch/train.py runs in this process
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setattr("vidartrain.trainers.base.init_distributed",
                        lambda: pytest.fail("a process group was started over the earlier run"))
    refused(r"holds 3 checkpoints of an earlier run \(newest step_00000004\): continue it with --resume auto",
            train_cli.main, single_process_flags(pre_encoded, tmp_path, *SHORT_RUN, "--set", "training.lr=5e-4"))
    assert {tag: (tmp_path / "checkpoints" / tag / COMPLETE_MARKER).read_text()
            for tag in complete_checkpoints(tmp_path / "checkpoints")} == before
    assert metrics_steps(tmp_path) == metrics_steps(runs.first)


def test_resuming_an_earlier_checkpoint_keeps_the_later_ones_aside(pre_encoded, runs, tmp_path):
    """Rolled back to step 2 of a run saved at 2, 3 and 4: the resumed run's own step 3 is the latest
    checkpoint (before, keep_last pruned it in favour of the old step 4, and --resume auto went back to
    that abandoned run), and the old 3 and 4 are kept in superseded/."""
    shutil.copytree(runs.first, tmp_path, dirs_exist_ok=True)
    root = tmp_path / "checkpoints"
    old = {step: (root / tag_for_step(step) / COMPLETE_MARKER).read_text() for step in (3, 4)}
    result = succeeded(train(pre_encoded, tmp_path, "--resume", str(root / tag_for_step(2)), "--max_steps", "3",
                             "--set", "training.keep_last=1"))
    assert "moved to" in result.stderr
    assert complete_checkpoints(root) == [tag_for_step(3)] and latest_complete(root) == tag_for_step(3)
    assert (root / tag_for_step(3) / COMPLETE_MARKER).read_text() != old[3]
    [aside] = (root / "superseded").iterdir()
    assert {step: (aside / tag_for_step(step) / COMPLETE_MARKER).read_text() for step in (3, 4)} == old
    assert metrics_steps(tmp_path) == [1, 2, 3]


# ---------------------------------------------------------------------------------------------------
# Checkpoint integrity and safe loading


def overwrite_4kb(path):
    with open(path, "r+b") as stream:
        stream.seek(path.stat().st_size // 2)
        stream.write(os.urandom(4096))


def test_damaged_checkpoints_are_refused_by_path_and_skipped_by_auto(runs, tmp_path, caplog):
    shutil.copytree(runs.first / "checkpoints", tmp_path, dirs_exist_ok=True)
    optimizer_file = next((tmp_path / tag_for_step(4)).glob("*_optim_states.pt"))
    model_file = next((tmp_path / tag_for_step(3)).glob("*_model_states.pt"))
    overwrite_4kb(optimizer_file)
    os.truncate(model_file, model_file.stat().st_size // 2)
    for step, damaged, why in ((4, optimizer_file, "sha256 differs"), (3, model_file, "truncated")):
        with pytest.raises(CheckpointError, match=why) as err:
            resolve_resume(str(tmp_path / tag_for_step(step)), tmp_path)
        assert str(damaged) in str(err.value)
    # --resume auto warns about both and takes step 2, the newest intact checkpoint
    assert resolve_resume("auto", tmp_path).tag == tag_for_step(2)
    warnings = [record.getMessage() for record in caplog.records if "skipping damaged checkpoint" in record.getMessage()]
    assert len(warnings) == 2
    assert str(optimizer_file) in warnings[0] and str(model_file) in warnings[1]


def test_a_deleted_optimizer_file_is_named_and_no_damaged_checkpoint_is_loaded(runs, tmp_path):
    checkpoint = tmp_path / tag_for_step(2)
    shutil.copytree(runs.first / "checkpoints" / tag_for_step(2), checkpoint)
    optimizer_file = next(checkpoint.glob("*_optim_states.pt"))
    optimizer_file.unlink()
    with pytest.raises(CheckpointError, match="is missing") as err:
        resolve_resume(str(checkpoint), tmp_path)
    assert str(optimizer_file) in str(err.value)
    with pytest.raises(CheckpointError, match="every complete checkpoint under .* is damaged"):
        resolve_resume("auto", tmp_path)


class WritesAFile:
    """Unpickling it opens (creates) `path`: any code could run in its place."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def crafted_checkpoint(checkpoints, victim):
    """step_00000001 with a valid COMPLETE (checksums included) whose DeepSpeed files run code when unpickled."""
    checkpoint = checkpoints / tag_for_step(1)
    checkpoint.mkdir(parents=True)
    for name in ("zero_pp_rank_0_mp_rank_00_model_states.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        torch.save({"module": WritesAFile(victim), "optimizer_state_dict": WritesAFile(victim)}, checkpoint / name)
    mark_complete(checkpoints, checkpoint.name,
                  {"step": 1, "world_size": 1, "files": file_digests(checkpoint, checkpoint_files(checkpoint))})
    return checkpoint


def test_checkpoint_pickles_cannot_run_code_in_export_or_resume(pre_encoded, tmp_path, capsys):
    victim = tmp_path / "written_by_the_checkpoint"
    checkpoint = crafted_checkpoint(tmp_path / "run" / "checkpoints", victim)
    assert export_main([str(checkpoint), "--out", str(tmp_path / "vidar.pt")]) == 2
    assert "refusing to load it" in capsys.readouterr().err
    result = train(pre_encoded, tmp_path / "run", "--resume", str(checkpoint))
    assert result.returncode == 2 and "refusing to load it" in result.stderr, result.stderr[-4000:]
    assert not victim.exists()
    assert not (tmp_path / "vidar.pt").exists()


@pytest.mark.parametrize("stage", [0, 1])
def test_a_checkpoint_of_zero_stage_0_or_1_exports_every_weight(pre_encoded, tmp_path, stage):
    """ZeRO below stage 3 (distributed.zero_stage, sharding_strategy NO_SHARD or SHARD_GRAD_OP), with a frozen
    block: vidar-export of the checkpoint equals the run's own export. Stage 1's optimizer file pickles
    DeepSpeed's fragment_address, which the weights-only loads refused (resume too); stage 0 has no partitions
    (the export crashed); stage 1 records the frozen parameters only in the module state (they were left out)."""
    succeeded(train(pre_encoded, tmp_path, "--max_steps", "2", "--set", "training.num_steps=2",
                    "--set", f"distributed.zero_stage={stage}", "--set", 'training.freeze=[t5,vae,"blocks.0.*"]'))
    out = tmp_path / "exported" / "vidar.pt"
    assert export_main([str(tmp_path / "checkpoints" / tag_for_step(2)), "--out", str(out)]) == 0
    exported, trained = (torch.load(path, weights_only=True) for path in (out, tmp_path / "vidar.pt"))
    assert list(exported) == list(trained) and "blocks.0.ffn.0.weight" in exported
    assert all(torch.equal(exported[name], trained[name]) for name in trained)


def test_export_of_a_missing_folder_says_it_is_missing(tmp_path, capsys):
    assert export_main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "vidar.pt")]) == 2
    assert f"no such checkpoint directory: {tmp_path / 'nowhere'}" in capsys.readouterr().err


def test_export_refuses_an_out_it_would_overwrite_or_cannot_write(tmp_path, capsys):
    # --out is checked before the checkpoint is read: a missing one is reported only once --out is fine
    published = tmp_path / "published.pt"
    published.write_bytes(b"published weights")
    export = [str(tmp_path / "nowhere"), "--out"]
    assert export_main([*export, str(published)]) == 2
    assert f"the export would overwrite {published}; pass --overwrite" in capsys.readouterr().err
    assert export_main([*export, str(published), "--overwrite"]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
    assert published.read_bytes() == b"published weights"
    assert export_main([*export, str(tmp_path / "vidar.safetensors")]) == 2
    assert f"name the .pt file (e.g. {tmp_path / 'vidar.pt'}); the .safetensors twin" in capsys.readouterr().err
    assert export_main([*export, str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a directory: name the .pt file" in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == [published]
    # the files beside the .pt, checked once the checkpoint shows what is exported
    (tmp_path / "vidar_lora.safetensors").write_bytes(b"adapters")
    with pytest.raises(ConfigError, match="overwrite .*vidar_lora.safetensors"):
        check_outputs(dit_files(tmp_path / "vidar.pt", lora=True), False, "the export")
    check_outputs(dit_files(tmp_path / "vidar.pt", lora=False), False, "the export")
    (tmp_path / "vidar.safetensors").mkdir()
    with pytest.raises(ConfigError, match="vidar.safetensors, which is a directory"):
        check_outputs(dit_files(tmp_path / "vidar.pt", lora=False), True, "the export")


# ---------------------------------------------------------------------------------------------------
# Values and errors


@pytest.mark.parametrize("value", [".nan", ".inf", "0", "-1.0e-4"])
def test_learning_rate_must_be_finite_and_positive(value):
    with pytest.raises(ConfigError, match="`training.lr` = "):
        load_config(REPO_ROOT / TINY_CONFIG, [f"training.lr={value}"])


@pytest.mark.parametrize("change, message", [
    ({"zero_optimization": 3}, "`zero_optimization` = 3: expected an object"),
    ({"train_micro_batch_size_per_gpu": "1"}, '`train_micro_batch_size_per_gpu` = "1" (str): expected a positive integer'),
])
def test_profile_values_of_the_wrong_type_are_named(tmp_path, change, message):
    profile = {**json.loads((REPO_ROOT / CPU_PROFILE).read_text()), **change}
    (tmp_path / "profile.json").write_text(json.dumps(profile))
    with pytest.raises(ConfigError) as err:
        load_profile(tmp_path / "profile.json")
    assert message in str(err.value)


def test_non_finite_weights_are_reported_as_such_and_never_checkpointed(pre_encoded, tmp_path):
    # the weights go NaN after step 1; steps 2 and 3 have NaN losses and stop the run
    result = train(pre_encoded, tmp_path, "--set", "training.max_nonfinite_steps=2", "--set", "training.save_every=100",
                   script=(FAULTY_TRAINER, "nan_weights"))
    assert result.returncode != 0
    assert "step 3: the weights are not finite" in result.stderr, result.stderr[-4000:]
    assert "weights are finite" not in result.stderr and "last finite step" not in result.stderr
    assert not (tmp_path / "checkpoints" / tag_for_step(3)).exists()
    assert not (tmp_path / "vidar.pt").exists()


def test_a_failed_save_names_the_folder_and_suspects_a_full_disk(pre_encoded, tmp_path):
    result = train(pre_encoded, tmp_path, "--max_steps", "2", script=(FAULTY_TRAINER, "disk_full"))
    assert result.returncode == 2, result.stderr[-4000:]
    checkpoint = tmp_path / "checkpoints" / tag_for_step(2)
    assert f"checkpoint save to {checkpoint} failed: disk full? (RuntimeError: [enforce fail" in result.stderr
    assert not (checkpoint / COMPLETE_MARKER).exists()


# ---------------------------------------------------------------------------------------------------
# Preemption through the launcher script; another world size


@pytest.fixture(scope="module")
def preempted(pre_encoded, tmp_path_factory):
    """launch/single_node.sh on 2 CPU ranks; SIGTERM to the script's process (not to the ranks) once step 2
    is logged. Returns the output dir, the log and the rank processes that were running."""
    output_dir = tmp_path_factory.mktemp("preempted")
    log_path = output_dir / "log.txt"
    command = ["bash", "launch/single_node.sh", "2", "--config", TINY_CONFIG, "--ds-config", CPU_PROFILE,
               "--output_dir", str(output_dir), "--set", f"model.ckpt_dir={pre_encoded / 'ckpt'}",
               "--set", f"data.shards={pre_encoded / 'shards'}", "--set", "data.val_shards=null",
               "--set", "validation.every=0", "--set", "training.val_every=0",
               "--set", "training.num_steps=100000", "--set", "training.save_every=100000",
               "--set", "training.log_every=1", "--set", f"output.save_path={output_dir / 'export' / 'vidar.pt'}"]
    environment = dict(launcher_env(), VIDARTRAIN_VENV=str(BIN.parent), MASTER_PORT=str(free_port()))
    with open(log_path, "ab") as log:
        wrapper = subprocess.Popen(command, cwd=REPO_ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        wait_for_step(wrapper, output_dir, 2, log_path)
        ranks = ranks_under(psutil.Process(wrapper.pid))
        wrapper.send_signal(signal.SIGTERM)
        code = wait(wrapper, log_path, timeout=120)
        _, survivors = psutil.wait_procs(ranks, timeout=10)
        yield SimpleNamespace(output_dir=output_dir, log=log_path, code=code, ranks=ranks, survivors=survivors,
                              session=wrapper.pid)
    finally:
        try:
            os.killpg(wrapper.pid, signal.SIGKILL)  # whatever a failed test left running
        except ProcessLookupError:
            pass


def test_a_sigterm_after_the_ranks_agreed_to_go_on_stops_them_all_at_the_next_step(pre_encoded, tmp_path):
    """The ranks vote after every step whether one of them got SIGTERM. A SIGTERM that reaches a
    rank after that vote (rank 0, at the end of step 2's bookkeeping) waits for the next one: a rank
    that stopped alone would wait in the save's collectives while the others trained on. Step 3 is
    also a save_every step: its checkpoint is written once, not rewritten by the stop. And it is the
    run's last step: the run is finished, so its export is written after the checkpoint."""
    log = tmp_path / "log.txt"
    flags = cpu_train_args(TINY_CONFIG, tmp_path, [
        f"model.ckpt_dir={pre_encoded / 'ckpt'}", f"data.shards={pre_encoded / 'shards'}", "data.val_shards=null",
        "training.val_every=0", "validation.every=0", "training.save_every=3", "training.log_every=1",
        "training.num_steps=3", "training.warmup=1", f"output.save_path={tmp_path / 'export' / 'vidar.pt'}"])
    code = wait(start(torchrun_command(FAULTY_TRAINER, ["late_sigterm", *flags]), log), log, timeout=240)
    assert code == 0, tail(log)
    assert log.read_text().count("SIGTERM received: saving a checkpoint at step 3") == 2, tail(log)
    assert max(logged_steps(tmp_path)) == 3
    assert (tmp_path / "checkpoints" / tag_for_step(3) / COMPLETE_MARKER).is_file()
    assert log.read_text().count(f"checkpoint {tmp_path / 'checkpoints' / tag_for_step(3)} saved") == 1, tail(log)
    assert (tmp_path / "export" / "vidar.pt").is_file(), tail(log)


def test_sigterm_to_the_launcher_script_checkpoints_and_stops_every_rank(preempted):
    assert len(preempted.ranks) == 2
    assert preempted.survivors == [], tail(preempted.log)
    assert preempted.code == 0, tail(preempted.log)
    assert tail(preempted.log, 100000).count("SIGTERM received: saving a checkpoint") == 2
    stopped_at = max(logged_steps(preempted.output_dir))
    assert (preempted.output_dir / "checkpoints" / tag_for_step(stopped_at) / COMPLETE_MARKER).is_file()
    with pytest.raises(ProcessLookupError):
        os.killpg(preempted.session, 0)  # no process of the launch is left


def test_resume_on_another_world_size_points_at_ds_to_universal(pre_encoded, preempted):
    checkpoint = preempted.output_dir / "checkpoints" / tag_for_step(max(logged_steps(preempted.output_dir)))
    result = single_process(pre_encoded, preempted.output_dir, "--resume", "auto")  # 1 rank, saved by 2
    assert result.returncode == 2, result.stderr[-4000:]
    assert f"{checkpoint} was saved by 2 ranks and this run has 1" in result.stderr
    assert f"python -m deepspeed.checkpoint.ds_to_universal --input_folder {checkpoint}" in result.stderr
