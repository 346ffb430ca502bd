"""Stage 2's rollouts through compiled blocks on CUDA, where the attention masks are flex_attention
block masks (with guards of their own) by default: every path compiles within the recompile limit,
as on the CPU (tests/trainers/test_self_forcing_compile.py)."""
import pytest
import torch

from vidartrain.trainers.base import BLOCK_RECOMPILE_LIMIT

from helpers.compiled_rollouts import stage2_block_graphs


@pytest.mark.parametrize("backend", ["flex", "sdpa"])
def test_every_stage2_path_compiles_within_the_recompile_limit_on_cuda(backend):
    first, second = stage2_block_graphs("cuda", torch.bfloat16, backend)
    assert second == first
    assert first < BLOCK_RECOMPILE_LIMIT
