"""DeepSpeed profiles: accepted by DeepSpeed's own parser at the world size each is written for,
batch arithmetic checked, and the reference recipe's FSDP words mapped onto ZeRO with warnings."""
import json
import re
from pathlib import Path

import pytest
from deepspeed.runtime.config import DeepSpeedConfig

from vidartrain.config import ConfigError, load_config
from vidartrain.distributed.ds_config import (build_deepspeed_config, checkpointing_mode, load_profile, offloads,
                                              precision_of, profile_world_size)

REPO = Path(__file__).resolve().parents[2]


def profile_file(tmp_path: Path, name: str, profile: dict) -> Path:
    """`profile` written to tmp_path/name, for load_profile to read."""
    path = tmp_path / name
    path.write_text(json.dumps(profile))
    return path


PROFILES = {  # profile -> (world size, micro, accumulation), from the reference hardware table (docs/training.md)
    "zero3_64xh100": (64, 2, 1),
    "zero3_8xh100": (8, 2, 8),
    "zero3_8xa100_80g": (8, 1, 16),
    "zero3_2xh200": (2, 8, 8),
    "zero3_1xgpu": (1, 2, 64),
    "cpu_debug": (2, 1, 2),
}


class DataParallel:
    """The `mpu` hook DeepSpeedConfig reads the data-parallel world size from."""

    def __init__(self, world_size: int):
        self.world_size = world_size

    def get_data_parallel_world_size(self) -> int:
        return self.world_size


def parse_with_deepspeed(ds: dict, world_size: int, monkeypatch) -> DeepSpeedConfig:
    import deepspeed.comm as dist
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: 0)
    return DeepSpeedConfig(ds, mpu=DataParallel(world_size))


def test_one_profile_per_hardware_row():
    assert sorted(p.stem for p in (REPO / "ds_configs").glob("*.json")) == sorted(PROFILES)


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_profile_accepted_by_deepspeed_at_its_world_size(name, monkeypatch):
    world, micro, accumulation = PROFILES[name]
    profile = load_profile(REPO / "ds_configs" / f"{name}.json")
    assert profile_world_size(profile) == world
    stage2 = "configs/vidarc_causal.yaml" if name != "cpu_debug" else "configs/debug/tiny_vidarc.yaml"
    config = load_config(REPO / stage2)
    ds, _ = build_deepspeed_config(config, profile, world)
    parsed = parse_with_deepspeed(ds, world, monkeypatch)
    assert parsed.train_micro_batch_size_per_gpu == micro
    assert parsed.gradient_accumulation_steps == accumulation
    assert parsed.train_batch_size == micro * accumulation * world
    assert parsed.zero_optimization_stage == 3
    assert parsed.bfloat16_config.enabled
    assert parsed.gradient_clipping == config.training.grad_clip
    zero = profile["zero_optimization"]
    for knob in ("overlap_comm", "contiguous_gradients", "reduce_bucket_size", "stage3_prefetch_bucket_size",
                 "stage3_param_persistence_threshold", "stage3_max_live_parameters",
                 "stage3_gather_16bit_weights_on_model_save"):
        assert knob in zero, f"{name}: zero_optimization.{knob} missing"
    assert "activation_checkpointing" in profile
    if name != "cpu_debug":
        assert parsed.train_batch_size == 128


def test_wrong_world_size_states_the_three_numbers():
    config = load_config(REPO / "configs/vidar_finetune.yaml")
    profile = load_profile(REPO / "ds_configs/zero3_8xh100.json")
    with pytest.raises(ConfigError) as err:
        build_deepspeed_config(config, profile, world_size=4)
    message = str(err.value)
    assert "global batch of 128" in message
    assert "micro-batch 2 x gradient accumulation 8 x world size 4 = 64" in message
    # with sequence parallelism the data-parallel groups count, and the message says what they are of
    sequence_parallel = load_config(REPO / "configs/vidar_finetune.yaml", ["distributed.sequence_parallel_size=2"])
    with pytest.raises(ConfigError, match=r"micro-batch 2 x gradient accumulation 1 x 32 data-parallel groups "
                                          r"\(64 ranks / sequence_parallel_size 2\) = 64\."):
        build_deepspeed_config(sequence_parallel, load_profile(REPO / "ds_configs/zero3_64xh100.json"), 64)
    accumulating = load_config(REPO / "configs/vidarc_2xh200.yaml", ["distributed.sequence_parallel_size=2"])
    with pytest.raises(ConfigError, match=r"`training.batch_size` = 16 .* not divisible by the 3 data-parallel "
                                          r"groups \(6 ranks / sequence_parallel_size 2\)"):
        build_deepspeed_config(accumulating, load_profile(REPO / "ds_configs/zero3_2xh200.json"), 6)


