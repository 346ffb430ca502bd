"""benchmarks/gpu.py at tiny sizes on the CPU (`--smoke`): every section runs and is reported, so the
real-size script is ready when a GPU is (the measurements themselves need one)."""
import json
from dataclasses import asdict, replace

import pytest
import torch
from torch._dynamo.utils import counters

from benchmarks import causal_paths, gpu
from benchmarks.__main__ import GPU_RESULTS
from benchmarks.causal_paths import (GENERATION_SETTINGS, SMALL_CONFIG, GraphedGeneration, generation_paths,
                                     generation_row)
from benchmarks.generation_profile import NO_GPU
from vidartrain.models.wan.causal import WanModelCausal
from vidartrain.plan import DitShape


def test_smoke_run_reports_every_section(capsys):
    results = gpu.run(gpu.SMOKE, device="cpu")
    printed = capsys.readouterr().out  # the causal rows as measured: a run cut short keeps them in its log
    assert "causal generation, 3 latent frames: {" in printed and "causal training, 2 latent frames: {" in printed
    assert [(r["compiled"], r["micro_batch"], r["checkpointing"]) for r in results["stage1_step"]] == [
        (False, 1, "none"), (False, 1, "selective"), (False, 1, "full"),
        (False, 2, "none"), (False, 2, "selective"), (False, 2, "full")]
    assert all(r["step_s"] > 0 for r in results["stage1_step"])
    assert [(r["compiled"], r["checkpointing"]) for r in results["stage2_step"]] == [
        (False, "selective"), (False, "full")]
    assert all(r["step_s"] > 0 and r["tokens_per_sample"] == 2 * 2 * 16 for r in results["stage2_step"])
    generation = results["causal_generation"][3]["generation"]
    assert list(generation) == list(GENERATION_SETTINGS)
    for measured in generation.values():
        assert measured["cached"]["seconds"] > 0 and measured["recompute"]["seconds"] > 0
        assert measured["recompute_max_difference"] < 1e-5  # cached == recomputed prefix
        assert measured["graphed"] == {"skipped": "CUDA graphs (torch.compile mode reduce-overhead) need a CUDA device"}
    profiled = results["generation_profile"]["settings"]
    # a first prefill, then per frame after it each denoising call and a prefill (the 2 deployed frames: one chunk)
    assert {name: row["model_calls"] for name, row in profiled.items()} == {
        "one call per frame": 1 + 2 * 2, "4 calls per frame": 1 + 2 * 5, "deployed": 1 + 5}
    for row in profiled.values():
        assert row["ms_per_call"] > 0 and row["operators_per_call"] > 100 and row["gpu"] == {"skipped": NO_GPU}
        assert row["top_host_ops"][0]["self_cpu_ms_per_call"] >= row["top_host_ops"][-1]["self_cpu_ms_per_call"] > 0
    training = results["causal_training"][2]
    assert abs(training["teacher_forcing_loss"] - training["sequential_loss"]) < 1e-5
    assert set(results["loader"]) == {"raw", "raw_uint8", "pre_encoded"}
    text = gpu.markdown(results)
    assert "| 2 | selective | no |" in text and "**Stage-2 step**" in text and "cached speed-up" in text and "| skipped: CUDA graphs" in text and "| pre_encoded |" in text
    assert "| one call per frame | 5 |" in text and "Host time per model call (one call per frame)" in text


def test_causal_training_section_can_time_the_blocks_compiled():
    """The section measuring the training paths as the trainer runs them on CUDA, here with a
    backend that only captures graphs: the blocks run compiled, and both paths still agree."""
    counters.clear()
    try:
        rows = gpu.causal(gpu.SMOKE, "cpu", "training", compile_options={"backend": "eager"})
        assert counters["stats"]["unique_graphs"] > 0
    finally:
        torch._dynamo.reset()  # no compiled block code left for later tests
    training = rows[2]
    assert training["teacher_forcing"]["seconds"] > 0 and training["sequential"]["seconds"] > 0
    assert abs(training["teacher_forcing_loss"] - training["sequential_loss"]) < 1e-5
    text = gpu.markdown({"machine": {"device": "cpu", "torch": "-", "cuda": "-", "commit": "-", "date": "-",
                                     "peak_bf16_tflops": None}, "seconds": 1, "causal_training_compiled": rows})
    assert "**Causal training** (forward + backward, compiled blocks, as the trainer runs them on CUDA)" in text


def test_frame_counts_are_chosen_on_the_command_line(capsys):
    results = gpu.main(["--smoke", "--sections", "causal_generation", "causal_training", "--generation-frames", "2", "4",
                        "--training-frames", "3"])
    assert list(results["causal_generation"]) == [2, 4] and list(results["causal_training"]) == [3]
    with pytest.raises(SystemExit):
        gpu.main(["--smoke", "--generation-frames", "1"])
    assert "--generation-frames 1: each count must be at least 2" in capsys.readouterr().err


def test_peak_flops_of_the_planner_gpus_by_device_name():
    assert gpu.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu.peak_bf16_tflops("NVIDIA H200") == 989.0
    assert gpu.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu.peak_bf16_tflops("NVIDIA L4") is None


@pytest.mark.parametrize("name", ["NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200 NVL"])
def test_no_peak_flops_for_a_form_factor_the_planner_does_not_list(name):
    """The planner's GPUs are SXM parts; the PCIe and NVL cards of the same chip peak lower (H100
    PCIe: 756 dense bf16 TFLOP/s), so their MFU against the SXM peak would read low."""
    assert gpu.peak_bf16_tflops(name) is None


