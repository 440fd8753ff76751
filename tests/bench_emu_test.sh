#!/usr/bin/env bash
# expert_gemm_bench's every path at toy sizes, and moemesh_bench's GPU path (--device=cuda, dummy weights, argmax-only batched steps, with and
# without --cuda_graphs, with --cuda_pdl and with --cuda_deep_loads) on the CUDA emulation: the figures the H100 runs record must come out,
# and --cuda_graphs must replay decode steps (single stream and batch) while the default replays
# none.
set -euo pipefail
BENCH="${MOEMESH_BIN_DIR:-$PWD}/tools/moemesh_bench_emu"
OUTDIR="${TEST_TMPDIR:-$(mktemp -d)}"
run() {  # run NAME EXTRA_FLAGS...
  local name=$1; shift
  "$BENCH" --mode=offline --device=cuda --load_format=dummy --model=testdata/oracle/qwen3_moe \
    --compute_dtype=bf16 --prompt_tokens=16 --decode_tokens=8 --repeats=1 --batch=4 \
    --json="$OUTDIR/$name.json" "$@" > "$OUTDIR/$name.log" 2>&1 || { cat "$OUTDIR/$name.log"; exit 1; }
}
run plain
run graphs --cuda_graphs
run graphs_pdl --cuda_graphs --cuda_pdl
run graphs_deep --cuda_graphs --cuda_deep_loads
/usr/bin/python3 - "$OUTDIR" <<'PYEOF'
import json, re, sys
d = sys.argv[1]
for name, want_replays in (("plain", False), ("graphs", True), ("graphs_pdl", True), ("graphs_deep", True)):
    r = json.load(open("%s/%s.json" % (d, name)))
    assert r["device"].startswith("cuda:0 (CUDA emulation"), r["device"]
    for k in ("prefill_tok_s", "decode_tok_s", "batch_out_tok_s", "batch_step_ms"):
        assert r[k] > 0, (name, k, r[k])
    m = re.match(r"CUDA graphs: (\d+) captured, (\d+) decode steps replayed; programmatic dependent launch (on|off); deep weight loads (on|off)$", r["device_report"])
    assert m, r["device_report"]
    captured, replayed = int(m.group(1)), int(m.group(2))
    assert m.group(3) == ("on" if name.endswith("pdl") else "off"), r["device_report"]
    assert m.group(4) == ("on" if name.endswith("deep") else "off"), r["device_report"]
    if want_replays:
        # 7 single-stream and 7 batched decode steps after each shape's warm-up and capture.
        assert captured >= 2 and replayed >= 10, r["device_report"]
    else:
        assert captured == 0 and replayed == 0, r["device_report"]
    print(name, r["device_report"], "decode %.1f tok/s" % r["decode_tok_s"])
PYEOF
GEMM="${MOEMESH_BIN_DIR:-$PWD}/engine/cuda/expert_gemm_bench_emu"
"$GEMM" --tokens=64 --experts=8 --top_k=2 --hidden=64 --width=32 --iters=1 --streams=4 \
  --heads=2 --kv_heads=1 --head_dim=16 --vocab=300 --weight_pool_mb=0 --attention_contexts=40 > "$OUTDIR/gemm.log" 2>&1 || { cat "$OUTDIR/gemm.log"; exit 1; }
cat "$OUTDIR/gemm.log"
# 128 rows over 8 experts: one strided bucket pads 1.5 x against the buckets' 1.19 x, so the engine
# takes the buckets (both ways are timed by name).
grep -qE "^  grouped / dense throughput: [0-9.]+ \(target >= 0.70\); path batched \(padded rows 1.188 x\); with y unpadded to fp32: [0-9.]+ ms \([0-9.]+\)$" "$OUTDIR/gemm.log"
grep -qE "^  by path, y unpadded: batched [0-9.]+ ms \(2 buckets, padded rows 1.188 x\), strided [0-9.]+ ms \(one bucket by slot, padded rows 1.500 x\), blocks of 64 rows [0-9.]+ ms \(4.000 x\), of 128 rows [0-9.]+ ms \(8.000 x\), cuBLAS grouped [0-9.]+ ms, one GEMM per expert [0-9.]+ ms \(these two: rows gathered beforehand\)$" "$OUTDIR/gemm.log"
grep -qE "^  batched by bucket fill \(engine: 0.80; strided where it pads at most 10% more\), y unpadded: 0.80: [0-9.]+ ms \([0-9]+ buckets, [0-9.]+ x\)(, [0-9.]+: [0-9.]+ ms \([0-9]+ buckets, [0-9.]+ x\)){3}$" "$OUTDIR/gemm.log"
# With 256 tokens (512 rows, 64 per expert) one strided bucket pads little enough: the engine's path.
"$GEMM" --tokens=256 --experts=8 --top_k=2 --hidden=64 --width=32 --iters=1 --streams=4 \
  --heads=2 --kv_heads=1 --head_dim=16 --vocab=300 --weight_pool_mb=0 --attention_contexts=40 \
  --decode_products=false --decode_attention=false --bucket_fills=1 > "$OUTDIR/gemm256.log" 2>&1 || { cat "$OUTDIR/gemm256.log"; exit 1; }
grep "path" "$OUTDIR/gemm256.log"
grep -qE "^  grouped / dense throughput: [0-9.]+ \(target >= 0.70\); path strided \(padded rows [0-9.]+ x\)" "$OUTDIR/gemm256.log"
grep -qE "one-output kernel [0-9.]+ us .*multi-output kernel [0-9.]+ us .*in flight [0-9.]+ us .*with 8 rows per pass [0-9.]+ us .*; cuBLAS strided batched, [0-9]+ rows per expert [0-9.]+ us \([0-9]+ GB/s\)$" "$OUTDIR/gemm.log"
# The decode products: 7 rows, each with the auto split and 7 timings (6 choices in graphs, then
# the auto choice launched).
test "$(grep -cE "^  (qkv|o|router|experts|LM head)[^0-9]*( +[0-9.]+){2}( +[0-9.]+ us +[0-9]+){7}$" "$OUTDIR/gemm.log")" = 7
# Decode attention: 1 and 4 sequences of 40 positions, fp32 and bf16 caches; the auto split
# count and 5 forced ones.
test "$(grep -cE "^  [14] x 40, (fp32|bf16) +[0-9]+( +[0-9.]+ +[0-9]+){5}$" "$OUTDIR/gemm.log")" = 4
echo "[  PASSED  ] 1 test."
