"""IDM parity with the upstream golden fixtures, any-size forward, preprocessing, masks, checkpoints."""
import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import fixture_path
from helpers.idm_reference_weights import reference_state_dict, state_dict_sha256, tensor_sha256
from safetensors import safe_open
from safetensors.torch import load_file
from helpers.trainer_launch import tiny_idm

from vidartrain.errors import CheckpointError
from vidartrain.losses import idm_loss
from vidartrain.models.idm import (IDM_INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD, IDM, IdmArchitecture, idm_input_size,
                                   load_idm, preprocess_frames, save_idm)


@pytest.fixture(scope="module")
def reference():
    """(state dict rebuilt from keys.json, parsed keys.json)."""
    return reference_state_dict(fixture_path("idm_reference", "keys.json"))


def build_idm(state_dict: dict) -> IDM:
    """IDM holding a private copy of `state_dict` (train-mode forwards update BN buffers)."""
    with torch.device("meta"):
        model = IDM()
    model.load_state_dict({k: v.clone() for k, v in state_dict.items()}, strict=True, assign=True)
    return model


@pytest.fixture(scope="module")
def eval_idm(reference):
    return build_idm(reference[0]).eval()


def fixture_images(batch: int, height: int, width: int) -> torch.Tensor:
    """image[b, c, h, w] = sin(((0.05 h + 0.07 w) + 0.9 c) + 1.7 b), float64 then float32."""
    b, c, h, w = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in
                                  (batch, 3, height, width)), indexing="ij")
    return torch.sin(((0.05 * h + 0.07 * w) + 0.9 * c) + 1.7 * b).float()


def capture_intermediates(model: IDM) -> tuple[dict, list]:
    """Forward hooks recording the U-Net bottleneck, the U-Net logits, the ResNet's pooled
    features and its output before de-normalisation (the fixture's intermediates)."""
    captured = {}
    net = model.model
    handles = [
        net.mask_model.downs[4].register_forward_hook(
            lambda m, i, o: captured.__setitem__("unet_bottleneck", o.clone())),
        net.mask_model.out.register_forward_hook(
            lambda m, i, o: captured.__setitem__("unet_logits", o.clone())),
        net.resnet_model.fc.register_forward_pre_hook(
            lambda m, i: captured.__setitem__("resnet_pooled", i[0].clone())),
        net.resnet_model.register_forward_hook(
            lambda m, i, o: captured.__setitem__("raw_output", o.clone())),
    ]
    return captured, handles


def test_reference_weights_reproduce_keys_json(reference):
    state_dict, layout = reference
    mismatched = [e["key"] for e in layout["entries"] if tensor_sha256(state_dict[e["key"]]) != e["sha256"]]
    assert mismatched == []
    assert state_dict_sha256(state_dict) == layout["sha256_all"]


