"""Synthetic episodes and the validation every episode passes before it is written to a shard."""
import io
import json
import shutil
from pathlib import Path

import av
import numpy as np
import pytest

from data_tools import episodes as episodes_module
from data_tools import synth
from data_tools.episodes import (SKIP_REASONS, EpisodeError, EpisodeLayout, discover_episodes, load_episode)
from data_tools.synth import (DEFECTS, random_actions, render_frames, synthetic_episode, write_defective_episode,
                              write_episode, write_synthetic_episodes)
from vidartrain.data.observation import compose_observation
from vidartrain.data.transforms import resample_indices
from vidartrain.data.video import decode_all_frames, describe_decord_error, encode_mp4
from vidartrain.errors import DataError

LAYOUT = EpisodeLayout()


def test_synthetic_episodes_are_real_videos_and_deterministic(tmp_path):
    first = write_synthetic_episodes(tmp_path / "a", 2, frames=12, height=48, width=64, seed=3)
    second = write_synthetic_episodes(tmp_path / "b", 2, frames=12, height=48, width=64, seed=3)
    other = write_synthetic_episodes(tmp_path / "c", 1, frames=12, height=48, width=64, seed=4)
    for a, b in zip(first, second):
        for name in ("video.mp4", "actions.npy", "instruction.txt"):
            assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (first[0] / "actions.npy").read_bytes() != (other[0] / "actions.npy").read_bytes()
    frames, info = decode_all_frames((first[0] / "video.mp4").read_bytes())
    assert frames.shape == (12, 48, 64, 3) and info.fps == 10
    assert np.load(first[0] / "actions.npy").shape == (12, 14)


def test_synth_refuses_existing_episodes_unless_overwrite_replaces_them_whole(tmp_path, refused):
    out = tmp_path / "episodes"
    write_synthetic_episodes(out, 1, frames=6, height=32, width=32, cameras=True)
    (out / "mine").mkdir()  # not a folder vidar-synth writes
    (out / "ep_0001").mkdir()  # empty: nothing to lose
    before = {p.name: p.read_bytes() for p in (out / "ep_0000").iterdir()}
    args = ["--episodes", "2", "--frames", "6", "--height", "32", "--width", "32", "--out", str(out), "--seed", "5"]
    refused(f"--out {out} already holds ep_0000; use --overwrite", synth.main, args)
    assert {p.name: p.read_bytes() for p in (out / "ep_0000").iterdir()} == before
    (out / "bad_empty_folder").mkdir()
    (out / "bad_empty_folder" / "notes.txt").write_text("mine")
    refused("already holds bad_empty_folder;", synth.main, ["--episodes", "0", "--out", str(out), "--defects"])
    assert synth.main([*args, "--overwrite"]) == 0
    fresh = write_synthetic_episodes(tmp_path / "fresh", 2, frames=6, height=32, width=32, seed=5)
    for folder in fresh:  # the camera videos of the old ep_0000 are gone
        assert {p.name: p.read_bytes() for p in (out / folder.name).iterdir()} == {
            p.name: p.read_bytes() for p in folder.iterdir()}
    assert (out / "mine").is_dir()


@pytest.mark.parametrize("args, message", [
    (["--height", "45"], "--height 45 --width 128: frame sizes must be positive and even"),
    (["--width", "0"], "--height 144 --width 0: frame sizes must be positive and even"),
    (["--height", "50", "--cameras"], "--cameras --height 50: the head camera's height must be a multiple of 4"),
    (["--frames", "1"], "--frames 1 --fps 10: an episode needs at least 2 frames"),
    (["--fps", "0"], "--frames 40 --fps 0: an episode needs at least 2 frames"),
])
def test_synth_refuses_sizes_it_cannot_write_before_writing_anything(tmp_path, refused, args, message):
    refused(message, synth.main, ["--episodes", "2", "--out", str(tmp_path / "episodes"), *args])
    assert not (tmp_path / "episodes").exists()


def test_shapes_follow_the_actions():
    actions = random_actions(np.random.default_rng(0), 6)
    frames = render_frames(actions, 60, 80, np.array([100, 100, 100], np.uint8))
    for frame, action in zip(frames, actions):
        rows, cols = np.nonzero((frame == (220, 60, 40)).all(-1))
        assert abs(cols.mean() - (action[0] + 1) / 2 * 79) < 1.0
        assert abs(rows.mean() - (action[1] + 1) / 2 * 59) < 1.0


