"""Train one stage from a YAML config and a DeepSpeed JSON profile.

    deepspeed --num_gpus 2 launch/train.py --config configs/debug/tiny_vidar.yaml \\
        --ds-config ds_configs/cpu_debug.json [--output_dir DIR] [--set training.lr=1e-4] \\
        [--resume auto|PATH] [--max_steps N]
    torchrun --nproc_per_node 8 launch/train.py --config … --ds-config …      (same flags)

The stage follows from the config: loss.type flow_matching -> Vidar (stage 1),
causal_flow_matching -> Vidarc self-forcing (stage 2), idm -> the inverse dynamics model.
A bad config or profile fails here, before any model is built.
"""
from __future__ import annotations

import argparse
import faulthandler
import importlib
import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

if __package__ in (None, ""):  # run as a script by deepspeed / torchrun: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Without a GPU DeepSpeed falls back to its CPU accelerator and warns so in every process; naming it
# before deepspeed is imported is the same choice, stated once (setup_logging) instead of per rank.
# Only when run as the entry point: importing this module changes no one's environment.
CPU_ONLY = __name__ == "__main__" and "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available()
if CPU_ONLY:
    os.environ["DS_ACCELERATOR"] = "cpu"

from vidartrain.config import Config, ConfigError, check_inputs_exist, load_config  # noqa: E402
from vidartrain.data.shard_index import DataInfo, read_data_info  # noqa: E402
from vidartrain.distributed.ds_config import build_deepspeed_config, load_profile  # noqa: E402
from vidartrain.errors import reports_errors  # noqa: E402
from vidartrain.plan import GPUS, dit_shape_of, format_plan, plan_for_ds_config, resolve_gpu, unplannable  # noqa: E402
from vidartrain.trainers.base import RunOptions, Stage, Trainer, end_distributed, world_size_of_launch  # noqa: E402
from vidartrain.trainers.monitoring import peak_memory_bytes  # noqa: E402

# loss.type -> (module, class) of the stage that trains it
STAGES = {
    "flow_matching": ("vidartrain.trainers.vidar_trainer", "VidarStage"),
    "causal_flow_matching": ("vidartrain.trainers.self_forcing", "SelfForcingStage"),
    "idm": ("vidartrain.trainers.idm_trainer", "IdmStage"),
}


