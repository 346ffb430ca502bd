"""Real-size GPU benchmarks in one process, most wanted first; the results file is rewritten after
each section, so a run cut short keeps what it measured:

1. the TI2V-5B stage-1 training step (30 blocks, 81x736x640 = 9,660 tokens, bf16) at micro-batch 1
   in each activation checkpointing mode (none, selective, full), eager and with compiled blocks:
   seconds per step, MFU (3 x forward model FLOPs / time / the GPU's dense bf16 peak), HFU with full
   checkpointing (4 passes), and peak activation memory beside the planner's prediction;
2. cached generation (static KV cache) vs recomputing the prefix at real width, 30 blocks and 460
   tokens per latent frame (8, 16 and 21 frames) with one and with 4 denoising calls per frame and
   in the deployed setting (chunks of 4, 4 calls each), eager and with the static-shape step in CUDA
   graphs (torch.compile mode reduce-overhead), and milliseconds per generated latent frame; beside
   them the FLOP ratio of recomputation to the cache, the most the cache can save at equal FLOP/s;
   then one eager cached generation per setting profiled (`benchmarks.generation_profile`): per model
   call its operators, kernels and the share of the time the GPU is busy;
3. stage 2's step: one-pass teacher forcing over a 16-frame window (14,720 tokens), selective and
   full checkpointing, eager and compiled;
4. one-pass teacher forcing vs the sequential rollout (4 blocks; 4, 8 and 16 frames), eager and with
   compiled blocks (the trainer's default on CUDA);
5. the stage-1 step at micro-batch 2 (eager; compiled with --compiled-only);
6. the loader: samples/s of one worker over raw and pre-encoded shards, and how many workers keep
   the fastest measured stage-1 step fed.

    python -m benchmarks.gpu            # prints markdown, writes benchmarks/results_gpu.json
    python -m benchmarks.gpu --smoke    # tiny sizes, any device: checks the script, measures nothing
    python -m benchmarks.gpu --compiled-only --sections stage1_step   # part of it, without eager baselines

A step is forward + backward with bf16 weights and gradients, without the optimizer (its cost is
paid once per `gradient_accumulation_steps` micro-steps and does not depend on checkpointing).
"""
from __future__ import annotations

import argparse
import json
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from benchmarks import causal_paths, generation_profile, loader, train_step
from benchmarks.__main__ import GPU_RESULTS, machine
from vidartrain.models.wan.causal import WanModelCausal
from vidartrain.models.wan.model import CHECKPOINTING_MODES
from vidartrain.plan import GPUS, DitShape, activation_gib, attended_pairs, forward_flops
from vidartrain.shapes import tokens_per_latent_frame
from vidartrain.trainers.base import compile_blocks

GIB = 2**30
SECTIONS = ("stage1_step", "causal_generation", "generation_profile", "stage2_step", "causal_training", "causal_training_compiled", "loader")


@dataclass(frozen=True)
class Sizes:
    """What is measured: real TI2V-5B sizes by default, tiny ones for --smoke."""
    dim: int = 3072
    ffn_dim: int = 14336
    num_heads: int = 24
    num_layers: int = 30
    training_path_layers: int = 4  # teacher forcing vs sequential rollout: gradients through every frame
    text_len: int = 512
    text_dim: int = 4096
    latent_frames: int = 21
    latent_hw: tuple[int, int] = (46, 40)  # 736x640 / VAE stride 16 -> 23x20 = 460 tokens per frame
    micro_batches: tuple[int, ...] = (1, 2)
    generation_frames: tuple[int, ...] = (8, 16, 21)
    training_frames: tuple[int, ...] = (4, 8, 16)
    window_frames: int = 16  # stage 2's one-pass teacher forcing: the training window in latent frames
    steps: int = 2
    compiled: bool = True  # time compiled blocks (the trainer's default on CUDA)
    eager: bool = True  # time eager blocks too, the baselines (--compiled-only: not, to save device time)
    loader: dict | None = None  # benchmarks.loader.run arguments; None: its defaults (81x736x640)


