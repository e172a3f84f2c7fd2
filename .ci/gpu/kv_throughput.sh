#!/usr/bin/env bash
# The issue's KV-cache throughput rows: 4-layer Qwen3-30B-A3B geometry, random weights, `vllm bench throughput`
# random 8192 in / 256 out, one variant at a time under its own timeout. Output tok/s and vLLM's "GPU KV cache size"
# per variant + ratios go to $OUT/kv_throughput.json (rewritten atomically after every variant; a failed variant keeps
# the engine core's first error block + root_cause; a timed-out one says WHEN: "timeout after engine init at N s
# (killed at M s ...); last progress: <last tqdm bar>; last stats: <last Engine 000 line>", see kv_throughput_parse.py).
# Output folder = the JSON + one log per variant in $OUT/kv_throughput_logs/ (calibration output prepended, then
# "kv_throughput: start=... end=..." and "kv_throughput: rc=N" trailers); scratch stays in $WORK (/tmp/kvtp).
#
# Usage (GPU machine, repo root), TWO device calls of <= 10 min (one variant needs up to ~150 s on a cold machine):
#   source .gpukit/install.sh && OUT=$OUT bash .ci/gpu/kv_throughput.sh                     # auto, mxmoe-K2V1.5
#   source .gpukit/install.sh && KVTP_VARIANTS=int4_per_token_head,fp8 OUT=$OUT bash .ci/gpu/kv_throughput.sh
#   then, here: python -m mxserve_kernels.bench.kv_throughput_parse --merge A/kv_throughput.json \
#                 B/kv_throughput.json --json kv_throughput.json        # one JSON, ratios across both calls
#   env: KVTP_VARIANTS (comma list; also mxmoe-K4V4), KVTP_TIMEOUT (per variant, s, default 170), KVTP_BUDGET
#   (a variant starts only if elapsed + KVTP_TIMEOUT <= budget, default 560), KVTP_WARMUPS (untimed warm-up prompts
#   inside each variant's engine, default 2), KVTP_PREWARM=1 (an untimed 4-prompt run of the first variant before
#   the timed ones, to fill a cold machine's import / model-inspection / compile caches; costs one engine start).
#   [num_prompts] = $1 (default 64).
#
# Why 170 s and warm-ups (session 6, /work/.device/5): every variant's wall time is process start (imports, random
# dataset, model inspection: 10-45 s, worst on a cold machine) + engine init (vLLM's own "init engine" 43-57 s:
# torch.compile, CUDA-graph capture; fp8's first compile 27 s) + scheduler start (vLLM's BlockPool builds one Python
# object per KV block: 7.1 M blocks for K2V1.5's 114 M tokens at block 16, ~2x int4's 3.7 M, which took ~4 s) + the
# 64 prompts (int4: 11 s) + teardown (~5 s). int4 finished 20 s after its init, 88 s after its first log line, inside
# 110 s; K2V1.5 and fp8 finished init 88 s / 86 s after their first log line and were killed <= 22 s later, before
# "Rendering prompts" (the bench renders prompts before the first step): not stuck in our attention, out of time.
# --num-warmups runs 2 prompts (one 16k prefill step with a chunked remainder, then decode) in the same engine before
# the timed region, so first-use Triton JITs (our store / decode variants, fused_moe shapes, int4's _attn_packed)
# are not in the measured tok/s; vLLM's timer covers only the timed generate, so a longer timeout biases nothing.
# --max-model-len 10240 (the random dataset's re-tokenized prompts run a few tokens past 8192); prefill
# --max-num-batched-tokens 16384 = two ~8k prompts per step, the second usually split (chunked prefill: ours takes the
# fused causal flash path without cached context and the row-chunked masked path with it); decode = packed pages.
set -uo pipefail
OUT=${OUT:-/tmp}; NP=${1:-64}; TMO=${KVTP_TIMEOUT:-170}; BUDGET=${KVTP_BUDGET:-560}; WARM=${KVTP_WARMUPS:-2}
VARIANTS=${KVTP_VARIANTS:-auto,mxmoe-K2V1.5}
LOGS=$OUT/kv_throughput_logs; WORK=${KVTP_WORK:-/tmp/kvtp}; BASE=${KVTP_BASE:-/tmp/a3b4}; T0=$(date +%s)
mkdir -p "$LOGS" "$WORK"
elapsed() { echo $(( $(date +%s) - T0 )); }
parse() {
  python3 -m mxserve_kernels.bench.kv_throughput_parse --logs "$LOGS" --variants "$VARIANTS" \
    --json "$OUT/kv_throughput.json" \
    --meta "{\"num_prompts\": $NP, \"input_len\": 8192, \"output_len\": 256, \"timeout_s\": $TMO, \"warmups\": $WARM, \"elapsed_s\": $(elapsed)}"
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
stamp() { date '+%m-%d %H:%M:%S'; }  # vLLM's log stamp format (same clock), read by kv_throughput_parse
model_args() {  # $1 = variant -> M (model dir) and ARGS; returns 1 if calibration failed
  case $1 in
    mxmoe-*) M=$(calibrated "${1#mxmoe-}"); ARGS=(-q mxmoe); [ -f "$M/.calibrated" ] ;;
    *) M=$BASE; ARGS=(--kv-cache-dtype "$1") ;;
  esac
}
bench() {  # $1 = num prompts, $2 = input len, $3 = output len, $4 = warm-ups, $5 = log; uses M, ARGS
  timeout -k 10 "$TMO" vllm bench throughput --model "$M" "${ARGS[@]}" --dataset-name random \
    --random-input-len "$2" --random-output-len "$3" --num-prompts "$1" --num-warmups "$4" --max-model-len 10240 \
    --max-num-batched-tokens 16384 --seed 0 > "$5" 2>&1
}
if [ "${KVTP_PREWARM:-0}" = 1 ]; then
  v=${VARIANTS%%,*}
  if model_args "$v"; then
    echo "== prewarm $v (untimed, 4 prompts) at $(elapsed) s"
    bench 4 1024 32 0 "$WORK/prewarm.log"; echo "prewarm rc=$? at $(elapsed) s"
  fi
