"""ZeRO-3 engine on 2 CPU ranks through the real `deepspeed` launcher: partitioning, activation
checkpointing gradients, and the gathered bf16 export reproducing the engine's outputs; on one rank,
that a skipped step's gradients are discarded under every ZeRO stage, and that an fp16 engine's
checkpoint, its dynamic loss scaler included, loads weights-only."""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import deepspeed
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from helpers.trainer_launch import deepspeed_command, run
from vidartrain.config import Config
from vidartrain.models.wan.causal import WanModelCausal
from vidartrain.models.wan.model import WanModel
from vidartrain.trainers import base

TINY = dict(model_type="ti2v", patch_size=[1, 2, 2], text_len=8, in_dim=48, dim=64, ffn_dim=128, freq_dim=32,
            text_dim=16, out_dim=48, num_heads=2, num_layers=3)


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    shared_before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    run(deepspeed_command("tests/helpers/trainer_zero3_script.py", [str(out)], local_rank_flag=False), out / "log.txt")
    # DeepSpeed's CPU allreduce buffers (66 MB per rank) are not left behind in /dev/shm
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) <= shared_before
    reports = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]
    return out, reports


def test_zero3_partitions_parameters_across_ranks(zero3_run):
    _, reports = zero3_run
    total = reports[0]["total_numel"]
    assert total == sum(p.numel() for p in WanModel(**TINY).parameters())
    for report in reports:
        # each rank stores about half of every tensor (padded to an even split), nothing more
        assert 0.45 * total <= report["local_numel"] <= 0.55 * total
        assert report["visible_numel"] == 0  # full tensors are released after use
    assert sum(r["local_numel"] for r in reports) >= total


def test_activation_checkpointing_gives_the_plain_gradients_under_zero3(zero3_run):
    _, reports = zero3_run
    for report in reports:
        assert report["num_tensors"] == len(list(WanModel(**TINY).parameters()))
        assert report["max_grad"] > 0
        assert report["max_grad_diff"] == 0.0


def test_gathered_export_loads_strictly_and_reproduces_engine_outputs(zero3_run):
    out, _ = zero3_run
    state_dict = torch.load(out / "vidar.pt", map_location="cpu", weights_only=True)
    assert all(t.dtype == torch.bfloat16 for t in state_dict.values())
    assert "blocks.0.self_attn.q.weight" in state_dict and "head.head.weight" in state_dict
    safetensors = load_file(out / "vidar.safetensors")
    assert safetensors.keys() == state_dict.keys()
    assert all(torch.equal(safetensors[k], state_dict[k]) for k in state_dict)

    model = WanModel(**TINY).to(torch.bfloat16).eval()
    model.load_state_dict(state_dict, strict=True)
    WanModelCausal(**TINY).to(torch.bfloat16).load_state_dict(state_dict, strict=True)
    reference = torch.load(out / "engine_output.pt", weights_only=True)
    # In the rank process (where ZeRO-3 replaced F.linear by matmul + bias add) the reloaded export
    # reproduces the engine bit for bit ...
    assert torch.equal(reference["fresh_output"], reference["output"])
    # ... and here, with torch's fused linear, to bf16 rounding.
    with torch.no_grad():
        output = model(*reference["inputs"])
    torch.testing.assert_close(output, reference["output"], atol=3e-3, rtol=2e-2)
    # the weights moved away from the initialisation during the two steps
    torch.manual_seed(0)
    initial = WanModel(**TINY)
    assert not torch.equal(initial.blocks[0].ffn[0].weight.to(torch.bfloat16), state_dict["blocks.0.ffn.0.weight"])


def fake_zero3_partition(module, config_dict_or_path):
    """What `deepspeed.zero.Init(module=...)` does to placement: parameters move to the accelerator
    ("meta" stands in for a GPU here), buffers stay where they are."""
    for submodule in module.modules():
        for name, parameter in list(submodule._parameters.items()):
            submodule._parameters[name] = nn.Parameter(parameter.data.to("meta"), parameter.requires_grad)


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory) -> dict:
    """The checks of tests/helpers/one_rank_engine_script.py, one process (a group of one) for all of them."""
    log = tmp_path_factory.mktemp("one_rank") / "log.txt"
    run([sys.executable, "tests/helpers/one_rank_engine_script.py"], log)
    return json.loads(next(line for line in log.read_text().splitlines() if line.startswith("{")))


def test_a_skipped_steps_gradients_do_not_reach_the_next_step_under_any_zero_stage(one_rank_run):
    """The trainer drops a step whose micro-batch went non-finite after earlier micro-batches were
    backpropagated (`discard_gradients`). ZeRO-2 kept their reduced gradients (all_grad_tensors) past
    zero_grad() and added them into the next step: the weights then differed by about an lr."""
    assert one_rank_run["discarded_gradients"] == {"0": 0.0, "1": 0.0, "2": 0.0, "3": 0.0}


