"""vidar-import lerobot: v2.1 (one file per episode) and v3.0 (episodes packed in files), AV1 through PyAV."""
import json

import av
import numpy as np
import pytest

from data_tools.importers import cli
from data_tools.importers.common import IMPORT_FILE
from helpers.import_sources import (CAMERA_KEYS, SIZE, TASKS, assert_round_trip, av1_encoder, expected_sources,
                                  read_episode, write_lerobot)


def run(source, out, *extra):
    return cli.main(["lerobot", str(source), "--out", str(out), *extra])


def test_v21_one_camera_round_trip_with_the_episode_task(tmp_path):
    write_lerobot(tmp_path / "ds", "v2.1", [13, 8], fps=30)
    assert run(tmp_path / "ds", tmp_path / "out") == 0
    for index, frames in enumerate((13, 8)):
        folder = tmp_path / "out" / f"ep_{index:04d}"
        assert_round_trip(folder, expected_sources(frames, 30), composed=False)
        assert read_episode(folder)[2] == TASKS[index % 2] + "\n"


def test_v30_three_cameras_packed_in_one_file_compose_the_observation(tmp_path):
    # episode 1 starts mid-file: its frames must come from its own span of the shared videos
    write_lerobot(tmp_path / "ds", "v3.0", [7, 11, 6], fps=15, cameras=3, dim=7)
    assert run(tmp_path / "ds", tmp_path / "out", "--cameras", ",".join(CAMERA_KEYS)) == 0
    for index, frames in enumerate((7, 11, 6)):
        folder = tmp_path / "out" / f"ep_{index:04d}"
        assert read_episode(folder)[0].shape[1:] == (SIZE * 3 // 2, SIZE, 3)
        assert_round_trip(folder, expected_sources(frames, 15), composed=True)
    record = json.loads((tmp_path / "out" / IMPORT_FILE).read_text())
    assert [e["action_dim"] for e in record["episodes"]] == [7, 7, 7]


@pytest.mark.skipif(av1_encoder() is None, reason="this PyAV has no AV1 encoder to build the test video")
def test_v30_av1_videos_decode_with_pyav(tmp_path):
    write_lerobot(tmp_path / "ds", "v3.0", [9, 12], fps=20, codec=av1_encoder())
    video = tmp_path / "ds" / "videos" / CAMERA_KEYS[0] / "chunk-000" / "file-000.mp4"
    with av.open(str(video)) as container:
        assert container.streams.video[0].codec_context.codec.id == av.codec.Codec("av1", "r").id
    import decord
    with pytest.raises(decord.DECORDError):  # the reason for PyAV: decord cannot open AV1
        decord.VideoReader(str(video))
    assert run(tmp_path / "ds", tmp_path / "out") == 0
    for index, frames in enumerate((9, 12)):
        assert_round_trip(tmp_path / "out" / f"ep_{index:04d}", expected_sources(frames, 20), composed=False)


@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_faulty_episodes_are_skipped(tmp_path, version):
    non_monotonic = np.arange(8) / 10.0
    non_monotonic[4] = non_monotonic[2]
    gap = np.arange(8) / 10.0
    gap[5:] += 0.1  # a dropped frame: rows no longer on the 1/fps grid
    write_lerobot(tmp_path / "ds", version, [8, 8, 8, 8], fps=10, video_frames={1: 6},
                  timestamps={2: non_monotonic, 3: gap})
    assert run(tmp_path / "ds", tmp_path / "out") == 0
    record = json.loads((tmp_path / "out" / IMPORT_FILE).read_text())
    assert [e["episode"] for e in record["episodes"]] == ["ep_0000"]
    skips = {s["episode"]: (s["reason"], s["detail"]) for s in record["skipped"]}
    assert skips["ep_0001"][0] == "length_mismatch"
    assert skips["ep_0002"] == ("actions_invalid", "episode 2: timestamps are not increasing (row 4)")
    assert skips["ep_0003"][0] == "actions_invalid" and "off the 1/10 s grid" in skips["ep_0003"][1]
    assert_round_trip(tmp_path / "out" / "ep_0000", expected_sources(8, 10), composed=False)


def test_missing_video_is_a_skip_and_configuration_errors_stop_early(tmp_path, refused):
    write_lerobot(tmp_path / "ds", "v2.1", [6, 6], fps=10, cameras=3)
    (tmp_path / "ds" / f"videos/chunk-000/{CAMERA_KEYS[2]}/episode_000001.mp4").unlink()
    refused("choose one or three", run, tmp_path / "ds", tmp_path / "out")
    refused("no video feature observation.images.nope", run, tmp_path / "ds", tmp_path / "out",
            "--cameras", "observation.images.nope")
    refused("drop --fps", run, tmp_path / "ds", tmp_path / "out", "--fps", "10")
    assert run(tmp_path / "ds", tmp_path / "out", "--cameras", ",".join(CAMERA_KEYS)) == 0
    record = json.loads((tmp_path / "out" / IMPORT_FILE).read_text())
    assert [(s["episode"], s["reason"]) for s in record["skipped"]] == [("ep_0001", "missing_file")]


def test_rerun_after_a_metadata_change_imports_the_episodes_again(tmp_path):
    write_lerobot(tmp_path / "ds", "v2.1", [6, 6], fps=10)
    assert run(tmp_path / "ds", tmp_path / "out") == 0
    tasks = tmp_path / "ds" / "meta" / "episodes.jsonl"  # v2.1: the episode's task is its instruction
    tasks.write_text(tasks.read_text(encoding="utf-8").replace(TASKS[0], "fold the blue towel"), encoding="utf-8")
    assert run(tmp_path / "ds", tmp_path / "out") == 0
    assert read_episode(tmp_path / "out" / "ep_0000")[2] == "fold the blue towel\n"
