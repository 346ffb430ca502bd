"""Convert episode folders into WebDataset tar shards plus an index.json.

    python -m data_tools.shard --episodes data/episodes --out data/shards [--val-fraction 0.05]

One sample per episode (key = episode name; members mp4, actions.npy, txt, json). Every episode is
validated first (see data_tools.episodes); bad ones are skipped and listed in index.json with their
reason. Same input and options give byte-identical shards. Each shard is written under a temporary
name, fsynced and renamed, then recorded in an append-only journal (.journal.jsonl), so a run
started again after an interruption keeps the finished shards whose checksums still match and
carries on from there; index.json is written when the conversion is complete. The output folder is
bound to its input (episodes directory, each episode's file sizes and mtimes, settings): a rerun on
other input is refused, --append converts episodes added since into new shards, and a lock keeps
a second converter out. The validation split (a deterministic choice of whole episodes) goes to
out/val/. With --precompute, samples are fixed windows of VAE latents instead (see
data_tools.precompute).
"""
from __future__ import annotations

import argparse
import bisect
import ctypes
import fcntl
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterable, Iterator

import webdataset as wds

import numpy as np
import safetensors.torch

from data_tools.episodes import (EpisodeError, EpisodeLayout, ValidEpisode, actions_to_npy, discover_episodes,
                                 load_episode)
from data_tools.precompute import (PRECOMPUTABLE, DTYPES, Precomputer, WindowSettings, episode_windows,
                                   in_current_form, parse_precompute, settings_record, text_key)
from vidartrain.data.dataset import NULL_PROMPT
from vidartrain.data.transforms import RESIZE_MODES
from vidartrain.data.shard_index import (INDEX_FILE, INDEX_FORMAT, JOURNAL_FILE, TEXT_EMBEDDINGS_FILE,
                                         episode_action_statistics, file_sha256, merge_action_statistics)
from vidartrain.errors import ConfigError, DataError, listed, reports_errors
from vidartrain.files import Journal, files_fingerprint, make_directory, write_atomically

VAL_DIR = "val"
LOCK_FILE = ".vidar-shard.lock"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class ConversionSettings:
    """Everything that decides the bytes of the shards; recorded in index.json and compared on resume."""

    layout: EpisodeLayout = field(default_factory=EpisodeLayout)
    max_samples: int = 1000
    max_bytes: int = 1 << 30
    val_fraction: float = 0.0
    split_seed: int = 0
    # pre-encoding (data_tools.precompute.settings_record): None for raw video shards
    precompute: dict | None = None

    @property
    def mode(self) -> str:
        return "raw" if self.precompute is None else "latents"

    def as_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


@dataclass
class EpisodeResult:
    name: str
    position: int
    samples: list[dict] = field(default_factory=list)   # tar members per sample, "__key__" included
    entries: list[dict] = field(default_factory=list)   # per sample: what the loader needs to know
    metadata: dict | None = None
    skip: tuple[str, str] | None = None                 # (reason, detail) of a skipped episode
    instruction: str = ""
    # pre-encoding: uint8 windows [num_frames, 3, H, W] by start frame, and the episode's actions
    windows: list[tuple[int, np.ndarray]] = field(default_factory=list)
    actions: np.ndarray | None = None
    action_stats: dict | None = None  # vidartrain.data.shard_index.episode_action_statistics


class StrictStop(DataError):
    """--strict: the first bad episode ends the run."""


class ConversionFailed(DataError):
    """A split has no valid episode: its index.json says so and is not marked complete."""


