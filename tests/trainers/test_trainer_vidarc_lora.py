"""LoRA in stage 2 under ZeRO-3 on CPU: torchrun, 2 gloo ranks, the workspace and
run arguments of tests/trainers/test_self_forcing_zero3.py (a stage-1 vidar.pt, the frozen IDM, the 'mixed'
context) plus rank-4 adapters, in one run."""
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from helpers.trainer_launch import logged_steps, optimizer_state_numel, run, torchrun_command
from test_self_forcing_zero3 import STEPS, train_args, workspace  # noqa: F401  (workspace: a fixture)
from vidartrain.distributed.checkpointing import tag_for_step

RANK, ALPHA = 4, 16.0


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def test_stage2_lora_trains_only_the_adapters(workspace):
    output_dir = workspace / "lora"
    run(torchrun_command("launch/train.py", train_args(
        workspace, output_dir, "--set", f"lora.rank={RANK}", "--set", f"lora.alpha={ALPHA}",
        "--set", "training.lr=2e-2")), workspace / "lora.log", timeout=600)
    steps = logged_steps(output_dir)
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor(record["loss"])) for record in steps.values())

    # the stage-1 weights the run starts from (model.pt_dir) stay bit-identical
    initial = torch.load(workspace / "vidar.pt", weights_only=True)
    weights = get_fp32_state_dict_from_zero_checkpoint(str(output_dir / "checkpoints"), tag=tag_for_step(STEPS))
    adapters = sorted(name for name in weights if is_adapter(name))
    assert len(adapters) == 2 * 10 * 2  # A and B on 10 linears in each of 2 blocks
    base = set(weights) - set(adapters)
    assert base == set(initial)
    for name in base:
        assert torch.equal(weights[name], initial[name].float()), f"base tensor {name} changed"
    assert all(weights[name].abs().sum() > 0 for name in adapters if ".lora_B." in name)  # B moved from zero

    # DeepSpeed's optimizer knows the adapters only: its parameter list and its fp32 master partitions
    checkpoint = output_dir / "checkpoints" / tag_for_step(STEPS)
    model_states = torch.load(checkpoint / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)
    assert {name for group in model_states["param_shapes"] for name in group} == set(adapters)
    assert set(model_states["frozen_param_shapes"]) == base
    adapter_numel = sum(weights[name].numel() for name in adapters)
    fp32_numel = optimizer_state_numel(checkpoint, ranks=2)["fp32"]
    assert adapter_numel <= fp32_numel < adapter_numel + 2 * len(adapters)