def test_state_dict_layout_and_parameter_count(reference):
    _, layout = reference
    with torch.device("meta"):
        model = IDM()
    state_dict = model.state_dict()
    assert len(state_dict) == layout["num_entries"] == 456
    for entry in layout["entries"]:
        tensor = state_dict[entry["key"]]
        assert list(tensor.shape) == entry["shape"], entry["key"]
        assert str(tensor.dtype) == f"torch.{entry['dtype']}", entry["key"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == layout["trainable_parameters"] == 92_713_423
    assert sum(p.numel() for p in model.model.mask_model.parameters()) == 69_176_705
    assert sum(p.numel() for p in model.model.resnet_model.parameters()) == 23_536_718
    assert sum(v.numel() for v in state_dict.values()) == layout["state_dict_numel_total"]


def test_eval_forward_matches_reference_at_two_sizes_on_one_model(eval_idm):
    io = load_file(fixture_path("idm_reference", "io.safetensors"))
    torch.testing.assert_close(fixture_images(2, 64, 96), io["images"], rtol=0, atol=0)
    torch.testing.assert_close(eval_idm.train_mean, io["train_mean"], rtol=0, atol=0)
    captured, handles = capture_intermediates(eval_idm)
    try:
        with torch.no_grad():
            actions, mask = eval_idm(io["images"], return_mask=True)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        # The same model, right after, at an odd size: upsampling follows each skip's size.
        odd_actions, odd_mask = eval_idm(io["odd_images"], return_mask=True)
    for name, value in [("actions", actions), ("mask", mask), ("raw_output", captured["raw_output"]),
                        ("odd_actions", odd_actions), ("odd_mask", odd_mask),
                        ("odd_raw_output", (odd_actions - io["train_mean"]) / io["train_std"])]:
        torch.testing.assert_close(value, io[name], rtol=0, atol=1e-5, msg=name)
    torch.testing.assert_close(captured["unet_bottleneck"], io["unet_bottleneck"], rtol=0, atol=1e-5)
    torch.testing.assert_close(captured["unet_logits"], io["unet_logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(captured["resnet_pooled"], io["resnet_pooled"], rtol=0, atol=2e-5)
    # The hard mask is a real threshold: about two thirds of the pixels are kept.
    assert 0.6 < (mask >= 0.5).float().mean() < 0.75


def test_eval_forward_matches_reference_at_518(eval_idm):
    path = fixture_path("idm_reference", "io_518.safetensors")
    reference = load_file(path)
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["fixture"])
    images = fixture_images(1, 518, 518)
    assert hashlib.sha256(images.numpy().tobytes()).hexdigest() == meta["images_sha256"]
    torch.testing.assert_close(images[:, :, :8, :8], reference["images_corner"], rtol=0, atol=0)
    captured, handles = capture_intermediates(eval_idm)
    try:
        with torch.no_grad():
            actions, mask = eval_idm(images, return_mask=True)
    finally:
        for handle in handles:
            handle.remove()
    raw = captured["raw_output"]
    # Pixels within ~1e-6 of the 0.5 threshold may flip, which moves the actions by <= 7e-4.
    torch.testing.assert_close(actions, reference["actions"], rtol=0, atol=1e-3)
    torch.testing.assert_close(raw, reference["raw_output"], rtol=0, atol=1e-3)
    torch.testing.assert_close(F.avg_pool2d(mask, 4), reference["mask_avgpool4"], rtol=0, atol=1e-5)
    torch.testing.assert_close(F.avg_pool2d(captured["unet_logits"], 4),
                               reference["unet_logits_avgpool4"], rtol=0, atol=1e-5)


def test_train_mode_loss_gradients_and_batchnorm_buffers(reference):
    losses = load_file(fixture_path("idm_reference", "train_loss.safetensors"))
    images = load_file(fixture_path("idm_reference", "io.safetensors"))["images"]
    target = losses["target_actions"]
    grad_keys = ["model.mask_model.out.weight", "model.mask_model.out.bias",
                 "model.mask_model.in_conv.0.weight", "model.resnet_model.fc.bias"]

    model = build_idm(reference[0]).train()
    actions, mask = model(images, return_mask=True)
    loss, action_loss, mask_loss = idm_loss(actions, target, mask, model.train_mean, model.train_std,
                                            mask_weight=3e-3)
    loss.backward()
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    torch.testing.assert_close(actions, losses["train_actions"], rtol=0, atol=1e-4)
    torch.testing.assert_close(mask.mean().reshape(1), losses["train_mask_mean"], rtol=0, atol=1e-6)
    torch.testing.assert_close((actions - model.train_mean) / model.train_std,
                               losses["normalized_pred"], rtol=0, atol=1e-4)
    torch.testing.assert_close((target - model.train_mean) / model.train_std,
                               losses["normalized_target"], rtol=0, atol=1e-6)
    for name, value in [("loss", loss), ("action_loss", action_loss), ("mask_loss", mask_loss)]:
        torch.testing.assert_close(value.reshape(1), losses[name], rtol=0, atol=1e-5, msg=name)
    for key in grad_keys:
        expected = losses[f"grad.{key}"]
        scale = 1e-5 if key.endswith("fc.bias") else 2e-2 * expected.abs().max().item()
        torch.testing.assert_close(params[key].grad, expected, rtol=0, atol=scale, msg=key)
    prefix = "after_step.model.mask_model.in_conv.1."
    for leaf in ["running_mean", "running_var", "num_batches_tracked"]:
        torch.testing.assert_close(buffers[f"model.mask_model.in_conv.1.{leaf}"], losses[prefix + leaf],
                                   rtol=0, atol=1e-6, msg=leaf)

    # The same loss with BatchNorm on its running statistics (the gradients are well conditioned).
    model = build_idm(reference[0]).eval()
    actions, mask = model(images, return_mask=True)
    loss, action_loss, mask_loss = idm_loss(actions, target, mask, model.train_mean, model.train_std)
    loss.backward()
    params = dict(model.named_parameters())
    torch.testing.assert_close(action_loss.reshape(1), losses["eval_action_loss"], rtol=0, atol=1e-5)
    torch.testing.assert_close(mask.mean().reshape(1), losses["eval_mask_mean"], rtol=0, atol=1e-6)
    for name, value in [("loss", loss), ("action_loss", action_loss), ("mask_loss", mask_loss)]:
        torch.testing.assert_close(value.reshape(1), losses[f"bn_eval.{name}"], rtol=0, atol=1e-5,
                                   msg=name)
    for key in grad_keys:
        expected = losses[f"bn_eval.grad.{key}"]
        torch.testing.assert_close(params[key].grad, expected, rtol=0,
                                   atol=1e-3 * expected.abs().max().item(), msg=key)


def test_the_published_architecture_is_read_back_from_its_weights(eval_idm):
    assert IdmArchitecture.of_state_dict(eval_idm.state_dict()) == IdmArchitecture()


def test_save_and_load_round_trip_in_upstream_format(tmp_path):
    # the tiny IDM: the format is the same at every width, and the published one is 355 MB per file
    torch.manual_seed(0)
    eval_idm = tiny_idm().eval()
    images = fixture_images(1, 40, 56)
    optimizer = torch.optim.AdamW([eval_idm.model.resnet_model.fc.bias], lr=3e-4)
    path = tmp_path / "export" / "idm.pt"
    save_idm(eval_idm, path, optimizer, step=7)
    assert sorted(p.name for p in path.parent.iterdir()) == ["idm.pt"]  # no temporary file left
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert sorted(checkpoint) == ["model_state_dict", "optimizer_state_dict", "step"]
    assert checkpoint["step"] == 7
    assert checkpoint["optimizer_state_dict"]["param_groups"][0]["lr"] == 3e-4
    loaded = load_idm(path)
    assert not loaded.training
    with torch.no_grad():
        expected_actions, expected_mask = eval_idm(images, return_mask=True)
        actions, mask = loaded(images, return_mask=True)
    torch.testing.assert_close(actions, expected_actions, rtol=0, atol=0)
    torch.testing.assert_close(mask, expected_mask, rtol=0, atol=0)

    # A bare state dict loads too, here straight into bfloat16 (BN step counters stay int64).
    bare = tmp_path / "bare.pt"
    torch.save(checkpoint["model_state_dict"], bare)
    half = load_idm(bare, dtype=torch.bfloat16)
    assert half.model.mask_model.out.weight.dtype == torch.bfloat16
    assert half.model.mask_model.in_conv[1].num_batches_tracked.dtype == torch.int64
    # the action statistics stay float32, so the de-normalised actions are float32 and not rounded to bf16
    assert half.train_mean.dtype == half.train_std.dtype == torch.float32
    torch.testing.assert_close(half.train_std, eval_idm.train_std, rtol=0, atol=0)
    with torch.no_grad():
        actions = half(images.bfloat16())
        normalized, _ = half.model(images.bfloat16())
    assert actions.dtype == torch.float32
    torch.testing.assert_close(actions, normalized.float() * eval_idm.train_std + eval_idm.train_mean, rtol=0, atol=0)


def test_load_idm_names_offending_keys(tmp_path):
    path = tmp_path / "broken.pt"
    torch.save({"model_state_dict": {"train_mean": torch.zeros(14), "train_std": torch.ones(14),
                                     "model.resnet_model.fc.bias": torch.zeros(5),
                                     "model.head.weight": torch.zeros(3)}, "step": 1}, path)
    with pytest.raises(CheckpointError) as error:
        load_idm(path)
    message = str(error.value)
    assert str(path) in message
    assert "model.mask_model.downs.0.1.0.weight" in message  # missing (sorted first)
    assert "model.head.weight" in message  # unexpected
    assert "model.resnet_model.fc.bias: (5,) (expected (14,))" in message  # mis-shaped

    torch.save({"model_state_dict": {"train_mean": [0.0] * 14}}, path)
    with pytest.raises(CheckpointError, match="not tensors: \\['train_mean'\\]"):
        load_idm(path)

    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="broken.pt: torch.load cannot read it .*PytorchStreamReader"):
        load_idm(path)


@pytest.mark.parametrize("content", [b"", b"\x00\x00\x00\x18ftypisom", b"hello", b"PK\x03\x04 not a torch zip", "tensor"])
def test_load_idm_refuses_a_file_that_is_no_idm_checkpoint(tmp_path, content):
    path = tmp_path / "idm.pt"
    if content == "tensor":
        torch.save(torch.zeros(3), path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"^{path}: (torch.load cannot read it|expected an IDM state dict)"):
        load_idm(path)


def test_input_size_is_the_published_one_unless_frames_are_smaller():
    assert idm_input_size(736, 640) == IDM_INPUT_SIZE == (518, 518)
    assert idm_input_size(480, 640) == IDM_INPUT_SIZE
    assert idm_input_size(64, 96) == (64, 96)


def test_preprocess_frames_maps_range_resizes_with_antialias_and_normalises():
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    # A constant frame: [-1, 1] -> [0, 1] (clamped beyond), then (x - mean) / std per channel.
    levels = torch.tensor([-3.0, 0.5, 1.0]).view(1, 3, 1, 1)
    out = preprocess_frames(levels.expand(2, 3, 720, 640).clone())
    assert out.shape == (2, 3, 518, 518) and out.dtype == torch.float32
    expected = (torch.tensor([0.0, 0.75, 1.0]).view(1, 3, 1, 1) - mean) / std
    torch.testing.assert_close(out, expected.expand_as(out), rtol=0, atol=2e-6)

    # Width 1036 -> 518 (factor 2) with a bright column every 4 pixels. The antialiased bilinear
    # kernel has taps (1/8, 3/8, 3/8, 1/8) on columns 2j-1 .. 2j+2, so away from the border output
    # column j sees a bright column with weight 1/8 (j odd) or 3/8 (j even); plain bilinear would
    # give 0 or 1/2.
    frames = -torch.ones(1, 3, 518, 1036, dtype=torch.bfloat16)
    frames[..., ::4] = 1
    unit = preprocess_frames(frames) * std + mean
    assert unit.dtype == torch.float32
    columns = unit[0, :, 7, 1:-1]
    expected_columns = torch.tensor([0.125, 0.375]).repeat(258)[: columns.shape[-1]]
    torch.testing.assert_close(columns, expected_columns.expand_as(columns), rtol=0, atol=1e-6)

    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        preprocess_frames(torch.zeros(3, 32, 32))


def test_get_mask_is_the_resized_soft_mask_of_each_frame(eval_idm):
    height, width, size = 24, 20, (48, 40)  # a small IDM input size keeps the test cheap
    frame_a = fixture_images(1, height, width)[0]
    frame_b = torch.flip(frame_a, dims=(1,)) * 0.8
    # Sample 0 = [a, b], sample 1 = [a, a]: a batch/frame mix-up changes the answer.
    video = torch.stack([torch.stack([frame_a, frame_b], dim=1),
                         torch.stack([frame_a, frame_a], dim=1)])  # [2, 3, 2, H, W]
    masks = eval_idm.get_mask(video, frames_per_batch=3, input_size=size)
    assert masks.shape == (2, 2, height, width) and masks.dtype == torch.float32
    with torch.no_grad():
        soft = eval_idm(preprocess_frames(torch.stack([frame_a, frame_b]), size), return_mask=True)[1]
    assert soft.shape == (2, 1, *size)
    expected = F.interpolate(soft, size=(height, width), mode="bilinear", align_corners=False,
                             antialias=True)[:, 0]
    mask_a, mask_b = expected
    for got, want in [(masks[0, 0], mask_a), (masks[0, 1], mask_b), (masks[1, 0], mask_a),
                      (masks[1, 1], mask_a)]:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (mask_a - mask_b).abs().max() > 1e-2

    eval_idm.train()
    try:
        with pytest.raises(RuntimeError, match="eval"):
            eval_idm.get_mask(video)
    finally:
        eval_idm.eval()
    with pytest.raises(ValueError, match=r"\[B, 3, F, H, W\]"):
        eval_idm.get_mask(video[:, :, 0])


def test_get_mask_runs_in_the_model_dtype():
    torch.manual_seed(0)
    model = IDM().to(torch.bfloat16).eval()
    video = torch.rand(1, 3, 3, 16, 24) * 2 - 1
    masks = model.get_mask(video, frames_per_batch=2, input_size=(32, 32))
    assert masks.shape == (1, 3, 16, 24) and masks.dtype == torch.bfloat16
    assert ((masks > 0) & (masks < 1)).all()
