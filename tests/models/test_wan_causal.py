"""WanModelCausal + KVCache: block causality, cached generation, teacher forcing vs rollout."""
import pytest
import torch
from conftest import fixture_path
from safetensors.torch import load_file
from test_wan_dit import tiny_config

from vidartrain.models.wan.causal import FrameLayout, WanModelCausal, frame_visibility
from vidartrain.models.wan.kv_cache import KVCache, StaticKVCache, latent_frames_of, video_frames_of
from vidartrain.models.wan.model import WanModel
from vidartrain.rollouts import (RolloutWindow, closed_loop_rollout, closed_loop_schedule, generate_frames,
                                 reset_and_reprefill, rollout)

ATOL = 1e-5
FRAME_TOKENS = 6  # latent 4x6 -> 2x3 tokens per frame


@pytest.fixture(scope="module")
def weights():
    return load_file(fixture_path("wan_reference", "dit_tiny_weights.safetensors"))


@pytest.fixture(scope="module")
def model(weights):
    model = WanModelCausal(**tiny_config())
    model.load_state_dict(weights, strict=True)
    return model.eval().requires_grad_(False)


def latents(frames: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 48, frames, 4, 6, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def text():
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(7, 32, generator=generator), torch.randn(11, 32, generator=generator)]


def max_error(a, b) -> float:
    return (a - b).abs().max().item()


def test_state_dicts_are_interchangeable_with_wan_model(model, weights):
    plain = WanModel(**tiny_config())
    plain.load_state_dict(model.state_dict(), strict=True)
    assert set(plain.state_dict()) == set(weights)


def test_one_latent_frame_equals_the_bidirectional_model(model, weights, text):
    plain = WanModel(**tiny_config()).eval()
    plain.load_state_dict(weights)
    x = latents(1)
    t = torch.tensor([300.0, 800.0])
    with torch.no_grad():
        assert max_error(model(x, t, text), plain(x, t, text)) <= ATOL


def test_text_for_another_batch_size_is_refused(model, text):
    with pytest.raises(ValueError, match="text of 1 prompts for a batch of 2 samples"):
        model(latents(2), torch.zeros(2), text[:1])
    with pytest.raises(ValueError, match="text of 1 prompts for a batch of 2 samples"):
        model.forward_with_cache(latents(1), 0.0, model.text_key_values(text[:1]), KVCache(model.num_layers, 4))


def test_frame_visibility_rules():
    clean = FrameLayout.context(0, 3)
    assert frame_visibility(clean, clean).tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    both = clean + clean.as_noisy()
    visible = frame_visibility(both, both)
    # noisy frame 2 sees clean frames 0, 1 and itself; not clean frame 2 nor noisy frame 1
    assert visible[5].tolist() == [True, True, False, False, False, True]
    # clean frames never see noisy ones
    assert not visible[:3, 3:].any()


def test_changing_later_frames_leaves_earlier_outputs_bit_identical(model, text):
    x = latents(4)
    t = torch.tensor([[0.0, 200.0, 500.0, 900.0], [0.0, 100.0, 400.0, 700.0]])
    changed, t_changed = x.clone(), t.clone()
    changed[:, :, 2:] = torch.randn_like(changed[:, :, 2:])
    t_changed[:, 2:] = 11.0
    with torch.no_grad():
        a, b = model(x, t, text), model(changed, t_changed, text)
    assert torch.equal(a[:, :, :2], b[:, :, :2])
    assert max_error(a[:, :, 2:], b[:, :, 2:]) > 1e-3


def test_flex_block_mask_gives_the_sdpa_numbers(model, text):
    x = latents(3)
    t = torch.tensor([[0.0, 300.0, 600.0], [0.0, 200.0, 900.0]])
    with torch.no_grad():
        sdpa = model(x, t, text)
        model.attention_backend = "flex"
        try:
            flex = model(x, t, text)
            flex_tf = model.forward_teacher_forcing(x, latents(3, seed=5), t, text)
        finally:
            model.attention_backend = "auto"
        sdpa_tf = model.forward_teacher_forcing(x, latents(3, seed=5), t, text)
    assert max_error(flex, sdpa) <= ATOL
    assert max_error(flex_tf, sdpa_tf) <= ATOL