fi
for v in ${VARIANTS//,/ }; do
  if [ $(( $(elapsed) + TMO )) -gt "$BUDGET" ]; then
    echo "$v: not run ($(elapsed) s + ${TMO} s timeout > budget ${BUDGET} s)"; continue
  fi
  if ! model_args "$v"; then  # calibration failed: record it as this variant's failure
    { cat "$WORK/calibrate_${v#mxmoe-}.log"; echo "kv_throughput: rc=1"; } > "$LOGS/$v.log"
    parse > /dev/null; continue
  fi
  if [ $(( $(elapsed) + TMO )) -gt "$BUDGET" ]; then  # calibration (<= 150 s) may have eaten the budget
    echo "$v: not run after calibration ($(elapsed) s + ${TMO} s > budget ${BUDGET} s)"; continue
  fi
  echo "== $v at $(elapsed) s: $M ${ARGS[*]}"
  t0=$(stamp)
  bench "$NP" 8192 256 "$WARM" "$WORK/$v.log"
  rc=$?
  { case $v in mxmoe-*) echo "== calibrate-kv ${v#mxmoe-}"; cat "$WORK/calibrate_${v#mxmoe-}.log" 2>/dev/null;
                        echo "== bench";; esac
    cat "$WORK/$v.log"; echo; echo "kv_throughput: start=$t0 end=$(stamp)"; echo "kv_throughput: rc=$rc"
  } > "$LOGS/$v.log"
  grep -E "Throughput:|GPU KV cache size" "$LOGS/$v.log" | tail -2
  parse | grep -F "$v " | grep -E "cause:|timeout" || true
done
parse
echo "total $(elapsed) s"
