"""index.json: what a shard directory holds, written by data_tools.shard and read by the loader.

{
  "format": "vidartrain-shards/1", "complete": true, "split": "train", "mode": "raw" | "latents",
  "settings": {...conversion options...},
  "shards": [{"name": "shard-000000.tar", "samples": 2, "bytes": 20480, "sha256": "...",
              "episodes_end": 3,   # input episodes consumed once this shard was closed (resume)
              "entries": [{"key": "ep_0000", "offset": 0, "size": 9728, "frames": 40}, ...]}],
  "episodes": [{"episode": "ep_0000", "position": 0, "shard": "shard-000000.tar", "frames": 40,
                "fps": 10, "source_fps": 10.0, "source": "ep_0000/video.mp4", ...}],
  "skipped": [{"episode": "ep_0002", "position": 2, "reason": "length_mismatch", "detail": "..."}],
  "val": "val" | null,         # sub-directory with the validation split's own index.json
  "actions": {"dim": 14, "count": 480, "mean": [...], "std": [...], "m2": [...]}
               # exact per-dimension statistics of this split's actions (every row of actions.npy)
}

`offset` and `size` locate a sample's tar members inside its shard, so a reader can fetch exactly
the samples assigned to it with one ranged read each.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vidartrain.errors import DataError

INDEX_FILE = "index.json"
JOURNAL_FILE = ".journal.jsonl"  # finished shards of a conversion in progress (data_tools.shard)
INDEX_FORMAT = "vidartrain-shards/1"
TEXT_EMBEDDINGS_FILE = "text_embeddings.safetensors"


def file_sha256(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def read_index(shards_dir: str | Path, require_complete: bool = True) -> dict:
    """The parsed index.json of a shard directory, with a clear error for anything unusable."""
    path = Path(shards_dir) / INDEX_FILE
    if not path.is_file() and (Path(shards_dir) / JOURNAL_FILE).is_file():
        raise DataError(f"{shards_dir}: the conversion did not finish (no {INDEX_FILE} yet); run vidar-shard "
                        f"again with the same options to finish it")
    if not path.is_file():
        raise DataError(f"{path} not found: is {shards_dir} a directory made by `vidar-shard`?")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        found = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise DataError(f"{path}: field 'format' is {found!r}, expected {INDEX_FORMAT!r}")
    for field in ("shards", "episodes", "skipped", "settings", "mode"):
        if field not in index:
            raise DataError(f"{path}: missing field {field!r}")
    if index.get("failed"):
        raise DataError(f"{path}: the conversion failed: {index['failed']} (index.json lists why each episode was "
                        f"skipped); there is nothing to train on")
    if require_complete and not index.get("complete", False):
        raise DataError(f"{path}: the conversion did not finish (\"complete\": false); run vidar-shard again "
                        f"with the same options to finish it")
    return index


def shard_file_problem(shards_dir: str | Path, shard: dict) -> str | None:
    """Why a shard listed in index.json cannot be read as listed (missing, other size), or None."""
    path = Path(shards_dir) / shard["name"]
    if not path.is_file():
        return f"{path}: missing (index.json lists it with {shard['samples']} samples)"
    size = path.stat().st_size
    if size != shard["bytes"]:
        return f"{path}: {size} bytes, index.json says {shard['bytes']} (truncated or replaced; run vidar-inspect)"
    return None


def check_shard_files(index: dict, shards_dir: str | Path) -> None:
    """Every shard index.json lists is there with its recorded size (checked before training starts)."""
    problems = [problem for shard in index["shards"] if (problem := shard_file_problem(shards_dir, shard))]
    if problems:
        raise DataError(f"{Path(shards_dir) / INDEX_FILE}: {len(problems)} shard(s) do not match it:\n  "
                         + "\n  ".join(problems))


# ----------------------------------------------------------------------------------------------
# Action statistics: exact per-dimension mean/std, merged from per-episode parts (Chan et al.'s
# pairwise update in float64), so a resumed conversion or a mixture of datasets gives the same
# numbers as one pass over all actions.


def episode_action_statistics(actions: np.ndarray) -> dict:
    """{"count", "mean", "m2"} of one episode's actions [T, A]; m2 = sum of squared deviations."""
    values = np.asarray(actions, dtype=np.float64)
    mean = values.mean(axis=0)
    return {"count": int(values.shape[0]), "mean": mean.tolist(),
            "m2": ((values - mean) ** 2).sum(axis=0).tolist()}


def merge_action_statistics(parts: list[dict], source: str) -> dict:
    """Pooled {"dim", "count", "mean", "std", "m2"} of several parts (population std, ddof 0)."""
    parts = [part for part in parts if part["count"] > 0]
    if not parts:
        raise DataError(f"{source}: no actions to compute statistics from")
    dims = {len(part["mean"]) for part in parts}
    if len(dims) != 1:
        raise DataError(f"{source}: actions of different dimensions {sorted(dims)} cannot be pooled")
    count, mean, m2 = 0, np.zeros(dims.pop()), None
    for part in parts:
        part_mean, part_m2 = np.asarray(part["mean"], np.float64), np.asarray(part["m2"], np.float64)
        total = count + part["count"]
        delta = part_mean - mean
        mean = mean + delta * part["count"] / total
        m2 = part_m2 if m2 is None else m2 + part_m2 + delta ** 2 * count * part["count"] / total
        count = total
    return {"dim": len(mean), "count": count, "mean": mean.tolist(), "std": np.sqrt(m2 / count).tolist(),
            "m2": m2.tolist()}


