#!/bin/bash
# Routers over one attention worker with a small KV cache (docs/BENCHMARKS.md, "Two routers over
# one attention worker; a router restarted over a full KV cache"). Separate processes on
# loopback ports P..P+5, logs in $LOGS; build first:
#   bazel build //router //encoder_worker //expert_worker //attention_worker //tools:moemesh_bench
#
#   scripts/bench_routers.sh two       # two routers at once, 16 x 48 requests each
#   scripts/bench_routers.sh restart   # 5 long streams through a router, kill -9 it, start a
#                                      # new one on the same address, 16 x 48 requests through it
# Environment: ROUTER (the router binary, for comparing builds), KV (the worker's
# --kv_capacity_tokens, 4096), IDLE (its --idle_sequence_seconds, 15), P (first port, 50170),
# LOGS (/tmp/moemesh-bench-routers).
set -u
mode=${1:-}
if [[ "$mode" != two && "$mode" != restart ]]; then
  echo "usage: $0 two|restart" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
B=bazel-bin M=models/pydoc-moe-17m P=${P:-50170} L=${LOGS:-/tmp/moemesh-bench-routers}
R=${ROUTER:-$B/router/router}
rm -rf "$L" && mkdir -p "$L"
pids=()
trap 'exec 2>/dev/null; kill -9 "${pids[@]}"; wait' EXIT
bg() { "$@" & pids+=($!); }
router() { bg "$R" --model=$M --address=127.0.0.1:$1 --attention=127.0.0.1:$((P + 3)); }
bench() {
  $B/tools/moemesh_bench --mode=serving --addr=127.0.0.1:$1 --concurrency=$2 --requests=$3 \
      --prompt_tokens=$4 --output_tokens=$5
}
bg $B/encoder_worker/encoder_worker --model=$M --address=127.0.0.1:$((P + 1)) > "$L/encoder.log" 2>&1
bg $B/expert_worker/expert_worker --model=$M --address=127.0.0.1:$((P + 2)) --threads=1 \
    > "$L/expert.log" 2>&1
sleep 2
bg $B/attention_worker/attention_worker --model=$M --address=127.0.0.1:$((P + 3)) \
    --encoder=127.0.0.1:$((P + 1)) --experts=127.0.0.1:$((P + 2)) --kv_capacity_tokens=${KV:-4096} \
    --idle_sequence_seconds=${IDLE:-15} --threads=1 > "$L/attention.log" 2>&1
sleep 3
summary() { grep -hE "TTFT|wall s|requests ok|errors|output tok/s" "$@"; }
if [[ $mode == two ]]; then
  router $((P + 4)) > "$L/router_a.log" 2>&1
  router $((P + 5)) > "$L/router_b.log" 2>&1
  sleep 3
  bench $((P + 4)) 16 48 128 128 > "$L/bench_a.txt" 2>&1 &
  a=$!
  bench $((P + 5)) 16 48 128 128 > "$L/bench_b.txt" 2>&1
  wait $a
  echo "router A:"; summary "$L/bench_a.txt"
  echo "router B:"; summary "$L/bench_b.txt"
else
  router $((P + 4)) > "$L/router_1.log" 2>&1
  first=$!
  sleep 2
  bench $((P + 4)) 5 5 512 256 > "$L/bench_1.txt" 2>&1 &
  sleep 2
  kill -9 $first
  sleep 0.5
  router $((P + 4)) > "$L/router_2.log" 2>&1
  sleep 2
  bench $((P + 4)) 16 48 128 128 > "$L/bench_2.txt" 2>&1
  summary "$L/bench_2.txt"
fi
grep -ah "released\|no KV" "$L/attention.log" "$L"/router_*.log | cut -c1-160
