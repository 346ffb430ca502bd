"""IDM stage on a bare IDM (no DeepSpeed): Eq. 4 wiring, metrics, export, overfit."""
from pathlib import Path

import pytest
import torch

from data_tools.shard import main as shard_main
from data_tools.synth import write_synthetic_episodes
from vidartrain.config import ConfigError, load_config
from vidartrain.data.shard_index import DataInfo, read_data_info, read_index
from vidartrain.errors import DataError
from vidartrain.losses import action_accuracy, idm_loss
from vidartrain.models.idm import IDM, IdmArchitecture, load_idm, preprocess_frames, save_idm
from vidartrain.trainers.idm_trainer import IdmStage, action_space


def tiny_config(*overrides: str):
    # The tiny IDM of configs/debug/tiny_idm.yaml at 32x32 frames; action statistics from the
    # config, since there are no shards to read them from.
    return load_config("configs/debug/tiny_idm.yaml",
                       ["data.shards=unused", "data.height=32", "data.width=32",
                        f"idm.action_mean={[0.5] * 14}", f"idm.action_std={[0.3] * 14}", *overrides])


def idm_stage(config):
    """The stage as launch/train.py builds it, with its shards' DataInfo ("unused" shards: none)."""
    shards = Path(config.data.shards)
    return IdmStage(config, read_data_info(shards) if shards.is_dir() else DataInfo("raw", False, ()))


@pytest.fixture(scope="module")
def stage_and_model():
    stage = idm_stage(tiny_config())
    torch.manual_seed(0)
    model = stage.build_model()
    stage.load_frozen(torch.device("cpu"))
    return stage, model


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(1)
    return {"__key__": [f"ep/{i}" for i in range(4)],
            "frame": torch.rand(4, 3, 32, 32, generator=generator) * 2 - 1,
            "action": torch.randn(4, 14, generator=generator) * 0.3 + 0.5}


def test_loss_is_eq4_of_the_model_output_with_its_metrics(stage_and_model, batch):
    stage, model = stage_and_model
    model.eval()  # fixed BatchNorm statistics, so two forwards agree
    try:
        loss, metrics = stage.training_loss(model, batch, torch.Generator())
        with torch.no_grad():
            predicted, mask = model(preprocess_frames(batch["frame"], (32, 32)), return_mask=True)
        expected, action_loss, mask_loss = idm_loss(predicted, batch["action"], mask, model.train_mean,
                                                    model.train_std, mask_weight=3e-3)
    finally:
        model.train()
    torch.testing.assert_close(loss.detach(), expected)
    assert sorted(metrics) == ["action_accuracy", "action_loss", "mask_loss", "mask_mean"]
    assert all(value[1] == 4 for value in metrics.values())  # [sum, count] over the 4 frames
    torch.testing.assert_close(metrics["action_loss"][0] / 4, action_loss)
    torch.testing.assert_close(metrics["mask_loss"][0] / 4, mask_loss)
    torch.testing.assert_close(metrics["mask_mean"][0] / 4, mask.mean())
    torch.testing.assert_close(metrics["action_accuracy"][0] / 4, action_accuracy(predicted, batch["action"]))


def test_loss_falls_when_overfitting_one_batch(batch):
    stage = idm_stage(tiny_config())
    torch.manual_seed(0)
    model = stage.build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-2)
    losses = []
    for _ in range(8):
        loss, _ = stage.training_loss(model, batch, torch.Generator())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print("IDM overfit losses:", [round(v, 4) for v in losses])
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0]


def test_export_writes_an_upstream_idm_pt_that_loads_strictly(stage_and_model, tmp_path):
    stage, model = stage_and_model
    # As the trainer's export gathers it: parameters in bf16, buffers (BatchNorm, action stats) as they are.
    parameters = dict(model.named_parameters())
    state = {k: v.to(torch.bfloat16) if k in parameters else v for k, v in model.state_dict().items()}
    stage.export(state, tmp_path / "idm.pt")
    payload = torch.load(tmp_path / "idm.pt", weights_only=True)
    assert sorted(payload) == ["model_state_dict", "step"] and payload["step"] == stage.config.training.num_steps
    assert sorted(payload["model_state_dict"]) == sorted(model.state_dict())
    assert {v.dtype for v in payload["model_state_dict"].values()} == {torch.float32, torch.int64}
    loaded = load_idm(tmp_path / "idm.pt")
    torch.testing.assert_close(loaded.train_std, model.train_std)


def test_clear_errors(stage_and_model, batch):
    stage, model = stage_and_model
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        idm_stage(tiny_config("model.gradient_checkpointing=true")).build_model()
    with pytest.raises(DataError, match="action dimensions"):
        stage.training_loss(model, {**batch, "action": batch["action"][:, :7]}, torch.Generator())
    bf16 = idm_stage(tiny_config())
    bf16_model = bf16.build_model().to(torch.bfloat16)
    with pytest.raises(ConfigError, match="mixed_precision: fp32"):
        bf16.training_loss(bf16_model, batch, torch.Generator())


