"""Stage 2 with compiled blocks (`model.compile`, the default on CUDA): every way the rollouts call a
block, with gradient (training) and without (validation loss, self-generated context, prefills),
compiles within the recompile limit, so that no call falls back to uncompiled code."""
import torch
from torch._dynamo.testing import CompileCounter

from data_tools.tiny_checkpoint import TINY_DIT
from vidartrain.models.wan.causal import WanModelCausal
from vidartrain.models.wan.kv_cache import KVCache
from vidartrain.rollouts import RolloutWindow, closed_loop_schedule, sampling_sigmas
from vidartrain.trainers.base import BLOCK_RECOMPILE_LIMIT, compile_blocks
from vidartrain.trainers.self_forcing import (CausalWindow, closed_loop_velocity, prepare_causal_window,
                                              self_generated_velocity, teacher_forcing_velocity)

WINDOW_FRAMES = 16  # 61 video frames: past the deployed rollout bound, so the closed loop re-prefills
SCHEDULE = closed_loop_schedule(WINDOW_FRAMES, RolloutWindow())


def compiled_model(num_layers: int) -> tuple[WanModelCausal, CompileCounter]:
    torch.manual_seed(0)
    model = WanModelCausal(**{**TINY_DIT, "num_layers": num_layers})
    model.set_checkpointing("selective")
    torch._dynamo.reset()
    counter = CompileCounter()
    compile_blocks(model, backend=counter)
    return model, counter


def window_and_context() -> tuple[CausalWindow, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    window = prepare_causal_window(torch.randn(1, 48, WINDOW_FRAMES, 4, 4, generator=generator), WINDOW_FRAMES, 3.0,
                                   generator)
    return window, [torch.randn(5, TINY_DIT["text_dim"], generator=generator)]


def test_every_stage2_path_compiles_within_the_recompile_limit():
    model, counter = compiled_model(TINY_DIT["num_layers"])
    window, context = window_and_context()
    assert {event.kind for event in SCHEDULE} == {"prefill", "predict", "reprefill"}

    def every_path() -> int:
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                teacher_forcing_velocity(model, window, context)
                self_generated_velocity(model, window, context, sampling_sigmas(2, 3.0), WINDOW_FRAMES, 0,
                                        torch.Generator().manual_seed(1))
                closed_loop_velocity(model, window, context, SCHEDULE, WINDOW_FRAMES)
        return counter.frame_count

    first = every_path()
    assert every_path() == first  # the next step compiles nothing new
    assert first < BLOCK_RECOMPILE_LIMIT  # reaching it would mean that a call ran uncompiled


def test_every_block_gets_a_new_contiguous_input():
    """The first block's input comes from the patch embedding, the others' from the block before. Were
    it a view, the first block would fail the view guards of the dynamic-shape graphs that the others
    compiled, and every rollout graph would be compiled twice (the closed loop's 7 graphs became 13)."""
    model, _ = compiled_model(TINY_DIT["num_layers"])
    window, context = window_and_context()
    inputs = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    with torch.compiler.set_stance("force_eager"), torch.no_grad():
        model.forward_with_cache(window.noisy[:, :, :2], window.timesteps[:, :2], context,
                                 model.prefill(window.clean[:, :, :1], context, KVCache(model.num_layers, 4)))
    assert len(inputs) == 2 * len(model.blocks)
    assert [(x._base is None, x.is_contiguous()) for x in inputs] == [(True, True)] * len(inputs)
