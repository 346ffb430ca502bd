"""Frame-by-frame generation through a KV cache, eagerly or through a StaticGenerationStep: what the
static-step tests on CPU and on a GPU compare."""
import torch

from vidartrain.models.wan.causal import WanModelCausal
from vidartrain.models.wan.kv_cache import KVCache
from vidartrain.rollouts import StaticGenerationStep, generate_frames


def generate_one_by_one(model: WanModelCausal, first: torch.Tensor, noise: torch.Tensor, text, cache: KVCache,
                        step: StaticGenerationStep | None = None) -> torch.Tensor:
    """Prefill the real frame `first`, then generate the frames of `noise` one at a time (two Euler
    steps) and prefill each, through `step` when given; returns the generated frames."""
    with torch.no_grad():
        model.prefill(first, text, cache)
    generated = []
    for i in range(noise.shape[2]):
        frame = generate_frames(model, noise[:, :, i:i + 1], text, cache, sigmas=(1.0, 0.5), step=step)
        with torch.no_grad():
            if step is None:
                model.prefill(frame, text, cache)
            else:
                step.prefill(frame, text, cache)
        generated.append(frame)
    return torch.cat(generated, dim=2)
