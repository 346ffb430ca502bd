"""Generate videos (and the IDM's actions) from a fine-tuned Vidar / Vidarc model.

    # Vidar (bidirectional, Wan2.2 TI2V sampler): an image and a prompt
    vidar-sample --ckpt-dir checkpoints/Wan2.2-TI2V-5B --weights checkpoints/vidar/vidar.pt \\
        --image first_frame.png --prompt "pick up the red block" --out samples/vidar
    # Vidarc (causal, KV cache) in closed loop against a held-out episode, actions from the IDM
    vidar-sample --ckpt-dir checkpoints/Wan2.2-TI2V-5B --weights checkpoints/vidar/vidarc.pt \\
        --episode data/episodes/ep_0007 --closed-loop --idm checkpoints/vidar/idm.pt --out samples/vidarc

Writes OUT/sample.mp4 (the generated video), OUT/frames.png (first / middle / last frame; the
episode's frames below when there is one), OUT/actions.npy (the IDM's action per generated frame,
with --idm) and OUT/metrics.json (settings, time, PSNR against the episode, action L1 and gripper
accuracy against the episode's actions). `--weights` is a vidar.pt / vidarc.pt state dict or a
DeepSpeed checkpoint folder; which model it is follows from the loss.type a checkpoint's COMPLETE
records (a `--model` that contradicts it is refused), else from `--model` or the file's name. The tiny
checkpoint of the demo needs its VAE / umT5 sizes from its training YAML: `--config`, whose
model.ckpt_dir is also the default `--ckpt-dir`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from data_tools.episodes import EpisodeError, EpisodeLayout, actions_to_npy, load_episode  # noqa: E402
from vidartrain.config import CAUSAL_LOSS, load_config  # noqa: E402
from vidartrain.data.transforms import video_to_model_input  # noqa: E402
from vidartrain.data.video import decode_all_frames  # noqa: E402
from vidartrain.distributed.checkpointing import COMPLETE_MARKER, read_complete  # noqa: E402
from vidartrain.distributed.export import (in_export_dtype, lora_alpha, read_checkpoint_weights,  # noqa: E402
                                           resolve_checkpoint)
from vidartrain.errors import CheckpointError, ConfigError, DataError, cwd_note, reports_errors  # noqa: E402
from vidartrain.files import check_outputs, make_directory, write_atomically  # noqa: E402
from vidartrain.models.idm import IDM, idm_input_size, load_idm  # noqa: E402
from vidartrain.models.wan.causal import WanModelCausal  # noqa: E402
from vidartrain.models.wan.checkpoint import load_finetuned  # noqa: E402
from vidartrain.models.wan.kv_cache import latent_frames_of  # noqa: E402
from vidartrain.models.wan.lora import is_adapter_key, merge_adapters  # noqa: E402
from vidartrain.rollouts import RolloutWindow  # noqa: E402
from vidartrain.models.wan.model import WanModel  # noqa: E402
from vidartrain.models.wan.text_encoder import TextEncoder  # noqa: E402
from vidartrain.models.wan.vae import WanVAE  # noqa: E402
from vidartrain.sampling import (DEFAULT_GUIDE_SCALE, DEFAULT_NEGATIVE_PROMPT, DEFAULT_SHIFT, DEFAULT_STEPS,  # noqa: E402
                                 SamplingOptions, action_metrics, frame_strip, generate_video, idm_actions,
                                 psnr, video_to_uint8, write_mp4)
from vidartrain.shapes import MIN_CAUSAL_LATENT_FRAMES, MIN_CAUSAL_VIDEO_FRAMES  # noqa: E402
from vidartrain.trainers.conditioning import VAE_FILE  # noqa: E402

# Few denoising steps per chunk for the causal model, as it is deployed.
DEFAULT_CAUSAL_STEPS = 4
OUTPUT_FILES = ("sample.mp4", "frames.png", "actions.npy", "metrics.json")
# The model each training stage trains, by the loss.type a checkpoint's COMPLETE record holds.
STAGE_MODELS = {"flow_matching": "vidar", CAUSAL_LOSS: "vidarc"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidar-sample", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--ckpt-dir", help="Wan2.2-TI2V checkpoint dir (config.json, DiT, VAE, umT5); default: "
                                           "--config's model.ckpt_dir")
    parser.add_argument("--weights", required=True,
                        help="vidar.pt / vidarc.pt (or .safetensors), or a DeepSpeed checkpoint folder")
    parser.add_argument("--model", choices=("vidar", "vidarc"),
                        help="bidirectional (vidar) or causal (vidarc); default: the stage a DeepSpeed checkpoint "
                             "records, else from the --weights name")
    parser.add_argument("--config", help="training YAML whose model.vae_config / model.t5_config size the "
                                         "VAE and umT5 (tiny checkpoints); the published sizes otherwise")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="first frame (PNG/JPEG); needs --prompt")
    source.add_argument("--episode", help="episode folder (video.mp4, actions.npy, instruction.txt)")
    parser.add_argument("--prompt", help="instruction (default with --episode: its instruction.txt)")
    parser.add_argument("--negative-prompt", default=DEFAULT_NEGATIVE_PROMPT,
                        help="negative prompt for guidance (default: upstream Wan2.2's; '' for none)")
    parser.add_argument("--closed-loop", action="store_true",
                        help="vidarc with --episode: the episode's frames are the real observations "
                             "(generated chunks replaced by them in the KV cache)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier run's outputs in --out (its actions.npy too, without --idm)")
    parser.add_argument("--steps", type=int, help=f"denoising steps (default {DEFAULT_STEPS} for vidar, "
                                                  f"{DEFAULT_CAUSAL_STEPS} per chunk for vidarc)")
    parser.add_argument("--solver", choices=("unipc", "euler"), default="unipc")
    parser.add_argument("--guide", type=float, default=DEFAULT_GUIDE_SCALE, help="classifier-free guidance scale")
    parser.add_argument("--shift", type=float, default=DEFAULT_SHIFT, help="timestep shift")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-frames", type=int, default=81, help="video frames, 4k+1")
    parser.add_argument("--height", type=int, default=736)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--fps", type=int, default=10, help="frame rate of the written mp4")
    parser.add_argument("--rollout-bound", type=int, default=60, help="vidarc: video frames per KV-cache window")
    parser.add_argument("--rollout-prefill-num", type=int, default=33,
                        help="vidarc: real video frames re-prefilled after a window reset")
    parser.add_argument("--compile-generation", action="store_true",
                        help="vidarc on CUDA: each denoising call and chunk prefill as one CUDA graph "
                             "(torch.compile reduce-overhead; compiles on first use)")
    parser.add_argument("--idm", help="idm.pt: turn the generated frames into actions")
    parser.add_argument("--gripper-dims", default="6,13",
                        help="action dimensions scored as gripper open/close against the episode (comma-separated)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="model dtype (default: bfloat16 on GPU, float32 on CPU)")
    return parser


def model_kind(args: argparse.Namespace, checkpoint: Path | None) -> str:
    """vidar (bidirectional) or vidarc (causal): the stage a training checkpoint's COMPLETE record names
    (--model must agree: the other model class would sample from weights it was not trained as), else
    --model, else the --weights name."""
    loss = recorded_loss(checkpoint) if checkpoint is not None else None
    if loss is not None:
        recorded = STAGE_MODELS[loss]
        if args.model not in (None, recorded):
            raise ConfigError(f"--model {args.model}: --weights {args.weights} holds {recorded} weights "
                              f"({checkpoint / COMPLETE_MARKER} records loss.type {loss}); pass --model {recorded} "
                              f"or leave --model out")
        return recorded
    if args.model is not None:
        return args.model
    name = Path(args.weights).name.lower()
    if "vidarc" in name:
        return "vidarc"
    if "vidar" in name:
        return "vidar"
    raise ConfigError(f"--weights {args.weights}: cannot tell from the name whether it is vidar (bidirectional) "
                      f"or vidarc (causal); pass --model vidar or --model vidarc")


def training_checkpoint(weights: str) -> Path | None:
    """The DeepSpeed checkpoint folder --weights names (a step_XXXXXXXX folder, or a checkpoints directory's
    latest complete one), its files verified against its COMPLETE record; None for a state dict file."""
    if not Path(weights).is_dir():
        return None
    try:
        root, tag = resolve_checkpoint(weights)
    except CheckpointError as error:
        raise CheckpointError(f"--weights {error}") from None
    return root / tag


def recorded_loss(checkpoint: Path) -> str | None:
    """The loss.type of the run that saved `checkpoint`, from the config its COMPLETE records (None when it
    records none: saved by an older version); one that trains no DiT is refused."""
    config = read_complete(checkpoint).get("config")
    if config is None:
        return None
    loss = config.get("loss", {}).get("type")
    if loss not in STAGE_MODELS:
        raise CheckpointError(f"--weights: {checkpoint / COMPLETE_MARKER} records loss.type {loss!r}, not a "
                              f"DiT's ({', '.join(f'{k}: {v}' for k, v in STAGE_MODELS.items())}); an IDM run is "
                              f"sampled with --idm and the idm.pt vidar-export writes of it")
    return loss


def gripper_dims(args: argparse.Namespace) -> list[int]:
    try:
        return [int(d) for d in args.gripper_dims.split(",") if d.strip()]
    except ValueError:
        raise ConfigError(f"--gripper-dims {args.gripper_dims!r}: expected comma-separated integers, e.g. 6,13") from None


def check_arguments(args: argparse.Namespace) -> tuple[str, Path | None]:
    """Every problem with the inputs before any model is loaded. Returns the model kind and the training
    checkpoint --weights names (None for a state dict file)."""
    check_input_paths(args)
    if args.image is not None and not args.prompt:
        raise ConfigError("--image needs --prompt (the instruction to follow)")
    if args.closed_loop and args.episode is None:
        raise ConfigError("--closed-loop needs --episode (the real observations)")
    if args.num_frames < 1 or (args.num_frames - 1) % 4:
        raise ConfigError(f"--num-frames {args.num_frames}: must be 4k+1 (1, 5, 9, ..., 81)")
    if args.height % 32 or args.width % 32 or args.height <= 0 or args.width <= 0:
        raise ConfigError(f"--height {args.height} --width {args.width}: both must be positive multiples of 32 "
                          f"(VAE stride 16 x DiT patch 2)")
    gripper_dims(args)
    if args.shift <= 0:
        raise ConfigError(f"--shift {args.shift}: must be > 0 (the timestep shift s of s*sigma / (1 + (s-1)*sigma))")
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps {args.steps}: at least 1")
    if args.fps < 1:
        raise ConfigError(f"--fps {args.fps}: the frame rate of the written mp4, at least 1")
    check_device(args.device)
    check_out(args)
    checkpoint = training_checkpoint(args.weights)
    kind = model_kind(args, checkpoint)
    check_model_flags(args, kind)
    return kind, checkpoint


def check_input_paths(args: argparse.Namespace) -> None:
    paths = [("--ckpt-dir", args.ckpt_dir, "dir"), ("--weights", args.weights, "any"),
             ("--image", args.image, "file"), ("--episode", args.episode, "dir"), ("--idm", args.idm, "file"),
             ("--config", args.config, "file")]
    for flag, path, kind in paths:
        if path is None:
            continue
        exists = {"dir": Path(path).is_dir, "file": Path(path).is_file, "any": Path(path).exists}[kind]()
        if not exists:
            raise ConfigError(f"{flag} {path}: no such {'folder' if kind == 'dir' else 'file'}")
    if args.ckpt_dir is None:
        if args.config is None:
            raise ConfigError("give --ckpt-dir (the Wan2.2-TI2V checkpoint dir), or --config whose model.ckpt_dir "
                              "names it")
        args.ckpt_dir = load_config(args.config).model.ckpt_dir
        if not Path(args.ckpt_dir).is_dir():
            raise ConfigError(f"--config {args.config}: model.ckpt_dir {args.ckpt_dir}: no such folder"
                              f"{cwd_note(args.ckpt_dir)}")
    for name in ("config.json", VAE_FILE):
        if not (Path(args.ckpt_dir) / name).is_file():
            raise ConfigError(f"--ckpt-dir {args.ckpt_dir}: {name} is missing (expected the Wan2.2-TI2V layout)")


def check_out(args: argparse.Namespace) -> None:
    """--out is a folder (created here, so a file in its place is found before the generation) whose earlier
    outputs may be replaced only under --overwrite."""
    check_outputs([Path(args.out) / name for name in OUTPUT_FILES], args.overwrite, "the sample")
    make_directory(Path(args.out), "--out")


def check_model_flags(args: argparse.Namespace, kind: str) -> None:
    """The flags that only one of the two models takes."""
    if kind == "vidarc" and args.num_frames < MIN_CAUSAL_VIDEO_FRAMES:
        raise ConfigError(f"--num-frames {args.num_frames}: vidarc generates latent frames after the given first one, "
                          f"so at least {MIN_CAUSAL_VIDEO_FRAMES} ({MIN_CAUSAL_LATENT_FRAMES} latent frames)")
    if args.closed_loop and kind != "vidarc":
        raise ConfigError("--closed-loop runs the causal model: pass vidarc weights (or --model vidarc)")
    if args.compile_generation and (kind != "vidarc" or not args.device.startswith("cuda")):
        raise ConfigError(f"--compile-generation captures the causal model's generation in CUDA graphs: it needs "
                          f"a vidarc model and a CUDA --device (got {kind} on {args.device})")


def check_device(device: str) -> None:
    """--device must name this machine's CPU or one of its CUDA devices."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device}: expected cpu, cuda or cuda:N")
    if parsed.type == "cpu":
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: torch sees no CUDA device on this machine; use --device cpu")
    count = torch.cuda.device_count()
    if parsed.index is not None and parsed.index >= count:
        raise ConfigError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def load_models(args: argparse.Namespace, kind: str, checkpoint: Path | None, dtype: torch.dtype
                ) -> tuple[WanModel, WanVAE, TextEncoder]:
    vae_config, t5_config = None, None
    if args.config is not None:
        config = load_config(args.config)
        vae_config, t5_config = config.model.vae_config, config.model.t5_config
    model_class = WanModelCausal if kind == "vidarc" else WanModel
    model = model_class.from_pretrained(args.ckpt_dir, dtype=dtype, device=args.device)
    if checkpoint is None:
        load_finetuned(model, args.weights)
    else:
        load_finetuned(model, checkpoint, checkpoint_weights(checkpoint, dtype))
    vae = WanVAE.from_pretrained(Path(args.ckpt_dir) / VAE_FILE, dtype=dtype, device=args.device, **(vae_config or {}))
    text_encoder = TextEncoder.from_pretrained(args.ckpt_dir, dtype=dtype, device=args.device,
                                               text_len=model.text_len, encoder_config=t5_config)
    return model.eval(), vae, text_encoder


