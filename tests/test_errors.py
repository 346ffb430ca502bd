"""vidartrain.errors: one family of user-facing errors, and entry points that report them as
`error: <message>` on stderr with exit status 2 (nothing on stdout, no traceback)."""
import importlib
import json
import re
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer, models

from data_tools import shard as shard_tool
from data_tools import synth
from data_tools.episodes import discover_episodes
from data_tools.importers import cli as import_cli
from data_tools.importers import lerobot
from data_tools.importers.common import parse_columns
from data_tools.precompute import WindowSettings, parse_precompute
from launch import sample as sample_cli
from launch import train_vidar
from helpers.trainer_launch import REPO_ROOT, launcher_env
from vidartrain.data.shard_index import (INDEX_FORMAT, JOURNAL_FILE, action_statistics, merge_action_statistics,
                                         read_data_info, read_index)
from vidartrain.data.dataset import check_one_action_space
from vidartrain.data.video import VideoReadError
from vidartrain.errors import CheckpointError, ConfigError, DataError, VidarError, reports_errors
from vidartrain.files import Journal
from vidartrain.models.wan.checkpoint import read_model_config, read_state_dict, weight_files
from vidartrain.models.wan.model import WanModel
from vidartrain.models.wan.text_encoder import UMT5Tokenizer
from vidartrain.trainers.ema import ema_state_dict_from_checkpoint
from vidartrain.trainers.conditioning import FrozenConditioner


def test_the_family_keeps_the_builtin_kinds_callers_catch():
    assert all(issubclass(kind, VidarError) for kind in (ConfigError, DataError, CheckpointError, VideoReadError))
    assert issubclass(ConfigError, ValueError) and issubclass(DataError, ValueError)
    assert issubclass(CheckpointError, RuntimeError)


def test_reports_errors_prints_the_message_and_exits_2_but_lets_bugs_through(capsys):
    @reports_errors
    def refuses(kind: type[Exception]) -> int:
        raise kind("`training.lr` = -1: must be positive")

    assert refuses(ConfigError) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "error: `training.lr` = -1: must be positive\n"
    with pytest.raises(ValueError):  # not a VidarError: a bug keeps its traceback
        refuses(ValueError)
    assert refuses.__name__ == "refuses"


def test_a_bad_config_through_the_launcher_exits_2_with_only_the_message_on_stderr():
    result = subprocess.run([sys.executable, "launch/train.py", "--config", "configs/debug/tiny_vidar.yaml",
                             "--ds-config", "ds_configs/cpu_debug.json", "--set", "training.lrr=1e-4"],
                            cwd=REPO_ROOT, env=launcher_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-4000:]
    assert result.stdout == ""
    # the typo is the override's, not the file's: named with it
    assert ("error: configs/debug/tiny_vidar.yaml (--set training.lrr=1e-4): unknown key `training.lrr`; did you "
            "mean `training.lr`?") in result.stderr
    assert "Traceback" not in result.stderr


def test_stage_flags_debug_reports_a_bad_profile_on_stderr(refused):
    # --debug reads the profile itself: its error used to go to stdout
    refused("no_such_profile.json does not exist", train_vidar.main,
            ["--debug", "--ds-config", "ds_configs/no_such_profile.json"])


def test_library_raise_sites_use_the_family(tmp_path):
    with pytest.raises(ConfigError, match=r"--val-fraction must be in \[0, 1\), got 1.5"):
        shard_tool.assign_splits(["ep_0000"], 1.5, seed=0)
    with pytest.raises(ConfigError, match="--action-columns: range '5-2' runs backwards"):
        parse_columns("0,5-2")
    with pytest.raises(ConfigError, match="action_dim 3 < 7"):
        synth.synthetic_episode(None, 4, 16, 16, action_dim=3)
    with pytest.raises(DataError, match=f"{tmp_path / 'index.json'} not found"):
        read_index(tmp_path)
    with pytest.raises(DataError, match="no actions to compute statistics from"):
        merge_action_statistics([], "`data.shards`")
    (tmp_path / "journal.jsonl").write_text("not json\n")
    with pytest.raises(DataError, match="unreadable journal of an interrupted run; use --overwrite"):
        Journal(tmp_path / "journal.jsonl").read()


def test_converter_flag_errors_exit_2(tmp_path, refused):
    (tmp_path / "episodes").mkdir()
    base = ["--episodes", str(tmp_path / "episodes"), "--out", str(tmp_path / "out")]
    refused("--overwrite and --append exclude each other", shard_tool.main, [*base, "--overwrite", "--append"])
    refused("--samples-per-shard and --bytes-per-shard must be positive", shard_tool.main,
            [*base, "--samples-per-shard", "0"])
    refused("--cameras expects three", shard_tool.main, [*base, "--cameras", "head.mp4"])
    refused("--precompute needs --ckpt-dir", shard_tool.main, [*base, "--precompute", "latents"])
    refused(f"no episode folders found in {tmp_path / 'episodes'}", shard_tool.main, base)
    refused("is not a directory", shard_tool.main, ["--episodes", str(tmp_path / "none"), "--out", str(tmp_path)])


