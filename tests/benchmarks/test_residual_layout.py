"""The residual-layout benchmark compares what it says: the blocks get token-major tokens as
shipped and feature-major ones in the baseline, with the same values."""
import torch

from benchmarks.residual_layout import model_for, run
from benchmarks.train_step import StepBenchmark

TINY = StepBenchmark(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_len=8, text_dim=16, latent_frames=2,
                     latent_height=8, latent_width=8, steps=1, device="cpu")


def test_the_baseline_gives_the_blocks_feature_major_tokens_of_the_same_values():
    strides = {}
    for layout in ("token-major", "feature-major"):
        model = model_for(TINY, layout, compiled=False)
        model.blocks[1].register_forward_pre_hook(
            lambda module, args, layout=layout: strides.update({layout: args[0].stride()}))
        model(torch.randn(1, 48, 2, 8, 8, dtype=torch.bfloat16), torch.tensor([500.0]), torch.randn(1, 8, 16))
    tokens = 2 * 4 * 4
    assert strides == {"token-major": (tokens * 64, 64, 1), "feature-major": (tokens * 64, 1, tokens)}
    result = run(TINY, compiled=(False,))["eager"]
    assert result["velocity_max_difference"] == 0.0 and result["feature_major_over_token_major"] > 0
