#!/usr/bin/env bash
# The whole unit suite (victor_tests) under AddressSanitizer + UndefinedBehaviorSanitizer, in its
# own build folder (build-asan/ by default). Any report fails the run. CI runs this once.
#   scripts/sanitize.sh [BUILD_DIR] [gtest filter]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build-asan}
filter=${2:-*}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DVICTOR_SANITIZE=ON -DVICTOR_BUILD_BENCH=OFF >/dev/null
cmake --build "$build" -j2 --target victor victor_tests
# Leaks are checked too; LibTorch's and OpenMP's process-lifetime allocations are reachable, so
# they are not reported. Suppressions, if one is ever needed, go in tests/sanitize.supp.
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:strict_string_checks=1:detect_stack_use_after_return=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export LSAN_OPTIONS="suppressions=$PWD/tests/sanitize.supp"
export OMP_NUM_THREADS=1
start=$(date +%s)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
run() {
  set +e
  "$build/victor_tests" --gtest_filter="$filter" --gtest_brief=1 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  set -e
  return $rc
}
if ! run; then
  # A leak report alone (every test passed, no ASan or UBSan error) is run once more: on
  # 2026-12-07 one run of three reported a 79-byte std::string whose stack ends in libstdc++ (the
  # fast unwinder stops there) and it did not come back in three runs after it. A leak that
  # reproduces fails; one that does not is printed as a warning.
  if grep -q "ERROR: LeakSanitizer" "$log" && ! grep -qE "ERROR: AddressSanitizer|runtime error:|\[  FAILED  \]" "$log"; then
    echo "sanitize: LeakSanitizer reported a leak and every test passed; running the suite again to see whether it reproduces"
    if ! run; then
      echo "sanitize: the leak (or another error) came back: failing"
      exit 1
    fi
    echo "sanitize: WARNING: a leak reported once did not reproduce (see the first run's report above)"
  else
    exit 1
  fi
fi
echo "sanitize: the unit suite ran clean under ASan + UBSan in $(( $(date +%s) - start )) s"
