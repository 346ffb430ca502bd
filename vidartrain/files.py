"""Files that appear whole or not at all, append-only journals of runs in progress, and fingerprints
that tell a rerun whether its input files changed."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterable

from vidartrain.errors import ConfigError, DataError, listed


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """`write(temporary)` beside `path`, fsync, then rename over `path`: readers (and a run that was
    killed midway, started again) see the old file or the new one, never half of one. The file gets
    the permissions of any new file (0666 less the umask), whatever the writer created it with
    (safetensors writes 0600)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(temporary)
        with open(temporary, "rb+") as stream:
            os.fchmod(stream.fileno(), 0o666 & ~current_umask())
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def make_directory(path: Path, option: str) -> None:
    """Create the output directory `path` given by command-line `option` (parents too); a file in its
    place, or a directory that cannot be created, is a DataError naming it."""
    if path.exists() and not path.is_dir():
        raise DataError(f"{option} {path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a parent that is a file, no permission, a read-only file system
        raise DataError(f"{option} {path}: cannot create the directory ({error})") from error


def check_outputs(files: Iterable[Path], overwrite: bool, writer: str, option: str = "--out") -> None:
    """Refuse, before any work, outputs that `writer` (the command, in words) cannot or may not write: a
    file whose path is a directory, and a file that exists unless the user passed --overwrite.
    `option`: the command-line option that chose where they go."""
    files = list(files)
    folders = [str(file) for file in files if file.is_dir()]
    if folders:
        raise ConfigError(f"{option}: {writer} writes the file {listed(folders)}, which is a directory; "
                          f"choose another {option}")
    existing = [str(file) for file in files if file.exists()]
    if existing and not overwrite:
        raise ConfigError(f"{option}: {writer} would overwrite {listed(existing)}; pass --overwrite to replace "
                          f"what is there, or choose another {option}")


def files_fingerprint(root: Path, names: Iterable[str]) -> str:
    """Size and modification time of each file `root / name` ('-' if absent), hashed: what a rerun
    compares to tell changed input from the input it already processed, without reading the files."""
    parts = []
    for name in names:
        try:
            status = (root / name).stat()
            parts.append(f"{name}:{status.st_size}:{status.st_mtime_ns}")
        except OSError:
            parts.append(f"{name}:-")
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()[:16]


def current_umask() -> int:
    umask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return umask


class Journal:
    """Append-only JSON-lines record of a run in progress: a header line (the run's settings), then
    one line per finished unit of work. Resuming reads it; each unit adds one line, so the
    bookkeeping stays linear in the work done. A last line torn by a crash is ignored."""

    def __init__(self, path: Path):
        self.path = path

    def exists(self) -> bool:
        return self.path.exists()

    def read(self) -> tuple[dict, list[dict]]:
        """(header, records)."""
        parsed = []
        for line in self.path.read_bytes().splitlines():
            try:
                parsed.append(json.loads(line))
            except json.JSONDecodeError:
                break
        if not parsed or "settings" not in parsed[0]:
            raise DataError(f"{self.path}: unreadable journal of an interrupted run; use --overwrite")
        return parsed[0], parsed[1:]

    def start(self, header: dict, records: list[dict]) -> None:
        """A new journal holding `header` and the records kept from an earlier run."""
        lines = [json.dumps(header, sort_keys=True)] + [json.dumps(r, sort_keys=True) for r in records]
        write_atomically(self.path, lambda tmp: tmp.write_text("\n".join(lines) + "\n", encoding="utf-8"))

    def append(self, record: dict) -> None:
        with open(self.path, "ab") as stream:
            stream.write((json.dumps(record, sort_keys=True) + "\n").encode("utf-8"))
            stream.flush()
            os.fsync(stream.fileno())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
