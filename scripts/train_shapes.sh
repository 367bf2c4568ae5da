#!/usr/bin/env bash
# Reproduce the shipped shapes-world checkpoints, checkpoints/shapes/{clip,vqgan,gpt}.pt, from nothing.
# Budget: <= 30 minutes on 2 CPU cores, <= 30 MB of checkpoints (fp16 weights).
#
#   scripts/train_shapes.sh           # the real run: CLIP -> VQGAN -> GPT (prepare + train) -> fp16 -> evaluation
#   scripts/train_shapes.sh --quick   # a few steps per stage into out/shapes_quick/: checks the chain (5-9 min on a busy CPU)
#
# Stage 1  train_clip.py   shapes images + captions -> a small CLIP (the only stage that reads captions)
# Stage 2  train_vqgan.py  shapes images -> the f4 tokenizer: 32 px <-> 8x8 tokens
# Stage 3  train_gpt.py    encode 40k images once with the *shipped* CLIP and VQGAN files (tokens.npy, clip_emb.npy),
#                          then learn p(tokens | CLIP image embedding): language-free, as in the paper; the GPT
#                          never sees an image of data.HELD_OUT's colour x shape pairs
# Stage 4  evaluate.py     shapes accuracy of text-prompted samples (every colour x shape prompt; seen and held-out
#                          pairs apart): raw, --cfg 3, best 8 of 32 by CLIP score (+ copies of training images), full
#                          captions and the quick-start prompt with sample.py's defaults. Each eval log,
#                          $OUT/eval*.log, ends in one JSON line {"command", "results", "settings"}: what the README's
#                          shapes table cites
# Working files (logs, resumable checkpoints, token files) go to $OUT; the shipped files to $DEST.
# THREADS=1 scripts/train_shapes.sh: one torch thread per stage, much faster when other jobs share the CPU (idle
# intra-op threads spin-wait); the 30-minute budget is for an otherwise idle 2-core machine and torch's default.
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=0
if [[ "${1:-}" == "--quick" ]]; then QUICK=1; elif [[ $# -gt 0 ]]; then echo "usage: $0 [--quick]" >&2; exit 2; fi
if (( QUICK )); then OUT=${OUT:-out/shapes_quick}; DEST=${DEST:-out/shapes_quick/checkpoints}
else OUT=${OUT:-out/shapes}; DEST=${DEST:-checkpoints/shapes}; fi
# a fresh start: the token files must come from this run's VQGAN and CLIP (train_gpt.py refuses stale ones anyway)
rm -rf "$OUT/clip" "$OUT/vqgan" "$OUT/gpt"
mkdir -p "$OUT" "$DEST"
if [[ -n "${THREADS:-}" ]]; then export OMP_NUM_THREADS=$THREADS; fi  # torch reads it at start-up, in every stage
# --quick: tiny step counts, only to prove that every stage runs and hands the next one what it needs
if (( QUICK )); then
  CLIP_QUICK=(--max-steps 4 --batch-size 32 --eval-images 96)
  VQGAN_QUICK=(--max-steps 4 --eval-interval 2 --eval-images 16 --log-interval 1)
  GPT_QUICK=(--n-images 256 --max-steps 6 --warmup 1 --eval-interval 3 --eval-iters 1 --log-interval 2)
  EVAL_QUICK=(--n 1)
else
  CLIP_QUICK=(); VQGAN_QUICK=(); GPT_QUICK=(); EVAL_QUICK=()
fi

stage() {  # stage NAME COMMAND...: run it, keep its output in $OUT/NAME.log, report the wall time
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$OUT/$name.log"
  echo "== $name: done in $((SECONDS - t0)) s (total $SECONDS s)"
}

# Each trainer writes its fp16 model-only file (clip.pt, vqgan.pt, gpt.pt: what ships) beside its resumable ckpt.pt.
# The CLIP and VQGAN files are copied to $DEST before the GPT's token files are made, so the GPT learns from exactly
# the shipped CLIP and VQGAN (train_gpt.py records their sha256; sample.py checks it).
stage clip python train_clip.py --preset shapes --out "$OUT/clip" "${CLIP_QUICK[@]}"
cp "$OUT/clip/clip.pt" "$DEST/clip.pt"
stage vqgan python train_vqgan.py --preset shapes --out "$OUT/vqgan" "${VQGAN_QUICK[@]}"
cp "$OUT/vqgan/vqgan.pt" "$DEST/vqgan.pt"
stage gpt python train_gpt.py --preset shapes --vqgan "$DEST/vqgan.pt" --clip "$DEST/clip.pt" --out "$OUT/gpt" \
  "${GPT_QUICK[@]}"
cp "$OUT/gpt/gpt.pt" "$DEST/gpt.pt"
ls -l "$DEST"
du -ch "$DEST"/*.pt | tail -1
MODELS=(--clip "$DEST/clip.pt" --vqgan "$DEST/vqgan.pt" --gpt "$DEST/gpt.pt")
# every figure of the shapes table (README): seen and held-out colour x shape pairs reported apart in each
stage eval python evaluate.py shapes "${MODELS[@]}" --json "${EVAL_QUICK[@]}"                 # raw: 1 sample per image
stage eval_cfg3 python evaluate.py shapes "${MODELS[@]}" --cfg 3 --json "${EVAL_QUICK[@]}"    # guidance, raw
stage eval_ranked python evaluate.py shapes "${MODELS[@]}" --candidates 32 --copies --json "${EVAL_QUICK[@]}"  # 8 of 32
# full captions and the quick-start prompt with sample.py's defaults (the best 4 of 64)
stage eval_full python evaluate.py shapes "${MODELS[@]}" --prompts full --n 4 --candidates 64 --quickstart --json \
  "${EVAL_QUICK[@]}"
try="python sample.py \"a red circle on a blue background\""
[[ "$DEST" == checkpoints/shapes ]] || try+=" --clip $DEST/clip.pt --vqgan $DEST/vqgan.pt --gpt $DEST/gpt.pt"
echo "== all stages done in $SECONDS s; try: $try"
