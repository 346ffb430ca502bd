"""The training loader: batch format, rank/worker partition, determinism and exact resume."""
import json
import multiprocessing
import shutil
import subprocess
import sys
from dataclasses import replace
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from data_tools import shard as shard_tool
from data_tools.synth import synthetic_episode, write_episode, write_synthetic_episodes
from vidartrain.config import DataConfig
from vidartrain.data.dataset import build_loader, largest_remainder_counts
from vidartrain.errors import DataError

EPISODES = 8
HEIGHT, WIDTH = 48, 64


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Eight 20-frame episodes (one recorded at 30 fps) in three shards."""
    root = tmp_path_factory.mktemp("loader")
    write_synthetic_episodes(root / "episodes", EPISODES - 1, frames=20, height=HEIGHT, width=WIDTH, seed=5)
    video, actions, text = synthetic_episode(np.random.default_rng(11), 60, HEIGHT, WIDTH)
    write_episode(root / "episodes" / "ep_fast", video, actions[::3], text, fps=30)
    assert shard_tool.main(["--episodes", str(root / "episodes"), "--out", str(root / "shards"),
                            "--samples-per-shard", "3"]) == 0
    return root / "shards"


def config(shards, **overrides):
    base = DataConfig(shards=str(shards), num_frames=6, height=40, width=32, fps=10, cfg_prob=0.3,
                      num_workers=0, seed=7)
    return replace(base, **overrides)


def keys_of(batches):
    return [key for batch in batches for key in batch["__key__"]]


def test_batch_format(shards):
    loader = build_loader(shards, config(shards), micro_batch_size=2, rank=0, world_size=1, epochs=1)
    batches = list(loader)
    assert len(batches) == EPISODES // 2
    batch = batches[0]
    assert batch["video"].shape == (2, 3, 6, 40, 32) and batch["video"].dtype == torch.float32
    assert batch["video"].min() >= -1 and batch["video"].max() <= 1 and batch["video"].std() > 0.05
    assert batch["actions"].shape == (2, 6, 14) and batch["actions"].dtype == torch.float32
    assert isinstance(batch["text"], list) and len(batch["text"]) == 2
    assert batch["text_dropped"].dtype == torch.bool and batch["text_dropped"].shape == (2,)
    assert sorted(keys_of(batches)) == sorted([f"ep_{i:04d}" for i in range(EPISODES - 1)] + ["ep_fast"])


def assert_square_at_action(frame: torch.Tensor, action: torch.Tensor, key: str) -> None:
    """The red square of a synthetic frame [3, H, W] in [-1, 1] sits where its action puts it."""
    pixels = ((frame.permute(1, 2, 0) + 1) * 127.5).numpy()  # [H, W, 3]
    rows, cols = np.nonzero(np.abs(pixels - (220, 60, 40)).max(-1) < 40)
    assert abs(cols.mean() - (float(action[0]) + 1) / 2 * (WIDTH - 1)) < 2.5, key
    assert abs(rows.mean() - (float(action[1]) + 1) / 2 * (HEIGHT - 1)) < 2.5, key


@pytest.mark.parametrize("fps", [10, 5])
def test_frames_match_actions_including_resampled_episode(shards, fps):
    """The red square sits where the sampled frame's action puts it: video and actions are aligned, also
    when data.fps (5) resamples the shards' 10 fps, where a clip takes every other recorded step."""
    cfg = config(shards, height=HEIGHT, width=WIDTH, num_frames=5, cfg_prob=0.0, fps=fps)
    step = 10 // fps
    for batch in build_loader(shards, cfg, micro_batch_size=1, rank=0, world_size=1, epochs=1):
        key, clip = batch["__key__"][0], batch["actions"][0].numpy()
        recorded = np.load(shards.parent / "episodes" / key / "actions.npy")
        assert any(np.array_equal(clip, recorded[start: start + step * len(clip): step])
                   for start in range(len(recorded))), key
        for frame, action in zip(batch["video"][0].unbind(1), batch["actions"][0]):
            assert_square_at_action(frame, action, key)