def checkpoint_weights(checkpoint: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The weights of training checkpoint `checkpoint`, in `dtype`. A LoRA run's adapters are merged in as
    vidar-export merges them (in its bf16, alpha from the config COMPLETE records), so the checkpoint samples
    as its exported vidar.pt does; unmerged, they are keys the model lacks and the base alone would sample."""
    state = read_checkpoint_weights(checkpoint.parent, checkpoint.name, dtype)
    if not any(map(is_adapter_key, state)):
        return state
    merged, _, _ = merge_adapters(in_export_dtype(state), lora_alpha(checkpoint))
    return merged


def load_checked_idm(args: argparse.Namespace, actions: np.ndarray | None, dtype: torch.dtype) -> IDM | None:
    """The --idm, loaded before any generation; against an episode, the action dimensions it predicts must be
    the episode's and --gripper-dims must name some of them, or the scoring would fail after the sampling."""
    if args.idm is None:
        return None
    idm = load_idm(args.idm, device=args.device, dtype=dtype)
    if actions is None:
        return idm
    dims = idm.train_mean.numel()
    if actions.shape[1] != dims:
        raise ConfigError(f"--idm {args.idm} predicts {dims} action dimensions, the episode {args.episode} has "
                          f"{actions.shape[1]}: pass an IDM trained on this robot's actions")
    outside = [d for d in gripper_dims(args) if not 0 <= d < dims]
    if outside:
        raise ConfigError(f"--gripper-dims {args.gripper_dims}: {outside} not among the episode's {dims} action "
                          f"dimensions (0 to {dims - 1}); pass this robot's gripper dimensions")
    return idm


def read_inputs(args: argparse.Namespace) -> tuple[torch.Tensor, str, np.ndarray | None]:
    """Video [1, 3, T, H, W] in [-1, 1] (T = 1 for an image), the prompt, the episode's actions."""
    if args.image is not None:
        image = np.array(Image.open(args.image).convert("RGB"))[None]
        return video_to_model_input(image, args.height, args.width)[None], args.prompt, None
    folder = Path(args.episode).resolve()
    try:
        # actions of any width: this robot's, checked against --idm by load_checked_idm
        episode = load_episode(folder.parent, folder.name, EpisodeLayout(action_dim=None))
    except EpisodeError as error:
        raise DataError(f"--episode {args.episode}: {error}") from error
    frames, _ = decode_all_frames(episode.video)
    if len(frames) < args.num_frames:
        raise DataError(f"--episode {args.episode} has {len(frames)} frames at {episode.fps} fps, "
                        f"fewer than --num-frames {args.num_frames}")
    video = video_to_model_input(frames[:args.num_frames], args.height, args.width)[None]
    return video, args.prompt or episode.instruction, episode.actions[:args.num_frames]


def run(args: argparse.Namespace) -> dict:
    kind, checkpoint = check_arguments(args)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda")
                                                           else torch.float32)
    options = SamplingOptions(steps=args.steps or (DEFAULT_CAUSAL_STEPS if kind == "vidarc" else DEFAULT_STEPS),
                              shift=args.shift, guide_scale=args.guide, solver=args.solver, seed=args.seed,
                              compile_generation=args.compile_generation)
    try:
        window = RolloutWindow(args.rollout_bound, args.rollout_prefill_num)
    except ValueError as error:  # the window's own check, reported against the flags that set it
        raise ConfigError(f"--rollout-bound {args.rollout_bound} --rollout-prefill-num "
                          f"{args.rollout_prefill_num}: {error}") from None
    video, prompt, actions = read_inputs(args)
    idm = load_checked_idm(args, actions, dtype)
    model, vae, text_encoder = load_models(args, kind, checkpoint, dtype)
    start = time.perf_counter()
    context, null_context = text_encoder([prompt]), text_encoder([args.negative_prompt])
    generated = generate_video(model, vae, video.to(args.device), context, null_context, args.num_frames,
                               options, closed_loop=args.closed_loop, window=window)
    seconds = time.perf_counter() - start
    frames = video_to_uint8(generated)[0]
    truth = video_to_uint8(video)[0] if args.episode is not None else None
    metrics = {"model": kind, "weights": str(args.weights), "prompt": prompt, "closed_loop": args.closed_loop,
               "num_frames": args.num_frames, "height": args.height, "width": args.width,
               "latent_frames": latent_frames_of(args.num_frames), **vars(options), "seconds": round(seconds, 3)}
    if truth is not None:
        metrics["psnr"] = psnr(frames[1:], truth[1:])  # frame 0 is given, not generated
    predicted = None
    if idm is not None:
        predicted = idm_actions(idm, generated, idm_input_size(args.height, args.width))[0].cpu().numpy()
        if actions is not None:
            metrics.update(action_metrics(predicted[1:], actions[1:len(predicted)], gripper_dims(args)))
    write_outputs(Path(args.out), args.fps, frame_strip(frames, truth), frames, predicted, metrics)
    return metrics


