"""LoRA under ZeRO-3 on CPU: torchrun, 2 gloo ranks, the tiny Wan2.2 checkpoint and
synthetic shards (as tests/trainers/test_trainer_vidar.py). One run trains rank-4 adapters (dropout and an EMA
on, selective activation checkpointing) and ends with a validation loss the engine computes; a second
one is killed and resumed. The exports are checked against the engine."""
import json
import re

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import load_file

from conftest import fixture_path
from data_tools.tiny_checkpoint import write_tiny_checkpoint
from helpers.trainer_launch import (TINY_CONFIG, cpu_train_args, kill_launch, logged_steps, optimizer_state_numel, run,
                                    start, tail, torchrun_command, vidar_validation_loss, wait, wait_for_step,
                                    write_shards)
from models.test_wan_lora import WAN_LORA_KEY  # tests/models/: not on sys.path when this file runs alone
from vidartrain.config import load_config
from vidartrain.distributed.checkpointing import tag_for_step
from vidartrain.distributed.export import main as export_main
from vidartrain.models.wan.lora import load_wan_lora
from vidartrain.models.wan.model import WanModel

STEPS = 12
RANK, ALPHA = 4, 16.0


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    write_tiny_checkpoint(root / "ckpt")
    write_shards(root, 10, frames=16, val_fraction=0.4)
    return root


def overrides(workspace, output_dir) -> list[str]:
    return [f"model.ckpt_dir={workspace / 'ckpt'}", f"data.shards={workspace / 'shards'}",
            f"data.val_shards={workspace / 'shards' / 'val'}", "validation.every=0",
            f"output.save_path={output_dir / 'export' / 'vidar.pt'}",
            f"training.num_steps={STEPS}", "training.save_every=2", "training.keep_last=10", "training.warmup=1",
            "training.log_every=1", f"training.val_every={STEPS}", "training.lr=2e-2",
            "training.ema_decay=0.5", "model.checkpointing=selective", f"lora.rank={RANK}", f"lora.alpha={ALPHA}", "lora.dropout=0.1"]


def train_args(workspace, output_dir, *extra):
    return cpu_train_args(TINY_CONFIG, output_dir, overrides(workspace, output_dir), *extra)


@pytest.fixture(scope="module")
def lora_run(workspace):
    output_dir = workspace / "lora"
    run(torchrun_command("launch/train.py", train_args(workspace, output_dir)), workspace / "lora.log")
    return output_dir


def base_model(workspace) -> WanModel:
    return WanModel.from_pretrained(workspace / "ckpt", dtype=torch.bfloat16, device="cpu")


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def test_only_adapters_train_and_the_base_stays_bit_identical(workspace, lora_run):
    steps = logged_steps(lora_run)
    loss = [steps[s]["loss"] for s in sorted(steps)]
    assert sum(loss[-3:]) < sum(loss[:3]), f"loss did not fall on the 8-sample set: {loss}"

    initial = base_model(workspace).state_dict()
    checkpoint = lora_run / "checkpoints" / tag_for_step(STEPS)
    weights = get_fp32_state_dict_from_zero_checkpoint(str(lora_run / "checkpoints"), tag=tag_for_step(STEPS))
    adapters = sorted(name for name in weights if is_adapter(name))
    assert len(adapters) == 2 * 10 * 2  # A and B on 10 linears in each of 2 blocks
    assert set(weights) - set(adapters) == set(initial)
    for name in initial:
        assert torch.equal(weights[name], initial[name].float()), f"base tensor {name} changed"

    # DeepSpeed's optimizer knows the adapters only: its parameter list, its fp32 master and Adam moments
    model_states = torch.load(checkpoint / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)
    assert {name for group in model_states["param_shapes"] for name in group} == set(adapters)
    assert set(model_states["frozen_param_shapes"]) == set(initial)
    adapter_numel = sum(weights[name].numel() for name in adapters)
    for kind, numel in optimizer_state_numel(checkpoint, ranks=2).items():
        assert adapter_numel <= numel < adapter_numel + 2 * len(adapters), (kind, numel, adapter_numel)
    assert all(weights[name].abs().sum() > 0 for name in adapters if ".lora_B." in name)  # B moved from zero


def validation_loss(workspace, output_dir, model: WanModel, split: str = "val") -> float:
    return vidar_validation_loss(load_config("configs/debug/tiny_vidar.yaml", overrides(workspace, output_dir)),
                                 model, split)


def upstream_layout(keys) -> set[str]:
    return {re.sub(r"^blocks\.\d+\.", "blocks.N.", key) for key in keys}


