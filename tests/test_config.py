"""YAML configs: the reference recipe's files load, overrides are typed, and errors say what is wrong."""
import json
from pathlib import Path

import pytest

from vidartrain.config import ConfigError, load_config, resume_changes

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_reference_configs_load_unchanged():
    stage1 = load_config(CONFIGS / "vidar_finetune.yaml")
    assert stage1.loss.type == "flow_matching" and not stage1.causal
    assert stage1.training.num_steps == 14000 and stage1.training.lr == 2.0e-5
    assert stage1.training.warmup == 200 and stage1.training.freeze == ["t5", "vae"]
    assert stage1.global_batch_size == 128
    assert stage1.output.save_path is None and stage1.output.output_dir == "outputs/vidar"

    stage2 = load_config(CONFIGS / "vidarc_causal.yaml")
    assert stage2.causal  # loss.type causal_flow_matching; model_class and causal agree with it
    assert stage2.model.pt_dir == "checkpoints/vidar/vidar.pt"
    assert stage2.loss.embodiment_aware and stage2.loss.eta == 3.0
    assert stage2.self_forcing.window_frames == 16 and stage2.self_forcing.kv_cache_length == 64

    h200 = load_config(CONFIGS / "vidarc_2xh200.yaml")
    assert h200.training.batch_size == 16 and h200.training.gradient_accumulation == 8
    assert h200.global_batch_size == 128
    assert h200.self_forcing.window_frames == 8  # model.chunk_size overrides the base's self_forcing.chunk_size
    assert h200.causal  # from its base, vidarc_causal.yaml
    assert h200.distributed.sharding_strategy == "FULL_SHARD"

    idm = load_config(CONFIGS / "idm.yaml")
    assert idm.loss.type == "idm" and idm.training.lr == 5.0e-4 and idm.training.warmup == 6000


def test_every_shipped_config_loads():
    paths = sorted(CONFIGS.rglob("*.yaml"))
    assert len(paths) >= 4
    for path in paths:
        load_config(path)


def test_unknown_key_names_path_and_suggests(tmp_path):
    path = write(tmp_path, "training:\n  lrr: 1.0e-5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "`training.lrr`" in str(err.value)
    assert "did you mean `training.lr`?" in str(err.value)


def test_unknown_section_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key `trainig`; did you mean `training`\?"):
        load_config(write(tmp_path, "trainig:\n  lr: 1.0\n"))


def test_wrong_type_names_path_value_and_type(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "training:\n  num_steps: ten\n"))
    message = str(err.value)
    assert "`training.num_steps`" in message and "'ten'" in message and "an integer" in message


def test_bool_is_not_an_int(tmp_path):
    with pytest.raises(ConfigError, match="training.num_steps"):
        load_config(write(tmp_path, "training:\n  num_steps: true\n"))


def test_literal_choices_listed(tmp_path):
    with pytest.raises(ConfigError, match="expected one of 'ground_truth', 'self_generated', 'mixed'"):
        load_config(write(tmp_path, "self_forcing:\n  context_mode: teacher\n"))


@pytest.mark.parametrize("override, fragment", [
    ("training.lr=0", "`training.lr` = 0.0: must be > 0"),
    ("training.lr=-1e-5", "`training.lr` = -1e-05: must be > 0"),
    ("data.num_frames=80", "`data.num_frames` = 80: must be 4n+1"),
    ("data.height=700", "`data.height` = 700: must be a positive multiple of 32"),
    ("data.width=650", "`data.width` = 650: must be a positive multiple of 32"),
    ("training.warmup=20000", "`training.warmup` = 20000 exceeds `training.num_steps` = 14000"),
    ("loss.eta=-1", "`loss.eta` = -1.0: must be >= 0"),
    ("data.cfg_prob=1.5", "`data.cfg_prob` = 1.5: must be a probability"),
    ("training.freeze=[t5,' ']", "entries are parameter-name patterns"),
    ("training.ema_decay=1.0", "`training.ema_decay` = 1.0: must be in [0, 1)"),
    ("training.ema_warmup=-1", "`training.ema_warmup` = -1: must be >= 0"),
    ("training.val_samples=0", "`training.val_samples` = 0: must be > 0 (null: every held-out sample)"),
    ("training.min_lr=1e-6", "`training.min_lr` = 1e-06 is where the cosine schedule ends, and "
                             "`training.lr_schedule` = constant has none"),
    ("training.seed=-1", "`training.seed` = -1: must be >= 0"),
    ("data.seed=-3", "`data.seed` = -3: must be >= 0"),
    ("validation.seed=-1", "`validation.seed` = -1: must be >= 0"),
    ("loss.embodiment_aware=true", "`loss.embodiment_aware` = true weights stage 2's loss by the IDM's masks (Eq. 7), "
                                   "but `loss.type` = flow_matching trains another stage"),
    ("training.validate_ema=true", "`training.validate_ema` = true evaluates the EMA of the weights, but "
                                   "`training.ema_decay` = 0 keeps none"),
])
def test_impossible_values_say_which_and_why(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "vidar_finetune.yaml", [override])
    assert fragment in str(err.value)


