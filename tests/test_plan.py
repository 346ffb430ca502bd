"""The memory and time planner: geometry, FLOPs, DeepSpeed's model-state accounting, verdicts."""
import json
import re
import shlex
from pathlib import Path

import pytest
from deepspeed.accelerator import get_accelerator

from data_tools.tiny_checkpoint import TINY_DIT
from vidartrain.config import ConfigError, load_config
from vidartrain.distributed.ds_config import load_profile
from vidartrain.models.wan.model import WanModel
from vidartrain.plan import (GIB, GPUS, DitShape, activation_gib, attended_pairs, check_groups_within_nodes,
                             dit_parameters, dit_shape_of, forward_flops, hardware_table, latent_grid, main, make_plan,
                             measure_activation_model, model_state_gib)

REPO = Path(__file__).resolve().parents[1]


def test_real_geometry_and_flops_match_design_facts():
    frames, h, w = latent_grid(81, 736, 640)
    assert (frames, h, w) == (21, 23, 20) and frames * h * w == 9660
    flops = forward_flops(DitShape(), 9660, attended_pairs(21, 460, "dense"), 21)
    total = sum(flops.values())
    assert total == pytest.approx(1.22e14, rel=0.02)
    assert flops["linear"] / total == pytest.approx(0.69, abs=0.015)
    assert flops["self_attention"] / total == pytest.approx(0.28, abs=0.015)


def test_block_sparse_pair_counts():
    assert attended_pairs(3, 2, "dense") == 36
    assert attended_pairs(3, 2, "causal") == (1 + 2 + 3) * 4
    # [clean | noisy]: clean i sees clean <= i (6 frame pairs); noisy i sees clean < i and itself (3 + 3)
    assert attended_pairs(3, 2, "teacher_forcing") == (6 + 3 + 3) * 4


def test_parameter_count_and_deepspeed_model_states():
    params, largest = dit_parameters(DitShape())
    assert params == 4_999_787_712
    assert largest == 18432 * 3072 + 18432  # time_projection.1
    parts = model_state_gib(params, largest, stage=3, world=8, offload_optimizer=False)
    assert parts["parameters"] * GIB == pytest.approx(2 * params / 8)
    assert parts["optimizer"] * GIB == pytest.approx(12 * params / 8)
    replicated = model_state_gib(params, largest, stage=0, world=8, offload_optimizer=False)
    assert replicated["parameters"] * GIB == pytest.approx(2 * params)


@pytest.mark.parametrize("changes", [{}, {"in_dim": 16, "out_dim": 32, "qk_norm": False, "cross_attn_norm": False}])
def test_parameters_are_counted_for_the_checkpoints_own_config(changes, tmp_path):
    # the tiny checkpoint's config.json (freq_dim 64, not TI2V-5B's 256), and one whose every other
    # parameter-shaping argument differs from the defaults too
    arguments = {**TINY_DIT, **changes}
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "WanModel", **arguments}))
    config = load_config(REPO / "configs/debug/tiny_vidar.yaml", [f"model.ckpt_dir={tmp_path}"])
    params, _ = dit_parameters(dit_shape_of(config))
    assert params == sum(p.numel() for p in WanModel(**arguments).parameters())


def test_activation_model_is_measured_from_our_block():
    model = measure_activation_model(256, 1024, 4)
    assert model.checkpointed_block == 4 * 256  # float32 residual stream kept per checkpointed block
    assert 20 * 256 < model.block < 120 * 256  # bytes/token of one block, between loose physical bounds
    # selective keeps the input, the bf16 outputs of q, k, v, o, cross q, cross o, ffn.2 (7 x 2 dim),
    # both attention outputs (2 x 2 dim), ffn.0 (2 ffn_dim) and the softmax statistics
    assert 22 * 256 + 2 * 1024 <= model.selective_block <= 1.05 * (22 * 256 + 2 * 1024)
    none, selective, full = (model.per_token(30, mode) for mode in ("none", "selective", "full"))
    assert full < selective < none and full < none / 3


def test_2xh200_micro_batch_8_verdicts_with_and_without_checkpointing():
    config = load_config(REPO / "configs/vidarc_2xh200.yaml", ["model.chunk_size=21"])
    profile = load_profile(REPO / "ds_configs/zero3_2xh200.json")
    with_ckpt = make_plan(config, "zero3_2xh200", profile, "h200", 2, checkpointing="full")
    without = make_plan(config, "zero3_2xh200", profile, "h200", 2, checkpointing="none")
    assert with_ckpt.micro_batch == 8 and with_ckpt.tokens_per_sample == 2 * 9660
    assert without.memory_gib["activations"] > 5 * with_ckpt.memory_gib["activations"]
    assert not without.fits and without.max_micro_batch < 8
    assert with_ckpt.total_gib == pytest.approx(sum(with_ckpt.memory_gib.values()))
    assert "GiB per GPU" in with_ckpt.verdict()