def build_parser(description: str | None = None, default_config: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description or __doc__.split("\n\n")[0])
    default_note = "" if default_config is None else f"; default {default_config}"
    parser.add_argument("--config", required=default_config is None, default=default_config,
                        help=f"YAML training config (configs/*.yaml){default_note}")
    parser.add_argument("--ds-config", "--ds_config", dest="ds_config", default=None,
                        help="DeepSpeed JSON profile (ds_configs/*.json); default: distributed.ds_config of the YAML")
    parser.add_argument("--output_dir", "--output-dir", dest="output_dir", default=None,
                        help="checkpoints, TensorBoard events and metrics.jsonl (default: output.output_dir)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (repeatable), e.g. --set training.lr=1e-5")
    parser.add_argument("--resume", default=None, help="'auto' (latest complete checkpoint in the output "
                        "dir, if any) or a checkpoint folder / universal checkpoint folder")
    parser.add_argument("--max_steps", "--max-steps", dest="max_steps", type=int, default=None,
                        help="stop after this step (with a checkpoint); default training.num_steps")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace what exists, refused otherwise: an earlier run's checkpoints in the output "
                             "dir by a run that does not --resume them (they are deleted), an input of the run by the "
                             "export (output.save_path equal to model.pt_dir or model.idm_path, or inside "
                             "model.ckpt_dir), an earlier run's export by a run that resumes no checkpoint")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="print the memory/time plan, run one real step into OUTPUT/dry_run, and report "
                             "the measured peak memory beside the planned one")
    parser.add_argument("--gpu", choices=sorted(GPUS), help="with --dry-run: the GPU to plan for (default: the one "
                        "the profile is named for)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return parser


def stage_for(config: Config, data: DataInfo) -> Stage:
    """The stage that `loss.type` names, built for `config` and its training shards."""
    module_name, class_name = STAGES[config.loss.type]
    return getattr(importlib.import_module(module_name), class_name)(config, data)


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")
    # DeepSpeed calls torch.distributed collectives that torch deprecates: not the user's code to
    # change, and shown on every step (code that changes the warning filters, as library code does
    # in its steps, resets the registry that shows a warning only once)
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if rank != 0:
        # every rank runs the same code into the same library warnings: rank 0 shows them, the
        # others stay quiet
        warnings.filterwarnings("ignore", module=r"(torch|deepspeed)(\.|$)")
    elif CPU_ONLY:
        logging.getLogger(__name__).info("no GPU visible: DeepSpeed runs on its CPU accelerator (gloo)")


def dump_stacks_on_sigusr1() -> None:
    """`kill -USR1 PID` prints every thread's Python stack of that rank to its log and the run goes on.
    A hung run is otherwise a silent one: this shows where each rank waits (a collective, a batch, a
    lock) before anyone kills it. DataLoader workers forked later inherit the handler. It writes to
    file descriptor 2, the process's standard error, whatever object `sys.stderr` is at the time."""
    faulthandler.register(signal.SIGUSR1, file=2, all_threads=True)


def run(args: argparse.Namespace, profile_overrides: Callable[[dict[str, Any]], list[str]] | None = None) -> int:
    """Train (or dry-run) the stage of `args.config`. The DeepSpeed profile and the shards' index.json
    files are read once here and handed down. `profile_overrides(profile)`: overrides that depend on
    the profile (launch/stage_flags.py --debug), applied before the command line's own."""
    setup_logging()
    dump_stacks_on_sigusr1()
    config = load_config(args.config, args.overrides)
    ds_path = args.ds_config or config.distributed.ds_config
    if ds_path is None:
        raise ConfigError("no DeepSpeed profile: pass --ds-config ds_configs/<profile>.json "
                          "or set distributed.ds_config in the YAML")
    profile = load_profile(ds_path)
    if profile_overrides is not None:
        config = load_config(args.config, profile_overrides(profile) + args.overrides)
    if args.max_steps is not None and args.max_steps <= 0:
        raise ConfigError(f"--max_steps {args.max_steps}: must be > 0")
    ds_config, _ = build_deepspeed_config(config, profile, world_size_of_launch())
    check_inputs_exist(config)
    stage = stage_for(config, read_data_info(config.data.shards, config.data.val_shards))
    try:
        if args.dry_run:
            return dry_run(config, stage, ds_path, ds_config, args)
        options = RunOptions(ds_config=ds_config, output_dir=args.output_dir, resume=args.resume,
                             max_steps=args.max_steps, overwrite=args.overwrite)
        Trainer(config, stage, options).train()
        return 0
    finally:
        end_distributed()


def dry_run(config: Config, stage: Stage, ds_path: str, ds_config: dict[str, Any], args: argparse.Namespace) -> int:
    """The planner's verdict, then one real step (written under OUTPUT/dry_run, nothing else touched),
    then measured vs planned memory of this process."""
    rank, world = int(os.environ.get("RANK", 0)), world_size_of_launch()
    # What the planner does not model (the IDM stage, float32 DiT weights, stage-2 rollouts through the KV cache)
    # gets its one real step unplanned.
    reason = unplannable(config, ds_config)
    plan = None if reason is not None else plan_for_ds_config(
        config, Path(ds_path).stem, ds_config, resolve_gpu(args.gpu, ds_path), world, precomputed=not stage.data.raw,
        shape=dit_shape_of(config))
    if rank == 0:
        print(format_plan(plan) if plan is not None else f"dry run: no plan ({reason}); one real step follows",
              flush=True)
    out = Path(args.output_dir or config.output.output_dir) / "dry_run"
    config.output.save_path = str(out / "export" / f"{stage.name}.pt")
    before = peak_memory_bytes()  # CPU: the runtime's own footprint; GPU: nothing allocated yet
    # The dry run's folder is its own: a second dry run replaces the first one's checkpoint.
    Trainer(config, stage, RunOptions(ds_config=ds_config, output_dir=str(out), max_steps=1, overwrite=True)).train()
    measured = (peak_memory_bytes() - before) / 2**20
    if rank == 0:
        planned = "" if plan is None else (
            f", planned {(plan.total_gib - plan.memory_gib['headroom']) * 1024:,.1f} MiB (model states + activations "
            f"+ frozen encoders, before allocator headroom)")
        print(f"dry run: one step done; it raised this process's peak memory by {measured:,.1f} MiB{planned}",
              flush=True)
    return 0


@reports_errors
def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
