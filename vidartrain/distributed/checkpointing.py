"""Checkpoint directory bookkeeping around DeepSpeed's own `save_checkpoint` / `load_checkpoint`.

    output_dir/checkpoints/
        step_00000010/          engine.save_checkpoint(..., tag="step_00000010") on every rank
            COMPLETE            written by rank 0 once every rank has finished writing
        latest                  name of the newest complete checkpoint, replaced atomically
        step_00000010_universal/  optional: `python -m deepspeed.checkpoint.ds_to_universal
                                  --input_folder .../step_00000010 --output_folder .../step_00000010_universal`,
                                  loadable with any number of ranks (`--resume` that folder)

A checkpoint whose save was interrupted has no COMPLETE marker and is never picked by `--resume auto`.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vidartrain.files import write_atomically

log = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
LATEST_FILE = "latest"
TAG_PATTERN = re.compile(r"^step_(\d{8})$")
UNIVERSAL_MARKER = Path("zero") / "optimizer_state.pt"  # written by ds_to_universal


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


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def mark_complete(root: Path, tag: str, info: dict[str, Any]) -> None:
    """Declare `root/tag` complete and make it the latest (call only after every rank has saved)."""
    write_atomically(root / tag / COMPLETE_MARKER, lambda tmp: tmp.write_text(json.dumps(info) + "\n"))
    write_atomically(root / LATEST_FILE, lambda tmp: tmp.write_text(tag))


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


def complete_checkpoints(root: Path) -> list[str]:
    """Tags of complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if TAG_PATTERN.match(p.name) and is_complete(p)]
    return sorted(tags)


def latest_complete(root: Path) -> str | None:
    """The checkpoint `latest` names if it is complete, else the newest complete one."""
    latest = root / LATEST_FILE
    if latest.is_file():
        tag = latest.read_text().strip()
        if is_complete(root / tag):
            return tag
        log.warning("%s names %s, which is not a complete checkpoint; looking for the newest complete one",
                    latest, tag)
    tags = complete_checkpoints(root)
    return tags[-1] if tags else None


def prune_checkpoints(root: Path, keep_last: int) -> list[str]:
    """Delete all but the newest `keep_last` complete checkpoints, and unfinished saves older than
    the newest complete one. Returns the deleted tags."""
    complete = complete_checkpoints(root)
    if not complete:
        return []
    newest = complete[-1]
    doomed = complete[:-keep_last] if keep_last > 0 else []
    doomed += [p.name for p in root.iterdir()
               if TAG_PATTERN.match(p.name) and not is_complete(p) and p.name < newest]
    for tag in doomed:
        shutil.rmtree(root / tag, ignore_errors=True)
    return doomed


def resolve_resume(resume: str | None, root: Path) -> CheckpointRef | None:
    """`--resume` -> the checkpoint to load. None: start fresh. "auto": the latest complete checkpoint
    under `root`, or a fresh start if there is none. A path: a checkpoint folder (complete, or
    converted to universal by ds_to_universal) or a checkpoints directory (its latest complete)."""
    if resume is None:
        return None
    if resume == "auto":
        tag = latest_complete(root)
        if tag is None:
            log.info("--resume auto: no complete checkpoint under %s, starting from scratch", root)
            return None
        return CheckpointRef(root, tag)
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint directory")
    if (path / UNIVERSAL_MARKER).is_file():
        return CheckpointRef(path.parent, path.name, universal=True)
    if TAG_PATTERN.match(path.name):
        if not is_complete(path):
            raise ValueError(f"--resume {resume}: this checkpoint has no {COMPLETE_MARKER} marker; its save "
                             f"was interrupted, so it may be missing some ranks' files")
        return CheckpointRef(path.parent, path.name)
    tag = latest_complete(path)
    if tag is None:
        raise ValueError(f"--resume {resume}: neither a checkpoint folder (step_XXXXXXXX with "
                         f"{COMPLETE_MARKER}), a universal checkpoint ({UNIVERSAL_MARKER}) nor a directory "
                         f"holding complete checkpoints")
    return CheckpointRef(path, tag)
