"""Shared test helpers: where the golden fixtures live, and a skip when they are absent; the GPU lane
(tests/gpu/, `pytest -m gpu tests/gpu`) marked `gpu` and skipped where there is no CUDA device."""
import os
import re
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("VIDARTRAIN_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures"))

# Fixtures were generated with 2 threads; CPU conv kernels depend on the thread count.
torch.set_num_threads(2)


def fixture_path(*parts: str) -> Path:
    """Path of a golden fixture file; skips the calling test with the reason when it is absent."""
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"golden fixture {path} is absent (expected ../shared/fixtures beside the repo, "
                    f"or set VIDARTRAIN_FIXTURES)")
    return path


NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(item.path).parent.name == "gpu":
            item.add_marker(pytest.mark.gpu)
            item.add_marker(NO_CUDA)


@pytest.fixture
def refused(capsys):
    """`refused(pattern, main, *args)`: the entry point `main(*args)` exits with status 2, prints
    `error: <message>` matching `pattern` to stderr and nothing to stdout; returns the message."""
    def check(pattern: str, main, *args) -> str:
        capsys.readouterr()
        status = main(*args)
        out, err = capsys.readouterr()
        assert status == 2, f"exit status {status}, expected 2; stderr:\n{err}"
        assert out == "", f"stdout should be empty, got:\n{out}"
        message = err[err.rindex("error: ") + len("error: "):] if "error: " in err else ""
        assert re.search(pattern, message), f"{pattern!r} not in the error message:\n{err}"
        return message
    return check
