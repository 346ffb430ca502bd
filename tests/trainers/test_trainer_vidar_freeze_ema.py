"""Partial freezing and the EMA under ZeRO-3 on CPU: torchrun, 2 gloo ranks, the
tiny Wan2.2 checkpoint and synthetic shards (as tests/trainers/test_trainer_vidar.py). One run freezes the
text embedding and block 0, keeps an EMA and validates it too (training.validate_ema); a second one,
without the EMA's validation, is killed and resumed."""
import json

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from data_tools.tiny_checkpoint import write_tiny_checkpoint
from helpers.trainer_launch import (TINY_CONFIG, cpu_train_args, kill_launch, logged_steps, optimizer_state_numel, run,
                                    start, tail, torchrun_command, vidar_validation_loss, wait, wait_for_step,
                                    write_shards)
from vidartrain.config import load_config
from vidartrain.distributed.checkpointing import tag_for_step
from vidartrain.models.wan.model import WanModel
from vidartrain.trainers.ema import ema_state_dict_from_checkpoint

STEPS = 6
FREEZE = "[t5,vae,text_embedding.*,blocks.0.*]"
EMA_DECAY, EMA_WARMUP = 0.9, 3
VAL_EVERY = 3


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("freeze_ema")
    write_tiny_checkpoint(root / "ckpt")
    write_shards(root, 10, frames=16, val_fraction=0.4)
    return root


def overrides(workspace, output_dir) -> list[str]:
    return [f"model.ckpt_dir={workspace / 'ckpt'}", f"data.shards={workspace / 'shards'}",
            f"data.val_shards={workspace / 'shards' / 'val'}", "validation.every=0",
            f"training.val_every={VAL_EVERY}", f"output.save_path={output_dir / 'export' / 'vidar.pt'}",
            f"training.num_steps={STEPS}", "training.save_every=1", "training.keep_last=10", "training.warmup=1",
            "training.log_every=1", f"training.freeze={FREEZE}",
            f"training.ema_decay={EMA_DECAY}", f"training.ema_warmup={EMA_WARMUP}"]


def train_args(workspace, output_dir, *extra):
    return cpu_train_args(TINY_CONFIG, output_dir, overrides(workspace, output_dir), *extra)


@pytest.fixture(scope="module")
def frozen_run(workspace):
    output_dir = workspace / "frozen"
    run(torchrun_command("launch/train.py", train_args(workspace, output_dir, "--set", "training.validate_ema=true")),
        workspace / "frozen.log")
    return output_dir


def is_frozen(name: str) -> bool:
    return name.startswith(("text_embedding.", "blocks.0."))


def test_frozen_parameters_are_unchanged_and_outside_the_optimizer(workspace, frozen_run):
    initial = WanModel.from_pretrained(workspace / "ckpt", dtype=torch.bfloat16, device="cpu").state_dict()
    exported = torch.load(frozen_run / "export" / "vidar.pt", weights_only=True)
    assert exported.keys() == initial.keys()
    frozen = [name for name in initial if is_frozen(name)]
    assert len(frozen) == 4 + 27  # text_embedding: 2 linears; blocks.0: 27 tensors
    for name in frozen:
        assert torch.equal(exported[name], initial[name]), f"frozen {name} changed"
    trained = [name for name in initial if not is_frozen(name)]
    assert all(not torch.equal(exported[name], initial[name]) for name in trained if name.endswith(".weight"))

    # DeepSpeed's checkpoint: the optimizer's parameter list has no frozen name, its fp32 master
    # and Adam moments (flat partitions of all ranks) hold exactly the trainable elements (+ padding)
    checkpoint = frozen_run / "checkpoints" / tag_for_step(STEPS)
    model_states = torch.load(checkpoint / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)
    optimized = {name for group in model_states["param_shapes"] for name in group}
    assert optimized == set(trained)
    assert set(model_states["frozen_param_shapes"]) == set(frozen)
    trainable_numel = sum(initial[name].numel() for name in trained)
    for kind, numel in optimizer_state_numel(checkpoint, ranks=2).items():
        assert trainable_numel <= numel < trainable_numel + 2 * len(trained), (kind, numel, trainable_numel)