def test_exports_reproduce_the_engine(workspace, lora_run, tmp_path):
    engine_loss = next(r["val_loss"] for r in map(json.loads, (lora_run / "metrics.jsonl").read_text().splitlines())
                       if r.get("step") == STEPS and "val_loss" in r)
    # the adapter file on a fresh base: the engine's own numbers
    adapter_file = lora_run / "export" / "vidar_lora.safetensors"
    keys = load_file(str(adapter_file))
    assert len(keys) == 3 * 20 and all(WAN_LORA_KEY.fullmatch(key) for key in keys), sorted(keys)[:6]
    assert all(float(keys[key]) == ALPHA for key in keys if key.endswith(".alpha"))
    fresh = base_model(workspace)
    load_wan_lora(fresh, adapter_file)
    adapted_loss = validation_loss(workspace, lora_run, fresh)
    base_loss = validation_loss(workspace, lora_run, base_model(workspace))

    # the merged vidar.pt: upstream's key layout, strict into WanModel, the engine's numbers up to bf16 rounding
    merged = torch.load(lora_run / "export" / "vidar.pt", weights_only=True)
    upstream = load_file(str(fixture_path("wan_reference", "dit_tiny_weights.safetensors")))
    assert upstream_layout(merged) == upstream_layout(upstream)
    model = base_model(workspace)
    model.load_state_dict(merged, strict=True)
    merged_loss = validation_loss(workspace, lora_run, model)
    train_losses = [validation_loss(workspace, lora_run, m, "train") for m in (fresh, base_model(workspace))]
    print(f"validation loss: engine {engine_loss:.6f}, base + adapter file {adapted_loss:.6f}, merged "
          f"{merged_loss:.6f}, base alone {base_loss:.6f}; training set (fixed noise): adapted {train_losses[0]:.6f}, "
          f"base {train_losses[1]:.6f}")
    assert train_losses[0] < 0.97 * train_losses[1]  # the overfit set's loss fell (measured: by 5.4%)
    # ZeRO-3 computes its linear layers as matmul + bias (DeepSpeed's zero3_linear_wrap), not addmm: the
    # engine's bf16 numbers differ from a plain module's in the last bits, not by what the adapters changed
    assert adapted_loss == pytest.approx(engine_loss, rel=1e-4)
    assert abs(merged_loss - engine_loss) < 0.1 * abs(base_loss - engine_loss)

    # vidar-export of the last checkpoint writes the same adapters and merged weights; --ema those of the EMA
    assert export_main([str(lora_run / "checkpoints" / tag_for_step(STEPS)), "--out", str(tmp_path / "vidar.pt")]) == 0
    exported = load_file(str(tmp_path / "vidar_lora.safetensors"))
    assert exported.keys() == keys.keys() and all(torch.equal(exported[k], keys[k]) for k in keys)
    offline = torch.load(tmp_path / "vidar.pt", weights_only=True)
    assert all(torch.equal(offline[k], merged[k]) for k in merged)
    assert export_main([str(lora_run / "checkpoints"), "--ema", "--out", str(tmp_path / "ema" / "vidar.pt")]) == 0
    ema_adapters = load_file(str(tmp_path / "ema" / "vidar_lora.safetensors"))
    trained_ema = load_file(str(lora_run / "export" / "vidar_ema_lora.safetensors"))
    assert all(torch.equal(ema_adapters[k], trained_ema[k]) for k in keys)
    assert any(not torch.equal(ema_adapters[k], keys[k]) for k in keys if ".lora_B." in k)


def test_killed_and_resumed_run_reproduces_the_losses_and_adapters(workspace, lora_run):
    output_dir, log = workspace / "killed", workspace / "killed.log"
    process = start(torchrun_command("launch/train.py", train_args(workspace, output_dir)), log)
    wait_for_step(process, output_dir, 3, log)
    kill_launch(process)
    assert max(logged_steps(output_dir)) < STEPS, "the run ended before it was killed"
    # selective checkpointing replays the forward's operations exactly in backward: the first step after the
    # resume must gather what a first step gathers (Trainer.partition_persistent_parameters), and the dropout
    # masks must be drawn again
    process = start(torchrun_command("launch/train.py", train_args(workspace, output_dir, "--resume", "auto")), log)
    assert wait(process, log) == 0, tail(log)
    assert ({s: r["loss"] for s, r in logged_steps(output_dir).items()}
            == {s: r["loss"] for s, r in logged_steps(lora_run).items()})
    for name in ("vidar_lora.safetensors", "vidar_ema_lora.safetensors"):
        resumed_file, reference = load_file(str(output_dir / "export" / name)), load_file(str(lora_run / "export" / name))
        assert all(torch.equal(resumed_file[k], reference[k]) for k in reference), name