@pytest.mark.parametrize("cache_class", [KVCache, StaticKVCache])
def test_cached_frame_by_frame_and_by_chunks_equal_the_full_forward(model, text, cache_class):
    x = latents(5)
    t = torch.tensor([[0.0, 0.0, 250.0, 600.0, 950.0], [0.0, 0.0, 100.0, 500.0, 999.0]])
    with torch.no_grad():
        full = model(x, t, text)
        for chunk in (1, 2):
            cache = cache_class(model.num_layers, capacity=5)
            outputs = []
            for start in range(0, 5, chunk):
                velocity, cache = model.forward_with_cache(x[:, :, start:start + chunk], t[:, start:start + chunk],
                                                           text, cache, update_cache=True)
                outputs.append(velocity)
            assert cache.positions == [0, 1, 2, 3, 4]
            assert max_error(torch.cat(outputs, dim=2), full) <= ATOL


@pytest.mark.parametrize("cache_class", [KVCache, StaticKVCache])
def test_pop_last_and_prefill_real_frames_at_the_same_positions(model, text, cache_class):
    """The deployed controller: generate 4 frames, pop them, prefill the 4 real observations."""
    real = latents(6, seed=2)
    generated = latents(4, seed=3)
    new_frame = latents(1, seed=4)
    t_new = torch.tensor([700.0, 350.0])
    with torch.no_grad():
        cache = model.prefill(real[:, :, :2], text, cache_class(model.num_layers, capacity=8))
        for i in range(4):
            cache = model.prefill(generated[:, :, i:i + 1], text, cache)
        assert cache.positions == [0, 1, 2, 3, 4, 5]
        cache.pop_last(4)
        assert cache.positions == [0, 1] and cache.next_position == 2
        cache = model.prefill(real[:, :, 2:], text, cache)
        assert cache.positions == [0, 1, 2, 3, 4, 5]
        cached, _ = model.forward_with_cache(new_frame, t_new, text, cache)
        sequence = torch.cat([real, new_frame], dim=2)
        t_full = torch.cat([torch.zeros(2, 6), t_new[:, None]], dim=1)
        full = model(sequence, t_full, text)
    assert max_error(cached, full[:, :, 6:]) <= ATOL


@pytest.mark.parametrize("cache_class", [KVCache, StaticKVCache])
def test_window_reset_reprefills_the_last_real_frames_from_position_zero(model, text, cache_class):
    real = latents(7, seed=6)
    new_frame = latents(1, seed=7)
    t_new = torch.tensor([500.0, 900.0])
    with torch.no_grad():
        cache = model.prefill(real, text, cache_class(model.num_layers, capacity=8))
        cache = reset_and_reprefill(model, real[:, :, -3:], text, cache)
        assert cache.positions == [0, 1, 2]
        cached, _ = model.forward_with_cache(new_frame, t_new, text, cache)
        full = model(torch.cat([real[:, :, -3:], new_frame], dim=2),
                     torch.cat([torch.zeros(2, 3), t_new[:, None]], dim=1), text)
    assert max_error(cached, full[:, :, 3:]) <= ATOL


def test_teacher_forcing_frame_i_equals_full_forward_over_clean_prefix_and_noisy_frame(model, text):
    clean, noisy = latents(4, seed=8), latents(4, seed=9)
    t = torch.tensor([[100.0, 300.0, 500.0, 700.0], [900.0, 800.0, 600.0, 400.0]])
    with torch.no_grad():
        teacher_forcing = model.forward_teacher_forcing(clean, noisy, t, text)
        for i in (0, 2, 3):
            sequence = torch.cat([clean[:, :, :i], noisy[:, :, i:i + 1]], dim=2)
            t_seq = torch.cat([torch.zeros(2, i), t[:, i:i + 1]], dim=1)
            assert max_error(teacher_forcing[:, :, i], model(sequence, t_seq, text)[:, :, i]) <= ATOL


def loss_and_gradients(model, velocity_of_window):
    """Squared error of the velocity `velocity_of_window()` against a fixed target, and every
    parameter's gradient of it."""
    model.zero_grad()
    loss = (velocity_of_window() - latents(4, seed=12)).pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same_loss_and_gradients(got, expected):
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=0)
    for name, grad in got[1].items():
        torch.testing.assert_close(grad, expected[1][name], rtol=1e-5, atol=1e-8, msg=name)


