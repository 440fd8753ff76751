#!/usr/bin/python3
"""Time to first token of prompts that share a long prefix (for the prefix cache's benchmark).

  /usr/bin/python3 scripts/prefix_ttft.py [--addr=127.0.0.1:50051] [--prefix=1000] [--asks=6]

Asks --asks times: the first --prefix held-out ids of the embedded model, then a different
10-token question each time; 8 new tokens, greedy. Prints the milliseconds from each Generate
call to its first response with ids.
"""
import argparse
import json
import os
import sys
import time

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import client  # noqa: E402  (generates the stubs)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--addr", default="127.0.0.1:50051")
    p.add_argument("--prefix", type=int, default=1000, help="shared prompt tokens")
    p.add_argument("--asks", type=int, default=6)
    p.add_argument("--ids_file", default="models/pydoc-moe-17m/heldout_ids.json")
    a = p.parse_args()
    pb2, pb2_grpc = client.load_stubs()
    with open(a.ids_file) as f:
        held = json.load(f)
    if a.prefix + 10 * a.asks + 9010 > len(held):
        sys.exit("the ids file is too short for --prefix=%d --asks=%d" % (a.prefix, a.asks))
    stub = pb2_grpc.GenerationStub(grpc.insecure_channel(a.addr))
    times = []
    for q in range(a.asks):
        req = pb2.GenerateRequest()
        req.token_ids.ids.extend(held[:a.prefix] + held[9000 + 10 * q:9010 + 10 * q])
        req.sampling.max_tokens = 8
        req.sampling.ignore_eos = True
        req.sampling.temperature = 0
        t = time.time()
        first = None
        for r in stub.Generate(req, timeout=120):
            if first is None and r.ids:
                first = time.time() - t
        times.append(first * 1000)
        time.sleep(0.2)  # the router releases the finished sequence after its last token
    print("TTFT ms: " + " ".join("%.1f" % x for x in times))


if __name__ == "__main__":
    main()