def test_2xh200_yaml_batch_words_match_its_profile(monkeypatch):
    config = load_config(REPO / "configs/vidarc_2xh200.yaml")
    ds, warnings = build_deepspeed_config(config, load_profile(REPO / "ds_configs/zero3_2xh200.json"), 2)
    assert warnings == []
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 8
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"]
    assert "offload_optimizer" not in ds["zero_optimization"]
    parse_with_deepspeed(ds, 2, monkeypatch)


@pytest.mark.parametrize("strategy, stage", [("FULL_SHARD", 3), ("SHARD_GRAD_OP", 2), ("NO_SHARD", 0)])
def test_fsdp_sharding_words_map_to_zero_stages(strategy, stage):
    config = load_config(REPO / "configs/vidarc_2xh200.yaml", [f"distributed.sharding_strategy={strategy}"])
    ds, warnings = build_deepspeed_config(config, load_profile(REPO / "ds_configs/zero3_2xh200.json"), 2)
    assert ds["zero_optimization"]["stage"] == stage
    if stage != 3:
        assert any(f"'{strategy}'" in w and "zero_optimization.stage" in w and "= 3" in w for w in warnings)


def test_cpu_offload_and_precision_words_translate_with_warnings():
    config = load_config(REPO / "configs/vidarc_2xh200.yaml",
                         ["distributed.cpu_offload=true", "distributed.mixed_precision=fp32"])
    ds, warnings = build_deepspeed_config(config, load_profile(REPO / "ds_configs/zero3_2xh200.json"), 2)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert any("distributed.cpu_offload" in w for w in warnings)
    assert any("distributed.mixed_precision" in w and "'bf16'" in w for w in warnings)


def test_activation_checkpointing_word_drives_the_model_switch():
    config = load_config(REPO / "configs/vidarc_2xh200.yaml",
                         ["distributed.activation_checkpointing=false"])
    before = config.to_dict()
    _, warnings = build_deepspeed_config(config, load_profile(REPO / "ds_configs/zero3_2xh200.json"), 2)
    assert checkpointing_mode(config) == "none"
    assert config.to_dict() == before  # build_deepspeed_config is pure: the config keeps model.checkpointing
    assert any("model.checkpointing" in w for w in warnings)


def test_profile_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_profile(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        load_profile(bad)
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1}))
    with pytest.raises(ConfigError, match="missing `gradient_accumulation_steps`"):
        load_profile(partial)


def test_our_idm_configs_run_float32_on_a_bf16_profile_without_a_warning():
    for config_path, profile, world in (("configs/idm.yaml", "ds_configs/zero3_8xh100.json", 8),
                                        ("configs/debug/tiny_idm.yaml", "ds_configs/cpu_debug.json", 2)):
        config = load_config(REPO / config_path)
        profile_dict = load_profile(REPO / profile)
        config.training.batch_size = (profile_dict["train_micro_batch_size_per_gpu"]  # the batch it is written for
                                      * profile_dict["gradient_accumulation_steps"] * world)
        ds, warnings = build_deepspeed_config(config, profile_dict, world)
        assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
        assert not any("mixed_precision" in w for w in warnings), warnings
    with pytest.raises(ConfigError, match="the IDM trains float32 weights"):
        build_deepspeed_config(load_config(REPO / "configs/debug/tiny_idm.yaml", ["distributed.mixed_precision=bf16"]),
                               load_profile(REPO / "ds_configs/cpu_debug.json"), 2)


def test_an_offloaded_optimizer_is_the_trainers_adamw(monkeypatch):
    # the trainer hands DeepSpeed torch's AdamW; with the optimizer offloaded DeepSpeed refuses it at
    # deepspeed.initialize unless zero_force_ds_cpu_optimizer is false
    config = load_config(REPO / "configs/vidarc_2xh200.yaml", ["distributed.cpu_offload=true"])
    profile = load_profile(REPO / "ds_configs/zero3_2xh200.json")
    ds, _ = build_deepspeed_config(config, profile, 2)
    assert parse_with_deepspeed(ds, 2, monkeypatch).zero_force_ds_cpu_optimizer is False
    assert "zero_force_ds_cpu_optimizer" not in build_deepspeed_config(load_config(REPO / "configs/vidarc_2xh200.yaml"),
                                                                       profile, 2)[0]
    forced = {**load_profile(REPO / "ds_configs/zero3_1xgpu.json"), "zero_force_ds_cpu_optimizer": True}
    with pytest.raises(ConfigError, match="`zero_force_ds_cpu_optimizer` = true refuses the trainer's optimizer"):
        build_deepspeed_config(load_config(REPO / "configs/vidar_finetune.yaml"), forced, 1)