def test_teacher_forcing_equals_ground_truth_rollout_in_loss_and_gradients(weights, text):
    model = WanModelCausal(**tiny_config())
    model.load_state_dict(weights)
    clean, noisy = latents(4, seed=10), latents(4, seed=11)
    t = torch.tensor([[0.0, 300.0, 500.0, 700.0], [0.0, 800.0, 600.0, 400.0]])
    reference = loss_and_gradients(model, lambda: model.forward_teacher_forcing(clean, noisy, t, text))
    assert all(g.abs().sum() > 0 for g in reference[1].values())
    for chunk in (1, 3):
        assert_same_loss_and_gradients(loss_and_gradients(
            model, lambda: rollout(model, clean, noisy, t, text, frames_per_chunk=chunk, cache_grad=True)), reference)


def test_generating_a_chunks_context_leaves_the_cached_context_and_its_gradient(weights, text):
    """Ground truth up to frame 2 of 4: the one generated frame (3) is context for no noisy frame,
    so the self-generated rollout must give teacher forcing's loss and gradients. Generating it
    must neither cut the gradient of the cached frames 0-1 nor, in a bounded cache (3 frames, sink
    1), evict frame 1 for a generated frame that is then dropped."""
    model = WanModelCausal(**tiny_config())
    model.load_state_dict(weights)
    clean, noisy = latents(4, seed=10), latents(4, seed=11)
    t = torch.tensor([[0.0, 300.0, 500.0, 700.0], [0.0, 800.0, 600.0, 400.0]])
    reference = loss_and_gradients(model, lambda: model.forward_teacher_forcing(clean, noisy, t, text))
    for kv_cache_length in (None, 3):
        assert_same_loss_and_gradients(loss_and_gradients(model, lambda: rollout(
            model, clean, noisy, t, text, frames_per_chunk=2, context_mode="self_generated", num_ground_truth_frames=3,
            cache_grad=True, kv_cache_length=kv_cache_length, sink=1, sigmas=(1.0,),
            generator=torch.Generator().manual_seed(0))), reference)


def test_self_forcing_rollout_generates_its_own_context(model, text):
    clean, noisy = latents(3, seed=13), latents(3, seed=14)
    t = torch.tensor([[0.0, 400.0, 800.0], [0.0, 300.0, 600.0]])
    with torch.no_grad():
        ground_truth = rollout(model, clean, noisy, t, text)
        all_real = rollout(model, clean, noisy, t, text, context_mode="self_generated", num_ground_truth_frames=3)
        generated = rollout(model, clean, noisy, t, text, context_mode="self_generated", num_ground_truth_frames=1,
                            sigmas=(1.0, 0.5), generator=torch.Generator().manual_seed(0))
    assert max_error(all_real, ground_truth) <= ATOL
    # frames 0 and 1 only see ground truth (frame 0's context); frame 2 sees the generated frame 1
    assert max_error(generated[:, :, :2], ground_truth[:, :, :2]) <= ATOL
    assert max_error(generated[:, :, 2], ground_truth[:, :, 2]) > 1e-3


def test_self_generated_rollout_equals_recomputing_every_generated_frame(model, text):
    """The stage-2 self-forcing rollout (chunks of 4 through the KV cache, context generated frame
    by frame with Euler steps) against no cache at all: each context frame generated by full
    forwards over the frames before it, then one teacher-forcing pass over that context."""
    clean, noisy = latents(6, seed=13), latents(6, seed=14)
    t = torch.tensor([[0.0, 300.0, 500.0, 700.0, 900.0, 100.0], [0.0, 800.0, 600.0, 400.0, 200.0, 950.0]])
    sigmas, generator = (1.0, 0.5), torch.Generator().manual_seed(0)
    with torch.no_grad():
        context = [clean[:, :, :1]]
        for i in range(1, 6):
            x = torch.randn(clean[:, :, :1].shape, generator=generator)
            for sigma, next_sigma in zip(sigmas, sigmas[1:] + (0.0,)):
                t_prefix = torch.cat([torch.zeros(2, i), torch.full((2, 1), 1000 * sigma)], dim=1)
                x = x + (next_sigma - sigma) * model(torch.cat(context + [x], dim=2), t_prefix, text)[:, :, -1:]
            context.append(x)
        recomputed = model.forward_teacher_forcing(torch.cat(context, dim=2), noisy, t, text)
        cached = rollout(model, clean, noisy, t, text, frames_per_chunk=4, context_mode="self_generated",
                         sigmas=sigmas, generator=torch.Generator().manual_seed(0))
    assert max_error(cached, recomputed) <= ATOL


