"""LoRA adapters on the tiny WanModel (single process, float32): the adapted model starts equal to the
base, the merged weights and the Wan LoRA file reproduce the adapted forward, dropout is recomputed
identically under activation checkpointing, bad targets and settings are refused."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from data_tools.tiny_checkpoint import TINY_DIT, write_tiny_checkpoint
from vidartrain.config import LoraConfig, config_from_dict, load_config, resume_changes
from vidartrain.data.shard_index import DataInfo
from vidartrain.errors import CheckpointError, ConfigError
from vidartrain.models.wan.lora import (add_lora, load_wan_lora, merge_lora, read_wan_lora, split_lora,
                                        uniform_alphas, write_wan_lora)
from vidartrain.models.wan.model import WanModel
from vidartrain.trainers.freezing import freeze_parameters
from vidartrain.trainers.self_forcing import SelfForcingStage

# the documented key scheme (README, "LoRA"), for the default target modules
WAN_LORA_KEY = re.compile(r"diffusion_model\.blocks\.\d+\.((self_attn|cross_attn)\.[qkvo]|ffn\.[02])"
                          r"\.(lora_A\.weight|lora_B\.weight|alpha)")


def tiny_model(seed: int = 0) -> WanModel:
    torch.manual_seed(seed)
    model = WanModel(**TINY_DIT)
    torch.nn.init.normal_(model.head.head.weight, std=0.02)  # upstream's zero head would hide every change
    return model


def inputs(seed: int = 1) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 48, 2, 4, 4, generator=generator)
    t = torch.tensor([300.0, 700.0])
    context = torch.randn(2, TINY_DIT["text_len"], TINY_DIT["text_dim"], generator=generator)
    return x, t, context


def adapted(config: LoraConfig, seed: int = 0) -> WanModel:
    """The tiny model with adapters whose B is random (a trained adapter, not the zero start)."""
    model = tiny_model(seed)
    add_lora(model, config)
    generator = torch.Generator().manual_seed(seed + 7)
    for name, param in model.named_parameters():
        if name.endswith("lora_B.weight"):
            param.data.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def test_adapters_start_at_the_base_model_and_keep_its_parameter_names():
    base = tiny_model().eval()
    model = tiny_model().eval()
    names = add_lora(model, LoraConfig(rank=4, alpha=8.0))
    assert len(names) == TINY_DIT["num_layers"] * 10  # self q/k/v/o, cross q/k/v/o, ffn.0, ffn.2
    state = model.state_dict()
    assert {k for k in state if "lora" not in k} == set(base.state_dict())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.lora_{ab}.weight" for name in names for ab in "AB"}
    assert state["blocks.1.ffn.2.lora_A.weight"].shape == (4, TINY_DIT["ffn_dim"])
    assert state["blocks.1.ffn.2.lora_B.weight"].shape == (TINY_DIT["dim"], 4)
    with torch.no_grad():
        assert torch.equal(model(*inputs()), base(*inputs()))


def test_merged_weights_and_the_wan_lora_file_reproduce_the_adapted_model(tmp_path):
    config = LoraConfig(rank=4, alpha=2.0)
    model = adapted(config).eval()
    with torch.no_grad():
        expected = model(*inputs())
    base, adapters = split_lora(model.state_dict())
    alphas = uniform_alphas(adapters, config.effective_alpha)

    merged = tiny_model(seed=5).eval()  # other weights: everything must come from the merged dict
    merged.load_state_dict(merge_lora(base, adapters, alphas), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(*inputs()), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(tiny_model().eval()(*inputs()), expected, atol=1e-3)  # the adapters matter

    path = write_wan_lora(adapters, alphas, tmp_path / "vidar_lora.safetensors")
    _, file_alphas = read_wan_lora(path)
    assert set(file_alphas.values()) == {2.0}
    keys = load_file(str(path))
    assert all(WAN_LORA_KEY.fullmatch(key) for key in keys), [k for k in keys if not WAN_LORA_KEY.fullmatch(k)]
    assert len(keys) == 3 * len(adapters) and keys["diffusion_model.blocks.0.self_attn.q.alpha"].dim() == 0
    fresh = tiny_model().eval()
    load_wan_lora(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(*inputs()), expected)


def test_dropout_is_recomputed_identically_under_activation_checkpointing():
    grads = {}
    for mode in ("none", "full"):
        model = adapted(LoraConfig(rank=4, dropout=0.5)).train()
        model.set_checkpointing(mode)
        torch.manual_seed(3)
        model(*inputs()).square().mean().backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(torch.allclose(grads["full"][n], grads["none"][n], atol=1e-6) for n in grads["none"])
    assert any(g.abs().sum() > 0 for n, g in grads["none"].items() if "lora_A" in n)


def test_bad_targets_and_settings_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"\['blocks.\*.attn.q'\] match no module"):
        add_lora(tiny_model(), LoraConfig(rank=2, target_modules=["blocks.*.attn.q", "blocks.*.ffn.0"]))
    with pytest.raises(ConfigError, match=r"not linear layers: blocks.0.self_attn.norm_q \(WanRMSNorm\)"):
        add_lora(tiny_model(), LoraConfig(rank=2, target_modules=["blocks.*.self_attn.norm_q"]))
    config = tmp_path / "c.yaml"
    config.write_text("lora: {rank: 4, dropout: 1.0, alpha: 0}\n")
    with pytest.raises(ConfigError, match=r"`lora.alpha` = 0.0: must be > 0[\s\S]*`lora.dropout` = 1.0"):
        load_config(config)
    config.write_text("lora: {rank: 4}\nloss: {type: idm}\n")
    with pytest.raises(ConfigError, match="the IDM stage trains the IDM in full"):
        load_config(config)
    save_file({"blocks.0.self_attn.q.lora_A.weight": torch.zeros(2, 64)}, str(tmp_path / "stray.safetensors"))
    with pytest.raises(CheckpointError, match="keys outside the Wan LoRA convention"):
        read_wan_lora(tmp_path / "stray.safetensors")


def test_a_resume_may_change_the_dropout_but_not_the_adapters():
    saved = load_config("configs/debug/tiny_vidar.yaml", ["lora.rank=4"]).to_dict()
    changed = load_config("configs/debug/tiny_vidar.yaml", ["lora.rank=8", "lora.alpha=4", "lora.dropout=0.1"])
    applied, refused = resume_changes(json.loads(json.dumps(saved)), changed)
    assert applied == ["lora.dropout: 0.0 -> 0.1"]
    assert refused == ["lora.rank: 4 -> 8", "lora.alpha: null -> 4.0"]


@pytest.mark.parametrize("context_mode", ["ground_truth", "self_generated"])
def test_stage2_trains_only_the_adapters_also_through_the_kv_cache_rollout(tmp_path, context_mode):
    config = config_from_dict({
        "model": {"ckpt_dir": str(write_tiny_checkpoint(tmp_path / "ckpt")), "model_class": "WanModelCausal"},
        "training": {"num_steps": 10, "warmup": 0},
        "loss": {"type": "causal_flow_matching", "embodiment_aware": True, "eta": 3.0},
        "self_forcing": {"causal": True, "chunk_size": 4, "kv_cache_length": 8, "context_mode": context_mode,
                         "denoising_steps": 2},
        "data": {"shards": "unused", "num_frames": 21, "height": 64, "width": 64}, "lora": {"rank": 4}})
    stage = SelfForcingStage(config, DataInfo(mode="latents", text_embeddings=True, actions=(), idm_masks=True))  # the batch holds all
    model = stage.build_model().float()
    add_lora(model, config.lora)
    generator = torch.Generator().manual_seed(3)
    batch = {"__key__": ["a"], "latents": torch.randn(1, 48, 6, 4, 4, generator=generator),
             "text_emb": [torch.randn(5, TINY_DIT["text_dim"], generator=generator)],
             "idm_mask": torch.rand(1, 6, 4, 4, generator=generator)}
    loss, _ = stage.training_loss(model, batch, torch.Generator().manual_seed(0))
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(grads[name] is None for name in grads if "lora" not in name)
    # B starts at zero: A's gradient (B^T times the output's gradient) is zero at the first step, B's is not
    assert all(grads[name].abs().sum() > 0 for name in grads if "lora_B" in name)


def test_training_freeze_may_name_adapters_but_not_all_of_them():
    model = tiny_model()
    add_lora(model, LoraConfig(rank=2))
    frozen = freeze_parameters(model, ["blocks.0.*"])
    assert {name for name in frozen if "lora" in name} == {
        f"blocks.0.{layer}.lora_{ab}.weight" for layer in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                                                            "cross_attn.q", "cross_attn.k", "cross_attn.v",
                                                            "cross_attn.o", "ffn.0", "ffn.2") for ab in "AB"}
    with pytest.raises(ConfigError, match="freezes every trained parameter of the WanModel"):
        freeze_parameters(model, ["blocks.*"])


def test_adapters_on_float32_layers_of_a_bf16_model():
    model = adapted(LoraConfig(rank=2, target_modules=["time_embedding.0", "head.head"])).to(torch.bfloat16).eval()
    base = tiny_model().to(torch.bfloat16).eval()
    with torch.no_grad():
        out, reference = model(*inputs()), base(*inputs())
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and not torch.equal(out, reference)


def one_adapter_file(path, rank_a: int, rank_b: int):
    linear = tiny_model().blocks[0].self_attn.q
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.randn(rank_a, linear.in_features),
               "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.randn(linear.out_features, rank_b),
               "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(4.0)}, str(path))
    return path


def test_an_adapter_whose_b_has_another_rank_than_a_is_refused(tmp_path):
    # a [out, 1] lora_B would broadcast over lora_A's 4 rows when copied into the attached adapter
    path = one_adapter_file(tmp_path / "unpaired.safetensors", rank_a=4, rank_b=1)
    model = tiny_model()
    with pytest.raises(CheckpointError, match=r"same rank; not so for \['blocks.0.self_attn.q \(lora_A \[4, 64\], "
                                              r"lora_B \[64, 1\]\)'\]"):
        load_wan_lora(model, path)
    assert not hasattr(model.blocks[0].self_attn.q, "lora_A")


def test_loading_adapters_onto_a_layer_that_has_one_is_refused_and_changes_nothing(tmp_path):
    # a second hook on the layer would add both adapters' updates (the same file twice: twice the update)
    path = one_adapter_file(tmp_path / "q.safetensors", rank_a=4, rank_b=4)
    model = tiny_model().eval()
    load_wan_lora(model, path)
    with torch.no_grad():
        expected = model(*inputs())
    with pytest.raises(CheckpointError, match="blocks.0.self_attn.q of the WanModel already has a LoRA adapter"):
        load_wan_lora(model, path)
    with torch.no_grad():
        assert torch.equal(model(*inputs()), expected)
