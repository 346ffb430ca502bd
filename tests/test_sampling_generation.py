"""TI2V generation with WanModel and Vidarc's cached, closed-loop generation with WanModelCausal."""
import numpy as np
import pytest
import torch

from data_tools.tiny_checkpoint import TINY_DIT
from vidartrain.models.wan.causal import WanModelCausal
from vidartrain.models.wan.model import WanModel
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

from vidartrain.rollouts import RolloutWindow, StaticGenerationStep, closed_loop_schedule
from vidartrain.sampling import (SamplingOptions, action_metrics, cuda_graph_step, frame_strip, psnr, ti2v_latents,
                                 video_to_uint8, vidarc_latents)
from vidartrain.trainers.base import compile_blocks


def tiny(model_class, seed=0):
    torch.manual_seed(seed)
    model = model_class(**TINY_DIT).eval()
    torch.nn.init.normal_(model.head.head.weight, std=0.02)  # upstream zero-inits the head
    return model


def prompts(batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    context = [torch.randn(5 + i, TINY_DIT["text_dim"], generator=g) for i in range(batch)]
    null = [torch.randn(3, TINY_DIT["text_dim"], generator=g) for _ in range(batch)]
    return context, null


def test_ti2v_keeps_the_image_latent_and_is_seeded():
    model = tiny(WanModel)
    first = torch.randn(1, 48, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    context, null = prompts(1)
    options = SamplingOptions(steps=4, shift=5.0, guide_scale=5.0, seed=7)
    a = ti2v_latents(model, first, context, null, 3, options)
    b = ti2v_latents(model, first, context, null, 3, options)
    assert a.shape == (1, 48, 3, 4, 4)
    assert torch.equal(a, b)  # same seed: bit-identical on CPU
    assert torch.equal(a[:, :, :1], first)  # frame 0 is the image latent after every step
    other = ti2v_latents(model, first, context, null, 3, SamplingOptions(steps=4, seed=8))
    assert (other - a)[:, :, 1:].abs().max() > 1e-3
    euler = ti2v_latents(model, first, context, null, 3, SamplingOptions(steps=4, seed=7, solver="euler"))
    assert (euler - a)[:, :, 1:].abs().max() > 1e-6


def test_ti2v_guidance_and_negative_prompt_matter():
    model = tiny(WanModel)
    first = torch.randn(1, 48, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    context, null = prompts(1)
    base = ti2v_latents(model, first, context, null, 2, SamplingOptions(steps=3, guide_scale=5.0))
    unguided = ti2v_latents(model, first, context, null, 2, SamplingOptions(steps=3, guide_scale=1.0))
    other_negative = ti2v_latents(model, first, context, [torch.zeros(0, TINY_DIT["text_dim"])], 2,
                                  SamplingOptions(steps=3, guide_scale=5.0))
    assert (base - unguided).abs().max() > 1e-4
    assert (base - other_negative).abs().max() > 1e-4
    # guide 1 is the conditional prediction alone: the negative prompt drops out
    unguided_other = ti2v_latents(model, first, context, [torch.zeros(0, TINY_DIT["text_dim"])], 2,
                                  SamplingOptions(steps=3, guide_scale=1.0))
    torch.testing.assert_close(unguided, unguided_other, atol=1e-5, rtol=0)


def test_ti2v_batch_rows_equal_single_runs():
    model = tiny(WanModel)
    first = torch.randn(2, 48, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    context, null = prompts(2)
    options = SamplingOptions(steps=3, seed=11)
    both = ti2v_latents(model, first, context, null, 3, options)
    single = ti2v_latents(model, first[:1], context[:1], null[:1], 3, options)
    torch.testing.assert_close(both[:1], single, atol=1e-5, rtol=0)
    assert (both[0, :, 1:] - both[1, :, 1:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        ti2v_latents(model, first, context[:1], null, 3, options)


# A window of 40 video frames over 11 latent frames: chunk 1-4 at positions 1.., the real 1-4
# prefilled in their place (pop + re-prefill), chunk 5-8, then a window reset (re-prefill of the
# last 5 video frames = 2 latent frames from position 0) before the last chunk 9-10.
WINDOW = RolloutWindow(rollout_bound=40, rollout_prefill_num=5)
FRAMES = 11


def test_the_schedule_used_covers_pop_reprefill_and_reset():
    kinds = [(e.kind, e.frames.start, e.frames.stop, e.position) for e in closed_loop_schedule(FRAMES, WINDOW)]
    assert kinds == [("prefill", 0, 1, 0), ("predict", 1, 5, 1), ("prefill", 1, 5, 1), ("predict", 5, 9, 5),
                     ("reprefill", 7, 9, 0), ("predict", 9, 11, 2)]


@pytest.mark.parametrize("closed_loop", [True, False])
def test_cached_generation_equals_recomputing_the_prefix(closed_loop):
    model = tiny(WanModelCausal)
    observed = torch.randn(1, 48, FRAMES, 4, 4, generator=torch.Generator().manual_seed(3))
    context, null = prompts(1)
    options = SamplingOptions(steps=2, shift=5.0, guide_scale=3.0, solver="euler", seed=5)
    cached = vidarc_latents(model, observed, context, null, FRAMES, options, WINDOW, closed_loop)
    recomputed = vidarc_latents(model, observed, context, null, FRAMES, options, WINDOW, closed_loop,
                                recompute=True)
    assert torch.equal(cached[:, :, :1], observed[:, :, :1])
    assert cached[:, :, 1:].abs().min() > 0  # every frame was generated
    torch.testing.assert_close(cached, recomputed, atol=1e-5, rtol=1e-5)
    # the closed loop conditions on the real frames, the open loop on its own: they differ after chunk 1
    other = vidarc_latents(model, observed, context, null, FRAMES, options, WINDOW, not closed_loop)
    torch.testing.assert_close(other[:, :, :5], cached[:, :, :5], atol=1e-5, rtol=0)
    assert (other[:, :, 5:] - cached[:, :, 5:]).abs().max() > 1e-4


def test_a_window_reset_before_every_chunk_generates_what_recomputing_does():
    """A bound below one chunk (2 video frames, 1 re-prefilled): the cache is cleared and refilled
    with the newest real frame at position 0 before every chunk, the first one included, so the
    first prefill is a re-prefill. Cached (eager and static step) and recomputed generation agree."""
    window = RolloutWindow(rollout_bound=2, rollout_prefill_num=1)
    kinds = [(e.kind, e.frames.start, e.frames.stop, e.position) for e in closed_loop_schedule(7, window)]
    assert kinds == [("reprefill", 0, 1, 0), ("predict", 1, 5, 1), ("reprefill", 4, 5, 0), ("predict", 5, 7, 1)]
    model = tiny(WanModelCausal)
    observed = torch.randn(1, 48, 7, 4, 4, generator=torch.Generator().manual_seed(3))
    context, null = prompts(1)
    options = SamplingOptions(steps=2, shift=5.0, guide_scale=3.0, solver="euler", seed=5)
    for closed_loop in (True, False):
        recomputed = vidarc_latents(model, observed, context, null, 7, options, window, closed_loop, recompute=True)
        cached = vidarc_latents(model, observed, context, null, 7, options, window, closed_loop)
        static = vidarc_latents(model, observed, context, null, 7, options, window, closed_loop,
                                static_step=StaticGenerationStep(model))
        torch.testing.assert_close(cached, recomputed, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(static, cached, atol=2e-6, rtol=0)


@pytest.mark.parametrize("closed_loop", [True, False])
def test_compiled_static_step_generates_what_the_cached_loop_does(closed_loop):
    """The loop through `StaticGenerationStep` compiled (aot_eager on CPU: the graph CUDA graphs
    would capture): one graph per chunk shape (4 frames, then the last chunk of 2), same latents."""
    model = tiny(WanModelCausal)
    observed = torch.randn(1, 48, FRAMES, 4, 4, generator=torch.Generator().manual_seed(3))
    context, null = prompts(1)
    options = SamplingOptions(steps=2, shift=5.0, guide_scale=3.0, solver="euler", seed=5)
    torch._dynamo.reset()
    compiler = CompileCounterWithBackend("aot_eager")
    static = vidarc_latents(model, observed, context, null, FRAMES, options, WINDOW, closed_loop,
                            static_step=StaticGenerationStep(model, {"backend": compiler}))
    cached = vidarc_latents(model, observed, context, null, FRAMES, options, WINDOW, closed_loop)
    torch.testing.assert_close(static, cached, atol=2e-6, rtol=0)
    assert compiler.frame_count == 2
    with pytest.raises(ValueError, match="needs a CUDA device, got cpu"):
        cuda_graph_step(model, torch.device("cpu"))


def test_cached_generation_runs_blocks_compiled_by_training_eagerly():
    """Validation samples during stage 2 use the blocks that training compiled in place. Without the
    static step, the loop's calls differ in shape and cache state from call to call, and compiling
    each one would use up the recompile limit that training's rollouts need: they run eagerly."""
    model = tiny(WanModelCausal)
    observed = torch.randn(1, 48, FRAMES, 4, 4, generator=torch.Generator().manual_seed(3))
    context, null = prompts(1)
    options = SamplingOptions(steps=2, solver="euler", seed=5)
    eager = vidarc_latents(model, observed, context, null, FRAMES, options, WINDOW, closed_loop=True)
    torch._dynamo.reset()
    counter = CompileCounter()
    compile_blocks(model, backend=counter)
    compiled = vidarc_latents(model, observed, context, null, FRAMES, options, WINDOW, closed_loop=True)
    assert counter.frame_count == 0
    assert torch.equal(compiled, eager)
    with torch.no_grad():
        model(observed[:, :, :2], torch.zeros(1, 2), context)
    assert counter.frame_count == 1  # elsewhere the blocks are compiled


def test_vidarc_generation_is_seeded_and_checks_its_input():
    model = tiny(WanModelCausal)
    observed = torch.randn(1, 48, 5, 4, 4, generator=torch.Generator().manual_seed(3))
    context, null = prompts(1)
    options = SamplingOptions(steps=2, solver="unipc", seed=5)
    a = vidarc_latents(model, observed, context, null, 5, options, WINDOW, closed_loop=True)
    assert torch.equal(a, vidarc_latents(model, observed, context, null, 5, options, WINDOW, closed_loop=True))
    with pytest.raises(ValueError, match="needs as many observed frames"):
        vidarc_latents(model, observed, context, null, 9, options, WINDOW, closed_loop=True)


def test_frames_strip_psnr_and_action_metrics():
    video = torch.linspace(-1, 1, 2 * 3 * 5 * 4 * 6).reshape(2, 3, 5, 4, 6)
    frames = video_to_uint8(video)
    assert frames.shape == (2, 5, 4, 6, 3) and frames.dtype == np.uint8
    assert frame_strip(frames[0]).shape == (4, 18, 3)
    assert frame_strip(frames[0], frames[1]).shape == (8, 18, 3)
    assert psnr(frames[0], frames[0]) == float("inf")
    noisy = frames[0].astype(np.int16) + 5
    assert psnr(np.clip(noisy, 0, 255).astype(np.uint8), frames[0]) == pytest.approx(10 * np.log10(255 ** 2 / 25), abs=0.3)
    actual = np.zeros((4, 14), np.float32)
    actual[:, 6] = [0, 0, 1, 1]
    actual[:, 13] = [1, 1, 1, 0]
    predicted = actual.copy()
    predicted[:, 0] += 0.5
    predicted[:, 6] = [0, 0.6, 0.9, 1]  # one wrong of four
    metrics = action_metrics(predicted, actual)
    assert metrics["action_l1_per_dim"][0] == pytest.approx(0.5)
    assert metrics["gripper_accuracy"] == pytest.approx(7 / 8)
    with pytest.raises(ValueError, match="differ in shape"):
        action_metrics(predicted[:3], actual)
    # a robot without grippers (`idm.gripper_dims: []`, `--gripper-dims ""`) has no gripper accuracy
    assert set(action_metrics(predicted, actual, gripper_dims=[])) == {"action_l1", "action_l1_per_dim"}