def test_a100_time_for_4k_steps():
    config = load_config(REPO / "configs/vidarc_causal.yaml")
    plan = make_plan(config, "zero3_8xa100_80g", load_profile(REPO / "ds_configs/zero3_8xa100_80g.json"),
                     "a100-80g", 8)
    per_sample = sum(plan.flops_per_sample.values()) * 4  # forward, backward (2x), recompute
    expected = per_sample * 128 / 8 / (0.4 * 312e12)
    assert plan.step_seconds == pytest.approx(expected, rel=1e-6)
    assert plan.run_hours == pytest.approx(expected * 4000 / 3600, rel=1e-6)


def test_cli_prints_plan_and_rejects_bad_config(capsys, tmp_path):
    assert main(["--config", str(REPO / "configs/vidarc_2xh200.yaml"), "--ds-config",
                 str(REPO / "ds_configs/zero3_2xh200.json"), "--gpu", "h200", "--checkpointing", "full"]) == 0
    out = capsys.readouterr().out
    assert "verdict:" in out and "largest micro-batch" in out and "h for 4,000 steps" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  lrr: 1\n")
    assert main(["--config", str(bad), "--ds-config", str(REPO / "ds_configs/zero3_2xh200.json")]) == 2
    assert "did you mean `training.lr`" in capsys.readouterr().err


def test_zero3_model_states_on_a_world_size_that_is_no_multiple_of_8():
    # 12 GPUs (3 nodes of 4, or 2 of 6): DeepSpeed's estimator is asked for 12 GPUs, not 1 node of 8
    params, largest = dit_parameters(DitShape())
    parts = model_state_gib(params, largest, stage=3, world=12, offload_optimizer=False)
    assert parts["parameters"] * GIB == pytest.approx(2 * params / 12)
    assert parts["optimizer"] * GIB == pytest.approx(12 * params / 12)


def test_sequence_parallel_groups_across_nodes_are_not_planned_on_nvlink():
    # 48 H100s (6 nodes of 8) with SP 3 (it divides the 24 heads and stage 1's 9,660 tokens): groups 6-8,
    # 15-17, ... span two nodes, where the all-to-alls cross the network; the plan timed them on NVLink
    config = load_config(REPO / "configs/vidar_finetune.yaml", [
        "distributed.sequence_parallel_size=3", "training.batch_size=32", "training.gradient_accumulation=4"])
    profile = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4, "bf16": {"enabled": True},
               "zero_optimization": {"stage": 3}}
    with pytest.raises(ConfigError, match=r"= 3 on 48 H100-80G SXM: groups .* across nodes of 8 GPUs.* \[1, 2, 4, 8\]"):
        make_plan(config, "custom", profile, "h100", 48, checkpointing="full")
    for sequence_parallel, world in ((2, 64), (4, 64), (8, 64), (3, 6), (6, 6)):  # 6 GPUs: one node
        check_groups_within_nodes(sequence_parallel, world, GPUS["h100"])


def test_offloading_the_optimizer_keeps_only_bf16_parameters_on_one_gpu():
    params, largest = dit_parameters(DitShape())
    parts = model_state_gib(params, largest, stage=3, world=1, offload_optimizer=True)
    assert parts["parameters"] * GIB == pytest.approx(2 * params)
    assert parts["gradients"] == parts["optimizer"] == 0.0
    assert model_state_gib(params, largest, 3, 1, offload_optimizer=True, offload_params=True)["parameters"] == 0.0


@pytest.mark.parametrize("micro, checkpointing, measured_gib", [(1, "full", 7.7), (2, "full", 15.2), (1, "none", 42.6)])
def test_activation_memory_within_10_percent_of_the_h200_measurements(micro, checkpointing, measured_gib):
    # peak activation memory of real TI2V-5B stage-1 steps (9,660 tokens, bf16) measured on one H200
    planned = activation_gib(DitShape(), 9660, micro, checkpointing)
    assert planned == pytest.approx(measured_gib, rel=0.10)


def test_one_gpu_profile_fits_stage_1_with_checkpointing_on_an_80gb_card():
    config = load_config(REPO / "configs/vidar_finetune.yaml")
    profile = load_profile(REPO / "ds_configs/zero3_1xgpu.json")
    plan = make_plan(config, "zero3_1xgpu", profile, "h100", 1, checkpointing="full")
    assert plan.micro_batch * plan.accumulation == config.training.batch_size
    assert plan.fits and plan.max_micro_batch >= plan.micro_batch
    rows = hardware_table(config)
    assert {(r["profile"], r["gpus"]) for r in rows} >= {("zero3_1xgpu", "1x H100-80G SXM"),
                                                        ("zero3_1xgpu", "1x H200 (141 GB)")}


