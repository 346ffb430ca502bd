"""Write a tiny, randomly initialised Wan2.2-TI2V checkpoint directory in the published layout.

    python -m data_tools.tiny_checkpoint --out demo_run/checkpoints/Wan2.2-TI2V-tiny

The demo and the tests train from it through exactly the code that loads the real 5B checkpoint:

    config.json + diffusion_pytorch_model-0000i-of-00002.safetensors + .index.json   (DiT)
    Wan2.2_VAE.pth                                                                    (VAE)
    models_t5_umt5-xxl-enc-bf16.pth + google/umt5-xxl/tokenizer.json                  (umT5)

The VAE and umT5 files carry no configuration in the published layout, so their constructor
arguments (TINY_VAE, TINY_T5) must also be in the training YAML (`model.vae_config`,
`model.t5_config`); configs/debug/tiny_vidar.yaml holds the same values (a test checks it).
"""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from data_tools.synth import INSTRUCTIONS
from vidartrain.errors import reports_errors
from vidartrain.models.wan.checkpoint import write_checkpoint_dir
from vidartrain.models.wan.model import WanModel
from vidartrain.models.wan.t5 import UMT5Encoder
from vidartrain.models.wan.text_encoder import T5_CHECKPOINT_NAME, T5_TOKENIZER_DIR
from vidartrain.models.wan.vae import WanVAE

VAE_FILE = "Wan2.2_VAE.pth"
TINY_T5 = {"vocab": 128, "dim": 32, "dim_attn": 32, "dim_ffn": 64, "num_heads": 4, "num_layers": 2,
           "num_buckets": 32, "shared_pos": False, "dropout": 0.0}
TINY_VAE = {"dim": 8, "dec_dim": 8}
TINY_DIT = {"model_type": "ti2v", "patch_size": [1, 2, 2], "text_len": 32, "in_dim": 48, "dim": 64,
            "ffn_dim": 128, "freq_dim": 64, "text_dim": TINY_T5["dim"], "out_dim": 48, "num_heads": 2,
            "num_layers": 2, "window_size": [-1, -1], "qk_norm": True, "cross_attn_norm": True,
            "eps": 1e-6}
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # umT5's ids 0, 1, 2


def write_tokenizer(path: Path, words: Iterable[str]) -> dict[str, int]:
    """A WordLevel tokenizer.json with umT5's special ids and its `$A </s>` post-processor;
    returns its vocabulary."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", 1)])
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return vocab


def instruction_words() -> list[str]:
    """Every word of the synthetic instructions, in first-seen order."""
    words: list[str] = []
    for text in INSTRUCTIONS:
        for word in re.findall(r"\S+", text):
            if word not in words:
                words.append(word)
    return words


def write_tiny_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny checkpoint directory; weights are a deterministic function of `seed`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    dit = WanModel(**TINY_DIT)
    # Upstream zero-initialises the head; a random head gives the demo a non-trivial start.
    torch.nn.init.normal_(dit.head.head.weight, std=0.02)
    write_checkpoint_dir({k: v.to(torch.bfloat16) for k, v in dit.state_dict().items()},
                         {"_class_name": "WanModel", **TINY_DIT}, out_dir, num_shards=2)
    vae = WanVAE(**TINY_VAE)
    torch.save(vae.state_dict(), out_dir / VAE_FILE)
    t5 = UMT5Encoder(**TINY_T5)
    torch.save({k: v.to(torch.bfloat16) for k, v in t5.state_dict().items()}, out_dir / T5_CHECKPOINT_NAME)
    write_tokenizer(out_dir / T5_TOKENIZER_DIR / "tokenizer.json", instruction_words())
    return out_dir


@reports_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_tiny_checkpoint(args.out, args.seed)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"tiny Wan2.2-TI2V checkpoint ({size / 1e6:.1f} MB) written to {os.fspath(path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
