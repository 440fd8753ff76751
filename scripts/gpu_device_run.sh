#!/usr/bin/env bash
# The GPU runs of docs/BENCHMARKS.md: run on the GPU machine from the repository root, after
# scripts/gpu_bundle.sh (which does the following) here:
#   bazel build --config=cuda //engine/cuda:cuda_engine_test //engine/cuda:model_test //engine/cuda:expert_gemm_bench \
#     //tools:moemesh_bench //expert_worker //attention_worker //encoder_worker //router
#   ../shared/tools/device_bundle.sh .devbundle <those binaries from bazel-bin>
# and the Python stubs generated into .devbundle/cache (XDG_CACHE_HOME=$PWD/.devbundle/cache, scripts/client.py load_stubs()).
#
# Usage: scripts/gpu_device_run.sh [PHASE...]     (default: all)
#   bench    expert_gemm_bench (grouped GEMM vs dense, the decode-products and decode-attention
#            tables), the Qwen3-30B-A3B runs plain and with --cuda_graphs
#   bench2   the 30B runs with --cuda_pdl (with and without graphs), with a bf16 KV cache and
#            with --cuda_deep_loads
#   tests    cuda_engine_test, model_test, cluster_gpu_test
#   hf       transformers' generate on the same configuration (scripts/hf_baseline.py)
#   profile  the kernels' SASS, ncu over expert_gemm_bench's grouped GEMMs and over 4 layers of a
#            64-sequence decode
#   all      bench bench2 tests hf, in that order (the figures first)
# One device call may run several phases: each command gets at most its own limit and never runs
# past GPU_RUN_BUDGET_S (default 560 s, under the device tool's 10 minutes a call); what does not
# fit is skipped and named at the end, for the next call. Every command's whole output and JSON
# lands in $OUT/results.tgz (rewritten after each command, so a cut-off call still returns what
# ran); the reply's tail shows the lines that matter.
set -u
START=$SECONDS
BUDGET=${GPU_RUN_BUDGET_S:-560}
RES=/tmp/gpu_results
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$RES" "$OUT"
tar xJf .devbundle/bundle.tar.xz -C /tmp
export LD_LIBRARY_PATH=/tmp/bundle/lib:${LD_LIBRARY_PATH:-}
B=/tmp/bundle/bin
nvidia-smi -L
mkdir -p /tmp/rt/encoder_worker /tmp/rt/expert_worker /tmp/rt/attention_worker /tmp/rt/router
for b in encoder_worker expert_worker attention_worker; do ln -sf $B/$b /tmp/rt/$b/$b; done
ln -sf $B/router /tmp/rt/router/router
SKIPPED=()

# bounded SECS NAME CMD...: runs CMD for at most SECS seconds and never past the call's budget,
# its output in $RES/NAME.log; then saves $RES to $OUT/results.tgz. Status 1 if it did not run.
bounded() {
  local secs=$1 name=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START) - 10))
  if [ "$left" -lt 30 ]; then
    echo "== $name: skipped (${left}s left of this call's ${BUDGET}s)"
    SKIPPED+=("$name")
    return 1
  fi
  [ "$secs" -gt "$left" ] && secs=$left
  local t0=$SECONDS
  timeout "$secs" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0))s (limit ${secs}s)"
  tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null
  return 0
}

M30B="--mode=offline --device=cuda --load_format=dummy --model=models/configs/qwen3-30b-a3b --compute_dtype=bf16 --prompt_tokens=128 --decode_tokens=64 --repeats=2 --batch=64 --bandwidth_gbs=3350"
# ours NAME FLAGS...: the 30B figure with those flags.
ours() {
  local name=$1
  shift
  bounded 240 "$name" $B/moemesh_bench $M30B --json="$RES/$name.json" "$@" && tail -6 "$RES/$name.log"
}

phase_bench() {
  bounded 300 expert_gemm_bench $B/expert_gemm_bench && cat "$RES/expert_gemm_bench.log"
  ours ours_30b
  # The same with decode steps replayed from CUDA graphs.
  ours ours_30b_graphs --cuda_graphs
}

