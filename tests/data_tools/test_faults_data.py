"""Fault injection on the data side (issue 13): each test does what a user or a cluster did to the
converter or the loader and checks that nothing is mixed, lost or silent."""
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from data_tools import inspect as inspect_tool
from data_tools import shard as shard_tool
from data_tools.synth import synthetic_episode, write_defective_episode, write_episode, write_synthetic_episodes
from vidartrain.config import ConfigError, DataConfig, check_inputs_exist, load_config
from vidartrain.data.dataset import BadSampleLimitError, build_loader
from vidartrain.data.shard_index import file_sha256
from vidartrain.errors import DataError

REPO = Path(__file__).resolve().parents[2]
SIZE = 64


def run(episodes, out, *extra):
    return shard_tool.main(["--episodes", str(episodes), "--out", str(out), *map(str, extra)])


def add_episode(root: Path, name: str, seed: int, frames: int = 8) -> None:
    video, actions, text = synthetic_episode(np.random.default_rng(seed), frames, SIZE, SIZE)
    write_episode(root / name, video, actions, text)


def index_of(out: Path) -> dict:
    return json.loads((out / "index.json").read_text())


def shard_keys(out: Path, index: dict) -> dict[str, list[str]]:
    return {shard["name"]: [entry["key"] for entry in shard["entries"]] for shard in index["shards"]}


# ------------------------------------------------------------------------------------------------
# 1. A converter rerun into an existing --out is bound to the same input; --append adds new episodes


@pytest.fixture
def six_episodes(tmp_path):
    root = tmp_path / "episodes"
    write_synthetic_episodes(root, 6, frames=8, height=SIZE, width=SIZE, seed=1)
    return root


def test_rerun_with_added_episodes_is_refused_and_append_adds_exactly_them(six_episodes, tmp_path, capsys, refused):
    out = tmp_path / "shards"
    assert run(six_episodes, out, "--samples-per-shard", 4) == 0
    before = {path.name: (path.read_bytes(), path.stat().st_ino) for path in out.glob("shard-*.tar")}
    index_before = (out / "index.json").read_bytes()
    add_episode(six_episodes, "ep_0002b", seed=20)
    add_episode(six_episodes, "ep_0009", seed=21)

    refused(r"2 episode\(s\) added: ep_0002b, ep_0009\nuse --append", run, six_episodes, out, "--samples-per-shard", 4)
    assert (out / "index.json").read_bytes() == index_before

    capsys.readouterr()
    assert run(six_episodes, out, "--samples-per-shard", 4, "--append") == 0
    assert "appending 2 new episode(s)" in capsys.readouterr().err
    index = index_of(out)
    names = [episode["episode"] for episode in index["episodes"]]
    assert names == [f"ep_{i:04d}" for i in range(6)] + ["ep_0002b", "ep_0009"]  # each once, new ones last
    keys = shard_keys(out, index)
    assert keys == {"shard-000000.tar": ["ep_0000", "ep_0001", "ep_0002", "ep_0003"],
                    "shard-000001.tar": ["ep_0004", "ep_0005"],
                    "shard-000002.tar": ["ep_0002b", "ep_0009"]}
    for name, (data, inode) in before.items():  # existing shards untouched
        assert (out / name).read_bytes() == data and (out / name).stat().st_ino == inode
    assert index["complete"] and index["totals"]["train_episodes"] == 8
    assert inspect_tool.main([str(out)]) == 0
    config = DataConfig(shards=str(out), num_frames=5, height=32, width=32, num_workers=0)
    loaded = [key for batch in build_loader(out, config, 1, rank=0, world_size=1, train=False)
              for key in batch["__key__"]]
    assert sorted(loaded) == sorted(names)

    # the appended folder is bound to the grown input: a plain rerun resumes, nothing changes
    index_after = (out / "index.json").read_bytes()
    assert run(six_episodes, out, "--samples-per-shard", 4) == 0
    assert (out / "index.json").read_bytes() == index_after