SMOKE = Sizes(dim=64, ffn_dim=128, num_heads=2, num_layers=2, training_path_layers=2, text_len=16, text_dim=32,
              latent_frames=3, latent_hw=(8, 8), generation_frames=(3,), training_frames=(2,), window_frames=2, steps=1, compiled=False,
              loader=dict(episodes=2, frames=12, num_frames=9, height=64, width=64, samples=2))


# The planner's GPUs are SXM parts. PCIe and NVL cards of the same chip run at lower clocks and
# power, and peak lower (H100 PCIe: 756 dense bf16 TFLOP/s, H100 and H200 NVL: 835, not 989).
OTHER_FORM_FACTORS = ("pcie", "nvl")


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of the planner's GPU whose name the device's contains (H100, H200, A100);
    None for another GPU or another form factor of one (no MFU then)."""
    name = device_name.lower()
    if any(form in name for form in OTHER_FORM_FACTORS):
        return None
    for key, gpu in GPUS.items():
        if key.split("-")[0] in name:
            return gpu.bf16_tflops
    return None


def stage1_steps(sizes: Sizes, device: str, peak_tflops: float | None,
                 variants: list[tuple[bool, int, str]]) -> list[dict]:
    """The stage-1 step for each (compiled, micro-batch, checkpointing) variant on one model, eager
    variants first (compiling is in place; each compiled variant compiles afresh); a variant that runs out of memory is reported as such
    (the planner says which ones do)."""
    settings = train_step.StepBenchmark(
        dim=sizes.dim, ffn_dim=sizes.ffn_dim, num_heads=sizes.num_heads, num_layers=sizes.num_layers,
        text_len=sizes.text_len, text_dim=sizes.text_dim, latent_frames=sizes.latent_frames,
        latent_height=sizes.latent_hw[0], latent_width=sizes.latent_hw[1], steps=sizes.steps, device=device)
    model = train_step.build_model(settings)
    shape = dit_shape(sizes)
    tokens = settings.tokens_per_step
    forward = sum(forward_flops(shape, tokens, attended_pairs(sizes.latent_frames, tokens // sizes.latent_frames,
                                                              "dense"), sizes.latent_frames).values())
    rows = []
    for compiled, micro, checkpointing in variants:
        if compiled:
            compile_afresh(model)
        row = {"micro_batch": micro, "checkpointing": checkpointing, "compiled": compiled, "tokens_per_sample": tokens,
               "planned_activation_gib": activation_gib(shape, tokens, micro, checkpointing)}
        row.update(measured_step(model, lambda: train_step.time_steps(model, replace(settings, batch_size=micro),
                                                                      checkpointing),
                                 checkpointing, forward * micro, peak_tflops, device))
        rows.append(row)
    release(model, device)
    return rows


def stage2_steps(sizes: Sizes, device: str, peak_tflops: float | None, modes: tuple[str, ...]) -> list[dict]:
    """Stage 2's training step at micro-batch 1: one-pass teacher forcing over [clean | noisy] of a
    `window_frames` window (block-causal masks; flex_attention on CUDA), eager then compiled blocks (as `sizes` asks)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = WanModelCausal(dim=sizes.dim, ffn_dim=sizes.ffn_dim, num_heads=sizes.num_heads,
                               num_layers=sizes.num_layers, text_len=sizes.text_len, text_dim=sizes.text_dim)
    model.to(torch.bfloat16)
    frames, per_frame = sizes.window_frames, tokens_per_latent_frame(sizes.latent_hw)
    tokens = 2 * frames * per_frame  # both copies of the window go through every block
    forward = sum(forward_flops(dit_shape(sizes), tokens, attended_pairs(frames, per_frame, "teacher_forcing"),
                                frames).values())
    generator = torch.Generator().manual_seed(1)
    clean, noisy, target = (torch.randn(1, 48, frames, *sizes.latent_hw, generator=generator).to(device)
                            for _ in range(3))
    t = (1000 * torch.rand(1, frames, generator=generator)).to(device)
    text = torch.randn(1, sizes.text_len, sizes.text_dim, generator=generator).to(device)

    def loss() -> torch.Tensor:
        return (model.forward_teacher_forcing(clean, noisy, t, text).float() - target).pow(2).mean()

    rows = []
    for compiled in block_variants(sizes):
        for checkpointing in modes:
            model.set_checkpointing(checkpointing)
            if compiled:
                compile_afresh(model)
            row = {"window_frames": frames, "tokens_per_sample": tokens, "checkpointing": checkpointing,
                   "compiled": compiled}
            row.update(measured_step(model, lambda: train_step.time_loss(
                model, loss, sizes.steps, torch.device(device), selective=checkpointing == "selective"),
                checkpointing, forward, peak_tflops, device))
            rows.append(row)
    release(model, device)
    return rows


