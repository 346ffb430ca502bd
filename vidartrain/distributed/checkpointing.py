"""Checkpoint directory bookkeeping around DeepSpeed's own `save_checkpoint` / `load_checkpoint`.

    output_dir/checkpoints/
        step_00000010/          engine.save_checkpoint(..., tag="step_00000010") on every rank
            COMPLETE            written by rank 0 once every rank has finished writing: JSON with the
                                step, the world size, the resolved config and the size and sha256 of
                                every other file of the checkpoint
        latest                  name of the newest complete checkpoint, replaced atomically
        superseded/after_step_00000010_<time>/step_00000020/   set aside by a resume from step 10
        step_00000010_universal/  optional: `python -m deepspeed.checkpoint.ds_to_universal
                                  --input_folder .../step_00000010 --output_folder .../step_00000010_universal`,
                                  loadable with any number of ranks (`--resume` that folder)

The output dir is one folder for all ranks (storage every node shares); the trainer checks that at
start with a marker rank 0 writes and every rank reads (`write_shared_marker`, `sees_shared_marker`).

A checkpoint whose save was interrupted has no COMPLETE marker and is never picked by `--resume auto`.
One whose files no longer match the sizes and checksums in COMPLETE (a disk error, a truncated copy, a
deleted file) is skipped with a warning naming the file by `--resume auto`, which falls back to the
newest intact one, and refused by `--resume PATH` and the export.

Checkpoint files are pickles; every read goes through `weights_only_loads`, so a crafted file cannot
run code (DeepSpeed's own loaders ask torch.load for weights_only=False).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from vidartrain.errors import CheckpointError
from vidartrain.files import write_atomically
from vidartrain.models.wan.checkpoint import pickle_refusal

log = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
LATEST_FILE = "latest"
TAG_PATTERN = re.compile(r"^step_(\d{8})$")
UNIVERSAL_MARKER = Path("zero") / "optimizer_state.pt"  # written by ds_to_universal
# What checkpoint files hold besides tensors and plain containers: DeepSpeed classes of the optimizer
# states (the loss scaler: static under bf16/fp32, dynamic under fp16; ZeRO-1/2 map each parameter to its
# slice of the flat partition with fragment_address) and numpy's generator state (a uint32 array, in the
# trainer's client_state). Unpickling these builds objects but calls nothing else.
SAFE_CHECKPOINT_GLOBALS = [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address, np.ndarray, np.dtype,
                           type(np.dtype(np.uint32)),
                           np.zeros(0).__reduce__()[0]]  # numpy's array reconstructor, whichever module has it


@dataclass(frozen=True)
class CheckpointRef:
    """A DeepSpeed checkpoint as `engine.load_checkpoint(root, tag)` wants it."""

    root: Path
    tag: str
    universal: bool = False

    @property
    def path(self) -> Path:
        return self.root / self.tag


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


SHARED_MARKER = ".every_rank_sees_this"  # rank 0 writes it at start, every rank reads it (then it is removed)


def write_shared_marker(output_dir: Path, token: str) -> None:
    """Rank 0's half of the check that `output_dir` is one folder for all ranks (`sees_shared_marker`)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(output_dir / SHARED_MARKER, lambda tmp: tmp.write_text(token))


def sees_shared_marker(output_dir: Path, token: str) -> bool:
    """Whether this rank sees the marker rank 0 wrote with `token`. A node whose `output_dir` is a disk of
    its own does not: its ranks would write their checkpoint partitions where rank 0's COMPLETE record,
    its checksums and `--resume auto` never look, and see other checkpoints than rank 0 on a resume."""
    try:
        return (output_dir / SHARED_MARKER).read_text() == token
    except OSError:
        return False


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def mark_complete(root: Path, tag: str, info: dict[str, Any]) -> None:
    """Declare `root/tag` complete and make it the latest (call only after every rank has saved).
    `info` holds the step, the world size, the config and `files` (see `file_digests`)."""
    write_atomically(root / tag / COMPLETE_MARKER, lambda tmp: tmp.write_text(json.dumps(info) + "\n"))
    point_latest(root, tag)


