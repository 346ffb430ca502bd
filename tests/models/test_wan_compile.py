"""torch.compile of the DiT block: one graph without breaks in every checkpointing mode, and the
compiled block (inductor, CPU) equal to eager within bf16 tolerance, outputs and gradients."""
import pytest
import torch

from vidartrain.models.wan.model import CHECKPOINTING_MODES, WanAttentionBlock, rope_for_grid

BF16_TOLERANCE = 2e-2  # max |compiled - eager| / max |eager|; fused kernels round differently


def block_and_inputs(dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    block = WanAttentionBlock(64, 128, 2, cross_attn_norm=True).to(dtype)
    x = torch.randn(1, 32, 64, requires_grad=True)
    e = torch.randn(1, 2, 6, 64)
    context = torch.randn(1, 8, 64, dtype=dtype)
    return block, (x, e, context, rope_for_grid(torch.arange(2), 4, 4, 32))


@pytest.mark.parametrize("mode", CHECKPOINTING_MODES)
def test_block_forward_is_one_graph_without_breaks(mode):
    block, inputs = block_and_inputs()
    block.checkpointing = mode
    explained = torch._dynamo.explain(block)(*inputs)
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    assert explained.graph_count == 1


def test_compiled_block_equals_eager_in_bf16():
    block, inputs = block_and_inputs(torch.bfloat16)
    x = inputs[0]

    def step(fn) -> list[torch.Tensor]:
        x.grad = None
        block.zero_grad()
        out, (key, value) = fn(*inputs)
        (out.float().pow(2).mean() + key.float().mean() + value.float().mean()).backward()
        return [out.detach(), x.grad.clone(), block.ffn[0].weight.grad.clone(), block.self_attn.q.weight.grad.clone()]

    compiled = torch.compile(block)
    for mode in ("selective", "full"):
        block.checkpointing = mode
        eager, fused = step(block), step(compiled)
        for name, a, b in zip(("output", "x grad", "ffn.0 grad", "q grad"), fused, eager):
            relative = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
            assert relative <= BF16_TOLERANCE, (mode, name, relative)