def test_cli_plans_for_the_gpu_the_profile_is_named_for_and_asks_when_it_names_none(capsys):
    args = ["--config", str(REPO / "configs/vidar_finetune.yaml"), "--checkpointing", "full", "--ds-config"]
    assert main([*args, str(REPO / "ds_configs/zero3_2xh200.json")]) == 0
    assert "on 2 x H200 (141 GB)" in capsys.readouterr().out
    assert main([*args, str(REPO / "ds_configs/zero3_8xa100_80g.json")]) == 0
    assert "on 8 x A100-80G SXM" in capsys.readouterr().out
    assert main([*args, str(REPO / "ds_configs/zero3_1xgpu.json")]) == 2
    assert "zero3_1xgpu.json is not named for one GPU: pass --gpu (a100-80g, h100, h200)" in capsys.readouterr().err
    assert main([*args, str(REPO / "ds_configs/zero3_1xgpu.json"), "--gpu", "h200"]) == 0
    assert "on 1 x H200 (141 GB)" in capsys.readouterr().out


def test_best_names_the_fastest_checkpointing_mode_that_fits(capsys):
    args = ["--config", str(REPO / "configs/vidar_finetune.yaml"), "--best", "--ds-config"]
    assert main([*args, str(REPO / "ds_configs/zero3_1xgpu.json"), "--gpu", "h200"]) == 0
    assert "best: activation checkpointing none" in capsys.readouterr().out  # micro-batch 2 fits 141 GB
    assert main([*args, str(REPO / "ds_configs/zero3_1xgpu.json"), "--gpu", "h100"]) == 0
    out = capsys.readouterr().out  # on 80 GB neither none nor selective fits
    assert "activation checkpointing selective" in out and "best: activation checkpointing full" in out
    assert main([*args, str(REPO / "ds_configs/zero3_2xh200.json"), "--set", "training.batch_size=64",
                 "--set", "training.gradient_accumulation=1"]) == 0  # micro-batch 32
    assert "best: no checkpointing mode fits" in capsys.readouterr().out


def test_lora_plans_keep_gradients_and_optimizer_state_for_the_adapters_only():
    profile = load_profile(REPO / "ds_configs/zero3_2xh200.json")
    full = make_plan(load_config(REPO / "configs/vidar_finetune.yaml"), "zero3_2xh200", profile, "h200", 2,
                     checkpointing="full")
    lora = make_plan(load_config(REPO / "configs/vidar_finetune.yaml", ["lora.rank=64"]), "zero3_2xh200", profile,
                     "h200", 2, checkpointing="full")
    params = full.trained_parameters
    assert params == 4_999_787_712
    # rank 64 on 30 blocks: 8 attention linears 3072 -> 3072, ffn.0 3072 -> 14336, ffn.2 14336 -> 3072
    adapters = 30 * 64 * (8 * (3072 + 3072) + 2 * (3072 + 14336))
    assert lora.trained_parameters == adapters == 161_218_560 and lora.lora_rank == 64
    assert lora.memory_gib["parameters"] == pytest.approx(2 * (params + adapters) / 2 / GIB)  # bf16, partitioned
    assert lora.memory_gib["gradients"] == pytest.approx(4 * adapters / 2 / GIB)
    assert lora.memory_gib["optimizer"] == pytest.approx(12 * adapters / 2 / GIB)  # no fp32 master of the base
    assert lora.memory_gib["activations"] == full.memory_gib["activations"]
    assert lora.step_seconds == pytest.approx(full.step_seconds * 3 / 4)  # no weight gradients of the base
    assert full.total_gib - lora.total_gib > 0.9 * 16 * params / 2 / GIB


@pytest.mark.parametrize("flags, message", [
    (["--mfu", "0"], "--mfu 0.0: the share of the GPU's peak bf16 FLOP/s a step reaches, in (0, 1]"),
    (["--mfu", "5"], "--mfu 5.0: "),
    (["--mfu", "nan"], "--mfu nan: "),
    (["--world-size", "0"], "--world-size 0: the number of GPUs, at least 1"),
    (["--checkpointing", "full", "--best"], "--best picks the fastest of all three checkpointing modes that fits, "
                                            "--checkpointing full plans that mode alone"),
    (["--table", "--gpu", "h100", "--world-size", "2", "--checkpointing", "all"],
     "--table plans every DeepSpeed profile on its own GPUs and world size, in every checkpointing mode: --gpu, "
     "--world-size, --checkpointing cannot be used with it"),
    (["--table", "--ds-config", "ds_configs/zero3_2xh200.json", "--best"], ": --ds-config, --best cannot be used"),
])
def test_cli_refuses_impossible_numbers_and_contradicting_flags(flags, message, capsys):
    assert main(["--config", str(REPO / "configs/vidar_finetune.yaml"), *flags]) == 2
    out, err = capsys.readouterr()
    assert message in err and not out


