"""Checkpoint bookkeeping: complete markers, `latest`, pruning, --resume resolution; LR schedule."""
import math

import pytest

from vidartrain.distributed.checkpointing import (
    COMPLETE_MARKER, LATEST_FILE, complete_checkpoints, latest_complete, mark_complete, prune_checkpoints,
    resolve_resume, tag_for_step)
from vidartrain.errors import CheckpointError
from vidartrain.trainers.base import lr_factor


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


def test_lr_warmup_then_constant_or_cosine():
    assert lr_factor(0, 200, 14000, "constant", 0.0) == pytest.approx(1 / 200)
    assert lr_factor(199, 200, 14000, "constant", 0.0) == 1.0
    assert lr_factor(5000, 200, 14000, "constant", 0.0) == 1.0
    assert lr_factor(200, 200, 1200, "cosine", 0.1) == 1.0
    assert lr_factor(700, 200, 1200, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_factor(1200, 200, 1200, "cosine", 0.1) == pytest.approx(0.1)