def test_results_measured_before_a_variant_existed_still_render():
    results = json.loads(GPU_RESULTS.read_text())
    for row in results["causal_generation"].values():
        for measured in row["generation"].values():
            measured.pop("graphed", None)
    assert "| skipped: not in these results" in gpu.markdown(results)


def test_graphed_generation_code_computes_the_eager_frames_on_cpu():
    """The CUDA-graph variant's code run with the step uncompiled: one step and one cache serve every
    setting and frame count (the longest first, so the shorter one reuses a partly filled buffer),
    and compute what the eager cache computes."""
    torch.manual_seed(0)
    model = WanModelCausal(**SMALL_CONFIG)
    graphed = GraphedGeneration(model, capacity=6, latent_hw=(8, 8), compile_options=None)
    generator = torch.Generator().manual_seed(0)
    for frames in (6, 3):  # 5 new frames: chunks of 4 and 1 when deployed; then one chunk of 2
        row = generation_row(model, generation_paths(model, frames, generator, (8, 8), graphed), "cpu")
        for measured in row.values():
            assert measured["graphed_max_difference"] < 1e-5 and measured["graphed"]["seconds"] > 0
            assert measured["graphed"]["attention"] == "sdpa"
    sizes = gpu.Sizes(**{key: SMALL_CONFIG[key] for key in ("dim", "ffn_dim", "num_heads", "num_layers", "text_len",
                                                         "text_dim")}, latent_hw=(8, 8))
    text = gpu.markdown({"machine": {"device": "cpu", "torch": "-", "cuda": "-", "commit": "-", "date": "-",
                                     "peak_bf16_tflops": None}, "seconds": 1, "sizes": asdict(sizes),
                         "causal_generation": {3: {"generation": row}}})
    deployed = row["deployed"]
    flop_ratio = causal_paths.flop_ratio(DitShape(**SMALL_CONFIG), 3, 16, GENERATION_SETTINGS["deployed"])
    assert (f"| 3 | deployed | {deployed['cached']['seconds']:.3f} | {deployed['graphed']['seconds']:.3f} (sdpa) "
            f"| {deployed['recompute']['seconds']:.3f} |") in text
    assert f"| {flop_ratio:.2f}x | {deployed['recompute_max_difference']:.2e} / " in text
    assert f"| {500 * deployed['cached']['seconds']:.1f} / {500 * deployed['graphed']['seconds']:.1f} |" in text


def test_earlier_runs_render_after_the_latest_with_their_own_machine():
    results = json.loads(GPU_RESULTS.read_text())
    earlier = {"machine": {**results["machine"], "device": "NVIDIA H100 80GB HBM3", "commit": "abc1234"},
               "seconds": 1, "causal_training": results["causal_training"]}
    text = gpu.markdown({**results, "earlier_runs": [earlier]})
    latest, rest = text.split("**Earlier run**")
    assert latest.startswith(f"{results['machine']['device']}, ") and "**Causal generation**" in latest
    assert "NVIDIA H100 80GB HBM3, torch" in rest and "commit abc1234" in rest and "**Causal training**" in rest


def test_compiled_only_times_no_eager_blocks(monkeypatch):
    """--compiled-only: every step variant compiled (here by a backend that only captures graphs), the
    eager causal-training section left out."""
    measure = gpu.run
    asked = []
    monkeypatch.setattr(gpu, "run", lambda sizes, on_section, only: asked.append(sizes) or {"machine": {}})
    monkeypatch.setattr(gpu, "markdown", lambda results: "")
    gpu.main(["--smoke", "--compiled-only"])
    sizes = asked[0]
    assert (sizes.eager, sizes.compiled) == (False, True) and gpu.block_variants(sizes) == (True,)
    for module in (gpu, causal_paths):
        monkeypatch.setattr(module, "compile_blocks", lambda model, compile_blocks=module.compile_blocks, **options:
                            compile_blocks(model, **{**options, "backend": "eager"}))
    try:
        results = measure(replace(sizes, micro_batches=(1,)), device="cpu",
                          only=("stage1_step", "stage2_step", "causal_training", "causal_training_compiled"))
    finally:
        torch._dynamo.reset()
    assert "errors" not in results, results.get("errors")
    assert [r["compiled"] for r in results["stage1_step"] + results["stage2_step"]] == [True] * 5
    assert "causal_training" not in results and "causal_training_compiled" in results
    with pytest.raises(ValueError, match="nothing to time"):
        gpu.block_variants(replace(sizes, compiled=False))


def test_a_failed_section_is_written_and_reported(monkeypatch):
    """A section that fails (here the only one asked for) is recorded in the results file like a
    measured one, and the report says so (a run with nothing measured reports its failures too)."""
    def fail(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(gpu, "stage2_steps", fail)
    written = []
    results = gpu.run(gpu.SMOKE, device="cpu", only=("stage2_step",),
                      on_section=lambda results: written.append(json.loads(json.dumps(results, default=str))))
    error = "stage2_step: RuntimeError: CUDA error: an illegal memory access was encountered"
    assert written and written[-1]["errors"] == [error]
    assert f"Section failed: {error}" in gpu.markdown(results)


def test_a_loader_run_without_a_measured_step_says_its_rate_is_assumed():
    loader_rows = {"raw": {"samples_per_s": 0.5, "workers_per_gpu": 2.2}}
    text = gpu.markdown({"machine": {"device": "cpu", "torch": "-", "cuda": "-", "commit": "-", "date": "-",
                                     "peak_bf16_tflops": None}, "seconds": 1, "loader": loader_rows})
    assert "fastest measured step" not in text and "assumed" in text