def point_latest(root: Path, tag: str | None) -> None:
    """Make `latest` name `tag` (atomically), or remove it when no checkpoint is left (None)."""
    if tag is None:
        (root / LATEST_FILE).unlink(missing_ok=True)
    else:
        write_atomically(root / LATEST_FILE, lambda tmp: tmp.write_text(tag))


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


def read_complete(path: Path) -> dict[str, Any]:
    """The record a checkpoint's COMPLETE marker holds (older markers: no `files`, no `config`)."""
    marker = path / COMPLETE_MARKER
    try:
        return json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{marker}: unreadable ({err})") from None


def recorded_run(ref: CheckpointRef) -> dict[str, Any]:
    """The COMPLETE record of the run that saved `ref`. ds_to_universal writes none into a universal
    checkpoint: its own COMPLETE is taken if one was copied there, else that of the checkpoint it was made
    from, beside it (`step_N` for `step_N_universal`)."""
    if not ref.universal:
        return read_complete(ref.path)
    source = ref.root / ref.tag.removesuffix("_universal")
    for folder in (ref.path, source):
        if is_complete(folder):
            return read_complete(folder)
    raise CheckpointError(f"{ref.path}: a universal checkpoint records no config, so the settings of this run "
                          f"cannot be checked against it; the one it was made from is looked for beside it as "
                          f"{source} (where the README's ds_to_universal command puts it): keep the universal "
                          f"checkpoint next to its source, or copy the source's {COMPLETE_MARKER} file into it")


