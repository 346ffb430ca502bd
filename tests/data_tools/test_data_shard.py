"""The converter (episodes -> WebDataset shards + index.json) and the inspection tool."""
import io
import json
import re
import sys
import tarfile

import numpy as np
import pytest

from data_tools import inspect as inspect_tool
from data_tools import shard as shard_tool
from data_tools.synth import (DEFECTS, synthetic_episode, write_defective_episode, write_episode,
                              write_synthetic_episodes)
from vidartrain.data.shard_index import JOURNAL_FILE, read_index
from vidartrain.errors import DataError
from vidartrain.files import Journal
from vidartrain.data.video import decode_all_frames

GOOD = 6


@pytest.fixture(scope="module")
def mixed_episodes(tmp_path_factory):
    """Six good episodes (one at 30 fps) and one episode of every defect kind."""
    root = tmp_path_factory.mktemp("episodes")
    write_synthetic_episodes(root, GOOD - 1, frames=12, height=48, width=64, seed=0)
    video, actions, text = synthetic_episode(np.random.default_rng(9), 36, 48, 64)
    write_episode(root / "ep_fast", video, actions[:12], text, fps=30)
    for kind in DEFECTS:
        write_defective_episode(kind, root / f"bad_{kind}", frames=8, height=48, width=64)
    return root


def run(episodes, out, *extra):
    return shard_tool.main(["--episodes", str(episodes), "--out", str(out), *map(str, extra)])


def test_mixed_directory_converts_good_and_reports_each_bad(mixed_episodes, tmp_path):
    assert run(mixed_episodes, tmp_path / "out", "--samples-per-shard", 4) == 0
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["complete"] and index["mode"] == "raw"
    assert sorted(e["episode"] for e in index["episodes"]) == sorted([f"ep_{i:04d}" for i in range(GOOD - 1)]
                                                                     + ["ep_fast"])
    reasons = {skip["episode"]: skip["reason"] for skip in index["skipped"]}
    assert reasons == {f"bad_{kind}": reason for kind, reason in DEFECTS.items()}
    assert all(set(skip) >= {"episode", "reason", "detail"} and skip["detail"] for skip in index["skipped"])
    assert [s["samples"] for s in index["shards"]] == [4, 2]
    fast = next(e for e in index["episodes"] if e["episode"] == "ep_fast")
    assert fast["source_fps"] == 30 and fast["fps"] == 10 and fast["frames"] == 12 and fast["reencoded"]
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        members = tar.getmembers()
    assert {m.name.split(".", 1)[1] for m in members} == {"mp4", "actions.npy", "txt", "json"}
    assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in members)
    first = index["shards"][0]
    assert first["entries"][0]["offset"] == 0 and first["entries"][1]["offset"] == first["entries"][0]["size"]
    assert not list((tmp_path / "out").glob(".*tmp"))