def test_validation_that_cannot_run_is_refused_not_skipped():
    with pytest.raises(ConfigError, match="`training.val_every` = 100 but `data.val_shards` is not set"):
        load_config(CONFIGS / "vidar_finetune.yaml", ["training.val_every=100"])
    with pytest.raises(ConfigError, match="`training.val_every` = 0 runs none"):
        load_config(CONFIGS / "vidar_finetune.yaml", ["training.ema_decay=0.999", "training.validate_ema=true"])
    config = load_config(CONFIGS / "vidar_finetune.yaml", ["training.ema_decay=0.999", "training.validate_ema=true",
                                                           "training.val_every=100", "data.val_shards=/data/val"])
    assert config.training.validate_ema and config.data.val_shards == "/data/val"


def test_the_per_rank_validation_budget_of_earlier_versions_is_refused_saying_what_replaced_it(tmp_path):
    # training.val_batches counted micro-batches per rank: as a number of samples it would be wrong
    with pytest.raises(ConfigError, match=r"`training.val_batches` = 2 is replaced by `training.val_samples`.*"
                                          r"val_samples = val_batches x micro-batch x data-parallel ranks"):
        load_config(write(tmp_path, f"base: {CONFIGS / 'debug/tiny_vidar.yaml'}\ntraining:\n  val_batches: 2\n"))
    with pytest.raises(ConfigError, match="`training.val_batches` = 4 is replaced"):
        load_config(CONFIGS / "debug/tiny_vidar.yaml", ["training.val_batches=4"])
    assert load_config(CONFIGS / "debug/tiny_vidar.yaml", ["training.val_samples=null"]).training.val_samples is None


def test_causal_chunk_must_fit_sample_and_cache():
    with pytest.raises(ConfigError, match="`self_forcing.window_frames` = 0: must be >= 2"):
        load_config(CONFIGS / "vidarc_causal.yaml", ["self_forcing.chunk_size=0"])
    with pytest.raises(ConfigError, match=r"`self_forcing.window_frames` = 1: must be >= 2 \(frame 0 is clean context"):
        load_config(CONFIGS / "vidarc_causal.yaml", ["self_forcing.window_frames=1"])
    with pytest.raises(ConfigError, match="only 21 latent frames"):
        load_config(CONFIGS / "vidarc_causal.yaml", ["self_forcing.chunk_size=22"])
    with pytest.raises(ConfigError, match="exceeds `self_forcing.kv_cache_length` = 8"):
        load_config(CONFIGS / "vidarc_causal.yaml", ["self_forcing.kv_cache_length=8"])


@pytest.mark.parametrize("overrides, fragment", [
    (["self_forcing.rollout_prefill_num=32"], "`self_forcing.rollout_prefill_num` = 32: must be 4n+1 video frames"),
    (["self_forcing.rollout_prefill_num=61"], "`self_forcing.rollout_prefill_num` = 61 must be below "
                                              "`self_forcing.rollout_bound` = 60"),
    (["self_forcing.rollout_bound=33"], "`self_forcing.rollout_prefill_num` = 33 must be below "
                                        "`self_forcing.rollout_bound` = 33"),
    (["validation.every=10", "data.val_shards=/data/val", "validation.num_frames=1"],
     "`validation.num_frames` = 1: stage 2 samples latent frames after the clip's first one, so at least 5"),
    (["self_forcing.closed_loop=true", "self_forcing.context_mode=mixed"],
     "`self_forcing.context_mode` = mixed would be ignored"),
])
def test_stage_2_values_its_rollouts_refuse_are_refused_at_load(overrides, fragment):
    """Stage 2 builds the deployed window from these keys at start and samples validation videos in
    closed loop: a value they refuse must stop the run at load, naming the key, not at start or at
    the first validation."""
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "vidarc_causal.yaml", overrides)
    assert fragment in str(err.value)


