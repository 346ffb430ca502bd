"""WanVAE: parity with upstream Wan2.2 `WanVAE_` on the tiny golden fixtures, real-size layout,
shape checks, batching, reentrancy, bf16 and checkpoint loading."""
import json
import re

import pytest
import torch
from conftest import fixture_path
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vidartrain.errors import CheckpointError
from vidartrain.models.wan.vae import (WAN22_LATENTS_MEAN, WAN22_LATENTS_STD, WanVAE,
                                       latent_shape)

PARITY_ATOL = 3e-5
# measured on the tiny config (bf16 weights and activations vs the float32 fixtures):
# z max |err| 0.039 / 0.026 (v5 / v9, |z| up to 1.66), decoded 0.066 / 0.059 (|x| up to 1.95)
BF16_ATOL_Z = 0.1
BF16_ATOL_DECODED = 0.15


def tiny_config() -> dict:
    with safe_open(fixture_path("wan_reference", "vae_tiny_weights.safetensors"), "pt") as f:
        return json.loads(f.metadata()["config"])


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(fixture_path("wan_reference", "vae_tiny_io.safetensors"))


@pytest.fixture(scope="module")
def tiny_weights() -> dict[str, torch.Tensor]:
    return load_file(fixture_path("wan_reference", "vae_tiny_weights.safetensors"))


@pytest.fixture(scope="module")
def model(io, tiny_weights) -> WanVAE:
    vae = WanVAE(**tiny_config(), latents_mean=io["latents_mean"], latents_std=io["latents_std"])
    vae.load_state_dict(tiny_weights, strict=True)
    return vae.eval().requires_grad_(False)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("case", ["v5", "v9"])
def test_parity_with_upstream(model, io, case):
    encoder_outputs = []
    hook = model.encoder.register_forward_hook(lambda m, args, out: encoder_outputs.append(out))
    try:
        mu = model.encode(io[f"{case}.video"], normalize=False)
    finally:
        hook.remove()
    z = model.encode(io[f"{case}.video"])
    decoded = model.decode(io[f"{case}.z"], clamp=False)

    assert max_err(torch.cat(encoder_outputs, dim=2), io[f"{case}.encoder_out"]) <= PARITY_ATOL
    assert max_err(mu, io[f"{case}.mu"]) <= PARITY_ATOL
    assert max_err(z, io[f"{case}.z"]) <= PARITY_ATOL
    assert max_err(decoded, io[f"{case}.decoded"]) <= PARITY_ATOL
    assert z.dtype == torch.float32 and decoded.dtype == torch.float32


def test_decode_clamps_by_default(model, io):
    raw = model.decode(io["v5.z"], clamp=False)
    clamped = model.decode(io["v5.z"])
    assert raw.abs().max() > 1.0  # the fixture's decoder output leaves [-1, 1]
    assert torch.equal(clamped, raw.clamp(-1, 1))


def test_real_size_layout_on_meta():
    with torch.device("meta"):
        vae = WanVAE()
    state = vae.state_dict()
    assert len(state) == 196
    assert sum(p.numel() for p in vae.parameters()) == 704_688_668

    table = fixture_path("wan_reference", "real_size_keys.md").read_text()
    vae_section = table.split("## VAE")[1].split("## umT5")[0]
    rows = re.findall(r"^\| `([^`]+)` \| ([0-9x]+) \|$", vae_section, flags=re.M)
    assert len(rows) == 196
    assert [key for key, _ in rows] == list(state)
    for key, shape in rows:
        assert tuple(state[key].shape) == tuple(int(s) for s in shape.split("x")), key


def test_latent_shape_helper():
    assert latent_shape(81, 736, 640) == (48, 21, 46, 40)
    assert latent_shape(1, 16, 32) == (48, 1, 1, 2)
    with pytest.raises(ValueError, match="80 frames"):
        latent_shape(80, 736, 640)
    with pytest.raises(ValueError, match="height 730"):
        latent_shape(81, 730, 640)
    with pytest.raises(ValueError, match="width 648"):
        latent_shape(81, 736, 648)


