#!/usr/bin/env bash
# Soak + fault run of `vllm serve CKPT --quantization mxmoe` (default compilation: torch.compile + CUDA graphs) on a
# tiny uniform-W4 Qwen3-MoE checkpoint made here, loopback only, no network needed (issue #9).
# Usage on the GPU machine, from the repo root, after `source .gpukit/install.sh`:
#   bash .ci/gpu/soak.sh SECONDS [--embedded]        results under $OUT (default /tmp/out)
# SECONDS of load in all: a sweep of min(120, max(30, SECONDS/6)) s (latency vs offered load, PNG) and the soak
# (loadtests.soak: 8 users, a fault every 10 s) for the rest. Checkpoint, server start and warm-up get 150 s more:
# the whole run ends within SECONDS + 150 s (a slow start shortens the soak; soak_summary.json says so).
# --embedded serves with the embedded CPU engine (`mxserve serve --engine embedded`) instead: the CPU check.
# Writes: soak.json, sweep.json/.md/.png, warmup.json, metrics_{before,after}.txt, rss.jsonl, server.log,
# soak_summary.json. Exit 0 only with 0 lost requests, faults answered, server counters matching the clients and
# flat memory (loadtests.soak_check).
set -uo pipefail
SECS=${1:?usage: soak.sh SECONDS [--embedded]}
ENGINE=vllm; [ "${2:-}" = "--embedded" ] && ENGINE=embedded
[ "$SECS" -ge 60 ] 2>/dev/null || { echo "soak.sh: SECONDS must be an integer >= 60, got $SECS" >&2; exit 2; }
# (the bound below assumes SECONDS + 150 <= 600 s for one device call: SECONDS <= 450)
T0=$(date +%s); END=$((T0 + SECS + 150 - 10))                  # 10 s margin for the kill and the verdict
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
W=$(mktemp -d /tmp/soak.XXXXXX)
PORT=${SOAK_PORT:-8013}; URL=http://127.0.0.1:$PORT
SWEEP=$((SECS / 6)); [ $SWEEP -lt 30 ] && SWEEP=30; [ $SWEEP -gt 120 ] && SWEEP=120
SOAK=$((SECS - SWEEP)); MINSOAK=$((SOAK / 4)); [ $MINSOAK -lt 20 ] && MINSOAK=20
TAIL=80   # after start-up, besides the load: warm-up <= 20, soak drain <= 25, sweep drain <= 20, scrapes + kill 15
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 TOKENIZERS_PARALLELISM=false
unset PROMETHEUS_MULTIPROC_DIR                                   # would hide vLLM's own /metrics series
PY=python3
log() { echo "[soak.sh +$(($(date +%s) - T0))s] $*"; }
left() { echo $((END - $(date +%s))); }
srv=""; smp=""
cleanup() {
  [ -n "$smp" ] && touch "$W/stop" && wait "$smp" 2>/dev/null
  if [ -n "$srv" ] && kill -0 "$srv" 2>/dev/null; then
    kill -INT "$srv" 2>/dev/null
    for _ in $(seq 1 10); do kill -0 "$srv" 2>/dev/null || break; sleep 1; done
    kill -KILL "$srv" 2>/dev/null
  fi
  srv=""
}
trap cleanup EXIT

log "checkpoint -> $W/ckpt (engine $ENGINE, load ${SECS}s = sweep ${SWEEP}s + soak ${SOAK}s)"
timeout 120 $PY - "$W" <<'PY' || { echo "soak.sh: checkpoint build failed" >&2; exit 1; }
import sys
from mxserve.models.tiny import make_tiny
from mxserve.quant.api import quantize_checkpoint
w = sys.argv[1]
src = make_tiny("qwen3_moe", f"{w}/src", layers=2, experts=8, top_k=2, hidden=256, inter=128, vocab=1024, heads=4,
                kv_heads=2, head_dim=64)
quantize_checkpoint(str(src), f"{w}/ckpt", bits=4.5, calib=None, method="rtn", uniform=True, group_size=64,
                    progress=False)
PY
log "checkpoint done"

if [ "$ENGINE" = vllm ]; then
  vllm serve "$W/ckpt" --quantization mxmoe --host 127.0.0.1 --port "$PORT" --served-model-name tiny-mxmoe \
    --max-model-len 1024 --gpu-memory-utilization 0.15 --max-num-seqs 16 > "$OUT/server.log" 2>&1 &