def measured_step(model: torch.nn.Module, measure: Callable[[], dict], checkpointing: str, forward_flops_per_step: float,
                  peak_tflops: float | None, device: str) -> dict:
    """`measure()`'s seconds per step and activation memory as MFU (3 x forward FLOPs) and HFU (a
    fourth pass with full checkpointing), or `out_of_memory`, or the `error` that stopped it."""
    try:
        measured = measure()
    except torch.cuda.OutOfMemoryError:
        row = {"out_of_memory": True}
    except Exception as error:  # reported in the row; the other variants still run
        row = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        print(f"variant failed: {traceback.format_exc()}", flush=True)
    else:
        passes = 4 if checkpointing == "full" else 3
        utilisation = (lambda n: n * forward_flops_per_step / measured["step_s"] / (peak_tflops * 1e12)
                       if peak_tflops else None)
        row = {"step_s": measured["step_s"], "activation_gib": measured["activation_memory_bytes"] / GIB,
               "mfu": utilisation(3), "hfu": utilisation(passes)}
    model.zero_grad(set_to_none=True)  # each variant allocates its own gradients in its warm-up step
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def compile_afresh(model: torch.nn.Module) -> None:
    """Compile the blocks for the checkpointing mode they have now. Compiled code is dropped first:
    torch 2.13 reuses a block compiled with selective checkpointing after a switch to full (its
    guard on the mode does not fire), so a compiled model would not measure the mode asked for."""
    torch._dynamo.reset()
    compile_blocks(model)


def release(model: torch.nn.Module, device: str) -> None:
    """Free a benchmark model's memory before the next one is built."""
    model.to("meta")
    if device == "cuda":
        torch.cuda.empty_cache()


def dit_shape(sizes: Sizes) -> DitShape:
    return DitShape(dim=sizes.dim, ffn_dim=sizes.ffn_dim, num_heads=sizes.num_heads, num_layers=sizes.num_layers,
                    text_len=sizes.text_len, text_dim=sizes.text_dim)


