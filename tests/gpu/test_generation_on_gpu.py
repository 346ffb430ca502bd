"""The static-shape generation step as CUDA graphs (torch.compile mode "reduce-overhead"): the
graphs are captured (not skipped for the in-place cache writes), one compilation serves every
cache fill and a second cache, and the frames equal the eager cache's in bf16."""
import pytest
import torch
from torch._dynamo.utils import counters

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
