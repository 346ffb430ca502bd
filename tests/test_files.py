"""Atomic writes: the old file survives a failed write, and no temporary file is left behind. Outputs
are never written over a directory, nor over a file without --overwrite."""
import pytest

from vidartrain.errors import ConfigError
from vidartrain.files import check_outputs, write_atomically


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "index.json"
    write_atomically(target, lambda tmp: tmp.write_text("old"))

    def crash(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, crash)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json"]
    write_atomically(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new"


def test_exported_safetensors_get_the_same_permissions_as_the_pt(tmp_path):
    import os

    import torch

    from vidartrain.distributed.export import write_state_dict

    previous = os.umask(0o022)
    try:
        pt_path, st_path = write_state_dict({"w": torch.zeros(2)}, tmp_path / "vidar.pt")
    finally:
        os.umask(previous)
    assert oct(pt_path.stat().st_mode & 0o777) == oct(st_path.stat().st_mode & 0o777) == oct(0o644)


def test_outputs_replace_existing_files_only_under_overwrite_and_never_a_directory(tmp_path):
    outputs = [tmp_path / "sample.mp4", tmp_path / "frames.png"]
    check_outputs(outputs, False, "the sample")
    outputs[1].write_bytes(b"earlier")
    with pytest.raises(ConfigError, match=f"--out: the sample would overwrite {outputs[1]}; pass --overwrite"):
        check_outputs(outputs, False, "the sample")
    check_outputs(outputs, True, "the sample")
    outputs[0].mkdir()
    with pytest.raises(ConfigError, match=f"--dest: the sample writes the file {outputs[0]}, which is a directory"):
        check_outputs(outputs, True, "the sample", option="--dest")
    assert outputs[1].read_bytes() == b"earlier"