def test_offload_sections_are_read_as_deepspeed_reads_them():
    config = load_config(REPO / "configs/vidar_finetune.yaml")
    profile = load_profile(REPO / "ds_configs/zero3_8xh100.json")
    params = 4_999_787_712
    zero = profile["zero_optimization"]
    # device "none": nothing leaves the GPU
    kept = {**profile, "zero_optimization": {**zero, "offload_optimizer": {"device": "none"}}}
    plan = make_plan(config, "zero3_8xh100", kept, "h100", 8, checkpointing="full")
    assert plan.memory_gib["optimizer"] * GIB == pytest.approx(12 * params / 8)
    # ZeRO-3 parameters offloaded, the optimizer kept on the GPU (DeepSpeed's estimator has no such case)
    parameters_only = {**profile, "zero_optimization": {**zero, "offload_param": {"device": "cpu"}}}
    plan = make_plan(config, "zero3_8xh100", parameters_only, "h100", 8, checkpointing="full")
    assert plan.memory_gib["parameters"] == 0.0
    assert plan.memory_gib["optimizer"] * GIB == pytest.approx(12 * params / 8)


def test_float32_weights_are_not_planned_as_bf16(capsys):
    # float32 weights, gradients and activations hold about twice the bytes the planner's 16-bit model counts
    config = load_config(REPO / "configs/vidar_finetune.yaml", ["distributed.mixed_precision=fp32"])
    with pytest.raises(ConfigError, match="this DeepSpeed config trains float32 weights"):
        make_plan(config, "zero3_8xh100", load_profile(REPO / "ds_configs/zero3_8xh100.json"), "h100", 8)
    assert main(["--config", str(REPO / "configs/vidar_finetune.yaml"), "--set", "distributed.mixed_precision=fp32",
                 "--ds-config", str(REPO / "ds_configs/zero3_8xh100.json")]) == 2
    assert "trains float32 weights" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, named", [
    (["self_forcing.context_mode=self_generated"], "self_forcing.context_mode self_generated"),
    (["self_forcing.context_mode=mixed"], "self_forcing.context_mode mixed"),
    (["self_forcing.closed_loop=true"], "self_forcing.closed_loop"),
])
def test_stage_2_rollouts_through_the_kv_cache_are_not_planned_as_teacher_forcing(overrides, named, capsys):
    # a rollout through the KV cache keeps what each chunk saw of the cache for backward (measured on a tiny
    # model with full checkpointing: 24 frames' keys and values for a window of 16 in chunks of 4, and it
    # grows with the square of the window) and, self-generated, runs the generation too; the planner models
    # the one-pass teacher-forcing layout only, so it says so instead of a verdict for another layout
    args = ["--config", str(REPO / "configs/vidarc_causal.yaml"),
            "--ds-config", str(REPO / "ds_configs/zero3_8xh100.json"), "--checkpointing", "full"]
    assert main([*args, *(f for o in overrides for f in ("--set", o))]) == 2
    out, err = capsys.readouterr()
    assert not out and "plans stage 2's one-pass teacher forcing" in err and named in err
    # a mixed context that never self-generates is teacher forcing
    assert main([*args, "--set", "self_forcing.context_mode=mixed", "--set", "self_forcing.self_generated_prob=0"]) == 0


def test_the_readmes_vidar_plan_outputs_are_what_vidar_plan_prints(capsys, monkeypatch):
    # each README block titled with a `vidar-plan ...` command (rendered by benchmarks/__main__.py) shows its output
    blocks = re.findall(r"\*\*[^*\n]*\(`(vidar-plan [^`]*)`\)[^*\n]*\*\*\n\n```\n(.*?)```",
                        (REPO / "README.md").read_text(encoding="utf-8"), flags=re.DOTALL)
    assert len(blocks) == 2
    monkeypatch.chdir(REPO)
    get_accelerator()  # DeepSpeed names the accelerator it found on stdout, once per process: before the capture
    capsys.readouterr()
    for command, shown in blocks:
        assert main(shlex.split(command)[1:]) == 0
        assert capsys.readouterr().out == shown, command
