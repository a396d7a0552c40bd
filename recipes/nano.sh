#!/usr/bin/env bash
# The nano recipe: SimpleAR's whole pipeline at laptop scale, from nothing to the shipped checkpoints/nano/.
#
#     bash recipes/nano.sh                       # ~1 h on 2 CPU cores; work files in runs/nano/
#     THREADS=1 bash recipes/nano.sh             # on a machine someone else is using too (see below)
#     WORK=/tmp/nano OUT=/tmp/nano-ship bash recipes/nano.sh   # elsewhere; OUT is what sample.py --ckpt takes
#
# Stages (each prints its wall time, the total at the end):
#   1. data    64 px shapes scenes (PNG + meta.jsonl) and the byte-level BPE of their captions (data.py shapes);
#              objects on data.LATTICE (4 px steps); the compositional categories twice as often as single
#              objects, which a small LM learns first
#   2. vq      a Cosmos-architecture tokenizer, preset nano: 64 px -> 8x8 codes of 1,000 (train_vq.py)
#   3. codes   every training image encoded to codes (data.py prepare)
#   4. lm      a Qwen2-architecture LM, preset nano, from scratch on SimpleAR's sequence layout (train.py)
#   5. ship    LM + tokenizer.json + generation_config.json + vq/ + logs copied into $OUT
#   6. samples the README's picture grid (sample.py)
#   7. eval    GenEval-nano at sample.py's default sampling settings, 64 px (eval.py)
#
# Threads: torch's default (all cores) is right on an idle machine: two threads train the tokenizer 1.4x and
# the LM 2.1x faster than one here. When another process holds a core, each OpenMP thread waits for its peers at
# every op and two threads ran 20x slower than one; THREADS=1 then.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-runs/nano}
OUT=${OUT:-checkpoints/nano}
export OMP_NUM_THREADS=${THREADS:-$(nproc)}
PY=${PYTHON:-python}
# The sizes of the shipped run; tests/test_nano.py shrinks them all for a smoke run.
N_IMAGES=${N_IMAGES:-40000}
IMAGE_SIZE=${IMAGE_SIZE:-64}
VQ_STEPS=${VQ_STEPS:-6000}
VQ_IMAGES=${VQ_IMAGES:-20000}
LM_CONFIG=${LM_CONFIG:-nano}
LM_STEPS=${LM_STEPS:-7200}
LM_BATCH=${LM_BATCH:-16}
EVAL_ARGS=${EVAL_ARGS:-}
CATEGORIES="single_object colors two_object two_object counting counting position position color_attr color_attr"

total_start=$(date +%s)
declare -a report
stage() {  # stage NAME COMMAND...: run it, remember its wall time
  local name=$1 start=$(date +%s)
  shift
  echo "== $name: $*"
  "$@"
  report+=("$name $(( $(date +%s) - start )) s")
  echo "== $name done in $(( $(date +%s) - start )) s"
}

rm -rf "$WORK"
mkdir -p "$WORK"
stage data $PY data.py shapes --out "$WORK/data" --n "$N_IMAGES" --size "$IMAGE_SIZE" --vocab-size 512 \
  --categories $CATEGORIES
stage vq $PY train_vq.py --config nano --out "$WORK/vq" --size "$IMAGE_SIZE" --steps "$VQ_STEPS" --train-images "$VQ_IMAGES" --batch-size 8 --threads "$OMP_NUM_THREADS" --no-progress
stage codes $PY data.py prepare --meta "$WORK/data/meta.jsonl" --vq "$WORK/vq" --resolution "$IMAGE_SIZE" --out "$WORK/codes" --batch-size 64
# From scratch, a tiny model wants a far higher lr than SimpleAR's 1e-4 (which finetunes a pretrained Qwen2.5)
stage lm $PY train.py --config "$LM_CONFIG" --tokenizer "$WORK/data/tokenizer" --data "$WORK/codes" --out "$WORK/lm" \
  --resolution "$IMAGE_SIZE" --steps "$LM_STEPS" --batch-size "$LM_BATCH" --lr 1e-3 --schedule cosine --warmup-steps 100 \
  --min-lr-ratio 0.1 --weight-decay 0.1 --beta2 0.95 --p-drop-cond 0.1 --save-every 0 --keep 1 --log-every 10 \
  --no-progress

ship() {
  local lm="$WORK/lm/$(cat "$WORK/lm/latest")" tmp="$OUT.tmp$$"
  rm -rf "$tmp"
  mkdir -p "$tmp/vq"
  cp "$lm/config.json" "$lm/model.safetensors" "$lm/tokenizer.json" "$tmp/"
  # sample.py and eval.py take their default sampling settings from here: no repetition penalty (SimpleAR ships
  # 1.1), guidance 2 against the caption-dropout sequence the model trained on (SimpleAR's negative text is
  # foreign to it), the 10 likeliest codes (GenEval-nano at seed 100, n 8: 0.758, 0.696 without; cfg 3: 0.638)
  echo '{"repetition_penalty": 1.0, "guidance_scale": 2.0, "negative_prompt": "", "image_top_k": 10, "do_sample": true}' \
    > "$tmp/generation_config.json"
  cp "$WORK/vq/config.json" "$WORK/vq/model.safetensors" "$WORK/vq/psnr.json" "$WORK/vq/log.jsonl" "$tmp/vq/"
  cp "$WORK/lm/log.jsonl" "$tmp/log.jsonl"
  rm -rf "$OUT.old"
  if [ -e "$OUT" ]; then mv "$OUT" "$OUT.old"; fi
  mv "$tmp" "$OUT"
  rm -rf "$OUT.old"
}
stage ship ship
# the README's picture grid: a row per prompt of recipes/nano_prompts.txt, at the default sampling settings
samples() {
  $PY sample.py --ckpt "$OUT" --vq "$OUT/vq" --prompts-file recipes/nano_prompts.txt --size "$IMAGE_SIZE" --n 4 \
    --grid --out "$WORK/samples"
  cp "$WORK/samples/grid.png" "$OUT/samples_grid.png"
  cp recipes/nano_prompts.txt "$OUT/samples_prompts.txt"
}
stage samples samples
stage eval $PY eval.py --ckpt "$OUT" --vq "$OUT/vq" --n 4 --size "$IMAGE_SIZE" --out "$OUT/eval" $EVAL_ARGS

echo "== wall time per stage: ${report[*]}; total $(( $(date +%s) - total_start )) s"
echo "== held-out PSNR: $(cat "$OUT/vq/psnr.json" | tr -d '\n ')"