def test_overrides_are_typed():
    config = load_config(CONFIGS / "vidar_finetune.yaml",
                         ["training.lr=1e-4", "training.num_steps=500", "data.shards=/data/shards",
                          "training.betas=[0.9, 0.95]", "model.gradient_checkpointing=false"])
    assert config.training.lr == 1e-4 and isinstance(config.training.lr, float)
    assert config.training.num_steps == 500
    assert config.data.shards == "/data/shards"
    assert config.training.betas == (0.9, 0.95)
    assert config.model.checkpointing == "none"


def test_malformed_override_is_rejected():
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(CONFIGS / "vidar_finetune.yaml", ["training.lr"])
    with pytest.raises(ConfigError, match="key must be section.key"):
        load_config(CONFIGS / "vidar_finetune.yaml", ["lr=1"])


def test_missing_file_and_bad_yaml(tmp_path, monkeypatch):
    from vidartrain.config import check_inputs_exist

    with pytest.raises(ConfigError, match="does not exist") as absolute:
        load_config(tmp_path / "nope.yaml")
    assert "relative" not in str(absolute.value)
    # the launch scripts run from the repository root: a relative path says where it was looked for
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"config file nope.yaml does not exist \\(relative paths are read "
                                          f"from {tmp_path}\\)"):
        load_config("nope.yaml")
    with pytest.raises(ConfigError, match=f"missing inputs \\(relative paths are read from {tmp_path}\\):\n"
                                          f"  `data.shards` = mine: mine/index.json does not exist"):
        check_inputs_exist(load_config(CONFIGS / "vidar_finetune.yaml", ["data.shards=mine"]))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "training: [unclosed\n"))


def test_base_chain_merges_sections(tmp_path):
    write(tmp_path, "training:\n  lr: 1.0e-4\n  num_steps: 100\n  warmup: 10\n", "base.yaml")
    config = load_config(write(tmp_path, "base: base.yaml\ntraining:\n  num_steps: 50\n"))
    assert config.training.lr == 1e-4 and config.training.num_steps == 50
    write(tmp_path, "base: loop.yaml\n", "loop.yaml")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "loop.yaml")


def test_missing_inputs_are_listed_together(tmp_path):
    from vidartrain.config import check_inputs_exist

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "index.json").write_text("{}")
    config = load_config(CONFIGS / "vidarc_causal.yaml", [f"data.shards={shards}",
                                                           f"model.ckpt_dir={tmp_path / 'no_ckpt'}",
                                                           f"model.idm_path={tmp_path / 'idm.pt'}"])
    with pytest.raises(ConfigError) as err:
        check_inputs_exist(config)
    message = str(err.value)
    assert f"`model.ckpt_dir` = {tmp_path / 'no_ckpt'}: {tmp_path / 'no_ckpt' / 'config.json'} does not exist" in message
    assert "`model.pt_dir` = checkpoints/vidar/vidar.pt" in message
    assert f"`model.idm_path` = {tmp_path / 'idm.pt'}" in message
    assert "data.shards" not in message
    with pytest.raises(ConfigError, match="`data.shards` is not set"):
        check_inputs_exist(load_config(CONFIGS / "vidar_finetune.yaml"))


def test_exports_default_inside_the_output_dir_and_never_replace_inputs_unasked(tmp_path):
    from vidartrain.config import check_export_path, export_path

    stage2 = load_config(CONFIGS / "vidarc_causal.yaml")
    assert export_path(stage2, tmp_path / "run", "vidarc") == tmp_path / "run" / "export" / "vidarc.pt"
    for overrides, clash in [
            (["output.save_path=checkpoints/vidar/vidar.pt"], "`model.pt_dir`"),
            (["output.save_path=checkpoints/vidar/idm.pt"], "`model.idm_path`"),
            (["output.save_path=checkpoints/Wan2.2-TI2V-5B/sub/vidarc.pt"], "inside `model.ckpt_dir`"),
            # the .safetensors written beside the .pt
            (["output.save_path=w/vidar.pt", "model.pt_dir=w/vidar.safetensors"], "`model.pt_dir`")]:
        config = load_config(CONFIGS / "vidarc_causal.yaml", overrides)
        with pytest.raises(ConfigError, match="--overwrite") as err:
            check_export_path(config, export_path(config, tmp_path, "vidarc"), overwrite=False, resuming=False)
        assert clash in str(err.value)
        check_export_path(config, export_path(config, tmp_path, "vidarc"), overwrite=True, resuming=False)
    check_export_path(stage2, export_path(stage2, tmp_path, "vidarc"), overwrite=False, resuming=False)


