"""Another robot end to end: episodes with 7 or 20 action dimensions -> shards (index.json records the
action statistics) -> the tiny IDM trained with them -> stage 2 weighted by that IDM's masks.
One process per run (`python launch/train.py`, ZeRO-3 on one CPU rank), tiny models, few steps."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_tools.shard import main as shard_main
from data_tools.synth import write_synthetic_episodes
from data_tools.tiny_checkpoint import write_tiny_checkpoint
from helpers.trainer_launch import REPO_ROOT, launcher_env, logged_steps
from vidartrain.data.shard_index import read_index

COMMON = ["--ds-config", "ds_configs/cpu_debug.json", "--set", "training.batch_size=2",
          "--set", "data.val_shards=null", "--set", "training.val_every=0", "--set", "validation.every=0",
          "--set", "training.log_every=1"]


def train(workspace, name, *args):
    log = workspace / f"{name}.log"
    with open(log, "wb") as stream:
        code = subprocess.call([sys.executable, "launch/train.py", *COMMON, "--output_dir", str(workspace / name),
                                *args], cwd=REPO_ROOT, env=launcher_env(), stdout=stream, stderr=subprocess.STDOUT,
                               timeout=600)
    assert code == 0, log.read_text(errors="replace")[-4000:]
    return logged_steps(workspace / name)


@pytest.mark.parametrize("action_dim, gripper_dims", [(7, "[6]"), (20, "[6, 13, 19]")])
def test_a_robot_with_other_actions_trains_idm_and_stage_2(tmp_path, action_dim, gripper_dims):
    episodes = write_synthetic_episodes(tmp_path / "episodes", 5, frames=13, height=64, width=64,
                                        action_dim=action_dim)
    assert shard_main(["--episodes", str(tmp_path / "episodes"), "--out", str(tmp_path / "shards"),
                       "--action-dim", str(action_dim)]) == 0
    actions = np.concatenate([np.load(folder / "actions.npy") for folder in episodes]).astype(np.float64)
    recorded = read_index(tmp_path / "shards")["actions"]
    assert recorded["dim"] == action_dim and recorded["count"] == len(actions)
    np.testing.assert_allclose(recorded["mean"], actions.mean(axis=0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(recorded["std"], actions.std(axis=0), rtol=0, atol=1e-12)

    idm_path = tmp_path / "idm.pt"
    idm_steps = train(tmp_path, "idm", "--config", "configs/debug/tiny_idm.yaml",
                      "--set", f"data.shards={tmp_path / 'shards'}", "--set", f"output.save_path={idm_path}",
                      "--set", "training.num_steps=2", "--set", "training.warmup=1",
                      "--set", f"idm.gripper_dims={gripper_dims}")
    assert sorted(idm_steps) == [1, 2] and all(record["finite"] for record in idm_steps.values())
    state = torch.load(idm_path, weights_only=True)["model_state_dict"]
    assert state["model.resnet_model.fc.weight"].shape[0] == action_dim
    torch.testing.assert_close(state["train_mean"], torch.tensor(recorded["mean"], dtype=torch.float32))
    torch.testing.assert_close(state["train_std"], torch.tensor(recorded["std"], dtype=torch.float32))

    write_tiny_checkpoint(tmp_path / "ckpt")
    stage2 = train(tmp_path, "stage2", "--config", "configs/debug/tiny_vidarc.yaml",
                   "--set", f"data.shards={tmp_path / 'shards'}", "--set", f"model.ckpt_dir={tmp_path / 'ckpt'}",
                   "--set", "model.pt_dir=null", "--set", f"model.idm_path={idm_path}",
                   "--set", f"output.save_path={tmp_path / 'vidarc.pt'}", "--set", "training.num_steps=1",
                   "--set", "training.warmup=0")
    assert sorted(stage2) == [1] and stage2[1]["finite"]
    assert "loss_in_mask" in stage2[1], json.dumps(stage2[1])  # the IDM's masks weighed the loss
