"""Stage 1 end to end on CPU: the real launchers (deepspeed, torchrun), 2 gloo ranks, ZeRO-3, a tiny
Wan2.2 checkpoint in the published layout and shards made by data_tools from synthetic mp4 episodes.

One uninterrupted single-node 2-rank run (deepspeed launcher) is the reference for everything else:
a 2-node run (two torchrun agents, one rank each, rendezvous on 127.0.0.1) preempted with SIGTERM,
resumed on one node (torchrun) and killed with SIGKILL at an arbitrary moment, then resumed on two
nodes to the end, must log exactly the reference's losses; a 1-rank run (no launcher) resumes from a
universal checkpoint; the export loads strictly.
"""
import math
import signal
import subprocess

import psutil
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data_tools.tiny_checkpoint import write_tiny_checkpoint
from helpers.trainer_launch import (BIN, deepspeed_command, free_port, kill_launch, logged_steps, one_rank_command, run,
                                    start, tail, torchrun_command, wait, wait_for_step, write_shards)
from vidartrain.config import load_config
from vidartrain.data.shard_index import DataInfo, read_data_info
from vidartrain.distributed.checkpointing import COMPLETE_MARKER, complete_checkpoints, tag_for_step
from vidartrain.distributed.export import main as export_main
from vidartrain.models.wan.causal import WanModelCausal
from vidartrain.models.wan.checkpoint import read_model_config
from vidartrain.models.wan.model import WanModel
from vidartrain.trainers.vidar_trainer import VidarStage

STEPS = 12


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1")
    write_tiny_checkpoint(root / "ckpt")
    write_shards(root, 10, frames=16, val_fraction=0.4)
    return root


def train_args(workspace, output_dir, *extra):
    """8 training samples: with 2 ranks x micro 1 x accumulation 2 a step is half an epoch."""
    return ["--config", "configs/debug/tiny_vidar.yaml", "--ds-config", "ds_configs/cpu_debug.json",
            "--output_dir", str(output_dir),
            "--set", f"model.ckpt_dir={workspace / 'ckpt'}", "--set", f"data.shards={workspace / 'shards'}",
            "--set", f"data.val_shards={workspace / 'shards' / 'val'}",
            "--set", f"output.save_path={output_dir / 'export' / 'vidar.pt'}",
            "--set", f"training.num_steps={STEPS}", "--set", "training.save_every=2",
            "--set", "training.val_every=6", "--set", "training.keep_last=3", "--set", "training.log_every=1",
            *extra]


@pytest.fixture(scope="module")
def reference_run(workspace):
    output_dir = workspace / "reference"
    run(deepspeed_command("launch/train.py", train_args(workspace, output_dir)), workspace / "reference.log")
    return output_dir


def losses(output_dir):
    return {step: record["loss"] for step, record in logged_steps(output_dir).items()}


def test_reference_run_trains_logs_and_exports(reference_run):
    steps = logged_steps(reference_run)
    assert sorted(steps) == list(range(1, STEPS + 1))
    for record in steps.values():
        # every micro-batch of a step is a different sample, on every rank
        assert len(record["keys"]) == 4 and len(set(record["keys"])) == 4
        assert record["finite"] and math.isfinite(record["grad_norm"]) and record["tokens"] == 4 * 12
    loss = [steps[s]["loss"] for s in sorted(steps)]
    first, last = sum(loss[:3]) / 3, sum(loss[-3:]) / 3
    assert last < 0.95 * first, f"loss did not fall on the 8-sample set: {loss}"
    assert [steps[s]["lr"] for s in (1, 5, 6)] == pytest.approx([2e-4, 1e-3, 1e-3])  # warmup 5 -> constant

    events = EventAccumulator(str(reference_run / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "throughput/samples_per_s", "throughput/tokens_per_s",
                "time/data_wait_s", "time/compute_s", "memory/peak_gib", "val/loss"):
        assert tag in tags, f"{tag} missing from TensorBoard events ({sorted(tags)})"
    assert any(tag.startswith("train/loss_by_sigma/") for tag in tags)
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, STEPS + 1))
    assert [e.step for e in events.Scalars("val/loss")] == [6, 12]
    # validation samples (configs/debug/tiny_vidar.yaml: every 10 steps, one 9-frame TI2V video)
    assert (reference_run / "samples" / tag_for_step(10) / "sample_00.mp4").is_file()
    assert [e.step for e in events.Scalars("samples/psnr")] == [10]
    assert events.Tags()["images"] == ["samples/00"]

    checkpoints = reference_run / "checkpoints"
    assert complete_checkpoints(checkpoints) == [tag_for_step(s) for s in (8, 10, 12)]  # keep_last 3
    assert (checkpoints / "latest").read_text() == tag_for_step(STEPS)

    exported = torch.load(reference_run / "export" / "vidar.pt", map_location="cpu", weights_only=True)
    config = read_model_config(reference_run.parent / "ckpt", WanModel)
    model = WanModel(**config).to(torch.bfloat16)
    model.load_state_dict(exported, strict=True)
    WanModelCausal(**config).to(torch.bfloat16).load_state_dict(exported, strict=True)
    assert all(t.dtype == torch.bfloat16 for t in exported.values())


