"""What rank 0 reports while training: TensorBoard events, metrics.jsonl, a progress bar, log lines."""
from __future__ import annotations

import datetime
import json
import logging
import resource
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from deepspeed.accelerator import get_accelerator
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from vidartrain.distributed.checkpointing import TAG_PATTERN, step_of, tag_for_step
from vidartrain.files import write_atomically
from vidartrain.sampling import frame_strip, write_mp4

log = logging.getLogger(__name__)


def peak_memory_bytes() -> int:
    """Peak GPU allocator memory where DeepSpeed runs on CUDA; peak resident set size of the process on
    the CPU, also on a machine with a GPU that the run leaves alone (DS_ACCELERATOR=cpu, as the demo sets)."""
    if get_accelerator().device_name() == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def drop_rows_after(path: Path, step: int) -> None:
    """Remove (atomically) the rows of metrics.jsonl for steps after `step`: an earlier run logged them
    after the checkpoint this run resumes from, and this run logs them again. A line cut short by a kill
    goes too."""
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    if kept != lines:
        write_atomically(path, lambda tmp: tmp.write_text("".join(kept)))


def drop_samples_after(samples_dir: Path, step: int) -> None:
    """Delete the validation samples (samples_dir/step_N) of steps after `step`: as the rows of
    metrics.jsonl, an earlier run rendered them from weights past the checkpoint this run resumes
    from, and this run renders its own, at its own `validation.every` and `num_samples`."""
    if not samples_dir.is_dir():
        return
    for folder in samples_dir.iterdir():
        if folder.is_dir() and TAG_PATTERN.match(folder.name) and step_of(folder.name) > step:
            shutil.rmtree(folder)