def test_two_ranks_two_workers_are_disjoint_and_cover(shards):
    seen = []
    for rank in range(2):
        loader = build_loader(shards, config(shards, num_workers=2), micro_batch_size=1, rank=rank,
                              world_size=2, epochs=1)
        seen.append(keys_of(loader))
    assert len(seen[0]) == len(seen[1]) == EPISODES // 2
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == EPISODES


def test_workers_do_not_change_the_sequence(shards):
    runs = []
    for workers in (0, 2):
        loader = build_loader(shards, config(shards, num_workers=workers), micro_batch_size=1, rank=1,
                              world_size=2, epochs=2)
        runs.append(list(loader))
    assert keys_of(runs[0]) == keys_of(runs[1])
    for a, b in zip(*runs):
        assert torch.equal(a["video"], b["video"]) and torch.equal(a["actions"], b["actions"])
        assert a["text"] == b["text"]


def test_workers_outlive_a_preemption_sigterm_so_their_rank_can_finish_and_save(shards):
    # a preempting launcher or scheduler signals the rank's workers too; the rank still needs batches
    # to finish its step (and must not see a worker die under it) before it saves
    expected = keys_of(build_loader(shards, config(shards), 1, rank=0, world_size=1, epochs=1))
    batches = iter(build_loader(shards, config(shards, num_workers=2), 1, rank=0, world_size=1, epochs=1))
    received = [next(batches), next(batches)]  # one from each worker: both are running
    workers = multiprocessing.active_children()
    assert len(workers) == 2
    subprocess.run(["kill", "-TERM", *(str(worker.pid) for worker in workers)], check=True)  # not the parent
    received.extend(batches)
    assert keys_of(received) == expected
    assert all(worker.exitcode == 0 for worker in workers)


def test_workers_still_stop_when_their_rank_terminates_them(shards):
    # how a rank that exits on an error (or multiprocessing at interpreter exit) ends its workers
    batches = iter(build_loader(shards, config(shards, num_workers=2), 1, rank=0, world_size=1, epochs=1))
    next(batches)
    workers = multiprocessing.active_children()
    for worker in workers:
        worker.terminate()
        worker.join(timeout=30)
    assert [worker.is_alive() for worker in workers] == [False, False]


def test_seed_decides_the_order_and_epochs_differ(shards):
    def order(seed):
        loader = build_loader(shards, config(shards, seed=seed), micro_batch_size=1, rank=0, world_size=1, epochs=2)
        return keys_of(loader)
    first = order(7)
    assert first == order(7) and first != order(8)
    assert sorted(first[:EPISODES]) == sorted(first[EPISODES:]) and first[:EPISODES] != first[EPISODES:]


