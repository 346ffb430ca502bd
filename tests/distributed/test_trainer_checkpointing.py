"""Checkpoint bookkeeping: complete markers, `latest`, pruning, --resume resolution; LR schedule."""
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

from vidartrain.distributed.checkpointing import (
    COMPLETE_MARKER, LATEST_FILE, CheckpointRef, checkpoint_files, checkpoint_problems, complete_checkpoints,
    file_digests, hashing_shares, latest_complete, mark_complete, prune_checkpoints, recorded_run, resolve_resume,
    sees_shared_marker, set_aside_checkpoints_after, tag_for_step, weights_only_loads)
from vidartrain.config import load_config
from vidartrain.errors import CheckpointError, ConfigError
from vidartrain.trainers import base
from vidartrain.trainers.base import RunOptions, Trainer, check_fresh_start, lr_factor

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def fake_checkpoint(root, step, complete=True):
    tag = tag_for_step(step)
    (root / tag).mkdir(parents=True)
    (root / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        mark_complete(root, tag, {"step": step})
    return tag


def test_interrupted_save_is_never_picked(tmp_path):
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 20, complete=False)  # a save killed half way: files but no marker
    assert latest_complete(tmp_path) == "step_00000010"
    ref = resolve_resume("auto", tmp_path)
    assert (ref.root, ref.tag, ref.universal) == (tmp_path, "step_00000010", False)
    with pytest.raises(CheckpointError, match="was interrupted"):
        resolve_resume(str(tmp_path / "step_00000020"), tmp_path)


def test_latest_naming_an_incomplete_checkpoint_falls_back_to_newest_complete(tmp_path):
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 30)
    fake_checkpoint(tmp_path, 40, complete=False)
    (tmp_path / LATEST_FILE).write_text("step_00000040")
    assert latest_complete(tmp_path) == "step_00000030"


def test_a_save_stopped_between_its_complete_marker_and_latest_is_the_one_resumed(tmp_path):
    """`latest` moves after COMPLETE is written: a save killed in between left `latest` one behind, and
    --resume auto went back to that older checkpoint and set the newer, complete one aside."""
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 20)
    (tmp_path / LATEST_FILE).write_text("step_00000010")
    assert latest_complete(tmp_path) == "step_00000020"
    assert resolve_resume("auto", tmp_path).tag == "step_00000020"


@pytest.mark.parametrize("latest", ["garbage", "binary", "dangling", "folder"])
def test_resume_auto_takes_the_newest_complete_checkpoint_whatever_latest_holds(tmp_path, caplog, latest):
    """`latest` is only a pointer: the COMPLETE markers decide. Bytes that are no text (a torn disk block)
    crashed `--resume auto` with a UnicodeDecodeError."""
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 20)
    pointer = tmp_path / LATEST_FILE
    pointer.unlink()
    if latest == "garbage":
        pointer.write_text("step_00000099 and more\n")
    elif latest == "binary":
        pointer.write_bytes(b"\xff\xfe\x00step")
    elif latest == "dangling":
        pointer.symlink_to(tmp_path / "nowhere")
    else:
        pointer.mkdir()
    assert resolve_resume("auto", tmp_path).tag == "step_00000020"
    assert str(pointer) in caplog.text and "the newest complete checkpoint is step_00000020" in caplog.text


@pytest.mark.parametrize("latest", ["names_a_deleted_checkpoint", "binary"])
def test_resume_auto_does_not_start_afresh_where_latest_shows_checkpoints_that_are_gone(tmp_path, latest):
    """Only a checkpoint's completion writes `latest`: with it there and no complete checkpoint left, the run's
    checkpoints were deleted or moved, and starting from step 0 would drop the run's progress unasked."""
    fake_checkpoint(tmp_path, 10, complete=False)  # an unfinished save is no checkpoint to resume
    if latest == "binary":
        (tmp_path / LATEST_FILE).write_bytes(b"\xff\xfe\x00step")
    else:
        (tmp_path / LATEST_FILE).write_text("step_00000020")
    with pytest.raises(CheckpointError, match=rf"{LATEST_FILE} shows that this run saved checkpoints, but "
                                              rf"{tmp_path} holds no complete one .*remove {LATEST_FILE} to start"):
        resolve_resume("auto", tmp_path)
    (tmp_path / LATEST_FILE).unlink()
    assert resolve_resume("auto", tmp_path) is None


