"""The static-shape generation step as CUDA graphs (torch.compile mode "reduce-overhead"): the
graphs are captured (not skipped for the in-place cache writes), one compilation serves every
cache fill and a second cache, and the frames equal the eager cache's in bf16; the same for the
benchmark's graphed generations."""
from dataclasses import replace

import pytest
import torch
from torch._dynamo.utils import counters

from benchmarks import gpu
from vidartrain.models.wan.kv_cache import StaticKVCache
from vidartrain.rollouts import StaticGenerationStep

from helpers.generation import generate_one_by_one
from test_attention_on_gpu import BF16_TOLERANCE, causal_model, relative_error


def generate(model, first, noise, text, step=None) -> torch.Tensor:
    cache = StaticKVCache(model.num_layers, capacity=noise.shape[2] + 1, scratch_frames=1)
    return generate_one_by_one(model, first, noise, text, cache, step)


@pytest.mark.parametrize("backend", ["flex", "sdpa"])
def test_static_step_in_cuda_graphs_equals_the_eager_cache(backend):
    model = causal_model(torch.bfloat16, backend)
    generator = torch.Generator("cuda").manual_seed(3)
    first = torch.randn(1, 48, 1, 16, 16, generator=generator, device="cuda")
    noise = torch.randn(1, 48, 5, 16, 16, generator=generator, device="cuda")
    with torch.no_grad():
        text = model.text_key_values([torch.randn(8, 16, generator=generator, device="cuda")])
    eager = generate(model, first, noise, text)
    torch._dynamo.reset()
    counters.clear()
    step = StaticGenerationStep(model, {"mode": "reduce-overhead"})
    graphed = generate(model, first, noise, text, step)
    again = generate(model, first, noise, text, step)  # a new cache: its buffers re-record the graphs
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["inductor"]["cudagraph_skips"] == 0, "the step ran without CUDA graphs"
    assert relative_error(graphed, eager) <= BF16_TOLERANCE
    assert relative_error(again, graphed) <= BF16_TOLERANCE


def test_the_benchmarks_graphed_generations_run_in_cuda_graphs():
    """benchmarks.gpu's generation section at tiny sizes, before a real-size run spends minutes on
    it: the graphed variant of every setting (one step and one cache across settings and frame
    counts; chunks of 4 and of the remainder when deployed) is captured and computes what the eager
    cache computes."""
    torch._dynamo.reset()
    counters.clear()
    results = gpu.run(replace(gpu.SMOKE, generation_frames=(8, 6)), device="cuda", only=("causal_generation",))
    assert "errors" not in results, results.get("errors")
    for row in results["causal_generation"].values():
        for measured in row["generation"].values():
            assert measured["graphed"]["seconds"] > 0
            # bf16 at these sizes: generated frames reach ~2-4; a wrong cache moves them by O(1)
            assert measured["graphed_max_difference"] <= 0.1
    assert counters["inductor"]["cudagraph_skips"] == 0, "a graphed variant ran without CUDA graphs"
