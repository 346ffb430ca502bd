"""The causal-paths benchmark's FLOP accounting, checked against what its generation paths compute."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.causal_paths import (GENERATION_SETTINGS, LATENT_HW, SMALL_CONFIG, cached_generation, flop_ratio,
                                     generation_flops, measure_causal_paths, random_inputs,
                                     recompute_generation)
from vidartrain.models.wan.causal import WanModelCausal
from vidartrain.models.wan.kv_cache import StaticKVCache
from vidartrain.plan import DitShape
from vidartrain.rollouts import rollout
from vidartrain.shapes import tokens_per_latent_frame

TOKENS_PER_FRAME = tokens_per_latent_frame(LATENT_HW)
CPU_ATTENTION = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


class AttentionFlops(TorchDispatchMode):
    """FLOPs of CPU's fused attention kernel (which FlopCounterMode does not count): 4 per visible
    query-key pair and channel (QK^T and AV). A masked-out pair (-inf) is not counted."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is CPU_ATTENTION:
            query, key = args[0], args[1]
            batch, heads, queries, channels = query.shape
            mask = (kwargs or {}).get("attn_mask")
            pairs = queries * key.shape[2] if mask is None else int((mask != float("-inf")).sum())
            self.flops += 4 * batch * heads * channels * pairs
        return func(*args, **(kwargs or {}))


def counted_flops(run) -> dict[str, int]:
    """Matmul and convolution FLOPs (FlopCounterMode) and attention FLOPs of `run()`."""
    with FlopCounterMode(display=False) as matmuls, AttentionFlops() as attention:
        run()
    return {"linear": matmuls.get_total_flops(), "attention": attention.flops}


@pytest.mark.parametrize("frames", [2, 6])
def test_generation_flops_are_what_the_timed_generations_compute(frames):
    torch.manual_seed(0)
    model = WanModelCausal(**SMALL_CONFIG)
    first, noise = random_inputs(model, torch.Generator().manual_seed(0), (1, 48, 1, *LATENT_HW),
                                 (1, 48, frames - 1, *LATENT_HW))
    text = [torch.randn(8, model.text_dim)]
    for name, setting in GENERATION_SETTINGS.items():
        counted = {
            "cached": counted_flops(lambda: cached_generation(
                model, first, noise, text, StaticKVCache(model.num_layers, capacity=frames), setting)),
            "recompute": counted_flops(lambda: recompute_generation(model, first, noise, text, setting))}
        for path, flops in generation_flops(DitShape(**SMALL_CONFIG), frames, TOKENS_PER_FRAME, setting).items():
            assert counted[path] == {"linear": flops["linear"],
                                     "attention": flops["self_attention"] + flops["cross_attention"]}, (name, path)


@pytest.mark.parametrize("frames", [8, 16, 21])
def test_at_real_size_the_flop_ratio_is_about_the_ratio_of_frame_forwards(frames):
    """Matmuls dominate at 460 tokens per frame: recomputing costs a forward of 2, 3, .. frames for
    the new frames, the cache two single-frame forwards each (denoise, prefill) and the first prefill."""
    prefix_frames = sum(range(2, frames + 1))
    one_call = GENERATION_SETTINGS["one call per frame"]
    assert flop_ratio(DitShape(), frames, 460, one_call) == pytest.approx(prefix_frames / (2 * (frames - 1) + 1),
                                                                         rel=0.1)


def test_teacher_forcing_computes_what_the_sequential_rollout_computes_in_one_pass():
    """The training paths the benchmark compares do the same arithmetic: any speed-up of one-pass
    teacher forcing over the rollout comes from fewer, larger kernels and no cache copies."""
    torch.manual_seed(0)
    model = WanModelCausal(**SMALL_CONFIG)
    clean, noisy = random_inputs(model, torch.Generator().manual_seed(0), *[(1, 48, 4, *LATENT_HW)] * 2)
    t, text = torch.rand(1, 4) * 1000, [torch.randn(8, model.text_dim)]
    with torch.no_grad():
        one_pass = counted_flops(lambda: model.forward_teacher_forcing(clean, noisy, t, text))
        sequential = counted_flops(lambda: rollout(model, clean, noisy, t, text, cache_grad=True))
    assert one_pass == sequential and one_pass["attention"] > 0



def test_a_cpu_run_counts_its_tensors_where_a_gpu_is_present(monkeypatch):
    """Paths run on the CPU are measured as on the CPU on a machine with a GPU too: the CUDA
    allocator does not see their tensors (its peak would read 0)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    rows = measure_causal_paths((2,), model_config={**SMALL_CONFIG, "num_layers": 1}, latent_hw=(8, 8), device="cpu")
    measured = [rows[2][path] for path in ("teacher_forcing", "sequential")]
    measured += [m[variant] for m in rows[2]["generation"].values() for variant in ("cached", "recompute")]
    assert all(m["peak_mib"] > 0 and "first_seconds" not in m for m in measured)
