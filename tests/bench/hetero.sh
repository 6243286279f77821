#!/usr/bin/env bash
# Heterogeneity benchmark (make bench-hetero): centralized training and workers {5, 20, 64}
# x {iid, dirichlet alpha 0.5, dirichlet alpha 0.1}, default flags, full official split,
# release build. One table: test accuracy, gap to centralized, rounds, wall seconds, mean
# bytes written per worker-round (training rounds), and what the run left on the volume.
# Usage: bash tests/bench/hetero.sh [ARCHIVE] [extra pipeline flags, e.g. --seed 7]
set -euo pipefail
cd "$(dirname "$0")/../.."
ARCHIVE=${1:-../shared/data/aclImdb-labeled.tar.gz}
shift || true
BIN=${BIN:-target/release}
OUT=$(mktemp -d /tmp/fedimdb-hetero.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
[ -f "$ARCHIVE" ] || { echo "no archive at $ARCHIVE" >&2; exit 1; }
[ -x "$BIN/pipeline" ] || { echo "build first: cargo build --release --workspace" >&2; exit 1; }
WORKERS=${WORKERS:-"5 20 64"}
PARTS=${PARTS:-"iid 0.5 0.1"}

run() { # name, flags...
  local name=$1; shift
  rm -rf "$OUT/root"
  "$BIN/pipeline" local --source "$ARCHIVE" --root "$OUT/root" --report "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1 \
    || { echo "$name failed:"; tail -20 "$OUT/$name.log"; exit 1; }
  du -sb "$OUT/root" --exclude=logs | cut -f1 > "$OUT/$name.du"
  python3 - "$OUT" "$name" <<'PY'
import json, sys, glob, os
out, name = sys.argv[1], sys.argv[2]
r = json.load(open(f"{out}/{name}.json"))
sizes = []
for rep in glob.glob(f"{out}/root/rounds/round-*/report.json"):
    x = json.load(open(rep))
    if x["round"] > 0:
        sizes += x.get("update_bytes", [])
mean = sum(sizes) / len(sizes) / 1e6 if sizes else 0.0
vol = int(open(f"{out}/{name}.du").read()) / 1e6
json.dump({"acc": r["test_accuracy"] * 100, "rounds": r["rounds_trained"], "secs": r["seconds_total"],
           "mb": mean, "vol": vol, "hist": [x["test_accuracy"] * 100 for x in r["rounds"][1:]]},
          open(f"{out}/{name}.row", "w"))
PY
  echo "$name done" >&2
}

echo "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); $(date -u +%FT%TZ); flags: ${*:-defaults}"
run centralized --workers 1 "$@"
for w in $WORKERS; do
  for p in $PARTS; do
    if [ "$p" = iid ]; then run "w$w-iid" --workers "$w" "$@"
    else run "w$w-a$p" --workers "$w" --partition dirichlet --alpha "$p" "$@"; fi
  done
done
python3 - "$OUT" "$WORKERS" "$PARTS" <<'PY'
import json, sys
out, workers, parts = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
c = json.load(open(f"{out}/centralized.row"))
print("| workers | partition | test accuracy | vs centralized | rounds | seconds | MB per worker-round | volume MB | accuracy per round |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
def line(w, p, r):
    gap = r["acc"] - c["acc"]
    hist = " ".join(f"{h:.2f}" for h in r["hist"])
    print(f"| {w} | {p} | {r['acc']:.2f}% | {gap:+.2f} | {r['rounds']} | {r['secs']:.1f} | {r['mb']:.1f} | {r['vol']:.0f} | {hist} |")
line(1, "(centralized)", c)
for w in workers:
    for p in parts:
        name = f"w{w}-iid" if p == "iid" else f"w{w}-a{p}"
        line(w, "iid" if p == "iid" else f"dirichlet α={p}", json.load(open(f"{out}/{name}.row")))
PY