def test_prune_keeps_last_k_and_removes_stale_partial_saves(tmp_path):
    for step in (10, 20, 30):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 15, complete=False)
    fake_checkpoint(tmp_path, 40, complete=False)  # newer than the newest complete: maybe in progress
    deleted = prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(deleted) == ["step_00000010", "step_00000015"]
    assert complete_checkpoints(tmp_path) == ["step_00000020", "step_00000030"]
    assert (tmp_path / "step_00000040").is_dir()
    assert (tmp_path / LATEST_FILE).read_text() == "step_00000030"


def test_resuming_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path):
    """A run resumed from step 20 while steps 30 and 40 (one unfinished) exist: those move into
    superseded/, so the resumed run's save at 30 neither writes into the old folder nor is pruned for
    the old 40, and `latest` names the resumed checkpoint."""
    for step in (10, 20, 30):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 40, complete=False)
    moved = set_aside_checkpoints_after(tmp_path, 20, "20261128-070000")
    assert moved == tmp_path / "superseded" / "after_step_00000020_20261128-070000"
    assert sorted(p.name for p in moved.iterdir()) == ["step_00000030", "step_00000040"]
    assert (moved / "step_00000030" / COMPLETE_MARKER).is_file()  # moved whole
    assert complete_checkpoints(tmp_path) == ["step_00000010", "step_00000020"]
    assert (tmp_path / LATEST_FILE).read_text() == "step_00000020"
    fake_checkpoint(tmp_path, 30)  # the resumed run's own save
    assert prune_checkpoints(tmp_path, keep_last=1) == ["step_00000010", "step_00000020"]
    assert complete_checkpoints(tmp_path) == ["step_00000030"]
    assert set_aside_checkpoints_after(tmp_path, 30, "20261128-070100") is None  # nothing later: nothing moves


def test_a_fresh_run_does_not_start_over_an_earlier_runs_checkpoints(tmp_path):
    options = RunOptions(ds_config={})
    assert check_fresh_start(tmp_path, options) is False  # nothing there
    fake_checkpoint(tmp_path / "checkpoints", 10)
    fake_checkpoint(tmp_path / "checkpoints", 20, complete=False)
    with pytest.raises(ConfigError, match=r"holds 2 checkpoints of an earlier run \(newest step_00000020\): "
                                          r"continue it with --resume auto.*or pass --overwrite"):
        check_fresh_start(tmp_path, options)
    assert check_fresh_start(tmp_path, RunOptions(ds_config={}, overwrite=True)) is True
    assert check_fresh_start(tmp_path, RunOptions(ds_config={}, resume="auto")) is False


def test_a_fresh_run_does_not_replace_an_earlier_runs_export(tmp_path, monkeypatch):
    """A save_path outside the output dir (the tiny configs' demo_run/export/): a run into a new
    --output_dir is refused before any process group, not found replaced at its end."""
    monkeypatch.setattr("vidartrain.trainers.base.init_distributed",
                        lambda: pytest.fail("a process group started: the export path should have been refused"))
    config = load_config(CONFIGS / "debug" / "tiny_vidar.yaml", [f"output.save_path={tmp_path / 'vidar.pt'}"])
    (tmp_path / "vidar.pt").write_bytes(b"the demo's export")
    with pytest.raises(ConfigError, match="would overwrite an earlier run's export"):
        Trainer(config, SimpleNamespace(name="vidar"), RunOptions(ds_config={}, output_dir=str(tmp_path / "run")))
    assert (tmp_path / "vidar.pt").read_bytes() == b"the demo's export"


