#!/usr/bin/env bash
# Bounded fuzzing (what `make fuzz` and CI run): installs cargo-fuzz when missing, builds every
# fuzz target once, then runs each for FUZZ_SECONDS from the checked-in seed corpus. Exits
# non-zero when any target finds a crash (panic, abort, out-of-memory, timeout), after printing
# the reproducer's path and the command that replays it. See fuzz/README.md.
#
#   fuzz/run.sh                     every target, FUZZ_SECONDS (60) each
#   fuzz/run.sh checkpoint          one target
#   fuzz/run.sh --build-only        build the targets, run none
#   fuzz/run.sh --write-seeds       rewrite fuzz/corpus/*/ from the library (after a format change)
#
# Settings (environment): FUZZ_SECONDS (60), FUZZ_JOBS (targets run at once: the number of
# cores, at most 2), FUZZ_RSS_MB (2048: -rss_limit_mb), FUZZ_MALLOC_MB (1024: -malloc_limit_mb,
# the largest single allocation), FUZZ_TIMEOUT (20: seconds one input may take),
# FUZZ_SEED (1: libFuzzer's -seed; 0 picks a random one), FUZZ_TOOLCHAIN (default nightly when rustup has it, else stable with RUSTC_BOOTSTRAP=1),
# FUZZ_TARGET_DIR (default ${CARGO_TARGET_DIR:-target}/fuzz: its own folder, so it neither
# shares nor waits on the main build's lock).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

ALL_TARGETS=(featurize checkpoint shard_reader request_parsers)
FUZZ_SECONDS=${FUZZ_SECONDS:-60}
FUZZ_RSS_MB=${FUZZ_RSS_MB:-2048}
FUZZ_MALLOC_MB=${FUZZ_MALLOC_MB:-1024}
FUZZ_TIMEOUT=${FUZZ_TIMEOUT:-20}
# A fixed seed by default: the same commit explores the same inputs in the same order, so a
# CI run is repeatable and a faster machine only goes further along the same path. FUZZ_SEED=0
# lets libFuzzer pick a new seed each run (for longer runs by hand).
FUZZ_SEED=${FUZZ_SEED:-1}
cores=$(nproc 2>/dev/null || echo 1)
FUZZ_JOBS=${FUZZ_JOBS:-$((cores < 2 ? 1 : 2))}
target_dir=${FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:-target}/fuzz}
mkdir -p "$target_dir"
target_dir=$(cd "$target_dir" && pwd)

mode=run
targets=()
for a in "$@"; do
  case "$a" in
    --build-only) mode=build ;;
    --write-seeds) mode=seeds ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "fuzz: unknown option $a (see --help)" >&2; exit 2 ;;
    *) targets+=("$a") ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=("${ALL_TARGETS[@]}")
for t in "${targets[@]}"; do
  [[ " ${ALL_TARGETS[*]} " == *" $t "* ]] || { echo "fuzz: no target $t (targets: ${ALL_TARGETS[*]})" >&2; exit 2; }
done

# cargo-fuzz builds with unstable rustc flags: nightly when rustup has it, else the stable
# toolchain with RUSTC_BOOTSTRAP=1 (which lets stable rustc accept them).
if [ -n "${FUZZ_TOOLCHAIN:-}" ]; then
  toolchain=$FUZZ_TOOLCHAIN
elif command -v rustup >/dev/null && rustup run nightly rustc --version >/dev/null 2>&1; then
  toolchain=nightly
else
  toolchain=stable
fi
cargo_cmd=(cargo) rustc_cmd=(rustc)
if command -v rustup >/dev/null; then
  cargo_cmd=(rustup run "$toolchain" cargo) rustc_cmd=(rustup run "$toolchain" rustc)
fi
if [ "$toolchain" != nightly ]; then
  export RUSTC_BOOTSTRAP=1
  echo "fuzz: note: no nightly toolchain; building with $toolchain and RUSTC_BOOTSTRAP=1" >&2
fi

# cargo-fuzz itself (a cargo subcommand, into the default cargo bin folder) when missing.
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz (cargo install cargo-fuzz --locked)" >&2
  cargo install cargo-fuzz --version '^0.13' --locked --target-dir "$target_dir/install"
fi

