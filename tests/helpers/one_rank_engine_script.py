"""Run by tests/trainers/test_trainer_engine.py as a process group of one (`python`, no launcher). Prints
one JSON line with the result of each check:

discarded_gradients: for each ZeRO stage, a step whose first micro-batch was backpropagated and then
    discarded (`discard_gradients`, as the trainer does when a later micro-batch is non-finite) followed by
    a normal step must leave the same weights as the normal step alone: {stage: largest weight difference}.
fp16_resume: a ZeRO-3 fp16 engine takes three steps, the second with gradients that overflow under the loss
    scale (DeepSpeed skips that update), saves a checkpoint, and a fresh engine loads it weights-only, as
    `Trainer.load_checkpoint` does: which steps were applied, the loss scaler's class and whether its state
    and the weights came back, and the dtype of the weights of a model built in float32.
"""
import json
import sys
from pathlib import Path
from tempfile import TemporaryDirectory

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vidartrain.config import Config  # noqa: E402
from vidartrain.distributed.checkpointing import weights_only_loads  # noqa: E402
from vidartrain.trainers.base import build_engine, discard_gradients, init_distributed  # noqa: E402


def engine_for(stage: int, accumulation: int = 2, fp16: bool = False):
    torch.manual_seed(0)
    config = Config()
    config.training.warmup = 0
    model = torch.nn.Linear(8, 4)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": accumulation,
                 "train_batch_size": accumulation, "zero_optimization": {"stage": stage}}
    if fp16:  # float32 weights: build_engine must put them in the profile's 16-bit type before ZeRO-3 partitions
        ds_config["fp16"] = {"enabled": True, "initial_scale_power": 8}  # dynamic loss scaling from 2^8
    return build_engine(model, ds_config, config)


def normal_step(engine, batches) -> None:
    for micro, batch in enumerate(batches):
        engine.set_gradient_accumulation_boundary(micro == len(batches) - 1)
        engine.backward(engine(batch).pow(2).mean())
    engine.step()


def discarded_gradients() -> dict[int, float]:
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
    return differences


def fp16_resume() -> dict[str, object]:
    # DeepSpeed refuses fp16 on a CPU without oneDNN's fp16 kernels; torch's own CPU kernels run this
    # Linear in fp16 all the same, and the loss scaling, the skipped step and the checkpoint are DeepSpeed's.
    type(get_accelerator()).is_fp16_supported = lambda self: True
    generator = torch.Generator().manual_seed(2)
    engine, applied = engine_for(3, accumulation=1, fp16=True), []
    for scale in (1.0, 100.0, 1.0):  # 100: a finite loss whose gradients overflow fp16 once scaled by 2^8
        loss = engine(torch.randn(1, 8, generator=generator).half() * scale).pow(2).mean()
        assert torch.isfinite(loss), loss  # the trainer skips a non-finite loss itself, before the engine
        engine.backward(loss)
        engine.step()
        applied.append(engine.was_step_applied())
    with TemporaryDirectory() as root:
        engine.save_checkpoint(root, tag="step", save_latest=False)
        resumed = engine_for(3, accumulation=1, fp16=True)
        with weights_only_loads():
            load_dir, _ = resumed.load_checkpoint(root, tag="step")
    scaler, resumed_scaler = engine.optimizer.loss_scaler, resumed.optimizer.loss_scaler
    return {"applied": applied, "loaded": load_dir is not None, "loss_scaler": type(resumed_scaler).__name__,
            "hysteresis": [scaler.cur_hysteresis, resumed_scaler.cur_hysteresis],
            "same_loss_scaler": vars(scaler) == vars(resumed_scaler),
            "same_weights": all(torch.equal(a, b) for a, b in zip(gathered(engine), gathered(resumed))),
            "weight_dtypes": sorted({str(p.dtype) for p in gathered(engine)})}


def gathered(engine) -> list[torch.Tensor]:
    """The full weights, gathered where ZeRO-3 partitioned them."""
    parameters = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(parameters):
        return [p.detach().clone() for p in parameters]


if __name__ == "__main__":
    init_distributed()
    print(json.dumps({"discarded_gradients": discarded_gradients(), "fp16_resume": fp16_resume()}), flush=True)
