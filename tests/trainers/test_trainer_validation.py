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
from vidartrain.config import ConfigError, load_config
from vidartrain.data.shard_index import INDEX_FORMAT, DataInfo, read_data_info
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


def stub_trainer(stage: Stage, model: torch.nn.Module, dp_rank: int, dp_size: int, micro_batch_size: int,
                 val_samples: int) -> base.Trainer:
    """A Trainer with just what its validation reads: data-parallel rank `dp_rank` of `dp_size`."""
    trainer = object.__new__(base.Trainer)
    trainer.config, trainer.stage, trainer.engine, trainer.device = stage.config, stage, model, torch.device("cpu")
    trainer.layout = SimpleNamespace(dp_rank=dp_rank, dp_size=dp_size)
    trainer.micro_batch_size, trainer.val_samples = micro_batch_size, val_samples
    return trainer


def validation_over_ranks(stage, model, dp_size, micro_batch_size, val_samples, monkeypatch):
    """Trainer.validation_batches + Trainer.validate on each of `dp_size` data-parallel ranks in turn, their
    [sum, count] pairs summed as the all-reduce does: (means, counts, forwards run by each rank)."""
    monkeypatch.setattr(base.dist, "all_reduce", lambda tensor, op=None: None)
    monkeypatch.setattr(base.Trainer, "reduce_metrics", lambda self, metrics: metrics)
    totals, forwards = {}, []

    def counted_loss(*args):
        forwards[-1] += 1
        return type(stage).training_loss(stage, *args)

    monkeypatch.setattr(stage, "training_loss", counted_loss)
    for rank in range(dp_size):
        forwards.append(0)
        trainer = stub_trainer(stage, model, rank, dp_size, micro_batch_size, val_samples)
        for name, pair in trainer.validate(trainer.validation_batches()).items():
            totals[name] = totals.get(name, 0) + pair
    return ({name: float(s / c) for name, (s, c) in totals.items() if c > 0},
            {name: int(c) for name, (_, c) in totals.items()}, forwards)


@pytest.fixture(scope="module")
def held_out(pre_encoded):
    """Stage 1 on the 4 pre-encoded samples as its held-out set, and the tiny DiT."""
    config = load_config("configs/debug/tiny_vidar.yaml", [
        f"model.ckpt_dir={pre_encoded / 'ckpt'}", f"data.shards={pre_encoded / 'shards'}",
        f"data.val_shards={pre_encoded / 'shards'}"])
    stage = VidarStage(config, read_data_info(config.data.shards))
    stage.load_frozen(torch.device("cpu"))
    return stage, WanModel.from_pretrained(pre_encoded / "ckpt", dtype=torch.bfloat16).eval()


@pytest.mark.parametrize("val_samples", [4, 3])
def test_validation_loss_is_the_same_on_any_world_size_and_micro_batch(held_out, val_samples, monkeypatch):
    # Each held-out sample's noise and noise level come from its key, and the held-out samples are the first
    # val_samples whatever the ranks: 1 rank with micro-batches of 2 and 2 ranks with micro-batches of 1
    # evaluate the same samples with the same draws. 3 samples on 2 ranks: rank 1 evaluates one, and runs
    # a second forward (ZeRO-3's are collective) that does not count.
    stage, model = held_out
    one_rank = validation_over_ranks(stage, model, 1, 2, val_samples, monkeypatch)
    two_ranks = validation_over_ranks(stage, model, 2, 1, val_samples, monkeypatch)
    assert one_rank[1]["loss"] == two_ranks[1]["loss"] == val_samples
    assert two_ranks[0]["loss"] == pytest.approx(one_rank[0]["loss"], rel=1e-6)
    assert one_rank[1] == two_ranks[1]  # the sigma buckets hold the same samples
    for name, value in one_rank[0].items():
        assert two_ranks[0][name] == pytest.approx(value, rel=1e-6), name
    assert two_ranks[2] == [2, 2]


def test_validation_takes_every_held_out_sample_when_fewer_and_refuses_more_ranks_than_samples(held_out,
                                                                                              monkeypatch):
    stage, model = held_out

    def count(asked: int | None, dp_size: int) -> int:
        monkeypatch.setattr(stage.config.training, "val_samples", asked)
        return stub_trainer(stage, model, 0, dp_size, 1, None).validation_sample_count()

    assert [count(None, 2), count(32, 2), count(3, 2)] == [4, 4, 3]  # null: all; more than the 4 held out: all
    with pytest.raises(ConfigError, match="validation evaluates 3 held-out samples .* on 4 data-parallel ranks, "
                                          "and every rank evaluates one at least: raise training.val_samples, add"):
        count(3, 4)
    # raising training.val_samples cannot help when the 4 held-out samples are fewer than the ranks
    with pytest.raises(ConfigError, match="5 data-parallel ranks, .* rank evaluates one at least: add held-out"):
        count(32, 5)


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

    # refused when the stage is built, before any model: the held-out clips' actions are what the samples score
    config = load_config("configs/debug/tiny_vidar.yaml", [
        f"model.ckpt_dir={tmp_path / 'ckpt'}", f"model.idm_path={tmp_path / 'idm.pt'}", held_out(7)])
    with pytest.raises(ConfigError, match=r"`idm.gripper_dims` = \[6, 13\]: \[13\] outside the held-out shards' 7"):
        VidarStage(config, DataInfo("raw", False, ()))
    save_idm(IDM([0.0] * 6, [1.0] * 6, tiny_idm().architecture), tmp_path / "idm6.pt")
    with pytest.raises(ConfigError, match=r"`idm.gripper_dims` = \[6\]: \[6\] outside the IDM's 6"):
        load_validation(held_out(7), "idm.gripper_dims=[6]", f"model.idm_path={tmp_path / 'idm6.pt'}")
    with pytest.raises(ConfigError, match="the IDM predicts 7 action dimensions, the shards .*val_14 hold 14"):
        load_validation(held_out(14), "idm.gripper_dims=[6]")
    load_validation(held_out(7), "idm.gripper_dims=[6]")