def test_changed_removed_or_other_input_is_refused_even_with_append(six_episodes, tmp_path, refused):
    out = tmp_path / "shards"
    assert run(six_episodes, out) == 0
    index_before = (out / "index.json").read_bytes()
    actions = six_episodes / "ep_0001" / "actions.npy"
    actions.write_bytes(actions.read_bytes()[:-4] + b"\0\0\0\0")  # same size, new contents and mtime
    os.utime(actions, ns=(actions.stat().st_atime_ns, actions.stat().st_mtime_ns + 10**9))
    shutil.rmtree(six_episodes / "ep_0004")
    for extra in ((), ("--append",)):
        message = refused("removed", run, six_episodes, out, *extra)
        assert "1 episode(s) removed: ep_0004" in message and "1 episode(s) changed" in message
        assert "ep_0001" in message and "--overwrite" in message
    other = tmp_path / "other_episodes"
    write_synthetic_episodes(other, 6, frames=8, height=SIZE, width=SIZE, seed=1)
    refused(f"other episodes directory: {other}", run, other, out)
    refused(r"other settings \(layout.fps: 10 in the folder, 5 now\)", run, other, out, "--fps", 5, "--append")
    assert (out / "index.json").read_bytes() == index_before
    assert run(other, out, "--overwrite") == 0 and index_of(out)["inputs"]["episodes_dir"] == str(other)


def test_append_keeps_the_validation_split_of_existing_episodes(six_episodes, tmp_path):
    out = tmp_path / "shards"
    assert run(six_episodes, out, "--val-fraction", 0.3) == 0
    val_before = [e["episode"] for e in index_of(out / "val")["episodes"]]
    for number in range(6, 12):
        add_episode(six_episodes, f"ep_{number:04d}", seed=number)
    assert run(six_episodes, out, "--val-fraction", 0.3, "--append") == 0
    train = [e["episode"] for e in index_of(out)["episodes"]]
    val = [e["episode"] for e in index_of(out / "val")["episodes"]]
    assert val[:len(val_before)] == val_before
    assert sorted(train + val) == [f"ep_{i:04d}" for i in range(12)] and not set(train) & set(val)
    assert inspect_tool.main([str(out)]) == 0


def test_a_rerun_or_append_keeps_the_recorded_split_whatever_the_rule_gives_now(six_episodes, tmp_path, monkeypatch):
    # a folder converted under an earlier split rule (here: ep_0000 and ep_0001 held out; the rule now
    # holds out ep_0002): finishing or growing it keeps its recorded assignment, else it would be refused
    # as other input or move episodes between splits
    out = tmp_path / "shards"
    with monkeypatch.context() as earlier_rule:
        earlier_rule.setattr(shard_tool, "assign_splits", lambda names, fraction, seed: {
            name: "val" if name in ("ep_0000", "ep_0001") else "train" for name in names})
        assert run(six_episodes, out, "--val-fraction", 0.3) == 0
    assert shard_tool.assign_splits(sorted(p.name for p in six_episodes.iterdir()), 0.3, 0)["ep_0002"] == "val"
    assert run(six_episodes, out, "--val-fraction", 0.3) == 0
    add_episode(six_episodes, "ep_0006", seed=6)
    assert run(six_episodes, out, "--val-fraction", 0.3, "--append") == 0
    val = [e["episode"] for e in index_of(out / "val")["episodes"]]
    train = [e["episode"] for e in index_of(out)["episodes"]]
    assert val[:2] == ["ep_0000", "ep_0001"] and "ep_0002" in train and sorted(train + val) == [
        f"ep_{i:04d}" for i in range(7)]


# ------------------------------------------------------------------------------------------------
# 2 and 10a. A second converter on the same --out; SIGKILL of a converter with workers

SLOW_MODULE = """
import time
from pathlib import Path
from data_tools import shard

real = shard.convert_episode


def convert_episode(task):
    # a marker per worker process, then a slow episode: the converter is surely busy when killed
    Path(task[0]).parent.joinpath(f"started-{__import__('os').getpid()}").touch()
    time.sleep(1.0)
    return real(task)
"""
DRIVER = "import sys, slow; from data_tools import shard; shard.convert_episode = slow.convert_episode; " \
         "sys.exit(shard.main(sys.argv[1:]))"


