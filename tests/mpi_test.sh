#!/usr/bin/env bash
# The mpirun launch:
# 1. mesh/mpi_transport_check (3 ranks): the MPI expert transport between processes against
#    in-process calls -- identical sums, calls in flight, expert-side errors, a rank stopping.
# 2. 5 ranks of moemesh_node (router, encoder, attention, 2 expert workers) on one host serve a
#    greedy request whose ids equal the embedded model's reference (Hugging Face) ids, once with
#    --expert_transport=mpi (checking RunExperts really went over MPI) and once with grpc and
#    int8 experts (--quantize_experts=int8: the shared load flags reach every rank); Ctrl-C of
#    mpirun ends every rank.
# 3. 6 ranks with --attention_ranks=2 (data parallel attention over MPI): two requests at once,
#    one per attention rank, both with the reference ids; both attention ranks' expert calls
#    went over MPI to both expert ranks.
set -euo pipefail
export XDG_CACHE_HOME="${TEST_TMPDIR:-$(mktemp -d)}"
NODE=tools/moemesh_node
TMP="${TEST_TMPDIR:-$(mktemp -d)}"
ROOT_FLAG=""
[ "$(id -u)" -eq 0 ] && ROOT_FLAG="--allow-run-as-root"

echo "== mpi_transport_check"
# shellcheck disable=SC2086
timeout 120 mpirun $ROOT_FLAG --oversubscribe -np 3 mesh/mpi_transport_check > "$TMP/check.out" 2>&1 \
  || { cat "$TMP/check.out"; echo "mpi_transport_check failed"; exit 1; }
cat "$TMP/check.out"
grep -q "mpi transport check: [0-9]* checks passed" "$TMP/check.out"

MPIRUN=""
cleanup() {
  [ -n "$MPIRUN" ] || return 0
  kill -INT "$MPIRUN" 2>/dev/null || true; sleep 1; kill -KILL -- -"$MPIRUN" 2>/dev/null || true
}
trap cleanup EXIT

run_cluster() {  # TRANSPORT [ATTENTION_RANKS [EXTRA_FLAG]]
  local transport="$1" attention="${2:-1}" extra="${3:-}" port out
  port=$(( 20000 + RANDOM % 20000 ))
  out="$TMP/mpi-$transport-$attention.out"
  echo "== moemesh_node --expert_transport=$transport --attention_ranks=$attention $extra"
  # shellcheck disable=SC2086
  setsid mpirun $ROOT_FLAG --oversubscribe -np $(( 4 + attention )) "$NODE" \
    --model=models/pydoc-moe-17m --attention_ranks="$attention" \
    --port="$port" --listen_host=127.0.0.1 --advertise_host=127.0.0.1 \
    --expert_transport="$transport" $extra > "$out" 2>&1 &
  MPIRUN=$!
  for _ in $(seq 240); do
    grep -q "ready" "$out" && break
    kill -0 "$MPIRUN" 2>/dev/null || { cat "$out"; echo "mpirun exited during start-up"; exit 1; }
    sleep 0.5
  done
  grep -q "ready" "$out" || { cat "$out"; echo "not ready in 120 s"; exit 1; }
  grep -q "attention worker on .*, experts over $transport" "$out" || { cat "$out"; exit 1; }
  /usr/bin/python3 - "$port" "$attention" <<'PY'
import json, sys, threading
sys.path.insert(0, "scripts")
import importlib.util
spec = importlib.util.spec_from_file_location("client", "scripts/client.py")
client = importlib.util.module_from_spec(spec); spec.loader.exec_module(client)
pb2, pb2_grpc = client.load_stubs()
import grpc
ref = json.load(open("models/pydoc-moe-17m/reference.json"))["prompts"][0]
stub = pb2_grpc.GenerationStub(grpc.insecure_channel("127.0.0.1:" + sys.argv[1]))
req = pb2.GenerateRequest(token_ids=pb2.TokenIds(ids=ref["input_ids"]))
req.sampling.temperature = 0
req.sampling.ignore_eos = True
req.sampling.max_tokens = len(ref["greedy"])
attention = int(sys.argv[2])
got = [None] * attention  # one request per attention rank, all at once

def run(i):
    ids = []
    for r in stub.Generate(req, timeout=120):
        ids.extend(r.ids)
    got[i] = ids

threads = [threading.Thread(target=run, args=(i,)) for i in range(attention)]
for t in threads:
    t.start()
for t in threads:
    t.join()
for ids in got:
    assert ids == ref["greedy"], (ids, ref["greedy"])
info = stub.GetModelInfo(pb2.GetModelInfoRequest(), timeout=10)
roles = sorted(w.role for w in info.workers)
assert roles == ["attention"] * attention + ["encoder", "expert", "expert", "router"], roles
print("mpirun cluster: greedy ids match the reference;", len(got[0]), "tokens x", attention)
PY
  # Ctrl-C of mpirun ends every rank (within 20 s: the gRPC servers get 2 s to drain).
  kill -INT "$MPIRUN"
  for _ in $(seq 40); do kill -0 "$MPIRUN" 2>/dev/null || break; sleep 0.5; done
  if kill -0 "$MPIRUN" 2>/dev/null || pgrep -g "$MPIRUN" > /dev/null; then
    cat "$out"; echo "mpirun or a rank still running 20 s after SIGINT"; exit 1
  fi
  MPIRUN=""
  cat "$out"
  if [ "$transport" = mpi ]; then
    # Every expert call of the greedy runs went over MPI: from each attention rank, and both
    # expert ranks served some.
    [ "$(grep -Ec "rank [0-9]+: MPI transport: [1-9][0-9]* RunExperts calls" "$out")" -eq "$attention" ] \
      || { echo "an attention rank made no MPI calls"; exit 1; }
    [ "$(grep -Ec "rank [0-9]+: served [1-9][0-9]* RunExperts calls over MPI" "$out")" -eq 2 ] \
      || { echo "an expert rank served nothing over MPI"; exit 1; }
  fi
}

run_cluster mpi
run_cluster grpc 1 --quantize_experts=int8
grep -c "holding .* (int8 products)" "$TMP/mpi-grpc-1.out" | grep -qx 2 \
  || { echo "the expert ranks did not load int8 experts"; exit 1; }
run_cluster mpi 2
echo "mpi_test: passed"
