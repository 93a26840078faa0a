#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, AddressSanitizer + UndefinedBehaviorSanitizer) and runs each
# for a bounded time on a copy of its seed corpus (tests/fuzz/corpus/<target>; the checked-in seeds
# are never modified). A crash leaves its input in tests/fuzz/crashes/ and fails the run: turn it
# into a regression seed in the corpus once fixed.
#   scripts/fuzz.sh [--seconds N] [--build DIR] [target...]    (CI: 15 s each; for hours: --seconds 36000)
set -u
cd "$(dirname "$0")/.."
seconds=20
build=build-fuzz
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --build) build="$2"; shift 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
[ ${#targets[@]} -eq 0 ] && targets=(chat_request reducer_spec config safetensors tokenizer tokenizer_json image llava http_head)
command -v clang++ >/dev/null || { echo "SKIP: clang++ is not installed (scripts/setup.sh installs clang)"; exit 77; }
cmake -S . -B "$build" -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DVICTOR_FUZZ=ON >/dev/null || { echo "FAIL: configure"; exit 1; }
cmake --build "$build" -j2 >/dev/null || { echo "FAIL: build (cmake --build $build for the errors)"; exit 1; }
mkdir -p tests/fuzz/crashes
fail=0
for t in "${targets[@]}"; do
  work=$(mktemp -d)
  cp tests/fuzz/corpus/"$t"/* "$work"/
  log="$work.log"
  # Short runs (CI) use a fixed seed, so a red CI is a reproducible finding, not a lucky draw;
  # long runs draw a random one.
  seed=0
  [ "$seconds" -le 60 ] && seed=1
  "$build/fuzz_$t" "$work" -seed=$seed -max_total_time="$seconds" -max_len=16384 -timeout=10 -rss_limit_mb=2048 \
    -artifact_prefix=tests/fuzz/crashes/"$t"- >"$log" 2>&1
  rc=$?
  stats=$(grep -E "^#[0-9]+.*(DONE|pulse)" "$log" | tail -1)
  if [ $rc -ne 0 ]; then
    echo "FAIL: fuzz_$t (exit $rc):"
    grep -E "ERROR|SUMMARY|runtime error|Test unit written" "$log" | head -8
    fail=1
  else
    echo "ok: fuzz_$t ${seconds}s: $stats"
  fi
  rm -rf "$work" "$log"
done
exit $fail