def run(sizes: Sizes = Sizes(), device: str | None = None,
        on_section: Callable[[dict], None] = lambda results: None, only: tuple[str, ...] = ()) -> dict:
    """Every section (or those named in `only`), most wanted first; `on_section(results so far)`
    after each (a run cut short keeps what it measured)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = peak_bf16_tflops(name)
    started = time.perf_counter()
    results = {"machine": {**machine(), "device": name, "cuda": torch.version.cuda,
                           "peak_bf16_tflops": peak}, "sizes": asdict(sizes)}
    first, more = sizes.micro_batches[0], sizes.micro_batches[1:]
    blocks = block_variants(sizes)
    sections = [
        ("stage1_step", lambda: stage1_steps(sizes, device, peak, [
            (compiled, first, mode) for compiled in blocks for mode in CHECKPOINTING_MODES])),
        ("causal_generation", lambda: causal(sizes, device, "generation")),
        ("generation_profile", lambda: profiled_generation(sizes, device)),
        ("stage2_step", lambda: stage2_steps(sizes, device, peak, ("selective", "full"))),
        *([("causal_training", lambda: causal(sizes, device, "training"))] if sizes.eager else []),
        *([("causal_training_compiled", lambda: causal(sizes, device, "training", compile_options={}))]
          if sizes.compiled else []),
        ("stage1_step", lambda: stage1_steps(sizes, device, peak, [(blocks[0], micro, mode) for micro in more
                                                                   for mode in CHECKPOINTING_MODES])),
        ("loader", lambda: loader.run(**(sizes.loader or {}),
                                      gpu_samples_per_s=fastest_samples_per_s(results) or loader.H100_SAMPLES_PER_S)),
    ]
    for key, measure in sections:
        if only and key not in only:
            continue
        try:
            value = measure()
        except Exception as error:  # reported with the results (and written like them); the next sections still run
            results.setdefault("errors", []).append(f"{key}: {type(error).__name__}: {str(error)[:300]}")
            print(f"section {key} failed: {traceback.format_exc()}", flush=True)
        else:
            results[key] = results.get(key, []) + value if isinstance(value, list) else value
        results["seconds"] = time.perf_counter() - started
        on_section(results)
    return results


def block_variants(sizes: Sizes) -> tuple[bool, ...]:
    """Whether the blocks run compiled, for each variant of a step that `sizes` asks for (eager first).
    Larger micro-batches are timed with the first only: eagerly, unless the run is compiled only."""
    variants = ((False,) if sizes.eager else ()) + ((True,) if sizes.compiled else ())
    if not variants:
        raise ValueError("neither eager nor compiled blocks asked for: nothing to time")
    return variants


def causal(sizes: Sizes, device: str, path: str, compile_options: dict | None = None) -> dict:
    """Causal generation on the whole model, or the causal training paths on `training_path_layers` blocks
    (with `compile_options`: compiled as the trainer compiles them; the compiled code is dropped first).
    Each frame count's row is printed as it is measured: a run cut short in this (long) section
    keeps it in its log."""
    if compile_options is not None:
        torch._dynamo.reset()
    layers = sizes.num_layers if path == "generation" else sizes.training_path_layers
    frames = sizes.generation_frames if path == "generation" else sizes.training_frames

    def print_row(frames: int, row: dict) -> None:
        print(f"causal {path}, {frames} latent frames: {json.dumps(row, default=str)}", flush=True)

    results = causal_paths.measure_causal_paths(frames, model_config=causal_model_config(sizes, layers),
                                                latent_hw=sizes.latent_hw, device=device, paths=(path,),
                                                on_row=print_row, compile_options=compile_options)
    if device == "cuda":
        torch.cuda.empty_cache()
    return results


def causal_model_config(sizes: Sizes, num_layers: int) -> dict:
    return {"dim": sizes.dim, "ffn_dim": sizes.ffn_dim, "num_heads": sizes.num_heads, "text_len": sizes.text_len,
            "text_dim": sizes.text_dim, "num_layers": num_layers}


def profiled_generation(sizes: Sizes, device: str) -> dict:
    """`generation_profile` of the whole model (eager blocks, bf16 on a GPU) at the largest generation frame count."""
    torch.manual_seed(0)
    with torch.device(device):
        model = WanModelCausal(**causal_model_config(sizes, sizes.num_layers))
    if device != "cpu":
        model.to(torch.bfloat16)
    frames = max(sizes.generation_frames)
    result = {"frames": frames, "num_layers": sizes.num_layers,
              "settings": generation_profile.profile_generation(model, frames, sizes.latent_hw)}
    release(model, device)
    return result


def fastest_samples_per_s(results: dict) -> float | None:
    """Samples per second of the fastest measured stage-1 step (the loader must keep up with it);
    None if no step was measured."""
    fastest = min((r["step_s"] / r["micro_batch"] for r in results.get("stage1_step", []) if "step_s" in r),
                  default=None)
    return 1 / fastest if fastest else None


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def step_row(r: dict, variant: str, planned: str = "") -> str:
    if r.get("out_of_memory") or r.get("error"):
        failure = "out of memory" if r.get("out_of_memory") else failure_cell(r)
        return f"{variant} {failure} | - | - | - |{planned}"
    return (f"{variant} {r['step_s']:.3f} | {percent(r['mfu'])} | {percent(r['hfu'])} | {r['activation_gib']:.1f} |"
            f"{planned}")


NOT_MEASURED = {"skipped": "not in these results"}


def generation_table(generation: dict, sizes: Sizes) -> list[str]:
    """Per frame count and setting, the measured generations beside the FLOP ratio of recomputation
    to the cache (what the cache can save at equal FLOP/s)."""
    shape, tokens_per_frame = dit_shape(sizes), tokens_per_latent_frame(sizes.latent_hw)
    lines = ["**Causal generation** (no gradient) of every latent frame after the first: cached (eager, and the static "
             "step in CUDA graphs) vs recomputing the prefix for every denoising call. FLOP ratio: recomputation's "
             "FLOPs over the cache's, the most the cache can save at equal FLOP/s. Difference: the largest of the "
             "generated frames from the eager cache's.", "",
             "| latent frames | generation | cached s | graphed s (attention) | recompute s | cached speed-up "
             "| graphed speed-up | FLOP ratio | max difference (recompute / graphed) "
             "| ms per new latent frame (cached / graphed) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for frames, row in generation.items():
        for name, measured in row["generation"].items():
            cached = measured["cached"]
            recompute, graphed = (measured.get(variant, NOT_MEASURED) for variant in ("recompute", "graphed"))
            ratio = causal_paths.flop_ratio(shape, int(frames), tokens_per_frame, causal_paths.GENERATION_SETTINGS[name])
            per_frame = {variant: f"{1000 * m['seconds'] / (int(frames) - 1):.1f}" if "seconds" in m else "-"
                         for variant, m in (("cached", cached), ("graphed", graphed))}
            difference = {variant: f"{measured[variant + '_max_difference']:.2e}"
                          if variant + "_max_difference" in measured else "-" for variant in ("recompute", "graphed")}
            lines.append(f"| {frames} | {name} | {cached['seconds']:.3f} | {graphed_cell(graphed)} "
                         f"| {seconds_cell(recompute)} | {speed_up(recompute, cached)} | {speed_up(recompute, graphed)} "
                         f"| {ratio:.2f}x | {difference['recompute']} / {difference['graphed']} "
                         f"| {per_frame['cached']} / {per_frame['graphed']} |")
    return lines


def graphed_cell(graphed: dict) -> str:
    """Seconds of a generation in CUDA graphs, its attention backend and first call (compilation
    included); or why there is none."""
    if "seconds" not in graphed:
        return failure_cell(graphed)
    first_call = f"; first call {graphed['first_seconds']:.1f} s" if "first_seconds" in graphed else ""
    return f"{graphed['seconds']:.3f} ({graphed['attention']}{first_call})"


def seconds_cell(measured: dict) -> str:
    return f"{measured['seconds']:.3f}" if "seconds" in measured else failure_cell(measured)


def speed_up(slower: dict, faster: dict) -> str:
    return f"{slower['seconds'] / faster['seconds']:.2f}x" if "seconds" in slower and "seconds" in faster else "-"


def failure_cell(result: dict) -> str:
    return f"skipped: {result['skipped']}" if "skipped" in result else f"failed ({result['error'][:80]})"


def markdown(results: dict) -> str:
    """The sections measured so far (a run cut short reports what it has)."""
    m = results["machine"]
    lines = [f"{m['device']}, torch {m['torch']}, CUDA {m['cuda']}, commit {m['commit']}, {m['date']}; "
             f"MFU against {m['peak_bf16_tflops']} TFLOP/s dense bf16; run {results['seconds']:.0f} s."]
    if "notes" in results:  # written by hand where results were put together from more than one run
        lines += ["", results["notes"]]
    if "stage1_step" in results:
        lines += ["", "**Stage-1 step** (forward + backward, bf16, "
                  f"{results['stage1_step'][0]['tokens_per_sample']:,} tokens per sample)", "",
                  "| micro | checkpointing | compiled | s/step | MFU | HFU | activations GiB | planner GiB (eager) |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [step_row(r, f"| {r['micro_batch']} | {r['checkpointing']} | {'yes' if r['compiled'] else 'no'} |",
                           f" {r['planned_activation_gib']:.1f} |") for r in results["stage1_step"]]
    if "stage2_step" in results:
        first = results["stage2_step"][0]
        lines += ["", f"**Stage-2 step**: one-pass teacher forcing over a {first['window_frames']}-frame window "
                  f"([clean | noisy], {first['tokens_per_sample']:,} tokens), micro-batch 1", "",
                  "| checkpointing | compiled | s/step | MFU | HFU | activations GiB |", "|---|---|---|---|---|---|"]
        lines += [step_row(r, f"| {r['checkpointing']} | {'yes' if r['compiled'] else 'no'} |")
                  for r in results["stage2_step"]]
    if "causal_generation" in results:
        lines += ["", *generation_table(results["causal_generation"], Sizes(**results["sizes"]))]
    if "generation_profile" in results:
        profiled = results["generation_profile"]
        lines += ["", *generation_profile.markdown(profiled["settings"], profiled["frames"], profiled["num_layers"])]
    for key, blocks in (("causal_training", "eager blocks"),
                        ("causal_training_compiled", "compiled blocks, as the trainer runs them on CUDA")):
        if key in results:
            lines += ["", f"**Causal training** (forward + backward, {blocks}): one-pass teacher forcing vs the "
                      "sequential rollout; both compute the same FLOPs", "",
                      "| latent frames | teacher forcing s | sequential s | speed-up | same loss |", "|---|---|---|---|---|"]
            for frames, row in results[key].items():
                tf, seq = row["teacher_forcing"]["seconds"], row["sequential"]["seconds"]
                lines.append(f"| {frames} | {tf:.3f} | {seq:.3f} | {seq / tf:.2f}x "
                             f"| {row['teacher_forcing_loss']:.5f} / {row['sequential_loss']:.5f} |")
    if "loader" in results:
        fastest = fastest_samples_per_s(results)
        fed = (f"the fastest measured step ({fastest:.2f} samples/s per GPU)" if fastest else
               f"an assumed step ({loader.H100_SAMPLES_PER_S} samples/s per GPU, one H100 at ~40% MFU: no "
               "stage-1 step measured in this run)")
        lines += ["", f"**Loader** feeding {fed}, one worker process:", "",
                  "| shards | samples/s per worker | workers per GPU |", "|---|---|---|"]
        lines += [f"| {kind} | {r['samples_per_s']:.2f} | {r['workers_per_gpu']:.2f} |"
                  for kind, r in results["loader"].items()]
    lines += [f"\nSection failed: {error}" for error in results.get("errors", [])]
    for earlier in results.get("earlier_runs", []):  # kept by hand for the sections not measured again
        lines += ["", "**Earlier run** (what the run above did not measure again):", "", markdown(earlier)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on any device; writes no results file")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=(),
                        help="measure only these sections (default: all)")
    parser.add_argument("--out", type=Path, default=GPU_RESULTS, help="results JSON (real sizes only), rewritten "
                                                                       "after each section")
    parser.add_argument("--compiled-only", action="store_true",
                        help="time compiled blocks only (as the trainer runs them on CUDA), without the eager "
                             "baselines, to save device time (generation keeps its eager cache: the CUDA-graph "
                             "frames are checked against it)")
    parser.add_argument("--generation-frames", type=int, nargs="+", metavar="FRAMES",
                        help=f"latent frame counts of causal_generation (default: {Sizes.generation_frames})")
    parser.add_argument("--training-frames", type=int, nargs="+", metavar="FRAMES",
                        help=f"latent frame counts of the causal training sections (default: {Sizes.training_frames})")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: the real-size benchmark needs a GPU (--smoke checks the script anywhere)")
    sizes = SMOKE if args.smoke else Sizes()
    if args.compiled_only:
        sizes = replace(sizes, eager=False, compiled=True)
    for field in ("generation_frames", "training_frames"):
        frames = getattr(args, field)
        if frames and min(frames) < 2:
            parser.error(f"--{field.replace('_', '-')} {' '.join(map(str, frames))}: each count must be at least 2 "
                         "(a first frame and one more)")
        if frames:
            sizes = replace(sizes, **{field: tuple(frames)})

    def on_section(results: dict) -> None:
        measured = [k for k in results if k not in ("machine", "sizes", "seconds", "errors")]
        print(f"[{results['seconds']:.0f} s] measured: {', '.join(measured)}; failed: {len(results.get('errors', []))}",
              flush=True)
        if not args.smoke:
            args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")

    results = run(sizes, on_section=on_section, only=tuple(args.sections))
    print(markdown(results))
    if not args.smoke:
        print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