def test_offload_without_zero_is_refused():
    # DeepSpeed offloads through the ZeRO optimizer only: at stage 0 it would keep everything on the GPU
    config = load_config(REPO / "configs/vidarc_2xh200.yaml",
                         ["distributed.sharding_strategy=NO_SHARD", "distributed.cpu_offload=true"])
    with pytest.raises(ConfigError, match=r"offload_optimizer.*needs ZeRO stage 1, 2 or 3, but the stage is 0"):
        build_deepspeed_config(config, load_profile(REPO / "ds_configs/zero3_2xh200.json"), 2)


def test_a_profiles_gradient_clipping_that_the_yaml_overrules_is_named():
    config = load_config(REPO / "configs/vidarc_2xh200.yaml", ["training.grad_clip=0.5"])
    ds, warnings = build_deepspeed_config(config, load_profile(REPO / "ds_configs/zero3_2xh200.json"), 2)
    assert ds["gradient_clipping"] == 0.5
    assert warnings == ["YAML `training.grad_clip` = 0.5 disagrees with DeepSpeed profile `gradient_clipping` = 1.0; "
                        "using the YAML value"]


def test_a_profile_whose_batch_is_no_whole_number_of_ranks_is_refused(tmp_path):
    # its world size (train_batch_size / (micro x accumulation)) is what vidar-plan plans for by default
    profile = {**load_profile(REPO / "ds_configs/zero3_8xh100.json"), "train_batch_size": 100}
    with pytest.raises(ConfigError, match=r"odd.json: `train_batch_size` = 100 is not a multiple of micro-batch 2 x "
                                          r"gradient accumulation 8"):
        load_profile(profile_file(tmp_path, "odd.json", profile))


@pytest.mark.parametrize("key, value, expected", [
    ("zero_optimization.stage", "3", "an integer 0, 1, 2 or 3"),
    ("zero_optimization.stage", 2.5, "an integer 0, 1, 2 or 3"),
    ("zero_optimization.stage", True, "an integer 0, 1, 2 or 3"),
    ("zero_optimization.stage", 4, "an integer 0, 1, 2 or 3"),
    ("zero_optimization.stage", 3.0, "an integer 0, 1, 2 or 3"),
    ("zero_optimization.offload_optimizer", True, "an object"),
    ("zero_optimization.offload_param", "cpu", "an object"),
    ("bf16", True, "an object"),
    ("fp16", 1, "an object"),
])
def test_a_profiles_zero_stage_and_sections_of_the_wrong_type_are_refused_at_load(key, value, expected, tmp_path):
    # the planner and the builder compare the stage with integers and read these sections as objects
    profile = load_profile(REPO / "ds_configs/zero3_2xh200.json")
    section, _, name = key.rpartition(".")
    (profile[section] if section else profile)[name] = value
    with pytest.raises(ConfigError, match=f"typed.json: `{key}` = {json.dumps(value)}: expected {expected}"):
        load_profile(profile_file(tmp_path, "typed.json", profile))


def test_a_profiles_global_batch_that_the_yaml_overrules_is_named():
    # zero3_8xh100 is written for 8 GPUs (train_batch_size 128); on 4 the YAML's 64 is used, and said so
    config = load_config(REPO / "configs/vidar_finetune.yaml", ["training.batch_size=64"])
    ds, warnings = build_deepspeed_config(config, load_profile(REPO / "ds_configs/zero3_8xh100.json"), 4)
    assert ds["train_batch_size"] == 64
    assert warnings == ["YAML `training.batch_size` = 64 disagrees with DeepSpeed profile `train_batch_size` = 128; "
                        "using the YAML value"]
    # with the accumulation in the YAML, the warning names both words of the global batch
    config = load_config(REPO / "configs/vidarc_2xh200.yaml", ["training.batch_size=32"])  # 8 per GPU, x 8
    _, warnings = build_deepspeed_config(config, load_profile(REPO / "ds_configs/zero3_2xh200.json"), 4)
    assert warnings == ["YAML `training.batch_size x training.gradient_accumulation` = 256 disagrees with DeepSpeed "
                        "profile `train_batch_size` = 128; using the YAML value"]


