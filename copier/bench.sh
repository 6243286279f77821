#!/usr/bin/env bash
# Benchmark (not a test): the copier sharding the full IMDB archive into 5 IID shards,
# against `gzip -dc` of the same archive measured in the same run. Target: copier at most
# 1.5x gzip's time, peak RSS under 600 MB.
#
# Usage: [COPIER=BIN] copier/bench.sh [RUNS]      (archive: $FEDIMDB_ARCHIVE or ../shared/data/aclImdb-labeled.tar.gz)
#
# The two commands alternate (gzip, copier, gzip, copier, …) so both see the same machine
# load; the median of each is reported. Each copier run uses --force on the same output
# folder, so it does the full work every time (a plain re-run would be a no-op).
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${1:-7}
archive=${FEDIMDB_ARCHIVE:-../shared/data/aclImdb-labeled.tar.gz}
[[ -f $archive ]] || { echo "archive $archive not found (set FEDIMDB_ARCHIVE)" >&2; exit 1; }

# COPIER=path/to/copier measures that binary instead of building this checkout's (to compare
# two builds, alternating: `COPIER=/tmp/copier-old bash copier/bench.sh 5`).
if [[ -n ${COPIER:-} ]]; then
  bin=$COPIER
else
  cargo build --release -q -p copier
  bin=${CARGO_TARGET_DIR:-target}/release/copier
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
copier_cmd=("$bin" --source "$archive" --out "$out" --workers 5 --force)

now() { date +%s%N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

# Warm the page cache and the binary.
gzip -dc "$archive" >/dev/null
RUST_LOG=warn "${copier_cmd[@]}" >/dev/null

gz_times=() cp_times=()
for ((i = 0; i < runs; i++)); do
  t0=$(now); gzip -dc "$archive" >/dev/null; t1=$(now)
  RUST_LOG=warn "${copier_cmd[@]}" >/dev/null; t2=$(now)
  gz_times+=($(((t1 - t0) / 1000000))) cp_times+=($(((t2 - t1) / 1000000)))
done
gz=$(printf '%s\n' "${gz_times[@]}" | median)
cp=$(printf '%s\n' "${cp_times[@]}" | median)

rss_kb=$(RUST_LOG=warn /usr/bin/time -v "${copier_cmd[@]}" 2>&1 >/dev/null | awk -F': ' '/Maximum resident set size/ {print $2}')

echo "archive:          $archive ($(du -h "$archive" | cut -f1))"
echo "machine:          $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "runs:             $runs (median)"
echo "gzip -dc:         ${gz} ms   (all: ${gz_times[*]})"
echo "copier 5 iid:     ${cp} ms   (all: ${cp_times[*]})"
echo "ratio:            $(awk -v a="$cp" -v b="$gz" 'BEGIN {printf "%.2f", a / b}')  (target <= 1.5)"
echo "copier peak RSS:  $((rss_kb / 1024)) MB  (target < 600)"