# ------------------------------------------------------------------------------------------------
# Every raise site that became part of the family, with the file or flag its message names

def write_index(directory, **changes) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    index = {"format": INDEX_FORMAT, "complete": True, "mode": "raw", "settings": {}, "shards": [], "episodes": [],
             "skipped": [], **changes}
    (directory / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("problem, expected", [
    ("{not json", "not valid JSON"),
    (json.dumps({"format": "other/1"}), "field 'format' is 'other/1', expected 'vidartrain-shards/1'"),
    (json.dumps({"format": INDEX_FORMAT, "shards": []}), "missing field 'episodes'"),
])
def test_an_unusable_index_is_a_data_error_naming_the_file(tmp_path, problem, expected):
    (tmp_path / "index.json").write_text(problem)
    with pytest.raises(DataError, match=expected) as caught:
        read_index(tmp_path)
    assert str(tmp_path / "index.json") in str(caught.value)


def test_index_contents_that_cannot_be_trained_on_are_data_errors(tmp_path):
    write_index(tmp_path / "unfinished", complete=False)
    with pytest.raises(DataError, match="did not finish"):
        read_index(tmp_path / "unfinished")
    write_index(tmp_path / "old")
    with pytest.raises(DataError, match="no \"actions\" statistics"):
        action_statistics(tmp_path / "old")
    with pytest.raises(DataError, match="actions of different dimensions \\[7, 14\\] cannot be pooled"):
        merge_action_statistics([{"count": 1, "mean": [0.0] * 7, "m2": [0.0] * 7},
                                 {"count": 1, "mean": [0.0] * 14, "m2": [0.0] * 14}], "`data.shards`")
    write_index(tmp_path / "latents", mode="latents")
    with pytest.raises(DataError, match="data.shards mixes"):
        read_data_info([{"path": str(tmp_path / "old"), "weight": 1.0},
                           {"path": str(tmp_path / "latents"), "weight": 1.0}])
    # held-out shards of another kind than the training shards: refused at start, not at the first validation
    with pytest.raises(DataError, match="data.val_shards mixes"):
        read_data_info(tmp_path / "old", tmp_path / "latents")
    # pre-encoded with and without the IDM's masks: Eq. 7 would find no mask in some batches
    write_index(tmp_path / "latents_idm", mode="latents", settings={"precompute": {"precompute": ["latents", "idm"]}})
    with pytest.raises(DataError, match="data.shards mixes"):
        read_data_info([{"path": str(tmp_path / "latents"), "weight": 1.0},
                           {"path": str(tmp_path / "latents_idm"), "weight": 1.0}])
    # latents stored in other dtypes: a batch would be collated into its first sample's
    write_index(tmp_path / "latents_fp32", mode="latents", settings={"precompute": {"latent_dtype": "float32"}})
    write_index(tmp_path / "latents_bf16", mode="latents", settings={"precompute": {"latent_dtype": "bfloat16"}})
    with pytest.raises(DataError, match="data.shards mixes .*'latent_dtype': 'float32'"):
        read_data_info([{"path": str(tmp_path / "latents_fp32"), "weight": 1.0},
                           {"path": str(tmp_path / "latents_bf16"), "weight": 1.0}])
    # robots with other action spaces: one training set for the DiT stages, not for anything that stacks actions
    for dim in (7, 14):
        write_index(tmp_path / f"arm_{dim}", settings={"layout": {"action_dim": dim}})
    arms = [{"path": str(tmp_path / "arm_14"), "weight": 1.0}, {"path": str(tmp_path / "arm_7"), "weight": 1.0}]
    read_data_info(arms)
    with pytest.raises(DataError, match="actions of different dimensions .*arm_14: 14, .*arm_7: 7"):
        check_one_action_space([(arm["path"], arm["weight"]) for arm in arms],
                               [read_index(arm["path"]) for arm in arms])


def test_held_out_shards_of_other_data_than_the_training_shards_are_named(tmp_path, recwarn):
    # a tiny config pointed at one's own shards by data.shards alone validated on demo_run/shards/val unsaid
    write_index(tmp_path / "mine", val="val")
    write_index(tmp_path / "mine" / "val")
    write_index(tmp_path / "demo" / "val")
    with pytest.warns(UserWarning, match=f"`data.val_shards` = {tmp_path / 'demo' / 'val'} is not the held-out "
                                         f"split of `data.shards` = {tmp_path / 'mine'} "):
        read_data_info(tmp_path / "mine", tmp_path / "demo" / "val")
    recwarn.clear()
    read_data_info(tmp_path / "mine", tmp_path / "mine" / "val")
    read_data_info(tmp_path / "demo" / "val", tmp_path / "mine" / "val")  # no split of its own: a choice
    assert not [w for w in recwarn if "held-out split" in str(w.message)]


@pytest.mark.parametrize("manifest, expected", [
    ("[not json", "cannot read JSON"),
    (json.dumps({"names": []}), "expected a list of episodes"),
    (json.dumps([{"folder": "ep_0000"}]), "entry 0 has no episode name"),
])
def test_manifest_problems_are_data_errors(tmp_path, manifest, expected):
    (tmp_path / "manifest.json").write_text(manifest)
    with pytest.raises(DataError, match=expected):
        discover_episodes(tmp_path)


def test_precompute_settings_are_config_errors():
    with pytest.raises(ConfigError, match="--precompute: unknown \\['depth'\\]; choose from latents"):
        parse_precompute("latents,depth")
    with pytest.raises(ConfigError, match="--stride must be positive, got 0"):
        WindowSettings(stride=0).check()
    with pytest.raises(ConfigError, match="--num-frames 81 --height 100 --width 640: video height 100"):
        WindowSettings(height=100).check()


def test_importer_flags_and_sources_exit_2(tmp_path, refused):
    source = tmp_path / "src"
    (source / "data").mkdir(parents=True)
    out = ["--out", str(tmp_path / "out")]
    refused("--instruction is empty", import_cli.main,
            ["aloha", str(source), "--fps", "50", "--instruction", " ", *out])
    refused("--instruction-index must be >= 0", import_cli.main,
            ["robotwin", str(source), "--fps", "10", "--instruction-index", "-1", *out])
    refused("give --out EPISODES_DIR, --shards OUT, or both", import_cli.main, ["robotwin", str(source), "--fps", "10"])
    refused(f"SRC {tmp_path / 'none'} is not a directory", import_cli.main,
            ["robotwin", str(tmp_path / "none"), "--fps", "10", *out])
    refused("--action-columns: 'x' is not a column number", import_cli.main,
            ["robotwin", str(source), "--fps", "10", "--action-columns", "x", *out])
    refused("no episode\\{N\\}.hdf5 files", import_cli.main, ["robotwin", str(source), "--fps", "10", *out])
    (source / "data" / "episode_last.hdf5").write_bytes(b"")
    refused("files without an episode number: episode_last.hdf5", import_cli.main,
            ["robotwin", str(source), "--fps", "10", *out])
    aloha = tmp_path / "aloha"
    aloha.mkdir()
    refused("no .hdf5 episode files", import_cli.main, ["aloha", str(aloha), "--fps", "50", *out])
    (aloha / "take.hdf5").write_bytes(b"")
    refused("files without an episode number at the end of their name: take.hdf5", import_cli.main,
            ["aloha", str(aloha), "--fps", "50", *out])
    (aloha / "take.hdf5").rename(aloha / "left_1.hdf5")
    (aloha / "right_1.hdf5").write_bytes(b"")
    refused("several source episodes map to ep_0001", import_cli.main, ["aloha", str(aloha), "--fps", "50", *out])
    (aloha / "right_1.hdf5").unlink()
    (tmp_path / "out" / "import.json").write_text("{broken")
    refused("import.json: unreadable", import_cli.main, ["aloha", str(aloha), "--fps", "50", *out])


def test_lerobot_metadata_problems_are_data_errors(tmp_path):
    meta = tmp_path / "meta"
    meta.mkdir()
    with pytest.raises(DataError, match="info.json: cannot read JSON"):
        lerobot.dataset_info(tmp_path)
    (meta / "info.json").write_text(json.dumps({"codebase_version": "v1.6"}))
    with pytest.raises(DataError, match="codebase_version 'v1.6'"):
        lerobot.dataset_info(tmp_path)
    (meta / "info.json").write_text(json.dumps({"codebase_version": "v2.1", "fps": 10}))
    with pytest.raises(DataError, match="info.json has no 'features'"):
        lerobot.dataset_info(tmp_path)
    (meta / "episodes.jsonl").write_text("{broken\n")
    with pytest.raises(DataError, match="episodes.jsonl: cannot read JSON lines"):
        lerobot.v2_locations(tmp_path, {}, ())
    with pytest.raises(DataError, match="meta/episodes: no chunk-\\*/file-\\*.parquet"):
        lerobot.v3_locations(tmp_path, {}, ())
    (meta / "episodes" / "chunk-000").mkdir(parents=True)
    (meta / "episodes" / "chunk-000" / "file-000.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="file-000.parquet: cannot read parquet"):
        lerobot.v3_locations(tmp_path, {}, ())


def test_stage_inputs_missing_from_a_batch_are_data_errors():
    stage = FrozenConditioner()  # what the DiT stages take their clean latents and text context from
    with pytest.raises(DataError, match="batch \\['k'\\] has neither pre-encoded `latents` nor a VAE"):
        stage.clean_latents({"__key__": ["k"], "video": None})
    with pytest.raises(DataError, match="batch \\['k'\\] has neither pre-encoded `text_emb` nor a text encoder"):
        stage.text_context({"__key__": ["k"], "text": ["pick"]})


def test_ema_export_of_a_checkpoint_without_one_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no ZeRO-3 model-state files"):
        ema_state_dict_from_checkpoint(tmp_path)
    torch.save({"module": {}}, tmp_path / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="holds no EMA \\(the run had training.ema_decay=0\\)"):
        ema_state_dict_from_checkpoint(tmp_path)


def test_sample_flags_of_the_rollout_window_exit_2(tmp_path, refused):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in ("config.json", "Wan2.2_VAE.pth"):
        (ckpt / name).write_text("{}")
    (tmp_path / "vidarc.pt").write_bytes(b"")
    (tmp_path / "first.png").write_bytes(b"")
    refused("--rollout-bound 8 --rollout-prefill-num 9: rollout_prefill_num \\(9\\) must be below", sample_cli.main,
            ["--ckpt-dir", str(ckpt), "--weights", str(tmp_path / "vidarc.pt"), "--image", str(tmp_path / "first.png"),
             "--prompt", "pick", "--rollout-bound", "8", "--rollout-prefill-num", "9", "--num-frames", "5",
             "--out", str(tmp_path / "out")])


def test_an_output_folder_the_converter_cannot_trust_is_refused(tmp_path, refused):
    (tmp_path / "episodes" / "ep_0000").mkdir(parents=True)
    out = tmp_path / "out"
    argv = ["--episodes", str(tmp_path / "episodes"), "--out", str(out)]
    out.mkdir()
    (out / "index.json").write_text("{broken")
    refused(f"{out / 'index.json'}: unreadable .*; use --overwrite or another --out", shard_tool.main, argv)
    (out / "index.json").unlink()
    settings = shard_tool.settings_from_args(shard_tool.parse_args(argv)).as_dict()
    Journal(out / JOURNAL_FILE).start({"settings": settings}, [])  # an older converter's: no input record
    refused(f"{out} holds shards without a record of the episodes they were made from", shard_tool.main, argv)


def test_checkpoint_folder_problems_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="config.json not found: a checkpoint directory needs config.json"):
        read_model_config(tmp_path, WanModel)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        read_model_config(tmp_path, WanModel)
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(CheckpointError, match="expected a non-empty 'weight_map' object"):
        weight_files(tmp_path)
    index.write_text(json.dumps({"weight_map": {"head.head.weight": "part-1.safetensors"}}))
    with pytest.raises(CheckpointError, match="lists shards that do not exist: .*part-1.safetensors"):
        weight_files(tmp_path)
    with pytest.raises(CheckpointError, match=f"fine-tuned weights {tmp_path / 'vidar.pt'} not found"):
        read_state_dict(tmp_path / "vidar.pt")


def test_a_tokenizer_without_the_special_tokens_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel({"hello": 0, "<unk>": 1}, unk_token="<unk>")).save(str(path))
    with pytest.raises(CheckpointError, match="vocabulary lacks the pad token '<pad>' or the eos token '</s>'"):
        UMT5Tokenizer(path)


def test_every_console_script_reports_errors():
    """Each `vidar-*` entry point of pyproject.toml is wrapped by reports_errors."""
    scripts = re.search(r"^\[project\.scripts\]\n(.*?)(?:^\[|\Z)", (REPO_ROOT / "pyproject.toml").read_text(),
                        flags=re.MULTILINE | re.DOTALL).group(1)
    targets = re.findall(r'^(vidar-[\w-]+) = "([\w.]+):(\w+)"', scripts, flags=re.MULTILINE)
    assert len(targets) >= 12
    wrapper_code = reports_errors(lambda: 0).__code__
    unwrapped = [name for name, module, function in targets
                 if getattr(importlib.import_module(module), function).__code__ is not wrapper_code]
    assert not unwrapped, f"entry points that do not report VidarError as `error: ...` / exit 2: {unwrapped}"
