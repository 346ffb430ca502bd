"""vidar-import aloha: raw and JPEG-compressed images, one or three cameras, instruction sources, skips."""
import json

import h5py
import pytest

from data_tools.importers import cli
from data_tools.importers.common import IMPORT_FILE
from helpers.import_sources import assert_round_trip, expected_sources, read_episode, write_aloha_episode


def run(source, out, *extra):
    return cli.main(["aloha", str(source), "--out", str(out), *extra])


@pytest.mark.parametrize("compressed", [False, True])
def test_round_trip_three_cameras(tmp_path, compressed):
    write_aloha_episode(tmp_path / "src", 0, frames=20, compressed=compressed, sidecar="put the cup on the plate")
    write_aloha_episode(tmp_path / "src", 12, frames=11, compressed=compressed, sidecar="stack the cups")
    assert run(tmp_path / "src", tmp_path / "out", "--fps", "50") == 0
    assert_round_trip(tmp_path / "out" / "ep_0000", expected_sources(20, 50), composed=True)
    assert_round_trip(tmp_path / "out" / "ep_0012", expected_sources(11, 50), composed=True)
    assert read_episode(tmp_path / "out" / "ep_0012")[2] == "stack the cups\n"


def test_one_camera_with_a_command_line_instruction(tmp_path, capsys):
    write_aloha_episode(tmp_path / "src", 3, frames=9)
    assert run(tmp_path / "src", tmp_path / "out", "--fps", "20", "--cameras", "cam_high",
               "--instruction", "wipe the table") == 0
    # progress as vidar-shard writes it: whole lines in a log (stderr is no terminal here), no carriage returns
    report = capsys.readouterr().err
    assert "\r" not in report and report.startswith("[import] 1/1 episodes") and "skipped 0\n" in report
    assert_round_trip(tmp_path / "out" / "ep_0003", expected_sources(9, 20), composed=False)
    assert read_episode(tmp_path / "out" / "ep_0003")[2] == "wipe the table\n"


def test_faults_are_skipped(tmp_path):
    source = tmp_path / "src"
    write_aloha_episode(source, 0, frames=6, sidecar="ok")
    write_aloha_episode(source, 1, frames=6)                      # no sidecar, no --instruction
    write_aloha_episode(source, 2, frames=6, sidecar="   ")        # empty instruction
    path = write_aloha_episode(source, 3, frames=6, sidecar="x")
    with h5py.File(path, "a") as file:                           # camera without one frame per action row
        del file["observations/images/cam_left_wrist"]
        file.create_dataset("observations/images/cam_left_wrist", data=file["observations/images/cam_high"][:4])
    path = write_aloha_episode(source, 4, frames=6, sidecar="x")
    with h5py.File(path, "a") as file:                           # no such action dataset
        del file["action"]
    assert run(source, tmp_path / "out", "--fps", "10") == 0
    record = json.loads((tmp_path / "out" / IMPORT_FILE).read_text())
    assert [e["episode"] for e in record["episodes"]] == ["ep_0000"]
    assert {s["episode"]: s["reason"] for s in record["skipped"]} == {
        "ep_0001": "missing_file", "ep_0002": "instruction_invalid", "ep_0003": "length_mismatch",
        "ep_0004": "actions_invalid"}


def test_jpeg_channel_order(tmp_path):
    # OpenCV JPEGs of RGB arrays decode with red and blue swapped unless --jpeg-channels bgr puts them back
    write_aloha_episode(tmp_path / "src", 0, frames=4, compressed=True, sidecar="x")
    assert run(tmp_path / "src", tmp_path / "rgb", "--fps", "10", "--cameras", "cam_high", "--jpeg-channels", "rgb") == 0
    with pytest.raises(AssertionError, match="channel order"):
        assert_round_trip(tmp_path / "rgb" / "ep_0000", expected_sources(4, 10), composed=False)


