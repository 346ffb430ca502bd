"""umT5 encoder: parity with upstream Wan2.2 (golden fixtures); the prompt -> embedding wrapper."""
import copy
import json
import os

import pytest
import torch
from conftest import fixture_path
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer, models

from data_tools.tiny_checkpoint import write_tokenizer
from vidartrain.errors import CheckpointError
from vidartrain.models.wan import t5 as t5_module
from vidartrain.models.wan.t5 import UMT5Encoder, load_umt5_encoder
from vidartrain.models.wan.text_encoder import (T5_CHECKPOINT_NAME, T5_TOKENIZER_DIR, TextEncoder,
                                                UMT5Tokenizer, clean_prompt)

TINY = dict(vocab=64, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2, num_buckets=32)
WORDS = ["pick", "up", "the", "red", "cube", "and", "place", "it", "in", "bowl", "&", "robot's"]


def fixture_encoder() -> UMT5Encoder:
    path = fixture_path("wan_reference", "t5_tiny_weights.safetensors")
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    # The fixture stores upstream's umt5_xxl() factory arguments; map them to T5Encoder's.
    config["vocab"] = config.pop("vocab_size")
    config["num_layers"] = config.pop("encoder_layers")
    model = UMT5Encoder(**config)
    model.load_state_dict(load_file(path), strict=True)
    return model.eval()


def run_with_intermediates(model: UMT5Encoder, ids: torch.Tensor, mask: torch.Tensor):
    captured = {}
    modules = {"token_embedding": model.token_embedding,
               **{f"blocks.{i}": block for i, block in enumerate(model.blocks)}}
    hooks = [module.register_forward_hook(
                 lambda _m, _i, out, name=name: captured.update({name: out}))
             for name, module in modules.items()]
    with torch.no_grad():
        out = model(ids, mask)
    for hook in hooks:
        hook.remove()
    return out, captured


@pytest.mark.parametrize("case", ["short", "long"])
def test_float32_parity_with_upstream(case):
    io = load_file(fixture_path("wan_reference", "t5_tiny_io.safetensors"))
    ids, mask = io[f"{case}.ids"], io[f"{case}.mask"]
    out, intermediates = run_with_intermediates(fixture_encoder(), ids, mask)
    assert out.shape == io[f"{case}.out"].shape
    # Observed: short 6.0e-7, long 8.3e-7 (intermediates <= 6e-8).
    assert (out - io[f"{case}.out"]).abs().max().item() <= 1e-5
    assert set(intermediates) == {"token_embedding", "blocks.0", "blocks.1"}
    for name, value in intermediates.items():
        assert (value - io[f"{case}.inter.{name}"]).abs().max().item() <= 1e-5, name


def test_bfloat16_close_to_float32():
    io = load_file(fixture_path("wan_reference", "t5_tiny_io.safetensors"))
    model = fixture_encoder()
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    for case in ["short", "long"]:
        ids, mask = io[f"{case}.ids"], io[f"{case}.mask"]
        with torch.no_grad():
            reference = model(ids, mask)
            out = model_bf16(ids, mask)
        assert out.dtype == torch.bfloat16
        error = (out.float() - reference)[mask.bool()].abs()
        # Observed on |out| <= 3.1: max 0.032, mean 0.0049 (short); max 0.032, mean 0.0045 (long).
        assert error.max().item() <= 0.08
        assert error.mean().item() <= 0.01


def test_relative_position_buckets():
    bias = t5_module.T5RelativePositionBias(num_buckets=32, num_heads=1)
    rel = torch.tensor([0, 1, 7, 8, 11, 12, 16, 90, 91, 159, -1, -7, -8, -12, -159])
    # |rel| < 8 exact, then 8 + floor(8 * log(|rel| / 8) / log(16)) saturating at 15 (from distance
    # 91 on); keys after the query (rel > 0) add 16.
    expected = torch.tensor([0, 17, 23, 24, 24, 25, 26, 30, 31, 31, 1, 7, 8, 9, 15])
    assert torch.equal(bias.bucket(rel), expected)


def test_real_size_on_meta_device():
    with torch.device("meta"):
        model = UMT5Encoder()
    state = model.state_dict()
    assert len(state) == 242
    assert sum(p.numel() for p in model.parameters()) == 5_680_910_336
    assert state["token_embedding.weight"].shape == (256384, 4096)
    assert state["blocks.23.pos_embedding.embedding.weight"].shape == (32, 64)
    assert state["blocks.0.ffn.gate.0.weight"].shape == (10240, 4096)
    assert state["blocks.0.ffn.fc2.weight"].shape == (4096, 10240)
    assert "pos_embedding.embedding.weight" not in state  # shared_pos=False: one table per block


def test_shared_position_bias_has_one_table():
    model = UMT5Encoder(**TINY, shared_pos=True)
    keys = set(model.state_dict())
    assert "pos_embedding.embedding.weight" in keys
    assert not any(k.startswith("blocks.0.pos_embedding") for k in keys)
    assert model(torch.tensor([[3, 4, 5]])).shape == (1, 3, 32)


