#!/usr/bin/env bash
# The README's main command: install (once), then run the whole pipeline on a tiny embedded default,
# on CPU with 2 DeepSpeed ranks (gloo):
#   synthetic episodes -> shards -> tiny Wan2.2 checkpoint -> stage 1 (Vidar) -> IDM
#   -> stage 2 (Vidarc, its loss weighted by the IDM's masks), with TensorBoard logs and exported vidar.pt / vidarc.pt / idm.pt
#   -> sampling from vidar.pt (TI2V) and vidarc.pt (closed loop against an episode, IDM actions).
# Re-running starts from scratch in demo_run/ (set DEMO_KEEP=1 to resume instead).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash launch/setup_env.sh
venv="${VIDARTRAIN_VENV:-$root/.venv}"
py="$venv/bin/python"
export PATH="$venv/bin:$PATH"
export DS_ACCELERATOR=cpu  # the demo runs on CPU: say so, instead of DeepSpeed guessing (and warning) in every process
out=demo_run  # the tiny configs in configs/debug/ point here
[ "${DEMO_KEEP:-0}" = 1 ] || rm -rf "$out"
resume=(); [ "${DEMO_KEEP:-0}" = 1 ] && resume=(--resume auto)

step() { printf '\n=== %s\n' "$*"; }
# a free port per run: DeepSpeed's default (29500) is taken by any other run on this machine
free_port() { "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

step "1/7 synthetic episodes (real H.264 mp4, 10 fps)"
# DEMO_KEEP=1 keeps the episodes: rewritten ones (new modification times) would not match the shards
[ "${DEMO_KEEP:-0}" = 1 ] && [ -d "$out/episodes" ] ||
    "$py" -m data_tools.synth --episodes 12 --frames 24 --height 64 --width 64 --out "$out/episodes"
step "2/7 episodes -> WebDataset shards"
# --val-fraction 0.4: an episode is held out when its seeded hash is below it; here 2 of the 12, one per rank
"$py" -m data_tools.shard --episodes "$out/episodes" --out "$out/shards" --samples-per-shard 4 --val-fraction 0.4 --workers 2
"$py" -m data_tools.inspect "$out/shards"
step "3/7 tiny Wan2.2-TI2V checkpoint in the published layout"
"$py" -m data_tools.tiny_checkpoint --out "$out/checkpoints/Wan2.2-TI2V-tiny"
step "4/7 stage 1 (Vidar): WanModel, flow matching, ZeRO-3 on 2 CPU ranks"
deepspeed --num_gpus 2 --master_port "$(free_port)" launch/train.py --config configs/debug/tiny_vidar.yaml --ds-config ds_configs/cpu_debug.json "${resume[@]}"
step "5/7 IDM training on (frame, action) pairs of the same shards"
deepspeed --num_gpus 2 --master_port "$(free_port)" launch/train.py --config configs/debug/tiny_idm.yaml --ds-config ds_configs/cpu_debug.json "${resume[@]}"
step "6/7 stage 2 (Vidarc): WanModelCausal from the stage-1 export, embodiment-aware loss weighted by the IDM"
deepspeed --num_gpus 2 --master_port "$(free_port)" launch/train.py --config configs/debug/tiny_vidarc.yaml --ds-config ds_configs/cpu_debug.json "${resume[@]}"
step "7/7 sampling: Vidar TI2V from an episode's first frame, Vidarc in closed loop with the IDM's actions"
sample=("$py" launch/sample.py --ckpt-dir "$out/checkpoints/Wan2.2-TI2V-tiny" --config configs/debug/tiny_vidar.yaml
        --episode "$out/episodes/ep_0000" --num-frames 17 --height 64 --width 64 --overwrite)
"${sample[@]}" --weights "$out/export/vidar.pt" --steps 10 --out "$out/samples/vidar"
"${sample[@]}" --weights "$out/export/vidarc.pt" --closed-loop --idm "$out/export/idm.pt" --steps 4 \
    --rollout-bound 12 --rollout-prefill-num 5 --out "$out/samples/vidarc"

step "done"
cat <<EON
episodes          $out/episodes
shards            $out/shards (index.json: counts, checksums, skipped episodes)
checkpoint        $out/checkpoints/Wan2.2-TI2V-tiny
DeepSpeed ckpts   $out/stage1/checkpoints $out/stage2/checkpoints $out/idm/checkpoints
TensorBoard       $venv/bin/tensorboard --logdir $out
exported weights  $(ls "$out"/export/* | tr '\n' ' ')
generated videos  $out/samples/vidar/sample.mp4 (Vidar TI2V)  $out/samples/vidarc/sample.mp4 (Vidarc closed loop)
                  frame strips: $out/samples/*/frames.png; during training: $out/stage1/samples $out/stage2/samples
IDM actions       $out/samples/vidarc/actions.npy vs the episode's: $out/samples/vidarc/metrics.json
EON
