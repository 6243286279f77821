#!/usr/bin/env bash
# The scikit-learn peer of issue 13 (make bench-sklearn): shards the archive with the copier
# (one shard, TASK rating or sentiment), exports the very features the model sees with the
# export_svmlight example, and fits scikit-learn's logistic regression on them
# (tests/bench/sklearn_peer.py: C chosen on a validation split of the training reviews, the
# test set scored once). Prints one table row; figures in docs/BENCHMARKS.md.
# Usage: bash tests/bench/sklearn_peer.sh [ARCHIVE] [TASK] [sklearn_peer.py flags, e.g. --json OUT]
# Needs the release build with examples: cargo build --release --workspace --examples.
set -euo pipefail
cd "$(dirname "$0")/../.."
ARCHIVE=${1:-../shared/data/aclImdb-labeled.tar.gz}
TASK=${2:-rating}
shift $(($# < 2 ? $# : 2))
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release}
VENV=${SK_VENV:-$HOME/.cache/fedimdb/sk-venv}
[ -f "$ARCHIVE" ] || { echo "no archive at $ARCHIVE" >&2; exit 1; }
[ -x "$BIN/copier" ] && [ -x "$BIN/examples/export_svmlight" ] \
  || { echo "no copier or export_svmlight under $BIN: cargo build --release --workspace --examples" >&2; exit 1; }
if ! "$VENV/bin/python" -c 'import sklearn' 2>/dev/null; then
  python3 -m venv "$VENV" && "$VENV/bin/pip" install -q scikit-learn \
    || { echo "cannot install scikit-learn into $VENV (PyPI unreachable?)" >&2; exit 1; }
fi
OUT=$(mktemp -d /tmp/fedimdb-sklearn.XXXXXX)
trap 'rm -rf "$OUT"' EXIT

echo "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); $(date -u +%FT%TZ);" \
  "scikit-learn $("$VENV/bin/python" -c 'import sklearn; print(sklearn.__version__)'); task $TASK"
"$BIN/copier" --source "$ARCHIVE" --out "$OUT/root" --workers 1 --task "$TASK" > "$OUT/copier.log" 2>&1 \
  || { echo "copier failed:"; tail -20 "$OUT/copier.log"; exit 1; }
"$BIN/examples/export_svmlight" "$OUT/root/data" "$OUT/svm" >&2
"$VENV/bin/python" -u tests/bench/sklearn_peer.py "$OUT/svm/train.svm" "$OUT/svm/test.svm" --task "$TASK" "$@"