else
  MXSERVE_FORCE_EMBEDDED=1 mxserve serve "$W/ckpt" --engine embedded --host 127.0.0.1 --port "$PORT" \
    --served-model-name tiny-mxmoe --max-model-len 1024 --max-num-seqs 16 --max-waiting 256 \
    > "$OUT/server.log" 2>&1 &
fi
srv=$!
# start-up gets the 150 s allowance (less TAIL); past it the soak shrinks (to SOAK/4, >= 20 s) rather than the run
# overrunning
until curl -sf "$URL/health" >/dev/null; do
  if ! kill -0 "$srv" 2>/dev/null; then
    echo "soak.sh: server exited during start-up; log tail:" >&2; tail -40 "$OUT/server.log" >&2; exit 1; fi
  if [ "$(left)" -le $((SWEEP + MINSOAK + TAIL)) ]; then
    echo "soak.sh: server not healthy in time; log tail:" >&2; tail -40 "$OUT/server.log" >&2; exit 1; fi
  sleep 2
done
log "server healthy"

# untimed warm-up: first-use compiles, allocator growth (the memory check is about steady state)
timeout 20 $PY -m loadtests.run --base-url "$URL" --scenario chat --duration 8 --max-requests 64 --timeout 30 \
  --no-fail-on-slo --json "$OUT/warmup.json" > "$W/warmup.log" 2>&1 || log "warm-up returned $? (continuing)"

curl -sf "$URL/metrics" > "$OUT/metrics_before.txt" || log "WARNING: /metrics scrape failed"
: > "$OUT/rss.jsonl"
$PY -m loadtests.procmem --pid "$srv" --out "$OUT/rss.jsonl" --interval 5 --stop-file "$W/stop" \
  --max-seconds "$SECS" &
smp=$!

# the soak gets what is left after the sweep and the tail (drains, scrapes, kill)
SOAK_RUN=$(( $(left) - SWEEP - TAIL + 20 )); [ "$SOAK_RUN" -gt "$SOAK" ] && SOAK_RUN=$SOAK
[ "$SOAK_RUN" -lt 20 ] && { echo "soak.sh: only ${SOAK_RUN}s left for the soak" >&2; exit 1; }
[ "$SOAK_RUN" -lt "$SOAK" ] && log "WARNING: slow start-up: soak shortened to ${SOAK_RUN}s (planned ${SOAK}s)"
log "soak ${SOAK_RUN}s"
timeout $((SOAK_RUN + 25)) $PY -m loadtests.soak --base-url "$URL" --duration "$SOAK_RUN" --max-requests 200000 \
  --concurrency 8 --fault-every 10 --burst 16 --timeout 20 --max-rss-growth 0.10 --json "$OUT/soak.json" \
  2>&1 | tail -20
touch "$W/stop"; wait "$smp" 2>/dev/null; smp=""

SWEEP_RUN=$(( $(left) - 35 )); [ "$SWEEP_RUN" -gt "$SWEEP" ] && SWEEP_RUN=$SWEEP
log "sweep ${SWEEP_RUN}s"
timeout $((SWEEP_RUN + 20)) $PY -m loadtests.run --base-url "$URL" --scenario sweep --duration "$SWEEP_RUN" \
  --timeout 15 --no-fail-on-slo --json "$OUT/sweep.json" --md "$OUT/sweep.md" --png "$OUT/sweep.png" \
  > "$W/sweep.log" 2>&1 || log "sweep returned $?"
cat "$OUT/sweep.md" 2>/dev/null
curl -sf "$URL/metrics" > "$OUT/metrics_after.txt" || log "WARNING: /metrics scrape failed"
curl -sf "$URL/health" >/dev/null || log "WARNING: /health failed after the sweep"
cleanup
cp "$W/warmup.log" "$W/sweep.log" "$OUT/" 2>/dev/null

$PY -m loadtests.soak_check --soak "$OUT/soak.json" --sweep "$OUT/sweep.json" \
  --metrics-before "$OUT/metrics_before.txt" --metrics-after "$OUT/metrics_after.txt" --rss "$OUT/rss.jsonl" \
  --max-rss-growth 0.10 --planned-soak "$SOAK" --json "$OUT/soak_summary.json"
rc=$?
grep -nE "Traceback|ERROR" "$OUT/server.log" | head -20
log "done rc=$rc"
exit $rc