def write_outputs(out: Path, fps: int, strip: np.ndarray, frames: np.ndarray, predicted: np.ndarray | None,
                  metrics: dict) -> None:
    """This run's files in `out`, each whole or not at all. An earlier run's outputs go first (check_arguments
    let them be only under --overwrite): its actions.npy must not sit beside a video generated without an IDM."""
    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)
    write_mp4(out / "sample.mp4", frames, fps)
    write_atomically(out / "frames.png", lambda tmp: Image.fromarray(strip).save(tmp, format="PNG"))
    if predicted is not None:
        write_atomically(out / "actions.npy", lambda tmp: tmp.write_bytes(actions_to_npy(predicted)))
    text = json.dumps(metrics, indent=2, ensure_ascii=False) + "\n"
    write_atomically(out / "metrics.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))


@reports_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    metrics = run(args)
    out = Path(args.out)
    summary = ", ".join(f"{key} {metrics[key]:.3f}" for key in ("psnr", "action_l1", "gripper_accuracy")
                        if key in metrics)
    print(f"vidar-sample: {metrics['model']} video ({args.num_frames} frames, {args.height}x{args.width}, "
          f"{metrics['seconds']:.1f} s) -> {out / 'sample.mp4'}, {out / 'frames.png'}"
          + (f", actions -> {out / 'actions.npy'}" if args.idm else "") + (f"; {summary}" if summary else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
