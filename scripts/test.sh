#!/usr/bin/env bash
# Installs what the build needs, builds everything and runs every test.
# Last line: "N passed, M failed, K skipped" (test targets); exit status non-zero if any failed.
# A target whose tests all skipped themselves (e.g. GPU tests on a machine without a GPU) counts as skipped.
set -uo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh || { echo "setup failed"; echo "0 passed, 1 failed"; exit 1; }

log=$(mktemp)
targets=(//...)
cuda_targets=()
if [ -x /usr/local/cuda/bin/nvcc ]; then
  # CUDA targets are tagged manual (the default build needs no nvcc): name them here.
  mapfile -t cuda_targets < <(bazel query 'attr(tags, "manual", tests(//...))' 2>/dev/null)
fi

bazel test --keep_going --test_summary=short "${targets[@]}" 2>&1 | tee "$log" | grep -vE "linux-sandbox|^\[[0-9,]+ / [0-9,]+\]"
if [ ${#cuda_targets[@]} -gt 0 ]; then
  echo "== CUDA targets (--config=cuda): ${cuda_targets[*]}"
  bazel test --config=cuda --keep_going --test_summary=short "${cuda_targets[@]}" 2>&1 | tee -a "$log" | grep -vE "linux-sandbox|^\[[0-9,]+ / [0-9,]+\]"
fi

passed=0; failed=0; skipped=0
while read -r target status; do
  case "$status" in
    PASSED)
      logfile="bazel-testlogs/$(echo "${target#//}" | tr ':' '/')/test.log"
      if [ -f "$logfile" ] && grep -q "^\[  PASSED  \] 0 tests" "$logfile" && grep -q "^\[  SKIPPED \]" "$logfile"; then
        skipped=$((skipped + 1))
      else
        passed=$((passed + 1))
      fi
      ;;
    *) failed=$((failed + 1)); echo "not passed: $target $status" ;;
  esac
done < <(grep -E "^//[^ ]+ +(\(cached\) )?(PASSED|FAILED|TIMEOUT|NO STATUS|FAILED TO BUILD|FLAKY|INCOMPLETE)" "$log" \
           | sed -E 's/\(cached\) //' | awk '{s=$2; if ($2=="NO" || ($2=="FAILED" && $3=="TO")) s=$2"_"$3; print $1, s}')

# A build failure that stops bazel before any test summary must still count as a failure.
if ! grep -qE "^//" "$log" && grep -qE "^(ERROR|FAILED):" "$log"; then
  failed=$((failed + 1))
fi
rm -f "$log"
echo "${passed} passed, ${failed} failed, ${skipped} skipped"
[ "$failed" -eq 0 ]
