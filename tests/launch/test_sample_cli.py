"""vidar-sample on the tiny checkpoint: videos that decode to the requested size, IDM actions and
metrics against an episode, clear errors."""
import json
import subprocess
import sys
from pathlib import Path

import decord
import numpy as np
import pytest
import torch
from PIL import Image

from data_tools.shard import main as shard_main
from data_tools.synth import write_synthetic_episodes
from data_tools.tiny_checkpoint import write_tiny_checkpoint
from helpers.trainer_launch import launcher_env, tiny_idm
from launch.sample import main
from vidartrain.config import CAUSAL_LOSS, Config
from vidartrain.distributed.checkpointing import mark_complete, tag_for_step
from vidartrain.models.idm import IDM, save_idm
from vidartrain.models.wan.model import WanModel

REPO = Path(__file__).resolve().parents[2]
TINY = ["--config", str(REPO / "configs/debug/tiny_vidar.yaml"), "--height", "64", "--width", "64"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    ckpt = write_tiny_checkpoint(root / "ckpt", seed=1)
    state = {k: v.clone() for k, v in WanModel.from_pretrained(ckpt, dtype=torch.float32).state_dict().items()}
    torch.save(state, root / "vidar.pt")
    torch.save(state, root / "vidarc.pt")
    episode = write_synthetic_episodes(root / "episodes", 1, frames=20, height=64, width=64, seed=3)[0]
    frame = decord.VideoReader(str(episode / "video.mp4"))[0].asnumpy()
    Image.fromarray(frame).save(root / "first.png")
    save_idm(tiny_idm(), root / "idm.pt")  # 14 action dimensions, like the episode
    return root, ckpt, episode


def decoded(path: Path) -> np.ndarray:
    return decord.VideoReader(str(path)).get_batch(list(range(len(decord.VideoReader(str(path)))))).asnumpy()


def test_vidar_image_and_prompt(inputs, tmp_path, capsys):
    root, ckpt, _ = inputs
    args = ["--ckpt-dir", str(ckpt), "--weights", str(root / "vidar.pt"), "--image", str(root / "first.png"),
            "--prompt", "pick up the red block", "--num-frames", "9", "--steps", "3", "--out", str(tmp_path / "a"),
            *TINY]
    assert main(args) == 0
    assert "sample.mp4" in capsys.readouterr().out
    frames = decoded(tmp_path / "a" / "sample.mp4")
    assert frames.shape == (9, 64, 64, 3)
    assert Image.open(tmp_path / "a" / "frames.png").size == (3 * 64, 64)
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["model"] == "vidar" and metrics["steps"] == 3 and metrics["solver"] == "unipc"
    # same seed, same video; another seed, another video
    assert main(args[:-len(TINY) - 2] + ["--out", str(tmp_path / "b"), *TINY]) == 0
    assert (tmp_path / "a" / "sample.mp4").read_bytes() == (tmp_path / "b" / "sample.mp4").read_bytes()
    assert main(args + ["--seed", "1", "--overwrite"]) == 0
    assert (tmp_path / "a" / "sample.mp4").read_bytes() != (tmp_path / "b" / "sample.mp4").read_bytes()


def test_vidarc_closed_loop_with_idm_actions(inputs, tmp_path):
    root, ckpt, episode = inputs
    save_idm(IDM(), tmp_path / "idm.pt")
    out = tmp_path / "closed"
    assert main(["--ckpt-dir", str(ckpt), "--weights", str(root / "vidarc.pt"), "--episode", str(episode),
                 "--closed-loop", "--idm", str(tmp_path / "idm.pt"), "--num-frames", "17", "--steps", "2",
                 "--rollout-bound", "12", "--rollout-prefill-num", "5", "--out", str(out), *TINY]) == 0
    (tmp_path / "idm.pt").unlink()  # 370 MB
    assert decoded(out / "sample.mp4").shape == (17, 64, 64, 3)
    assert np.load(out / "actions.npy").shape == (17, 14)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "vidarc" and metrics["closed_loop"] and metrics["steps"] == 2
    assert np.isfinite(metrics["psnr"]) and len(metrics["action_l1_per_dim"]) == 14
    assert 0 <= metrics["gripper_accuracy"] <= 1
    assert Image.open(out / "frames.png").size == (3 * 64, 2 * 64)  # generated above, episode below


def test_clear_errors(inputs, tmp_path, capsys):
    root, ckpt, episode = inputs
    base = ["--ckpt-dir", str(ckpt), "--num-frames", "5", "--steps", "1", "--out", str(tmp_path / "o"), *TINY]

    def error(*args):
        assert main([*base, *args]) == 2
        return capsys.readouterr().err

    assert "--weights" in error("--weights", str(root / "missing.pt"), "--episode", str(episode))
    (root / "weights.pt").write_bytes((root / "vidar.pt").read_bytes())
    assert "pass --model vidar or --model vidarc" in error("--weights", str(root / "weights.pt"),
                                                           "--episode", str(episode))
    assert "needs --prompt" in error("--weights", str(root / "vidar.pt"), "--image", str(root / "first.png"))
    assert "causal model" in error("--weights", str(root / "vidar.pt"), "--episode", str(episode), "--closed-loop")
    assert "CUDA --device (got vidarc on cpu)" in error("--weights", str(root / "vidarc.pt"), "--episode", str(episode),
                                                        "--compile-generation", "--device", "cpu")
    assert "comma-separated integers" in error("--weights", str(root / "vidar.pt"), "--episode", str(episode),
                                               "--gripper-dims", "six")
    assert "4k+1" in error("--weights", str(root / "vidar.pt"), "--episode", str(episode), "--num-frames", "6")
    assert "fewer than --num-frames 81" in error("--weights", str(root / "vidar.pt"), "--episode", str(episode),
                                                 "--num-frames", "81")
    bad = {k: v for k, v in torch.load(root / "vidar.pt").items()}
    bad["head.head.weight"] = bad["head.head.weight"][:, :10]
    torch.save(bad, tmp_path / "vidar.pt")
    assert "head.head.weight" in error("--weights", str(tmp_path / "vidar.pt"), "--episode", str(episode))
    (tmp_path / "o").mkdir(exist_ok=True)  # the refusals above created it (--out is created up front)
    (tmp_path / "o" / "sample.mp4").write_bytes(b"keep")
    assert "--overwrite" in error("--weights", str(root / "vidar.pt"), "--episode", str(episode))
    assert (tmp_path / "o" / "sample.mp4").read_bytes() == b"keep"


def short_run(inputs, out, *extra):
    """The arguments of a 5-frame, 1-step vidar sample of the episode into `out`."""
    root, ckpt, episode = inputs
    return ["--ckpt-dir", str(ckpt), "--weights", str(root / "vidar.pt"), "--episode", str(episode),
            "--num-frames", "5", "--steps", "1", "--out", str(out), *TINY, *extra]


def test_an_episode_of_a_robot_with_other_actions_samples(inputs, tmp_path):
    # a one-armed robot's episode (7 action dimensions): the vidar-shard --action-dim 7 data of the README
    episode = write_synthetic_episodes(tmp_path / "episodes", 1, frames=8, height=64, width=64, action_dim=7)[0]
    args = short_run(inputs, tmp_path / "out")
    args[args.index("--episode") + 1] = str(episode)
    assert main(args) == 0
    assert decoded(tmp_path / "out" / "sample.mp4").shape == (5, 64, 64, 3)


def test_the_checkpoint_dir_defaults_to_the_configs(inputs, tmp_path, refused):
    root, ckpt, episode = inputs
    config = tmp_path / "mine.yaml"
    config.write_text(f"base: {REPO / 'configs/debug/tiny_vidar.yaml'}\nmodel:\n  ckpt_dir: {ckpt}\n")
    args = short_run(inputs, tmp_path / "out")
    del args[args.index("--ckpt-dir"):args.index("--ckpt-dir") + 2]
    args[args.index("--config") + 1] = str(config)
    assert main(args) == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["model"] == "vidar"
    refused("give --ckpt-dir .* or --config whose model.ckpt_dir names it", main,
            [a for a in args if a not in ("--config", str(config))] + ["--overwrite"])
    config.write_text(f"base: {REPO / 'configs/debug/tiny_vidar.yaml'}\nmodel:\n  ckpt_dir: {tmp_path / 'none'}\n")
    refused(f"--config {config}: model.ckpt_dir {tmp_path / 'none'}: no such folder", main, args + ["--overwrite"])


def test_overwrite_leaves_only_this_runs_outputs(inputs, tmp_path):
    out = tmp_path / "out"
    assert main(short_run(inputs, out, "--idm", str(inputs[0] / "idm.pt"))) == 0
    assert (out / "actions.npy").is_file()
    (out / "notes.txt").write_text("mine")
    assert main(short_run(inputs, out, "--overwrite")) == 0  # without --idm: the old actions must go
    assert sorted(p.name for p in out.iterdir()) == ["frames.png", "metrics.json", "notes.txt", "sample.mp4"]
    assert (out / "notes.txt").read_text() == "mine"


def test_an_output_whose_write_fails_is_not_left_half_written(inputs, tmp_path, monkeypatch):
    def torn_save(image, file, format=None, **params):
        Path(file).write_bytes(b"\x89PNG\r\n\x1a\n half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", torn_save)
    with pytest.raises(OSError, match="No space left"):
        main(short_run(inputs, tmp_path / "out"))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["sample.mp4"]  # no frames.png, no temporary


@pytest.fixture
def no_generation(monkeypatch):
    """Bad input must be refused before the generation: starting it fails the test."""
    def generate(*args, **kwargs):
        pytest.fail("generation started: the input should have been refused before it")

    monkeypatch.setattr("launch.sample.generate_video", generate)


def test_bad_out_fps_and_device_are_refused_before_generating(inputs, tmp_path, refused, no_generation,
                                                                monkeypatch):
    (tmp_path / "file").write_text("mine")
    refused(r"--out .*/file is a file, not a directory", main, short_run(inputs, tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "mine"
    refused(r"--fps 0: .*at least 1", main, short_run(inputs, tmp_path / "o", "--fps", "0"))
    refused(r"--device gpu0: expected cpu, cuda or cuda:N", main, short_run(inputs, tmp_path / "o", "--device", "gpu0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    refused(r"--device cuda: torch sees no CUDA device", main, short_run(inputs, tmp_path / "o", "--device", "cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    refused(r"--device cuda:1: this machine has 1 CUDA device", main,
            short_run(inputs, tmp_path / "o", "--device", "cuda:1"))


def test_vidarc_frame_count_and_shift_are_checked_before_generating(inputs, tmp_path, refused, no_generation):
    root, out = inputs[0], tmp_path / "o"
    vidarc = ["--weights", str(root / "vidarc.pt")]
    refused(r"--num-frames 1: vidarc .* at least 5", main, short_run(inputs, out, "--num-frames", "1", *vidarc))
    refused(r"--shift 0.0: must be > 0", main, short_run(inputs, out, "--shift", "0"))
    assert list(out.iterdir()) == []


def test_idm_and_gripper_dims_are_checked_before_generating(inputs, tmp_path, refused, no_generation):
    root, out = inputs[0], tmp_path / "o"
    refused(r"vidar\.pt does not match the IDM", main, short_run(inputs, out, "--idm", str(root / "vidar.pt")))
    save_idm(IDM([0.0] * 7, [1.0] * 7, tiny_idm().architecture), tmp_path / "idm7.pt")
    refused(r"--idm .*idm7\.pt predicts 7 action dimensions, the episode .*ep_0000 has 14", main,
            short_run(inputs, out, "--idm", str(tmp_path / "idm7.pt")))
    for dims, outside in (("6,20", r"\[20\]"), ("-1", r"\[-1\]")):
        refused(rf"--gripper-dims {dims}: {outside} not among the episode's 14 action dimensions \(0 to 13\)", main,
                short_run(inputs, out, "--idm", str(root / "idm.pt"), "--gripper-dims", dims))
    assert list(out.iterdir()) == []


def recorded_run(root: Path, loss_type: str) -> Path:
    """A checkpoints directory whose one checkpoint is a COMPLETE record of a run of `loss_type` and no
    weights: what it trained is known before any weights are read."""
    config = Config().to_dict()
    config["loss"]["type"] = loss_type
    (root / tag_for_step(1)).mkdir(parents=True)
    mark_complete(root, tag_for_step(1), {"step": 1, "world_size": 1, "config": config, "files": {}})
    return root


def test_a_model_other_than_the_checkpoints_stage_is_refused(inputs, tmp_path, refused):
    root, ckpt, episode = inputs
    cases = [("flow_matching", "vidarc", "holds vidar weights"), (CAUSAL_LOSS, "vidar", "holds vidarc weights"),
             ("idm", "vidar", "records loss.type 'idm', not a DiT's")]
    for loss, model, says in cases:
        checkpoints = recorded_run(tmp_path / loss / "checkpoints", loss)
        message = refused(says, main, ["--ckpt-dir", str(ckpt), "--weights", str(checkpoints), "--model", model,
                                       "--episode", str(episode), "--num-frames", "5", "--out", str(tmp_path / "o"),
                                       *TINY])
        assert f"{checkpoints / tag_for_step(1) / 'COMPLETE'}" in message
    refused(r"--weights .*/ckpt: neither a checkpoint folder", main,
            ["--ckpt-dir", str(ckpt), "--weights", str(ckpt), "--model", "vidar", "--episode", str(episode),
             "--out", str(tmp_path / "o"), *TINY])


@pytest.fixture(scope="module")
def lora_run(inputs):
    """Stage 1 with rank-4 LoRA adapters on the tiny checkpoint: one step on one CPU rank, its checkpoint and
    the vidar.pt (adapters merged in) the run exports."""
    root, ckpt, _ = inputs
    assert shard_main(["--episodes", str(root / "episodes"), "--out", str(root / "shards")]) == 0
    settings = [f"model.ckpt_dir={ckpt}", f"data.shards={root / 'shards'}", "data.val_shards=null",
                "training.batch_size=2", "training.num_steps=1", "training.warmup=0", "training.save_every=1",
                "training.val_every=0", "validation.every=0", "training.lr=5e-2", "lora.rank=4", "lora.alpha=16",
                f"output.save_path={root / 'lora' / 'export' / 'vidar.pt'}"]
    command = [sys.executable, "launch/train.py", "--config", "configs/debug/tiny_vidar.yaml", "--ds-config",
               "ds_configs/cpu_debug.json", "--output_dir", str(root / "lora")]
    result = subprocess.run(command + [arg for setting in settings for arg in ("--set", setting)], cwd=REPO,
                            env=launcher_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return root / "lora"


def test_a_lora_checkpoint_samples_as_its_export(inputs, lora_run, tmp_path, caplog):
    root, ckpt, episode = inputs

    def sample(weights: Path, out: str) -> bytes:
        assert main(["--ckpt-dir", str(ckpt), "--weights", str(weights), "--episode", str(episode),
                     "--num-frames", "5", "--steps", "2", "--out", str(tmp_path / out), *TINY]) == 0
        return (tmp_path / out / "sample.mp4").read_bytes()

    merged = sample(lora_run / "checkpoints", "checkpoint")  # no --model: the checkpoint records stage 1
    assert json.loads((tmp_path / "checkpoint" / "metrics.json").read_text())["model"] == "vidar"
    assert not [r.message for r in caplog.records if "ignored" in r.message]  # no adapter left out
    assert merged == sample(lora_run / "export" / "vidar.pt", "export")
    assert merged != sample(root / "vidar.pt", "base")  # the adapters changed the video
