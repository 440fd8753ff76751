#!/usr/bin/env bash
# The mpirun launch: 5 ranks (router, encoder, attention, 2 expert workers) on one host serve a
# greedy request whose ids equal the embedded model's reference (Hugging Face) ids.
set -euo pipefail
export XDG_CACHE_HOME="${TEST_TMPDIR:-$(mktemp -d)}"
NODE=tools/moemesh_node
PORT=$(( 20000 + RANDOM % 20000 ))
OUT="${TEST_TMPDIR:-/tmp}/mpi.out"
ROOT_FLAG=""
[ "$(id -u)" -eq 0 ] && ROOT_FLAG="--allow-run-as-root"
# shellcheck disable=SC2086
setsid mpirun $ROOT_FLAG --oversubscribe -np 5 "$NODE" --model=models/pydoc-moe-17m \
  --port="$PORT" --listen_host=127.0.0.1 --advertise_host=127.0.0.1 > "$OUT" 2>&1 &
MPIRUN=$!
cleanup() { kill -INT "$MPIRUN" 2>/dev/null || true; sleep 1; kill -KILL -- -"$MPIRUN" 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 240); do
  grep -q "ready" "$OUT" && break
  kill -0 "$MPIRUN" 2>/dev/null || { cat "$OUT"; echo "mpirun exited during start-up"; exit 1; }
  sleep 0.5
done
grep -q "ready" "$OUT" || { cat "$OUT"; echo "not ready in 120 s"; exit 1; }
cat "$OUT"
/usr/bin/python3 - "$PORT" <<'PY'
import json, sys
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
ids = []
for r in stub.Generate(req, timeout=120):
    ids.extend(r.ids)
assert ids == ref["greedy"], (ids, ref["greedy"])
info = stub.GetModelInfo(pb2.GetModelInfoRequest(), timeout=10)
roles = sorted(w.role for w in info.workers)
assert roles == ["attention", "encoder", "expert", "expert", "router"], roles
print("mpirun cluster: greedy ids match the reference;", len(ids), "tokens")
PY
