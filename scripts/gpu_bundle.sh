#!/usr/bin/env bash
# Builds the CUDA binaries here (no GPU needed) and packs them for the GPU machine, where
# scripts/gpu_device_run.sh runs them (docs/BENCHMARKS.md, "GPU").
#   scripts/gpu_bundle.sh [OUT_DIR]     (default .devbundle; keep it out of git: .git/info/exclude)
# Then, with the device tool: carry OUT_DIR and run `bash scripts/gpu_device_run.sh [PHASE...]`
# (default all: bench bench2 tests hf; then profile).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.devbundle}
# What scripts/gpu_device_run.sh runs (not //tools:moemesh: the bundle and the working tree
# must stay under the device tool's 64 MiB).
targets=(//engine/cuda:cuda_engine_test //engine/cuda:model_test //engine/cuda:expert_gemm_bench
         //tools:moemesh_bench //expert_worker //attention_worker //encoder_worker //router)
bazel build --config=cuda "${targets[@]}"
bins=()
for t in "${targets[@]}"; do
  pkg=${t#//}; pkg=${pkg%%:*}
  name=${t##*:}; [ "$name" = "$t" ] && name=${pkg##*/}
  [ "$t" = "//$pkg" ] && name=${pkg##*/}
  bins+=("bazel-bin/$pkg/$name")
done
XZ_OPT="-9 -T0" ../shared/tools/device_bundle.sh "$out" "${bins[@]}"
# The Python client's generated stubs, made here with protoc (the GPU machine has none); this
# machine may lack the protobuf Python module the stubs import, which the GPU machine has.
XDG_CACHE_HOME=$PWD/$out/cache python3 -c '
import sys
sys.path.insert(0, "scripts")
import client
try:
    client.load_stubs()
except ImportError:
    pass'
ls "$out"/cache/moemesh/py/*/protos/generation_pb2_grpc.py > /dev/null
mkdir -p .git/info
grep -qx "/$out/" .git/info/exclude 2>/dev/null || echo "/$out/" >> .git/info/exclude
du -sh "$out"
