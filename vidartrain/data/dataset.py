"""Deterministic, resumable streaming of WebDataset shards made by `vidar-shard`.

Order. Each epoch has one global order of all samples: a permutation seeded by (seed, epoch) of the
samples listed in index.json. Every rank takes an interleaved slice of what remains of that order
(rank r: positions r, r + W, r + 2W, ...; training: equal counts, the few left over are dropped;
an evaluation reads every sample, the first ranks one more), cuts its slice into micro-batches, and
hands batch c of the run to DataLoader worker c mod num_workers, which is the order in which torch's
DataLoader collects them. So the batch rank r gets at step s is a function of (seed, s, r, world size)
alone, and resuming is moving the start of the slice: a resumed run yields exactly the batches the
uninterrupted run would have yielded next.

Reading. Index.json records where each sample's tar members sit inside its shard; a worker reads
just its samples (one ranged read each) and expands them with webdataset's tar stages. Per-sample
randomness (clip window, text dropout) is seeded by (seed, epoch, sample key), so it does not
depend on which worker decodes the sample.

Bad samples. A sample that fails to read or decode (corrupt video, non-UTF-8 instruction, missing
or truncated shard) is logged with its shard and key, counted, and replaced in its batch by a
substitute drawn with (seed, epoch, its key): batches keep their size, and the same bad sample gives
the same batch on a resumed run. `ShardLoader.skipped_samples` counts them; the trainer stops a
run with a checkpoint once more than `max_bad_samples` failed over all ranks (a loader stops by
itself, with BadSampleLimitError, only when the bad samples of one batch pass the limit: every
sample bad). Shards missing or of another size than index.json says are refused at start, and so are
too few samples to give every rank one batch.

Pre-encoded shards (index.json mode "latents") hold VAE latents, the pooled IDM mask and a
reference to the instruction's umT5 embedding: they are read as tensors, with no video decoding and
no model anywhere on the training side.

Mixtures. Several shard directories with weights (`data.shards: [{path, weight}, ...]`) are read
as one dataset whose epoch has as many samples as all sources together; source i fills
round(weight_i / sum of weights x epoch length) of its positions (largest remainders), in an order
seeded by (seed, epoch), with its own samples taken from its own endless stream of seeded
permutations. The epoch's order is again a function of (seed, epoch) alone, so ranks, workers and
resuming follow the rules above unchanged. Two sources may hold samples of the same key (both have
an `ep_0000`): in a mixture a sample's key starts with its source's place in the list ("1:ep_0000"),
so the keys of a batch stay unique and the per-sample draws seeded by them are independent; a single
directory's keys are its own.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import signal
import tarfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import safetensors
import safetensors.torch
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from vidartrain.data.shard_index import INDEX_FILE, check_same_kind, check_shard_files, read_index, shard_sources
from vidartrain.data.transforms import resample_indices, video_to_model_input, window_start
from vidartrain.data.video import VideoReadError, open_video, read_frames
from vidartrain.errors import ConfigError, DataError
from vidartrain.shapes import CLIP_HEIGHT, CLIP_NUM_FRAMES, CLIP_WIDTH

MODES = ("clips", "frames")
LIST_FIELDS = ("__key__", "text", "text_emb")  # kept as lists in a batch (strings, variable lengths)
# A caption dropped for classifier-free guidance becomes the empty prompt: the model sees umT5's
# embedding of it, encoded online (raw shards) or once per pre-encoded dataset (index "null_text_key").
NULL_PROMPT = ""
SKIPPED_FIELD = "__skipped__"  # bad samples of a batch, from the worker to ShardLoader (removed there)
# What a sample's bytes can raise when they are damaged: unreadable or truncated shard (OSError), bad
# tar headers, a video decord cannot read, text that is not UTF-8, a malformed .npy / json (ValueError),
# missing members (KeyError), malformed safetensors.
SAMPLE_ERRORS = (OSError, EOFError, tarfile.TarError, VideoReadError, UnicodeDecodeError, ValueError, KeyError,
                 safetensors.SafetensorError)

log = logging.getLogger(__name__)


class BadSampleLimitError(RuntimeError):
    """More samples failed to decode than `max_bad_samples` allows."""


@dataclass(frozen=True)
class SampleRef:
    """Where one sample's tar members are: shard file, byte offset and size."""

    shard: str
    offset: int
    size: int
    key: str
    frames: int  # on the dataset's timeline (index.json settings fps)
    source: int = 0  # which shard directory of a mixture
    key_prefix: str = ""  # a mixture's: the source (`source_key_prefix`)

    @property
    def name(self) -> str:
        """The sample's key in batches and in its per-sample seeds: unique across a mixture's sources."""
        return self.key_prefix + self.key


