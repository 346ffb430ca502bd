"""Validation samples during training: stage 2 on 2 CPU ranks with ZeRO-3 (every rank generates, rank 0
writes), closed loop against held-out clips with IDM actions; mp4s, TensorBoard strips and metrics;
the same losses as a run without samples."""
import json
from types import SimpleNamespace

import decord
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data_tools.tiny_checkpoint import write_tiny_checkpoint
from launch.sample import main as sample_main
from helpers.trainer_launch import logged_steps, run, tiny_idm, torchrun_command, write_shards
from vidartrain.config import Config, ConfigError, load_config
from vidartrain.data.shard_index import INDEX_FORMAT, DataInfo
from vidartrain.distributed.checkpointing import tag_for_step
from vidartrain.models.idm import IDM, save_idm
from vidartrain.models.wan.model import WanModel
from vidartrain.trainers import base
from vidartrain.trainers.base import Stage
from vidartrain.trainers.vidar_trainer import VidarStage

STEPS = 2


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("samples")
    write_tiny_checkpoint(root / "ckpt")
    model = WanModel.from_pretrained(root / "ckpt", dtype=torch.bfloat16)
    torch.save(model.state_dict(), root / "vidar.pt")
    torch.manual_seed(0)
    save_idm(IDM().to(torch.bfloat16), root / "idm.pt")
    write_shards(root, 8, frames=20, val_fraction=0.4)
    yield root
    (root / "idm.pt").unlink()


def train(workspace, name, *extra):
    output_dir = workspace / name
    run(torchrun_command("launch/train.py", [
        "--config", "configs/debug/tiny_vidarc.yaml", "--ds-config", "ds_configs/cpu_debug.json",
        "--output_dir", str(output_dir),
        "--set", f"model.ckpt_dir={workspace / 'ckpt'}", "--set", f"model.pt_dir={workspace / 'vidar.pt'}",
        "--set", f"model.idm_path={workspace / 'idm.pt'}", "--set", f"data.shards={workspace / 'shards'}",
        "--set", f"data.val_shards={workspace / 'shards' / 'val'}", "--set", "training.val_every=0",
        "--set", f"output.save_path={output_dir / 'vidarc.pt'}", "--set", f"training.num_steps={STEPS}",
        "--set", "training.warmup=1", "--set", "training.save_every=100", "--set", "training.log_every=1",
        "--set", "data.num_frames=17", "--set", "validation.num_frames=17", "--set", "validation.num_samples=2",
        *extra]), workspace / f"{name}.log", timeout=600)
    return output_dir