def test_rerun_imports_changed_sources_again_and_removes_episodes_no_longer_imported(tmp_path, capsys):
    source, out = tmp_path / "src", tmp_path / "out"
    for number in range(4):
        write_aloha_episode(source, number, frames=21, sidecar="stack the cups")
    assert run(source, out, "--fps", "50") == 0
    (out / "notes").mkdir()  # the user's own folder beside the import
    write_aloha_episode(source, 0, frames=11, sidecar="stack the cups")   # fewer frames
    (source / "episode_1.txt").write_text("stack the two cups", encoding="utf-8")  # another instruction
    (source / "episode_2.hdf5").unlink()                                  # gone from the source
    with h5py.File(source / "episode_3.hdf5", "a") as file:               # broken since: now skipped
        del file["action"]
    capsys.readouterr()
    assert run(source, out, "--fps", "50") == 0
    record = json.loads((out / IMPORT_FILE).read_text())
    assert [e["episode"] for e in record["episodes"]] == ["ep_0000", "ep_0001"]
    assert [s["episode"] for s in record["skipped"]] == ["ep_0003"]
    assert sorted(p.name for p in out.iterdir()) == ["ep_0000", "ep_0001", IMPORT_FILE, "notes"]
    assert_round_trip(out / "ep_0000", expected_sources(11, 50), composed=True)
    assert read_episode(out / "ep_0001")[2] == "stack the two cups\n"
    report = capsys.readouterr().err
    assert f"{out / 'ep_0002'} was imported from episode_2.hdf5, which is gone from the source: removing it" in report
    assert f"{out / 'ep_0000'} was imported from source files that changed since" in report
    # an unchanged source keeps its folder as it is
    kept = (out / "ep_0001" / "video.mp4").stat().st_mtime_ns
    assert run(source, out, "--fps", "50") == 0
    assert (out / "ep_0001" / "video.mp4").stat().st_mtime_ns == kept


def test_an_episodes_dir_that_is_a_file_is_refused(tmp_path, refused):
    write_aloha_episode(tmp_path / "src", 0, frames=4, sidecar="x")
    (tmp_path / "out").write_text("mine")
    refused(f"EPISODES_DIR {tmp_path / 'out'} is a file, not a directory", run, tmp_path / "src", tmp_path / "out",
            "--fps", "10")


def test_an_edited_record_cannot_make_the_import_remove_other_folders(tmp_path, refused):
    write_aloha_episode(tmp_path / "src", 0, frames=4, sidecar="x")
    assert run(tmp_path / "src", tmp_path / "out", "--fps", "10") == 0
    record = json.loads((tmp_path / "out" / IMPORT_FILE).read_text())
    record["episodes"][0]["episode"] = "../victim"
    (tmp_path / "out" / IMPORT_FILE).write_text(json.dumps(record))
    (tmp_path / "victim").mkdir()
    refused("lists episode '../victim', not a folder name vidar-import writes", run, tmp_path / "src",
            tmp_path / "out", "--fps", "10")
    assert (tmp_path / "victim").is_dir()


def test_a_camera_the_files_lack_is_refused_before_any_episode_is_imported(tmp_path, refused):
    source = tmp_path / "src"
    source.mkdir()
    (source / "episode_0.hdf5").write_bytes(b"not an hdf5 file" * 10)  # passed over: skipped as an episode
    write_aloha_episode(source, 1, frames=6, sidecar="x")
    write_aloha_episode(source, 2, frames=6, sidecar="x")
    refused(r"episode_1.hdf5: no dataset /observations/images/cam_hihg for camera cam_hihg; the cameras of this "
            r"file: cam_high, cam_left_wrist, cam_right_wrist \(/observations/images/\*\).*--cameras",
            run, source, tmp_path / "out", "--fps", "10", "--cameras", "cam_hihg")
    assert not (tmp_path / "out").exists()  # no episode was read, skipped or written