def start_slow_converter(tmp_path: Path, episodes: Path, out: Path, *extra) -> subprocess.Popen:
    (tmp_path / "slow.py").write_text(SLOW_MODULE)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    return subprocess.Popen([sys.executable, "-c", DRIVER, "--episodes", str(episodes), "--out", str(out),
                             *map(str, extra)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def wait_for(condition, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_second_converter_is_refused_and_a_dead_converters_lock_is_taken_over(six_episodes, tmp_path, capsys,
                                                                             refused):
    out = tmp_path / "shards"
    first = start_slow_converter(tmp_path, six_episodes, out)
    try:
        lock = out / shard_tool.LOCK_FILE
        wait_for(lambda: list(tmp_path.glob("started-*")), what="the first converter to start converting")
        assert f"pid {first.pid}" in lock.read_text()
        refused(f"another vidar-shard \\(pid {first.pid} on .*\\) is writing", run, six_episodes, out)
    finally:
        first.kill()
        first.wait()
    assert f"pid {first.pid}" in lock.read_text()  # left behind by the killed converter
    capsys.readouterr()
    assert run(six_episodes, out) == 0
    err = capsys.readouterr().err
    assert f"(pid {first.pid} on" in err and "is no longer running; taking over its lock" in err
    index = index_of(out)
    assert [e["episode"] for e in index["episodes"]] == [f"ep_{i:04d}" for i in range(6)]
    assert all(file_sha256(out / shard["name"]) == shard["sha256"] for shard in index["shards"])
    assert not lock.exists()


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (children, their children), from /proc."""
    parents = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
            parents[int(status.parent.name)] = int(fields["PPid"])
        except (OSError, KeyError, ValueError):
            continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:\t", 1)[1][0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; nobody may be reaping it in a container


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_of_the_converter_leaves_no_worker_or_resource_tracker(six_episodes, tmp_path):
    converter = start_slow_converter(tmp_path, six_episodes, tmp_path / "shards", "--workers", 2)
    children: set[int] = set()
    try:
        wait_for(lambda: len(list(tmp_path.glob("started-*"))) == 2, what="both workers to take an episode")
        children = descendants(converter.pid)
        assert len(children) >= 3, children  # two workers and multiprocessing's resource tracker
        converter.send_signal(signal.SIGKILL)
        converter.wait()
        deadline = time.monotonic() + 30
        while any(map(alive, children)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in children if alive(pid)], "processes outlived the converter"
    finally:
        for pid in children:  # only what this test started, should the check above have failed
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        converter.kill()
        converter.wait()


# ------------------------------------------------------------------------------------------------
# 10b. An all-defective input


def test_all_defective_input_fails_and_the_folder_is_not_a_dataset(tmp_path, capsys, refused):
    episodes, out = tmp_path / "episodes", tmp_path / "shards"
    write_defective_episode("video_truncated", episodes / "bad_video", height=SIZE, width=SIZE)
    write_defective_episode("actions_nan", episodes / "bad_actions", height=SIZE, width=SIZE)
    refused(re.escape("no valid episode in the train split (all 2 skipped: actions_invalid 1, video_unreadable 1; "
                      "first bad_actions: actions.npy has non-finite values"), run, episodes, out)
    index = index_of(out)
    assert index["complete"] is False and index["shards"] == [] and "no valid episode" in index["failed"]
    assert sorted(s["episode"] for s in index["skipped"]) == ["bad_actions", "bad_video"]
    assert inspect_tool.main([str(out)]) == 1
    assert "the conversion failed" in capsys.readouterr().err
    config = DataConfig(shards=str(out), num_frames=5, height=32, width=32, num_workers=0)
    with pytest.raises(DataError, match="the conversion failed"):
        build_loader(out, config, 1, rank=0, world_size=1)


def test_actions_of_another_width_than_action_dim_fail_saying_so(tmp_path, refused):
    # a one-armed robot converted without --action-dim 7: the refusal says what to change
    write_synthetic_episodes(tmp_path / "episodes", 2, frames=6, height=SIZE, width=SIZE, action_dim=7)
    refused(re.escape("(all 2 skipped: actions_invalid 2; first ep_0000: actions.npy has shape (6, 7), expected "
                      "(T, 14) (--action-dim 14))"), run, tmp_path / "episodes", tmp_path / "shards")


# ------------------------------------------------------------------------------------------------
# 7b. Manifest entries that point outside the episodes directory


@pytest.mark.parametrize("entry", ["../outside/ep_secret", "ep_0000/../../outside/ep_secret", "ABSOLUTE"])
def test_manifest_cannot_point_outside_the_episodes_dir(six_episodes, tmp_path, entry, refused):
    add_episode(tmp_path / "outside", "ep_secret", seed=3)
    entry = str(tmp_path / "outside" / "ep_secret") if entry == "ABSOLUTE" else entry
    (six_episodes / "manifest.json").write_text(json.dumps(["ep_0000", entry]))
    refused(r"entry 1 .* points outside the episodes directory", run, six_episodes, tmp_path / "shards")
    assert not list((tmp_path / "shards").glob("shard-*.tar"))


# ------------------------------------------------------------------------------------------------
# 5. Bad samples during training: skipped, counted, named; shards checked at start


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    write_synthetic_episodes(root / "episodes", 8, frames=8, height=SIZE, width=SIZE, seed=4)
    assert run(root / "episodes", root / "shards", "--samples-per-shard", 3) == 0
    return root / "shards"


def damaged_copy(shards: Path, target: Path, key: str, member: str, damage) -> Path:
    """A copy of the shards with one tar member of sample `key` overwritten in place (same size)."""
    shutil.copytree(shards, target)
    index = index_of(target)
    shard = next(s for s in index["shards"] if key in [e["key"] for e in s["entries"]])
    path = target / shard["name"]
    with tarfile.open(path) as tar:
        info = tar.getmember(f"{key}.{member}")
    data = bytearray(path.read_bytes())
    data[info.offset_data: info.offset_data + info.size] = damage(bytes(data[info.offset_data: info.offset_data
                                                                             + info.size]))
    path.write_bytes(bytes(data))
    return path


def loader_config(shards: Path, **overrides) -> DataConfig:
    return replace(DataConfig(shards=str(shards), num_frames=5, height=32, width=32, cfg_prob=0.0, num_workers=0,
                              seed=3), **overrides)


def keys(batches) -> list[list[str]]:
    return [batch["__key__"] for batch in batches]


@pytest.mark.parametrize("member, damage, error", [
    ("mp4", lambda data: bytes(len(data)), "VideoReadError: cannot open video"),
    ("txt", lambda data: b"\xff" + data[1:], "UnicodeDecodeError"),
])
def test_bad_sample_is_skipped_counted_named_and_resumes_identically(shards, tmp_path, caplog, member, damage,
                                                                     error):
    shard = damaged_copy(shards, tmp_path / "shards", "ep_0004", member, damage)
    config = loader_config(tmp_path / "shards")
    make = lambda: build_loader(tmp_path / "shards", config, 2, rank=0, world_size=1, epochs=2)
    whole = make()
    with caplog.at_level(logging.WARNING, logger="vidartrain.data.dataset"):
        batches = list(whole)
    assert len(batches) == 8 and all(len(batch["__key__"]) == 2 for batch in batches)  # a substitute fills in
    assert "ep_0004" not in sum(keys(batches), [])
    assert whole.skipped_samples == 2 and whole.state_dict()["skipped_samples"] == 2  # once per epoch
    logged = [r.getMessage() for r in caplog.records if "skipped sample" in r.getMessage()]
    assert len(logged) == 2 and all(f"ep_0004 in {shard}: {error}" in line for line in logged)

    first = make()
    head = list(islice(iter(first), 3))
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert keys(head) + keys(resumed) == keys(batches)  # skipped and substituted the same way on resume
    assert resumed.skipped_samples == whole.skipped_samples

    with_workers = build_loader(tmp_path / "shards", replace(config, num_workers=2), 2, rank=0, world_size=1,
                                epochs=2)
    assert keys(with_workers) == keys(batches) and with_workers.skipped_samples == 2

    # the limit over a run is the trainer's (summed over ranks, with a checkpoint); a loader stops by
    # itself only when one batch holds more bad samples than the limit
    limited = build_loader(tmp_path / "shards", replace(config, max_bad_samples=1), 2, rank=0, world_size=1,
                           epochs=2)
    assert keys(limited) == keys(batches) and limited.skipped_samples == 2
    strict = build_loader(tmp_path / "shards", replace(config, max_bad_samples=0), 2, rank=0, world_size=1,
                          epochs=2)
    with pytest.raises(BadSampleLimitError, match=f"1 samples failed to decode, more than data.max_bad_samples = "
                                                  f"0; the last: ep_0004 in {shard}"):
        list(strict)


def test_training_stops_with_a_checkpoint_past_max_bad_samples(tmp_path):
    """Two corrupt samples, data.max_bad_samples = 1, one sample per step: the step that meets the
    second saves a checkpoint and the run stops saying why."""
    from data_tools.tiny_checkpoint import write_tiny_checkpoint
    from helpers.trainer_launch import TINY_CONFIG, cpu_train_args, launcher_env, logged_steps, tail
    from vidartrain.distributed.checkpointing import COMPLETE_MARKER

    write_tiny_checkpoint(tmp_path / "ckpt")
    write_synthetic_episodes(tmp_path / "episodes", 6, frames=12, height=SIZE, width=SIZE, seed=2)
    assert run(tmp_path / "episodes", tmp_path / "clean") == 0
    damaged_copy(tmp_path / "clean", tmp_path / "half", "ep_0002", "mp4", lambda data: bytes(len(data)))
    damaged_copy(tmp_path / "half", tmp_path / "shards", "ep_0004", "mp4", lambda data: bytes(len(data)))
    output_dir, log_path = tmp_path / "run", tmp_path / "train.log"
    overrides = [f"model.ckpt_dir={tmp_path / 'ckpt'}", f"data.shards={tmp_path / 'shards'}", "data.val_shards=null",
                 "data.num_workers=0", "data.max_bad_samples=1", f"output.save_path={output_dir / 'vidar.pt'}",
                 "training.num_steps=6", "training.batch_size=1", "training.gradient_accumulation=1",
                 "training.warmup=1", "training.save_every=100", "training.val_every=0", "training.log_every=1",
                 "validation.every=0"]
    command = [sys.executable, "launch/train.py", *cpu_train_args(TINY_CONFIG, output_dir, overrides)]
    with open(log_path, "wb") as log:
        code = subprocess.run(command, cwd=REPO, env=launcher_env(), stdout=log, stderr=subprocess.STDOUT,
                              timeout=300).returncode
    assert code != 0, tail(log_path)
    steps = logged_steps(output_dir)
    last = max(steps)
    assert last < 6 and steps[last]["skipped_samples"] == 2
    assert "2 samples failed to decode on all ranks, more than data.max_bad_samples = 1" in log_path.read_text()
    assert (output_dir / "checkpoints" / f"step_{last:08d}" / COMPLETE_MARKER).is_file()
    # resumed with a higher limit, the run goes on counting from the run's total (the checkpoint's), not from 0
    command = [sys.executable, "launch/train.py",
               *cpu_train_args(TINY_CONFIG, output_dir, [*overrides, "data.max_bad_samples=10"]),
               "--resume", "auto", "--max_steps", str(last + 1)]
    with open(log_path, "ab") as log:
        assert subprocess.run(command, cwd=REPO, env=launcher_env(), stdout=log, stderr=subprocess.STDOUT,
                              timeout=300).returncode == 0, tail(log_path)
    assert logged_steps(output_dir)[last + 1]["skipped_samples"] >= 2


def test_inspect_names_a_non_utf8_instruction(shards, tmp_path, capsys):
    shard = damaged_copy(shards, tmp_path / "shards", "ep_0002", "txt", lambda data: b"\xff" + data[1:])
    index = index_of(tmp_path / "shards")
    for record in index["shards"]:
        record["sha256"] = file_sha256(tmp_path / "shards" / record["name"])
    (tmp_path / "shards" / "index.json").write_text(json.dumps(index))
    assert inspect_tool.main([str(tmp_path / "shards")]) == 1
    assert f"{shard}: sample ep_0002: instruction (txt) is not UTF-8" in capsys.readouterr().err


def test_missing_or_resized_shard_is_refused_at_start_and_skipped_if_lost_during_a_run(shards, tmp_path, caplog):
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    config = loader_config(copy)
    running = build_loader(copy, config, 1, rank=0, world_size=1, train=False)
    (copy / "shard-000001.tar").unlink()
    with pytest.raises(DataError, match=f"{copy / 'shard-000001.tar'}: missing"):
        build_loader(copy, config, 1, rank=0, world_size=1)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    run_config = load_config(REPO / "configs/debug/tiny_vidar.yaml", [f"data.shards={copy}", "data.val_shards=null",
                                                                      "validation.every=0", "training.val_every=0",
                                                                      f"model.ckpt_dir={tmp_path / 'ckpt'}"])
    with pytest.raises(ConfigError, match=f"`data.shards` = {copy}: .*\n  {copy / 'shard-000001.tar'}: missing"):
        check_inputs_exist(run_config)  # what the trainer checks before it builds a model
    lost = [e["key"] for e in index_of(copy)["shards"][1]["entries"]]
    with caplog.at_level(logging.WARNING, logger="vidartrain.data.dataset"):
        batches = list(running)  # the shard went away under a running loader: its samples are skipped
    assert len(batches) == 8 and not set(lost) & set(sum(keys(batches), []))
    logged = [r.getMessage() for r in caplog.records if "skipped sample" in r.getMessage()]
    assert {line.split()[2] for line in logged} == set(lost) and len(lost) == 3
    assert all("shard-000001.tar: FileNotFoundError" in line for line in logged)
    assert running.skipped_samples == len(logged) >= 3  # a substitute from the lost shard fails too
    (copy / "shard-000001.tar").write_bytes((shards / "shard-000001.tar").read_bytes() + b"\0" * 512)
    with pytest.raises(DataError, match="shard-000001.tar: .* bytes, index.json says"):
        build_loader(copy, config, 1, rank=0, world_size=1)


def test_training_run_skips_counts_and_names_a_corrupt_sample(tmp_path):
    """One process through launch/train.py: 6 samples, 3 steps of 2 (one epoch) with ep_0002's video
    zeroed in place; the run finishes, logs the sample and counts it as data/skipped_samples."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from data_tools.tiny_checkpoint import write_tiny_checkpoint
    from helpers.trainer_launch import TINY_CONFIG, cpu_train_args, launcher_env, logged_steps, tail

    write_tiny_checkpoint(tmp_path / "ckpt")
    write_synthetic_episodes(tmp_path / "episodes", 6, frames=12, height=SIZE, width=SIZE, seed=2)
    assert run(tmp_path / "episodes", tmp_path / "clean") == 0
    shards = tmp_path / "shards"
    shard = damaged_copy(tmp_path / "clean", shards, "ep_0002", "mp4", lambda data: bytes(len(data)))
    output_dir, log_path = tmp_path / "run", tmp_path / "train.log"
    overrides = [f"model.ckpt_dir={tmp_path / 'ckpt'}", f"data.shards={shards}", "data.val_shards=null",
                 "data.num_workers=0", f"output.save_path={output_dir / 'vidar.pt'}", "training.num_steps=3",
                 "training.batch_size=2", "training.warmup=1", "training.save_every=3", "training.val_every=0",
                 "training.log_every=1", "validation.every=0"]
    command = [sys.executable, "launch/train.py", *cpu_train_args(TINY_CONFIG, output_dir, overrides)]
    with open(log_path, "wb") as log:
        code = subprocess.run(command, cwd=REPO, env=launcher_env(), stdout=log, stderr=subprocess.STDOUT,
                              timeout=300).returncode
    assert code == 0, tail(log_path)
    steps = logged_steps(output_dir)
    assert sorted(steps) == [1, 2, 3] and "ep_0002" not in sum((steps[s]["keys"] for s in steps), [])
    assert steps[3]["skipped_samples"] == 1
    assert f"skipped sample ep_0002 in {shard}: VideoReadError" in log_path.read_text()
    events = EventAccumulator(str(output_dir / "tensorboard")).Reload()
    assert [e.value for e in events.Scalars("data/skipped_samples")][-1] == 1
