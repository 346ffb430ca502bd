"""Stage-2 trainer on a tiny bare WanModelCausal (no DeepSpeed): every context mode, Eq. 6 / Eq. 7,
the closed-loop path against teacher forcing, metrics, and an overfit run."""
import pytest
import torch

from data_tools.tiny_checkpoint import TINY_DIT, write_tiny_checkpoint
from vidartrain.config import ConfigError, config_from_dict
from vidartrain.data.shard_index import DataInfo
from vidartrain.data.transforms import to_model_range
from helpers.trainer_launch import tiny_idm
from vidartrain.errors import DataError
from vidartrain.models.idm import pool_mask_to_latent
from vidartrain.rollouts import RolloutWindow, closed_loop_schedule
from vidartrain.trainers.conditioning import FrozenConditioner
from vidartrain.trainers.self_forcing import (SelfForcingStage, closed_loop_velocity, prepare_causal_window,
                                              self_generated_velocity, teacher_forcing_velocity)

CHUNK = 4
PRE_ENCODED = DataInfo(mode="latents", text_embeddings=True, actions=(), idm_masks=True)  # the batches below hold every tensor
TEXT_DIM = TINY_DIT["text_dim"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "Wan2.2-TI2V-tiny")


def stage_config(checkpoint, **self_forcing):
    return config_from_dict({
        "model": {"ckpt_dir": str(checkpoint), "model_class": "WanModelCausal", "gradient_checkpointing": False},
        "training": {"num_steps": 10, "warmup": 0, "lr": 1e-3},
        "loss": {"type": "causal_flow_matching", "embodiment_aware": True, "eta": 3.0, "shift": 3.0},
        "self_forcing": {"causal": True, "chunk_size": CHUNK, "kv_cache_length": 8, **self_forcing},
        "data": {"shards": "unused", "num_frames": 21, "height": 64, "width": 64}})


def build(checkpoint, **self_forcing):
    stage = SelfForcingStage(stage_config(checkpoint, **self_forcing), PRE_ENCODED)
    model = stage.build_model().float()
    return stage, model


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(3)
    return {"__key__": ["a", "b"], "latents": torch.randn(2, 48, 6, 4, 4, generator=generator),
            "text_emb": [torch.randn(5, TEXT_DIM, generator=generator), torch.randn(3, TEXT_DIM, generator=generator)],
            "idm_mask": torch.rand(2, 6, 4, 4, generator=generator)}


def test_eq7_without_a_source_of_idm_masks_is_refused_when_the_stage_is_built(checkpoint):
    """Pre-encoded shards without masks (the IDM cannot run on latents), or raw ones without an IDM:
    refused before any model is built, not at the first step."""
    config = stage_config(checkpoint)
    with pytest.raises(ConfigError, match="the pre-encoded shards of `data.shards` .* hold none"):
        SelfForcingStage(config, DataInfo(mode="latents", text_embeddings=True, actions=()))
    with pytest.raises(ConfigError, match="set `model.idm_path`"):
        SelfForcingStage(config, DataInfo(mode="raw", text_embeddings=False, actions=()))
    config.loss.embodiment_aware = False
    SelfForcingStage(config, DataInfo(mode="latents", text_embeddings=True, actions=()))


def loss_of(stage, model, batch, seed=0):
    return stage.training_loss(model, batch, torch.Generator().manual_seed(seed))


def test_eq7_with_eta_zero_equals_eq6_in_the_trainer(checkpoint, batch):
    stage, model = build(checkpoint)
    eq7, metrics = loss_of(stage, model, batch)
    stage.config.loss.eta = 0.0
    eta_zero, _ = loss_of(stage, model, batch)
    stage.config.loss.embodiment_aware = False
    eq6, plain_metrics = loss_of(stage, model, batch)
    assert torch.equal(eta_zero, eq6)
    assert eq7 > eq6  # weights >= 1 everywhere
    assert sorted(metrics) == ["context_self_generated", "loss_by_position/01", "loss_by_position/02",
                               "loss_by_position/03", "loss_in_mask", "loss_out_of_mask"]
    assert "loss_in_mask" not in plain_metrics
    positions = torch.stack([metrics[f"loss_by_position/0{i}"][0] for i in (1, 2, 3)])
    torch.testing.assert_close(positions.mean(), eq6.detach(), rtol=1e-5, atol=0)


def test_closed_loop_one_frame_chunks_without_reset_equal_teacher_forcing(checkpoint, batch):
    stage, model = build(checkpoint)
    context = stage.conditioner.text_context(batch)
    window = prepare_causal_window(batch["latents"], CHUNK, 3.0, torch.Generator().manual_seed(1))
    events = closed_loop_schedule(CHUNK, RolloutWindow(rollout_bound=100, rollout_prefill_num=5), chunk=1)
    with torch.no_grad():
        closed = closed_loop_velocity(model, window, context, events, kv_cache_length=8)
        teacher = teacher_forcing_velocity(model, window, context)
    torch.testing.assert_close(closed[:, :, 1:], teacher[:, :, 1:], atol=2e-5, rtol=1e-4)