def test_export_cli_converts_a_saved_checkpoint_to_the_same_weights(reference_run, tmp_path):
    export = [str(reference_run / "checkpoints" / tag_for_step(STEPS)), "--out", str(tmp_path / "vidar.pt")]
    (tmp_path / "vidar.safetensors").write_bytes(b"an earlier export")
    assert export_main(export) == 2  # the twin beside --out is not overwritten either without --overwrite
    assert (tmp_path / "vidar.safetensors").read_bytes() == b"an earlier export"
    assert export_main([*export, "--overwrite"]) == 0
    from_checkpoint = torch.load(tmp_path / "vidar.pt", weights_only=True)
    from_training = torch.load(reference_run / "export" / "vidar.pt", weights_only=True)
    assert from_checkpoint.keys() == from_training.keys()
    assert all(torch.equal(from_checkpoint[k], from_training[k]) for k in from_training)
    assert (tmp_path / "vidar.safetensors").is_file()


def torchrun_agents(workspace, output_dir, log, *extra):
    """Start two torchrun agents = two 'nodes' of one rank each, c10d rendezvous on 127.0.0.1."""
    port = free_port()
    return [start([str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
                   "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "vidar-test",
                   "launch/train.py", *train_args(workspace, output_dir, *extra)], log)
            for node in range(2)]


def test_two_nodes_preempted_killed_and_resumed_reproduce_the_single_node_losses(workspace, reference_run):
    output_dir, log = workspace / "interrupted", workspace / "interrupted.log"
    # 1. two 'nodes' (torchrun agents) from scratch; preemption: SIGTERM to the agents, which pass it
    #    to everything under them (ranks and DataLoader workers) -> checkpoint at the current step
    agents = torchrun_agents(workspace, output_dir, log)
    wait_for_step(agents[0], output_dir, 3, log)
    for agent in agents:
        agent.send_signal(signal.SIGTERM)
    for agent in agents:
        wait(agent, log)  # an agent exits non-zero after a SIGTERM, whatever its rank did
    assert log.read_text().count("SIGTERM received: saving a checkpoint") == 2, tail(log)  # both ranks
    stopped_at = max(logged_steps(output_dir))
    assert stopped_at < STEPS
    assert (output_dir / "checkpoints" / tag_for_step(stopped_at) / COMPLETE_MARKER).is_file()
    # 2. resume on one node (2 ranks under one torchrun agent), then SIGKILL everything at an arbitrary
    #    moment (possibly in the middle of a save)
    process = start(torchrun_command("launch/train.py", train_args(workspace, output_dir, "--resume", "auto")), log)
    wait_for_step(process, output_dir, stopped_at + 3, log)
    kill_launch(process)
    # 3. resume on the two 'nodes' again, to the end
    for agent in torchrun_agents(workspace, output_dir, log, "--resume", "auto"):
        assert wait(agent, log) == 0, tail(log)
    assert losses(output_dir) == losses(reference_run)
    assert ({s: r["keys"] for s, r in logged_steps(output_dir).items()}
            == {s: r["keys"] for s, r in logged_steps(reference_run).items()})
    assert (output_dir / "export" / "vidar.pt").is_file()


