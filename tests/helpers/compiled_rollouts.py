"""Stage 2's paths through blocks compiled by `compile_blocks`, counted with dynamo's counting
backend (tests/trainers/test_self_forcing_compile.py and the GPU lane)."""
import torch
from torch._dynamo.testing import CompileCounter

from data_tools.tiny_checkpoint import TINY_DIT
from vidartrain.models.wan.causal import WanModelCausal
from vidartrain.rollouts import RolloutWindow, closed_loop_schedule, sampling_sigmas
from vidartrain.trainers.base import compile_blocks
from vidartrain.trainers.self_forcing import (CausalWindow, closed_loop_velocity, prepare_causal_window,
                                              self_generated_velocity, teacher_forcing_velocity)

WINDOW_FRAMES = 16  # 61 video frames: past the deployed rollout bound, so the closed loop re-prefills
SCHEDULE = closed_loop_schedule(WINDOW_FRAMES, RolloutWindow())


def causal_model(device: str = "cpu", dtype: torch.dtype = torch.float32,
                 attention_backend: str = "auto") -> WanModelCausal:
    torch.manual_seed(0)
    model = WanModelCausal(**TINY_DIT).to(device, dtype)
    model.attention_backend = attention_backend
    model.set_checkpointing("selective")
    return model


def window_and_context(device: str = "cpu", dtype: torch.dtype = torch.float32
                       ) -> tuple[CausalWindow, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 48, WINDOW_FRAMES, 4, 4, generator=generator)
    window = prepare_causal_window(latents.to(device, dtype), WINDOW_FRAMES, 3.0,
                                   torch.Generator(device).manual_seed(0))
    return window, [torch.randn(5, TINY_DIT["text_dim"], generator=generator).to(device, dtype)]


def stage2_block_graphs(device: str = "cpu", dtype: torch.dtype = torch.float32,
                        attention_backend: str = "auto") -> list[int]:
    """Graphs compiled in total after each of two passes over every stage-2 path (teacher forcing,
    self-generated context, closed loop), each with gradient (training) and without (validation
    loss). Forward only: which graphs exist is decided there."""
    assert {event.kind for event in SCHEDULE} == {"prefill", "predict", "reprefill"}
    model = causal_model(device, dtype, attention_backend)
    window, context = window_and_context(device, dtype)
    torch._dynamo.reset()
    counter = CompileCounter()
    compile_blocks(model, backend=counter)
    counts = []
    for _ in range(2):
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                teacher_forcing_velocity(model, window, context)
                self_generated_velocity(model, window, context, sampling_sigmas(2, 3.0), WINDOW_FRAMES, 0,
                                        torch.Generator(device).manual_seed(1))
                closed_loop_velocity(model, window, context, SCHEDULE, WINDOW_FRAMES)
        counts.append(counter.frame_count)
    return counts