def test_valid_episode_keeps_the_video_bytes(tmp_path):
    (folder,) = write_synthetic_episodes(tmp_path, 1, frames=10, height=48, width=64)
    episode = load_episode(tmp_path, folder.name, LAYOUT)
    assert episode.video == (folder / "video.mp4").read_bytes()
    assert episode.frames == 10 and episode.actions.shape == (10, 14) and not episode.reencoded
    assert episode.instruction == (folder / "instruction.txt").read_text().strip()


def test_a_byte_order_mark_is_not_part_of_the_instruction(tmp_path):
    (folder,) = write_synthetic_episodes(tmp_path, 1, frames=8, height=32, width=32)
    (folder / "instruction.txt").write_bytes("\ufeffpick up the bl\u00f6ck\n".encode("utf-8"))
    assert load_episode(tmp_path, folder.name, LAYOUT).instruction == "pick up the bl\u00f6ck"


@pytest.mark.parametrize("kind", sorted(DEFECTS))
def test_every_defect_is_skipped_with_its_reason(tmp_path, kind):
    expected = write_defective_episode(kind, tmp_path / "bad")
    with pytest.raises(EpisodeError) as caught:
        load_episode(tmp_path, "bad", LAYOUT)
    assert caught.value.reason == expected
    assert caught.value.detail


def test_every_reason_has_a_defect():
    assert set(DEFECTS.values()) == set(SKIP_REASONS)


def test_manifest_entry_without_folder_is_missing_file(tmp_path):
    write_synthetic_episodes(tmp_path, 1, frames=8, height=32, width=32)
    (tmp_path / "manifest.json").write_text(json.dumps({"episodes": [{"episode": "ep_0000"}, "ep_0042"]}))
    assert discover_episodes(tmp_path) == ["ep_0000", "ep_0042"]
    with pytest.raises(EpisodeError) as caught:
        load_episode(tmp_path, "ep_0042", LAYOUT)
    assert caught.value.reason == "missing_file"


def test_hidden_folders_are_not_episodes(tmp_path):
    # e.g. vidar-import's .ep_0000.altered.partial: the old copy of an episode it was replacing when killed
    (folder,) = write_synthetic_episodes(tmp_path, 1, frames=4, height=32, width=32)
    shutil.copytree(folder, tmp_path / ".ep_0000.altered.partial")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    assert discover_episodes(tmp_path) == ["ep_0000"]


def test_bad_manifest_names_the_file(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"episodes": [3]}))
    with pytest.raises(DataError, match="manifest.json: entry 0"):
        discover_episodes(tmp_path)


@pytest.mark.parametrize("listing", [["ep_0000", "ep_0001", "ep_0000"],
                                     {"episodes": ["ep_0000", "ep_0001", "./ep_0000/"]}])
def test_manifest_listing_an_episode_twice_is_refused(tmp_path, listing):
    (tmp_path / "manifest.json").write_text(json.dumps(listing))
    with pytest.raises(DataError, match="manifest.json: entries 0 and 2 both name episode 'ep_0000'; list each "
                                        "episode once"):
        discover_episodes(tmp_path)


@pytest.mark.parametrize("extra_rows", [-1, 0, 1])
def test_lengths_within_one_are_trimmed(tmp_path, extra_rows):
    video, actions, text = synthetic_episode(np.random.default_rng(1), 12, 32, 32)
    write_episode(tmp_path / "ep", video, random_actions(np.random.default_rng(2), 12 + extra_rows), text)
    episode = load_episode(tmp_path, "ep", LAYOUT)
    assert episode.frames == min(12, 12 + extra_rows) == len(episode.actions)


def test_length_off_by_two_is_a_mismatch(tmp_path):
    video, actions, text = synthetic_episode(np.random.default_rng(1), 12, 32, 32)
    write_episode(tmp_path / "ep", video, actions[:10], text)
    with pytest.raises(EpisodeError, match="length_mismatch"):
        load_episode(tmp_path, "ep", LAYOUT)