def assign_splits(names: list[str], val_fraction: float, seed: int) -> dict[str, str]:
    """'train' or 'val' per episode: val iff its `split_draw` is below `val_fraction`.

    An episode's split depends only on its name, the seed and the fraction (not on the other episodes,
    nor on which turn out valid), so converting a grown dataset again never moves an episode between
    splits: a held-out episode never leaks into training. The share held out is `val_fraction` on
    average, not exactly; `check_split_sizes` refuses a draw that holds out none or all of several.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    return {name: "val" if split_draw(name, seed) < val_fraction else "train" for name in names}


def split_draw(name: str, seed: int) -> float:
    """The episode's seeded hash read as a number in [0, 1)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def check_split_sizes(inputs: dict, val_fraction: float, seed: int) -> None:
    """A non-zero --val-fraction over several episodes holds out at least one and trains on at least one.
    Checked on the conversion's assignment (a resumed or appended conversion keeps its recorded one), and
    refused rather than mended: moving an episode to the other split would undo `assign_splits`' rule."""
    names = [name for name, _, _ in inputs["episodes"]]
    held_out = sum(split == "val" for _, split, _ in inputs["episodes"])
    if val_fraction == 0 or len(names) < 2 or 0 < held_out < len(names):
        return
    draws = [split_draw(name, seed) for name in names]
    if held_out == 0:
        problem = f"holds out none of the {len(names)} episodes"
        hint = f"a --val-fraction of {math.floor(min(draws) * 1e4 + 1) / 1e4:.4f} or more holds out at least one"
    else:
        problem = f"holds out every one of the {len(names)} episodes"
        hint = f"a --val-fraction of {math.floor(max(draws) * 1e4) / 1e4:.4f} or less trains on at least one"
    raise ConfigError(f"--val-fraction {val_fraction} {problem} with --split-seed {seed} (an episode is held "
                      f"out when its seeded hash, a number in [0, 1), is below the fraction, so that a growing "
                      f"dataset never moves an episode between splits): {hint}, or try another --split-seed")


def raw_samples(episode: ValidEpisode) -> tuple[list[dict], list[dict]]:
    """One sample per episode: the video as stored plus its actions, instruction and metadata."""
    metadata = episode.metadata()
    sample = {"__key__": sample_key(episode.name), "mp4": episode.video,
              "actions.npy": actions_to_npy(episode.actions), "txt": episode.instruction.encode("utf-8"),
              "json": json.dumps(metadata, sort_keys=True).encode("utf-8")}
    return [sample], [{"key": sample["__key__"], "frames": episode.frames}]


def sample_key(name: str) -> str:
    # webdataset splits member names at the first dot, so a key must not contain one
    return name.replace(".", "_")


def check_sample_keys(names: list[str]) -> None:
    """Refuse episodes whose names differ only where `sample_key` changes them: they would share one key."""
    by_key: dict[str, list[str]] = {}
    for name in names:
        by_key.setdefault(sample_key(name), []).append(name)
    shared = [" and ".join(group) for group in by_key.values() if len(group) > 1]
    if shared:
        raise DataError(f"episodes {listed(shared)} would share one sample key (a key cannot hold a dot, which "
                        f"becomes '_'): rename one of each")


def convert_episode(task: tuple[Path, str, int, ConversionSettings]) -> EpisodeResult:
    """Validate one episode and build its samples (runs in a worker process)."""
    episodes_dir, name, position, settings = task
    try:
        episode = load_episode(episodes_dir, name, settings.layout)
    except EpisodeError as error:
        return EpisodeResult(name, position, skip=(error.reason, error.detail))
    if settings.precompute is None:
        samples, entries = raw_samples(episode)
        return EpisodeResult(name, position, samples, entries, episode.metadata(), instruction=episode.instruction,
                             action_stats=episode_action_statistics(episode.actions))
    window = WindowSettings(**{k: settings.precompute[k] for k in ("num_frames", "stride", "height", "width", "resize")})
    windows = episode_windows(episode.video, episode.video_fps, episode.fps, episode.frames, window)
    if not windows:
        return EpisodeResult(name, position, skip=("video_too_short", (
            f"{episode.frames} frames at {episode.fps} fps, a pre-encoded window needs {window.num_frames}")))
    return EpisodeResult(name, position, metadata=episode.metadata(), instruction=episode.instruction,
                         windows=windows, actions=episode.actions,
                         action_stats=episode_action_statistics(episode.actions))


def latent_samples(result: EpisodeResult, precomputer: Precomputer) -> tuple[list[dict], list[dict]]:
    """One sample per window: latents (+ IDM mask) as safetensors, the window's actions, metadata."""
    samples, entries = [], []
    key_of_text = text_key(result.instruction)
    for start, frames in result.windows:
        key = f"{sample_key(result.name)}_{start:06d}"
        metadata = {**result.metadata, "window_start": start, "frames": len(frames), "text_key": key_of_text}
        samples.append({"__key__": key,
                        "tensors.safetensors": safetensors.torch.save(precomputer.window_tensors(frames)),
                        "actions.npy": actions_to_npy(result.actions[start: start + len(frames)]),
                        "txt": result.instruction.encode("utf-8"),
                        "json": json.dumps(metadata, sort_keys=True).encode("utf-8")})
        entries.append({"key": key, "frames": len(frames), "window_start": start, "text_key": key_of_text})
    return samples, entries


