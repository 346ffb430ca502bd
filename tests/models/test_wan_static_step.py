"""The static-shape generation step (`WanModelCausal.forward_static` through
`rollouts.StaticGenerationStep`): the same numbers as `forward_with_cache` on a StaticKVCache at
every fill, after pops, resets and evictions, and one compiled graph for every frame of a
generation (no recompile per cache fill, no graph break)."""
import pytest
import torch
from conftest import fixture_path
from helpers.generation import generate_one_by_one
from safetensors.torch import load_file
from test_wan_causal import latents, max_error
from test_wan_dit import tiny_config
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters, get_static_address_type

from vidartrain.models.wan.causal import FLEX_BLOCK_SIZE, WanModelCausal, static_cache_mask
from vidartrain.models.wan.kv_cache import KVCache, StaticKVCache
from vidartrain.rollouts import RolloutWindow, StaticGenerationStep, generate_frames, reset_and_reprefill

# fp32 on CPU: the static step attends to the whole buffer (masked slots add exact zeros), so only
# the order of the softmax sums differs from attending to the filled part.
STATIC_ATOL = 2e-6  # measured: 4.8e-7 on velocities of magnitude 2.4


@pytest.fixture(scope="module")
def model():
    model = WanModelCausal(**tiny_config())
    model.load_state_dict(load_file(fixture_path("wan_reference", "dit_tiny_weights.safetensors")), strict=True)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def text():
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(7, 32, generator=generator), torch.randn(11, 32, generator=generator)]


