#!/usr/bin/env bash
# GPU smoke test of `vllm serve -q mxmoe` on a tiny quantized checkpoint; full server log to $OUT (or /tmp).
# Usage (on the GPU machine, after `source .gpukit/install.sh`): bash .ci/gpu/serve_smoke.sh [bits] [extra vllm args]
set -uo pipefail
OUT=${OUT:-/tmp}; BITS=${1:-4.5}; shift || true
W=/tmp/smoke; rm -rf $W; mkdir -p $W
python3 - <<PY
from mxserve.models.tiny import make_tiny
from mxserve.quant.api import quantize_checkpoint
src = make_tiny("qwen3_moe", "$W/src", layers=2, experts=8, top_k=2, hidden=256, inter=128, vocab=1024, heads=4,
                kv_heads=2, head_dim=64)
quantize_checkpoint(str(src), "$W/q", bits=$BITS, calib=None, method="rtn", uniform=True, group_size=64,
                    progress=False)
PY
timeout 300 vllm serve $W/q -q mxmoe --port 8011 --max-model-len 512 --gpu-memory-utilization 0.2 "$@" \
  > $OUT/serve_smoke.log 2>&1 &
pid=$!
for i in $(seq 1 280); do
  curl -sf localhost:8011/health >/dev/null && break
  kill -0 $pid 2>/dev/null || break
  sleep 1
done
curl -s localhost:8011/v1/completions -H 'Content-Type: application/json' \
  -d '{"model": "'$W/q'", "prompt": "def main(", "max_tokens": 8, "temperature": 0}' | tee $OUT/serve_smoke.json
echo; kill $pid 2>/dev/null; wait $pid 2>/dev/null
grep -nE "Error|error|Traceback|Exception" $OUT/serve_smoke.log | grep -v "APIServer" | head -30