def test_two_frames_at_30fps_are_too_short_at_10fps(tmp_path):
    video, actions, text = synthetic_episode(np.random.default_rng(1), 2, 32, 32)
    write_episode(tmp_path / "ep", video, actions[:1], text, fps=30)
    with pytest.raises(EpisodeError) as caught:
        load_episode(tmp_path, "ep", LAYOUT)
    assert caught.value.reason == "video_too_short"


def test_other_frame_rate_is_resampled_and_recorded(tmp_path):
    video, actions30, text = synthetic_episode(np.random.default_rng(1), 30, 32, 32)
    actions10 = actions30[::3]
    write_episode(tmp_path / "ep", video, actions10, text, fps=30)
    episode = load_episode(tmp_path, "ep", LAYOUT)
    assert episode.reencoded and episode.source_fps == 30 and episode.video_fps == 10
    stored, info = decode_all_frames(episode.video)
    assert info.fps == 10 and len(stored) == episode.frames == 10
    np.testing.assert_array_equal(episode.actions, actions10)
    # the stored frames are frames 0, 3, 6, ... of the source (up to H.264 loss)
    source, _ = decode_all_frames((tmp_path / "ep" / "video.mp4").read_bytes())
    assert np.abs(stored.astype(int) - source[::3].astype(int)).mean() < 3


@pytest.mark.parametrize("fps, frames, rows", [(30, 30, 30), (30, 31, 30), (30, 30, 31), (15, 9, 9)])
def test_actions_with_one_row_per_source_frame_are_resampled_like_the_video(tmp_path, fps, frames, rows):
    (folder,) = write_synthetic_episodes(tmp_path, 1, frames=frames, height=32, width=32, fps=fps)
    recorded = random_actions(np.random.default_rng(5), rows)
    np.save(folder / "actions.npy", recorded)
    episode = load_episode(tmp_path, folder.name, LAYOUT)
    # the importers' frame-rate rule: output row k is the row of the source frame shown at k / 10 s
    rows_at_10, frames_at_10 = resample_indices(rows, fps, 10), resample_indices(frames, fps, 10)
    assert episode.frames == min(len(rows_at_10), len(frames_at_10)) and episode.source_fps == fps
    np.testing.assert_array_equal(episode.actions, recorded[rows_at_10][:episode.frames])


def test_actions_of_neither_count_are_a_mismatch_that_says_what_was_expected(tmp_path):
    (folder,) = write_synthetic_episodes(tmp_path, 1, frames=30, height=32, width=32, fps=30)
    np.save(folder / "actions.npy", random_actions(np.random.default_rng(5), 25))
    with pytest.raises(EpisodeError) as caught:
        load_episode(tmp_path, folder.name, LAYOUT)
    assert caught.value.reason == "length_mismatch"
    assert caught.value.detail.endswith("(video.mp4 10, actions.npy 25); at 30 fps, actions.npy needs one row per "
                                        "frame of video.mp4 (30) or per frame of the 10 fps timeline (10)")


def test_resample_indices():
    np.testing.assert_array_equal(resample_indices(90, 30, 10), np.arange(0, 90, 3))
    np.testing.assert_array_equal(resample_indices(4, 5, 10), [0, 0, 1, 1, 2, 2, 3])
    np.testing.assert_array_equal(resample_indices(7, 10, 10), np.arange(7))
    assert len(resample_indices(25, 25, 10)) == 10


def test_reencode_option(tmp_path):
    (folder,) = write_synthetic_episodes(tmp_path, 1, frames=10, height=48, width=64)
    episode = load_episode(tmp_path, folder.name, EpisodeLayout(reencode=True, qp=30))
    assert episode.reencoded and episode.video != (folder / "video.mp4").read_bytes()
    assert decode_all_frames(episode.video)[0].shape == (10, 48, 64, 3)


def test_compose_observation_geometry():
    head = np.full((2, 480, 640, 3), 10, np.uint8)
    left = np.full((2, 480, 640, 3), 100, np.uint8)
    right = np.full((2, 480, 640, 3), 200, np.uint8)
    frame = compose_observation(head, left, right)
    assert frame.shape == (2, 720, 640, 3)
    assert (frame[:, :480] == 10).all()
    assert (frame[:, 480:, :320] == 100).all() and (frame[:, 480:, 320:] == 200).all()
    with pytest.raises(ValueError, match="different frame counts"):
        compose_observation(head, left[:1], right)


