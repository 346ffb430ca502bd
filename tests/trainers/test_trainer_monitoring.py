"""What a person reads in a log file: a progress line at least every training.log_seconds; what a
resumed run leaves in TensorBoard and metrics.jsonl."""
import json
import logging
import resource
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vidartrain.trainers import monitoring
from vidartrain.trainers.base import ValidationSample
from vidartrain.trainers.monitoring import TrainingMonitor, peak_memory_bytes


def record(step):
    return {"step": step, "loss": 1.0, "lr": 1e-3, "grad_norm": 0.5, "nonfinite_total": 0, "data_wait": 0.1,
            "compute": 0.9, "samples": 4, "tokens": 64, "peak_memory": 2**30, "finite": True, "keys": [],
            "skipped_samples": 0, "metrics": {}}


@pytest.mark.parametrize("accelerator", ["cpu", "cuda"])
def test_peak_memory_is_the_runs_devices(monkeypatch, accelerator):
    """On a machine with a GPU, a run on the CPU accelerator (the demo sets DS_ACCELERATOR=cpu) logged the idle
    GPU's allocator peak, 0 bytes, as its peak memory at every step and in the dry run."""
    monkeypatch.setattr(monitoring, "get_accelerator", lambda: SimpleNamespace(device_name=lambda: accelerator))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 123)
    resident = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert peak_memory_bytes() == (123 if accelerator == "cuda" else resident)


def test_without_a_terminal_a_progress_line_comes_every_log_seconds(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="vidartrain.trainers.monitoring")
    monitor = TrainingMonitor(tmp_path, enabled=True, start_step=0, total_steps=10, log_seconds=0.2)
    try:
        assert monitor.heartbeat is not None  # pytest's stderr is not a terminal
        monitor.log_step(record(1), log_scalars=False)
        time.sleep(0.7)  # a long step: the log must not go quiet meanwhile
    finally:
        monitor.close()
    beats = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
    assert 2 <= len(beats) <= 4, beats
    assert beats[0].startswith("progress: step 1/10") and "samples/s" in beats[0] and "ETA" in beats[0]
    assert "no step finished for" in beats[0]
    assert not monitor.heartbeat.thread.is_alive()


def test_a_resumed_run_replaces_the_steps_after_its_checkpoint_and_keeps_the_checkpoints_own(tmp_path):
    """Steps 1-4 logged, the run resumed from its checkpoint at step 2 and logging 3-5: TensorBoard and
    metrics.jsonl both hold 1-5 once each (TensorBoard lost step 2 when the purge began at the checkpoint)."""
    for start, steps in ((0, (1, 2, 3, 4)), (2, (3, 4, 5))):
        monitor = TrainingMonitor(tmp_path, enabled=True, start_step=start, total_steps=5)
        for step in steps:
            monitor.log_step(record(step), log_scalars=True)
        monitor.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2, 3, 4, 5]
    rows = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4, 5]


def test_a_samples_report_cut_short_leaves_the_earlier_one_whole(tmp_path, monkeypatch):
    """Validation samples at a step an earlier run rendered too (it went on past the checkpoint this
    run resumed from): a write stopped midway (a kill, a full disk) must leave that run's
    metrics.json readable, not half of this one."""
    sample = ValidationSample("ep_0000", np.zeros((5, 16, 16, 3), np.uint8), np.zeros((5, 16, 16, 3), np.uint8),
                              {"psnr": 20.0})
    folder = tmp_path / "samples" / "step_00000002"
    monitor = TrainingMonitor(tmp_path, enabled=True, start_step=0, total_steps=5)
    try:
        monitor.log_samples(2, [sample], fps=10, seconds=1.0)
        before = (folder / "metrics.json").read_text()
        write_text = Path.write_text

        def cut_short(path, text, *args, **kwargs):
            write_text(path, text[:10], *args, **kwargs)
            raise OSError("No space left on device")

        monkeypatch.setattr(Path, "write_text", cut_short)
        with pytest.raises(OSError, match="No space"):
            monitor.log_samples(2, [sample], fps=10, seconds=2.0)
    finally:
        monitor.close()
    assert (folder / "metrics.json").read_text() == before


def test_a_resumed_run_drops_the_validation_samples_after_its_checkpoint(tmp_path):
    """Like its rows of metrics.jsonl: samples an earlier run rendered after the checkpoint this run
    resumes from come from weights this run no longer has (and it may render at other steps)."""
    sample = ValidationSample("ep_0000", np.zeros((5, 16, 16, 3), np.uint8), np.zeros((5, 16, 16, 3), np.uint8),
                              {"psnr": 20.0})
    monitor = TrainingMonitor(tmp_path, enabled=True, start_step=0, total_steps=5)
    for step in (2, 4):
        monitor.log_samples(step, [sample], fps=10, seconds=1.0)
    monitor.close()
    TrainingMonitor(tmp_path, enabled=True, start_step=2, total_steps=5).close()
    assert sorted(path.name for path in (tmp_path / "samples").iterdir()) == ["step_00000002"]
