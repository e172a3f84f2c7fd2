#!/usr/bin/env bash
# Issue 7 in one device call: is expert offload inside vLLM exact, and was a stale CUDA-graph input the cause?
# Usage on the GPU machine, from the repo root: source .gpukit/install.sh && bash .ci/gpu/offload_diag.sh
# Results: $OUT/offload_vllm.json (keys offload_vllm_graphs / _metrics / _control / _eager), server logs $OUT/logs.
# Tests run in priority order (tests/integration/test_offload_vllm.py; ~5-6 min, 4 servers + a short control):
#   1. graphs   offload 0.25 vs 1.0, both the hook's PIECEWISE split, VLLM_LOGGING_LEVEL=DEBUG (vLLM asserts every
#               graph piece is replayed at its capture-time input addresses): bit-exact prompt logprobs, same tokens
#   2. metrics  mxserve:expert_* counters move on /metrics, h2d bytes included; nothing moves at budget 1.0
#   3. control  resident MxMoEMethod (fresh output tensor) under the same split + DEBUG must trip that assertion
#   4. eager    resident vs offload 0.25, both --enforce-eager: bit-exact
# Faster subset (2 servers, ~2.5 min): add -k "graphs or metrics".
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/logs"
export MXSERVE_TEST_LOG_DIR=$OUT/logs MXSERVE_TEST_JSON=$OUT/offload_vllm.json
timeout 540 python3 -m pytest -q -m gpu -rA tests/integration/test_offload_vllm.py "$@" 2>&1 | tail -40
rc=${PIPESTATUS[0]}
grep -l "Input addresses for cudagraphs are different" "$OUT"/logs/*.log 2>/dev/null | sed 's/^/address assertion in: /'
exit "$rc"
