"""Deterministic IDM weights of the golden fixtures (rule in fixtures/idm_reference/README.md).

Test-only: rebuilds the state dict the reference outputs were computed with, from keys.json.
"""
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

SEED = 6


def rule_values(key: str, index: int, shape: list[int], is_batchnorm: bool) -> np.ndarray:
    """The README's integer hash -> uniform u in [-1, 1) -> scaled by the tensor's role."""
    numel = int(np.prod(shape))
    n = np.arange(1, numel + 1, dtype=np.int64)
    h = (n * 0x9E3779B1 + (index + 1) * 0x7F4A7C15 + SEED) & 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x045D9F3B) & 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x045D9F3B) & 0xFFFFFFFF
    h ^= h >> 16
    u = h.astype(np.float64) / 2.0**31 - 1.0
    leaf = key.rsplit(".", 1)[1]
    if is_batchnorm and leaf == "weight":
        v = 1.0 + 0.02 * u
    elif is_batchnorm and leaf == "running_var":
        v = 1.0 + 0.1 * np.abs(u)
    elif is_batchnorm:
        v = 0.02 * u
    elif len(shape) >= 2:
        gain = 2.45 if key.startswith("model.mask_model.") else 1.8
        v = (gain / math.sqrt(numel // shape[0])) * u
    else:
        v = 0.02 * u
    return v.astype(np.float32).reshape(shape)


def reference_state_dict(keys_json: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, parsed keys.json); entries of category 'keep' take their stored values."""
    layout = json.loads(keys_json.read_text())
    keys = {e["key"] for e in layout["entries"]}
    state_dict = {}
    for entry in layout["entries"]:
        key = entry["key"]
        if entry["category"] == "keep":
            dtype = torch.int64 if entry["dtype"] == "int64" else torch.float32
            value = torch.tensor(layout["keep_values"][key], dtype=dtype).reshape(entry["shape"])
        else:
            is_batchnorm = key.rsplit(".", 1)[0] + ".running_mean" in keys
            value = torch.from_numpy(rule_values(key, entry["index"], entry["shape"], is_batchnorm))
        state_dict[key] = value
    return state_dict, layout


def tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the sorted keys of (utf-8 key bytes + raw tensor bytes)."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(key.encode())
        digest.update(state_dict[key].contiguous().numpy().tobytes())
    return digest.hexdigest()