def ordered_results(function: Callable, tasks: Iterable, workers: int) -> Iterator:
    """function(task) for every task, in task order, with at most 2 x workers results in flight."""
    if workers <= 1:
        yield from map(function, tasks)
        return
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=die_with_parent,
                               initargs=(os.getpid(),))
    pending: deque = deque()
    try:
        for task in tasks:
            pending.append(pool.submit(function, task))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def die_with_parent(parent: int) -> None:
    """Worker initializer: the worker ends when the converter does, however it ends (a pool's workers
    otherwise wait forever on a queue nobody writes to, and keep multiprocessing's resource tracker,
    which exits once they are gone, alive with them)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    else:  # no parent-death signal: watch the parent
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)
        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # the converter died before the signal was armed
        os._exit(1)


class ShardSequence:
    """Writes shard-000000.tar, shard-000001.tar, ... in one directory, one complete shard at a time."""

    def __init__(self, directory: Path, max_samples: int, max_bytes: int, next_number: int):
        self.directory, self.max_samples, self.max_bytes = directory, max_samples, max_bytes
        self.next_number = next_number
        self.stream = self.writer = None
        self.entries: list[dict] = []

    @property
    def name(self) -> str:
        return f"shard-{self.next_number:06d}.tar"

    @property
    def temporary(self) -> Path:
        return self.directory / f".{self.name}.tmp"

    def add(self, sample: dict, entry: dict) -> str:
        """Append a sample to the open shard (opening one if needed); returns the shard's name."""
        if self.writer is None:
            self.stream = open(self.temporary, "wb")
            # fixed owner and mtime: the tar bytes depend on the samples only
            self.writer = wds.TarWriter(self.stream, user="", group="", mtime=0, encoder=False)
        offset = self.writer.tarstream.offset
        self.writer.write(sample)
        self.entries.append({**entry, "offset": offset, "size": self.writer.tarstream.offset - offset})
        return self.name

    def full(self) -> bool:
        return self.writer is not None and (len(self.entries) >= self.max_samples
                                            or self.writer.tarstream.offset >= self.max_bytes)

    def close(self) -> dict | None:
        """Finish the open shard: fsync, checksum, rename to its final name; its index entry."""
        if self.writer is None:
            return None
        self.writer.close()
        self.stream.flush()
        os.fsync(self.stream.fileno())
        self.stream.close()
        final = self.directory / self.name
        shard = {"name": self.name, "samples": len(self.entries), "bytes": self.temporary.stat().st_size,
                 "sha256": file_sha256(self.temporary), "entries": self.entries}
        os.replace(self.temporary, final)
        self.next_number += 1
        self.stream = self.writer = None
        self.entries = []
        return shard

    def abandon(self) -> None:
        """Drop a half-written shard (interrupted or stopped run)."""
        if self.writer is not None:
            self.writer.close()
            self.stream.close()
            self.temporary.unlink(missing_ok=True)
            self.stream = self.writer = None
            self.entries = []


class Progress:
    """Done/total, episodes per second, ETA, skipped count on stderr: one line redrawn in place on a
    terminal (every 0.5 s); in a log file, one whole line per update (every 30 s) and at the end."""

    def __init__(self, label: str, total: int, every_s: float | None = None):
        self.label, self.total = label, total
        self.stream = sys.stderr
        self.terminal = self.stream.isatty()
        self.every_s = every_s if every_s is not None else 0.5 if self.terminal else 30.0
        self.start = self.last = time.monotonic()
        self.done = self.skipped = 0

    def update(self, skipped: bool) -> None:
        self.done += 1
        self.skipped += skipped
        now = time.monotonic()
        if now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            self.draw(now)

    def draw(self, now: float) -> None:
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta != float("inf") else "--:--:--"
        redraw = "\r" if self.terminal else ""
        self.stream.write(f"{redraw}[{self.label}] {self.done}/{self.total} episodes  {rate:6.2f} ep/s  "
                          f"ETA {eta_text}  skipped {self.skipped}")
        if self.done == self.total or not self.terminal:
            self.stream.write("\n")
        self.stream.flush()


def empty_index(split: str, settings: ConversionSettings, inputs: dict) -> dict:
    return {"format": INDEX_FORMAT, "complete": False, "split": split, "mode": settings.mode,
            "settings": settings.as_dict(), "episodes_dir": inputs["episodes_dir"], "inputs": inputs,
            "shards": [], "episodes": [], "skipped": [], "val": None, "text_embeddings": None, "actions": None}


