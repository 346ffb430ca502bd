"""Run by tests/trainers/test_trainer_engine.py through the real `deepspeed` launcher (2 ranks, gloo).

Builds a tiny WanModel under ZeRO-3 and writes, per rank, a JSON report: how many parameter values
this rank holds vs the model's total, and the largest difference between the full gradients with
and without per-block activation checkpointing (same weights, same batch). Then it trains two steps,
exports the gathered bf16 weights (OUT/vidar.pt) and the engine's output on a fixed input
(OUT/engine_output.pt) for the test to compare against a fresh WanModel.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vidartrain.config import Config  # noqa: E402
from vidartrain.distributed.export import gather_state_dict, write_state_dict  # noqa: E402
from vidartrain.models.wan.model import WanModel  # noqa: E402
from vidartrain.trainers.base import build_engine, init_distributed  # noqa: E402

TINY = dict(model_type="ti2v", patch_size=[1, 2, 2], text_len=8, in_dim=48, dim=64, ffn_dim=128, freq_dim=32,
            text_dim=16, out_dim=48, num_heads=2, num_layers=3)
DS_CONFIG = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 2,
             "bf16": {"enabled": True},
             "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def full_grads(engine, batch) -> dict[str, torch.Tensor]:
    x, t, context = batch
    loss = engine(x, t, context).float().pow(2).mean()
    engine.backward(loss)
    grads = {name: safe_get_full_grad(p).float().clone() for name, p in engine.module.named_parameters()}
    engine.optimizer.zero_grad()
    return grads


def probe_batch():
    generator = torch.Generator().manual_seed(7)
    return (torch.randn(1, 48, 3, 8, 8, generator=generator), torch.tensor([[0.0, 250.0, 250.0]]),
            [torch.randn(6, 16, generator=generator)])


def main() -> None:
    out_dir = Path(sys.argv[-1])
    init_distributed()
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = WanModel(**TINY)
    torch.nn.init.normal_(model.head.head.weight, std=0.02)  # upstream zero-init would give zero grads
    engine = build_engine(model, DS_CONFIG, Config())
    generator = torch.Generator().manual_seed(100 + rank)
    batch = (torch.randn(1, 48, 3, 8, 8, generator=generator), torch.tensor([[0.0, 500.0, 500.0]]),
             [torch.randn(5, 16, generator=generator)])
    engine.module.set_checkpointing("full")
    checkpointed = full_grads(engine, batch)
    engine.module.set_checkpointing("none")
    plain = full_grads(engine, batch)
    for _ in range(2):
        x, t, context = batch
        engine.backward(engine(x, t, context).float().pow(2).mean())
        engine.step()
    engine.eval()
    with torch.no_grad():
        output = engine(*probe_batch())
    state_dict = gather_state_dict(engine.module, rank)
    if rank == 0:
        write_state_dict(state_dict, out_dir / "vidar.pt")
        # A fresh model from the written file, run in this process: ZeRO-3 has swapped F.linear for its
        # memory-efficient version (matmul, then bias add) here, so this run rounds exactly as the engine.
        fresh = WanModel(**TINY).to(torch.bfloat16).eval()
        fresh.load_state_dict(torch.load(out_dir / "vidar.pt", weights_only=True), strict=True)
        with torch.no_grad():
            fresh_output = fresh(*probe_batch())
        torch.save({"output": output, "fresh_output": fresh_output, "inputs": probe_batch()},
                   out_dir / "engine_output.pt")
    report = {
        "local_numel": sum(p.ds_tensor.numel() for p in engine.module.parameters()),
        "total_numel": sum(p.ds_numel for p in engine.module.parameters()),
        "visible_numel": sum(p.numel() for p in engine.module.parameters()),
        "max_grad_diff": max(float((checkpointed[n] - plain[n]).abs().max()) for n in plain),
        "max_grad": max(float(g.abs().max()) for g in plain.values()),
        "num_tensors": len(plain),
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()


if __name__ == "__main__":
    main()
