#!/usr/bin/env bash
# The main command. Sets up, builds, starts a local MoE Mesh cluster on the embedded model
# (router, encoder, attention and 2 expert-worker processes on loopback), streams a completion
# for a sample prompt through the Python client, and leaves the cluster serving.
#   scripts/demo.sh ["prompt"]      start (or reuse) the cluster and stream a completion
#   scripts/demo.sh --stop          stop the cluster
# Environment: MOEMESH_PORT (default 50051), MOEMESH_EXPERT_WORKERS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${MOEMESH_PORT:-50051}
WORKERS=${MOEMESH_EXPERT_WORKERS:-2}
STATE=/tmp/moemesh-demo-$PORT
PIDFILE=$STATE/cluster.pid

if [ "${1:-}" = "--stop" ]; then
  if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    kill -INT "$(cat "$PIDFILE")"
    for _ in $(seq 50); do kill -0 "$(cat "$PIDFILE")" 2>/dev/null || break; sleep 0.2; done
    echo "stopped the cluster on 127.0.0.1:$PORT"
  else
    echo "no cluster running on 127.0.0.1:$PORT"
  fi
  rm -f "$PIDFILE"
  exit 0
fi
PROMPT=${1:-"To open a file for reading,"}

scripts/setup.sh
echo "== building (first time: several minutes on 2 cores)"
bazel build //tools:moemesh //router:router //encoder_worker:encoder_worker \
  //attention_worker:attention_worker //expert_worker:expert_worker 2>&1 \
  | grep -E "^(ERROR|FAILED|INFO: Build completed)" || true
test -x bazel-bin/tools/moemesh || { echo "build failed: run 'bazel build //tools:moemesh'"; exit 1; }

mkdir -p "$STATE"
if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
  echo "== reusing the cluster already serving on 127.0.0.1:$PORT (pid $(cat "$PIDFILE"))"
else
  echo "== starting a cluster: router, encoder, attention and $WORKERS expert workers"
  rm -f "$STATE/cluster.out"
  setsid bazel-bin/tools/moemesh cluster --model=models/pydoc-moe-17m \
    --expert_workers="$WORKERS" --port="$PORT" --threads=1 --log_dir="$STATE" \
    > "$STATE/cluster.out" 2>&1 < /dev/null &
  echo $! > "$PIDFILE"
  for _ in $(seq 600); do
    grep -q "ready" "$STATE/cluster.out" 2>/dev/null && break
    kill -0 "$(cat "$PIDFILE")" 2>/dev/null || { cat "$STATE/cluster.out"; echo "the cluster failed to start"; exit 1; }
    sleep 0.5
  done
  grep -q "ready" "$STATE/cluster.out" || { cat "$STATE/cluster.out"; echo "the cluster did not become ready"; exit 1; }
  head -1 "$STATE/cluster.out"
fi

echo "== streaming a completion for: $PROMPT"
/usr/bin/python3 scripts/client.py --addr="127.0.0.1:$PORT" --max_tokens=48 "$PROMPT"
echo
echo "The cluster keeps serving on 127.0.0.1:$PORT."
echo "  query it:  /usr/bin/python3 scripts/client.py --addr=127.0.0.1:$PORT \"your prompt\""
echo "  stop it:   scripts/demo.sh --stop"
