"""Run by tests/trainers/test_trainer_engine.py on one rank (torchrun, gloo): for each ZeRO stage, a
step whose first micro-batch was backpropagated and then discarded (`discard_gradients`, as the
trainer does when a later micro-batch is non-finite) followed by a normal step must leave the same
weights as the normal step alone. Prints one JSON line {stage: largest weight difference}."""
import json
import sys
from pathlib import Path

import deepspeed
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vidartrain.config import Config  # noqa: E402
from vidartrain.trainers.base import build_engine, discard_gradients, init_distributed  # noqa: E402


def engine_for(stage: int):
    torch.manual_seed(0)
    config = Config()
    config.training.warmup = 0
    return build_engine(torch.nn.Linear(8, 4), {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2,
                                                "train_batch_size": 2, "zero_optimization": {"stage": stage}}, config)


def normal_step(engine, batches) -> None:
    for micro, batch in enumerate(batches):
        engine.set_gradient_accumulation_boundary(micro == len(batches) - 1)
        engine.backward(engine(batch).pow(2).mean())
    engine.step()


def main() -> None:
    init_distributed()
    generator = torch.Generator().manual_seed(1)
    skipped, batches = torch.randn(1, 8, generator=generator) * 100, [torch.randn(1, 8, generator=generator)
                                                                        for _ in range(2)]
    differences = {}
    for stage in (0, 1, 2, 3):
        reference, discarded = engine_for(stage), engine_for(stage)
        normal_step(reference, batches)
        discarded.set_gradient_accumulation_boundary(False)
        discarded.backward(discarded(skipped).pow(2).mean())
        discard_gradients(discarded.optimizer)
        normal_step(discarded, batches)
        with torch.no_grad():
            differences[stage] = max((a - b).abs().max().item() for a, b in
                                     zip(gathered(reference), gathered(discarded)))
    print(json.dumps(differences), flush=True)


def gathered(engine) -> list[torch.Tensor]:
    """The full weights (float32 here: no bf16), gathered where ZeRO-3 partitioned them."""
    parameters = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(parameters):
        return [p.detach().clone() for p in parameters]


if __name__ == "__main__":
    main()
