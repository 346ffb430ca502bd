"""Pre-encoded shards: VAE latents per window, one umT5 embedding per instruction, pooled IDM masks,
and a training side that reads them with no video decoding and no model."""
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from data_tools import inspect as inspect_tool
from data_tools import shard as shard_tool
from data_tools.precompute import Precomputer, WindowSettings, episode_windows, settings_record, text_key
from data_tools.synth import write_synthetic_episodes
from data_tools.tiny_checkpoint import TINY_T5, TINY_VAE, write_tiny_checkpoint
from vidartrain.config import DataConfig
from vidartrain.data.dataset import build_loader
from vidartrain.data.transforms import to_model_range
from vidartrain.errors import ConfigError
from vidartrain.models.idm import idm_input_size, save_idm
from vidartrain.trainers.conditioning import FrozenConditioner
from helpers.trainer_launch import tiny_idm
from vidartrain.models.wan.text_encoder import TextEncoder
from vidartrain.models.wan.vae import WanVAE

REPO = Path(__file__).resolve().parents[2]
WINDOW = WindowSettings(num_frames=5, stride=4, height=32, width=32)
EPISODES, FRAMES = 6, 12  # windows start at 0 and 4: two samples per episode


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("precompute")
    write_synthetic_episodes(root / "episodes", EPISODES, frames=FRAMES, height=48, width=64, seed=2)
    write_synthetic_episodes(root / "short", 1, frames=4, height=48, width=64, seed=3)
    (root / "episodes" / "ep_short").symlink_to(root / "short" / "ep_0000")
    write_tiny_checkpoint(root / "ckpt")
    return root


@pytest.fixture(scope="module")
def pre_encoded(workspace):
    """Shards with latents, text and IDM masks (float32, so values can be compared exactly)."""
    ckpt = workspace / "ckpt"
    vae = WanVAE.from_pretrained(ckpt / "Wan2.2_VAE.pth", **TINY_VAE)
    text_encoder = TextEncoder.from_pretrained(ckpt, dtype=torch.float32, encoder_config=TINY_T5)
    torch.manual_seed(0)
    idm = tiny_idm().eval()
    what = ("idm", "latents", "text")
    precomputer = Precomputer(what, vae, text_encoder, idm, torch.float32)
    settings = shard_tool.ConversionSettings(
        max_samples=5, precompute=settings_record(what, WINDOW, ckpt, None, "float32", TINY_VAE, TINY_T5))
    shard_tool.convert(workspace / "episodes", workspace / "shards", settings, precomputer=precomputer)
    return workspace / "shards", precomputer


def data_config(shards, **overrides):
    base = DataConfig(shards=str(shards), num_frames=5, height=32, width=32, cfg_prob=0.0, num_workers=0, seed=1)
    return replace(base, **overrides)


def test_index_and_samples(pre_encoded, workspace):
    shards, precomputer = pre_encoded
    index = json.loads((shards / "index.json").read_text())
    assert index["mode"] == "latents" and index["complete"]
    assert sum(s["samples"] for s in index["shards"]) == 2 * EPISODES
    assert [s["samples"] for s in index["shards"]] == [6, 6]  # an episode's windows stay in one shard
    assert [(s["episode"], s["reason"]) for s in index["skipped"]] == [("ep_short", "video_too_short")]
    entries = [e for s in index["shards"] for e in s["entries"]]
    assert [e["window_start"] for e in entries[:2]] == [0, 4] and entries[0]["key"] == "ep_0000_000000"


def test_text_embeddings_are_stored_once_per_instruction(pre_encoded):
    shards, precomputer = pre_encoded
    index = json.loads((shards / "index.json").read_text())
    instructions = {e["instruction"] for e in index["episodes"]}
    assert len(instructions) < EPISODES  # the check below is about deduplication
    stored = safetensors.torch.load_file(shards / index["text_embeddings"])
    assert set(stored) == {text_key(text) for text in instructions | {""}}  # "": the null prompt
    assert index["null_text_key"] == text_key("")
    for text in instructions | {""}:
        (expected,) = precomputer.text_encoder([text])
        torch.testing.assert_close(stored[text_key(text)], expected)