def test_what_cpu_offload_changes_in_a_profile_is_named():
    # zero3_1xgpu offloads the optimizer only: the YAML's cpu_offload (FSDP's: parameters too, under
    # ZeRO-3) also moves the parameters to the CPU, which the warning says
    config = load_config(REPO / "configs/vidar_finetune.yaml", ["distributed.cpu_offload=true"])
    ds, warnings = build_deepspeed_config(config, load_profile(REPO / "ds_configs/zero3_1xgpu.json"), 1)
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert len(warnings) == 1 and "`distributed.cpu_offload` = True" in warnings[0]
    assert "zero_optimization.offload_param" in warnings[0]
    # an offload section with device "none" offloads nothing (DeepSpeed's reading): turning it on is a change
    profile = load_profile(REPO / "ds_configs/zero3_8xh100.json")
    profile["zero_optimization"]["offload_optimizer"] = {"device": "none"}
    ds, warnings = build_deepspeed_config(config, profile, 8)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert len(warnings) == 1 and "'device': 'none'" in warnings[0]
    # and turning it off changes nothing, so nothing is said
    config = load_config(REPO / "configs/vidar_finetune.yaml", ["distributed.cpu_offload=false"])
    assert build_deepspeed_config(config, profile, 8)[1] == []


@pytest.mark.parametrize("words, named", [
    (["distributed.zero_stage=2", "distributed.sharding_strategy=FULL_SHARD"],
     "`distributed.zero_stage` = 2 (ZeRO-2) and `distributed.sharding_strategy` = 'FULL_SHARD' (ZeRO-3)"),
    (["distributed.zero_stage=3", "distributed.use_fsdp=false"],
     "`distributed.zero_stage` = 3 (ZeRO-3) and `distributed.use_fsdp` = False (ZeRO-0)"),
    (["distributed.use_fsdp=false", "distributed.sharding_strategy=SHARD_GRAD_OP"],
     "`distributed.use_fsdp` = False (ZeRO-0) and `distributed.sharding_strategy` = 'SHARD_GRAD_OP' (ZeRO-2)"),
])
def test_yaml_words_that_ask_for_different_zero_stages_are_refused(words, named):
    # one of them would otherwise be dropped without a word
    config = load_config(REPO / "configs/vidar_finetune.yaml", words)
    with pytest.raises(ConfigError, match=re.escape(f"{named} ask for different ZeRO stages")):
        build_deepspeed_config(config, load_profile(REPO / "ds_configs/zero3_8xh100.json"), 8)


def test_fsdp_with_a_sharding_strategy_is_that_strategys_stage():
    config = load_config(REPO / "configs/vidar_finetune.yaml",
                         ["distributed.use_fsdp=true", "distributed.sharding_strategy=SHARD_GRAD_OP"])
    ds, _ = build_deepspeed_config(config, load_profile(REPO / "ds_configs/zero3_8xh100.json"), 8)
    assert ds["zero_optimization"]["stage"] == 2


def test_a_null_section_is_read_as_absent_as_deepspeed_reads_it(tmp_path):
    profile = {**load_profile(REPO / "ds_configs/zero3_2xh200.json"), "bf16": None, "fp16": {"enabled": True}}
    profile["zero_optimization"]["offload_optimizer"] = None
    ds = load_profile(profile_file(tmp_path, "nulls.json", profile))
    assert precision_of(ds) == "fp16" and not offloads(ds, "offload_optimizer")


def test_a_profiles_older_bfloat16_section_is_read_as_bf16_and_two_precisions_are_refused(tmp_path):
    profile = load_profile(REPO / "ds_configs/zero3_2xh200.json")
    older = {**{k: v for k, v in profile.items() if k != "bf16"}, "bfloat16": {"enabled": True}}
    # read as fp32 before; DeepSpeed reads it as bf16
    assert precision_of(load_profile(profile_file(tmp_path, "older.json", older))) == "bf16"
    both = {**profile, "bf16": {"enabled": True}, "fp16": {"enabled": True}}
    with pytest.raises(ConfigError, match="both.json: `bf16.enabled` and `fp16.enabled` are both true"):
        load_profile(profile_file(tmp_path, "both.json", both))
    with pytest.raises(ConfigError, match="both `bf16` and its older name `bfloat16`"):
        load_profile(profile_file(tmp_path, "twice.json", {**profile, "bfloat16": {"enabled": True}}))
