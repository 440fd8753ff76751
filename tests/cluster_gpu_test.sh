#!/usr/bin/env bash
# A mixed cluster on one GPU machine: encoder, two expert workers (one --device=cpu, one
# --device=cuda:0, half of the experts each), an attention worker on the CPU and a second one
# on the GPU, each behind a router; every oracle family and the embedded model must give the
# Hugging Face greedy ids through both, and GetModelInfo must report each worker's device. The
# GPU attention worker runs with speculative decoding and a prefix cache too.
# Without a GPU (or in a binary built without --config=cuda) it reports itself skipped.
# With MOEMESH_CUDA_EMULATION=1 (//tests:cluster_emu_test) the GPU workers are the *_emu
# binaries, whose cuda:0 is the CPU emulation of engine/cuda/emu, and the oracle's families run
# (the embedded model is too slow there).
# Binaries: $MOEMESH_BIN_DIR (default: the runfiles root). Python with grpcio: $PYTHON.
set -euo pipefail
export XDG_CACHE_HOME="${XDG_CACHE_HOME:-${TEST_TMPDIR:-$(mktemp -d)}}"
BIN="${MOEMESH_BIN_DIR:-$PWD}"
PY="${PYTHON:-/usr/bin/python3}"
skip() {
  echo "[  SKIPPED ] cluster_gpu_test: $1"
  echo "[  PASSED  ] 0 tests."
  exit 0
}
EMU="${MOEMESH_CUDA_EMULATION:-0}"
GPU_EXPERT="$BIN/expert_worker/expert_worker"
GPU_ATTENTION="$BIN/attention_worker/attention_worker"
MODELS="testdata/oracle/qwen3_moe testdata/oracle/qwen2_moe testdata/oracle/mixtral testdata/oracle/olmoe models/pydoc-moe-17m"
if [ "$EMU" = 1 ]; then
  GPU_EXPERT="${GPU_EXPERT}_emu"
  GPU_ATTENTION="${GPU_ATTENTION}_emu"
  MODELS="${MODELS% models/pydoc-moe-17m}"
else
  command -v nvidia-smi > /dev/null && nvidia-smi -L 2>/dev/null | grep -q GPU || skip "no CUDA device on this machine"
