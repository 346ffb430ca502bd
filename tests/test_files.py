"""Atomic writes: the old file survives a failed write, and no temporary file is left behind."""
import pytest

from vidartrain.files import write_atomically


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
