"""vidar-import robotwin: 3 cameras composed, the frame-rate rule exactly, skips, resume, determinism, shards."""
import json
from pathlib import Path

import numpy as np
import pytest

from data_tools.importers import cli
from data_tools.importers.common import IMPORT_FILE, IMPORT_JOURNAL
from helpers.import_sources import (SIZE, assert_round_trip, expected_sources, read_episode, write_robotwin_episode)


def run(source: Path, out: Path, *extra: str) -> int:
    return cli.main(["robotwin", str(source), "--out", str(out), *extra])


def test_three_cameras_compose_the_unified_observation_and_frames_match_action_rows(tmp_path):
    source = tmp_path / "stack_bowls" / "demo_clean"
    write_robotwin_episode(source, 0, frames=21)
    write_robotwin_episode(source, 1, frames=12)
    assert run(source, tmp_path / "episodes", "--fps", "30") == 0
    for number, frames in ((0, 21), (1, 12)):
        folder = tmp_path / "episodes" / f"ep_{number:04d}"
        assert sorted(p.name for p in folder.iterdir()) == ["actions.npy", "instruction.txt", "video.mp4"]
        decoded, actions, instruction = read_episode(folder)
        assert decoded.shape[1:] == (SIZE * 3 // 2, SIZE, 3)  # head on top, wrists at half size below
        assert actions.shape[1] == 14 and actions.dtype == np.float32
        assert instruction == f"lift block {number}\n"  # the first "seen" instruction
        assert_round_trip(folder, expected_sources(frames, 30), composed=True)


@pytest.mark.parametrize("fps", [15, 5])
def test_resampling_rule_non_integer_ratio_and_slower_source(tmp_path, fps):
    # 15 fps: output k shows source floor(1.5 k) = 0, 1, 3, 4, 6 ...; 5 fps: every source frame twice
    source = tmp_path / "src"
    write_robotwin_episode(source, 3, frames=9, cameras=1)
    assert run(source, tmp_path / "out", "--fps", str(fps), "--cameras", "head_camera") == 0
    expected = expected_sources(9, fps)
    assert expected[:5] == ([0, 1, 3, 4, 6] if fps == 15 else [0, 0, 1, 1, 2])
    assert_round_trip(tmp_path / "out" / "ep_0003", expected, composed=False)


def test_instruction_choice_and_action_columns(tmp_path):
    source = tmp_path / "src"
    write_robotwin_episode(source, 0, frames=6)
    assert run(source, tmp_path / "out", "--fps", "10", "--instruction-set", "unseen", "--instruction-index", "0",
               "--action-columns", "7-13,0") == 0
    _, actions, instruction = read_episode(tmp_path / "out" / "ep_0000")
    assert instruction == "unseen 0\n"
    assert np.array_equal(actions[2], [2 + 100 * c for c in (7, 8, 9, 10, 11, 12, 13, 0)])


def test_faulty_episodes_are_skipped_with_the_converters_reasons(tmp_path, capsys):
    source = tmp_path / "src"
    write_robotwin_episode(source, 0, frames=8)
    write_robotwin_episode(source, 1, frames=8, corrupt_frame=2)
    write_robotwin_episode(source, 2, frames=8, short_camera=True)
    write_robotwin_episode(source, 3, frames=8, instruction=False)
    write_robotwin_episode(source, 4, frames=8, instruction={"seen": [], "unseen": ["x"]})
    nan_actions = np.ones((8, 14), np.float32)
    nan_actions[5, 3] = np.nan
    write_robotwin_episode(source, 5, frames=8, actions=nan_actions)
    write_robotwin_episode(source, 6, frames=8)
    (source / "data" / "episode6.hdf5").write_bytes(b"not an hdf5 file" * 10)
    write_robotwin_episode(source, 7, frames=1)
    huge_actions = np.ones((8, 14), np.float64)
    huge_actions[2, 0] = 1e39  # finite in float64, inf in the float32 actions.npy
    write_robotwin_episode(source, 8, frames=8, actions=huge_actions)
    assert run(source, tmp_path / "out", "--fps", "10") == 0
    record = json.loads((tmp_path / "out" / IMPORT_FILE).read_text())
    reasons = {skip["episode"]: skip["reason"] for skip in record["skipped"]}
    assert reasons == {"ep_0001": "video_unreadable", "ep_0002": "length_mismatch", "ep_0003": "missing_file",
                       "ep_0004": "instruction_invalid", "ep_0005": "actions_invalid",
                       "ep_0006": "video_unreadable", "ep_0007": "video_too_short", "ep_0008": "actions_invalid"}
    assert [e["episode"] for e in record["episodes"]] == ["ep_0000"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ep_0000", IMPORT_FILE]
    report = capsys.readouterr().err
    assert "skipped data/episode1.hdf5: video_unreadable: data/episode1.hdf5 /observation/head_camera/rgb frame 2" \
        in report
    # a repaired source episode is imported when the run is started again; the others are kept
    write_robotwin_episode(source, 3, frames=8)
    kept = (tmp_path / "out" / "ep_0000" / "video.mp4").stat().st_mtime_ns
    assert run(source, tmp_path / "out", "--fps", "10") == 0
    record = json.loads((tmp_path / "out" / IMPORT_FILE).read_text())
    assert [e["episode"] for e in record["episodes"]] == ["ep_0000", "ep_0003"] and len(record["skipped"]) == 7
    assert (tmp_path / "out" / "ep_0000" / "video.mp4").stat().st_mtime_ns == kept


def test_strict_stops_at_the_first_faulty_episode(tmp_path, refused):
    source = tmp_path / "src"
    write_robotwin_episode(source, 0, frames=6, short_camera=True)
    refused("length_mismatch", run, source, tmp_path / "out", "--fps", "10", "--strict")


def test_a_source_without_one_importable_episode_is_refused(tmp_path, refused):
    source = tmp_path / "src"
    write_robotwin_episode(source, 0, frames=6, short_camera=True)
    refused(f"no episode of {source} could be imported", run, source, tmp_path / "out", "--fps", "10")


def test_import_is_deterministic_and_resumes_after_an_interruption(tmp_path, monkeypatch, refused):
    source = tmp_path / "src"
    for number in range(3):
        write_robotwin_episode(source, number, frames=6 + number)
    assert run(source, tmp_path / "clean", "--fps", "10") == 0
    assert run(source, tmp_path / "again", "--fps", "10") == 0
    files = sorted(p.relative_to(tmp_path / "clean") for p in (tmp_path / "clean").rglob("*") if p.is_file())
    assert all((tmp_path / "clean" / f).read_bytes() == (tmp_path / "again" / f).read_bytes() for f in files)

    from data_tools.importers import common
    real = common.episode_files

    def dies_on_the_third(recording, settings, where):
        if where.endswith("episode2.hdf5"):
            raise KeyboardInterrupt
        return real(recording, settings, where)

    monkeypatch.setattr(common, "episode_files", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        run(source, tmp_path / "resumed", "--fps", "10")
    assert (tmp_path / "resumed" / IMPORT_JOURNAL).exists() and not (tmp_path / "resumed" / IMPORT_FILE).exists()
    first = (tmp_path / "resumed" / "ep_0000" / "video.mp4").stat()
    monkeypatch.setattr(common, "episode_files", real)
    assert run(source, tmp_path / "resumed", "--fps", "10") == 0
    assert (tmp_path / "resumed" / "ep_0000" / "video.mp4").stat().st_mtime_ns == first.st_mtime_ns  # kept
    assert not (tmp_path / "resumed" / IMPORT_JOURNAL).exists()
    assert all((tmp_path / "clean" / f).read_bytes() == (tmp_path / "resumed" / f).read_bytes() for f in files)
    # an altered folder is imported again; other settings are refused
    (tmp_path / "resumed" / "ep_0001" / "actions.npy").write_bytes(b"changed")
    assert run(source, tmp_path / "resumed", "--fps", "10") == 0
    assert all((tmp_path / "clean" / f).read_bytes() == (tmp_path / "resumed" / f).read_bytes() for f in files)
    refused("other settings.*fps: 10.0 in the folder, 30.0 now", run, source, tmp_path / "resumed", "--fps", "30")
    refused("not empty and holds no import", run, source, source, "--fps", "10")


def test_shards_straight_from_the_source(tmp_path):
    source = tmp_path / "src"
    write_robotwin_episode(source, 0, frames=12)
    write_robotwin_episode(source, 1, frames=8, short_camera=True)
    write_robotwin_episode(source, 2, frames=9)
    assert cli.main(["robotwin", str(source), "--fps", "20", "--shards", str(tmp_path / "shards"),
                     "--action-columns", "0-6"]) == 0
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert index["complete"] and [e["episode"] for e in index["episodes"]] == ["ep_0000", "ep_0002"]
    assert [e["frames"] for e in index["episodes"]] == [len(expected_sources(12, 20)), len(expected_sources(9, 20))]
    assert index["settings"]["layout"]["action_dim"] == 7
    imported = json.loads((tmp_path / "shards" / "episodes" / IMPORT_FILE).read_text())
    assert [s["reason"] for s in imported["skipped"]] == ["length_mismatch"]


def test_configuration_errors_fail_before_any_work(tmp_path, refused):
    source = tmp_path / "src"
    write_robotwin_episode(source, 0, frames=4)
    refused("store no frame rate", run, source, tmp_path / "out")
    refused("one camera or three", run, source, tmp_path / "out", "--fps", "10", "--cameras", "head_camera,left_camera")
    refused("need --shards", run, source, tmp_path / "out", "--fps", "10", "--val-fraction", "0.1")
    assert not (tmp_path / "out").exists()


def test_a_camera_the_files_lack_is_refused_before_any_episode_is_imported(tmp_path, refused):
    source = tmp_path / "src"
    write_robotwin_episode(source, 0, frames=6)
    write_robotwin_episode(source, 1, frames=6)
    refused(r"data/episode0.hdf5: no dataset /observation/head_cam/rgb for camera head_cam; the cameras of this "
            r"file: head_camera, left_camera, right_camera \(/observation/\*/rgb\).*--cameras",
            run, source, tmp_path / "out", "--fps", "10", "--cameras", "head_cam")
    assert not (tmp_path / "out").exists()
