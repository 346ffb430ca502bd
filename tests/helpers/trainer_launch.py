"""Helpers of the multi-rank trainer tests: start the real launchers (deepspeed, torchrun) on CPU."""
from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from torch import nn

from data_tools.shard import main as shard_main
from data_tools.synth import write_synthetic_episodes
from vidartrain.config import Config, load_config
from vidartrain.data.shard_index import read_data_info
from vidartrain.models.idm import IDM, IdmArchitecture
from vidartrain.trainers.base import held_out_generator
from vidartrain.trainers.base import free_port  # noqa: F401  (re-exported for the tests)
from vidartrain.trainers.vidar_trainer import VidarStage

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def write_shards(root: Path, episodes: int, frames: int, val_fraction: float) -> Path:
    """Synthetic 64x64 episodes under root/episodes, sharded into root/shards (and root/shards/val).
    An episode is held out when its seeded hash is below `val_fraction`: 0.4 holds out 2 of 8 or 10
    episodes, one per rank for a 2-rank validation."""
    write_synthetic_episodes(root / "episodes", episodes, frames=frames, height=64, width=64)
    assert shard_main(["--episodes", str(root / "episodes"), "--out", str(root / "shards"),
                       "--val-fraction", str(val_fraction)]) == 0
    return root / "shards"


def tiny_idm() -> IDM:
    """The tiny IDM of configs/debug/tiny_idm.yaml (random weights, the published 14-dim statistics)."""
    widths = load_config(REPO_ROOT / "configs/debug/tiny_idm.yaml").model.idm_config
    return IDM(architecture=IdmArchitecture.from_config(widths, "configs/debug/tiny_idm.yaml"))


def launcher_env(accelerator: str | None = "cpu") -> dict[str, str]:
    """The environment of a launched run. `accelerator`: DeepSpeed's (DS_ACCELERATOR): "cpu" for the CPU
    suite, whose multi-rank runs must stay on gloo and the CPU on a machine with a GPU too; None for the GPU
    lane, which must not run on the CPU because the caller's shell said so."""
    # The repository first; paths already set stay (where the packages themselves come from PYTHONPATH).
    python_path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=python_path, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    env.pop("DS_ACCELERATOR", None)
    if accelerator is not None:
        env["DS_ACCELERATOR"] = accelerator
    return env


def deepspeed_command(script: str, args: list[str], num_ranks: int = 2, local_rank_flag: bool = True) -> list[str]:
    """`deepspeed --num_gpus N script args` on a free port; local_rank_flag=False: no --local_rank argument."""
    flags = [] if local_rank_flag else ["--no_local_rank"]
    return [str(BIN / "deepspeed"), *flags, "--num_gpus", str(num_ranks), "--master_port", str(free_port()),
            script, *args]


def torchrun_command(script: str, args: list[str], num_ranks: int = 2) -> list[str]:
    """`torchrun --nproc_per_node N script args` on a free port: the ranks the deepspeed launcher would
    start, without its two extra Python processes (about 4 s less per run on a 2-core CPU). The tests
    whose subject is the deepspeed launcher (launch/single_node.sh, the reference stage-1 run) keep it."""
    return [str(BIN / "torchrun"), "--nproc_per_node", str(num_ranks), "--master_port", str(free_port()),
            script, *args]


def one_rank_command(script: str, args: list[str]) -> list[str]:
    """`python script args` without a launcher: a process group of one rank (launch/train.py's
    `init_distributed`), without the launcher's own Python process (about 1.5 s less per run on a 2-core CPU).
    For the one-rank runs whose subject is not the launcher."""
    return [str(BIN / "python"), script, *args]