def test_ema_equals_a_reference_ema_of_the_gathered_weights_and_is_exported(workspace, frozen_run):
    initial = WanModel.from_pretrained(workspace / "ckpt", dtype=torch.bfloat16, device="cpu").state_dict()
    trained = [name for name in initial if not is_frozen(name)]
    # the master weights start as the bf16 checkpoint; after each step, DeepSpeed's fp32 weights
    reference = {name: initial[name].float() for name in trained}
    for step in range(1, STEPS + 1):
        weights = get_fp32_state_dict_from_zero_checkpoint(str(frozen_run / "checkpoints"), tag=tag_for_step(step))
        decay = EMA_DECAY * min(1.0, step / EMA_WARMUP)
        reference = {name: decay * reference[name] + (1 - decay) * weights[name] for name in trained}
    ema = ema_state_dict_from_checkpoint(frozen_run / "checkpoints" / tag_for_step(STEPS))
    assert ema.keys() == set(trained)
    for name in trained:
        torch.testing.assert_close(ema[name], reference[name], rtol=1e-5, atol=1e-6)
        assert not torch.equal(ema[name], weights[name])  # an average, not the last weights
    exported = torch.load(frozen_run / "export" / "vidar_ema.pt", weights_only=True)
    assert exported.keys() == initial.keys()
    for name in trained:
        assert torch.equal(exported[name], ema[name].to(torch.bfloat16)), name
    for name in initial:
        if is_frozen(name):
            assert torch.equal(exported[name], initial[name])
    WanModel.from_pretrained(workspace / "ckpt", dtype=torch.bfloat16, device="cpu").load_state_dict(exported, strict=True)


def validation_records(output_dir) -> dict[tuple[int, str], float]:
    """(step, "val_loss" | "val_ema_loss") -> the logged validation loss."""
    records = map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines())
    return {(r["step"], name): r[name] for r in records for name in ("val_loss", "val_ema_loss") if name in r}


def test_ema_validation_evaluates_the_exported_ema(workspace, frozen_run):
    logged = validation_records(frozen_run)
    assert set(logged) == {(step, name) for step in (3, 6) for name in ("val_loss", "val_ema_loss")}
    # beside each loss, the stage's metrics on the held-out batches: stage 1's loss by noise level
    rows = [json.loads(line) for line in (frozen_run / "metrics.jsonl").read_text().splitlines()]
    validations = [row for row in rows if "val_loss" in row or "val_ema_loss" in row]
    assert len(validations) == 4 and all(any(key.startswith(("val_loss_by_sigma/", "val_ema_loss_by_sigma/"))
                                             for key in row) for row in validations)
    config = load_config("configs/debug/tiny_vidar.yaml", overrides(workspace, frozen_run))
    recomputed = {}
    for name, file in (("val_loss", "vidar.pt"), ("val_ema_loss", "vidar_ema.pt")):
        model = WanModel.from_pretrained(workspace / "ckpt", dtype=torch.bfloat16, device="cpu")
        model.load_state_dict(torch.load(frozen_run / "export" / file, weights_only=True), strict=True)
        recomputed[name] = vidar_validation_loss(config, model)
    print(f"step {STEPS} validation loss: engine {logged[STEPS, 'val_loss']:.6f} / EMA {logged[STEPS, 'val_ema_loss']:.6f}; "
          f"recomputed from vidar.pt {recomputed['val_loss']:.6f} / vidar_ema.pt {recomputed['val_ema_loss']:.6f}")
    # ZeRO-3 computes its linear layers as matmul + bias, a plain module as addmm: the last bits differ
    for name in recomputed:
        assert recomputed[name] == pytest.approx(logged[STEPS, name], rel=1e-4), name
    # the EMA's loss is another number than the training weights', well beyond that tolerance
    assert abs(logged[STEPS, "val_ema_loss"] - logged[STEPS, "val_loss"]) > 1e-3 * logged[STEPS, "val_loss"]


def test_killed_and_resumed_run_has_the_same_losses_and_ema(workspace, frozen_run):
    """Resumed, and without training.validate_ema: the EMA's validation left the training weights as
    they were (the same losses, validation losses and EMA)."""
    output_dir, log = workspace / "killed", workspace / "killed.log"
    process = start(torchrun_command("launch/train.py", train_args(workspace, output_dir)), log)
    wait_for_step(process, output_dir, 2, log)
    kill_launch(process)
    assert max(logged_steps(output_dir)) < STEPS, "the run ended before it was killed"
    process = start(torchrun_command("launch/train.py", train_args(workspace, output_dir, "--resume", "auto")), log)
    assert wait(process, log) == 0, tail(log)
    assert ({s: r["loss"] for s, r in logged_steps(output_dir).items()}
            == {s: r["loss"] for s, r in logged_steps(frozen_run).items()})
    validated = validation_records(output_dir)
    assert validated == {key: loss for key, loss in validation_records(frozen_run).items() if key[1] == "val_loss"}
    resumed = ema_state_dict_from_checkpoint(output_dir / "checkpoints" / tag_for_step(STEPS))
    uninterrupted = ema_state_dict_from_checkpoint(frozen_run / "checkpoints" / tag_for_step(STEPS))
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in uninterrupted)
    exported = torch.load(output_dir / "export" / "vidar_ema.pt", weights_only=True)
    reference = torch.load(frozen_run / "export" / "vidar_ema.pt", weights_only=True)
    assert all(torch.equal(exported[name], reference[name]) for name in reference)