def test_cameras_are_composed_into_one_video(tmp_path):
    write_synthetic_episodes(tmp_path, 1, frames=6, height=48, width=64, cameras=True)
    layout = EpisodeLayout(cameras=("head.mp4", "left_wrist.mp4", "right_wrist.mp4"))
    episode = load_episode(tmp_path, "ep_0000", layout)
    frames, _ = decode_all_frames(episode.video)
    assert frames.shape == (6, 72, 64, 3)
    head, _ = decode_all_frames((tmp_path / "ep_0000" / "head.mp4").read_bytes())
    assert np.abs(frames[:, :48].astype(int) - head.astype(int)).mean() < 3
    (tmp_path / "ep_0000" / "right_wrist.mp4").unlink()
    with pytest.raises(EpisodeError, match="missing_file"):
        load_episode(tmp_path, "ep_0000", layout)


def test_undecodable_video_details_carry_no_clock_time_or_source_location(tmp_path):
    nested = RuntimeError("[06:35:40] /src/threaded_decoder.cc:292: [06:35:40] /src/threaded_decoder.cc:218: "
                          "Check failed: send >= 0 (-1 vs. 0) Thread worker: Error sending packet.\nStack trace")
    assert describe_decord_error(nested) == "Check failed: send >= 0 (-1 vs. 0) Thread worker: Error sending packet."
    # a stream damaged mid-way fails in decord's decoder thread, whose message is nested like that
    (folder,) = write_synthetic_episodes(tmp_path, 1, frames=40, height=48, width=64)
    data = bytearray((folder / "video.mp4").read_bytes())
    data[len(data) // 2: len(data) // 2 + 200] = bytes(200)
    (folder / "video.mp4").write_bytes(bytes(data))
    with pytest.raises(EpisodeError) as caught:
        load_episode(tmp_path, folder.name, LAYOUT)
    assert caught.value.reason == "video_unreadable" and "Check failed" in caught.value.detail
    assert "[" not in caught.value.detail and ".cc:" not in caught.value.detail


def test_actions_beyond_the_float32_range_are_invalid(tmp_path):
    # finite as stored (float64), inf in the float32 actions the shards hold
    video, actions, text = synthetic_episode(np.random.default_rng(0), 4, 32, 32)
    huge = actions.astype(np.float64)
    huge[1, 3] = 1e39
    write_episode(tmp_path / "ep_0000", video, huge, text)
    with pytest.raises(EpisodeError, match="actions.npy has non-finite values \\(as float32\\) in 1 rows"):
        load_episode(tmp_path, "ep_0000", LAYOUT)


def test_a_video_whose_first_frame_does_not_decode_is_skipped_not_raised(tmp_path):
    # the frame size is read from frame 0: decord's DECORDError (not a RuntimeError) must become a skip
    (folder,) = write_synthetic_episodes(tmp_path, 1, frames=12, height=48, width=64)
    data = bytearray((folder / "video.mp4").read_bytes())
    first_frame = data.find(b"mdat") + 4
    data[first_frame: first_frame + 200] = bytes(200)
    (folder / "video.mp4").write_bytes(bytes(data))
    with pytest.raises(EpisodeError) as caught:
        load_episode(tmp_path, folder.name, LAYOUT)
    assert caught.value.reason == "video_unreadable" and "cannot decode frames 0..0" in caught.value.detail


def test_encode_rejects_odd_sizes():
    with pytest.raises(ValueError, match="even"):
        encode_mp4(np.zeros((2, 31, 32, 3), np.uint8), 10)


def test_sensor_noise_raises_the_bitrate_deterministically(tmp_path):
    flat = write_synthetic_episodes(tmp_path / "flat", 1, frames=8, height=48, width=64, seed=1)[0]
    noisy = write_synthetic_episodes(tmp_path / "noisy", 1, frames=8, height=48, width=64, seed=1, noise=6.0)[0]
    again = write_synthetic_episodes(tmp_path / "again", 1, frames=8, height=48, width=64, seed=1, noise=6.0)[0]
    assert (noisy / "video.mp4").stat().st_size > 2 * (flat / "video.mp4").stat().st_size
    assert (noisy / "video.mp4").read_bytes() == (again / "video.mp4").read_bytes()


@pytest.mark.parametrize("file, reason", [("video.mp4", "video_unreadable"), ("actions.npy", "actions_invalid"),
                                          ("instruction.txt", "instruction_invalid")])
def test_unreadable_files_are_reported_not_raised(tmp_path, monkeypatch, file, reason):
    (folder,) = write_synthetic_episodes(tmp_path, 1, frames=8, height=48, width=64)
    real_read_bytes, real_open = Path.read_bytes, open

    def refuse(path):
        if Path(path).name == file:
            raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "read_bytes", lambda path: refuse(path) or real_read_bytes(path))
    monkeypatch.setattr(episodes_module, "open", lambda path, *a: refuse(path) or real_open(path, *a),
                        raising=False)
    with pytest.raises(EpisodeError) as caught:
        load_episode(tmp_path, folder.name, EpisodeLayout())
    assert caught.value.reason == reason and "Permission denied" in caught.value.detail


