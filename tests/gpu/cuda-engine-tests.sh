#!/usr/bin/env bash
# The trainer's engine-equality tests on a real GPU (kept out of CI, which has none).
#
#   bash tests/gpu/cuda-engine-tests.sh pack   # here, after `make check-cuda`: builds the
#                                              # trainer's tests with `--features cuda` and
#                                              # packs them into .gpu/ (about 18 MB)
#   bash .gpu/cuda-engine-tests.sh run         # on the GPU machine, from the repository root
#
# In a `cuda` build the tests train the candle engine on the GPU (`device::for_tests`) and
# pin it to the sparse CPU engine. The build links Debian's CUDA 11.8 runtime, cuBLAS and
# cuRAND. .gpu/ carries the runtime (0.7 MB) and, instead of cuBLAS and cuRAND (670 MB
# with cuBLASLt), two small stand-ins that forward to the GPU machine's own (cuda11-shim.c).
set -euo pipefail
case "${1:-}" in
pack)
  cd "$(dirname "$0")/../.."
  : "${CARGO_TARGET_DIR:=target}"
  export CARGO_TARGET_DIR CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
  bin=$(cargo test -p trainer --features cuda --no-run --message-format=json 2>/dev/null \
    | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
  [ -x "$bin" ] || { echo "pack: no test executable from cargo (run make check-cuda first)" >&2; exit 1; }
  mkdir -p .gpu
  strip -o .gpu/trainer-tests "$bin" && gzip -9f .gpu/trainer-tests
  for lib in cublas:libcublas.so.11:-DCUBLAS curand:libcurand.so.10:; do
    IFS=: read -r name so def <<<"$lib"
    echo "${so} { global: ${name}*; local: *; };" >".gpu/$name.map"
    cc -O2 -shared -fPIC $def -Wl,-soname,"$so" -Wl,--version-script=".gpu/$name.map" \
      -o ".gpu/$so" tests/gpu/cuda11-shim.c -ldl
  done
  cp -L "$(ldconfig -p | sed -n 's/.*libcudart.so.11.0 .*=> //p' | head -1)" .gpu/
  cp tests/gpu/cuda-engine-tests.sh .gpu/
  echo "packed $(du -sh .gpu | cut -f1) into .gpu/; on the GPU machine: bash .gpu/cuda-engine-tests.sh run"
  ;;
run)
  cd "$(dirname "$0")"
  nvidia-smi -L
  find_lib() { find / -xdev -name "$1" -not -path "$PWD/*" 2>/dev/null | head -1; }
  FEDIMDB_REAL_CUBLAS=$(find_lib 'libcublas.so.1[2-9]*')
  FEDIMDB_REAL_CURAND=$(find_lib 'libcurand.so.10*')
  [ -n "$FEDIMDB_REAL_CUBLAS" ] && [ -n "$FEDIMDB_REAL_CURAND" ] \
    || { echo "run: no cuBLAS 12+ or cuRAND 10 on this machine" >&2; exit 1; }
  export FEDIMDB_REAL_CUBLAS FEDIMDB_REAL_CURAND
  export LD_LIBRARY_PATH="$PWD:$(dirname "$FEDIMDB_REAL_CUBLAS"):$(dirname "$FEDIMDB_REAL_CURAND")"
  echo "cuBLAS: $FEDIMDB_REAL_CUBLAS; cuRAND: $FEDIMDB_REAL_CURAND"
  gunzip -c trainer-tests.gz >/tmp/fedimdb-trainer-tests && chmod +x /tmp/fedimdb-trainer-tests
  /tmp/fedimdb-trainer-tests --test-threads=1
  ;;
*)
  echo "usage: $0 pack|run" >&2
  exit 2
  ;;
esac
