#!/usr/bin/env bash
# The nano recipe: SimpleAR's whole pipeline at laptop scale, from nothing to the shipped checkpoints/nano/.
#
#     bash recipes/nano.sh                       # ~1 h on 2 CPU cores; work files in runs/nano/
#     THREADS=1 bash recipes/nano.sh             # on a machine someone else is using too (see below)
#     WORK=/tmp/nano OUT=/tmp/nano-ship bash recipes/nano.sh   # elsewhere; OUT is what sample.py --ckpt takes
#
# Stages (each prints its wall time, the total at the end):
#   1. data    64 px shapes scenes (PNG + meta.jsonl) and the byte-level BPE of their captions (data.py shapes)
#   2. vq      a Cosmos-architecture tokenizer, preset nano: 64 px -> 8x8 codes of 1,000 (train_vq.py)
#   3. codes   every training image encoded to codes (data.py prepare)
#   4. lm+decoder  a Qwen2-architecture LM, preset nano, from scratch on SimpleAR's sequence layout (train.py),
#              and meanwhile, on the other core, the tokenizer's decoder alone (train_vq.py --decoder-only)
#   5. ship    LM + tokenizer.json + generation_config.json + vq/ + logs copied into $OUT
#   6. samples the README's picture grid (sample.py)
#   7. eval    GenEval-nano at sample.py's default sampling settings, 64 px (eval.py)
#
# Threads: torch's default (all cores) is right on an idle machine. When another process holds a core, each
# OpenMP thread waits for its peers at every op and two threads ran 20x slower than one here; THREADS=1 then.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-runs/nano}
OUT=${OUT:-checkpoints/nano}
export OMP_NUM_THREADS=${THREADS:-$(nproc)}
LM_THREADS=$(( OMP_NUM_THREADS > 1 ? OMP_NUM_THREADS - 1 : 1 ))  # one core is the decoder's during stage 4
PY=${PYTHON:-python}
# The sizes of the shipped run; tests/test_nano.py shrinks them all for a smoke run.
N_IMAGES=${N_IMAGES:-30000}
IMAGE_SIZE=${IMAGE_SIZE:-64}
VQ_STEPS=${VQ_STEPS:-2000}
VQ_IMAGES=${VQ_IMAGES:-20000}
LM_CONFIG=${LM_CONFIG:-nano}
LM_STEPS=${LM_STEPS:-1200}
LM2_STEPS=${LM2_STEPS:-1400}
LM_BATCH=${LM_BATCH:-32}
DEC_STEPS=${DEC_STEPS:-3000}
EVAL_ARGS=${EVAL_ARGS:-}

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
stage data $PY data.py shapes --out "$WORK/data" --n "$N_IMAGES" --size "$IMAGE_SIZE" --vocab-size 512
stage vq $PY train_vq.py --config nano --out "$WORK/vq" --size "$IMAGE_SIZE" --steps "$VQ_STEPS" --train-images "$VQ_IMAGES" --batch-size 32 --threads "$OMP_NUM_THREADS" --no-progress
stage codes $PY data.py prepare --meta "$WORK/data/meta.jsonl" --vq "$WORK/vq" --resolution "$IMAGE_SIZE" --out "$WORK/codes" --batch-size 64
# The LM learns on one core while the tokenizer's decoder trains on (the codes stay: the encoder is frozen),
# niced: on a busy machine the LM, the longer of the two, keeps its core.
# From scratch, a tiny model wants a far higher lr than SimpleAR's 1e-4 (which finetunes a pretrained Qwen2.5).
lm_and_decoder() {
  nice -n 10 $PY train_vq.py --init "$WORK/vq" --decoder-only --out "$WORK/vq-dec" --size "$IMAGE_SIZE" --steps "$DEC_STEPS" \
    --train-images "$VQ_IMAGES" --batch-size 32 --lr 5e-4 --warmup-steps 0 --threads 1 --seed 1 --no-progress \
    > "$WORK/vq-dec.out" 2>&1 &
  local dec=$!
  OMP_NUM_THREADS=$LM_THREADS $PY train.py --config "$LM_CONFIG" --tokenizer "$WORK/data/tokenizer" \
    --data "$WORK/codes" --out "$WORK/lm" --resolution "$IMAGE_SIZE" --steps "$LM_STEPS" --batch-size "$LM_BATCH" \
    --lr 1e-3 --schedule cosine --warmup-steps 100 --min-lr-ratio 0.1 --weight-decay 0.1 --beta2 0.95 \
    --p-drop-cond 0.1 --save-every 0 --keep 1 --log-every 10 --no-progress
  # a warm restart (new cosine, new data order): the shipped model had this second phase because the first alone
  # drew broken shapes; one schedule of LM_STEPS + LM2_STEPS is the natural thing to try next
  OMP_NUM_THREADS=$LM_THREADS $PY train.py --init "$WORK/lm/$(cat "$WORK/lm/latest")" --data "$WORK/codes" \
    --out "$WORK/lm2" --resolution "$IMAGE_SIZE" --steps "$LM2_STEPS" --batch-size "$LM_BATCH" --lr 6e-4 \
    --schedule cosine --warmup-steps 50 --min-lr-ratio 0.1 --weight-decay 0.1 --beta2 0.95 --p-drop-cond 0.1 \
    --seed 1 --save-every 0 --keep 1 --log-every 10 --no-progress
  wait $dec || { cat "$WORK/vq-dec.out" >&2; return 1; }
  tail -n 1 "$WORK/vq-dec.out"
}
stage lm+decoder lm_and_decoder

ship() {
  local lm="$WORK/lm2/$(cat "$WORK/lm2/latest")" tmp="$OUT.tmp$$"
  rm -rf "$tmp"
  mkdir -p "$tmp/vq"
  cp "$lm/config.json" "$lm/model.safetensors" "$lm/tokenizer.json" "$tmp/"
  # sample.py and eval.py take their default sampling settings from here: no repetition penalty (SimpleAR ships
  # 1.1), guidance 2 against the caption-dropout sequence the model trained on (SimpleAR's negative text is
  # foreign to it: 0.30 GenEval-nano at cfg 6 with it, 0.45 this way)
  echo '{"repetition_penalty": 1.0, "guidance_scale": 2.0, "negative_prompt": "", "do_sample": true}' \
    > "$tmp/generation_config.json"
  cp "$WORK/vq-dec/config.json" "$WORK/vq-dec/model.safetensors" "$WORK/vq-dec/psnr.json" "$tmp/vq/"
  cp "$WORK/vq/log.jsonl" "$tmp/vq/log.jsonl"
  cp "$WORK/vq/psnr.json" "$tmp/vq/psnr_before_decoder.json"
  cp "$WORK/vq-dec/log.jsonl" "$tmp/vq/log_decoder.jsonl"
  cp "$WORK/lm/log.jsonl" "$tmp/log.jsonl"
  cp "$WORK/lm2/log.jsonl" "$tmp/log_phase2.jsonl"
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