def test_universal_checkpoint_resumes_on_one_rank(workspace, reference_run):
    source = reference_run / "checkpoints" / tag_for_step(10)
    universal = reference_run / "checkpoints" / f"{tag_for_step(10)}_universal"
    subprocess.run([str(BIN / "python"), "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                    str(source), "--output_folder", str(universal)], check=True, capture_output=True)
    output_dir, log = workspace / "one_rank", workspace / "one_rank.log"
    # one rank: the same global batch of 4 as micro 1 x accumulation 4
    args = train_args(workspace, output_dir, "--resume", str(universal), "--max_steps", "11",
                      "--set", "training.batch_size=1", "--set", "training.gradient_accumulation=4")
    run(one_rank_command("launch/train.py", args), log)
    resumed, reference = logged_steps(output_dir), logged_steps(reference_run)
    assert sorted(resumed) == [11]
    # the data position continues: the same 4 samples as the 2-rank run's step 11, and the schedule
    assert sorted(resumed[11]["keys"]) == sorted(reference[11]["keys"])
    assert resumed[11]["lr"] == reference[11]["lr"]
    # same weights and samples, other noise draws: a loss of the same size
    assert resumed[11]["loss"] == pytest.approx(reference[11]["loss"], rel=0.2)


def test_held_out_batches_are_read_without_worker_processes(workspace):
    """Validation reads mid-run, when forking DataLoader workers can deadlock them at birth (CPython
    before 3.11.10): the "val" loader reads in the rank's own process, the "train" loader in
    data.num_workers workers."""
    config = load_config("configs/debug/tiny_vidar.yaml", [
        f"model.ckpt_dir={workspace / 'ckpt'}", f"data.shards={workspace / 'shards'}",
        f"data.val_shards={workspace / 'shards' / 'val'}", "data.num_workers=2"])
    stage = VidarStage(config, read_data_info(config.data.shards))
    this_process = psutil.Process()
    for split, workers in (("val", 0), ("train", 2)):
        before = set(this_process.children())  # e.g. the compiler's workers, left by earlier tests
        batches = iter(stage.build_loader(split, 1, rank=0, world_size=1))
        assert next(batches)["__key__"]
        assert len(set(this_process.children()) - before) == workers, split
        batches.close()


class RecordingDit(torch.nn.Module):
    """Stands in for the DiT: keeps the latents and timesteps it is given and predicts the latents."""

    def forward(self, x, t, context):
        self.inputs = (x, t)
        return x.clone()


def test_stage_1_loss_conditions_on_a_clean_first_frame_and_leaves_it_out(tmp_path):
    """TI2V training as at inference: frame 0 enters clean at timestep 0, the others share their sample's
    noise level, and the loss is the velocity error of frames 1.. alone."""
    checkpoint = write_tiny_checkpoint(tmp_path / "ckpt")
    config = load_config("configs/debug/tiny_vidar.yaml", [f"model.ckpt_dir={checkpoint}"])
    stage = VidarStage(config, DataInfo(mode="latents", text_embeddings=True, actions=()))
    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(2, 48, 3, 4, 4, generator=generator)
    batch = {"__key__": ["a", "b"], "latents": clean, "text_emb": [torch.randn(5, 32), torch.randn(3, 32)]}
    dit = RecordingDit()
    loss, _ = stage.training_loss(dit, batch, generator)
    x, t = dit.inputs
    sigma = t[:, 1] / 1000
    assert torch.equal(t[:, 0], torch.zeros(2)) and torch.equal(t[:, 1:], t[:, 1:2].expand(2, 2))
    assert torch.equal(x[:, :, 0], clean[:, :, 0])
    s = sigma.view(2, 1, 1, 1, 1)
    noise = (x[:, :, 1:] - (1 - s) * clean[:, :, 1:]) / s  # x = (1 - sigma) clean + sigma noise
    velocity = noise - clean[:, :, 1:]  # the target: noise minus data
    torch.testing.assert_close(loss, (x[:, :, 1:] - velocity).square().mean(), rtol=1e-4, atol=0)