# One build of every target. --sanitizer none: see fuzz/README.md ("Why no sanitizer");
# --codegen-units 16: a much faster cold build than cargo-fuzz's default of 1, for slower runs.
build_flags=(--sanitizer none --codegen-units 16 --target-dir "$target_dir")
start=$(date +%s)
echo "fuzz: building ${targets[*]} with $("${cargo_cmd[@]}" --version) into $target_dir (load: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo ?))" >&2
if [ ${#targets[@]} -eq ${#ALL_TARGETS[@]} ]; then
  "${cargo_cmd[@]}" fuzz build "${build_flags[@]}"
else
  for t in "${targets[@]}"; do "${cargo_cmd[@]}" fuzz build "${build_flags[@]}" "$t"; done
fi
echo "fuzz: built in $(( $(date +%s) - start )) s" >&2
[ "$mode" = build ] && exit 0

host=$("${rustc_cmd[@]}" -vV | sed -n 's/^host: //p')
bin_dir="$target_dir/$host/release"

if [ "$mode" = seeds ]; then
  for t in "${targets[@]}"; do
    FEDIMDB_FUZZ_WRITE_SEEDS="$ROOT/fuzz/corpus" "$bin_dir/$t"
  done
  exit 0
fi

# Each target: new inputs go to a working corpus under the target folder (kept between runs
# on one machine), the checked-in seeds are read only; crashes go to fuzz/artifacts/<target>/.
logs="$target_dir/logs"
mkdir -p "$logs"
run_target() {
  local t=$1
  local work="$target_dir/corpus/$t"
  mkdir -p "$work" "$ROOT/fuzz/artifacts/$t"
  "$bin_dir/$t" "$work" "$ROOT/fuzz/corpus/$t" \
    -max_total_time="$FUZZ_SECONDS" -rss_limit_mb="$FUZZ_RSS_MB" -malloc_limit_mb="$FUZZ_MALLOC_MB" \
    -timeout="$FUZZ_TIMEOUT" -seed="$FUZZ_SEED" -artifact_prefix="$ROOT/fuzz/artifacts/$t/" -print_final_stats=1 \
    >"$logs/$t.log" 2>&1
}

echo "fuzz: running ${targets[*]} for $FUZZ_SECONDS s each, $FUZZ_JOBS at a time (logs in $logs)" >&2
declare -A pid_of status_of
running=0
for t in "${targets[@]}"; do
  if [ "$running" -ge "$FUZZ_JOBS" ]; then
    wait -n || true
    running=$((running - 1))
  fi
  run_target "$t" &
  pid_of[$t]=$!
  running=$((running + 1))
done
for t in "${targets[@]}"; do
  if wait "${pid_of[$t]}"; then status_of[$t]=0; else status_of[$t]=$?; fi
done

failed=0
printf 'fuzz: %-16s %8s %10s %8s %7s %8s  %s\n' target seconds execs exec/s cov rss_mb result >&2
for t in "${targets[@]}"; do
  log="$logs/$t.log"
  stat() { sed -n "s/^stat::$1: *//p" "$log" | tail -1; }
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
  result=ok
  [ "${status_of[$t]}" -eq 0 ] || result="CRASH (exit ${status_of[$t]})"
  printf 'fuzz: %-16s %8s %10s %8s %7s %8s  %s\n' "$t" "$FUZZ_SECONDS" "$(stat number_of_executed_units)" \
    "$(stat average_exec_per_sec)" "${cov:-?}" "$(stat peak_rss_mb)" "$result" >&2
  if [ "${status_of[$t]}" -ne 0 ]; then
    failed=$((failed + 1))
    echo "---- fuzz: $t: the end of $log ----" >&2
    tail -n 40 "$log" >&2
    artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
    echo "---- fuzz: $t found a crash; reproducer: ${artifact:-(none written: see the log above)}" >&2
    if [ -n "$artifact" ]; then
      echo "     replay: $bin_dir/$t $artifact" >&2
      echo "     or:     cargo +$toolchain fuzz run --sanitizer none --codegen-units 16 $t $artifact" >&2
    fi
  fi
done
if [ "$failed" -gt 0 ]; then
  echo "fuzz: $failed of ${#targets[@]} targets crashed: turn each reproducer into a unit test (fuzz/README.md)" >&2
  exit 1
fi
echo "fuzz: no crash in ${#targets[@]} targets, $FUZZ_SECONDS s each" >&2
