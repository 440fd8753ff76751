#!/usr/bin/env bash
# The GPU runs of docs/BENCHMARKS.md: run on the GPU machine from the repository root, after
# scripts/gpu_bundle.sh (which does the following) here:
#   bazel build --config=cuda //engine/cuda:cuda_engine_test //engine/cuda:model_test //engine/cuda:expert_gemm_bench \
#     //tools:moemesh_bench //expert_worker //attention_worker //encoder_worker //router
#   ../shared/tools/device_bundle.sh .devbundle <those binaries from bazel-bin>
# and the Python stubs generated into .devbundle/cache (XDG_CACHE_HOME=$PWD/.devbundle/cache, scripts/client.py load_stubs()).
# Usage: scripts/gpu_device_run.sh [all|tests|bench|bench2|hf|profile]   (results under $OUT; all =
# the first four, more than one device call's 10 minutes: run them one by one)
set -x
tar xJf .devbundle/bundle.tar.xz -C /tmp
export LD_LIBRARY_PATH=/tmp/bundle/lib:${LD_LIBRARY_PATH:-}
B=/tmp/bundle/bin
nvidia-smi -L
mkdir -p /tmp/rt/encoder_worker /tmp/rt/expert_worker /tmp/rt/attention_worker /tmp/rt/router
for b in encoder_worker expert_worker attention_worker; do ln -sf $B/$b /tmp/rt/$b/$b; done
ln -sf $B/router /tmp/rt/router/router
PHASE=${1:-all}
if [ "$PHASE" = all ] || [ "$PHASE" = tests ]; then
  timeout 200 $B/cuda_engine_test 2>&1 | grep -vE "^\[ RUN|^\[       OK" | tail -40
  timeout 200 $B/model_test 2>&1 | grep -E "FAILED|PASSED|SKIPPED|Failure|error|Expected|Which|max_err|ids" | head -40
  MOEMESH_BIN_DIR=/tmp/rt PYTHON=python3 XDG_CACHE_HOME=$PWD/.devbundle/cache timeout 300 bash tests/cluster_gpu_test.sh 2>&1 | tail -15
fi
if [ "$PHASE" = all ] || [ "$PHASE" = bench ]; then
  timeout 300 $B/expert_gemm_bench 2>&1 | tee $OUT/expert_gemm_bench.txt | tail -45
  timeout 240 $B/moemesh_bench --mode=offline --device=cuda --load_format=dummy --model=models/configs/qwen3-30b-a3b --compute_dtype=bf16 --prompt_tokens=128 --decode_tokens=64 --repeats=2 --batch=64 --bandwidth_gbs=3350 --json=$OUT/ours_30b.json 2>&1 | tail -8
  # The same with decode steps replayed from CUDA graphs.
  timeout 240 $B/moemesh_bench --mode=offline --device=cuda --load_format=dummy --model=models/configs/qwen3-30b-a3b --compute_dtype=bf16 --prompt_tokens=128 --decode_tokens=64 --repeats=2 --batch=64 --bandwidth_gbs=3350 --cuda_graphs --json=$OUT/ours_30b_graphs.json 2>&1 | tail -8
fi
if [ "$PHASE" = all ] || [ "$PHASE" = bench2 ]; then
  # With programmatic dependent launch, with and without graphs; then with the bf16 KV cache
  # (transformers' generate keeps its cache in the model's bf16).
  timeout 240 $B/moemesh_bench --mode=offline --device=cuda --load_format=dummy --model=models/configs/qwen3-30b-a3b --compute_dtype=bf16 --prompt_tokens=128 --decode_tokens=64 --repeats=2 --batch=64 --bandwidth_gbs=3350 --cuda_graphs --cuda_pdl --json=$OUT/ours_30b_graphs_pdl.json 2>&1 | tail -8
  timeout 240 $B/moemesh_bench --mode=offline --device=cuda --load_format=dummy --model=models/configs/qwen3-30b-a3b --compute_dtype=bf16 --prompt_tokens=128 --decode_tokens=64 --repeats=2 --batch=64 --bandwidth_gbs=3350 --cuda_pdl --json=$OUT/ours_30b_pdl.json 2>&1 | tail -8
  timeout 240 $B/moemesh_bench --mode=offline --device=cuda --load_format=dummy --model=models/configs/qwen3-30b-a3b --compute_dtype=bf16 --prompt_tokens=128 --decode_tokens=64 --repeats=2 --batch=64 --bandwidth_gbs=3350 --cuda_graphs --cuda_pdl --kv_cache_dtype=bf16 --json=$OUT/ours_30b_graphs_pdl_bf16kv.json 2>&1 | tail -8
fi
if [ "$PHASE" = all ] || [ "$PHASE" = hf ]; then
  PYTHONUNBUFFERED=1 timeout 280 python3 scripts/hf_baseline.py --config=models/configs/qwen3-30b-a3b --batches=1,64 --prompt_tokens=128 --new_tokens=16 --json=$OUT/hf_30b.json 2>&1 | grep -v Warning | tail -6
fi
if [ "$PHASE" = profile ]; then
  # The kernels' SASS (whether the one-row and multi-output products keep their weight loads in
  # flight together), where the machine has a disassembler.
  if command -v cuobjdump >/dev/null; then
    cuobjdump -sass $B/expert_gemm_bench 2>&1 | gzip > $OUT/kernels_sass.txt.gz
  else
    echo "no cuobjdump on this machine"
  fi
  # Where the time of a 64-sequence decode step goes, per kernel (4 layers of the 30B shape).
  P="$B/moemesh_bench --mode=offline --device=cuda --load_format=dummy --num_layers=4 --model=models/configs/qwen3-30b-a3b --compute_dtype=bf16 --prompt_tokens=16 --decode_tokens=16 --repeats=1 --batch=64 --bandwidth_gbs=3350"
  if command -v nsys >/dev/null; then
    timeout 400 nsys profile -o /tmp/p64 --force-overwrite true $P 2>&1 | tail -12
    nsys stats --report cuda_gpu_kern_sum --report cuda_api_sum /tmp/p64.nsys-rep 2>&1 | cut -c1-220 | head -70
  elif command -v ncu >/dev/null; then
    timeout 500 ncu --print-summary per-kernel --metrics gpu__time_duration.sum -k 'regex:^(?!Fill)' $P 2>&1 | grep -E "^  [A-Za-z_].*\(|gpu__time_duration.sum|invocations" | head -120
  else
    echo "neither nsys nor ncu on this machine"; timeout 300 $P 2>&1 | tail -12
  fi
fi
