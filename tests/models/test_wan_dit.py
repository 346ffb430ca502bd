"""WanModel (Wan2.2 TI2V-5B DiT): parity with the upstream golden outputs, batching, bf16,
activation checkpointing, real-size facts on the meta device."""
import json
import re

import pytest
import torch
from conftest import fixture_path
from safetensors import safe_open
from safetensors.torch import load_file

from vidartrain.models.wan import model as wan_model
from vidartrain.models.wan.checkpoint import write_checkpoint_dir
from vidartrain.models.wan.model import (CHECKPOINTING_MODES, WanModel, group_timesteps, num_tokens,
                                         recompute_in_backward, rope_axis_dims)

ATOL = 1e-5
BF16_TOLERANCE = 0.02  # max |bf16 - f32| / max |f32|; measured 2.6e-3 (autocast), 3.3e-3 (bf16 weights)


def tiny_config() -> dict:
    with safe_open(fixture_path("wan_reference", "dit_tiny_weights.safetensors"), "pt") as f:
        return json.loads(f.metadata()["config"])


def write_published_layout(directory, config: dict, state: dict) -> None:
    """config.json (with diffusers bookkeeping keys) + 2 shards + index, as published."""
    write_checkpoint_dir(state, {"_class_name": "WanModel", "_diffusers_version": "0.33.1", **config},
                         directory, num_shards=2)