fi
LOG="${TEST_TMPDIR:-$(mktemp -d)}"
# start runs in a command substitution (a subshell): the pids go to a file, not a variable.
cleanup() {
  [ -f "$LOG/pids" ] && while read -r p; do kill "$p" 2>/dev/null || true; done < "$LOG/pids"
  rm -f "$LOG/pids"
  wait 2>/dev/null || true
}
trap cleanup EXIT
start() {  # start NAME ARGS... ; waits for "... on HOST:PORT" and prints the address
  local name=$1; shift
  "$@" > "$LOG/$name.log" 2>&1 &
  local pid=$!
  echo "$pid" >> "$LOG/pids"
  for _ in $(seq 600); do
    # Complete lines only (a line written in pieces may end "on 127.0.0.1:4" for now).
    if a=$(head -n "$(wc -l < "$LOG/$name.log")" "$LOG/$name.log" | grep -oE "(Generation on|embeddings of .* on|listening on|serving on) [0-9.]+:[0-9]+" | head -1 | awk '{print $NF}'); [ -n "$a" ]; then
      echo "$a"; return 0
    fi
    kill -0 "$pid" 2>/dev/null || { cat "$LOG/$name.log" >&2; echo "$name exited" >&2; return 1; }
    sleep 0.2
  done
  cat "$LOG/$name.log" >&2; echo "$name did not start" >&2; return 1
}
check() {  # check MODEL_DIR
  local model=$1 layers experts half
  layers=$("$PY" -c "import json;print(json.load(open('$model/config.json'))['num_hidden_layers'])")
  experts=$("$PY" -c "import json;c=json.load(open('$model/config.json'));print(c.get('num_experts') or c.get('num_local_experts'))")
  half=$((experts / 2))
  local m="--model=$model"
  enc=$(start enc "$BIN/encoder_worker/encoder_worker" "$m" --address=127.0.0.1:0)
  e0=$(start cpu_expert "$BIN/expert_worker/expert_worker" "$m" --address=127.0.0.1:0 --device=cpu --shards="0-$((layers - 1)):0-$((half - 1))")
  if ! e1=$(start gpu_expert "$GPU_EXPERT" "$m" --address=127.0.0.1:0 --device=cuda:0 --shards="0-$((layers - 1)):$half-$((experts - 1))"); then
    grep -q "built without CUDA" "$LOG/gpu_expert.log" && skip "binaries built without --config=cuda"
    exit 1
  fi
  grep -qE "on cpu( \(.*\))?, listening" "$LOG/cpu_expert.log" && grep -qE "on cuda:0 \(.*\), listening" "$LOG/gpu_expert.log" || { cat "$LOG"/*expert.log; echo "expert workers do not report their devices"; exit 1; }
  for dev in cpu cuda:0; do
    attention_bin="$BIN/attention_worker/attention_worker"
    [ "$dev" = cpu ] || attention_bin="$GPU_ATTENTION"
    # The GPU attention worker also speculates and keeps a prefix cache: each prompt is sent
    # twice (the second time its rows come from the cache), the ids must not change, and the
    # router's /metrics must show both at work.
    extra=() http=() http_port=""
    if [ "$dev" != cpu ]; then
      extra=(--speculative_tokens=3 --prefix_cache_tokens=4096)
      http=(--http_address=127.0.0.1:0)  # the router picks a free port and logs it
    fi
    att=$(start "att_$dev" "$attention_bin" "$m" --address=127.0.0.1:0 --device=$dev --encoder="$enc" --experts="$e0,$e1" --kv_capacity_tokens=4096 "${extra[@]}")
    # GetModelInfo must list every worker with the device it reports, whether the router knows
    # the cluster from its config (the GPU attention worker's round) or from the attention
    # worker alone (--attention: the encoder and expert workers that worker says it reaches).
    if [ "$dev" = cpu ]; then
      rt=$(start "router_$dev" "$BIN/router/router" "$m" --address=127.0.0.1:0 --attention="$att" "${http[@]}")
    else
      cat > "$LOG/cluster_$dev.pbtxt" <<CFG
model: "$model"
router { address: "127.0.0.1:0" }
encoder { address: "$enc" }
attention { address: "$att" device: "$dev" }
experts { address: "$e0" device: "cpu" shards { layers: "*" experts: "0-$((half - 1))" } }
experts { address: "$e1" device: "cuda:0" shards { layers: "*" experts: "$half-$((experts - 1))" } }
CFG
      rt=$(start "router_$dev" "$BIN/router/router" --config="$LOG/cluster_$dev.pbtxt" "${http[@]}")
    fi
    if [ ${#http[@]} -gt 0 ]; then
      # The router starts its HTTP server before it logs its gRPC address.
      http_port=$(grep -oE "HTTP API on [0-9.]+:[0-9]+" "$LOG/router_$dev.log" | head -1 | sed 's/.*://')
      [ -n "$http_port" ] || { cat "$LOG/router_$dev.log"; echo "router did not log its HTTP address"; exit 1; }
    fi
    "$PY" - "$rt" "$model" "$dev" "${http_port:-}" <<'PYEOF'
import importlib.util, json, os, re, sys, urllib.request
spec = importlib.util.spec_from_file_location("client", "scripts/client.py")
client = importlib.util.module_from_spec(spec); spec.loader.exec_module(client)
pb2, pb2_grpc = client.load_stubs()
import grpc
addr, model, dev, http_port = sys.argv[1:]
ref = json.load(open(os.path.join(model, "reference.json")))
cases = ref["prompts"] if isinstance(ref, dict) else ref
stub = pb2_grpc.GenerationStub(grpc.insecure_channel(addr))
for rep in range(2 if http_port else 1):
    for c in cases:
        req = pb2.GenerateRequest(token_ids=pb2.TokenIds(ids=c["input_ids"]))
        req.sampling.temperature = 0
        req.sampling.ignore_eos = True
        req.sampling.max_tokens = len(c["greedy"])
        ids = [i for r in stub.Generate(req, timeout=300) for i in r.ids]
        assert ids == c["greedy"], (model, dev, rep, ids, c["greedy"])
info = stub.GetModelInfo(pb2.GetModelInfoRequest(), timeout=10)
devices = [(w.role, w.device) for w in info.workers]
want = [("router", "cpu"), ("encoder", "cpu"), ("attention", dev), ("expert", "cpu"),
        ("expert", "cuda:0")]
assert devices == want, devices
shards = [list(w.shards) for w in info.workers if w.role == "expert"]
assert all(len(s) == 1 and s[0] for s in shards), shards
note = ""
if http_port:
    metrics = urllib.request.urlopen("http://127.0.0.1:%s/metrics" % http_port, timeout=10).read().decode()
    def total(name):
        return sum(float(v) for v in re.findall(r"^%s\{[^}]*\} (\S+)$" % name, metrics, re.M))
    hits, drafts = total("moemesh_prefix_cache_hit_tokens_total"), total("moemesh_spec_draft_tokens_total")
    assert hits > 0 and drafts > 0, (model, hits, drafts)
    note = ", twice; %d prefix-cache rows reused, %d drafts" % (hits, drafts)
print("%s, attention on %s, experts on cpu + cuda:0: %d prompts, greedy ids match%s; GetModelInfo: %s" % (model, dev, len(cases), note, ", ".join("%s %s" % d for d in devices)))
PYEOF
  done
  cleanup
}
for model in $MODELS; do
  check "$model"
done
echo "[  PASSED  ] 1 test."