def test_validation_samples_are_written_logged_and_leave_training_alone(workspace):
    with_samples = train(workspace, "with_samples", "--set", "validation.every=1")
    without = train(workspace, "without", "--set", "validation.every=0")
    losses = {s: r["loss"] for s, r in logged_steps(with_samples).items()}
    assert losses == {s: r["loss"] for s, r in logged_steps(without).items()}  # samples change nothing
    assert not (without / "samples").exists()

    for step in (1, 2):
        folder = with_samples / "samples" / tag_for_step(step)
        for index in range(2):
            reader = decord.VideoReader(str(folder / f"sample_{index:02d}.mp4"))
            assert len(reader) == 17 and reader[0].shape == (64, 64, 3)
        report = json.loads((folder / "metrics.json").read_text())
        assert [set(s) >= {"key", "psnr", "action_l1", "gripper_accuracy"} for s in report["samples"]] == [True, True]
    first = json.loads((with_samples / "samples" / tag_for_step(1) / "metrics.json").read_text())
    second = json.loads((with_samples / "samples" / tag_for_step(2) / "metrics.json").read_text())
    assert [s["key"] for s in first["samples"]] == [s["key"] for s in second["samples"]]  # same held-out clips

    events = EventAccumulator(str(with_samples / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert sorted(events.Tags()["images"]) == ["samples/00", "samples/01"]
    strip = events.Images("samples/00")
    assert [image.step for image in strip] == [1, 2]
    assert (strip[0].width, strip[0].height) == (3 * 64, 2 * 64)  # first/middle/last, generated over truth
    for tag in ("samples/psnr", "samples/action_l1", "samples/gripper_accuracy", "time/validation_samples_s"):
        assert [e.step for e in events.Scalars(tag)] == [1, 2], tag
    assert all(0 < e.value < 100 for e in events.Scalars("samples/psnr"))

    # vidar-sample reads the run's DeepSpeed checkpoint folder as --weights
    out = workspace / "from_checkpoint"
    assert sample_main(["--ckpt-dir", str(workspace / "ckpt"), "--config", "configs/debug/tiny_vidar.yaml",
                        "--weights", str(with_samples / "checkpoints"), "--model", "vidarc",
                        "--episode", str(workspace / "episodes" / "ep_0000"), "--num-frames", "9", "--height", "64",
                        "--width", "64", "--steps", "2", "--out", str(out)]) == 0
    assert len(decord.VideoReader(str(out / "sample.mp4"))) == 9


def test_validation_section_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="validation.num_frames` = 10: must be 4n\\+1"):
        load_config("configs/debug/tiny_vidar.yaml", ["validation.num_frames=10"])
    with pytest.raises(ConfigError, match="exceeds `data.num_frames` = 9"):
        load_config("configs/debug/tiny_vidar.yaml", ["validation.num_frames=13"])
    with pytest.raises(ConfigError, match="data.val_shards` is not"):
        load_config("configs/debug/tiny_vidar.yaml", ["data.val_shards=null"])
    with pytest.raises(ConfigError, match="IDM stage renders none"):
        load_config("configs/debug/tiny_idm.yaml", ["validation.every=5"])
    assert load_config("configs/vidar_finetune.yaml").validation.every == 0  # off unless asked for


class MeanOfValues(Stage):
    """A stage whose loss is the mean of the batch's `value`s and whose metric `largest` their largest,
    as a [sum, count] pair per sample like the stages' (nothing else is called)."""

    def training_loss(self, module, batch, generator):
        values = batch["value"]
        return values.mean(), {"largest": torch.stack([values.max() * len(values), torch.tensor(len(values))])}

    build_model = load_frozen = tokens_in = export = None


def test_validation_is_the_mean_over_held_out_samples_with_a_partial_last_batch_and_has_the_metrics(monkeypatch):
    # 3 held-out samples in micro-batches of 2: the last batch holds 1. Its loss must count once,
    # not as much as the full batch's 2 (a mean of batch means would give (1 + 4) / 2 = 2.5). The
    # stage's metrics (the IDM's held-out action accuracy, ...) are averaged the same way.
    monkeypatch.setattr(base.dist, "all_reduce", lambda tensor, op=None: None)  # one rank: the sum is itself
    trainer = object.__new__(base.Trainer)
    trainer.config, trainer.device = Config(), torch.device("cpu")
    trainer.stage = MeanOfValues(Config(), DataInfo("raw", False, ()))
    trainer.engine, trainer.layout = torch.nn.Module(), SimpleNamespace(dp_rank=0)
    batches = [{"__key__": ["a", "b"], "value": torch.tensor([1.0, 1.0])},
               {"__key__": ["c"], "value": torch.tensor([4.0])}]
    assert trainer.validate(batches) == {"loss": 2.0, "largest": (2 * 1.0 + 4.0) / 3}


def test_an_idm_that_does_not_fit_the_validation_settings_is_refused_before_training(tmp_path):
    # A one-arm robot (7 action dimensions) with the default `idm.gripper_dims` [6, 13]: the samples'
    # action metrics would fail at the first validation, steps into the run. The held-out clips are what
    # it scores: training shards of another robot (a mixture) do not matter.
    write_tiny_checkpoint(tmp_path / "ckpt")
    save_idm(IDM([0.0] * 7, [1.0] * 7, tiny_idm().architecture), tmp_path / "idm.pt")

    def held_out(dim: int) -> str:
        folder = tmp_path / f"val_{dim}"
        folder.mkdir(exist_ok=True)
        (folder / "index.json").write_text(json.dumps({
            "format": INDEX_FORMAT, "complete": True, "mode": "raw", "settings": {}, "shards": [], "episodes": [],
            "skipped": [], "actions": {"dim": dim}}))
        return f"data.val_shards={folder}"

    def load_validation(*overrides: str) -> None:
        config = load_config("configs/debug/tiny_vidar.yaml", [
            f"model.ckpt_dir={tmp_path / 'ckpt'}", f"model.idm_path={tmp_path / 'idm.pt'}", *overrides])
        VidarStage(config, DataInfo("raw", False, (("train", {"dim": 14}),))).load_validation(torch.device("cpu"))

    with pytest.raises(ConfigError, match=r"`idm.gripper_dims` = \[6, 13\]: \[13\] outside the IDM's 7"):
        load_validation(held_out(7))
    with pytest.raises(ConfigError, match="the IDM predicts 7 action dimensions, the shards .*val_14 hold 14"):
        load_validation(held_out(14), "idm.gripper_dims=[6]")
    load_validation(held_out(7), "idm.gripper_dims=[6]")
