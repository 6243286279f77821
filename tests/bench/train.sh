#!/usr/bin/env bash
# Training benchmark: the accuracy and speed targets of the trainer/aggregator/pipeline,
# on the full official split, release build. Prints one line per run and a summary table;
# the figures go to docs/BENCHMARKS.md. Usage: bash tests/bench/train.sh [ARCHIVE]
set -euo pipefail
cd "$(dirname "$0")/../.."
ARCHIVE=${1:-../shared/data/aclImdb-labeled.tar.gz}
BIN=target/release
OUT=$(mktemp -d /tmp/fedimdb-bench.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
[ -f "$ARCHIVE" ] || { echo "no archive at $ARCHIVE" >&2; exit 1; }
[ -x $BIN/pipeline ] || { echo "build first: cargo build --release --workspace" >&2; exit 1; }

run() { # name, flags...
  local name=$1; shift
  rm -rf "$OUT/root"
  $BIN/pipeline local --source "$ARCHIVE" --root "$OUT/root" --report "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1 \
    || { echo "$name failed:"; tail -20 "$OUT/$name.log"; exit 1; }
  python3 - "$OUT/$name.json" "$name" "$*" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
acc = " ".join(f"r{x['round']}={x['test_accuracy']*100:.2f}" for x in r["rounds"])
print(f"{sys.argv[2]:<22} acc {r['test_accuracy']*100:6.2f}%  wall {r['seconds_total']:5.1f} s  (copier {r['seconds_copier']:.1f} s)  [{sys.argv[3]}]  {acc}")
PY
}

echo "machine: $(nproc) cores, $(uname -m); $(date -u +%FT%TZ)"
run centralized   --workers 1
run iid-5         --workers 5
run dirichlet-5   --workers 5 --partition dirichlet --alpha 0.5
run iid-5-1round  --workers 5 --rounds 1

# Peak RSS of one trainer: re-run round 3, shard 0 of the last 5-worker IID run's volume.
rm -rf "$OUT/root"
$BIN/pipeline local --source "$ARCHIVE" --root "$OUT/root" --workers 5 --rounds 3 > /dev/null 2>&1
/usr/bin/time -f "trainer (round 3, 5000 reviews): %e s wall, peak RSS %M KB" \
  $BIN/trainer --root "$OUT/root" --round 3 --shard 0 2>&1 | tail -1
/usr/bin/time -f "aggregator (round 3, 5 updates + test set): %e s wall, peak RSS %M KB" \
  $BIN/aggregator --root "$OUT/root" --round 3 2>&1 | tail -1