def test_latents_and_mask_are_those_of_the_window(pre_encoded, workspace):
    shards, precomputer = pre_encoded
    video = (workspace / "episodes" / "ep_0001" / "video.mp4").read_bytes()
    start, frames = episode_windows(video, 10.0, 10, FRAMES, WINDOW)[1]
    clip = to_model_range(torch.from_numpy(frames)).permute(1, 0, 2, 3)[None]
    expected_latents = precomputer.vae.encode(clip)[0]
    loader = build_loader(shards, data_config(shards), 1, rank=0, world_size=1, train=False)
    batch = next(b for b in loader if b["__key__"] == [f"ep_0001_{start:06d}"])
    torch.testing.assert_close(batch["latents"][0], expected_latents)
    assert batch["idm_mask"].shape == (1, 2, 2, 2)
    assert 0 <= batch["idm_mask"].min() and batch["idm_mask"].max() <= 1
    actions = np.load(workspace / "episodes" / "ep_0001" / "actions.npy")
    np.testing.assert_array_equal(batch["actions"][0].numpy(), actions[start: start + 5])


def test_pre_encoded_batch_format_and_text_dropout(pre_encoded):
    shards, _ = pre_encoded
    batch = next(iter(build_loader(shards, data_config(shards), 2, rank=0, world_size=1)))
    assert batch["latents"].shape == (2, 48, 2, 2, 2)
    assert batch["actions"].shape == (2, 5, 14) and batch["idm_mask"].shape == (2, 2, 2, 2)
    assert isinstance(batch["text_emb"], list) and [e.shape[1] for e in batch["text_emb"]] == [32, 32]
    assert all(e.abs().sum() > 0 for e in batch["text_emb"]) and not batch["text_dropped"].any()
    dropped = next(iter(build_loader(shards, data_config(shards, cfg_prob=1.0), 2, rank=0, world_size=1)))
    assert dropped["text_dropped"].all() and dropped["text"] == ["", ""]


def test_a_dropped_caption_gives_one_text_tensor_in_raw_and_pre_encoded_modes(pre_encoded, workspace):
    shards, precomputer = pre_encoded
    raw_shards = workspace / "raw_shards"
    shard_tool.convert(workspace / "episodes", raw_shards, shard_tool.ConversionSettings())
    stage = FrozenConditioner(text_encoder=precomputer.text_encoder)  # the trainer's umT5
    def first_batch(directory):
        return next(iter(build_loader(directory, data_config(directory, cfg_prob=1.0), 1, rank=0, world_size=1)))

    with pytest.warns(UserWarning, match="ep_short"):  # the workspace's too-short episode is left out of raw clips
        batches = [first_batch(raw_shards)]
    batches.append(first_batch(shards))
    contexts = []
    for batch in batches:
        assert batch["text_dropped"].all()
        contexts.append(stage.text_context(batch)[0])
    raw, pre_encoded_context = contexts
    assert raw.abs().sum() > 0  # umT5's embedding of "", not zeros
    torch.testing.assert_close(pre_encoded_context, raw, rtol=0, atol=0)


def test_config_must_match_the_pre_encoded_windows(pre_encoded):
    shards, _ = pre_encoded
    with pytest.raises(ConfigError, match="num_frames 9 \\(shards: 5\\)"):
        build_loader(shards, data_config(shards, num_frames=9), 1, rank=0, world_size=1)
    with pytest.raises(ConfigError, match="resize pad \\(shards: crop\\)"):
        build_loader(shards, data_config(shards, resize="pad"), 1, rank=0, world_size=1)
    with pytest.raises(ConfigError, match="fps 5 \\(shards: 10\\)"):  # latents cannot be resampled in time
        build_loader(shards, data_config(shards, fps=5), 1, rank=0, world_size=1)
    with pytest.raises(ConfigError, match="IDM frame pairs need raw video"):
        build_loader(shards, data_config(shards), 1, rank=0, world_size=1, mode="frames")


