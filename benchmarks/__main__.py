"""Run every benchmark side by side and write benchmarks/results.{md,json} and the README's
performance section.

    python -m benchmarks [--only NAME ...] [--no-readme]
    python -m benchmarks --render    # re-render from the committed results (after a GPU run)

`--only` replaces those benchmarks' results in results.json and keeps the others, each section saying
where and when it was measured if not with the rest.

Each benchmark module has `run() -> dict` and `markdown(result) -> str`; every ratio is measured
within one run on this machine. The planner's tables for every hardware profile come last.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = {  # module -> section title
    "block_memory": "DiT block: saved activations per token (real width, CPU bf16 autocast)",
    "train_step": "Training step with and without activation checkpointing",
    "residual_layout": "Training step: residual stream token-major (as shipped) vs feature-major (before)",
    "causal_paths": "Causal paths: one-pass teacher forcing vs sequential rollout, cached vs recomputed generation",
    "loader": "Loader: raw-video vs pre-encoded shards",
    "plan_calibration": "Planner calibration: activation estimate vs measured CPU peak memory",
    "compile_time": "Static generation step: compilation time, blocks as one compile region vs unrolled",
    "optimizer_step": "Optimizer step: AdamW's fused kernel vs torch's default (an offloaded optimizer on the host)",
}
CPU_RESULTS = REPO / "benchmarks" / "results.json"
GPU_RESULTS = REPO / "benchmarks" / "results_gpu.json"
README_BEGIN, README_END = "<!-- BEGIN PERFORMANCE -->", "<!-- END PERFORMANCE -->"


def measured_commit() -> str:
    """HEAD, marked when tracked code differs from it (the results and the README it renders into aside)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                              ":!benchmarks/results.*", ":!README.md"], cwd=REPO, capture_output=True, text=True)
    commit = head.stdout.strip() or "unknown"
    return f"{commit} with uncommitted changes" if changed.stdout.strip() else commit