def action_statistics(shards_dir: str | Path) -> dict:
    """The training split's action statistics recorded in `shards_dir`/index.json."""
    return recorded_actions(shards_dir, read_index(shards_dir).get("actions"))


def recorded_actions(shards_dir: str | Path, actions: dict | None) -> dict:
    """The "actions" statistics of `shards_dir`'s index, or an error saying how to get them."""
    if not actions:
        raise DataError(f"{Path(shards_dir) / INDEX_FILE}: no \"actions\" statistics (written by an older "
                        f"vidar-shard): convert the episodes again, or set idm.action_mean and idm.action_std")
    return actions


# ----------------------------------------------------------------------------------------------
# Several shard directories mixed with weights (data.shards as a list of {path, weight})


def shard_sources(shards: str | Path | list) -> list[tuple[str, float]]:
    """(directory, weight) of every source: one directory (weight 1), or a list of {path, weight}
    mappings or (path, weight) pairs."""
    if isinstance(shards, (str, Path)):
        return [(str(shards), 1.0)]
    return [(str(entry["path"]), float(entry["weight"])) if isinstance(entry, dict)
            else (str(entry[0]), float(entry[1])) for entry in shards]


def check_same_kind(sources: list[tuple[str, float]], indexes: list[dict], key: str = "data.shards") -> None:
    """Every source of a mixture holds the same kind of samples: same mode (raw / latents), text
    embeddings in all or none, and for pre-encoded shards the same windows. `key`: the setting that
    names the sources after the first. (Pre-encoded windows include their dtype: a batch is collated
    into its first sample's. Action spaces may differ: the loaders that stack actions check them,
    `vidartrain.data.dataset.check_one_action_space`.)"""
    first = indexes[0]

    def kind(index: dict) -> tuple:
        window = index["settings"].get("precompute") or {}
        return (index["mode"], bool(index.get("text_embeddings")), holds_idm_masks(index),
                {k: v for k, v in window.items() if k in ("num_frames", "height", "width", "resize", "latent_dtype")})

    for (path, _), index in zip(sources[1:], indexes[1:]):
        if kind(index) != kind(first):
            raise DataError(f"{key} mixes {sources[0][0]} (mode, text embeddings, IDM masks, windows: {kind(first)}) "
                            f"with {path} ({kind(index)}): every source must hold the same kind of samples")


@dataclass(frozen=True)
class DataInfo:
    """The training shards as a stage needs to know them, read once per run from their index.json
    files (`read_data_info`) and handed to the stage."""

    mode: str  # "raw" (video frames: the VAE encodes them online) or "latents" (pre-encoded)
    text_embeddings: bool  # captions pre-encoded by umT5 (else the text encoder runs online)
    # (source directory, its index's "actions": exact per-dimension mean / std / m2; None if not recorded)
    actions: tuple[tuple[str, dict | None], ...]
    idm_masks: bool = False  # pre-encoded with the IDM's masks (Eq. 7), so no IDM runs in training

    @property
    def raw(self) -> bool:
        return self.mode == "raw"

    def action_statistics(self) -> list[dict]:
        """Every source's action statistics (an error names a source that has none)."""
        return [recorded_actions(path, actions) for path, actions in self.actions]

    def action_dims(self) -> list[tuple[str, int]]:
        """(source, action dimensions) of every source whose index records its actions."""
        return [(path, actions["dim"]) for path, actions in self.actions if actions]


def read_data_info(shards: str | Path | list, val_shards: str | Path | list | None = None) -> DataInfo:
    """`DataInfo` of `data.shards` (a directory or a mixture), each index.json read once. Held-out
    `val_shards` must hold the same kind of samples: the stage loads its encoders for that kind, and
    a mismatch would only show at the first validation, steps into the run."""
    sources = shard_sources(shards)
    indexes = [read_index(path) for path, _ in sources]
    check_same_kind(sources, indexes)
    if val_shards is not None:
        held_out = shard_sources(val_shards)
        check_same_kind(sources[:1] + held_out, indexes[:1] + [read_index(path) for path, _ in held_out],
                        "data.val_shards")
        warn_of_another_held_out_split(sources, indexes, held_out)
    return DataInfo(mode=indexes[0]["mode"], text_embeddings=bool(indexes[0].get("text_embeddings")),
                    actions=tuple((path, index.get("actions")) for (path, _), index in zip(sources, indexes)),
                    idm_masks=holds_idm_masks(indexes[0]))


def warn_of_another_held_out_split(sources: list[tuple[str, float]], indexes: list[dict],
                                   held_out: list[tuple[str, float]]) -> None:
    """One training directory with its own held-out split (vidar-shard --val-fraction) and `data.val_shards`
    elsewhere: a config written for other data (the tiny configs name demo_run/shards/val) validates on that
    data's episodes, with no other sign of it."""
    if len(sources) != 1 or len(held_out) != 1 or not indexes[0].get("val"):
        return
    own = Path(sources[0][0]) / indexes[0]["val"]
    if own.resolve() != Path(held_out[0][0]).resolve():
        warnings.warn(f"`data.val_shards` = {held_out[0][0]} is not the held-out split of `data.shards` = "
                      f"{sources[0][0]} ({own}): validation runs on other episodes than those held out of the "
                      f"training data; set data.val_shards={own} to validate on them")


def holds_idm_masks(index: dict) -> bool:
    """Whether pre-encoded shards hold each sample's IDM mask (vidar-precompute with the IDM)."""
    return "idm" in (index["settings"].get("precompute") or {}).get("precompute", [])