def test_self_generated_context_changes_only_frames_after_the_first_prediction(checkpoint, batch):
    stage, model = build(checkpoint)
    context = stage.conditioner.text_context(batch)
    window = prepare_causal_window(batch["latents"], CHUNK, 3.0, torch.Generator().manual_seed(1))
    with torch.no_grad():
        teacher = teacher_forcing_velocity(model, window, context)
        generated = self_generated_velocity(model, window, context, [1.0, 0.5], kv_cache_length=8,
                                            sink_frames=0, generator=torch.Generator().manual_seed(2))
    # Frame 1 sees only the real frame 0; frames 2.. see the model's own frames 1.. as context.
    torch.testing.assert_close(generated[:, :, 1], teacher[:, :, 1], atol=2e-5, rtol=1e-4)
    assert (generated[:, :, 2:] - teacher[:, :, 2:]).abs().max() > 1e-3


@pytest.mark.parametrize("options", [{"context_mode": "self_generated"}, {"context_mode": "mixed"},
                                     {"closed_loop": True, "rollout_bound": 9, "rollout_prefill_num": 5}])
def test_every_context_mode_trains_every_parameter(checkpoint, batch, options):
    stage, model = build(checkpoint, denoising_steps=2, **options)
    loss, metrics = loss_of(stage, model, batch)
    loss.backward()
    assert torch.isfinite(loss)
    without_grad = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert without_grad == []
    assert metrics["context_self_generated"][0] in (0.0, 1.0)


def test_loss_falls_when_overfitting_one_batch(checkpoint, batch):
    stage, model = build(checkpoint)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    losses = []
    for _ in range(12):
        loss, _ = loss_of(stage, model, batch, seed=5)  # same window and noise every step
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print("stage-2 overfit losses:", [round(v, 4) for v in losses])
    assert losses[-1] < 0.5 * losses[0]


def test_mixed_context_is_validated_as_the_mean_over_the_coin(checkpoint, batch):
    """A held-out sample of a `mixed` run: its loss and metrics under either context, weighted by
    self_generated_prob, with no coin (rank 0's, broadcast, would tie a sample's loss to rank 0's sample)."""
    stage, model = build(checkpoint, context_mode="mixed", self_generated_prob=0.25)
    sample = {key: value[:1] for key, value in batch.items()}

    def validation_loss(mode):
        stage.config.self_forcing.context_mode = mode
        return stage.validation_loss(model, sample, torch.Generator().manual_seed(0))

    with torch.no_grad():
        (ground_truth, truth_metrics), (generated, generated_metrics) = map(validation_loss, ("ground_truth",
                                                                                              "self_generated"))
        mixed, metrics = validation_loss("mixed")
    torch.testing.assert_close(mixed, 0.75 * ground_truth + 0.25 * generated, rtol=1e-6, atol=0)
    assert metrics["context_self_generated"].tolist() == [0.25, 1.0]
    torch.testing.assert_close(metrics["loss_in_mask"],
                               0.75 * truth_metrics["loss_in_mask"] + 0.25 * generated_metrics["loss_in_mask"])


def test_clear_errors(checkpoint, batch):
    stage, model = build(checkpoint)
    no_mask = {k: v for k, v in batch.items() if k != "idm_mask"}
    with pytest.raises(DataError, match="idm_mask"):
        loss_of(stage, model, no_mask)
    short = {**batch, "latents": batch["latents"][:, :, :3], "idm_mask": batch["idm_mask"][:, :3]}
    with pytest.raises(ConfigError, match="fewer than self_forcing.window_frames"):
        loss_of(stage, model, short)
    with pytest.raises(ConfigError, match="ckpt_dir"):
        SelfForcingStage(config_from_dict({"loss": {"type": "causal_flow_matching"},
                                           "model": {"model_class": "WanModelCausal"}}), PRE_ENCODED)


def test_online_idm_mask_covers_only_the_window_and_reads_uint8_video():
    torch.manual_seed(0)
    stage = FrozenConditioner(idm=tiny_idm().eval(), idm_input_size=(32, 32))
    video = torch.randint(0, 256, (1, 3, 13, 32, 32), dtype=torch.uint8)  # 4 latent frames, as the loader sends
    whole_clip = pool_mask_to_latent(stage.idm.get_mask(to_model_range(video), input_size=(32, 32)).float())
    assert whole_clip.shape == (1, 4, 2, 2)
    for start in (0, 1, 2):
        window = stage.window_mask({"video": video, "__key__": ["ep"]}, start, 2)
        torch.testing.assert_close(window, whole_clip[:, start:start + 2], rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match="floating-point frames"):
        stage.idm.get_mask(video, input_size=(32, 32))