def test_encode_output_shape_and_input_errors(model):
    video = torch.zeros(1, 3, 5, 32, 48)
    assert model.encode(video).shape == (1, 48, 2, 2, 3)
    with pytest.raises(ValueError, match="6 frames"):
        model.encode(torch.zeros(1, 3, 6, 32, 32))
    with pytest.raises(ValueError, match="height 40"):
        model.encode(torch.zeros(1, 3, 5, 40, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        model.encode(torch.zeros(1, 4, 5, 32, 32))
    with pytest.raises(TypeError, match="floating point"):
        model.encode(torch.zeros(1, 3, 5, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[B, 48, T, h, w\]"):
        model.decode(torch.zeros(1, 16, 2, 2, 2))


def test_one_frame_is_the_first_latent_frame(model, io):
    """TI2V encodes its image as a one-frame video; the encoder is causal, so that latent is frame 0
    of the whole video's."""
    z = model.encode(io["v9.video"][:, :, :1])
    assert z.shape == (1, 48, 1, 2, 2)
    assert max_err(z, io["v9.z"][:, :, :1]) <= PARITY_ATOL


def test_batch_matches_single_samples(model, io):
    first = io["v9.video"]
    second = torch.flip(first, dims=[2, 4])
    z = model.encode(torch.cat([first, second]))
    assert max_err(z[:1], io["v9.z"]) <= PARITY_ATOL
    assert max_err(z[1:], model.encode(second)) <= PARITY_ATOL
    decoded = model.decode(torch.cat([io["v9.z"], z[1:]]), clamp=False)
    assert max_err(decoded[:1], io["v9.decoded"]) <= PARITY_ATOL
    assert max_err(decoded[1:], model.decode(z[1:], clamp=False)) <= PARITY_ATOL


def test_calls_are_reentrant(model, io):
    """A call nested inside another (after its first chunk) must not disturb the outer call's
    per-chunk caches; upstream keeps them on the module and would break here."""
    nested = {}

    def encode_again(module, args, out):
        if not nested:
            nested["started"] = True
            nested["z"] = model.encode(io["v5.video"])
            nested["decoded"] = model.decode(io["v5.z"], clamp=False)

    hook = model.encoder.register_forward_hook(encode_again)
    try:
        z = model.encode(io["v9.video"])
    finally:
        hook.remove()
    assert max_err(z, io["v9.z"]) <= PARITY_ATOL
    assert max_err(nested["z"], io["v5.z"]) <= PARITY_ATOL
    assert max_err(nested["decoded"], io["v5.decoded"]) <= PARITY_ATOL


def test_bfloat16_stays_near_float32(model, io):
    bf16 = WanVAE(**tiny_config(), latents_mean=io["latents_mean"], latents_std=io["latents_std"])
    bf16.load_state_dict(model.state_dict())
    bf16 = bf16.to(torch.bfloat16).eval()
    for case in ("v5", "v9"):
        z = bf16.encode(io[f"{case}.video"])
        decoded = bf16.decode(io[f"{case}.z"], clamp=False)
        assert z.dtype == torch.float32 and decoded.dtype == torch.float32
        assert max_err(z, io[f"{case}.z"]) <= BF16_ATOL_Z
        assert max_err(decoded, io[f"{case}.decoded"]) <= BF16_ATOL_DECODED
        # bf16 really ran: the result is not bit-identical to float32
        assert max_err(z, io[f"{case}.z"]) > PARITY_ATOL


def test_default_latent_stats_are_the_published_ones(tiny_weights, io):
    vae = WanVAE(**tiny_config())
    vae.load_state_dict(tiny_weights)
    mean = torch.tensor(WAN22_LATENTS_MEAN).view(1, 48, 1, 1, 1)
    std = torch.tensor(WAN22_LATENTS_STD).view(1, 48, 1, 1, 1)
    assert mean.numel() == 48 and std.numel() == 48
    z = vae.encode(io["v5.video"])
    torch.testing.assert_close(z, (io["v5.mu"] - mean) / std, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="latents_std has 47 values"):
        WanVAE(**tiny_config(), latents_std=torch.ones(47))


def test_invalid_config_is_rejected():
    with pytest.raises(ValueError, match="attn_scales"):
        WanVAE(**{**tiny_config(), "attn_scales": [0.5]})
    with pytest.raises(ValueError, match="temperal_downsample"):
        WanVAE(**{**tiny_config(), "temperal_downsample": [True, True, True]})


def test_from_pretrained_pth(tmp_path, tiny_weights, io):
    path = tmp_path / "Wan2.2_VAE.pth"
    torch.save(tiny_weights, path)
    vae = WanVAE.from_pretrained(path, dtype=torch.float32, latents_mean=io["latents_mean"],
                                 latents_std=io["latents_std"], **tiny_config())
    assert not vae.training
    assert all(not p.requires_grad and p.device.type == "cpu" for p in vae.parameters())
    assert max_err(vae.encode(io["v9.video"]), io["v9.z"]) <= PARITY_ATOL

    bf16 = WanVAE.from_pretrained(path, dtype=torch.bfloat16, **tiny_config())
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_from_pretrained_safetensors(io):
    path = fixture_path("wan_reference", "vae_tiny_weights.safetensors")
    vae = WanVAE.from_pretrained(path, latents_mean=io["latents_mean"],
                                 latents_std=io["latents_std"], **tiny_config())
    assert max_err(vae.decode(io["v5.z"], clamp=False), io["v5.decoded"]) <= PARITY_ATOL


def test_from_pretrained_names_mismatched_keys(tmp_path, tiny_weights):
    renamed = dict(tiny_weights)
    renamed["encoder.extra.weight"] = renamed.pop("decoder.head.2.bias")
    path = tmp_path / "renamed.safetensors"
    save_file(renamed, path)
    with pytest.raises(CheckpointError) as error:
        WanVAE.from_pretrained(path, **tiny_config())
    message = str(error.value)
    assert str(path) in message
    assert "missing ['decoder.head.2.bias']" in message
    assert "unexpected ['encoder.extra.weight']" in message

    reshaped = {**tiny_weights, "conv2.weight": torch.zeros(48, 48, 1, 1, 2)}
    save_file(reshaped, path)
    with pytest.raises(CheckpointError, match=r"'conv2.weight' has shape \(48, 48, 1, 1, 2\)"):
        WanVAE.from_pretrained(path, **tiny_config())

    with pytest.raises(CheckpointError, match="absent.pth"):
        WanVAE.from_pretrained(tmp_path / "absent.pth")


def test_from_pretrained_rejects_non_state_dict(tmp_path):
    path = tmp_path / "wrapped.pth"
    torch.save({"model": {"conv1.weight": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match="expected a state dict"):
        WanVAE.from_pretrained(path, **tiny_config())