def write_index(directory: Path, index: dict) -> None:
    text = json.dumps(index, indent=1, sort_keys=True)
    write_atomically(directory / INDEX_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def records_from_index(index: dict, split: str) -> list[dict]:
    """A finished index cut into per-shard records like the journal's (one pass over its entries)."""
    ends = [shard["episodes_end"] for shard in index["shards"]]
    records = [{"shard": shard, "episodes": [], "skipped": []} for shard in index["shards"]]
    entries = [("episodes", e) for e in index["episodes"]]
    entries += [("skipped", s) for s in index["skipped"] if s.get("split", split) == split]
    for kind, entry in entries:
        number = bisect.bisect_right(ends, entry["position"])  # first shard closed after this episode
        if number < len(records):
            records[number][kind].append(entry)
    for record in records:
        record["skipped"].sort(key=lambda skip: skip["position"])
    return records


def shard_intact(directory: Path, shard: dict) -> bool:
    file = directory / shard["name"]
    return file.is_file() and file.stat().st_size == shard["bytes"] and file_sha256(file) == shard["sha256"]


def resume_records(directory: Path, split: str, settings: ConversionSettings, overwrite: bool) -> list[dict]:
    """Records of the finished shards to continue from, read from the journal of an interrupted
    run or from the index of a finished one. The first shard that is missing or altered, and
    everything after it, is written again."""
    journal, index_path = Journal(directory / JOURNAL_FILE), directory / INDEX_FILE
    if overwrite:
        return []
    if journal.exists():
        header, records = journal.read()
        stored = header["settings"]
    elif index_path.exists():
        previous = read_json(index_path)
        stored, records = previous.get("settings"), records_from_index(previous, split)
    else:
        return []
    refuse_other_settings(directory, stored, settings)
    kept = []
    for record in records:
        if not shard_intact(directory, record["shard"]):
            print(f"{directory / record['shard']['name']} is missing or does not match its checksum: "
                  f"writing it again", file=sys.stderr)
            break
        kept.append(record)
    return kept


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: unreadable ({error}); use --overwrite or another --out") from error


def setting_differences(stored: dict, current: dict, prefix: str = "") -> list[str]:
    """'key: stored value in the folder, current value now' for every setting that differs."""
    differences = []
    for key in sorted(set(stored) | set(current)):
        old, new = stored.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            differences += setting_differences(old, new, f"{prefix}{key}.")
        elif old != new:
            differences.append(f"{prefix}{key}: {old!r} in the folder, {new!r} now")
    return differences


def refuse_other_settings(directory: Path, stored: dict | None, settings: ConversionSettings) -> None:
    differences = setting_differences(in_current_form(stored) or {}, settings.as_dict())
    if differences:
        raise DataError(f"{directory} holds shards made with other settings ({'; '.join(differences)}); use a "
                        f"new --out directory or --overwrite")


def input_record(episodes_dir: Path, names: list[str], splits: dict[str, str], layout: EpisodeLayout) -> dict:
    """What an output folder is made from: the episodes directory and, in conversion order, each
    episode's name, split and fingerprint (the sizes and modification times of the files it reads)."""
    return {"episodes_dir": str(episodes_dir.resolve()),
            "episodes": [[name, splits[name], files_fingerprint(episodes_dir / name, layout.files())]
                         for name in names]}


def stored_conversion(out: Path) -> dict | None:
    """Settings and input record of the conversion in `out` (the journal of an unfinished run first,
    else index.json); None for a folder that holds none."""
    journal, index_path = Journal(out / JOURNAL_FILE), out / INDEX_FILE
    if journal.exists():
        return journal.read()[0]
    if index_path.exists():
        index = read_json(index_path)
        return {"settings": index.get("settings"), "inputs": index.get("inputs")}
    return None


def bind_inputs(out: Path, settings: ConversionSettings, inputs: dict, append: bool) -> dict:
    """The input record this run converts: the folder's own for a rerun on the same episodes (which
    resumes; their order is the folder's), plus the new episodes for --append; `inputs` for a new
    folder. Anything else is refused, naming what differs: shards of other episodes or settings
    must not be mixed into a dataset."""
    stored = stored_conversion(out)
    if stored is None:
        return inputs
    refuse_other_settings(out, stored["settings"], settings)
    previous = stored.get("inputs")
    if previous is None:
        raise DataError(f"{out} holds shards without a record of the episodes they were made from (an older "
                        f"vidar-shard); use --overwrite or another --out")
    old = {name: fingerprint for name, _, fingerprint in previous["episodes"]}
    new = {name: fingerprint for name, _, fingerprint in inputs["episodes"]}
    added = [name for name in new if name not in old]
    problems = []
    if previous["episodes_dir"] != inputs["episodes_dir"]:
        problems.append(f"other episodes directory: {inputs['episodes_dir']} (the folder was made from "
                        f"{previous['episodes_dir']})")
    removed = [name for name in old if name not in new]
    if removed:
        problems.append(f"{len(removed)} episode(s) removed: {listed(removed)}")
    changed = [name for name in old if name in new and old[name] != new[name]]
    if changed:
        problems.append(f"{len(changed)} episode(s) changed (file size or modification time): {listed(changed)}")
    if not append and added:
        problems.append(f"{len(added)} episode(s) added: {listed(added)}")
    if problems:
        only_added = len(problems) == 1 and added and not append
        hint = ("use --append to convert them into new shards" if only_added
                else "use --overwrite to convert everything again, or another --out")
        raise DataError(f"{out} holds a conversion of other input:\n  " + "\n  ".join(problems) + f"\n{hint}")
    if not append:
        return previous
    if added:
        print(f"appending {len(added)} new episode(s) to {out}: {listed(added)}", file=sys.stderr)
    else:
        print(f"--append: no new episode in {inputs['episodes_dir']}", file=sys.stderr)
    return {**previous, "episodes": previous["episodes"] + [entry for entry in inputs["episodes"] if entry[0] in added]}


class OutputLock:
    """One converter per output folder: an exclusive flock on OUT/.vidar-shard.lock for the whole run.

    The kernel drops the lock when its holder dies, however it dies, so the lock of a killed
    converter is taken over (and said so) instead of blocking the folder for ever.
    """

    def __init__(self, out: Path):
        self.path = out / LOCK_FILE
        self.stream = None

    def __enter__(self) -> "OutputLock":
        while True:
            stream = open(self.path, "a+", encoding="utf-8")
            try:
                fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self.holder(stream)
                stream.close()
                raise DataError(f"{self.path.parent}: another vidar-shard ({holder or 'unknown process'}) is "
                                f"writing to this folder; wait for it to finish or use another --out")
            if self.still_the_lock_file(stream):
                break
            stream.close()  # its holder removed the file while we waited for the lock: lock the new one
        previous = self.holder(stream)
        if previous:
            print(f"{self.path.parent}: the vidar-shard that held this folder ({previous}) is no longer running; "
                  f"taking over its lock", file=sys.stderr)
        stream.seek(0)
        stream.truncate()
        stream.write(f"pid {os.getpid()} on {socket.gethostname()}, started "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
        stream.flush()
        self.stream = stream
        return self

    def __exit__(self, *exc_info) -> None:
        self.path.unlink(missing_ok=True)  # while still holding the lock, so nobody is locking this file
        self.stream.close()

    def still_the_lock_file(self, stream) -> bool:
        try:
            return os.fstat(stream.fileno()).st_ino == self.path.stat().st_ino
        except FileNotFoundError:
            return False

    @staticmethod
    def holder(stream) -> str:
        stream.seek(0)
        return stream.read().strip()


def convert_split(split: str, directory: Path, episodes_dir: Path, inputs: dict, settings: ConversionSettings,
                  workers: int, strict: bool, overwrite: bool, precomputer: Precomputer | None) -> dict:
    """Write one split's shards and index.json into `directory`: complete, or marked failed when no
    episode of the split is valid."""
    names = [name for name, episode_split, _ in inputs["episodes"] if episode_split == split]
    directory.mkdir(parents=True, exist_ok=True)
    kept = resume_records(directory, split, settings, overwrite)
    journal = Journal(directory / JOURNAL_FILE)
    journal.start({"settings": settings.as_dict(), "inputs": inputs}, kept)
    index = empty_index(split, settings, inputs)
    for record in kept:
        index["shards"].append(record["shard"])
        index["episodes"] += record["episodes"]
        index["skipped"] += record["skipped"]
    start = index["shards"][-1]["episodes_end"] if index["shards"] else 0
    shards = ShardSequence(directory, settings.max_samples, settings.max_bytes, len(index["shards"]))
    progress = Progress(split, len(names) - start)
    tasks = ((episodes_dir, name, position, settings) for position, name in enumerate(names) if position >= start)
    if start:
        print(f"[{split}] resuming after {len(index['shards'])} finished shard(s), at episode {start}",
              file=sys.stderr)
    pending: dict[str, list] = {"episodes": [], "skipped": []}  # since the last finished shard

    def finish_shard(episodes_end: int) -> None:
        shard = shards.close()
        if shard is not None:
            record = {"shard": {**shard, "episodes_end": episodes_end}, **pending}
            index["shards"].append(record["shard"])
            index["episodes"] += record["episodes"]
            index["skipped"] += record["skipped"]
            journal.append(record)
            pending["episodes"], pending["skipped"] = [], []

    try:
        for result in ordered_results(convert_episode, tasks, workers):
            progress.update(skipped=result.skip is not None)
            if result.skip is not None:
                reason, detail = result.skip
                pending["skipped"].append({"episode": result.name, "position": result.position, "split": split,
                                           "reason": reason, "detail": detail})
                if strict:
                    raise StrictStop(f"--strict: episode {result.name}: {reason}: {detail}")
                continue
            samples, entries = ((result.samples, result.entries) if precomputer is None
                                else latent_samples(result, precomputer))
            used = [shards.add(sample, entry) for sample, entry in zip(samples, entries)]
            pending["episodes"].append({**result.metadata, "position": result.position, "split": split,
                                        "instruction": result.instruction, "samples": len(used),
                                        "shards": sorted(set(used)), "action_stats": result.action_stats})
            if shards.full():
                finish_shard(result.position + 1)
        finish_shard(len(names))
    finally:
        shards.abandon()
    index["episodes"] += pending["episodes"]
    index["skipped"] += pending["skipped"]
    remove_stale_shards(directory, {shard["name"] for shard in index["shards"]})
    if index["episodes"] and precomputer is not None and "text" in precomputer.what:
        write_text_embeddings(directory, index, precomputer)
    parts = [episode.get("action_stats") for episode in index["episodes"]]
    if parts and None not in parts:  # (episodes appended to a folder converted before statistics existed: none)
        index["actions"] = merge_action_statistics(parts, f"{directory} ({split} split)")
    if not index["episodes"]:
        index["failed"] = f"no valid episode in the {split} split ({describe_skips(index['skipped'])})"
    index["complete"] = bool(index["episodes"])
    write_index(directory, index)
    journal.remove()
    return index


def describe_skips(skipped: list[dict]) -> str:
    """Why a split holds no valid episode: the count of each reason and the first episode's detail
    (all skipped alike, e.g. actions of another width than --action-dim, it says what to change)."""
    if not skipped:
        return "no input episode is assigned to it"
    reasons = Counter(skip["reason"] for skip in skipped)
    first = min(skipped, key=lambda skip: skip["position"])
    counts = ", ".join(f"{reason} {count}" for reason, count in sorted(reasons.items()))
    return f"all {len(skipped)} skipped: {counts}; first {first['episode']}: {first['detail']}"


def write_text_embeddings(directory: Path, index: dict, precomputer: Precomputer) -> None:
    """One embedding per distinct instruction of the split, keyed by text_key, plus the null prompt
    (the embedding of "" that replaces a caption dropped for classifier-free guidance, as in raw mode)."""
    texts = {text_key(e["instruction"]): e["instruction"] for e in index["episodes"]}
    texts[text_key(NULL_PROMPT)] = NULL_PROMPT
    embeddings = precomputer.text_embeddings(texts)
    write_atomically(directory / TEXT_EMBEDDINGS_FILE, lambda tmp: safetensors.torch.save_file(embeddings, tmp))
    index["text_embeddings"] = TEXT_EMBEDDINGS_FILE
    index["null_text_key"] = text_key(NULL_PROMPT)


def remove_stale_shards(directory: Path, keep: set[str]) -> None:
    """Shards left by an earlier, longer run (e.g. before --overwrite) are not part of this dataset."""
    for file in directory.glob("shard-*.tar"):
        if file.name not in keep:
            file.unlink()


def convert(episodes_dir: Path, out: Path, settings: ConversionSettings, workers: int = 1, strict: bool = False,
            overwrite: bool = False, manifest: Path | None = None, precomputer: Precomputer | None = None,
            append: bool = False) -> dict:
    """Convert every episode; returns the top-level index (train split, every skipped episode).

    `out` is bound to its input (episodes directory, each episode's files, settings): a rerun on the
    same input resumes, `append` converts only episodes added since into new shards, anything else
    is refused. Pre-encoded shards (settings.precompute) need a `precomputer` holding the frozen models.
    Raises ConversionFailed (after writing an index.json marked failed) when a split has no valid episode.
    """
    if (settings.precompute is None) != (precomputer is None):
        raise ValueError("settings.precompute and precomputer go together: give both or neither")
    if overwrite and append:
        raise ConfigError("--overwrite and --append exclude each other")
    if not episodes_dir.is_dir():
        raise DataError(f"--episodes {episodes_dir} is not a directory")
    names = discover_episodes(episodes_dir, manifest)
    if not names:
        raise DataError(f"no episode folders found in {episodes_dir}")
    check_sample_keys(names)
    make_directory(out, "--out")
    with OutputLock(out):
        if overwrite:
            for stale in [*out.glob("shard-*.tar"), out / INDEX_FILE, out / JOURNAL_FILE]:
                stale.unlink(missing_ok=True)
            shutil.rmtree(out / VAL_DIR, ignore_errors=True)
        splits = assign_splits(names, settings.val_fraction, settings.split_seed)
        inputs = bind_inputs(out, settings, input_record(episodes_dir, names, splits, settings.layout), append)
        check_split_sizes(inputs, settings.val_fraction, settings.split_seed)
        return convert_bound(out, episodes_dir, inputs, settings, workers, strict, overwrite, precomputer)


def convert_bound(out: Path, episodes_dir: Path, inputs: dict, settings: ConversionSettings, workers: int,
                  strict: bool, overwrite: bool, precomputer: Precomputer | None) -> dict:
    """Both splits of the episodes in `inputs`; the top-level index.json is complete once both are."""
    train = convert_split("train", out, episodes_dir, inputs, settings, workers, strict, overwrite, precomputer)
    failed = [train["failed"]] if "failed" in train else []
    val_episodes = 0
    if any(split == "val" for _, split, _ in inputs["episodes"]):
        # the dataset is complete once its validation split is
        train["complete"] = False
        write_index(out, train)
        val = convert_split("val", out / VAL_DIR, episodes_dir, inputs, settings, workers, strict, overwrite,
                            precomputer)
        train["val"] = VAL_DIR
        train["skipped"] = train["skipped"] + val["skipped"]
        val_episodes = len(val["episodes"])
        failed += [val["failed"]] if "failed" in val else []
    train["totals"] = {"input_episodes": len(inputs["episodes"]), "train_episodes": len(train["episodes"]),
                       "val_episodes": val_episodes, "skipped": len(train["skipped"])}
    train["complete"] = not failed
    if failed:
        train["failed"] = "; ".join(failed)
    write_index(out, train)
    if failed:
        raise ConversionFailed(f"{out}: {train['failed']}; index.json lists every skipped episode with its reason")
    return train


def summary(index: dict) -> str:
    reasons = Counter(skip["reason"] for skip in index["skipped"])
    skipped = ", ".join(f"{reason} {count}" for reason, count in sorted(reasons.items())) or "none"
    samples = sum(shard["samples"] for shard in index["shards"])
    totals = index["totals"]
    lines = [f"{totals['train_episodes']} train episodes ({samples} samples in {len(index['shards'])} shards), "
             f"{totals['val_episodes']} val episodes; skipped: {skipped}"]
    lines += [f"  skipped {skip['episode']} ({skip['split']}): {skip['reason']}: {skip['detail']}"
              for skip in index["skipped"]]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vidar-shard", description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=Path, required=True, help="directory of episode folders")
    parser.add_argument("--out", type=Path, required=True, help="output directory for shards and index.json")
    parser.add_argument("--manifest", type=Path, default=None,
                        help="JSON list of episodes (default: EPISODES/manifest.json if present, else every "
                             "folder that is not hidden)")
    parser.add_argument("--samples-per-shard", type=int, default=1000,
                        help="close a shard once it holds this many samples (an episode's windows stay in one shard)")
    parser.add_argument("--bytes-per-shard", type=int, default=1 << 30,
                        help="close a shard once it reaches this many bytes (default 1 GiB)")
    parser.add_argument("--workers", type=int, default=1, help="processes validating and encoding episodes")
    parser.add_argument("--val-fraction", type=float, default=0.0,
                        help="share of episodes held out for validation, in OUT/val/: an episode is held out "
                             "when its name's seeded hash, in [0, 1), is below it")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the train/val assignment")
    parser.add_argument("--video", choices=("keep", "reencode"), default="keep",
                        help="store the mp4 as is, or re-encode it (H.264, --qp). Videos at another frame "
                             "rate than --fps, and composed cameras, are always re-encoded")
    parser.add_argument("--qp", type=int, default=20, help="x264 constant quantiser when re-encoding (default 20)")
    parser.add_argument("--fps", type=int, default=10, help="frame rate of the stored timeline (default 10)")
    parser.add_argument("--action-dim", type=int, default=14, help="columns of actions.npy (default 14)")
    parser.add_argument("--cameras", default=None,
                        help="compose the observation from three videos: HEAD,LEFT_WRIST,RIGHT_WRIST file "
                             "names inside each episode (e.g. head.mp4,left_wrist.mp4,right_wrist.mp4)")
    parser.add_argument("--precompute", default=None,
                        help=f"pre-encode for training without VAE/T5/IDM: comma list of {','.join(PRECOMPUTABLE)} "
                             f"(latents required); needs --ckpt-dir (and --idm for idm)")
    parser.add_argument("--ckpt-dir", type=Path, default=None, help="Wan2.2-TI2V-5B directory (VAE, umT5, tokenizer)")
    parser.add_argument("--idm", type=Path, default=None, help="idm.pt for --precompute idm")
    parser.add_argument("--num-frames", type=int, default=WindowSettings.num_frames,
                        help="frames per pre-encoded window (1 + 4n)")
    parser.add_argument("--stride", type=int, default=WindowSettings.stride, help="frames between pre-encoded window starts")
    parser.add_argument("--height", type=int, default=WindowSettings.height,
                        help="pre-encoded frame height (multiple of 32)")
    parser.add_argument("--width", type=int, default=WindowSettings.width,
                        help="pre-encoded frame width (multiple of 32)")
    parser.add_argument("--resize", choices=RESIZE_MODES, default="crop",
                        help="pre-encoded frames of another aspect ratio: crop the centre (default), pad, or "
                             "stretch; use the training config's data.resize")
    parser.add_argument("--latent-dtype", choices=sorted(DTYPES), default="bfloat16", help="stored tensor dtype")
    parser.add_argument("--device", default="cpu", help="device of the frozen models (e.g. cuda)")
    parser.add_argument("--vae-config", type=json.loads, default=None,
                        help="JSON WanVAE constructor overrides (tiny debug checkpoints)")
    parser.add_argument("--t5-config", type=json.loads, default=None,
                        help="JSON UMT5Encoder constructor overrides (tiny debug checkpoints)")
    parser.add_argument("--strict", action="store_true", help="stop with an error at the first bad episode")
    parser.add_argument("--overwrite", action="store_true", help="discard shards already in --out")
    parser.add_argument("--append", action="store_true",
                        help="convert the episodes added to --episodes since --out was made into new shards "
                             "(same settings; existing shards are kept as they are)")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> ConversionSettings:
    cameras = None
    if args.cameras:
        cameras = tuple(part.strip() for part in args.cameras.split(","))
        if len(cameras) != 3 or not all(cameras):
            raise ConfigError(f"--cameras expects three comma-separated file names, got {args.cameras!r}")
    if args.samples_per_shard < 1 or args.bytes_per_shard < 1:
        raise ConfigError("--samples-per-shard and --bytes-per-shard must be positive")
    layout = EpisodeLayout(cameras=cameras, action_dim=args.action_dim, fps=args.fps,
                           reencode=args.video == "reencode", qp=args.qp)
    precompute = None
    if args.precompute:
        what = parse_precompute(args.precompute)
        window = WindowSettings(args.num_frames, args.stride, args.height, args.width, args.resize)
        window.check()
        if args.ckpt_dir is None or ("idm" in what and args.idm is None):
            raise ConfigError("--precompute needs --ckpt-dir, and --idm when it includes idm")
        precompute = settings_record(what, window, args.ckpt_dir, args.idm, args.latent_dtype, args.vae_config,
                                     args.t5_config)
    return ConversionSettings(layout=layout, max_samples=args.samples_per_shard, max_bytes=args.bytes_per_shard,
                              val_fraction=args.val_fraction, split_seed=args.split_seed, precompute=precompute)


def precomputer_from_settings(settings: ConversionSettings, device: str) -> Precomputer | None:
    record = settings.precompute
    if record is None:
        return None
    return Precomputer.from_checkpoints(tuple(record["precompute"]), Path(record["ckpt_dir"]),
                                        Path(record["idm"]) if record["idm"] else None, device,
                                        record["latent_dtype"], record["vae_config"], record["t5_config"])


@reports_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_from_args(args)
    index = convert(args.episodes, args.out, settings, args.workers, args.strict, args.overwrite, args.manifest,
                    precomputer_from_settings(settings, args.device), args.append)
    print(summary(index), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
