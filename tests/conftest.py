"""Shared test helpers: where the golden fixtures live, and a skip when they are absent; the GPU lane
(tests/gpu/, `pytest -m gpu tests/gpu`) marked `gpu` and skipped where there is no CUDA device; the
`pre_encoded` shards fixture of the single-process trainer tests. Helper modules: tests/helpers/."""
import json
import os
import re
from pathlib import Path

import pytest
import torch

from data_tools.shard import main as shard_main
from data_tools.synth import write_synthetic_episodes
from data_tools.tiny_checkpoint import TINY_T5, TINY_VAE, write_tiny_checkpoint

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


@pytest.fixture(scope="module")
def pre_encoded(tmp_path_factory):
    """Tiny checkpoint and 4 synthetic episodes as pre-encoded shards (latents and text), under one root."""
    root = tmp_path_factory.mktemp("pre_encoded")
    write_tiny_checkpoint(root / "ckpt")
    write_synthetic_episodes(root / "episodes", 4, frames=12, height=64, width=64)
    assert shard_main(["--episodes", str(root / "episodes"), "--out", str(root / "shards"),
                       "--precompute", "latents,text", "--ckpt-dir", str(root / "ckpt"), "--num-frames", "9",
                       "--height", "64", "--width", "64", "--vae-config", json.dumps(TINY_VAE),
                       "--t5-config", json.dumps(TINY_T5)]) == 0
    return root