@pytest.fixture(scope="module")
def io():
    return load_file(fixture_path("wan_reference", "dit_tiny_io.safetensors"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    state = load_file(fixture_path("wan_reference", "dit_tiny_weights.safetensors"))
    directory = tmp_path_factory.mktemp("dit_tiny")
    write_published_layout(directory, tiny_config(), state)
    model = WanModel.from_pretrained(directory, dtype=torch.float32, device="cpu")
    return model.eval().requires_grad_(False)


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_call_a_list_input_per_token_t_matches_upstream(model, io):
    out = model([io["x.0"], io["x.1"]], io["A.t"], [io["context.0"], io["context.1"]], seq_len=18)
    assert [o.shape for o in out] == [io["A.out.0"].shape, io["A.out.1"].shape]
    errors = [max_error(out[i], io[f"A.out.{i}"]) for i in range(2)]
    assert max(errors) <= ATOL, errors  # observed 3.6e-7, 4.8e-7


def test_call_a_intermediates_match_upstream(model, io):
    captured = {}

    def keep(name):
        def hook(module, inputs, output):
            captured.setdefault(name, []).append(output[0] if isinstance(output, tuple) else output)
        return hook

    names = ["patch_embedding", "text_embedding", "time_embedding", "time_projection",
             "blocks.0", "blocks.1", "head"]
    handles = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    try:
        model([io["x.0"], io["x.1"]], io["A.t"], [io["context.0"], io["context.1"]], seq_len=18)
    finally:
        for h in handles:
            h.remove()
    for i in range(2):
        assert max_error(captured["patch_embedding"][i], io[f"A.inter.patch_embedding.{i}"]) <= ATOL
    assert max_error(captured["text_embedding"][0], io["A.inter.text_embedding"]) <= ATOL
    # Modulation is computed once per latent frame (6 tokens here); expand to tokens to compare.
    per_token = {name: captured[name][0].repeat_interleave(6, dim=1)
                 for name in ["time_embedding", "time_projection"]}
    per_token.update({name: captured[name][0] for name in ["blocks.0", "blocks.1", "head"]})
    for name, ours in per_token.items():
        reference = io[f"A.inter.{name}"]
        assert ours.shape == reference.shape, name
        # Sample 1 has 12 tokens; rows 12..17 are padding that upstream computes and discards.
        error = max(max_error(ours[0], reference[0]), max_error(ours[1, :12], reference[1, :12]))
        assert error <= ATOL, (name, error)


def test_call_b_one_timestep_per_sample_matches_upstream(model, io):
    for b in range(2):
        upstream_style = model([io[f"x.{b}"]], io["B.t"][b:b + 1], [io[f"context.{b}"]], seq_len=18)[0]
        batched = model(io[f"x.{b}"][None], io["B.t"][b:b + 1], io[f"context.{b}"][None])[0]
        assert max_error(upstream_style, io[f"B.out.{b}"]) <= ATOL
        assert max_error(batched, io[f"B.out.{b}"]) <= ATOL


def test_batch_of_two_with_per_sample_t_equals_two_single_calls(model, io):
    x = torch.stack([io["x.0"], torch.randn_like(io["x.0"])])
    context = [io["context.0"], io["context.1"]]
    t = io["B.t"]
    together = model(x, t, context)
    assert together.shape == (2, 48, 3, 4, 6)
    for b in range(2):
        alone = model(x[b:b + 1], t[b:b + 1], [context[b]])
        assert max_error(together[b], alone[0]) <= ATOL


def test_timestep_shapes_give_the_same_velocity(model, io):
    x = io["x.0"][None]
    per_frame = torch.tensor([[0.0, 700.0, 700.0]])
    per_token = per_frame.repeat_interleave(6, dim=1)
    padded_context = torch.cat([io["context.0"], torch.zeros(16 - 7, 32)])[None]
    a = model(x, per_frame, [io["context.0"]])
    b = model(x, per_token, padded_context)
    assert max_error(a, b) <= ATOL
    assert max_error(a[0], io["A.out.0"]) <= ATOL


def test_group_timesteps_detects_per_frame_and_keeps_per_token():
    grid = (2, 1, 3)
    assert group_timesteps(torch.tensor([5.0, 6.0]), 2, grid).tolist() == [[5.0], [6.0]]
    constant = torch.tensor([[0.0] * 3 + [9.0] * 3])
    assert group_timesteps(constant, 1, grid).tolist() == [[0.0, 9.0]]
    varying = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    assert group_timesteps(varying, 1, grid).shape == (1, 6)
    with pytest.raises(ValueError, match=r"t must be \[B\]"):
        group_timesteps(torch.zeros(1, 5), 1, grid)


def test_token_wise_modulation_equals_frame_wise(model, io):
    """Force one modulation group per token (what a t varying inside a frame gets) with the
    frame-constant timesteps of call A: same numbers as the per-frame path and as upstream."""
    x = io["x.0"][None]
    tokens, grid = model.embed_video(x)
    e, e0 = model.embed_time(io["A.t"][:1])
    assert e0.shape == (1, 18, 6, 96)
    hidden, _ = model.run_blocks(tokens, e0, model.embed_text([io["context.0"]]), model.rope(grid))
    out = model.unpatchify(model.head(hidden, e), grid)
    assert max_error(out[0], io["A.out.0"]) <= ATOL


def test_timestep_varying_inside_a_frame_changes_only_through_its_token(model, io):
    x = io["x.0"][None]
    t = torch.full((1, 18), 700.0)
    t[0, :6] = 0.0
    reference = model(x, t, [io["context.0"]])
    t[0, 7] = 3.0
    changed = model(x, t, [io["context.0"]])
    assert max_error(changed, reference) > 1e-4


def test_bf16_forward_within_documented_tolerance(model, io):
    x = torch.stack([io["x.0"], io["x.0"].flip(2)])
    t = torch.tensor([[0.0, 700.0, 700.0], [0.0, 300.0, 300.0]])
    context = [io["context.0"], io["context.1"]]
    reference = model(x, t, context)
    scale = reference.abs().max().item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = model(x, t, context)
    bf16_model = WanModel(**tiny_config()).to(torch.bfloat16)
    bf16_model.load_state_dict(model.state_dict())
    bf16_params = bf16_model.eval()(x, t, context)
    for out in (autocast, bf16_params):
        assert out.dtype == torch.float32 and out.shape == x.shape
        relative = max_error(out, reference) / scale
        assert relative <= BF16_TOLERANCE, relative


def test_gradient_checkpointing_gives_the_same_gradients(io):
    torch.manual_seed(0)
    model = WanModel(**tiny_config())
    model.load_state_dict(load_file(fixture_path("wan_reference", "dit_tiny_weights.safetensors")))
    x = torch.stack([io["x.0"], io["x.0"].roll(1, 3)])
    t = torch.tensor([[0.0, 500.0, 500.0], [0.0, 900.0, 900.0]])
    target = torch.randn_like(x)

    def gradients(checkpointing: str) -> dict:
        model.zero_grad()
        model.set_checkpointing(checkpointing)
        loss = (model(x, t, [io["context.0"], io["context.1"]]) - target).pow(2).mean()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, loss.item()

    plain, loss_plain = gradients("none")
    assert len(plain) == 69 and all(g.abs().sum() > 0 for g in plain.values())
    for mode in ("selective", "full"):
        checkpointed, loss_checkpointed = gradients(mode)
        assert loss_plain == loss_checkpointed, mode
        for name in plain:
            torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=f"{mode} {name}")


def test_recompute_in_backward_gradients_match_autograd():
    def fn(a, b, c):
        return torch.nn.functional.layer_norm(a, a.shape[-1:]) * (1 + b) + c.sin()

    inputs = [torch.randn(3, 5, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(lambda *xs: recompute_in_backward(fn, *xs), inputs)
    partial = [inputs[0], inputs[1].detach(), inputs[2]]
    out = recompute_in_backward(fn, *partial)
    grads = torch.autograd.grad(out.sum(), [inputs[0], inputs[2]])
    expected = torch.autograd.grad(fn(*partial).sum(), [inputs[0], inputs[2]])
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


@pytest.fixture(scope="module")
def fake_flash_attn_forward():
    """An operator named as flash-attn's forward (the package is for CUDA only), counting its calls."""
    if hasattr(torch.ops.flash_attn, "_flash_attn_forward"):
        pytest.skip("flash-attn's operator is registered here (the package is installed)")
    calls = []

    @torch.library.custom_op(wan_model.FLASH_ATTN_FORWARD, mutates_args=())
    def forward(q: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return q * 2

    forward.register_autograd(lambda ctx, grad: grad * 2)
    return forward, calls


def test_selective_checkpointing_keeps_the_flash_attn_kernels_output(monkeypatch, fake_flash_attn_forward):
    """Where flash-attn is installed it is the attention kernel on CUDA, and the policy kept only SDPA's:
    every backward of a selectively checkpointed block ran flash attention a second time."""
    forward, calls = fake_flash_attn_forward
    monkeypatch.setattr(wan_model, "flash_attn_func", lambda q, k, v: forward(q))
    q = torch.randn(4, requires_grad=True)
    out = torch.utils.checkpoint.checkpoint(lambda x: forward(x).sin(), q, use_reentrant=False,
                                            context_fn=wan_model._selective_checkpoint_context)
    out.sum().backward()
    assert len(calls) == 1  # the forward's, none in backward
    torch.testing.assert_close(q.grad, 2 * (2 * q).detach().cos())


def test_unknown_checkpointing_mode_is_refused():
    with pytest.raises(ValueError, match=r"checkpointing must be one of \('none', 'selective', 'full'\)"):
        WanModel(**tiny_config()).set_checkpointing("partial")
    assert CHECKPOINTING_MODES == ("none", "selective", "full")


def test_real_size_parameters_on_meta_device():
    with torch.device("meta"):
        model = WanModel()
    state = model.state_dict()
    assert len(state) == 825
    assert sum(p.numel() for p in model.parameters()) == 4_999_787_712
    table = fixture_path("wan_reference", "real_size_keys.md").read_text()
    dit_section = table.split("## DiT")[1].split("## VAE")[0]
    listed = dict(re.findall(r"\| `([\w.]+)` \| ([\dx]+) \|", dit_section))
    assert len(listed) == 42  # keys outside the blocks + block 0 (repeated for 30 blocks)
    for key, shape in listed.items():
        assert list(state[key].shape) == [int(s) for s in shape.split("x")], key


def test_geometry_of_an_81_frame_736x640_sample():
    assert num_tokens(81, 736, 640) == 21 * 23 * 20 == 9660
    assert rope_axis_dims(128) == (44, 42, 42)
    with pytest.raises(ValueError, match="4k\\+1"):
        num_tokens(80, 736, 640)
    with pytest.raises(ValueError, match="multiples of 32"):
        num_tokens(81, 720, 640)


def test_bad_inputs_are_refused(model, io):
    with pytest.raises(ValueError, match=r"x must be \[B, 48, F, H, W\]"):
        model(torch.zeros(1, 16, 1, 4, 6), torch.zeros(1), [io["context.0"]])
    with pytest.raises(ValueError, match=r"context\[0\] must be \[L <= 16, 32\]"):
        model(io["x.0"][None], torch.zeros(1), [torch.zeros(17, 32)])


def test_text_for_another_batch_size_is_refused(model, io):
    # One prompt for two samples broadcast silently through cross-attention (both samples got
    # sample 0's text); two prompts for one sample failed deep inside a block.
    x = torch.stack([io["x.0"], io["x.0"]])
    with pytest.raises(ValueError, match="text of 1 prompts for a batch of 2 samples"):
        model(x, torch.zeros(2), [io["context.0"]])
    with pytest.raises(ValueError, match="text of 2 prompts for a batch of 1 samples"):
        model(x[:1], torch.zeros(1), [io["context.0"], io["context.1"]])
    with pytest.raises(ValueError, match="text of 1 prompts for a batch of 2 samples"):
        model([io["x.0"], io["x.1"]], torch.zeros(2), [io["context.0"]])


@pytest.mark.parametrize("shape", [(48, 3, 5, 6), (48, 3, 4, 7)])
def test_latents_the_patch_does_not_tile_are_refused(model, io, shape):
    # A 720-pixel-high video encodes to 45 latent rows: the 2x2 patch embedding would drop the
    # last row and return a velocity one row short of the latents.
    with pytest.raises(ValueError, match=r"latent grid \[3, \d, \d\] .* multiple of the patch size \[1, 2, 2\]"):
        model(torch.zeros(1, *shape), torch.zeros(1), [io["context.0"]])
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model([torch.zeros(shape)], torch.zeros(1), [io["context.0"]])


def test_block_memory_benchmark_counts_about_40_dim_plus_2_ffn_bytes_per_token():
    """Per token a block keeps 3 float32 residuals (12 dim bytes), 14 bf16 [dim] activations
    (28) and the bf16 FFN input of ffn.2 (2 ffn_dim): 40 dim + 2 ffn_dim bytes, plus RoPE
    tables and softmax statistics (upstream's block keeps over twice that)."""
    from benchmarks.block_memory import measure_block_memory
    dim, ffn_dim = 256, 1195
    result = measure_block_memory(dim=dim, ffn_dim=ffn_dim, num_heads=2, grid_hw=(23, 20), text_len=16)
    per_token_bytes = result["mib_per_token"] * 2**20
    assert 40 * dim + 2 * ffn_dim <= per_token_bytes <= 1.1 * (40 * dim + 2 * ffn_dim)
    # selective checkpointing: the float32 input (4 dim), the bf16 outputs of q, k, v, o, cross q,
    # cross o, ffn.2 and both attentions (18 dim) and of ffn.0 (2 ffn_dim), plus softmax statistics
    selective_bytes = result["selective_mib_per_token"] * 2**20
    assert 22 * dim + 2 * ffn_dim <= selective_bytes <= 1.05 * (22 * dim + 2 * ffn_dim)
    assert result["tokens"] == {1: 460, 2: 920} and result["sample_tokens"] == 9660


def test_variants_without_qk_norm_and_cross_attn_norm_train_with_checkpointing():
    config = {**tiny_config(), "qk_norm": False, "cross_attn_norm": False, "num_layers": 1}
    torch.manual_seed(0)
    model = WanModel(**config)
    assert not any("norm_q" in n or "norm3" in n for n, _ in model.named_parameters())
    x, t, context = torch.randn(2, 48, 2, 4, 6), torch.tensor([100.0, 900.0]), torch.randn(2, 5, 32)

    def gradients(checkpointing: str) -> dict:
        model.zero_grad()
        model.set_checkpointing(checkpointing)
        model(x, t, context).pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = gradients("none")
    for mode in ("selective", "full"):
        checkpointed = gradients(mode)
        for name in plain:
            torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=f"{mode} {name}")


def test_list_of_samples_with_different_frame_sizes_equals_separate_calls(model, io):
    xs = [io["x.0"][:, :1], torch.randn(48, 2, 8, 6)]
    t = torch.tensor([250.0, 650.0])
    context = [io["context.0"], io["context.1"]]
    together = model(xs, t, context)
    for b in range(2):
        alone = model(xs[b][None], t[b:b + 1], [context[b]])[0]
        assert together[b].shape == xs[b].shape
        assert max_error(together[b], alone) <= ATOL
