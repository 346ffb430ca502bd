"""Stage 2 with compiled blocks (`model.compile`, the default on CUDA): every way the rollouts call a
block, with gradient (training) and without (validation loss, self-generated context, prefills),
compiles within the recompile limit, so that no call falls back to uncompiled code."""
import torch

from vidartrain.models.wan.kv_cache import KVCache
from vidartrain.trainers.base import BLOCK_RECOMPILE_LIMIT

from helpers.compiled_rollouts import causal_model, stage2_block_graphs, window_and_context


def test_every_stage2_path_compiles_within_the_recompile_limit():
    first, second = stage2_block_graphs()
    assert second == first  # the next step compiles nothing new
    assert first < BLOCK_RECOMPILE_LIMIT  # reaching it would mean that a call ran uncompiled


def test_every_block_gets_a_new_contiguous_input():
    """The first block's input comes from the patch embedding, the others' from the block before. Were
    it a view, the first block would fail the view guards of the dynamic-shape graphs that the others
    compiled, and every rollout graph would be compiled twice (the closed loop's 7 graphs became 13)."""
    model = causal_model()
    window, context = window_and_context()
    inputs = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    with torch.no_grad():
        model.forward_with_cache(window.noisy[:, :, :2], window.timesteps[:, :2], context,
                                 model.prefill(window.clean[:, :, :1], context, KVCache(model.num_layers, 4)))
    assert len(inputs) == 2 * len(model.blocks)
    assert [(x._base is None, x.is_contiguous()) for x in inputs] == [(True, True)] * len(inputs)
