"""WanModel in bf16 on CUDA against the float32 output of the upstream implementation (the shared
fixture's call A, computed on the CPU)."""
import json

import torch
from conftest import fixture_path
from safetensors import safe_open
from safetensors.torch import load_file

from vidartrain.models.wan.model import WanModel

# max |bf16 on CUDA - f32 upstream| / max |f32 upstream|: the bound of the CPU bf16 test
# (tests/models/test_wan_dit.py, measured 2.6e-3 / 3.3e-3 there).
BF16_TOLERANCE = 2e-2


def test_bf16_cuda_forward_matches_the_float32_upstream_output():
    weights = fixture_path("wan_reference", "dit_tiny_weights.safetensors")
    with safe_open(weights, "pt") as f:
        config = json.loads(f.metadata()["config"])
    io = load_file(fixture_path("wan_reference", "dit_tiny_io.safetensors"))
    model = WanModel(**config)
    model.load_state_dict(load_file(weights))
    model = model.to("cuda", torch.bfloat16).eval()
    with torch.no_grad():
        out = model([io["x.0"].cuda(), io["x.1"].cuda()], io["A.t"].cuda(),
                    [io["context.0"].cuda(), io["context.1"].cuda()], seq_len=18)
    for i in range(2):
        reference = io[f"A.out.{i}"]
        relative = ((out[i].float().cpu() - reference).abs().max() / reference.abs().max()).item()
        assert relative <= BF16_TOLERANCE, (i, relative)
