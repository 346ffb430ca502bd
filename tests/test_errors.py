"""vidartrain.errors: one family of user-facing errors, and entry points that report them as
`error: <message>` on stderr with exit status 2 (nothing on stdout, no traceback)."""
import subprocess
import sys

import pytest

from data_tools import shard as shard_tool
from data_tools import synth
from data_tools.importers.common import parse_columns
from launch import train_vidar
from trainer_launch import REPO_ROOT, launcher_env
from vidartrain.data.shard_index import merge_action_statistics, read_index
from vidartrain.data.video import VideoReadError
from vidartrain.errors import CheckpointError, ConfigError, DataError, VidarError, reports_errors
from vidartrain.files import Journal


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
    assert "error: configs/debug/tiny_vidar.yaml: unknown key `training.lrr`; did you mean `training.lr`?" \
        in result.stderr
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