def source_key_prefix(source: int, num_sources: int) -> str:
    """What goes before the keys of source `source`'s samples: its place in a mixture ("1:"), as two
    sources may hold samples of the same key; nothing for one directory, whose keys are its own."""
    return f"{source}:" if num_sources > 1 else ""


@dataclass(frozen=True)
class ClipSpec:
    """What a training sample looks like once decoded."""

    num_frames: int = CLIP_NUM_FRAMES
    height: int = CLIP_HEIGHT
    width: int = CLIP_WIDTH
    fps: int = 10
    cfg_prob: float = 0.1
    mode: str = "clips"          # "clips": video clips; "frames": single (frame, action) pairs for the IDM
    frames_per_sample: int = 1   # "frames" mode: pairs drawn from each episode
    video_dtype: torch.dtype = torch.float32  # or torch.uint8: the consumer maps to [-1, 1] on its device
    resize: str = "crop"         # frames of another aspect ratio: transforms.resize_frames mode
    actions: bool = True         # "clips" mode: each clip carries its actions (the DiT stages train without)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.video_dtype not in (torch.float32, torch.uint8):
            raise ValueError(f"video dtype must be torch.float32 or torch.uint8, got {self.video_dtype}")


def check_pre_encoded_matches(index: dict, shards_dir: str | Path, spec: ClipSpec) -> None:
    """Pre-encoded windows have a fixed length, size and frame rate (the shards' timeline; raw video is
    resampled to data.fps, latents cannot be): the data config must ask for exactly those."""
    stored = {**index["settings"]["precompute"], "fps": index["settings"]["layout"]["fps"]}
    if spec.mode != "clips":
        raise ConfigError(f"{shards_dir}: pre-encoded shards hold latents, not frames; IDM frame pairs need "
                          f"raw video shards")
    wanted = {"num_frames": spec.num_frames, "height": spec.height, "width": spec.width, "resize": spec.resize,
              "fps": spec.fps}
    # shards pre-encoded before the resize setting existed were stretched
    differ = {name: (value, stored.get(name, "stretch")) for name, value in wanted.items()
              if stored.get(name, "stretch") != value}
    if differ:
        described = ", ".join(f"{name} {asked} (shards: {have})" for name, (asked, have) in differ.items())
        raise ConfigError(f"{Path(shards_dir) / 'index.json'}: the data config asks for {described}; "
                          f"pre-encode again or change the config")


def sample_refs(index: dict, shards_dir: str | Path, spec: ClipSpec, source: int = 0, key_prefix: str = ""
                ) -> tuple[list[SampleRef], list[str]]:
    """Samples of a shard directory (source `source` of a mixture, its keys prefixed by `key_prefix`)
    long enough for `spec`, and the keys of those that are not."""
    if index["mode"] == "latents":
        check_pre_encoded_matches(index, shards_dir, spec)
    dataset_fps = index["settings"]["layout"]["fps"]
    needed = spec.num_frames if spec.mode == "clips" and index["mode"] == "raw" else 1
    refs, too_short = [], []
    for shard in index["shards"]:
        path = str(Path(shards_dir) / shard["name"])
        for entry in shard["entries"]:
            if len(resample_indices(entry["frames"], dataset_fps, spec.fps)) < needed:
                too_short.append(entry["key"])
            else:
                refs.append(SampleRef(path, entry["offset"], entry["size"], entry["key"], entry["frames"], source,
                                      key_prefix))
    return refs, too_short


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(num_samples)
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