def test_every_file_any_rank_lists_is_hashed_once_by_a_rank_that_sees_it():
    # 64 ranks on 8 nodes, 2 files each (as ZeRO-3 writes them); nodes 1-7 list the folder with a lag and see
    # only their own node's files, node 0 sees all. Each rank hashing every 64th file of its own listing
    # recorded 18 of the 128 files in COMPLETE.
    written_by = {name: rank for rank in range(64) for name in (f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
                                                                   f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")}
    files = sorted(written_by)
    listings = [files if rank < 8 else [name for name in files if written_by[name] // 8 == rank // 8]
                for rank in range(64)]
    assert len({name for rank in range(64) for name in listings[rank][rank::64]}) == 18
    shares = hashing_shares(listings)
    assert sorted(name for share in shares for name in share) == sorted(files)
    assert all(name in listings[rank] for rank, share in enumerate(shares) for name in share)
    assert max(map(len, shares)) <= 3  # still spread over the ranks (2 each at best)
    same = hashing_shares([sorted(files)] * 64)
    assert same == [sorted(files)[rank::64] for rank in range(64)]  # where every rank sees every file: as before


@pytest.mark.parametrize("shared", [True, False])
def test_an_output_dir_that_is_each_nodes_own_disk_is_refused(shared, tmp_path, monkeypatch):
    # Rank 0 of 64 on 8 nodes; the 56 ranks of nodes 1-7 look at `elsewhere`: the same folder on shared storage,
    # a folder of their own on node-local disks, where their checkpoint partitions would be out of rank 0's sight
    # (its COMPLETE record, its checksums, --resume auto) and resumes would see other checkpoints than rank 0.
    here = tmp_path / "node0" / "run"
    elsewhere = here if shared else tmp_path / "node7" / "run"
    trainer = object.__new__(Trainer)
    trainer.rank, trainer.world_size, trainer.device, trainer.output_dir = 0, 64, torch.device("cpu"), here
    token, seen_elsewhere = [], []
    monkeypatch.setattr(base.dist, "broadcast_object_list", lambda objects, src: token.append(objects[0]))
    monkeypatch.setattr(base.dist, "barrier", lambda: seen_elsewhere.append(sees_shared_marker(elsewhere, token[0])))
    monkeypatch.setattr(base.dist, "all_reduce", lambda tensor: tensor.add_(0 if seen_elsewhere[0] else 56))
    if shared:
        trainer.check_output_dir_shared()
    else:
        with pytest.raises(ConfigError, match=r"output_dir .*node0/run is not the same folder on every node: 56 of the "
                                              r"64 ranks do not see what rank 0 wrote there"):
            trainer.check_output_dir_shared()
    assert list(here.iterdir()) == []  # the marker is gone either way


def test_resume_resolution(tmp_path):
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("auto", tmp_path / "nothing_here") is None
    fake_checkpoint(tmp_path, 5)
    assert resolve_resume(str(tmp_path), tmp_path).tag == "step_00000005"
    universal = tmp_path / "step_00000005_universal"
    (universal / "zero").mkdir(parents=True)
    (universal / "zero" / "optimizer_state.pt").write_bytes(b"x")
    ref = resolve_resume(str(universal), tmp_path)
    assert ref.universal and ref.tag == "step_00000005_universal" and ref.root == tmp_path
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_resume(str(tmp_path / "missing"), tmp_path)
    with pytest.raises(CheckpointError, match="neither a checkpoint folder"):
        resolve_resume(str(universal / "zero"), tmp_path)
    assert (tmp_path / "step_00000005" / COMPLETE_MARKER).is_file()


def test_ranks_share_the_verification_and_together_check_every_file(tmp_path):
    """Each rank hashes every world_size-th file of the COMPLETE record; the union of their answers is the
    verdict, so a damaged file is found whichever rank's share it falls in, nested folders included."""
    checkpoint = tmp_path / tag_for_step(1)
    names = [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(4)] + ["zero/sub/state.pt"]
    for name in names:
        (checkpoint / name).parent.mkdir(parents=True, exist_ok=True)
        (checkpoint / name).write_bytes(name.encode())
    assert checkpoint_files(checkpoint) == sorted(names)
    mark_complete(tmp_path, checkpoint.name,
                  {"step": 1, "files": file_digests(checkpoint, checkpoint_files(checkpoint))})
    assert [checkpoint_problems(checkpoint, rank, 2) for rank in range(2)] == [[], []]
    for name in names:
        original = (checkpoint / name).read_bytes()
        (checkpoint / name).write_bytes(original[::-1])  # same size, other bytes
        found = [problem for rank in range(2) for problem in checkpoint_problems(checkpoint, rank, 2)]
        assert found == [f"{checkpoint / name}: sha256 differs from the one {COMPLETE_MARKER} recorded (corrupted)"]
        (checkpoint / name).write_bytes(original)


def test_a_universal_checkpoint_is_checked_against_the_run_that_saved_its_source(tmp_path):
    """ds_to_universal writes no COMPLETE record: the settings a resume is compared with are those of the
    checkpoint it was made from, beside it, or of a COMPLETE file copied into it; without either the
    resume is refused (it checked nothing before)."""
    fake_checkpoint(tmp_path, 5)
    universal = CheckpointRef(tmp_path, "step_00000005_universal", universal=True)
    universal.path.mkdir()
    assert recorded_run(universal) == {"step": 5}
    elsewhere = CheckpointRef(tmp_path / "moved", "step_00000005_universal", universal=True)
    elsewhere.path.mkdir(parents=True)
    with pytest.raises(CheckpointError, match="records no config.*keep the universal checkpoint next to its source"):
        recorded_run(elsewhere)
    (elsewhere.path / COMPLETE_MARKER).write_text((tmp_path / "step_00000005" / COMPLETE_MARKER).read_text())
    assert recorded_run(elsewhere) == {"step": 5}
    # a COMPLETE copied into the universal checkpoint is its own record, before its source's
    (universal.path / COMPLETE_MARKER).write_text('{"step": 5, "copied": true}')
    assert recorded_run(universal) == {"step": 5, "copied": True}


def test_the_dynamic_loss_scaler_of_an_fp16_run_loads_weights_only(tmp_path):
    """DeepSpeed's ZeRO optimizers save their loss scaler in the optimizer states; under fp16 it is the
    DynamicLossScaler (DeepSpeed's default there), which the weights-only loads refused: no checkpoint of
    an fp16 run resumed."""
    scaler = DynamicLossScaler(init_scale=2**16, scale_window=1000, min_scale=1, delayed_shift=2,
                               consecutive_hysteresis=False, dtype=torch.float16)
    scaler.cur_scale, scaler.cur_iter = 2.0**12, 345
    torch.save({"optimizer_state_dict": {"loss_scaler": scaler, "dynamic_loss_scale": True}}, tmp_path / "optim.pt")
    with weights_only_loads():
        loaded = torch.load(tmp_path / "optim.pt")["optimizer_state_dict"]["loss_scaler"]
    assert type(loaded) is DynamicLossScaler and vars(loaded) == vars(scaler)


def test_lr_warmup_then_constant_or_cosine():
    assert lr_factor(0, 200, 14000, "constant", 0.0) == pytest.approx(1 / 200)
    assert lr_factor(199, 200, 14000, "constant", 0.0) == 1.0
    assert lr_factor(5000, 200, 14000, "constant", 0.0) == 1.0
    assert lr_factor(200, 200, 1200, "cosine", 0.1) == 1.0
    assert lr_factor(700, 200, 1200, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_factor(1200, 200, 1200, "cosine", 0.1) == pytest.approx(0.1)
