#!/usr/bin/env bash
# The issue's KV-cache throughput rows in ONE device call (<= 9 min): 4-layer Qwen3-30B-A3B geometry, random weights,
# `vllm bench throughput` random 8192 in / 256 out for --kv-cache-dtype auto, mxmoe K2V1.5, int4_per_token_head, fp8,
# mxmoe K4V4 (in that order: the core ratios first), each under its own timeout; a variant that would start after
# the total budget is recorded as not_run. Output tok/s and vLLM's "GPU KV cache size" per variant + ratios go to
# $OUT/kv_throughput.json (rewritten atomically after every variant; a failed variant keeps the engine core's first
# error block + root_cause, see kv_throughput_parse.py). Output folder = at most 6 files: the JSON + one log per
# variant in $OUT/kv_throughput_logs/ (calibration output prepended, exit status appended as "kv_throughput: rc=N");
# make-tiny / scratch files stay in $WORK (/tmp/kvtp), make-tiny's tail is printed if it fails. (2026-11-22: the
# K2V1.5 engine died in its first 8k prefill and its traceback was lost: 8 files did not come back.)
# Usage (GPU machine, repo root): source .gpukit/install.sh && bash .ci/gpu/kv_throughput.sh [num_prompts]
#   env: KVTP_TIMEOUT (per variant, s, default 110), KVTP_BUDGET (total, s, default 500), KVTP_VARIANTS (comma list)
# --max-model-len 10240, not 8448: on 2026-11-22 every variant died on "max_model_len is greater than the sum of
# prompt_len and expected_output_len" at 8448 (the random dataset's re-tokenized prompts run past 8192 tokens).
# Prefill: --max-num-batched-tokens 16384 = two ~8k prompts per step; prompts run a few tokens past 8192, so the
# second prompt of a step is usually split (chunked prefill): ours takes the fused causal flash path for chunks
# without cached context and the row-chunked masked path (temporaries <= prefill.WORKSPACE_BYTES) for the rest;
# decode = the packed-page kernel (default path).
set -uo pipefail
OUT=${OUT:-/tmp}; NP=${1:-64}; TMO=${KVTP_TIMEOUT:-110}; BUDGET=${KVTP_BUDGET:-500}
VARIANTS=${KVTP_VARIANTS:-auto,mxmoe-K2V1.5,int4_per_token_head,fp8,mxmoe-K4V4}
LOGS=$OUT/kv_throughput_logs; WORK=${KVTP_WORK:-/tmp/kvtp}; BASE=${KVTP_BASE:-/tmp/a3b4}; T0=$(date +%s)
mkdir -p "$LOGS" "$WORK"
elapsed() { echo $(( $(date +%s) - T0 )); }
parse() {
  python3 -m mxserve_kernels.bench.kv_throughput_parse --logs "$LOGS" --variants "$VARIANTS" \
    --json "$OUT/kv_throughput.json" \
    --meta "{\"num_prompts\": $NP, \"input_len\": 8192, \"output_len\": 256, \"timeout_s\": $TMO, \"elapsed_s\": $(elapsed)}"
}
if [ ! -f $BASE/config.json ]; then
  mxserve make-tiny --preset qwen3-30b-a3b --layers 4 --out $BASE --device cuda > "$WORK/make_tiny.log" 2>&1 \
    || { echo "make-tiny failed"; tail -20 "$WORK/make_tiny.log"; }
fi
echo "model ready at $(elapsed) s"
calibrated() {  # $1 = K2V1.5 | K4V4: weights shared by symlink, own config.json, calibrated in place
  local d=$BASE-$1
  if [ ! -f "$d/.calibrated" ]; then
    rm -rf "$d"; mkdir -p "$d"
    for f in $BASE/*; do [ "$(basename "$f")" = config.json ] || ln -s "$f" "$d/"; done
    cp $BASE/config.json "$d/config.json"
    timeout 150 mxserve calibrate-kv "$d" --kv "$1" --device cuda --num-seqs 2 --seq-len 256 \
      > "$WORK/calibrate_$1.log" 2>&1 && touch "$d/.calibrated"
  fi
  echo "$d"
}
for v in ${VARIANTS//,/ }; do
  if [ "$(elapsed)" -gt "$BUDGET" ]; then echo "$v: not run (total budget ${BUDGET}s spent)"; continue; fi
  case $v in
    mxmoe-*) M=$(calibrated "${v#mxmoe-}"); ARGS=(-q mxmoe)
      if [ ! -f "$M/.calibrated" ]; then  # calibration failed: record it as this variant's failure
        { cat "$WORK/calibrate_${v#mxmoe-}.log"; echo "kv_throughput: rc=1"; } > "$LOGS/$v.log"
        parse > /dev/null; continue
      fi ;;
    *) M=$BASE; ARGS=(--kv-cache-dtype "$v") ;;
  esac
  echo "== $v at $(elapsed) s: $M ${ARGS[*]}"
  timeout -k 10 "$TMO" vllm bench throughput --model "$M" "${ARGS[@]}" --dataset-name random \
    --random-input-len 8192 --random-output-len 256 --num-prompts "$NP" --max-model-len 10240 \
    --max-num-batched-tokens 16384 --seed 0 > "$WORK/$v.log" 2>&1
  rc=$?
  { case $v in mxmoe-*) echo "== calibrate-kv ${v#mxmoe-}"; cat "$WORK/calibrate_${v#mxmoe-}.log" 2>/dev/null;
                        echo "== bench";; esac
    cat "$WORK/$v.log"; echo "kv_throughput: rc=$rc"; } > "$LOGS/$v.log"
  grep -E "Throughput:|GPU KV cache size" "$LOGS/$v.log" | tail -2
  parse | grep -F "$v " | grep -F "cause:" || true
done
parse
echo "total $(elapsed) s"