def test_an_fp16_checkpoint_resumes_with_its_dynamic_loss_scaler(one_rank_run):
    """A real fp16 ZeRO-3 engine (DeepSpeed's default there: dynamic loss scaling) skips a step whose scaled
    gradients overflow, and its checkpoint loads weights-only, as the trainer's resume and export read it:
    the DynamicLossScaler was refused as 'a crafted or foreign file', so no fp16 run could resume."""
    result = one_rank_run["fp16_resume"]
    assert result["applied"] == [True, False, True]  # what the trainer's EMA asks (engine.was_step_applied)
    assert result["loaded"] and result["loss_scaler"] == "DynamicLossScaler"
    # the overflow used up one step of hysteresis (a fresh scaler has 2): the saved state came back
    assert result["hysteresis"] == [1, 1] and result["same_loss_scaler"] and result["same_weights"]
    # a model built in float32 (the DiT loads in bf16) is partitioned in the profile's fp16, not in its own dtype
    assert result["weight_dtypes"] == ["torch.float16"]


def test_build_engine_puts_buffers_on_the_device_of_the_zero3_parameters(monkeypatch):
    # On a GPU, BatchNorm statistics left on the CPU crashed the IDM's first step; on a CPU-only
    # machine parameters and buffers share the CPU, so an accelerator is faked.
    accelerator = SimpleNamespace(current_device_name=lambda: "meta")
    monkeypatch.setattr(base, "get_accelerator", lambda: accelerator)
    monkeypatch.setattr(deepspeed.zero, "Init", fake_zero3_partition)
    monkeypatch.setattr(deepspeed, "initialize", lambda model, **_: (
        SimpleNamespace(module=model, device=torch.device("meta")), None, None, None))
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    engine = base.build_engine(model, {"zero_optimization": {"stage": 3}}, Config())
    assert {b.device.type for b in engine.module.buffers()} == {"meta"}
    assert {p.device.type for p in engine.module.parameters()} == {"meta"}


def fake_offloaded_zero3_partition(module, config_dict_or_path):
    """`deepspeed.zero.Init(module=...)` under zero_optimization.offload_param: each parameter's data is
    released on the accelerator ("meta" here), its partition (`ds_tensor`) kept in CPU memory."""
    for submodule in module.modules():
        for name, parameter in list(submodule._parameters.items()):
            partitioned = nn.Parameter(parameter.data.to("meta"), parameter.requires_grad)
            partitioned.ds_tensor = parameter.data.detach().flatten().clone()
            submodule._parameters[name] = partitioned


def fake_engine(monkeypatch, device: str) -> None:
    """deepspeed.initialize and the accelerator faked around `build_engine`, the engine on `device`."""
    accelerator = SimpleNamespace(current_device_name=lambda: device)
    monkeypatch.setattr(base, "get_accelerator", lambda: accelerator)
    monkeypatch.setattr(deepspeed, "initialize", lambda model, **_: (
        SimpleNamespace(module=model, device=torch.device(device)), None, None, None))


def test_build_engine_accepts_parameter_partitions_offloaded_to_the_cpu(monkeypatch):
    """`distributed.cpu_offload: true` under ZeRO-3 offloads the parameters: their partitions live in CPU
    memory by design, and the placement check refused every such run on a GPU before its first step."""
    fake_engine(monkeypatch, "meta")
    monkeypatch.setattr(deepspeed.zero, "Init", fake_offloaded_zero3_partition)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    zero = {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": True}}
    engine = base.build_engine(model, {"zero_optimization": zero}, Config())
    assert {p.ds_tensor.device.type for p in engine.module.parameters()} == {"cpu"}
    assert {b.device.type for b in engine.module.buffers()} == {"meta"}
    # without offload_param such partitions are misplaced; buffers belong on the device with it too
    with pytest.raises(RuntimeError, match=r"0\.weight \(cpu\)"):
        base.check_placement(engine.module, torch.device("meta"))
    engine.module[1].running_mean = torch.zeros(4)
    with pytest.raises(RuntimeError, match=r"1\.running_mean \(cpu\)"):
        base.check_placement(engine.module, torch.device("meta"), offloaded_partitions=True)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                              (None, torch.float32)])
def test_build_engine_puts_the_weights_in_the_profiles_precision(monkeypatch, precision, dtype):
    """DeepSpeed casts nothing under fp32: the DiT, loaded in bf16, kept training bf16 weights there (under
    ZeRO 0-2 with torch's AdamW stepping them directly)."""
    fake_engine(monkeypatch, "cpu")
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)).to(torch.bfloat16)
    profile = {"zero_optimization": {"stage": 1}, **({precision: {"enabled": True}} if precision else {})}
    engine = base.build_engine(model, profile, Config())
    assert {p.dtype for p in engine.module.parameters()} == {dtype}


def test_check_placement_names_the_tensors_off_the_engine_device():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    base.check_placement(model, torch.device("cpu"))
    model[1].running_mean = model[1].running_mean.to("meta")
    with pytest.raises(RuntimeError, match=r"1\.running_mean \(meta\)"):
        base.check_placement(model, torch.device("cpu"))


def test_the_optimizer_is_adamw_with_the_fused_kernel_and_the_configured_hyperparameters():
    config = Config()
    optimizer = base.build_optimizer([nn.Parameter(torch.zeros(3))], config)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"]
    assert optimizer.defaults["weight_decay"] == config.training.weight_decay
    assert optimizer.defaults["betas"] == config.training.betas