def test_an_earlier_runs_export_is_replaced_only_by_a_resumed_run_or_overwrite(tmp_path):
    # the tiny configs fix output.save_path: a run into another --output_dir would replace the demo's export
    from vidartrain.config import check_export_path

    config = load_config(CONFIGS / "vidar_finetune.yaml", [f"output.save_path={tmp_path / 'vidar.pt'}"])
    for earlier in ("vidar.pt", "vidar.safetensors"):
        (tmp_path / earlier).write_bytes(b"earlier run")
        with pytest.raises(ConfigError, match=f"overwrite an earlier run's export .*{earlier}.*--overwrite"):
            check_export_path(config, tmp_path / "vidar.pt", overwrite=False, resuming=False)
        check_export_path(config, tmp_path / "vidar.pt", overwrite=False, resuming=True)  # its own, at the end
        check_export_path(config, tmp_path / "vidar.pt", overwrite=True, resuming=False)
        (tmp_path / earlier).unlink()


def test_a_mixture_of_shard_directories_is_checked_entry_by_entry(tmp_path):
    from vidartrain.config import check_inputs_exist

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "index.json").write_text("{}")
    mixture = f"data.shards=[{{path: {tmp_path / 'a'}, weight: 3}}, {{path: {tmp_path / 'b'}, weight: 1}}]"
    config = load_config(CONFIGS / "vidar_finetune.yaml", [mixture])
    assert config.data.shard_sources == [(str(tmp_path / "a"), 3.0), (str(tmp_path / "b"), 1.0)]
    with pytest.raises(ConfigError, match=r"`data.shards\[1\].path` = .*b.*does not exist"):
        check_inputs_exist(config)
    for bad, message in [("[{path: a, weight: 0}]", r"data.shards\[0\].weight` = 0"),
                         ("[{path: a}]", "exactly the keys path and weight"),
                         ("[{path: a, weight: 1}, {path: a, weight: 2}]", "names a directory twice"),
                         ("[]", "empty list")]:
        with pytest.raises(ConfigError, match=message):
            load_config(CONFIGS / "vidar_finetune.yaml", [f"data.shards={bad}"])


def test_resume_changes_apply_hyper_parameters_and_refuse_the_rest():
    saved = json.loads(json.dumps(load_config(CONFIGS / "debug/tiny_vidar.yaml").to_dict()))
    same_batch = load_config(CONFIGS / "debug/tiny_vidar.yaml",
                             ["training.lr=1e-5", "training.batch_size=1", "training.gradient_accumulation=4"])
    applied, refused = resume_changes(saved, same_batch)
    assert applied == ["training.batch_size: 4 -> 1", "training.gradient_accumulation: null -> 4",
                       "training.lr: 0.001 -> 1e-05"]
    assert refused == []
    # the validation budget may change, and the resume says so; so it does for an earlier version's budget
    assert resume_changes(saved, load_config(CONFIGS / "debug/tiny_vidar.yaml", ["training.val_samples=8"])) == (
        ["training.val_samples: 2 -> 8"], [])
    saved["training"]["val_batches"] = saved["training"].pop("val_samples")
    assert resume_changes(saved, load_config(CONFIGS / "debug/tiny_vidar.yaml")) == (
        ["training.val_batches: 2 -> training.val_samples: 2 (from here on the validation loss is over other held-out "
         "samples and noise)"], [])
    other = load_config(CONFIGS / "debug/tiny_vidar.yaml",
                        ["training.seed=7", "data.num_frames=13", "training.batch_size=8"])
    _, refused = resume_changes(saved, other)
    assert refused == ["training.seed: 42 -> 7", "data.num_frames: 9 -> 13",
                       "global batch (training.batch_size x training.gradient_accumulation): 4 -> 8"]