def checkpoint_files(path: Path) -> list[str]:
    """Every file of a checkpoint folder but its COMPLETE marker, as sorted relative paths."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER)


def hashing_shares(listings: list[list[str]]) -> list[list[str]]:
    """Every file that some rank lists (`checkpoint_files` on each rank), shared out among the ranks for
    hashing: file i goes to the rank with the fewest files so far among those that list it, the first
    from rank i mod world on (where all ranks see every file: rank r hashes files r, r + world, ...). A
    rank always sees the files it wrote, but its listing of the others' may lag (NFS caches directory
    entries): each rank hashing every world-th file of its own listing hashed some files twice and
    left others out of COMPLETE, unverified."""
    world_size = len(listings)
    visible = [set(listing) for listing in listings]
    shares: list[list[str]] = [[] for _ in listings]
    for i, name in enumerate(sorted(set().union(*visible))):
        seeing = [rank for rank in range(world_size) if name in visible[rank]]
        owner = min(seeing, key=lambda rank: (len(shares[rank]), (rank - i) % world_size))
        shares[owner].append(name)
    return shares


def file_digests(path: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """name -> {"size", "sha256"} of the files `names` of checkpoint folder `path`."""
    digests = {}
    for name in names:
        with open(path / name, "rb") as stream:
            sha256 = hashlib.file_digest(stream, "sha256").hexdigest()
        digests[name] = {"size": (path / name).stat().st_size, "sha256": sha256}
    return digests


def checkpoint_problems(path: Path, rank: int = 0, world_size: int = 1) -> list[str]:
    """What is wrong with the files of complete checkpoint `path` compared with the sizes and checksums its
    COMPLETE recorded: [] when they match. Ranks share the work (rank r hashes every world_size-th file);
    the union of all ranks' answers is the verdict."""
    info = read_complete(path)
    manifest = info.get("files")
    if manifest is None:
        if rank == 0:
            log.warning("%s records no checksums (saved by an older version): loading it unverified", path)
        return []
    problems = []
    for name in sorted(manifest)[rank::world_size]:
        file, expected = path / name, manifest[name]
        if not file.is_file():
            problems.append(f"{file} is missing")
        elif file.stat().st_size != expected["size"]:
            problems.append(f"{file} has {file.stat().st_size:,} bytes, {COMPLETE_MARKER} recorded "
                            f"{expected['size']:,} (truncated or overwritten)")
        elif file_digests(path, [name])[name]["sha256"] != expected["sha256"]:
            problems.append(f"{file}: sha256 differs from the one {COMPLETE_MARKER} recorded (corrupted)")
    return problems


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within it every `torch.load` - DeepSpeed's too, which ask for weights_only=False - unpickles only
    tensors, plain containers and SAFE_CHECKPOINT_GLOBALS: a checkpoint file that would run code is
    refused with a CheckpointError instead."""
    original = torch.load

    def load(file: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(SAFE_CHECKPOINT_GLOBALS):
            try:
                return original(file, *args, **kwargs)
            except pickle.UnpicklingError as err:
                raise pickle_refusal(file, err) from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def save_failure(directory: Path, err: BaseException) -> CheckpointError:
    """The error to raise when writing a checkpoint failed; says "disk full?" when it looks like it (torch's
    zip writer reports a full disk as `unexpected pos N vs M`)."""
    text = str(err)
    disk_full = ((isinstance(err, OSError) and err.errno == errno.ENOSPC) or "unexpected pos" in text
                 or "No space left" in text)
    return CheckpointError(f"checkpoint save to {directory} failed: {'disk full? ' if disk_full else ''}"
                           f"({type(err).__name__}: {text})")


def complete_checkpoints(root: Path) -> list[str]:
    """Tags of complete checkpoints under `root`, oldest first."""
    return [tag for tag in saved_checkpoints(root) if is_complete(root / tag)]


def latest_complete(root: Path) -> str | None:
    """The newest complete checkpoint. `latest` names it once its save has finished; a save stopped after
    its COMPLETE marker but before `latest` moved leaves `latest` naming the one before, so the markers
    decide (and a `latest` that disagrees, or cannot be read, is reported)."""
    tags = complete_checkpoints(root)
    newest = tags[-1] if tags else None
    latest = root / LATEST_FILE
    if has_latest(root):
        try:
            named = latest.read_text().strip()
        except (OSError, UnicodeDecodeError) as err:
            log.warning("%s is unreadable (%s); the newest complete checkpoint is %s", latest, err, newest)
        else:
            if named != newest:
                log.warning("%s names %s, but the newest complete checkpoint is %s (a save stopped before it "
                            "moved %s)", latest, named, newest, LATEST_FILE)
    return newest


def has_latest(root: Path) -> bool:
    """Whether `root` has a `latest` entry of any kind (a broken link or a folder too)."""
    return (root / LATEST_FILE).exists() or (root / LATEST_FILE).is_symlink()


def saved_checkpoints(root: Path) -> list[str]:
    """Tags of every checkpoint folder under `root`, complete or not, oldest first."""
    return sorted(p.name for p in root.iterdir() if TAG_PATTERN.match(p.name)) if root.is_dir() else []


def step_of(tag: str) -> int:
    return int(TAG_PATTERN.match(tag).group(1))


def remove_checkpoints(root: Path) -> list[str]:
    """Delete every checkpoint under `root` and its `latest` (a new run replacing an earlier one, as
    --overwrite asks). Returns the deleted tags."""
    tags = saved_checkpoints(root)
    for tag in tags:
        shutil.rmtree(root / tag)
    point_latest(root, None)
    return tags


def set_aside_checkpoints_after(root: Path, step: int, now: str) -> Path | None:
    """Move the checkpoints of steps after `step` (complete or not) into `root/superseded/after_step_N_<now>/`
    and point `latest` at the newest complete one left. A run resumed from an earlier checkpoint would
    write into their folders at the same steps, and pruning and `--resume auto` would prefer them to its
    own; moved, nothing of them is lost. Returns the folder they went to, or None if there were none."""
    later = [tag for tag in saved_checkpoints(root) if step_of(tag) > step]
    if not later:
        return None
    destination = root / "superseded" / f"after_{tag_for_step(step)}_{now}"
    destination.mkdir(parents=True)
    for tag in later:
        (root / tag).rename(destination / tag)
    remaining = complete_checkpoints(root)
    point_latest(root, remaining[-1] if remaining else None)
    return destination


def prune_checkpoints(root: Path, keep_last: int) -> list[str]:
    """Delete all but the newest `keep_last` complete checkpoints, and unfinished saves older than
    the newest complete one. Returns the deleted tags."""
    complete = complete_checkpoints(root)
    if not complete:
        return []
    newest = complete[-1]
    doomed = complete[:-keep_last] if keep_last > 0 else []
    doomed += [tag for tag in saved_checkpoints(root) if not is_complete(root / tag) and tag < newest]
    for tag in doomed:
        shutil.rmtree(root / tag, ignore_errors=True)
    return doomed


def resume_candidates(resume: str | None, root: Path) -> list[CheckpointRef]:
    """`--resume` -> the checkpoints to try, best first. None: none (start fresh). "auto": every complete
    checkpoint under `root`, the newest first (none: a fresh start). A path: a checkpoint folder (complete,
    or converted to universal by ds_to_universal) or a checkpoints directory (its newest complete)."""
    if resume is None:
        return []
    if resume == "auto":
        if latest_complete(root) is None:
            # only a checkpoint's completion writes `latest`: the run saved checkpoints that are gone now
            if has_latest(root):
                raise CheckpointError(f"--resume auto: {root / LATEST_FILE} shows that this run saved checkpoints, "
                                      f"but {root} holds no complete one (deleted or moved?); resume from a copy "
                                      f"with --resume PATH, or remove {LATEST_FILE} to start from scratch")
            log.info("--resume auto: no complete checkpoint under %s, starting from scratch", root)
            return []
        return [CheckpointRef(root, tag) for tag in reversed(complete_checkpoints(root))]
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"no such checkpoint directory: {resume}")
    if (path / UNIVERSAL_MARKER).is_file():
        return [CheckpointRef(path.parent, path.name, universal=True)]
    if TAG_PATTERN.match(path.name):
        if not is_complete(path):
            raise CheckpointError(f"{resume}: this checkpoint has no {COMPLETE_MARKER} marker; its save was "
                                  f"interrupted, so it may be missing some ranks' files")
        return [CheckpointRef(path.parent, path.name)]
    tag = latest_complete(path)
    if tag is None:
        raise CheckpointError(f"{resume}: neither a checkpoint folder (step_XXXXXXXX with {COMPLETE_MARKER}), a "
                              f"universal checkpoint ({UNIVERSAL_MARKER}) nor a directory holding complete "
                              f"checkpoints")
    return [CheckpointRef(path, tag)]


def first_intact(candidates: list[CheckpointRef], resume: str | None,
                 problems_of: Callable[[Path], list[str]] = checkpoint_problems) -> CheckpointRef | None:
    """The first candidate whose files match its COMPLETE record. `--resume auto` skips damaged ones with a
    warning naming the files; an explicit path that is damaged is refused. Universal checkpoints (made by
    ds_to_universal, which records no checksums) are taken as they are."""
    for ref in candidates:
        problems = [] if ref.universal else problems_of(ref.path)
        if not problems:
            return ref
        listing = "\n  ".join(problems)
        if resume != "auto":
            raise CheckpointError(f"checkpoint {ref.path} is damaged, refusing to load it:\n  {listing}")
        log.warning("--resume auto: skipping damaged checkpoint %s:\n  %s", ref.path, listing)
    if candidates:
        raise CheckpointError(f"--resume auto: every complete checkpoint under {candidates[0].root} is damaged "
                              f"(the warnings above name the files); resume from a copy or start another run")
    return None


def resolve_resume(resume: str | None, root: Path) -> CheckpointRef | None:
    """`--resume` -> the intact checkpoint to load (None: start fresh), verified in this process."""
    return first_intact(resume_candidates(resume, root), resume)