def machine() -> dict[str, str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"commit": measured_commit(), "cpu": cpu, "cores": str(os.cpu_count()),
            "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


LORA_TABLE_NOTE = (
    "The frozen base keeps only its bf16 partitions; gradients, the fp32 master and Adam moments exist for the "
    "adapters only, and backward computes no weight gradient of the base (one pass fewer per step). "
    "`zero3_1xgpu` offloads the optimizer to the CPU, so there LoRA saves CPU memory, not GPU memory. "
    "Activations are planned as for full fine-tuning (an upper bound).")


def planner_tables() -> dict[str, str]:
    from vidartrain.config import load_config
    from vidartrain.distributed.ds_config import load_profile
    from vidartrain.models.wan.model import CHECKPOINTING_MODES
    from vidartrain.plan import format_plan, hardware_table, make_plan, markdown_table

    tables = {}
    for title, path, overrides in (
            ("Stage 1 (`configs/vidar_finetune.yaml`, 81x736x640, 9,660 tokens)", "configs/vidar_finetune.yaml", []),
            ("Stage 2 (`configs/vidarc_causal.yaml`, chunk 16 latent frames, teacher forcing)",
             "configs/vidarc_causal.yaml", []),
            ("Stage 2 on a whole 81-frame sample (chunk 21: 19,320 tokens in one-pass teacher forcing)",
             "configs/vidarc_causal.yaml", ["self_forcing.chunk_size=21"])):
        tables[title] = markdown_table(hardware_table(load_config(REPO / path, overrides)))
    for stage, path in (("Stage 1", "configs/vidar_finetune.yaml"), ("Stage 2", "configs/vidarc_causal.yaml")):
        rows = [row for row in hardware_table(load_config(REPO / path, ["lora.rank=64"]))
                if row["profile"].split(" ")[0] in ("zero3_1xgpu", "zero3_2xh200")]
        tables[f"{stage} with LoRA rank 64 (`{path}`, `--set lora.rank=64`, default targets) on one GPU and "
               "2x H200"] = LORA_TABLE_NOTE + "\n\n" + markdown_table(rows)
    config = load_config(REPO / "configs/vidarc_2xh200.yaml", ["model.chunk_size=21"])
    profile = load_profile(REPO / "ds_configs/zero3_2xh200.json")
    plans = [format_plan(make_plan(config, "zero3_2xh200", profile, "h200", 2, checkpointing=mode))
             for mode in CHECKPOINTING_MODES]  # the order vidar-plan prints them in
    tables["2x H200, micro-batch 8 of 81x736x640 (`vidar-plan --config configs/vidarc_2xh200.yaml --set "
           "model.chunk_size=21 --gpu h200`): where the memory goes"] = "```\n" + "\n\n".join(plans) + "\n```"
    tables.update(sequence_parallel_tables())
    return tables


SEQUENCE_PARALLEL_2XH200 = ["model.chunk_size=21", "distributed.sequence_parallel_size=2", "training.batch_size=8",
                            "training.gradient_accumulation=16"]


def sequence_parallel_tables() -> dict[str, str]:
    """Whole 81-frame stage 2 on 2x H200 with sequence parallelism 2, and 121-frame clips (2x H200 rows)."""
    from vidartrain.config import load_config
    from vidartrain.distributed.ds_config import load_profile
    from vidartrain.plan import format_plan, hardware_table, make_plan, markdown_table

    tables = {}
    config = load_config(REPO / "configs/vidarc_2xh200.yaml", SEQUENCE_PARALLEL_2XH200)
    plan = make_plan(config, "zero3_2xh200", load_profile(REPO / "ds_configs/zero3_2xh200.json"), "h200", 2,
                     checkpointing="full")
    tables["Whole 81-frame stage 2 on 2x H200 at micro-batch 8 with sequence parallelism 2 (`vidar-plan --config "
           "configs/vidarc_2xh200.yaml --set " + " --set ".join(SEQUENCE_PARALLEL_2XH200)
           + " --checkpointing full`)"] = "```\n" + format_plan(plan) + "\n```"
    for stage, path, overrides in (
            ("Stage 1", "configs/vidar_finetune.yaml", ["data.num_frames=121"]),
            ("Stage 2 on a whole clip", "configs/vidarc_causal.yaml", ["data.num_frames=121", "model.chunk_size=31"])):
        rows = [row for row in hardware_table(load_config(REPO / path, overrides)) if row["profile"] == "zero3_2xh200"]
        tables[f"{stage} on 121-frame clips (`{path}`, `--set {' --set '.join(overrides)}`), 2x H200, "
               "SP 1 and 2"] = markdown_table(rows)
    return tables


def render(results: dict) -> str:
    info = results["machine"]
    lines = [f"Measured on {info['cpu']} ({info['cores']} cores), torch {info['torch']}, commit {info['commit']}, "
             f"{info['date']}. CPU numbers: the ratios carry over, absolute times do not.", ""]
    for name, title in BENCHMARKS.items():
        if name in results["benchmarks"]:
            module = importlib.import_module(f"benchmarks.{name}")
            lines += [f"### {title}", "", f"`python -m benchmarks.{name}`", ""]
            separately = results.get("measured_separately", {}).get(name)
            if separately is not None:
                lines += [f"Measured separately on {separately['cpu']} ({separately['cores']} cores), torch "
                          f"{separately['torch']}, commit {separately['commit']}, {separately['date']}.", ""]
            lines += [module.markdown(results["benchmarks"][name]), ""]
    lines += ["### Planner: every hardware profile beside the reference hardware table", "",
              "`vidar-plan --config CONFIG --table` (memory per GPU with DeepSpeed's ZeRO-3 estimator, activations "
              "measured from our block; time at 40% MFU, 4 passes per step with full checkpointing, 3 with selective "
              "(it recomputes no matmul) or none).", ""]
    for title, table in results["planner"].items():
        lines += [f"**{title}**", "", table, ""]
    if GPU_RESULTS.is_file():  # measured on a GPU by `python -m benchmarks.gpu`, beside the CPU numbers
        from benchmarks import gpu

        lines += ["### GPU: real TI2V-5B sizes", "", "`python -m benchmarks.gpu`", "",
                  gpu.markdown(json.loads(GPU_RESULTS.read_text())), ""]
    return "\n".join(lines).rstrip() + "\n"


def update_readme(section: str) -> None:
    readme = REPO / "README.md"
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{readme} has no {README_BEGIN} ... {README_END} markers")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_BEGIN}\n{section}{README_END}{tail}")


def measure(names: list[str]) -> dict:
    """Run the named CPU benchmarks and the planner tables."""
    results: dict = {"machine": machine(), "benchmarks": {}}
    for name in names:
        print(f"running benchmarks.{name} ...", flush=True)
        started = time.perf_counter()
        results["benchmarks"][name] = importlib.import_module(f"benchmarks.{name}").run()
        print(f"  done in {time.perf_counter() - started:.0f} s", flush=True)
    results["planner"] = planner_tables()
    return results


def merged(earlier: dict, new: dict) -> dict:
    """`earlier` results with the benchmarks of `new` (measured alone, by --only) in place of theirs, each
    recorded with the machine and commit it was measured on; the planner tables are `new`'s (today's code)."""
    results = dict(earlier, benchmarks=dict(earlier["benchmarks"]), planner=new["planner"],
                   measured_separately=dict(earlier.get("measured_separately", {})))
    for name, result in new["benchmarks"].items():
        results["benchmarks"][name] = result
        results["measured_separately"][name] = new["machine"]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these benchmarks")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite the README's performance section")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: render results.md and the README from the committed results.json and "
                             "results_gpu.json (after adding GPU results)")
    args = parser.parse_args(argv)
    if args.render:
        results = json.loads(CPU_RESULTS.read_text())
    else:
        results = measure(args.only or BENCHMARKS)
        if args.only and CPU_RESULTS.is_file():
            results = merged(json.loads(CPU_RESULTS.read_text()), results)
        CPU_RESULTS.write_text(json.dumps(results, indent=2, default=str) + "\n")
    section = render(results)
    (REPO / "benchmarks" / "results.md").write_text("# Benchmark results\n\n" + section)
    if not args.no_readme:
        update_readme(section)
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
