#!/usr/bin/env bash
# The GPU checks still owed by open issues, one step per device call (each fits the 10-minute call limit).
# Usage on the GPU machine, after `source .gpukit/install.sh` (vLLM steps) from the repo root:
#   bash .ci/gpu/pending.sh STEP        results and logs under $OUT (default /tmp/out)
# Steps still owed after session 6, in the order worth running (times measured on the H200 or estimated). A one-chip
# hold may count 100 % of its held time (session 6, hold 2): plan every call to return something.
# Kernel-only steps (gpu-tests, tune-bits) need no gpu-kit: run them with PYTHONPATH=$PWD inside the part-upload
# calls, and never override PYTHONPATH once install.sh says "ready". layerbench needs the gpu-kit (it builds the vLLM
# plugin's OffloadRuntime).
#   kvtput    the issue-6 vLLM throughput rows, TWO calls: `bash .ci/gpu/kv_throughput.sh` (auto, mxmoe-K2V1.5;
#             170 s each, 2 in-engine warm-up prompts), then KVTP_VARIANTS=int4_per_token_head,fp8; merge on the CPU
#             machine with `python -m mxserve_kernels.bench.kv_throughput_parse --merge A.json B.json --json M.json`.
#             Session 6: auto 3,498 tok/s; K2V1.5 died on a one-token decode step (stride check, fixed f6158d0)  issue 6
#   layerbench  python -m mxserve.scheduler.layer_bench: 48 offloaded layers without vLLM, uniform + synth routing,
#             decode B=1/8/32 + a 2k prefill per budget; give it its own call (session 6: no row within 165 s, build
#             + warm-up of 48 nested layers; hold 1 died on Triton OutOfResources, fixed ead05f5)         issue 7
#   gluon     the Gluon int4 down-projection prototype (docs/kernels-gluon.md): GPU correctness + its bench vs
#             our Triton down projection (same weights/route, graphs, cold L2); kernel-only, ~2-3 min      issue 4
#   bench-moe bench_moe vs vLLM peers with the session-6 by_bits configs (W2 / mix ratios; ~3 min)   issue 4
#   gpu-tests PART=moe (SWAP / ASM / GSCALE), PART=kv (every KV decode path), PART=slot (the slot pool under the
#             host-einfo path); no vLLM; one call each; session 6's PART=moe call printed nothing before its
#             timeout: pytest -v now runs unbuffered, so each PASSED line survives a timeout          issues 4, 6, 7
#   offload-e2e  48 layers, ONE variant per call: VARIANTS=mxmoe_w4_off25, then gptq_w4_cpuoff25, then mxmoe_w4
#             (+ gptq_w4 for issue 5's 48-layer ratio); .ci/gpu/offload_e2e.sh; merge the JSONs with
#             `mxserve bench merge`; ~9 min each                                                       issues 7, 5
#   parallel  TP2 / EP vs 1 GPU (nvidia-h200-x2; mnnvl allreduce fusion now off; ~9 min)              issue 5
#   tune-bits per-precision decode configs (done for w2+mix25 in session 6; re-run after kernel changes)  issue 4
#   e2e / e2e48  mxserve bench e2e at 4 / 48 layers (GPTQ-W4, mxmoe W4, 2.5-bit mix) with the new configs     issue 5
# Kept for re-runs: kernels, tune, metrics, kvbench, e2e-peers, offload (graphs + metrics), soak
# (bash .ci/gpu/soak.sh SECONDS, <= 450 per call).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/logs"
export MXSERVE_TEST_LOG_DIR=$OUT/logs
export PYTHONUNBUFFERED=1  # output of a step cut by its timeout still comes back (session 6: a silent 270-s call)
step=${1:?usage: pending.sh kvtput|layerbench|gluon|bench-moe|gpu-tests|offload-e2e|parallel|tune-bits|e2e|e2e48|e2e-peers|kernels|tune|offload|metrics|kvbench}
DEADLINE=${DEADLINE:-540}  # seconds for one e2e command (the device call's 600 s, less install and copy)
case $step in
  kernels)
    MXSERVE_TEST_JSON=$OUT/kernels.json python3 -m pytest -q -m gpu tests/kernels/test_kernel_warmup.py \
      tests/kernels/test_offload_slot_moe.py tests/kernels/test_moe_kernels_gpu.py \
      -k "warm or slot or fma or kinds or split or ktile or asm" ;;
  gluon)
    MXSERVE_TEST_JSON=$OUT/gluon_tests.json timeout 240 python3 -m pytest -m gpu -v -rfE \
      tests/kernels/test_gluon_w4_gpu.py 2>&1 | grep -E "PASSED|FAILED|ERROR|Error|passed|failed" | tail -40
    timeout 200 python3 -m mxserve_kernels.bench.bench_gluon_w4 --json "$OUT/gluon_w4.json" --tokens 1,4,16,64 ;;
  bench-moe)
    python3 -m mxserve_kernels.bench.bench_moe --tokens 1,4,16,64 --json "$OUT/bench_moe_decode.json" \
      --plot "$OUT/moe_decode.png" --peers mxserve.vllm_plugin.bench_peers:moe_peers 2>&1 | tee "$OUT/bench.log" | tail -30 ;;
  tune)
    python3 -m mxserve_kernels.bench.tune_moe --models qwen3-30b-a3b --tokens 1,4,16,64 --quick --no-cost \
      --archive "$OUT/configs.tar" 2>&1 | grep -v "^  skip" | tee "$OUT/tune.log"
    python3 -m mxserve_kernels.bench.bench_moe --tokens 1,4,16,64 --json "$OUT/bench_moe_decode.json" \
      --plot "$OUT/moe_decode.png" --peers mxserve.vllm_plugin.bench_peers:moe_peers > "$OUT/bench.log" 2>&1 ;;
  offload)
    OUT=$OUT bash .ci/gpu/offload_diag.sh ;;
  kvtput)
    OUT=$OUT timeout 570 bash .ci/gpu/kv_throughput.sh ;;
  offload-e2e)
    OUT=$OUT VARIANTS=${VARIANTS:-mxmoe_w4_off25} bash .ci/gpu/offload_e2e.sh ;;
  layerbench)
    timeout 300 python3 -m mxserve.scheduler.layer_bench --json "$OUT/offload_layer_bench.json" ;;
  gpu-tests)  # PART=moe | kv | slot, one call each (session 5: 20 MoE tests took > 210 s, 10 KV tests 230 s: compiles)
    case ${PART:-moe} in
      moe)  files=tests/kernels/test_moe_kernels_gpu.py; sel="swap or asm or gscale" ;;
      kv)   files=tests/kernels/test_attention_kv.py; sel="path or store" ;;
      slot) files=tests/kernels/test_offload_slot_moe.py; sel="slot or kinds" ;;
      *) echo "PART must be moe, kv or slot" >&2; exit 2 ;;
    esac
    MXSERVE_TEST_JSON=$OUT/gpu_tests_${PART:-moe}.json timeout 560 python3 -m pytest -m gpu -v -rfE --durations=10 \
      $files -k "$sel" 2>&1 | tee "$OUT/gpu_tests_${PART:-moe}.log" | grep -E "PASSED|FAILED|ERROR|passed|failed" | tail -60 ;;
  tune-bits)
    python3 -m mxserve_kernels.bench.tune_moe --models qwen3-30b-a3b --kinds w2,mix25 --tokens "${TOKENS:-1,4}" --quick \
      --no-cost --archive "$OUT/configs.tar" 2>&1 | grep -v "^  skip" | tee "$OUT/tune_bits.log" ;;
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