class Mixture:
    """The epoch orders of several sources drawn with weights (see the module docstring). Indices
    are global: source i's samples are offsets[i] .. offsets[i] + sizes[i] - 1."""

    def __init__(self, sizes: list[int], weights: list[float]):
        self.sizes, self.weights = list(sizes), list(weights)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.epoch_length = int(sum(sizes))
        self.draws = largest_remainder_counts(self.epoch_length, weights)

    def order(self, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
        if len(self.sizes) == 1:
            return epoch_order(self.sizes[0], seed, epoch, shuffle)
        pattern = np.repeat(np.arange(len(self.sizes)), self.draws)
        if shuffle:
            pattern = np.random.default_rng([seed, epoch, len(self.sizes)]).permutation(pattern)
        order = np.empty(self.epoch_length, dtype=np.int64)
        for source, draws in enumerate(self.draws):
            first = epoch * draws  # this source's position in its own stream
            local = self.source_stream(seed, source, first, first + draws, shuffle)
            order[pattern == source] = self.offsets[source] + local
        return order

    def source_stream(self, seed: int, source: int, start: int, stop: int, shuffle: bool) -> np.ndarray:
        """Samples start..stop-1 of a source's endless stream: permutation after permutation."""
        size = self.sizes[source]
        cycles = range(start // size, (stop - 1) // size + 1) if stop > start else range(0)
        stream = np.concatenate([np.random.default_rng([seed, source, cycle, 0]).permutation(size)
                                 if shuffle else np.arange(size) for cycle in cycles] or [np.zeros(0, np.int64)])
        begin = start - cycles.start * size if cycles else 0
        return stream[begin: begin + stop - start]

    def source_of(self, indices: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.offsets, indices, side="right") - 1


def largest_remainder_counts(total: int, weights: list[float]) -> list[int]:
    """Integers summing to `total` in the proportions of `weights` (largest remainder method)."""
    exact = np.asarray(weights, dtype=np.float64) / sum(weights) * total
    counts = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - counts), kind="stable")[: total - int(counts.sum())]:
        counts[i] += 1
    return counts.tolist()