def start(command: list[str], log_path: Path, accelerator: str | None = "cpu") -> subprocess.Popen:
    """Start a launcher in its own process group, output to log_path (`accelerator`: as `launcher_env`)."""
    log = open(log_path, "ab")
    return subprocess.Popen(command, cwd=REPO_ROOT, env=launcher_env(accelerator), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def kill_launch(process: subprocess.Popen) -> None:
    """SIGKILL a launch whole, launcher and ranks at once (a crashed node). torchrun starts each rank
    in a session of its own: killing the launcher's process group alone would leave the ranks running."""
    descendants = psutil.Process(process.pid).children(recursive=True)  # ranks and their data workers
    os.killpg(process.pid, signal.SIGKILL)
    for descendant in descendants:
        try:
            descendant.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(descendants, timeout=30)
    process.wait()


def dump_stacks(process: subprocess.Popen, settle_s: float = 3.0) -> None:
    """Have every process under the launcher print its threads' stacks to the log (the ranks'
    SIGUSR1 handler, launch/train.py's dump_stacks_on_sigusr1; their data workers inherit it): a run
    that timed out says where it waited. Launcher processes die of the signal, as they would of the
    kill that follows."""
    for descendant in psutil.Process(process.pid).children(recursive=True):
        try:
            descendant.send_signal(signal.SIGUSR1)
        except psutil.NoSuchProcess:
            pass
    time.sleep(settle_s)


def wait(process: subprocess.Popen, log_path: Path, timeout: float = 300) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        dump_stacks(process)
        kill_launch(process)
        raise AssertionError(f"launcher timed out after {timeout}s; log tail:\n{tail(log_path, 40000)}") from None


def run(command: list[str], log_path: Path, timeout: float = 300) -> None:
    """Run a launcher to completion; fail with its log tail if it fails."""
    code = wait(start(command, log_path), log_path, timeout)
    assert code == 0, f"{' '.join(command[:4])} … exited with {code}; log tail:\n{tail(log_path)}"


def tail(path: Path, chars: int = 6000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def logged_steps(output_dir: Path) -> dict[int, dict]:
    """Per-step records of metrics.jsonl; a step logged twice (re-run after a resume) keeps the last."""
    path = output_dir / "metrics.jsonl"
    records = {}
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "loss" in record:
                records[record["step"]] = record
    return records


def wait_for_step(process: subprocess.Popen, output_dir: Path, step: int, log_path: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while max(logged_steps(output_dir), default=0) < step:
        if process.poll() is not None:
            raise AssertionError(f"run ended (code {process.returncode}) before step {step}:\n{tail(log_path)}")
        if time.monotonic() > deadline:
            dump_stacks(process)
            kill_launch(process)
            raise AssertionError(f"step {step} not reached in {timeout}s:\n{tail(log_path, 40000)}")
        time.sleep(0.2)


def vidar_validation_loss(config: Config, model: nn.Module, split: str = "val") -> float:
    """The engine's stage-1 validation loss (Trainer.validate) recomputed in one process, which it equals on
    any number of ranks: the mean over the first `training.val_samples` held-out samples, each with the
    noise of its key (split "train": the same on training samples)."""
    stage = VidarStage(config, read_data_info(config.data.shards))
    stage.load_frozen(torch.device("cpu"))
    model.eval()
    losses = []
    with torch.no_grad():
        for batch in itertools.islice(stage.build_loader(split, 1, 0, 1), config.training.val_samples):
            generator = held_out_generator(batch["__key__"][0], torch.device("cpu"))
            losses.append(stage.validation_loss(model, batch, generator)[0].item())
    return sum(losses) / len(losses)


TINY_CONFIG = "configs/debug/tiny_vidar.yaml"
CPU_PROFILE = "ds_configs/cpu_debug.json"


def cpu_train_args(config: str, output_dir: Path, overrides: list[str], *extra: str) -> list[str]:
    """launch/train.py's arguments for `config` on the CPU profile, each override as a --set."""
    return ["--config", config, "--ds-config", CPU_PROFILE, "--output_dir", str(output_dir),
            *(arg for override in overrides for arg in ("--set", override)), *extra]


def single_process_flags(root: Path, output_dir: Path, *overrides: str) -> list[str]:
    """launch/train.py's flags of `single_process`: the tiny checkpoint and pre-encoded shards under `root`, one
    rank, micro 1 x accumulation 4 = batch 4, then `overrides`."""
    return ["--config", TINY_CONFIG, "--ds-config", CPU_PROFILE, "--output_dir", str(output_dir),
            "--set", f"model.ckpt_dir={root / 'ckpt'}", "--set", f"data.shards={root / 'shards'}",
            "--set", "data.val_shards=null", "--set", "training.val_every=0",
            "--set", f"output.save_path={output_dir / 'vidar.pt'}", "--set", "training.batch_size=1",
            "--set", "training.gradient_accumulation=4", "--set", "training.log_every=1", "--set", "validation.every=0",
            *overrides]


def single_process(root, output_dir, *overrides, script=("launch/train.py",)):
    """`python launch/train.py` (or `script`, a list: a script taking its flags and its own arguments first)
    with no launcher and `single_process_flags`."""
    script, *script_args = script
    command = one_rank_command(script, [*script_args, *single_process_flags(root, output_dir, *overrides)])
    return subprocess.run(command, cwd=REPO_ROOT, env=launcher_env(), capture_output=True, text=True, timeout=300)


def optimizer_state_numel(checkpoint: Path, ranks: int) -> dict[str, int]:
    """Elements of the fp32 master weights and of each Adam moment, summed over the ZeRO-3 optimizer
    files of every rank in a checkpoint folder (what DeepSpeed's optimizer holds)."""
    numel = {"fp32": 0, "exp_avg": 0, "exp_avg_sq": 0}
    for rank in range(ranks):
        optim = torch.load(checkpoint / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
                           weights_only=False)["optimizer_state_dict"]
        numel["fp32"] += sum(t.numel() for t in optim["fp32_flat_groups"])
        for state in optim["optimizer_state_dict"]["state"].values():
            numel["exp_avg"] += state["exp_avg"].numel()
            numel["exp_avg_sq"] += state["exp_avg_sq"].numel()
    return numel