def test_same_input_gives_byte_identical_shards(mixed_episodes, tmp_path):
    run(mixed_episodes, tmp_path / "a", "--samples-per-shard", 3)
    run(mixed_episodes, tmp_path / "b", "--samples-per-shard", 3, "--workers", 2)
    names = sorted(p.name for p in (tmp_path / "a").glob("shard-*.tar"))
    assert names == sorted(p.name for p in (tmp_path / "b").glob("shard-*.tar")) and len(names) == 2
    for name in [*names, "index.json"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_bytes_per_shard(mixed_episodes, tmp_path):
    run(mixed_episodes, tmp_path / "out", "--bytes-per-shard", 1)
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [1] * GOOD


def test_interrupted_run_resumes_without_redoing_finished_shards(mixed_episodes, tmp_path, monkeypatch):
    run(mixed_episodes, tmp_path / "reference", "--samples-per-shard", 2)
    out = tmp_path / "out"
    original_add, calls = shard_tool.ShardSequence.add, []

    def add_then_crash(self, sample, entry):
        calls.append(sample["__key__"])
        if len(calls) == 4:  # two shards of two finished, the third half written
            raise KeyboardInterrupt
        return original_add(self, sample, entry)

    monkeypatch.setattr(shard_tool.ShardSequence, "add", add_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run(mixed_episodes, out, "--samples-per-shard", 2)
    monkeypatch.setattr(shard_tool.ShardSequence, "add", original_add)
    # no index.json yet (loaders refuse the directory), no half-written shard; the journal lists shard 0
    assert sorted(p.name for p in out.iterdir()) == [".journal.jsonl", "shard-000000.tar"]
    _, records = Journal(out / JOURNAL_FILE).read()
    assert [r["shard"]["name"] for r in records] == ["shard-000000.tar"]
    with pytest.raises(DataError, match="did not finish"):
        read_index(out)
    with (out / ".journal.jsonl").open("ab") as journal:
        journal.write(b'{"shard": {"name": "shard-0000')  # a line torn by a crash
    # shard 0 stays; damage is detected by checksum and that shard is written again
    (out / "shard-000001.tar").write_bytes(b"stale")
    kept = (out / "shard-000000.tar").stat()
    assert run(mixed_episodes, out, "--samples-per-shard", 2) == 0
    assert (out / "shard-000000.tar").stat().st_ino == kept.st_ino
    assert (out / "shard-000000.tar").stat().st_mtime_ns == kept.st_mtime_ns
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar"):
        assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()
    final = json.loads((out / "index.json").read_text())
    reference = json.loads((tmp_path / "reference" / "index.json").read_text())
    for field in ("shards", "episodes", "skipped", "complete"):
        assert final[field] == reference[field]
    assert not (out / ".journal.jsonl").exists()


def test_corrupted_finished_shard_is_rewritten(mixed_episodes, tmp_path):
    out = tmp_path / "out"
    run(mixed_episodes, out, "--samples-per-shard", 4)
    good, index = (out / "shard-000001.tar").read_bytes(), (out / "index.json").read_bytes()
    (out / "shard-000001.tar").write_bytes(good[:-1] + b"X")
    run(mixed_episodes, out, "--samples-per-shard", 4)
    assert (out / "shard-000001.tar").read_bytes() == good
    assert (out / "index.json").read_bytes() == index  # shard 0's record was taken over from the old index


def test_other_settings_in_same_out_dir_are_refused(mixed_episodes, tmp_path, refused):
    run(mixed_episodes, tmp_path / "out", "--samples-per-shard", 4)
    refused("other settings", run, mixed_episodes, tmp_path / "out", "--samples-per-shard", 3)
    assert run(mixed_episodes, tmp_path / "out", "--samples-per-shard", 3, "--overwrite") == 0
    assert len(list((tmp_path / "out").glob("shard-*.tar"))) == 2


def test_strict_stops_at_first_bad_episode(mixed_episodes, tmp_path, refused):
    refused("--strict: episode .*bad_actions_inf", run, mixed_episodes, tmp_path / "out", "--strict")
    assert not (tmp_path / "out" / "index.json").exists()


def test_nothing_valid_is_refused(tmp_path, refused):
    write_defective_episode("video_truncated", tmp_path / "episodes" / "bad")
    refused("no valid episode in the train split", run, tmp_path / "episodes", tmp_path / "out")
    skipped = json.loads((tmp_path / "out" / "index.json").read_text())["skipped"]
    assert [(s["episode"], s["reason"]) for s in skipped] == [("bad", "video_unreadable")]


def test_episodes_that_would_share_a_sample_key_are_refused(tmp_path, refused):
    write_synthetic_episodes(tmp_path / "episodes", 2, frames=4, height=16, width=16)
    (tmp_path / "episodes" / "ep_0000").rename(tmp_path / "episodes" / "arm.v2")
    (tmp_path / "episodes" / "ep_0001").rename(tmp_path / "episodes" / "arm_v2")
    refused("episodes arm.v2 and arm_v2 would share one sample key", run, tmp_path / "episodes", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_out_that_cannot_be_a_directory_is_refused(mixed_episodes, tmp_path, refused):
    (tmp_path / "file").write_text("mine")
    refused(f"--out {tmp_path / 'file'} is a file, not a directory", run, mixed_episodes, tmp_path / "file")
    refused(f"--out {tmp_path / 'file' / 'shards'}: cannot create the directory .*Not a directory", run,
            mixed_episodes, tmp_path / "file" / "shards")
    assert (tmp_path / "file").read_text() == "mine"


def test_val_split_is_deterministic_and_disjoint(mixed_episodes, tmp_path):
    run(mixed_episodes, tmp_path / "out", "--val-fraction", 0.3)
    train = json.loads((tmp_path / "out" / "index.json").read_text())
    val = json.loads((tmp_path / "out" / "val" / "index.json").read_text())
    assert train["val"] == "val" and val["complete"] and val["split"] == "val"
    train_names = {e["episode"] for e in train["episodes"]}
    val_names = {e["episode"] for e in val["episodes"]}
    assert not train_names & val_names and len(train_names | val_names) == GOOD and val_names
    assert len(train["skipped"]) == len(DEFECTS)  # the top-level index lists both splits' skips
    names = sorted(p.name for p in mixed_episodes.iterdir())
    assert shard_tool.assign_splits(names, 0.3, 0) == shard_tool.assign_splits(names, 0.3, 0)
    assert shard_tool.assign_splits(names, 0.3, 0) != shard_tool.assign_splits(names, 0.3, 1)


def test_growing_a_dataset_never_moves_an_episode_between_splits():
    # a grown dataset converted again into a new folder: no earlier val episode may leak into training
    names = [f"ep_{i:04d}" for i in range(20)]
    grown = names + [f"ep_{i:04d}" for i in range(20, 400)]
    before, after = shard_tool.assign_splits(names, 0.2, 0), shard_tool.assign_splits(grown, 0.2, 0)
    assert before == {name: after[name] for name in names} and "val" in before.values()
    assert abs(list(after.values()).count("val") / len(grown) - 0.2) < 0.05  # the fraction, on average


def test_a_fraction_that_holds_out_no_episode_or_every_episode_is_refused(mixed_episodes, tmp_path, refused):
    # (an episode is held out iff its draw is below the fraction; the error says which fraction would do)
    names = sorted(p.name for p in mixed_episodes.iterdir())
    draws = sorted(shard_tool.split_draw(name, 0) for name in names)
    none = refused(rf"--val-fraction {draws[0]} holds out none of the {len(names)} episodes",
                   run, mixed_episodes, tmp_path / "none", "--val-fraction", draws[0])
    every = refused(rf"--val-fraction {draws[-1] + 1e-9} holds out every one of the {len(names)} episodes",
                    run, mixed_episodes, tmp_path / "all", "--val-fraction", draws[-1] + 1e-9)
    assert not (tmp_path / "none" / "index.json").exists() and not (tmp_path / "all" / "index.json").exists()
    enough = float(re.search(r"a --val-fraction of ([0-9.]+) or more holds out at least one", none).group(1))
    at_most = float(re.search(r"a --val-fraction of ([0-9.]+) or less trains on at least one", every).group(1))
    assert "val" in shard_tool.assign_splits(names, enough, 0).values()
    assert "train" in shard_tool.assign_splits(names, at_most, 0).values()


def test_progress_line(mixed_episodes, tmp_path, capsys):
    run(mixed_episodes, tmp_path / "out")
    err = capsys.readouterr().err
    assert f"[train] {GOOD + len(DEFECTS)}/{GOOD + len(DEFECTS)} episodes" in err and "ep/s" in err and "ETA" in err
    # each skipped episode with its reason, as vidar-import lists them (not only in index.json)
    assert ("  skipped bad_missing_instruction (train): missing_file: bad_missing_instruction lacks instruction.txt"
            in err)


def test_progress_in_a_log_file_is_one_line_per_update(monkeypatch):
    log = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", log)
    progress = shard_tool.Progress("train", 3, every_s=0.0)
    for skipped in (False, True, False):
        progress.update(skipped)
    lines = log.getvalue().split("\n")
    assert "\r" not in log.getvalue() and lines[-1] == "" and len(lines) == 4
    assert lines[0].startswith("[train] 1/3 episodes") and lines[2].endswith("skipped 1")


def test_inspect_reports_and_verifies(mixed_episodes, tmp_path, capsys):
    out = tmp_path / "out"
    run(mixed_episodes, out, "--samples-per-shard", 4, "--val-fraction", 0.2)
    capsys.readouterr()
    assert inspect_tool.main([str(out)]) == 0
    text = capsys.readouterr().out
    assert "train: 5 episodes" in text and "val  : 1 episodes" in text and "OK" in text
    assert "samples: video, actions of 14 dimensions" in text  # what idm.gripper_dims and the IDM must fit
    assert f"skipped: {len(DEFECTS)}" in text and "actions_invalid: 7" in text
    assert inspect_tool.main([str(out / "val")]) == 0
    assert capsys.readouterr().out.startswith("val  : 1 episodes")  # names the split it reads
    assert inspect_tool.main([str(out), str(out / "val")]) == 0  # several directories (a mixture's sources)
    text = capsys.readouterr().out
    assert f"{out}:\n  train: 5 episodes" in text and f"{out / 'val'}:\n  val  : 1 episodes" in text
    shard = out / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert inspect_tool.main([str(out), "--no-decode"]) == 1
    assert "sha256 does not match" in capsys.readouterr().err


def test_inspect_catches_undecodable_video_behind_a_valid_checksum(mixed_episodes, tmp_path, capsys):
    out = tmp_path / "out"
    run(mixed_episodes, out)
    index = json.loads((out / "index.json").read_text())
    shard = out / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    entry = index["shards"][0]["entries"][0]
    with tarfile.open(shard) as tar:
        video = next(m for m in tar.getmembers() if m.name == f"{entry['key']}.mp4")
    data[video.offset_data: video.offset_data + video.size] = bytes(video.size)  # zero the mp4 in place
    shard.write_bytes(bytes(data))
    index["shards"][0]["sha256"] = shard_tool.file_sha256(shard)
    (out / "index.json").write_text(json.dumps(index))
    assert inspect_tool.main([str(out)]) == 1
    assert "video does not decode" in capsys.readouterr().err


def test_inspect_names_the_bad_samples_of_a_shard_whose_checksum_does_not_match(mixed_episodes, tmp_path, capsys):
    out = tmp_path / "out"
    run(mixed_episodes, out)
    shard = out / "shard-000000.tar"
    keys = [entry["key"] for entry in json.loads((out / "index.json").read_text())["shards"][0]["entries"]]
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        video, header = tar.getmember(f"{keys[1]}.mp4"), tar.getmember(f"{keys[3]}.actions.npy")
    data[video.offset_data: video.offset_data + video.size] = bytes(video.size)  # zero an mp4 in place
    data[header.offset: header.offset + 512] = bytes(range(256)) * 2            # garble a tar header
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert inspect_tool.main([str(out)]) == 1
    problems = [line for line in capsys.readouterr().err.splitlines() if line.startswith("PROBLEM")]
    assert len(problems) == 3 and problems[0] == f"PROBLEM {shard}: sha256 does not match index.json"
    assert problems[1].startswith(f"PROBLEM {shard}: sample {keys[1]}: video does not decode")
    assert problems[2].startswith(f"PROBLEM {shard}: sample {keys[3]}: cannot be read at its offset (ReadError")


def test_cameras_option_composes_the_unified_observation(tmp_path):
    write_synthetic_episodes(tmp_path / "episodes", 2, frames=6, height=48, width=64, cameras=True)
    assert run(tmp_path / "episodes", tmp_path / "out", "--cameras", "head.mp4,left_wrist.mp4,right_wrist.mp4") == 0
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert [e["episode"] for e in index["episodes"]] == ["ep_0000", "ep_0001"]
    assert index["episodes"][0]["source"] == "ep_0000/head.mp4,ep_0000/left_wrist.mp4,ep_0000/right_wrist.mp4"
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        video = tar.extractfile("ep_0000.mp4").read()
    frames, _ = decode_all_frames(video)
    assert frames.shape == (6, 72, 64, 3)  # head 48x64 on top, two 24x32 wrist views below
    # a head camera whose composed frame H.264 cannot store costs its episode, not the run
    write_episode(tmp_path / "episodes" / "ep_0002",
                  *synthetic_episode(np.random.default_rng(0), 6, height=50, width=64, cameras=True))
    cameras = "head.mp4,left_wrist.mp4,right_wrist.mp4"
    assert run(tmp_path / "episodes", tmp_path / "with_odd", "--cameras", cameras) == 0
    skipped = json.loads((tmp_path / "with_odd" / "index.json").read_text())["skipped"]
    assert [(s["episode"], s["reason"]) for s in skipped] == [("ep_0002", "video_unreadable")]
    # without --cameras the same folders lack video.mp4
    assert run(tmp_path / "episodes", tmp_path / "plain") == 2
    assert {s["reason"] for s in json.loads((tmp_path / "plain" / "index.json").read_text())["skipped"]} == {
        "missing_file"}