def test_a_directory_in_place_of_a_file_is_missing(tmp_path):
    (folder,) = write_synthetic_episodes(tmp_path, 1, frames=8, height=48, width=64)
    (folder / "video.mp4").unlink()
    (folder / "video.mp4").mkdir()
    with pytest.raises(EpisodeError, match="missing_file"):
        load_episode(tmp_path, folder.name, EpisodeLayout())


def test_cameras_at_different_frame_rates_meet_on_the_10fps_timeline(tmp_path):
    video, actions, text = synthetic_episode(np.random.default_rng(4), 24, 48, 64)
    folder = tmp_path / "ep"
    write_episode(folder, {"head.mp4": video[::3], "left_wrist.mp4": video, "right_wrist.mp4": video[::3]},
                  actions[::3], text)
    (folder / "left_wrist.mp4").write_bytes(encode_mp4(video, 30))  # the left wrist camera runs at 30 fps
    layout = EpisodeLayout(cameras=("head.mp4", "left_wrist.mp4", "right_wrist.mp4"))
    episode = load_episode(tmp_path, "ep", layout)
    assert episode.frames == 8 and episode.source_fps == 10
    frames, _ = decode_all_frames(episode.video)
    assert frames.shape == (8, 72, 64, 3)
    (folder / "left_wrist.mp4").write_bytes(encode_mp4(video, 10))  # 24 frames at 10 fps: 16 too many
    with pytest.raises(EpisodeError, match="length_mismatch"):
        load_episode(tmp_path, "ep", layout)


def odd_size_mp4(frames: np.ndarray, fps: int) -> bytes:
    """An mp4 of odd frame size (4:4:4 H.264 allows one; the yuv420p that encode_mp4 writes does not)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv444p"
        for index, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
            picture.pts = index
            container.mux(stream.encode(picture))
        container.mux(stream.encode())
    return buffer.getvalue()


def test_a_frame_size_h264_cannot_store_skips_the_episode(tmp_path):
    # a composed 50x64 head camera gives a 75x64 frame; an odd-sized 30 fps video must be re-encoded
    video, actions, text = synthetic_episode(np.random.default_rng(2), 12, 50, 64)
    write_episode(tmp_path / "composed", {"head.mp4": video, "left_wrist.mp4": video, "right_wrist.mp4": video},
                  actions, text)
    with pytest.raises(EpisodeError) as caught:
        load_episode(tmp_path, "composed", EpisodeLayout(cameras=("head.mp4", "left_wrist.mp4", "right_wrist.mp4")))
    assert caught.value.reason == "video_unreadable"
    assert "head camera size 50x64 would compose a 75x64 frame" in caught.value.detail
    write_episode(tmp_path / "odd", video, actions[::3], text)
    (tmp_path / "odd" / "video.mp4").write_bytes(odd_size_mp4(video[:, :45], 30))
    with pytest.raises(EpisodeError) as caught:
        load_episode(tmp_path, "odd", LAYOUT)
    assert caught.value.reason == "video_unreadable" and "even height and width, got 45x64" in caught.value.detail