class TrainingMonitor:
    """Writes under output_dir: tensorboard/ (event files), metrics.jsonl (one line per step, with
    the step's sample keys) and samples/step_N/ (validation samples). Does nothing on ranks other than 0."""

    def __init__(self, output_dir: Path, enabled: bool, start_step: int, total_steps: int, log_seconds: float = 30.0):
        self.enabled = enabled
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        # purge_step drops events an earlier run wrote after the checkpoint this run resumes from (all of
        # them when it starts afresh over an earlier run: the steps are logged again); the checkpoint's
        # own step stays, as in metrics.jsonl.
        self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=start_step + 1)
        metrics_path = output_dir / "metrics.jsonl"
        if metrics_path.exists():
            drop_rows_after(metrics_path, start_step)
        self.samples_dir = output_dir / "samples"
        drop_samples_after(self.samples_dir, start_step)
        self.metrics_file = open(metrics_path, "a")
        # A live bar on a terminal; in a log file the log lines (with their ETA) say the same.
        self.progress = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                             disable=not sys.stderr.isatty())
        self.start_step, self.total_steps, self.start_time = start_step, total_steps, time.monotonic()
        self.heartbeat = None if sys.stderr.isatty() else Heartbeat(self, log_seconds)

    def log_step(self, record: dict[str, Any], log_scalars: bool) -> None:
        if not self.enabled:
            return
        step = record["step"]
        step_time = record["data_wait"] + record["compute"]
        scalars = {
            "train/loss": record["loss"], "train/lr": record["lr"], "train/grad_norm": record["grad_norm"],
            "train/nonfinite_steps": record["nonfinite_total"], "data/skipped_samples": record["skipped_samples"],
            "throughput/samples_per_s": record["samples"] / step_time,
            "throughput/tokens_per_s": record["tokens"] / step_time,
            "time/data_wait_s": record["data_wait"], "time/compute_s": record["compute"],
            "memory/peak_gib": record["peak_memory"] / 2**30,
        }
        scalars.update({f"train/{name}": value for name, value in record["metrics"].items()})
        by_source = record.get("samples_by_source", {})  # a mixture of shard directories
        scalars.update({f"data/samples/{Path(source).name}": count for source, count in by_source.items()})
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.metrics_file.write(json.dumps({**{k: v for k, v in record.items() if k != "metrics"},
                                            **record["metrics"]}) + "\n")
        self.metrics_file.flush()
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        if self.heartbeat is not None:
            self.heartbeat.step_done(step, record["samples"], logged=log_scalars)
        if log_scalars:
            self.writer.flush()
            log.info("step %d/%d  loss %.5f  lr %.3e  grad_norm %.3f  %.1f samples/s  %.0f tokens/s  "
                     "data %.2fs compute %.2fs  peak %.2f GiB  ETA %s%s", step, self.total_steps, record["loss"],
                     record["lr"], record["grad_norm"], scalars["throughput/samples_per_s"],
                     scalars["throughput/tokens_per_s"], record["data_wait"], record["compute"],
                     scalars["memory/peak_gib"], self.eta(step),
                     "" if record["finite"] else "  (non-finite loss: step skipped)")
            if by_source:
                log.info("samples per source so far: %s",
                         ", ".join(f"{source} {count}" for source, count in by_source.items()))

    def eta(self, step: int) -> str:
        """Remaining time at this run's average pace so far."""
        per_step = (time.monotonic() - self.start_time) / max(1, step - self.start_step)
        return str(datetime.timedelta(seconds=round(per_step * (self.total_steps - step))))

    def log_validation(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        """A validation's loss and metrics as TensorBoard's val/PREFIXNAME and metrics.jsonl's
        val_PREFIXNAME (prefix "": the training weights, "ema_": their EMA). The log line shows the
        loss and the metrics that are not one of a family (loss_by_sigma/..., loss_by_position/...)."""
        if not self.enabled:
            return
        for name, value in values.items():
            self.writer.add_scalar(f"val/{prefix}{name}", value, step)
        self.metrics_file.write(json.dumps({"step": step, **{f"val_{prefix}{k}": v for k, v in values.items()}}) + "\n")
        self.metrics_file.flush()
        shown = "  ".join(f"{name} {value:.5f}" for name, value in values.items() if name != "loss" and "/" not in name)
        log.info("step %d  validation %s%.5f%s", step, f"{prefix.replace('_', ' ')}loss ", values["loss"],
                 f"  ({shown})" if shown else "")

    def log_samples(self, step: int, samples: list, fps: int, seconds: float) -> None:
        """Validation samples: mp4 per sample under samples/step_N/ with metrics.json, TensorBoard image
        strips (first / middle / last frame, generated above ground truth) and mean metrics."""
        if not self.enabled:
            return
        directory = self.samples_dir / tag_for_step(step)
        directory.mkdir(parents=True, exist_ok=True)
        for index, sample in enumerate(samples):
            write_mp4(directory / f"sample_{index:02d}.mp4", sample.frames, fps)
            self.writer.add_image(f"samples/{index:02d}", frame_strip(sample.frames, sample.ground_truth), step,
                                  dataformats="HWC")
        names = sorted(set().union(*(s.metrics for s in samples)) - {"action_l1_per_dim"})
        means = {name: float(np.mean([s.metrics[name] for s in samples if name in s.metrics])) for name in names}
        for name, value in means.items():
            self.writer.add_scalar(f"samples/{name}", value, step)
        self.writer.add_scalar("time/validation_samples_s", seconds, step)
        self.writer.flush()
        report = {"step": step, "seconds": seconds, "samples": [{"key": s.key, **s.metrics} for s in samples]}
        text = json.dumps(report, indent=2) + "\n"
        # whole or not at all, as the mp4s: a resumed run renders again the steps after its checkpoint
        write_atomically(directory / "metrics.json", lambda tmp: tmp.write_text(text))
        log.info("step %d  %d validation samples in %.1f s -> %s  %s", step, len(samples), seconds, directory,
                 "  ".join(f"{name} {value:.4f}" for name, value in means.items()))

    def close(self) -> None:
        if not self.enabled:
            return
        if self.heartbeat is not None:
            self.heartbeat.stop()
        self.progress.close()
        self.writer.close()
        self.metrics_file.close()


class Heartbeat:
    """Without a terminal (a log file, a cluster job) there is no progress bar: a thread logs a
    progress line whenever `interval` seconds pass without one, also in the middle of a long step,
    a validation or a checkpoint save, so that the log never goes quiet for longer."""

    def __init__(self, monitor: TrainingMonitor, interval: float):
        self.monitor, self.interval = monitor, interval
        self.lock = threading.Lock()
        self.step, self.samples = monitor.start_step, 0
        self.last_line = self.last_step_end = time.monotonic()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, name="progress-heartbeat", daemon=True)
        self.thread.start()

    def step_done(self, step: int, samples: int, logged: bool) -> None:
        with self.lock:
            now = time.monotonic()
            self.step, self.samples, self.last_step_end = step, self.samples + samples, now
            if logged:
                self.last_line = now

    def run(self) -> None:
        while not self.stopped.wait(self.interval - (time.monotonic() - self.last_line)):
            with self.lock:
                now = time.monotonic()
                if now - self.last_line < self.interval:
                    continue
                self.last_line = now
                step, samples, waiting = self.step, self.samples, now - self.last_step_end
            monitor = self.monitor
            rate = samples / max(now - monitor.start_time, 1e-9)
            log.info("progress: step %d/%d  %.2f samples/s  ETA %s  (no step finished for %.0fs)", step,
                     monitor.total_steps, rate, monitor.eta(step) if step > monitor.start_step else "unknown",
                     waiting)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()
