"""The errors a user can fix, and how entry points report them.

Library code (vidartrain/, data_tools/) raises a `VidarError` when the input it was given is wrong: a
configuration value, a data file, a checkpoint. The message says which file or key and what was
expected. Entry points wrap their `main` in `reports_errors`, which prints `error: <message>` to stderr
and exits with status 2, instead of a traceback. Anything else (a bug, an out-of-memory) still raises.

`ConfigError` and `DataError` are also `ValueError`s and `CheckpointError` a `RuntimeError`, as they
were before the family existed, so code that catches the built-in kinds (e.g. the loader counting
undecodable samples as bad ones) keeps its behaviour.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, TypeVar

EXIT_USER_ERROR = 2  # what argparse uses for bad arguments, too


class VidarError(Exception):
    """Bad input the user can fix; the message says what and where."""


class ConfigError(VidarError, ValueError):
    """A configuration value (YAML, --set override, command-line flag, DeepSpeed profile) that cannot work."""


class DataError(VidarError, ValueError):
    """An episode, shard, index or output folder that is missing, unreadable or inconsistent."""


class CheckpointError(VidarError, RuntimeError):
    """A checkpoint that cannot be written, trusted or loaded; the message says which and why."""


class ArchitectureMismatch(CheckpointError):
    """A checkpoint whose tensor names or shapes do not fit the model built to hold it."""


def cwd_note(*paths: str | Path) -> str:
    """' (relative paths are read from CWD)' when some of `paths` is relative, else '': the launch scripts
    run from the repository root, which need not be where the command was typed."""
    return f" (relative paths are read from {Path.cwd()})" if any(not Path(p).is_absolute() for p in paths) else ""


def listed(names: list[str], limit: int = 10) -> str:
    """'a, b, c and 7 more': names for a message, the first `limit` of them."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


Main = TypeVar("Main", bound=Callable[..., int])


def reports_errors(main: Main) -> Main:
    """Wrap an entry point's `main`: a VidarError becomes `error: <message>` on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except VidarError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            return EXIT_USER_ERROR

    return wrapper  # type: ignore[return-value]
