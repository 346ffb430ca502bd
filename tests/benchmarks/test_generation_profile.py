"""The eager generation profile reports the GPU columns only for a model on a GPU."""
import torch

from benchmarks.causal_paths import SMALL_CONFIG
from benchmarks.generation_profile import NO_GPU, profile_generation
from vidartrain.models.wan.causal import WanModelCausal


def test_a_model_on_the_cpu_has_no_gpu_columns_where_a_gpu_is_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    torch.manual_seed(0)
    model = WanModelCausal(**{**SMALL_CONFIG, "num_layers": 1})
    profiled = profile_generation(model, frames=2, latent_hw=(8, 8))
    for row in profiled.values():
        assert row["gpu"] == {"skipped": NO_GPU} and "gpu_busy" not in row