def test_resume_compares_a_config_saved_under_the_earlier_key_names():
    saved = json.loads(json.dumps(load_config(CONFIGS / "debug/tiny_vidarc.yaml").to_dict()))
    saved["self_forcing"]["chunk_size"] = saved["self_forcing"].pop("window_frames")
    saved["model"]["gradient_checkpointing"] = saved["model"].pop("checkpointing") != "none"
    window = saved["self_forcing"]["chunk_size"]
    changed = load_config(CONFIGS / "debug/tiny_vidarc.yaml",
                          [f"self_forcing.window_frames={window - 1}", "model.checkpointing=selective"])
    applied, refused = resume_changes(saved, changed)
    assert refused == [f"self_forcing.window_frames: {window} -> {window - 1}"]
    assert [line for line in applied if line.startswith("model.")] == ['model.checkpointing: "full" -> "selective"']
    unchanged = load_config(CONFIGS / "debug/tiny_vidarc.yaml", ["model.checkpointing=full"])
    assert resume_changes(saved, unchanged) == ([], [])


def test_stage_follows_from_loss_type_and_aliases_must_agree(tmp_path):
    with pytest.raises(ConfigError, match="`model.model_class` = 'WanModel' contradicts `loss.type` = "
                                          "causal_flow_matching"):
        load_config(write(tmp_path, "model:\n  model_class: WanModel\nloss:\n  type: causal_flow_matching\n"))
    with pytest.raises(ConfigError, match="`self_forcing.causal` = False contradicts"):
        load_config(CONFIGS / "vidarc_causal.yaml", ["self_forcing.causal=false"])
    with pytest.raises(ConfigError, match="`model.model_class` = 'WanModelCausal' contradicts `loss.type` = idm"):
        load_config(CONFIGS / "idm.yaml", ["model.model_class=WanModelCausal"])
    with pytest.raises(ConfigError, match="`self_forcing.window_frames` = 4 and `model.chunk_size` = 8 name the same"):
        load_config(write(tmp_path, "base: " + str(CONFIGS / "vidarc_causal.yaml") +
                          "\nmodel:\n  chunk_size: 8\nself_forcing:\n  window_frames: 4\n"))
    # a later layer's window wins over an earlier one's, whatever name either uses
    assert load_config(CONFIGS / "vidarc_causal.yaml", ["self_forcing.window_frames=4"]).self_forcing.window_frames == 4
    assert load_config(CONFIGS / "vidarc_2xh200.yaml", ["self_forcing.chunk_size=4"]).self_forcing.window_frames == 4


def test_stage_2_overlay_without_base_says_to_layer_it(tmp_path):
    overlay = (CONFIGS / "vidarc_2xh200.yaml").read_text().replace("base: vidarc_causal.yaml", "")
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, overlay))
    message = str(err.value)
    assert "`self_forcing.window_frames` (YAML: model.chunk_size" in message and "the default" in message
    assert "add `base: vidarc_causal.yaml`" in message
    with pytest.raises(ConfigError, match="`self_forcing.context_mode`: stage-2"):
        load_config(CONFIGS / "vidar_finetune.yaml", ["self_forcing.context_mode=mixed"])


def test_sequence_parallel_size_must_divide_the_tokens_of_every_sequence_the_dit_runs():
    # 81 frames of 736x640: 21 latent frames of 460 tokens, 9,660 in all
    sp = "distributed.sequence_parallel_size"
    load_config(CONFIGS / "vidar_finetune.yaml", [f"{sp}=3"])
    with pytest.raises(ConfigError, match=f"`{sp}` = 8 does not divide the 9,660 tokens of a training clip"):
        load_config(CONFIGS / "vidar_finetune.yaml", [f"{sp}=8"])
    # stage 2's teacher forcing runs [clean | noisy] windows: 2 x 16 x 460 = 14,720 tokens
    load_config(CONFIGS / "vidarc_causal.yaml", [f"{sp}=8"])
    # its cached rollouts prefill one frame at a time
    with pytest.raises(ConfigError, match=f"`{sp}` = 8 does not divide the 460 tokens of one latent frame"):
        load_config(CONFIGS / "vidarc_causal.yaml", [f"{sp}=8", "self_forcing.context_mode=mixed"])
    load_config(CONFIGS / "vidarc_causal.yaml", [f"{sp}=4", "self_forcing.context_mode=mixed"])
