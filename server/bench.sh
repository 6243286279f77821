#!/usr/bin/env bash
# Server benchmarks (docs/BENCHMARKS.md, "## server"). Needs wrk, python3, a release build
# and a trained run folder:  cargo build --release --workspace &&
#   target/release/pipeline local --root /tmp/srv-root --workers 5
# Usage: server/bench.sh [ROOT] [SECONDS]   (load on 127.0.0.1 only)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-/tmp/srv-root}
SECS=${2:-10}
PORT=${PORT:-18080}
BIN=target/release/server
WORK=$(mktemp -d)
trap 'kill $SRV 2>/dev/null || true; rm -rf "$WORK"' EXIT

start() { # extra server flags
  $BIN --root "$ROOT" --listen 127.0.0.1:$PORT "$@" 2>"$WORK/server.log" &
  SRV=$!
  for _ in $(seq 100); do curl -sf localhost:$PORT/v2/health/ready >/dev/null && return; sleep 0.1; done
  echo "server did not become ready" >&2; cat "$WORK/server.log" >&2; exit 1
}
stop() { kill $SRV; wait $SRV 2>/dev/null || true; }

# 1,000 test-set reviews via /api/sample, turned into request bodies.
start
for _ in $(seq 1000); do curl -s localhost:$PORT/api/sample; echo; done > "$WORK/samples.jsonl"
stop
python3 - "$WORK" <<'PY'
import json, sys
w = sys.argv[1]
texts = [json.loads(l)["text"] for l in open(f"{w}/samples.jsonl") if l.strip()]
def lines(name, bodies):
    with open(f"{w}/{name}", "w") as f:
        for b in bodies: f.write(json.dumps(b) + "\n")
lines("api1.jsonl", [{"text": t} for t in texts])
lines("api1-nowords.jsonl", [{"text": t, "top_k": 0} for t in texts])
lines("v2-1.jsonl", [{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [t]}]} for t in texts])
batches = [texts[i:i + 64] for i in range(0, len(texts) - 63, 64)]
lines("api64.jsonl", [{"texts": b, "top_k": 0} for b in batches])
lines("api64-words.jsonl", [{"texts": b} for b in batches])
lines("v2-64.jsonl", [{"inputs": [{"name": "text", "shape": [len(b)], "datatype": "BYTES", "data": b}]} for b in batches])
PY

run() { # label path bodies connections
  local out
  out=$(BODIES="$WORK/$3" wrk -t1 -c"$4" -d"${SECS}s" --latency -s server/bench/post.lua "http://127.0.0.1:$PORT$2" 2>&1)
  local rps p50 p99 errs
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  errs=$(grep -Eo 'Non-2xx or 3xx responses: [0-9]+|Socket errors: .*' <<<"$out" | tr '\n' ' ' || true)
  printf '| %s | %s | %s | %s | %s | %s |\n' "$1" "$4" "$rps" "$p50" "$p99" "${errs:-none}"
}
rss() { awk '/VmHWM/ {printf "%.0f MB", $2/1024}' /proc/$SRV/status; }

echo "## defaults (--max-batch 32 --max-delay-us 0 --workers 2), ${SECS} s per run, wrk -t1"
echo "| load | connections | requests/s | p50 | p99 | errors |"
echo "| --- | --- | --- | --- | --- | --- |"
start
run "POST /api/predict, 1 review, top 5 words" /api/predict api1.jsonl 64
run "POST /api/predict, 1 review, top_k 0" /api/predict api1-nowords.jsonl 64
run "POST /v2/models/fedimdb/infer, 1 review" /v2/models/fedimdb/infer v2-1.jsonl 64
run "POST /api/predict, 64 reviews, top_k 0" /api/predict api64.jsonl 4
run "POST /api/predict, 64 reviews, top 5 words" /api/predict api64-words.jsonl 4
run "POST /v2/models/fedimdb/infer, 64 reviews" /v2/models/fedimdb/infer v2-64.jsonl 4
echo "peak server RSS: $(rss)"
stop

echo
echo "## batching trade-off: POST /v2/models/fedimdb/infer, 1 review per request, 64 connections"
echo "| --max-batch / --max-delay-us | connections | requests/s | p50 | p99 | errors |"
echo "| --- | --- | --- | --- | --- | --- |"
for mb in 1 32 128; do
  for d in 0 500 2000; do
    start --max-batch $mb --max-delay-us $d
    run "$mb / $d" /v2/models/fedimdb/infer v2-1.jsonl 64
    stop
  done
done
