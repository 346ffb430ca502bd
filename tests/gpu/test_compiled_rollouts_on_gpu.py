"""Stage 2's compiled blocks on CUDA, where the attention masks are flex_attention block masks (with
guards of their own) by default: every rollout path compiles within the recompile limit, as on the
CPU (tests/trainers/test_self_forcing_compile.py); the cached generation of validation samples runs
those blocks eagerly, but flex_attention (the attention kernel there) still compiled."""
import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from data_tools.tiny_checkpoint import TINY_DIT
from vidartrain.rollouts import RolloutWindow
from vidartrain.sampling import SamplingOptions, vidarc_latents
from vidartrain.trainers.base import BLOCK_RECOMPILE_LIMIT, compile_blocks

from helpers.compiled_rollouts import causal_model, stage2_block_graphs


@pytest.mark.parametrize("backend", ["flex", "sdpa"])
def test_every_stage2_path_compiles_within_the_recompile_limit_on_cuda(backend):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = stage2_block_graphs("cuda", torch.bfloat16, backend)
    assert second == first
    assert first < BLOCK_RECOMPILE_LIMIT
    assert not [w for w in caught if "lru_cache" in str(w.message)], "dynamo traced a cached function"


def test_cached_generation_runs_the_blocks_eagerly_and_flex_attention_compiled():
    model = causal_model("cuda", torch.bfloat16, "flex").eval()
    torch._dynamo.reset()
    counter = CompileCounter()
    compile_blocks(model, backend=counter)
    generator = torch.Generator().manual_seed(0)
    observed = torch.randn(1, 48, 9, 4, 4, generator=generator).cuda()
    context, null = ([torch.randn(5, TINY_DIT["text_dim"], generator=generator).cuda()] for _ in range(2))
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        latents = vidarc_latents(model, observed, context, null, 9, SamplingOptions(steps=2), RolloutWindow(),
                                 closed_loop=True)
    assert counter.frame_count == 0
    assert not [w for w in caught if "without torch.compile" in str(w.message)], "flex_attention ran uncompiled"
    assert torch.isfinite(latents).all()