def closed_loop(model, text, cache, step=None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A deployed-controller loop (chunks of 2 frames, pops, window resets): the velocity of every
    prediction and the last layer's cached keys after every prefill, through `step` or eagerly."""
    window = RolloutWindow(rollout_bound=21, rollout_prefill_num=9)
    real = latents(14, seed=30)
    velocities, cached_keys, observed = [], [], 1
    with torch.no_grad():
        model.prefill(real[:, :, :1], text, cache)
        while observed + 2 <= real.shape[2]:
            if window.needs_reset(cache.video_frames, 8):
                reset_and_reprefill(model, real[:, :, observed - window.prefill_latent_frames:observed], text, cache)
            noisy, generated = latents(2, seed=observed), latents(2, seed=100 + observed)
            t = torch.tensor([[700.0, 700.0], [300.0, 300.0]])
            if step is None:
                velocity, _ = model.forward_with_cache(noisy, t, text, cache)
                model.prefill(generated, text, cache)
            else:
                velocity = step.velocity(noisy, t, text, cache)
                step.prefill(generated, text, cache)
            cache.pop_last(2)
            if step is None:
                model.prefill(real[:, :, observed:observed + 2], text, cache)
            else:
                step.prefill(real[:, :, observed:observed + 2], text, cache)
            velocities.append(velocity)
            cached_keys.append(cache.keys[-1][:, :, :cache.cached_tokens()].clone())
            observed += 2
    return velocities, cached_keys


def test_static_step_equals_forward_with_cache_at_every_fill_after_pops_and_resets(model, text):
    text_kv = model.text_key_values(text)
    reference = closed_loop(model, text_kv, StaticKVCache(model.num_layers, capacity=6, scratch_frames=2))
    cache = StaticKVCache(model.num_layers, capacity=6, scratch_frames=2)
    static = closed_loop(model, text_kv, cache, StaticGenerationStep(model))
    assert len(static[0]) == 6 and cache.positions == [0, 1, 2, 3, 4]  # reset, refilled, popped
    for expected, got in zip(reference[0], static[0]):
        assert max_error(expected, got) <= STATIC_ATOL
    for expected, got in zip(reference[1], static[1]):  # what prefill-by-commit keeps
        assert expected.shape == got.shape and max_error(expected, got) <= STATIC_ATOL


def generate(model, text, cache, step=None, frames: int = 5) -> torch.Tensor:
    """Frames generated one by one (2 Euler steps) and prefilled, after a first real frame."""
    noise = torch.cat([latents(1, seed=51 + i) for i in range(frames)], dim=2)
    return generate_one_by_one(model, latents(1, seed=50), noise, text, cache, step)


def test_static_step_generates_the_same_frames_with_eviction(model, text):
    text_kv = model.text_key_values(text)
    caches = [StaticKVCache(model.num_layers, capacity=3, sink=1, evict_oldest=True, scratch_frames=1)
              for _ in range(2)]
    reference = generate(model, text_kv, caches[0])
    static = generate(model, text_kv, caches[1], StaticGenerationStep(model))
    assert caches[1].positions == caches[0].positions == [0, 4, 5]
    assert max_error(reference, static) <= STATIC_ATOL
    filled = caches[0].cached_tokens()
    assert max_error(caches[0].values[1][:, :, :filled], caches[1].values[1][:, :, :filled]) <= STATIC_ATOL


def test_static_step_allocates_the_same_bytes_at_every_fill(model, text):
    """Denoising and prefilling a frame through the static step copies nothing of the cache: what
    it allocates does not depend on how full the cache is, and is a fraction of its buffers (the
    mask and the attention scores grow with the buffer, by a frame's tokens per slot)."""
    from benchmarks.causal_paths import PeakTensorMemory

    step, text_kv, allocated = StaticGenerationStep(model), model.text_key_values(text[:1]), {}
    for cached in (2, 190):
        cache = StaticKVCache(model.num_layers, capacity=200)
        with torch.no_grad():
            model.prefill(latents(cached, batch=1, seed=41), text_kv, cache)
        with PeakTensorMemory() as memory:
            step.velocity(latents(1, batch=1, seed=40), 500.0, text_kv, cache)
            step.prefill(latents(1, batch=1, seed=40), text_kv, cache)
        allocated[cached] = memory.total
    buffer_bytes = sum(buffer.numel() * buffer.element_size() for buffer in cache.keys + cache.values)
    assert allocated[2] == allocated[190] < buffer_bytes / 2  # measured: 0.65 MB against 1.9 MB


@pytest.mark.parametrize("cached", [0, 300, 500])
def test_flex_static_mask_keeps_exactly_the_tiles_with_visible_keys(cached):
    """The BlockMask the static step uses with flex_attention (CUDA's default): its tiles are those
    holding a key the SDPA mask lets some query of the tile see, so the unfilled slots are skipped
    and no visible key is lost (the token-level rule inside tiles is the same function)."""
    frame_tokens, queries, keys = 100, 200, 1000  # 2 new frames, a buffer of 10 frames; tiles of 128
    cached_tokens = torch.tensor(cached)
    tokens = static_cache_mask(cached_tokens, frame_tokens, queries, keys, "sdpa")
    tiles = static_cache_mask(cached_tokens, frame_tokens, queries, keys, "flex").to_dense()[0, 0].bool()
    size = FLEX_BLOCK_SIZE
    expected = torch.tensor([[bool(tokens[q:q + size, k:k + size].any()) for k in range(0, keys, size)]
                             for q in range(0, queries, size)])
    assert torch.equal(tiles, expected) and not expected.all()


def test_static_step_with_flex_attention_equals_the_sdpa_step(model, text):
    text_kv = model.text_key_values(text)
    sdpa = generate(model, text_kv, StaticKVCache(model.num_layers, capacity=4, scratch_frames=1),
                    StaticGenerationStep(model), frames=3)
    torch._dynamo.reset()
    compiler = CompileCounterWithBackend("aot_eager")
    model.attention_backend = "flex"
    try:
        flex = generate(model, text_kv, StaticKVCache(model.num_layers, capacity=4, scratch_frames=1),
                        StaticGenerationStep(model), frames=3)
        compiled = generate(model, text_kv, StaticKVCache(model.num_layers, capacity=4, scratch_frames=1),
                            StaticGenerationStep(model, {"backend": compiler}), frames=3)
    finally:
        model.attention_backend = "auto"
    assert max_error(flex, sdpa) <= STATIC_ATOL
    assert compiler.frame_count == 1 and torch.equal(compiled, flex)  # the BlockMask is built in the graph


def test_static_step_refuses_what_it_cannot_do(model, text):
    step = StaticGenerationStep(model)
    text_kv = model.text_key_values(text)
    cache = StaticKVCache(model.num_layers, capacity=2, scratch_frames=1)
    with pytest.raises(ValueError, match="prefill its first frames with WanModelCausal.prefill"):
        step.velocity(latents(1), 500.0, text_kv, cache)
    with pytest.raises(RuntimeError, match="no buffers yet"):
        cache.commit([0])
    with torch.no_grad():
        model.prefill(latents(1), text_kv, cache)
    with pytest.raises(ValueError, match="prefill its first frames"):
        step.velocity(latents(1), 500.0, text_kv, model.prefill(latents(1), text_kv, KVCache(model.num_layers, 2)))
    with pytest.raises(ValueError, match="text_key_values"):
        step.velocity(latents(1), 500.0, text, cache)
    with pytest.raises(ValueError, match="frames of 2x2 tokens cannot join a cache of 2x3-token frames"):
        step.velocity(torch.zeros(2, 48, 1, 4, 4), 500.0, text_kv, cache)
    with pytest.raises(ValueError, match="frames of 3x2 tokens cannot join a cache of 2x3-token frames"):
        step.velocity(torch.zeros(2, 48, 1, 6, 4), 500.0, text_kv, cache)
    with pytest.raises(ValueError, match="2 positions given for 1 frames"):
        step.velocity(latents(1), 500.0, text_kv, cache, positions=[1, 2])
    step.prefill(latents(1), text_kv, cache)
    with pytest.raises(RuntimeError, match="do not fit after 12 cached ones .* raise scratch_frames"):
        step.velocity(latents(2), 500.0, text_kv, cache)
    with pytest.raises(RuntimeError, match="KV cache full: 2 of 2 frames"):
        step.prefill(latents(1), text_kv, cache)
    assert cache.positions == [0, 1]


def test_compiled_static_step_is_one_graph_for_every_frame_and_cache(model, text):
    """The point of the static step: the cache fill, positions and timesteps are tensors, so no
    Python-int guard recompiles it per frame; a new cache of the same size reuses the graph too."""
    text_kv = model.text_key_values(text)
    eager = generate(model, text_kv, StaticKVCache(model.num_layers, capacity=6, scratch_frames=1),
                     StaticGenerationStep(model))
    torch._dynamo.reset()
    counters.clear()
    compiler = CompileCounterWithBackend("aot_eager")
    step = StaticGenerationStep(model, {"backend": compiler})
    cache = StaticKVCache(model.num_layers, capacity=6, scratch_frames=1)
    compiled = generate(model, text_kv, cache, step)  # fills 1..5, 15 calls
    assert compiler.frame_count == 1 and counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert torch.equal(compiled, eager)
    cache.pop_last(2)
    generate_frames(model, latents(1, seed=60), text_kv, cache, sigmas=(1.0,), step=step)
    cache.reset()
    again = generate(model, text_kv, cache, step)
    other_cache = generate(model, text_kv, StaticKVCache(model.num_layers, capacity=6, scratch_frames=1), step)
    assert torch.equal(again, eager) and torch.equal(other_cache, eager)
    # after a pop, a reset and a new cache: still the first graph, dynamo never ran again
    assert compiler.frame_count == 1 and counters["stats"]["unique_graphs"] == 1


def test_compiled_static_step_compiles_one_block_and_calls_it_for_every_block(text):
    """Compile time must not grow with depth: the step's graph holds one block body (a nested
    compile region), called once per block, instead of every block unrolled."""
    model = WanModelCausal(**{**tiny_config(), "num_layers": 4}).eval().requires_grad_(False)
    graphs = []

    def keep_graph(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    text_kv = model.text_key_values(text)
    eager = generate(model, text_kv, StaticKVCache(4, capacity=3, scratch_frames=1), StaticGenerationStep(model),
                     frames=2)
    compiled = generate(model, text_kv, StaticKVCache(4, capacity=3, scratch_frames=1),
                        StaticGenerationStep(model, {"backend": keep_graph}), frames=2)
    (graph,) = graphs
    blocks = [node for node in graph.graph.nodes if node.target is torch.ops.higher_order.invoke_subgraph]
    assert len(blocks) == 4 and len({node.args[1] for node in blocks}) == 1  # 4 calls of one subgraph
    assert torch.equal(compiled, eager)


def test_static_step_compiled_by_inductor_equals_eager(model, text):
    """Inductor, the compiler under mode "reduce-overhead": the in-place writes into the cache
    buffers (inputs marked static, which CUDA graphs require of the inputs they mutate) survive
    compilation, and the generated frames match eager within fp32 rounding."""
    text_kv = model.text_key_values(text)
    eager = generate(model, text_kv, StaticKVCache(model.num_layers, capacity=4, scratch_frames=1),
                     StaticGenerationStep(model), frames=3)
    torch._dynamo.reset()
    counters.clear()
    cache = StaticKVCache(model.num_layers, capacity=4, scratch_frames=1)
    compiled = generate(model, text_kv, cache, StaticGenerationStep(model, {}), frames=3)
    assert counters["stats"]["unique_graphs"] == 1
    assert max_error(compiled, eager) <= STATIC_ATOL  # measured 7e-7
    assert {get_static_address_type(buffer) for buffer in cache.keys + cache.values} == {"unguarded"}


def test_static_step_forward_is_one_graph_without_breaks(model, text):
    cache = StaticKVCache(model.num_layers, capacity=3, scratch_frames=1)
    text_kv = model.text_key_values(text)
    with torch.no_grad():
        model.prefill(latents(2), text_kv, cache)
        explained = torch._dynamo.explain(model.forward_static)(
            latents(1), torch.full((2, 1), 500.0), torch.tensor([2]), text_kv, cache.keys, cache.values,
            torch.tensor(cache.cached_tokens()))
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    assert explained.graph_count == 1
