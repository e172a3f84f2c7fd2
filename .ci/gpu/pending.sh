#!/usr/bin/env bash
# The GPU checks still owed by open issues, one step per device call (each fits the 10-minute call limit).
# Usage on the GPU machine, after `source .gpukit/install.sh` (vLLM steps) from the repo root:
#   bash .ci/gpu/pending.sh STEP        results and logs under $OUT (default /tmp/out)
# Steps still owed after session 4 (in the order worth running; times measured on the H200 or estimated). Done in
# session 4 and kept for re-runs: kernels, tune, metrics, kvbench, e2e (4 layers), offload (graphs + metrics).
#   e2e48     48 layers, VARIANTS (default gptq_w4,mxmoe_w4) per call; variants that cannot start before the
#             deadline are recorded as skipped: run them in the next call, then merge all e2e48-*.json   issue 5
#   parallel  TP2 / EP vs 1 GPU (needs the nvidia-h200-x2 kind; never run yet, ~5 min)         issue 5
#   offload   the whole like-for-like offload test incl. the control and eager cases (~6 min)  issue 7
#   e2e-peers bf16 / fp8 at 4 layers (~4-5 min); then on any machine:                          issue 5
#             mxserve bench merge e2e.json e2e-peers.json --json e2e-all.json --markdown e2e-all.md
#   tune      decode re-tune (FMA, split-K, KT, ASM) then bench_moe vs vLLM peers at T<=64 (~7 min)   issue 4
#             (configs come back as $OUT/configs.tar: untar into mxserve_kernels/moe/configs and commit)
#   kernels   warm-up (sweeps every T after it) + offload slot-pool exactness + FMA / split-K / KT / ASM grid
#             (no vLLM, ~4-5 min)                                                            issues 4, 7
#   e2e       mxserve bench e2e, 4-layer A3B, GPTQ-W4 / mxmoe W4 / 2.5-bit mix, B=1,8,32,256 (~5 min)  issue 5
#   metrics   /metrics scrape under load, default compile (~2 min)                           issue 9
#   kvbench   KV decode kernel sweep vs vLLM FA3 (~3 min)                                     issue 6
#   soak      bash .ci/gpu/soak.sh SECONDS (<= 450 per call)                                  issue 9
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/logs"
export MXSERVE_TEST_LOG_DIR=$OUT/logs
step=${1:?usage: pending.sh kernels|tune|offload|parallel|e2e|e2e-peers|e2e48|metrics|kvbench}
DEADLINE=${DEADLINE:-540}  # seconds for one e2e command (the device call's 600 s, less install and copy)
case $step in
  kernels)
    MXSERVE_TEST_JSON=$OUT/kernels.json python3 -m pytest -q -m gpu tests/kernels/test_kernel_warmup.py \
      tests/kernels/test_offload_slot_moe.py tests/kernels/test_moe_kernels_gpu.py \
      -k "warm or slot or fma or kinds or split or ktile or asm" ;;
  tune)
    python3 -m mxserve_kernels.bench.tune_moe --models qwen3-30b-a3b --tokens 1,4,16,64 --quick --no-cost \
      --archive "$OUT/configs.tar" 2>&1 | grep -v "^  skip" | tee "$OUT/tune.log"
    python3 -m mxserve_kernels.bench.bench_moe --tokens 1,4,16,64 --json "$OUT/bench_moe_decode.json" \
      --plot "$OUT/moe_decode.png" --peers mxserve.vllm_plugin.bench_peers:moe_peers > "$OUT/bench.log" 2>&1 ;;
  offload)
    OUT=$OUT bash .ci/gpu/offload_diag.sh ;;
  parallel)
    MXSERVE_TEST_JSON=$OUT/parallel.json timeout 560 python3 -m pytest -q -m gpu -rA --basetemp=/tmp/ptpar \
      tests/integration/test_vllm_parallel.py 2>&1 | tail -60
    rc=${PIPESTATUS[0]}; mkdir -p "$OUT/parallel_logs"
    find /tmp/ptpar -name "*.log" -exec sh -c 'tail -c 200000 "$1" > "$2/$(basename "$(dirname "$1")")-$(basename "$1")"' _ {} "$OUT/parallel_logs" \;
    exit "$rc" ;;
  e2e|e2e-peers|e2e48)
    # engine runner logs stay in /tmp/e2e*/logs: copied to $OUT at the end, also on failure; per-variant timeouts
    # derive from the work (bench_runner.plan_budget_s) and shrink to fit --deadline-s
    case $step in
      e2e) layers=4; variants=gptq_w4,mxmoe_w4,mxmoe_mix25; name=e2e ;;
      e2e-peers) layers=4; variants=bf16,fp8; name=e2e-peers ;;
      e2e48) layers=48; variants=${VARIANTS:-gptq_w4,mxmoe_w4}; name=e2e48-${variants//,/-} ;;
    esac
    timeout $((DEADLINE + 20)) mxserve bench e2e --preset qwen3-30b-a3b --layers $layers --batch-sizes 1,8,32,256 \
      --variants $variants --deadline-s "$DEADLINE" --out /tmp/e2e$layers --json "$OUT/$name.json" \
      --markdown "$OUT/$name.md"
    rc=$?; cp -r /tmp/e2e$layers/logs "$OUT/${name}_logs"; exit $rc ;;
  metrics)
    OUT=$OUT python3 -m pytest -q -m gpu tests/integration/test_metrics_gpu.py ;;
  kvbench)
    python3 -m mxserve_kernels.bench.bench_kv --json "$OUT/bench_kv.json" ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