def test_load_checkpoint_errors_name_the_key(tmp_path):
    state = UMT5Encoder(**TINY).state_dict()
    path = tmp_path / "enc.pth"

    torch.save({k: v for k, v in state.items() if k != "blocks.1.attn.k.weight"}, path)
    with pytest.raises(CheckpointError, match=r"missing \['blocks.1.attn.k.weight'\]"):
        load_umt5_encoder(path, config=TINY)

    torch.save({**state, "blocks.0.attn.q.bias": torch.zeros(32)}, path)
    with pytest.raises(CheckpointError, match=r"unexpected \['blocks.0.attn.q.bias'\]"):
        load_umt5_encoder(path, config=TINY)

    torch.save({**state, "norm.weight": torch.ones(31)}, path)
    with pytest.raises(CheckpointError, match=r"'norm.weight' has shape \(31,\).*\(32,\)"):
        load_umt5_encoder(path, config=TINY)

    with pytest.raises(CheckpointError, match="absent.pth"):
        load_umt5_encoder(tmp_path / "absent.pth", config=TINY)


def test_unreadable_checkpoints_are_checkpoint_errors_naming_the_file(tmp_path):
    path = tmp_path / "enc.pth"
    torch.save(UMT5Encoder(**TINY).state_dict(), path)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="enc.pth: torch.load cannot read it"):
        load_umt5_encoder(path, config=TINY)

    torch.save({"norm.weight": RunsCode()}, path)
    with pytest.raises(CheckpointError, match="enc.pth: refusing to load it: .*posix.system"):
        load_umt5_encoder(path, config=TINY)


class RunsCode:
    def __reduce__(self):
        return os.system, ("false",)


def test_load_checkpoint_is_bitwise_and_frozen(tmp_path):
    state = {k: v.to(torch.bfloat16) for k, v in UMT5Encoder(**TINY).state_dict().items()}
    torch.save(state, tmp_path / "enc.pth")
    model = load_umt5_encoder(tmp_path / "enc.pth", dtype=torch.float32, config=TINY)
    assert not model.training
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(v.float(), state[k].float()) for k, v in model.state_dict().items())


def test_clean_prompt_matches_upstream_whitespace_cleaning():
    assert clean_prompt("  pick\tup \n\n the  cube  ") == "pick up the cube"
    assert clean_prompt("salt &amp;amp; pepper") == "salt & pepper"  # html-unescaped twice
    # ftfy: curly apostrophe -> straight, "fi" ligature -> two letters
    assert clean_prompt("the robot\u2019s \ufb01nger") == "the robot's finger"


def write_tiny_checkpoint_dir(root):
    """A Wan-layout checkpoint dir holding a tiny encoder (bf16, as published) and a WordLevel
    tokenizer.json with umT5's special ids (<pad> 0, </s> 1, <unk> 2) and '$A </s>' template."""
    vocab = write_tokenizer(root / T5_TOKENIZER_DIR / "tokenizer.json", WORDS)
    torch.manual_seed(0)
    encoder = UMT5Encoder(**TINY)
    torch.save({k: v.to(torch.bfloat16) for k, v in encoder.state_dict().items()},
               root / T5_CHECKPOINT_NAME)
    return vocab


def test_text_encoder_batch_equals_per_prompt(tmp_path):
    vocab = write_tiny_checkpoint_dir(tmp_path)
    encoder = TextEncoder.from_pretrained(tmp_path, dtype=torch.float32, encoder_config=TINY)
    prompts = ["pick up the red cube", "  place it\n in the bowl &amp;amp; ", "robot\u2019s", ""]

    ids, mask = encoder.tokenizer(prompts)
    assert ids.shape == mask.shape == (4, 512) and ids.dtype == mask.dtype == torch.long
    expected_first = [vocab[w] for w in prompts[0].split()] + [1]
    assert ids[0, :6].tolist() == expected_first and ids[0, 6:].eq(0).all()
    assert ids[1, :7].tolist() == [vocab[w] for w in "place it in the bowl &".split()] + [1]
    assert ids[2, :2].tolist() == [vocab["robot's"], 1]
    assert mask.sum(dim=1).tolist() == [6, 7, 2, 1]

    batch = encoder(prompts)
    assert [tuple(e.shape) for e in batch] == [(6, 32), (7, 32), (2, 32), (1, 32)]
    for prompt, embedding in zip(prompts, batch):
        alone = encoder([prompt])[0]
        assert alone.shape == embedding.shape
        torch.testing.assert_close(embedding, alone, atol=1e-5, rtol=0)
    with torch.no_grad():
        direct = encoder.encoder(ids, mask)
    torch.testing.assert_close(batch[1], direct[1, :7], atol=0, rtol=0)


def test_text_encoder_truncates_to_text_len_keeping_eos(tmp_path):
    write_tiny_checkpoint_dir(tmp_path)
    encoder = TextEncoder.from_pretrained(tmp_path, dtype=torch.bfloat16, text_len=8,
                                          encoder_config=TINY)
    ids, mask = encoder.tokenizer(["pick up the red cube and place it in the bowl", "cube"])
    assert mask.sum(dim=1).tolist() == [8, 2]
    assert ids[0, -1].item() == 1  # </s> kept after truncation, as transformers does
    embeddings = encoder(["pick up the red cube and place it in the bowl"])
    assert embeddings[0].shape == (8, 32) and embeddings[0].dtype == torch.bfloat16


def test_tokenizer_without_eos_template_is_rejected(tmp_path):
    tokenizer = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    with pytest.raises(CheckpointError, match="post_processor does not append '</s>'"):
        UMT5Tokenizer(path)
    with pytest.raises(CheckpointError, match="nothing.json"):
        UMT5Tokenizer(tmp_path / "nothing.json")