def test_training_side_decodes_no_video_and_loads_no_model(pre_encoded):
    shards, _ = pre_encoded
    script = f"""
import sys, decord
def refuse(*args, **kwargs):
    raise AssertionError("video decoded while reading pre-encoded shards")
decord.VideoReader = refuse
from vidartrain.config import DataConfig
from vidartrain.data.dataset import build_loader
config = DataConfig(shards={str(shards)!r}, num_frames=5, height=32, width=32, num_workers=1, seed=0)
batches = list(build_loader(config.shards, config, 2, rank=0, world_size=1, epochs=1))
assert len(batches) == {EPISODES} and batches[0]["latents"].shape[1] == 48
loaded = sorted(name for name in sys.modules if name.startswith("vidartrain.models"))
assert not loaded, loaded
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"


def test_precompute_from_the_command_line(workspace, tmp_path, refused):
    out = tmp_path / "shards"
    argv = ["--episodes", str(workspace / "episodes"), "--out", str(out), "--precompute", "latents,text",
            "--ckpt-dir", str(workspace / "ckpt"), "--num-frames", "5", "--stride", "8", "--height", "32",
            "--width", "32", "--vae-config", json.dumps(TINY_VAE), "--t5-config", json.dumps(TINY_T5)]
    assert shard_tool.main(argv) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["settings"]["precompute"]["precompute"] == ["latents", "text"]
    assert sum(s["samples"] for s in index["shards"]) == EPISODES  # stride 8: one window per episode
    batch = next(iter(build_loader(out, data_config(out), 1, rank=0, world_size=1)))
    assert batch["latents"].dtype == torch.bfloat16 and "idm_mask" not in batch
    assert shard_tool.main(argv) == 0  # finished already: nothing is redone, still complete
    # a folder of an earlier version, which recorded a square IDM input size without IDM masks too
    index["settings"]["precompute"]["idm_input_size"] = 518
    (out / "index.json").write_text(json.dumps(index))
    assert shard_tool.main(argv) == 0
    refused("must include 'latents'", shard_tool.main, argv[:4] + ["--precompute", "text"] + argv[6:])
    refused("1 \\+ 4\\*n", shard_tool.main, argv[:8] + ["--num-frames", "6"] + argv[10:])
    # a multiple of the VAE's 16 that no training config can load (the DiT's patch makes it 32)
    refused("--height 48 --width 32: must be multiples of 32", shard_tool.main,
            argv[:12] + ["--height", "48"] + argv[14:])
    # a tiny checkpoint without its dimensions: the error says which option gives them
    elsewhere = argv[:3] + [str(tmp_path / "elsewhere")] + argv[4:]
    refused("Wan2.2_VAE.pth: key .* expects .* Without --vae-config the converter builds the published model's "
            "dimensions; .* give them with --vae-config \\(the training config's model.vae_config\\)",
            shard_tool.main, elsewhere[:16] + elsewhere[18:])
    refused("Without --t5-config .* model.t5_config", shard_tool.main, elsewhere[:18])


def test_inspect_verifies_pre_encoded_shards(pre_encoded, tmp_path, capsys):
    shards, _ = pre_encoded
    assert inspect_tool.main([str(shards)]) == 0
    assert "train: 6 episodes, 12 samples" in capsys.readouterr().out
    copy = tmp_path / "shards"
    copy.mkdir()
    for file in shards.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    index = json.loads((copy / "index.json").read_text())
    kept = safetensors.torch.load_file(copy / index["text_embeddings"])
    dropped = sorted(kept)[0]
    safetensors.torch.save_file({k: v for k, v in kept.items() if k != dropped}, copy / index["text_embeddings"])
    assert inspect_tool.main([str(copy), "--no-decode"]) == 1
    assert f"no embedding for text_key {dropped}" in capsys.readouterr().err


def test_pre_encoded_idm_masks_equal_those_training_computes_online(workspace, tmp_path):
    """The IDM sees frames smaller than 518x518 at their own size in training (Eq. 7 online); the
    converter's masks must be made the same way, or a run's loss weights would depend on whether
    its shards were pre-encoded."""
    torch.manual_seed(0)
    idm = tiny_idm().eval()
    save_idm(idm, tmp_path / "idm.pt")
    argv = ["--episodes", str(workspace / "episodes"), "--out", str(tmp_path / "shards"), "--precompute",
            "latents,idm", "--ckpt-dir", str(workspace / "ckpt"), "--idm", str(tmp_path / "idm.pt"),
            "--num-frames", "5", "--height", "32", "--width", "32", "--latent-dtype", "float32",
            "--vae-config", json.dumps(TINY_VAE)]
    precomputer = shard_tool.precomputer_from_settings(shard_tool.settings_from_args(shard_tool.parse_args(argv)), "cpu")
    video = (workspace / "episodes" / "ep_0001" / "video.mp4").read_bytes()
    _, frames = episode_windows(video, 10.0, 10, FRAMES, WINDOW)[0]
    online = FrozenConditioner(idm=precomputer.idm, idm_input_size=idm_input_size(32, 32))
    batch = {"__key__": ["ep_0001"], "video": torch.from_numpy(frames).permute(1, 0, 2, 3)[None]}
    expected = online.window_mask(batch, 0, 2)[0]
    torch.testing.assert_close(precomputer.window_tensors(frames)["idm_mask"], expected, rtol=0, atol=0)