def test_generated_frame_follows_the_euler_steps(model, text):
    noise = latents(1, seed=15)
    with torch.no_grad():
        cache = model.prefill(latents(2, seed=16), text, KVCache(model.num_layers, capacity=4))
        frame = generate_frames(model, noise, text, cache, sigmas=(1.0, 0.5))
        v1, _ = model.forward_with_cache(noise, 1000.0, text, cache)
        halfway = noise - 0.5 * v1
        v2, _ = model.forward_with_cache(halfway, 500.0, text, cache)
    assert cache.num_frames == 2
    assert max_error(frame, halfway - 0.5 * v2) <= ATOL


def test_deployed_controller_loop_keeps_the_cache_within_capacity(model, text):
    """Closed loop 3x longer than the window: generate 2 latent frames (8 video frames), pop them,
    prefill the real ones; reset + re-prefill when the window would pass the bound."""
    window = RolloutWindow(rollout_bound=21, rollout_prefill_num=9)
    capacity = latent_frames_of(window.rollout_bound)
    real = latents(3 * capacity + 4, batch=1, seed=17)
    cache = KVCache(model.num_layers, capacity=capacity)
    observed, resets, peak_tokens = 1, 0, 0
    with torch.no_grad():
        model.prefill(real[:, :, :1], text[:1], cache)
        while observed + 2 <= real.shape[2]:
            if window.needs_reset(cache.video_frames, 8):
                reset_and_reprefill(model, real[:, :, observed - window.prefill_latent_frames:observed], text[:1], cache)
                resets += 1
            for _ in range(2):
                frame = generate_frames(model, latents(1, batch=1, seed=observed), text[:1], cache, sigmas=(1.0,))
                model.prefill(frame, text[:1], cache)
                peak_tokens = max(peak_tokens, cache.cached_tokens())
            cache.pop_last(2)
            model.prefill(real[:, :, observed:observed + 2], text[:1], cache)
            observed += 2
            assert cache.num_frames <= capacity and cache.video_frames <= window.rollout_bound
    assert resets >= 3
    assert peak_tokens <= capacity * FRAME_TOKENS
    assert all(k.shape[2] <= capacity * FRAME_TOKENS for k in cache.keys)


@pytest.mark.parametrize("cache_class", [KVCache, StaticKVCache])
def test_eviction_keeps_sink_frames_and_the_newest(model, text, cache_class):
    cache = cache_class(model.num_layers, capacity=4, sink=1, evict_oldest=True)
    with torch.no_grad():
        for i in range(12):
            model.prefill(latents(1, seed=20 + i), text, cache)
            assert cache.num_frames <= 4 and cache.cached_tokens() <= 4 * FRAME_TOKENS
    assert cache.positions == [0, 9, 10, 11]


def closed_loop_velocities(model, text, cache) -> list[torch.Tensor]:
    """Every call of a deployed-controller loop with pops, re-prefills and window resets."""
    window = RolloutWindow(rollout_bound=21, rollout_prefill_num=9)
    real = latents(14, batch=1, seed=30)
    outputs, observed = [], 1
    with torch.no_grad():
        model.prefill(real[:, :, :1], text[:1], cache)
        while observed + 2 <= real.shape[2]:
            if window.needs_reset(cache.video_frames, 8):
                reset_and_reprefill(model, real[:, :, observed - window.prefill_latent_frames:observed], text[:1], cache)
            velocity, _ = model.forward_with_cache(latents(2, batch=1, seed=observed), 700.0, text[:1], cache)
            outputs.append(velocity)
            model.prefill(latents(2, batch=1, seed=100 + observed), text[:1], cache)
            cache.pop_last(2)
            model.prefill(real[:, :, observed:observed + 2], text[:1], cache)
            observed += 2
    return outputs


