"""benchmarks/gpu.py at tiny sizes on the CPU (`--smoke`): every section runs and is reported, so the
real-size script is ready when a GPU is (the measurements themselves need one)."""
import json
from dataclasses import asdict

import torch

from benchmarks import causal_paths, gpu
from benchmarks.__main__ import GPU_RESULTS
from benchmarks.causal_paths import SMALL_CONFIG, GraphedGeneration, generation_paths, generation_row
from vidartrain.models.wan.causal import WanModelCausal
from vidartrain.plan import DitShape


def test_smoke_run_reports_every_section():
    results = gpu.run(gpu.SMOKE, device="cpu")
    assert [(r["compiled"], r["micro_batch"], r["checkpointing"]) for r in results["stage1_step"]] == [
        (False, 1, "none"), (False, 1, "selective"), (False, 1, "full"),
        (False, 2, "none"), (False, 2, "selective"), (False, 2, "full")]
    assert all(r["step_s"] > 0 for r in results["stage1_step"])
    assert [(r["compiled"], r["checkpointing"]) for r in results["stage2_step"]] == [
        (False, "selective"), (False, "full")]
    assert all(r["step_s"] > 0 and r["tokens_per_sample"] == 2 * 2 * 16 for r in results["stage2_step"])
    generation = results["causal_generation"][3]
    assert generation["generation_velocity_max_difference"] < 1e-5  # cached == recomputed prefix
    assert generation["deployed_ms_per_latent_frame"] > 0
    assert generation["graphed_generation"] == generation["graphed_deployed_generation"] == {
        "skipped": "CUDA graphs (torch.compile mode reduce-overhead) need a CUDA device"}
    training = results["causal_training"][2]
    assert abs(training["teacher_forcing_loss"] - training["sequential_loss"]) < 1e-5
    assert set(results["loader"]) == {"raw", "raw_uint8", "pre_encoded"}
    text = gpu.markdown(results)
    assert "| 2 | selective | no |" in text and "**Stage-2 step**" in text and "cached speed-up" in text and "| skipped: CUDA graphs" in text and "| pre_encoded |" in text


def test_peak_flops_of_the_planner_gpus_by_device_name():
    assert gpu.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu.peak_bf16_tflops("NVIDIA H200") == 989.0
    assert gpu.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu.peak_bf16_tflops("NVIDIA L4") is None


def test_results_measured_before_the_graphed_variant_still_render():
    results = json.loads(GPU_RESULTS.read_text())
    for row in results["causal_generation"].values():
        row.pop("graphed_generation", None)
    assert "| skipped: not in these results" in gpu.markdown(results)


def test_graphed_generation_code_computes_the_eager_frames_on_cpu():
    """The CUDA-graph variants' code run with the step uncompiled: one step and one cache serve every
    frame count (the longest first, so the shorter one reuses a partly filled buffer), and both
    variants compute what the eager cached paths compute."""
    torch.manual_seed(0)
    model = WanModelCausal(**SMALL_CONFIG)
    graphed = GraphedGeneration(model, capacity=6, latent_hw=(8, 8), compile_options=None)
    generator = torch.Generator().manual_seed(0)
    for frames in (6, 3):  # 5 new frames: chunks of 4 and 1 when deployed; then one chunk of 2
        row = generation_row(model, generation_paths(model, frames, generator, (8, 8), graphed), frames, "cpu")
        assert row["graphed_velocity_max_difference"] < 1e-5 and row["graphed_deployed_max_difference"] < 1e-5
        assert row["graphed_deployed_ms_per_latent_frame"] > 0 and row["graphed_generation"]["attention"] == "sdpa"
    sizes = gpu.Sizes(**{key: SMALL_CONFIG[key] for key in ("dim", "ffn_dim", "num_heads", "num_layers", "text_len",
                                                         "text_dim")}, latent_hw=(8, 8))
    text = gpu.markdown({"machine": {"device": "cpu", "torch": "-", "cuda": "-", "commit": "-", "date": "-",
                                     "peak_bf16_tflops": None}, "seconds": 1, "sizes": asdict(sizes),
                         "causal_generation": {3: row}})
    assert f"| {row['graphed_deployed_ms_per_latent_frame']:.1f} |" in text and "(sdpa) |" in text
    flop_ratio = causal_paths.flop_ratio(DitShape(**SMALL_CONFIG), 3, 16)
    assert f"| {flop_ratio:.2f}x |" in text and "4 denoising calls per frame: " in text