def rank_slice(order: np.ndarray, consumed: int, rank: int, world_size: int, equal: bool = True) -> np.ndarray:
    """Rank's share of what remains of the epoch's order after `consumed` samples (all ranks together).
    `equal`: as many on every rank, the few left over dropped (training ranks step together); else the
    first ranks take one more, and every sample is read once (an evaluation)."""
    remaining = order[consumed:]
    share = remaining[rank::world_size]
    return share[:len(remaining) // world_size] if equal else share


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    digest = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([seed, epoch, digest])


def read_sample_bytes(refs: list[SampleRef]) -> Iterator[dict]:
    """webdataset source stage: one in-memory tar stream per sample, read with a single ranged read."""
    for ref in refs:
        with open(ref.shard, "rb") as stream:
            stream.seek(ref.offset)
            data = stream.read(ref.size)
        if len(data) != ref.size:
            raise OSError(f"{ref.shard}: sample {ref.key} should span bytes {ref.offset}..{ref.offset + ref.size}, "
                          f"the file ends first (shard truncated? run vidar-inspect)")
        yield {"url": f"{ref.shard}@{ref.offset}", "stream": io.BytesIO(data)}


def require_members(sample: dict, names: tuple[str, ...]) -> None:
    missing = [name for name in names if name not in sample]
    if missing:
        raise KeyError(f"sample {sample.get('__key__')} from {sample.get('__url__')} lacks members {missing}")


class SampleDecoder:
    """Raw sample (mp4, actions.npy, txt, json) -> tensors, with seeded window and text dropout."""

    def __init__(self, spec: ClipSpec, seed: int, dataset_fps: int):
        self.spec, self.seed, self.dataset_fps = spec, seed, dataset_fps

    def timelines(self, sample: dict) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
        """(video reader, actions, stored-frame index per dataset tick, dataset tick per loader tick)."""
        require_members(sample, ("mp4", "actions.npy", "txt", "json"))
        meta = json.loads(sample["json"])
        actions = np.load(io.BytesIO(sample["actions.npy"]), allow_pickle=False)
        reader = open_video(sample["mp4"])
        video_map = resample_indices(len(reader), meta["video_fps"], self.dataset_fps)[: meta["frames"]]
        length = min(len(video_map), len(actions))
        return reader, actions, video_map, resample_indices(length, self.dataset_fps, self.spec.fps)

    def clip(self, sample: dict, epoch: int) -> dict:
        spec = self.spec
        reader, actions, video_map, ticks = self.timelines(sample)
        rng = sample_rng(self.seed, epoch, sample["__key__"])
        start = window_start(rng, len(ticks), spec.num_frames)
        chosen = ticks[start: start + spec.num_frames]
        dropped = bool(rng.random() < spec.cfg_prob)
        text = sample["txt"].decode("utf-8")
        item = {"__key__": sample["__key__"],
                "video": video_to_model_input(read_frames(reader, video_map[chosen]), spec.height, spec.width,
                                              spec.video_dtype, spec.resize),
                "text": NULL_PROMPT if dropped else text, "text_dropped": dropped}
        if spec.actions:
            item["actions"] = torch.from_numpy(actions[chosen].astype(np.float32))
        return item

    def frame_pairs(self, sample: dict, epoch: int) -> list[dict]:
        reader, actions, video_map, ticks = self.timelines(sample)
        rng = sample_rng(self.seed, epoch, sample["__key__"])
        chosen = np.sort(rng.choice(len(ticks), size=self.spec.frames_per_sample,
                                    replace=len(ticks) < self.spec.frames_per_sample))
        frames = video_to_model_input(read_frames(reader, video_map[ticks[chosen]]), self.spec.height,
                                      self.spec.width, self.spec.video_dtype, self.spec.resize)  # [3, n, H, W]
        return [{"__key__": f"{sample['__key__']}/{int(ticks[i])}", "frame": frames[:, n],
                 "action": torch.from_numpy(actions[ticks[i]].astype(np.float32))}
                for n, i in enumerate(chosen)]


class PreEncodedDecoder:
    """Pre-encoded sample (tensors.safetensors, actions.npy, txt, json) -> tensors; text dropout as in raw mode.

    The instruction embeddings file is opened lazily in each worker and read one key at a time.
    """

    def __init__(self, spec: ClipSpec, seed: int, text_embeddings: Path | None, null_text_key: str | None = None):
        self.spec, self.seed, self.text_embeddings = spec, seed, text_embeddings
        self.null_text_key = null_text_key  # the umT5 embedding of NULL_PROMPT, for dropped captions
        self.embeddings_file = None

    def embedding(self, key: str) -> torch.Tensor:
        if self.embeddings_file is None:
            self.embeddings_file = safetensors.safe_open(str(self.text_embeddings), framework="pt")
        return self.embeddings_file.get_tensor(key)

    def clip(self, sample: dict, epoch: int) -> dict:
        require_members(sample, ("tensors.safetensors", "actions.npy", "txt", "json"))
        tensors = safetensors.torch.load(sample["tensors.safetensors"])
        meta = json.loads(sample["json"])
        rng = sample_rng(self.seed, epoch, sample["__key__"])
        dropped = bool(rng.random() < self.spec.cfg_prob)
        text = sample["txt"].decode("utf-8")
        item = {"__key__": sample["__key__"], "latents": tensors["latents"],
                "text": NULL_PROMPT if dropped else text, "text_dropped": dropped}
        if self.spec.actions:
            item["actions"] = torch.from_numpy(np.load(io.BytesIO(sample["actions.npy"]),
                                                       allow_pickle=False).astype(np.float32))
        if "idm_mask" in tensors:
            item["idm_mask"] = tensors["idm_mask"]
        if self.text_embeddings is not None:
            item["text_emb"] = self.embedding(self.null_text_key if dropped else meta["text_key"])
        return item


def collate(samples: list[dict]) -> dict:
    """torch's default collation (in a worker it stacks straight into shared memory, saving a copy of
    every video on its way to the main process); strings and variable-length embeddings stay lists."""
    lists = {name: [sample[name] for sample in samples] for name in LIST_FIELDS if name in samples[0]}
    stacked = default_collate([{k: v for k, v in sample.items() if k not in LIST_FIELDS} for sample in samples])
    return {**stacked, **lists}


class ShardStream(IterableDataset):
    """Batches for one rank, from position (start_epoch, start_consumed) on; see the module docstring."""

    def __init__(self, refs: list[SampleRef], spec: ClipSpec, decoders: list[SampleDecoder | PreEncodedDecoder],
                 micro_batch_size: int, seed: int, rank: int, world_size: int, shuffle: bool, drop_last: bool,
                 epochs: int | None, max_bad_samples: int = 0, mixture: Mixture | None = None):
        if spec.mode == "frames" and micro_batch_size % spec.frames_per_sample:
            raise ValueError(f"micro_batch_size {micro_batch_size} must be a multiple of frames_per_sample "
                             f"{spec.frames_per_sample} (each episode gives that many pairs to one batch)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.refs, self.spec, self.seed, self.decoders = refs, spec, seed, decoders  # one decoder per source
        self.mixture = mixture or Mixture([len(refs)], [1.0])
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.drop_last, self.epochs = shuffle, drop_last, epochs
        self.max_bad_samples = max_bad_samples
        # frames mode: each sample gives frames_per_sample pairs to the same batch
        pairs = spec.frames_per_sample if spec.mode == "frames" else 1
        self.samples_per_batch = micro_batch_size // pairs
        self.start_epoch, self.start_consumed = 0, 0
        self.check_fills_one_batch()

    def batches_in_epoch(self, epoch: int, consumed: int) -> list[np.ndarray]:
        """Sample indices of each of this rank's remaining batches in the epoch."""
        positions = rank_slice(self.mixture.order(self.seed, epoch, self.shuffle), consumed,
                               self.rank, self.world_size, equal=self.drop_last)
        cut = range(0, len(positions), self.samples_per_batch)
        batches = [positions[i: i + self.samples_per_batch] for i in cut]
        if self.drop_last and batches and len(batches[-1]) < self.samples_per_batch:
            batches.pop()
        return batches

    def check_fills_one_batch(self) -> None:
        """Refuse a dataset whose epoch cannot give this rank one batch (every epoch is as long), when the
        loader is built: on many ranks a small dataset would otherwise fail at the first step, after the
        model and the engine were built on every GPU."""
        if not self.batches_in_epoch(0, 0):
            raise DataError(f"{self.mixture.epoch_length} samples cannot fill one batch of {self.samples_per_batch} "
                            f"on each of {self.world_size} ranks ({self.samples_per_batch * self.world_size} samples "
                            f"per micro-step over the data-parallel ranks): add episodes, or train on fewer ranks "
                            f"or with a smaller micro-batch")

    def schedule(self) -> Iterator[tuple[int, np.ndarray]]:
        """(epoch, sample indices) of every batch from the start position on, in the order they are yielded."""
        epoch, consumed = self.start_epoch, self.start_consumed
        while self.epochs is None or epoch < self.epochs:
            batches = self.batches_in_epoch(epoch, consumed)
            for batch in batches:
                yield epoch, batch
            epoch, consumed = epoch + 1, 0

    def worker_batches(self) -> Iterator[tuple[int, np.ndarray]]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for count, item in enumerate(self.schedule()):
            if count % num_workers == worker_id:
                yield item

    def __iter__(self) -> Iterator[dict]:
        for epoch, batch in self.worker_batches():
            samples, skipped = [], []
            for index in batch:
                samples += self.decode_or_substitute(self.refs[index], epoch, skipped)
            yield {**collate(samples), SKIPPED_FIELD: skipped}

    def decode_or_substitute(self, ref: SampleRef, epoch: int, skipped: list[dict]) -> list[dict]:
        """`ref` decoded; if it fails, it is added to `skipped` and the next sample of an order seeded by
        (seed, epoch, its key) takes its place (and so on, if that one fails too)."""
        substitutes = None
        tried = {ref.name}
        while True:
            try:
                return self.decode(self.read(ref), epoch, ref.source)
            except SAMPLE_ERRORS as error:
                skipped.append({"key": ref.key, "shard": ref.shard, "error": f"{type(error).__name__}: {error}"})
                if len(skipped) > self.max_bad_samples:  # e.g. every sample is bad: do not search for ever
                    raise BadSampleLimitError(bad_sample_limit_message(len(skipped), self.max_bad_samples,
                                                                       skipped[-1])) from error
            if substitutes is None:
                order = sample_rng(self.seed, epoch, f"substitute for {ref.name}").permutation(len(self.refs))
                substitutes = (self.refs[i] for i in order)
            ref = next((candidate for candidate in substitutes if candidate.name not in tried), None)
            if ref is None:
                raise BadSampleLimitError(f"every one of the {len(self.refs)} samples failed to decode; the last: "
                                          f"{skipped[-1]['key']} in {skipped[-1]['shard']} ({skipped[-1]['error']})")
            tried.add(ref.name)

    @staticmethod
    def read(ref: SampleRef) -> dict:
        """The sample's tar members, read with one ranged read, under its key in the mixture (`ref.name`)."""
        found = list(wds.DataPipeline(lambda: read_sample_bytes([ref]), tar_file_expander, group_by_keys))
        if [sample["__key__"] for sample in found] != [ref.key]:
            raise KeyError(f"expected sample {ref.key} at offset {ref.offset}, found "
                           f"{[sample['__key__'] for sample in found]}")
        return {**found[0], "__key__": ref.name}

    def decode(self, sample: dict, epoch: int, source: int) -> list[dict]:
        decoder = self.decoders[source]
        if self.spec.mode == "frames":
            return decoder.frame_pairs(sample, epoch)
        return [decoder.clip(sample, epoch)]


def distributed_position() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else from the launcher's environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def bad_sample_limit_message(count: int, limit: int, last: dict) -> str:
    return (f"{count} samples failed to decode, more than data.max_bad_samples = {limit}; the last: {last['key']} "
            f"in {last['shard']} ({last['error']}). Run vidar-inspect on the shards to list every bad sample, "
            f"repair or re-convert them, or raise data.max_bad_samples")


@contextlib.contextmanager
def sigterm_blocked() -> Iterator[None]:
    """SIGTERM held back in this thread (delivered when the block ends, or to another thread)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def leave_sigterm_to_the_rank(worker_id: int) -> None:
    """A DataLoader worker obeys a SIGTERM from its rank only.

    A launcher or scheduler that preempts a job signals every process, workers included, and torch's
    workers die of SIGTERM: their rank, which saves a checkpoint on SIGTERM, could then be waiting
    for a batch no one will make. So workers start with SIGTERM blocked in every thread (the rank
    forks them inside `sigterm_blocked`: threads made at the fork inherit the mask) and one thread
    takes each SIGTERM: sent by the rank (multiprocessing's `terminate`, as the rank shuts its
    workers down) it exits, sent by anyone else it is left to the rank. A worker whose rank is gone
    exits by itself (torch's worker watchdog).
    """
    threading.Thread(target=exit_on_sigterm_from_parent, name="sigterm", daemon=True).start()


def exit_on_sigterm_from_parent() -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == os.getppid():
            os._exit(0)


class ShardLoader:
    """Iterable of batches for one rank with a resumable position (state_dict / load_state_dict).

    Training (shuffle=True, epochs=None) runs forever, epoch after epoch; the position counts the
    batches the caller actually received, not those prefetched by workers. `skipped_samples` counts
    the bad samples in those batches (see the module docstring).
    """

    def __init__(self, stream: ShardStream, num_workers: int, too_short: list[str], source_names: list[str]):
        self.stream, self.num_workers, self.too_short = stream, num_workers, too_short
        self.source_names = source_names
        self.epoch, self.consumed = 0, 0
        self.skipped_samples = 0
        self.finished = np.zeros(len(source_names), dtype=np.int64)  # samples per source of the finished epochs

    def __iter__(self) -> Iterator[dict]:
        if not self.stream.batches_in_epoch(self.epoch, self.consumed):
            # resumed on more ranks than the rest of the epoch can feed: that rest is dropped, as
            # the last few samples of every epoch are
            self.finish_epoch()
        self.stream.start_epoch, self.stream.start_consumed = self.epoch, self.consumed
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                            prefetch_factor=2 if self.num_workers else None, persistent_workers=False,
                            worker_init_fn=leave_sigterm_to_the_rank)
        remaining_in_epoch = len(self.stream.batches_in_epoch(self.epoch, self.consumed))
        per_step = self.stream.samples_per_batch * self.stream.world_size
        with sigterm_blocked():  # while the workers start (see leave_sigterm_to_the_rank)
            batches = iter(loader)
        for batch in batches:
            self.count_skipped(batch.pop(SKIPPED_FIELD))
            self.consumed += per_step
            remaining_in_epoch -= 1
            if remaining_in_epoch == 0:
                self.finish_epoch()
                remaining_in_epoch = len(self.stream.batches_in_epoch(self.epoch, 0))
            yield batch

    def count_skipped(self, skipped: list[dict]) -> None:
        for bad in skipped:
            self.skipped_samples += 1
            log.warning("skipped sample %s in %s: %s (%d skipped so far on this rank)", bad["key"], bad["shard"],
                        bad["error"], self.skipped_samples)

    def batches_per_epoch(self) -> int:
        return len(self.stream.batches_in_epoch(self.epoch, 0))

    def used_in_epoch(self, epoch: int, consumed: int) -> np.ndarray:
        """Samples per source among the first `consumed` of epoch `epoch`'s order."""
        stream = self.stream
        used = stream.mixture.source_of(stream.mixture.order(stream.seed, epoch, stream.shuffle)[:consumed])
        return np.bincount(used, minlength=len(self.source_names))

    def finish_epoch(self) -> None:
        """Count the epoch's samples as consumed - exactly: an epoch resumed on another world size ends
        after another number of them than a whole epoch on either - and move to the next one."""
        self.finished += self.used_in_epoch(self.epoch, self.consumed)
        self.epoch, self.consumed = self.epoch + 1, 0

    def samples_by_source(self) -> dict[str, int]:
        """Samples handed out so far (all ranks, since the first step) per source directory."""
        counts = self.finished + self.used_in_epoch(self.epoch, self.consumed)
        return dict(zip(self.source_names, map(int, counts)))

    def state_dict(self) -> dict:
        stream = self.stream
        return {"epoch": self.epoch, "samples_consumed": self.consumed,
                "samples_consumed_per_rank": self.consumed // stream.world_size,
                "seed": stream.seed, "world_size": stream.world_size, "num_samples": len(stream.refs),
                "samples_per_batch": stream.samples_per_batch, "skipped_samples": self.skipped_samples,
                "sources": [[size, weight] for size, weight in zip(stream.mixture.sizes, stream.mixture.weights)],
                "finished_epochs_by_source": self.finished.tolist()}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` stopped. The world size may differ: the rest of the epoch's order
        is re-sliced over the new ranks, still without repeating or skipping a sample."""
        stream = self.stream
        expected = {"seed": stream.seed, "num_samples": len(stream.refs),
                    "sources": [[size, weight] for size, weight in zip(stream.mixture.sizes, stream.mixture.weights)]}
        for name, value in expected.items():
            if name in state and state[name] != value:  # states saved before mixtures have no "sources"
                raise DataError(f"the training data changed since the checkpoint: its loader state has {name} "
                                f"{state[name]}, `data.shards` now gives {value} (episodes appended with vidar-shard "
                                f"--append, shards converted again, other mixture weights or data.seed?); resuming "
                                f"would not continue the same sample sequence. Resume with the data as it was, or "
                                f"start a new run from the checkpoint's weights (vidar-export, then model.pt_dir)")
        self.epoch, self.consumed = int(state["epoch"]), int(state["samples_consumed"])
        if "finished_epochs_by_source" in state:
            self.finished = np.asarray(state["finished_epochs_by_source"], dtype=np.int64)
        else:  # saved before it existed: whole epochs of this world size (exact unless it changed)
            per_epoch = len(stream.batches_in_epoch(0, 0)) * stream.samples_per_batch * stream.world_size
            self.finished = sum((self.used_in_epoch(epoch, per_epoch) for epoch in range(self.epoch)),
                                np.zeros(len(self.source_names), dtype=np.int64))
        self.skipped_samples = int(state.get("skipped_samples", 0))  # absent in states saved before it existed


def build_loader(shards: str | Path | list, config: Any, micro_batch_size: int, *, rank: int | None = None,
                 world_size: int | None = None, train: bool = True, epochs: int | None = None,
                 mode: str = "clips", frames_per_sample: int = 1, video_dtype: torch.dtype = torch.float32,
                 actions: bool = True, num_workers: int | None = None) -> ShardLoader:
    """Loader over a shard directory, or a mixture of several (a list of {path, weight}),
    configured by a DataConfig-like object; `num_workers` DataLoader worker processes (None:
    config.num_workers; 0 reads in this process).

    `config` needs num_frames, height, width, fps, cfg_prob, resize, num_workers, seed and
    max_bad_samples. Training loaders shuffle, drop the incomplete last batch and repeat forever
    (unless `epochs`); evaluation loaders (train=False) read every sample once, in order (a mixture's
    sources one after the other, their weights aside), with no text dropout. `video_dtype=torch.uint8`
    moves raw video as uint8 (4x fewer bytes from workers; apply `transforms.to_model_range` on the
    device). `actions=False`: clips without their actions, so a mixture may join robots of other
    action spaces (batches that carry actions stack them).
    """
    if rank is None or world_size is None:
        rank, world_size = distributed_position()
    spec = ClipSpec(num_frames=config.num_frames, height=config.height, width=config.width, fps=config.fps,
                    cfg_prob=config.cfg_prob if train else 0.0, mode=mode, frames_per_sample=frames_per_sample,
                    video_dtype=video_dtype, resize=config.resize, actions=actions)
    sources = shard_sources(shards)
    indexes = [read_index(path) for path, _ in sources]
    check_same_kind(sources, indexes)  # every source holds the same kind of samples
    if spec.actions or spec.mode == "frames":
        check_one_action_space(sources, indexes)
    refs, too_short, decoders, sizes = [], [], [], []
    for number, ((shards_dir, _), index) in enumerate(zip(sources, indexes)):
        check_shard_files(index, shards_dir)
        source_refs, source_too_short = sample_refs(index, shards_dir, spec, number,
                                                    source_key_prefix(number, len(sources)))
        if source_too_short:
            warnings.warn(f"{shards_dir}: {len(source_too_short)} samples have fewer than {spec.num_frames} frames "
                          f"at {spec.fps} fps and are left out (e.g. {source_too_short[:3]})", stacklevel=2)
        if not source_refs:
            raise DataError(f"{shards_dir}: no sample has {spec.num_frames} frames at {spec.fps} fps")
        refs += source_refs
        too_short += source_too_short
        sizes.append(len(source_refs))
        decoders.append(sample_decoder(index, shards_dir, spec, config.seed))
    # an evaluation reads every sample once: each source's share is its size, whatever its weight
    mixture = Mixture(sizes, [weight for _, weight in sources] if train else sizes)
    stream = ShardStream(refs, spec, decoders, micro_batch_size, config.seed, rank, world_size,
                         shuffle=train, drop_last=train, epochs=epochs if train else 1,
                         max_bad_samples=config.max_bad_samples, mixture=mixture)
    workers = config.num_workers if num_workers is None else num_workers
    return ShardLoader(stream, workers, too_short, [path for path, _ in sources])


def check_one_action_space(sources: list[tuple[str, float]], indexes: list[dict]) -> None:
    """Batches that carry actions stack them: every source of a mixture (with its index.json) must have as
    many dimensions."""
    dims = {path: index["settings"]["layout"]["action_dim"] for (path, _), index in zip(sources, indexes)}
    if len(set(dims.values())) > 1:
        raise DataError(f"the sources of this mixture have actions of different dimensions "
                        f"({', '.join(f'{path}: {dim}' for path, dim in dims.items())}), which one batch cannot "
                        f"stack: the IDM learns one robot's action space (its shards must share it); the DiT "
                        f"stages train on clips without their actions and take such a mixture")


def sample_decoder(index: dict, shards_dir: str | Path, spec: ClipSpec, seed: int
                   ) -> SampleDecoder | PreEncodedDecoder:
    """The decoder of one shard directory's samples (raw video or pre-encoded tensors)."""
    if index["mode"] == "latents":
        embeddings = index.get("text_embeddings")
        if embeddings and spec.cfg_prob > 0 and not index.get("null_text_key"):
            raise DataError(f"{Path(shards_dir) / INDEX_FILE}: no null-prompt embedding (\"null_text_key\"; "
                            f"written by an older vidar-shard), so captions dropped for classifier-free "
                            f"guidance (data.cfg_prob = {spec.cfg_prob}) have no text: convert the episodes "
                            f"again, or set data.cfg_prob=0")
        return PreEncodedDecoder(spec, seed, Path(shards_dir) / embeddings if embeddings else None,
                                 index.get("null_text_key"))
    return SampleDecoder(spec, seed, index["settings"]["layout"]["fps"])