def test_static_cache_gives_the_same_numbers_as_the_concatenating_cache(model, text):
    capacity = latent_frames_of(21)
    static = closed_loop_velocities(model, text, StaticKVCache(model.num_layers, capacity=capacity))
    concatenating = closed_loop_velocities(model, text, KVCache(model.num_layers, capacity=capacity))
    assert len(static) == 6 and all(torch.equal(a, b) for a, b in zip(static, concatenating))


def allocated_bytes_for_one_frame(model, text, cache) -> int:
    """Bytes of the tensors created while one frame is denoised against `cache` and prefilled."""
    from benchmarks.causal_paths import PeakTensorMemory

    frame = latents(1, batch=1, seed=40)
    with torch.no_grad(), PeakTensorMemory() as memory:
        model.forward_with_cache(frame, 500.0, text[:1], cache)
        model.prefill(frame, text[:1], cache)
        cache.pop_last(1)
    return memory.total


@pytest.mark.parametrize("cache_class, grows", [(StaticKVCache, False), (KVCache, True)])
def test_denoising_and_prefilling_a_frame_allocates_per_frame_not_per_cache(model, text, cache_class, grows):
    allocated = {}
    for cached in (2, 8):
        cache = cache_class(model.num_layers, capacity=10)
        with torch.no_grad():
            model.prefill(latents(cached, batch=1, seed=41), text[:1], cache)
        allocated[cached] = allocated_bytes_for_one_frame(model, text, cache)
    cache_bytes_per_frame = 2 * model.num_layers * FRAME_TOKENS * model.dim * 4  # keys + values, float32
    growth = allocated[8] - allocated[2]
    if grows:  # the concatenating cache copies all of itself for every new frame
        assert growth >= 6 * cache_bytes_per_frame
    else:
        assert growth < cache_bytes_per_frame / 2


def test_static_cache_refuses_gradients_and_overflowing_chunks(model, text):
    cache = StaticKVCache(model.num_layers, capacity=3, scratch_frames=1)
    with torch.no_grad():
        model.prefill(latents(3, batch=1), text[:1], cache)
        with pytest.raises(RuntimeError, match="do not fit after .* raise scratch_frames"):
            model.forward_with_cache(latents(2, batch=1), 500.0, text[:1], cache)
    trainable = WanModelCausal(**tiny_config())
    grad_cache = StaticKVCache(trainable.num_layers, capacity=3)
    with torch.no_grad():
        trainable.prefill(latents(1, batch=1), text[:1], grad_cache)
    with pytest.raises(RuntimeError, match="for generation without gradient"):
        trainable.forward_with_cache(latents(1, batch=1), 500.0, text[:1], grad_cache)
    with pytest.raises(TypeError, match="writes its buffers in place"):
        grad_cache.fork()


def test_cache_refuses_what_it_cannot_do(model, text):
    cache = KVCache(model.num_layers, capacity=2)
    with torch.no_grad():
        model.prefill(latents(2), text, cache)
        with pytest.raises(RuntimeError, match="KV cache full: 2 of 2 frames"):
            model.prefill(latents(1), text, cache)
    with pytest.raises(ValueError, match="cannot pop 3 frames from a cache of 2"):
        cache.pop_last(3)
    with pytest.raises(ValueError, match="sink frames"):
        KVCache(2, capacity=2, sink=2)
    with pytest.raises(ValueError, match="one timestep per latent frame"):
        model(latents(2), torch.arange(12.0).view(1, 12).expand(2, 12), text)


@pytest.mark.parametrize("cache_class", [KVCache, StaticKVCache])
@pytest.mark.parametrize("other_grid", [(2, 6), (6, 4)], ids=["fewer_tokens", "transposed_grid"])
def test_frames_of_another_size_than_the_cached_ones_are_refused(model, text, cache_class, other_grid):
    # A single frame needs no mask, so it attended to the cached frames of another grid unchecked;
    # a transposed grid has as many tokens, but its keys carry other spatial RoPE positions.
    cache = cache_class(model.num_layers, capacity=4)
    other = torch.zeros(1, 48, 1, *other_grid)
    tokens = f"{other_grid[0] // 2}x{other_grid[1] // 2}"
    with torch.no_grad():
        model.prefill(latents(2, batch=1), text[:1], cache)
        with pytest.raises(ValueError, match=f"frames of {tokens} tokens cannot join a cache of 2x3-token frames"):
            model.forward_with_cache(other, 500.0, text[:1], cache)
        with pytest.raises(ValueError, match=f"frames of {tokens} tokens cannot join a cache of 2x3-token frames"):
            model.forward_teacher_forcing(other, other, torch.zeros(1), text[:1], cache)