@pytest.fixture(scope="module")
def seven_dim_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("seven_dim")
    write_synthetic_episodes(root / "episodes", 3, frames=6, height=32, width=32, action_dim=7)
    assert shard_main(["--episodes", str(root / "episodes"), "--out", str(root / "shards"), "--action-dim", "7"]) == 0
    return root / "shards"


def test_the_idm_is_built_for_the_robot_of_the_shards(seven_dim_shards, tmp_path):
    def config(*overrides):
        return load_config("configs/debug/tiny_idm.yaml", [f"data.shards={seven_dim_shards}", "data.height=32",
                                                           "data.width=32", *overrides])

    stats = read_index(seven_dim_shards)["actions"]
    model = idm_stage(config("idm.gripper_dims=[6]")).build_model()
    assert model.model.resnet_model.fc.out_features == 7
    torch.testing.assert_close(model.train_mean, torch.tensor(stats["mean"], dtype=torch.float32))
    assert model.architecture == IdmArchitecture(8, 8, (1, 1, 1, 1))
    with pytest.raises(ConfigError, match=r"`idm.gripper_dims` = \[6, 13\]: \[13\] outside the IDM's 7"):
        idm_stage(config()).build_model()  # the 14-dim default names the fix
    override = idm_stage(config("idm.gripper_dims=[]", f"idm.action_mean={[0.0] * 7}",
                                f"idm.action_std={[2.0] * 7}")).build_model()
    assert override.train_std.tolist() == [2.0] * 7
    save_idm(model, tmp_path / "idm7.pt")
    with pytest.raises(ConfigError, match="holds IdmArchitecture"):
        idm_stage(config("idm.gripper_dims=[6]", f"model.idm_path={tmp_path / 'idm7.pt'}",
                         "model.idm_config={unet_width: 4}")).build_model()
    save_idm(IDM(architecture=IdmArchitecture(8, 8, (1, 1, 1, 1))), tmp_path / "idm14.pt")
    with pytest.raises(ConfigError, match="predicts 14 action dimensions, the shards .* hold 7"):
        idm_stage(config(f"model.idm_path={tmp_path / 'idm14.pt'}")).build_model()
    with pytest.raises(ConfigError, match="unknown IDM architecture keys \\['widths'\\]"):
        idm_stage(config("model.idm_config={widths: 4}")).build_model()


def test_an_action_dimension_that_never_varies_is_refused_with_how_to_set_its_statistics():
    """A padded or unused dimension has std 0 in the shards' statistics: the IDM's loss would be NaN on
    every step, and the run would stop blaming the learning rate."""
    stats = {"dim": 3, "count": 4, "mean": [0.5, 0.0, 1.0], "m2": [1.0, 0.0, 2.0]}
    data = DataInfo("raw", False, (("shards/a", stats),))
    config = tiny_config("idm.action_mean=null", "idm.action_std=null")  # statistics from the shards
    with pytest.raises(ConfigError, match=r"shards/a\) never vary in dimension\(s\) \[1\].*`idm.action_std`"):
        action_space(config, data)
    stats["m2"][1] = 0.5
    mean, std = action_space(config, data)
    assert std[1] > 0


def test_action_statistics_other_than_those_of_a_fine_tuned_idm_are_refused(seven_dim_shards, tmp_path):
    # the fine-tuned IDM keeps its own train_mean / train_std: configured ones would be ignored
    save_idm(IDM([0.5] * 7, [0.3] * 7, IdmArchitecture(8, 8, (1, 1, 1, 1))), tmp_path / "idm7.pt")

    def build(*overrides):
        return idm_stage(load_config("configs/debug/tiny_idm.yaml", [
            f"data.shards={seven_dim_shards}", "data.height=32", "data.width=32", "idm.gripper_dims=[6]",
            f"model.idm_path={tmp_path / 'idm7.pt'}", *overrides])).build_model()

    with pytest.raises(ConfigError, match=r"`idm.action_mean` / `idm.action_std` are set, but `model.idm_path`"):
        build(f"idm.action_mean={[0.0] * 7}", f"idm.action_std={[1.0] * 7}")
    assert build(f"idm.action_mean={[0.5] * 7}", f"idm.action_std={[0.3] * 7}").train_std.tolist() == pytest.approx(
        [0.3] * 7)
    assert build().train_mean.tolist() == pytest.approx([0.5] * 7)


def test_configured_statistics_of_another_action_dimension_than_the_shards_are_refused_at_build(seven_dim_shards):
    # built, the IDM would predict 14 actions and the first step would fail on the 7-dim batch
    config = load_config("configs/debug/tiny_idm.yaml", [
        f"data.shards={seven_dim_shards}", "data.height=32", "data.width=32", "idm.gripper_dims=[6]",
        f"idm.action_mean={[0.0] * 14}", f"idm.action_std={[1.0] * 14}"])
    with pytest.raises(ConfigError, match=r"`idm.action_mean` / `idm.action_std`: the IDM predicts 14 action "
                                          r"dimensions, the shards .* hold 7"):
        idm_stage(config).build_model()