phase_bench2() {
  # With programmatic dependent launch, with and without graphs; then with the bf16 KV cache
  # (transformers' generate keeps its cache in the model's bf16).
  ours ours_30b_graphs_pdl --cuda_graphs --cuda_pdl
  ours ours_30b_pdl --cuda_pdl
  ours ours_30b_graphs_pdl_bf16kv --cuda_graphs --cuda_pdl --kv_cache_dtype=bf16
  # The small-batch products with several steps of weight loads in flight (single stream: the
  # one-row kernel's plain products; 64 streams: the multi-output kernel).
  ours ours_30b_graphs_pdl_deep --cuda_graphs --cuda_pdl --cuda_deep_loads
}

phase_tests() {
  bounded 200 cuda_engine_test $B/cuda_engine_test &&
    grep -vE "^\[ RUN|^\[       OK" "$RES/cuda_engine_test.log" | tail -30
  bounded 200 model_test $B/model_test &&
    grep -E "FAILED|PASSED|SKIPPED|Failure|error|Expected|Which|max_err|ids" "$RES/model_test.log" | head -30
  bounded 300 cluster_gpu_test env MOEMESH_BIN_DIR=/tmp/rt PYTHON=python3 \
    XDG_CACHE_HOME="$PWD/.devbundle/cache" bash tests/cluster_gpu_test.sh &&
    tail -12 "$RES/cluster_gpu_test.log"
}

phase_hf() {
  bounded 280 hf_30b env PYTHONUNBUFFERED=1 python3 scripts/hf_baseline.py \
    --config=models/configs/qwen3-30b-a3b --batches=1,64 --prompt_tokens=128 --new_tokens=16 \
    --json="$RES/hf_30b.json" && grep -v Warning "$RES/hf_30b.log" | tail -6
}

phase_profile() {
  # The kernels' SASS (whether the one-row and multi-output products keep their weight loads in
  # flight together), where the machine has a disassembler.
  if command -v cuobjdump > /dev/null; then
    cuobjdump -sass $B/expert_gemm_bench 2>&1 | gzip > "$RES/kernels_sass.txt.gz"
    echo "SASS: $(zcat "$RES/kernels_sass.txt.gz" | grep -c Function) functions"
  else
    echo "no cuobjdump on this machine"
  fi
  if ! command -v ncu > /dev/null; then
    echo "no ncu on this machine"
    return
  fi
  # Where the grouped expert GEMM's time goes (padding, the batched GEMMs, SwiGLU, ...): each
  # kernel of its first calls, timed alone.
  bounded 200 ncu_grouped ncu --print-summary per-kernel --metrics gpu__time_duration.sum \
    -k 'regex:^(?!Fill)' -c 120 $B/expert_gemm_bench --iters=1 --decode_products=false \
    --decode_attention=false &&
    grep -E "^  [A-Za-z_].*\(|gpu__time_duration.sum|invocations" "$RES/ncu_grouped.log" | head -60
  # Where the time of a 64-sequence decode step goes, per kernel (4 layers of the 30B shape).
  bounded 400 ncu_decode64 ncu --print-summary per-kernel --metrics gpu__time_duration.sum \
    -k 'regex:^(?!Fill)' $B/moemesh_bench --mode=offline --device=cuda --load_format=dummy \
    --num_layers=4 --model=models/configs/qwen3-30b-a3b --compute_dtype=bf16 --prompt_tokens=16 \
    --decode_tokens=16 --repeats=1 --batch=64 --bandwidth_gbs=3350 &&
    grep -E "^  [A-Za-z_].*\(|gpu__time_duration.sum|invocations" "$RES/ncu_decode64.log" | head -120
}

PHASES=("$@")
[ ${#PHASES[@]} -eq 0 ] && PHASES=(all)
for p in "${PHASES[@]}"; do
  case "$p" in
    all) phase_bench; phase_bench2; phase_tests; phase_hf ;;
    bench|bench2|tests|hf|profile) "phase_$p" ;;
    *) echo "unknown phase: $p (bench, bench2, tests, hf, profile, all)"; exit 2 ;;
  esac
done
tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null
echo "== done in $((SECONDS - START))s; whole logs in \$OUT/results.tgz"
[ ${#SKIPPED[@]} -gt 0 ] && echo "== skipped for lack of time: ${SKIPPED[*]}"
exit 0