def test_video_and_latent_frame_counts_of_the_deployed_window():
    window = RolloutWindow()
    assert (window.rollout_bound, window.rollout_prefill_num, window.prefill_latent_frames) == (60, 33, 9)
    assert video_frames_of(15) == 57 and video_frames_of(16) == 61 and latent_frames_of(81) == 21
    assert window.needs_reset(49, 16) and not window.needs_reset(33, 16)
    assert not window.needs_reset(44, 16) and window.needs_reset(45, 16)  # a window may reach the bound exactly


def test_closed_loop_rollout_keeps_real_frames_as_context_without_gradient(weights, text):
    """As at inference, the real frames (prefilled, and re-prefilled after a window reset) are fixed
    context: the loss reaches the inputs through the predicted chunks only. Frame 0 is never predicted
    and its slot holds zeros."""
    model = WanModelCausal(**tiny_config())
    model.load_state_dict(weights)
    clean, noisy = latents(4, seed=10).requires_grad_(True), latents(4, seed=11).requires_grad_(True)
    t = torch.tensor([[0.0, 300.0, 500.0, 700.0], [0.0, 800.0, 600.0, 400.0]])
    events = closed_loop_schedule(4, RolloutWindow(rollout_bound=9, rollout_prefill_num=5), chunk=1)
    assert [event.kind for event in events] == ["prefill", "predict", "prefill", "predict", "reprefill", "predict"]
    velocity = closed_loop_rollout(model, clean, noisy, t, text, events, kv_cache_length=4)
    assert torch.equal(velocity[:, :, 0], torch.zeros_like(velocity[:, :, 0]))
    velocity.square().mean().backward()
    assert clean.grad is None
    assert noisy.grad[:, :, 0].abs().sum() == 0 and all(noisy.grad[:, :, i].abs().sum() > 0 for i in (1, 2, 3))


def test_bounded_rollout_evicts_the_oldest_non_sink_frames(model, text):
    clean, noisy = latents(5, seed=30), latents(5, seed=31)
    t = torch.full((2, 5), 600.0)
    with torch.no_grad():
        unbounded = rollout(model, clean, noisy, t, text)
        bounded = rollout(model, clean, noisy, t, text, kv_cache_length=2, sink=1)
    # frame 2 still sees frames 0, 1; from frame 3 on, frame 1 has been evicted (frame 0 is the sink)
    assert max_error(bounded[:, :, :3], unbounded[:, :, :3]) <= ATOL
    assert max_error(bounded[:, :, 3], unbounded[:, :, 3]) > 1e-4


def test_causal_paths_benchmark_compares_paths_that_agree():
    from benchmarks.causal_paths import TRAINING_PATHS, measure_causal_paths
    row = measure_causal_paths((2,))[2]
    assert all(row[name]["seconds"] > 0 and row[name]["peak_mib"] > 0 for name in TRAINING_PATHS)
    assert abs(row["teacher_forcing_loss"] - row["sequential_loss"]) <= 1e-5 * row["teacher_forcing_loss"]
    assert row["training_velocity_max_difference"] <= ATOL
    for measured in row["generation"].values():
        assert all(measured[path]["seconds"] > 0 and measured[path]["peak_mib"] > 0 for path in ("cached", "recompute"))
        assert measured["recompute_max_difference"] <= ATOL


def test_causal_model_reads_the_published_checkpoint_layout(tmp_path, weights):
    from test_wan_dit import write_published_layout
    write_published_layout(tmp_path, tiny_config(), weights)
    model = WanModelCausal.from_pretrained(tmp_path, dtype=torch.float32)
    assert isinstance(model, WanModelCausal)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())

