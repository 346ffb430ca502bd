"""The training-step benchmark's report names the memory it measured."""
from dataclasses import asdict

from benchmarks.train_step import StepBenchmark, markdown

ROW = {"tokens_per_s": 1.0, "step_s": 1.0, "activation_memory_bytes": 2**20}


def test_a_step_on_a_numbered_gpu_reports_the_allocator_peak():
    """`--device cuda:1` measures the CUDA allocator's peak (time_loss goes by the device type)."""
    results = {"settings": asdict(StepBenchmark(device="cuda:1")), "tokens_per_step": 1,
               "none": ROW, "selective": ROW, "full": ROW, "selective_memory_ratio": 1.0, "selective_speed_ratio": 1.0,
               "full_memory_ratio": 1.0, "full_speed_ratio": 1.0}
    assert "activation memory = GPU allocator peak" in markdown(results)