def test_each_epoch_draws_new_clip_windows_and_text_dropout(shards):
    """Per-sample randomness is seeded by (seed, epoch, key): a sample read again in the next epoch gets
    another window of its episode (20 frames, windows of 6) and another dropout draw."""
    loader = build_loader(shards, config(shards), micro_batch_size=1, rank=0, world_size=1, epochs=2)
    clips = [{}, {}]
    for count, batch in enumerate(loader):
        clips[count // EPISODES][batch["__key__"][0]] = (batch["actions"][0], bool(batch["text_dropped"][0]))
    assert sorted(clips[0]) == sorted(clips[1])
    assert any(not torch.equal(clips[0][key][0], clips[1][key][0]) for key in clips[0])
    assert any(clips[0][key][1] != clips[1][key][1] for key in clips[0])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_exactly_the_rest(shards, workers):
    cfg = config(shards, num_workers=workers)
    make = lambda: build_loader(shards, cfg, micro_batch_size=1, rank=1, world_size=2, epochs=3)
    full = list(make())
    assert len(full) == 3 * EPISODES // 2
    for k in (3, 5):  # inside the first epoch, and past the epoch boundary
        interrupted = make()
        head = list(islice(iter(interrupted), k))
        state = json.loads(json.dumps(interrupted.state_dict()))  # survives a checkpoint round trip
        resumed = make()
        resumed.load_state_dict(state)
        tail = list(resumed)
        assert keys_of(head + tail) == keys_of(full)
        for a, b in zip(head + tail, full):
            assert torch.equal(a["video"], b["video"]) and torch.equal(a["text_dropped"], b["text_dropped"])


def test_resume_on_another_world_size_neither_repeats_nor_skips(shards):
    two_ranks = [build_loader(shards, config(shards), micro_batch_size=1, rank=r, world_size=2, epochs=1)
                 for r in range(2)]
    consumed = [keys_of(islice(iter(loader), 1)) for loader in two_ranks]
    state = two_ranks[0].state_dict()
    assert state["samples_consumed"] == 2 and state["samples_consumed_per_rank"] == 1
    single = build_loader(shards, config(shards), micro_batch_size=1, rank=0, world_size=1, epochs=1)
    single.load_state_dict(state)
    rest = keys_of(single)
    assert sorted(consumed[0] + consumed[1] + rest) == sorted(keys_of(
        build_loader(shards, config(shards), micro_batch_size=1, rank=0, world_size=1, epochs=1)))


def test_state_from_another_seed_is_refused(shards):
    state = build_loader(shards, config(shards), 1, rank=0, world_size=1).state_dict()
    other = build_loader(shards, config(shards, seed=1), 1, rank=0, world_size=1)
    with pytest.raises(DataError, match="the training data changed since the checkpoint: its loader state has seed"):
        other.load_state_dict(state)


def test_too_few_samples_for_one_batch_on_every_rank_are_refused_when_the_loader_is_built(shards):
    # refused at once, not at the first batch: on 64 GPUs that comes after the model and the engine
    with pytest.raises(DataError, match="8 samples cannot fill one batch of 100 on each of 1 ranks"):
        build_loader(shards, config(shards), 100, rank=0, world_size=1)
    with pytest.raises(DataError, match=r"8 samples cannot fill one batch of 1 on each of 64 ranks \(64 samples"):
        build_loader(shards, config(shards), 1, rank=63, world_size=64)
    with pytest.raises(DataError, match="on each of 9 ranks"):  # an evaluation: the last rank would read none
        build_loader(shards, config(shards), 1, rank=8, world_size=9, train=False)
    assert len(list(build_loader(shards, config(shards), 1, rank=7, world_size=8, epochs=1))) == 1


def test_text_dropout(shards):
    always = build_loader(shards, config(shards, cfg_prob=1.0), 4, rank=0, world_size=1, epochs=1)
    never = build_loader(shards, config(shards, cfg_prob=0.0), 4, rank=0, world_size=1, epochs=1)
    for batch in always:
        assert batch["text_dropped"].all() and batch["text"] == ["", "", "", ""]
    for batch in never:
        assert not batch["text_dropped"].any() and all(batch["text"])


def test_evaluation_loader_reads_everything_in_order_without_dropout(shards):
    loader = build_loader(shards, config(shards, cfg_prob=1.0), 3, rank=0, world_size=1, train=False)
    batches = list(loader)
    assert [len(b["__key__"]) for b in batches] == [3, 3, 2]
    index = json.loads((shards / "index.json").read_text())
    assert keys_of(batches) == [e["key"] for s in index["shards"] for e in s["entries"]]
    assert not any(b["text_dropped"].any() for b in batches)
    # on 3 ranks too, each sample once: rank r reads positions r, r + 3, ... (training ranks drop the 2 left over)
    by_rank = [keys_of(build_loader(shards, config(shards), 1, rank=rank, world_size=3, train=False))
               for rank in range(3)]
    assert by_rank == [keys_of(batches)[rank::3] for rank in range(3)]


def test_idm_frame_pairs(shards):
    loader = build_loader(shards, config(shards, height=HEIGHT, width=WIDTH), micro_batch_size=4, rank=0,
                          world_size=1, epochs=1, mode="frames", frames_per_sample=2)
    batches = list(loader)
    assert len(batches) == EPISODES * 2 // 4
    batch = batches[0]
    assert batch["frame"].shape == (4, 3, HEIGHT, WIDTH) and batch["action"].shape == (4, 14)
    episode, frame = batch["__key__"][0].split("/")
    assert 0 <= int(frame) < 20
    # at 5 fps (the shards hold 10) each pair's action is that of its frame on the dataset's timeline, and an
    # episode's pairs are distinct frames
    slower = config(shards, height=HEIGHT, width=WIDTH, fps=5)
    for batch in build_loader(shards, slower, micro_batch_size=8, rank=0, world_size=1, epochs=1, mode="frames",
                              frames_per_sample=8):
        assert len(set(batch["__key__"])) == 8
        for frame, action, key in zip(batch["frame"], batch["action"], batch["__key__"]):
            assert_square_at_action(frame, action, key)
    with pytest.raises(ValueError, match="multiple of frames_per_sample"):
        build_loader(shards, config(shards), 3, rank=0, world_size=1, mode="frames", frames_per_sample=2)


def test_too_short_samples_are_left_out_with_a_warning(shards):
    with pytest.warns(UserWarning, match="fewer than 21 frames"):
        with pytest.raises(DataError, match="no sample has 21 frames"):
            build_loader(shards, config(shards, num_frames=21), 1, rank=0, world_size=1)


def test_truncated_shard_is_refused_at_start(shards, tmp_path):
    copy = tmp_path / "shards"
    copy.mkdir()
    for file in shards.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    (copy / "shard-000000.tar").write_bytes((shards / "shard-000000.tar").read_bytes()[:5000])
    with pytest.raises(DataError, match="shard-000000.tar: 5000 bytes, index.json says"):
        build_loader(copy, config(copy), 1, rank=0, world_size=1, train=False)


RANK_SCRIPT = """
import json, sys
import torch.distributed as dist
from vidartrain.config import DataConfig
from vidartrain.data.dataset import build_loader, largest_remainder_counts
dist.init_process_group("gloo")
config = DataConfig(shards=sys.argv[1], num_frames=6, height=40, width=32, num_workers=2, seed=3)
loader = build_loader(config.shards, config, 1, epochs=1)  # rank and world size from torch.distributed
keys = [key for batch in loader for key in batch["__key__"]]
with open(f"{sys.argv[2]}/rank{dist.get_rank()}.json", "w") as out:
    json.dump({"keys": keys, "world_size": loader.state_dict()["world_size"]}, out)
dist.destroy_process_group()
"""


def test_ranks_from_torchrun_read_disjoint_samples(shards, tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(script),
                             str(shards), str(tmp_path)], cwd=Path(__file__).resolve().parents[2],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert len(ranks[0]["keys"]) == len(ranks[1]["keys"]) == EPISODES // 2
    assert not set(ranks[0]["keys"]) & set(ranks[1]["keys"])
    assert len(set(ranks[0]["keys"]) | set(ranks[1]["keys"])) == EPISODES


def test_uint8_video_is_the_same_pixels(shards):
    from vidartrain.data.transforms import to_model_range
    make = lambda dtype: build_loader(shards, config(shards), 2, rank=0, world_size=1, epochs=1, video_dtype=dtype)
    for as_float, as_uint8 in zip(make(torch.float32), make(torch.uint8)):
        assert as_uint8["video"].dtype == torch.uint8 and as_uint8["__key__"] == as_float["__key__"]
        assert torch.equal(to_model_range(as_uint8["video"]), as_float["video"])
    with pytest.raises(ValueError, match="video dtype"):
        make(torch.float16)


def test_resume_on_more_ranks_than_the_epoch_rest_can_feed(shards):
    three = build_loader(shards, config(shards), 1, rank=0, world_size=3, epochs=2)
    list(islice(iter(three), 1))  # 3 of 8 samples consumed; 5 left cannot give each of 6 ranks one
    six = build_loader(shards, config(shards), 1, rank=0, world_size=6, epochs=2)
    six.load_state_dict(three.state_dict())
    batches = list(six)
    assert len(batches) == 1 and six.state_dict()["epoch"] == 2
    fresh = build_loader(shards, config(shards), 1, rank=0, world_size=6, epochs=2)
    assert keys_of(batches) == keys_of(list(fresh)[1:])  # the first batch of epoch 1


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """Two small shard directories (5 and 3 episodes, both from ep_0000 on) for mixtures."""
    root = tmp_path_factory.mktemp("mixture")
    for name, count, seed in (("a", 5, 1), ("b", 3, 2)):
        write_synthetic_episodes(root / name / "episodes", count, frames=6, height=32, width=32, seed=seed)
        assert shard_tool.main(["--episodes", str(root / name / "episodes"), "--out", str(root / name / "shards")]) == 0
    return [{"path": str(root / "a" / "shards"), "weight": 3}, {"path": str(root / "b" / "shards"), "weight": 1}]


def mixture_config(sources):
    return DataConfig(shards=sources, num_frames=5, height=32, width=32, fps=10, cfg_prob=0.0, num_workers=0,
                      seed=3)


def test_mixture_draws_sources_by_weight_and_counts_them(two_sources):
    data = mixture_config(two_sources)
    loader = build_loader(data.shards, data, 4, rank=0, world_size=1)
    batches = list(islice(loader, 100))  # 400 samples
    from_a = sum(key in set(keys_of_source(two_sources, 0)) for key in keys_of(batches))
    assert abs(from_a / 400 - 0.75) <= 0.05 * 0.75
    counts = loader.samples_by_source()
    assert counts == {two_sources[0]["path"]: from_a, two_sources[1]["path"]: 400 - from_a}
    assert loader.samples_by_source() == counts  # asking again counts no epoch twice
    # each source's samples come as its endless stream, one new permutation after another, across epochs
    for number in range(len(two_sources)):
        names = keys_of_source(two_sources, number)
        stream = [key for key in keys_of(batches) if key in set(names)]
        cycles = [stream[i: i + len(names)] for i in range(0, len(stream) - len(names) + 1, len(names))]
        assert all(sorted(cycle) == sorted(names) for cycle in cycles)
        assert len({tuple(cycle) for cycle in cycles}) > 1
    # and which source fills which position is drawn anew each epoch (8 samples)
    from_which = [key in set(keys_of_source(two_sources, 0)) for key in keys_of(batches)]
    assert from_which[:8] != from_which[8:16]


def test_mixture_shares_are_rounded_by_largest_remainder():
    # the fixtures' mixtures divide evenly; these leave remainders to hand out
    assert largest_remainder_counts(10, [2.0, 1.0]) == [7, 3]  # 6.67, 3.33
    assert largest_remainder_counts(5, [1.0, 3.0]) == [1, 4]  # 1.25, 3.75
    assert largest_remainder_counts(3, [1.0, 1.0, 1.0, 1.0]) == [1, 1, 1, 0]  # ties: the first sources


def keys_of_source(sources, number):
    """The keys a mixture of `sources` gives the samples of sources[number]."""
    index = json.loads((Path(sources[number]["path"]) / "index.json").read_text())
    return [f"{number}:{entry['key']}" for shard in index["shards"] for entry in shard["entries"]]


def test_mixture_resumes_exactly_and_refuses_other_weights(two_sources):
    data = mixture_config(two_sources)
    reference = [b["video"] for b in islice(build_loader(data.shards, data, 2, rank=0, world_size=1), 14)]
    first = build_loader(data.shards, data, 2, rank=0, world_size=1)
    head = list(islice(first, 9))  # past the end of the first epoch (8 samples = 4 batches)
    state = first.state_dict()
    resumed = build_loader(data.shards, data, 2, rank=0, world_size=1)
    resumed.load_state_dict(state)
    tail = list(islice(resumed, 5))
    assert all(torch.equal(a, b["video"]) for a, b in zip(reference, head + tail))
    assert resumed.samples_by_source() == build_loader_after(data, 14).samples_by_source()
    other = mixture_config([{**two_sources[0], "weight": 1}, two_sources[1]])
    with pytest.raises(ValueError, match="sources"):
        build_loader(other.shards, other, 2, rank=0, world_size=1).load_state_dict(state)


def test_mixture_counts_stay_exact_across_a_resume_on_another_world_size(two_sources):
    # 9 samples on 1 rank (epoch 0: all 8, epoch 1: 1), resumed on 3 ranks, whose whole epoch is 6 samples
    # (2 batches x 3 ranks): epoch 0 was counted as 6 of them, and epoch 1 (1 + 6 read, the last one dropped)
    # as 6 too
    data = mixture_config(two_sources)
    first = build_loader(data.shards, data, 1, rank=0, world_size=1)
    head = keys_of(islice(first, 9))
    three = [build_loader(data.shards, data, 1, rank=rank, world_size=3) for rank in range(3)]
    for loader in three:
        loader.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert three[0].samples_by_source() == first.samples_by_source()
    tails = [keys_of(islice(loader, 3)) for loader in three]  # the rest of epoch 1, then 1 batch of epoch 2
    counts = three[0].samples_by_source()
    assert sum(counts.values()) == 9 + 9
    used = head + [key for step in zip(*tails) for key in step]
    assert counts[two_sources[0]["path"]] == sum(key.startswith("0:") for key in used)


def test_a_mixture_of_robots_with_other_action_spaces_gives_clips_without_actions(two_sources, tmp_path):
    # a one-arm robot (7 action dimensions) beside the two-arm sources (14): the DiT stages train on it
    write_synthetic_episodes(tmp_path / "episodes", 2, frames=6, height=32, width=32, seed=3, action_dim=7)
    assert shard_tool.main(["--episodes", str(tmp_path / "episodes"), "--out", str(tmp_path / "shards"),
                            "--action-dim", "7"]) == 0
    sources = [two_sources[0], {"path": str(tmp_path / "shards"), "weight": 1}]
    loader = build_loader(sources, mixture_config(sources), 2, rank=0, world_size=1, epochs=1, actions=False)
    batches = list(loader)
    assert {key[:2] for key in keys_of(batches)} == {"0:", "1:"} and not any("actions" in b for b in batches)
    # batches that carry actions would stack 14 and 7 dimensions: refused when the loader is built
    for options in ({}, {"mode": "frames"}):
        with pytest.raises(DataError, match=r"actions of different dimensions .*shards: 14.*shards: 7"):
            build_loader(sources, mixture_config(sources), 2, rank=0, world_size=1, **options)


def test_sources_with_the_same_episode_names_keep_apart_in_keys_and_draws(shards, tmp_path):
    """Two sources may both hold an `ep_0000`: a mixture puts each source's place in data.shards before
    its keys, so a step's keys tell its samples apart and the per-sample draws seeded by them (clip
    window, text dropout) are independent."""
    shutil.copytree(shards, tmp_path / "copy")
    sources = [{"path": str(shards), "weight": 1}, {"path": str(tmp_path / "copy"), "weight": 1}]
    loader = build_loader(sources, config(sources), micro_batch_size=1, rank=0, world_size=1, epochs=1)
    clips = {batch["__key__"][0]: (batch["actions"][0], bool(batch["text_dropped"][0])) for batch in loader}
    names = keys_of(build_loader(shards, config(shards), micro_batch_size=1, rank=0, world_size=1, epochs=1))
    assert sorted(clips) == sorted(f"{source}:{name}" for source in (0, 1) for name in names)
    assert any(not torch.equal(clips[f"0:{name}"][0], clips[f"1:{name}"][0]) for name in names)
    assert any(clips[f"0:{name}"][1] != clips[f"1:{name}"][1] for name in names)


def test_mixture_evaluation_reads_every_sample_once_whatever_the_weights(two_sources):
    data = mixture_config(two_sources)  # weights 3:1 over 5 and 3 samples
    loader = build_loader(data.shards, data, 3, rank=0, world_size=1, train=False)
    assert keys_of(loader) == keys_of_source(two_sources, 0) + keys_of_source(two_sources, 1)


def build_loader_after(data, batches):
    loader = build_loader(data.shards, data, 2, rank=0, world_size=1)
    for _ in islice(loader, batches):
        pass
    return loader
