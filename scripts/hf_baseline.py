#!/usr/bin/env python3
"""Hugging Face transformers baseline for docs/BENCHMARKS.md (issue 6): a model built with
AutoModelForCausalLM.from_config (random bf16 weights, no download) on one GPU, timed with
`generate` (greedy) at batch sizes 1 and N. Needs torch + transformers + a GPU.

  python3 scripts/hf_baseline.py --config=models/configs/qwen3-30b-a3b --batches=1,64 \
      --prompt_tokens=128 --new_tokens=16

Prints one line per batch size: output tok/s of the decode phase (generate of new_tokens minus
generate of 1 token, i.e. prefill excluded) and the end-to-end figure.
"""
import argparse
import json
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="models/configs/qwen3-30b-a3b")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--prompt_tokens", type=int, default=128)
    ap.add_argument("--new_tokens", type=int, default=16)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    cfg = AutoConfig.from_pretrained(a.config)
    torch.manual_seed(0)
    t0 = time.time()
    with torch.device("cuda"):
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        except TypeError:
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    model.eval()
    print("built %s in %.1f s: %.2f B parameters, %s" % (
        cfg.model_type, time.time() - t0, sum(p.numel() for p in model.parameters()) / 1e9,
        torch.cuda.get_device_name(0)), flush=True)
    results = []
    for b in [int(x) for x in a.batches.split(",")]:
        ids = torch.randint(0, min(8192, cfg.vocab_size), (b, a.prompt_tokens), device="cuda")

        def run(n):
            torch.cuda.synchronize()
            t = time.time()
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                     attention_mask=torch.ones_like(ids))
            torch.cuda.synchronize()
            assert out.shape[1] == a.prompt_tokens + n
            return time.time() - t

        run(2)  # warm-up
        t1 = run(1)
        tn = run(a.new_tokens)
        decode = b * (a.new_tokens - 1) / max(tn - t1, 1e-9)
        r = {"batch": b, "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens,
             "decode_out_tok_s": decode, "end_to_end_out_tok_s": b * a.new_tokens / tn}
        results.append(r)
        print("transformers generate batch=%d: decode %.1f out tok/s (end to end %.1f)" % (
            b, decode, r["end_to_end_out_tok_s"]), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
