"""The tiny checkpoint the demo trains from loads through the same code as the real one."""
from pathlib import Path

import torch

from data_tools.tiny_checkpoint import TINY_DIT, TINY_T5, TINY_VAE, VAE_FILE, write_tiny_checkpoint
from vidartrain.config import load_config
from vidartrain.models.wan.model import WanModel
from vidartrain.models.wan.text_encoder import TextEncoder
from vidartrain.models.wan.vae import WanVAE

REPO = Path(__file__).resolve().parents[2]


def test_tiny_yaml_matches_the_writer():
    config = load_config(REPO / "configs/debug/tiny_vidar.yaml")
    assert config.model.vae_config == TINY_VAE
    assert config.model.t5_config == TINY_T5


def test_tiny_checkpoint_loads_through_published_layout(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", seed=3)
    shards = sorted(p.name for p in ckpt.glob("diffusion_pytorch_model-*.safetensors"))
    assert shards == ["diffusion_pytorch_model-00001-of-00002.safetensors",
                      "diffusion_pytorch_model-00002-of-00002.safetensors"]
    dit = WanModel.from_pretrained(ckpt, dtype=torch.float32)
    assert dit.config()["dim"] == TINY_DIT["dim"] and len(dit.blocks) == TINY_DIT["num_layers"]
    vae = WanVAE.from_pretrained(ckpt / VAE_FILE, **TINY_VAE)
    text = TextEncoder.from_pretrained(ckpt, dtype=torch.float32, text_len=TINY_DIT["text_len"],
                                       encoder_config=TINY_T5)
    embeddings = text(["pick up the red cube", "an instruction with unknown words"])
    assert [tuple(e.shape) for e in embeddings] == [(6, 32), (6, 32)]
    latents = vae.encode(torch.rand(1, 3, 9, 64, 64) * 2 - 1)
    assert latents.shape == (1, 48, 3, 4, 4)
    velocity = dit(latents, torch.tensor([500.0]), embeddings[:1])
    assert velocity.shape == latents.shape and torch.isfinite(velocity).all()
    again = write_tiny_checkpoint(tmp_path / "again", seed=3)
    for name in ["diffusion_pytorch_model-00001-of-00002.safetensors", "config.json"]:
        assert (ckpt / name).read_bytes() == (again / name).read_bytes()
