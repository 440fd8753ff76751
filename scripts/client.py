#!/usr/bin/python3
"""MoE Mesh command-line client (moemesh.v1.Generation over gRPC).

  scripts/client.py [options] PROMPT          stream a completion (also: generate PROMPT)
  scripts/client.py [--addr=..] tokenize TEXT print the token ids, comma-separated
  scripts/client.py [--addr=..] detokenize 1,2,3
  scripts/client.py [--addr=..] info          print ModelInfo as JSON

Options (generate): --addr=127.0.0.1:50051 --max_tokens=64 (0 = leave unset: the server's default)
  --temperature=T --top_p=P --top_k=K --min_p=P --repetition_penalty=R --seed=S --stop=STR (repeatable)
  --ignore_eos --experts_per_token=K --thinking_budget=N --logprobs=N --prompt_logprobs=N
  --json_object --chat [--system=TEXT] --request_id=ID --json
  --timeout=SECONDS.
Sampling fields are only set when given (proto3 `optional`); unset ones take the model's defaults.

Text deltas go to stdout as they arrive; a summary line goes to stderr:
  [finish=stop|length|cancelled prompt_tokens=N completion_tokens=M tok/s=X]
--json prints one JSON object per response instead of the text. On a gRPC error it prints
`error: <STATUS_CODE>: <details>` on stderr and exits 1 (130 on Ctrl-C).

Needs Debian's python3-grpcio and python3-protobuf: run it with /usr/bin/python3. The Python stubs
are generated on first use with /usr/bin/protoc and /usr/bin/grpc_python_plugin into
$XDG_CACHE_HOME/moemesh/py/<hash of the proto> (~/.cache when XDG_CACHE_HOME is unset).
"""

import argparse
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

PROTO_REL = os.path.join("protos", "generation.proto")
PROTOC = "/usr/bin/protoc"
GRPC_PYTHON_PLUGIN = "/usr/bin/grpc_python_plugin"
SUBCOMMANDS = ("generate", "tokenize", "detokenize", "info")


def _find_proto():
    """Returns (include_root, path) of protos/generation.proto."""
    env = os.environ.get("MOEMESH_PROTO")
    if env:
        env = os.path.abspath(env)
        return os.path.dirname(os.path.dirname(env)), env
    here = os.path.abspath(__file__)
    # Bazel runfiles keep scripts/ and protos/ side by side as symlinks: try the unresolved
    # location first, then the real one (source tree).
    for script in (here, os.path.realpath(here)):
        root = os.path.dirname(os.path.dirname(script))
        path = os.path.join(root, PROTO_REL)
        if os.path.isfile(path):
            return root, path
    raise RuntimeError("cannot find %s next to %s (set MOEMESH_PROTO)" % (PROTO_REL, here))


def _cache_root():
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        home = os.path.expanduser("~")
        base = os.path.join(home, ".cache") if home and home != "~" else ""
    if not base:
        base = os.environ.get("TEST_TMPDIR") or tempfile.gettempdir()
    return os.path.join(base, "moemesh", "py")


def load_stubs():
    """Returns (generation_pb2, generation_pb2_grpc), generating them into the cache if needed."""
    root, proto = _find_proto()
    with open(proto, "rb") as f:
        # The layout version is part of the key: a change to how stubs are laid out regenerates.
        digest = hashlib.sha256(b"layout-2\0" + f.read()).hexdigest()[:16]
    out = os.path.join(_cache_root(), digest)
    marker = os.path.join(out, "protos", "generation_pb2_grpc.py")
    if not os.path.isfile(marker):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        # Generate into a private directory, then rename it into place: concurrent clients never
        # see a half-written cache.
        tmp = tempfile.mkdtemp(prefix=".gen-", dir=os.path.dirname(out))
        try:
            # Copy the proto so that its path inside the include root is exactly protos/...: the
            # generated module is then `protos.generation_pb2` whatever the source layout.
            src_root = os.path.join(tmp, "src")
            os.makedirs(os.path.join(src_root, "protos"))
            shutil.copyfile(proto, os.path.join(src_root, PROTO_REL))
            gen = os.path.join(tmp, "gen")
            os.makedirs(gen)
            cmd = [PROTOC, "-I" + src_root, "--python_out=" + gen, "--grpc_python_out=" + gen,
                   "--plugin=protoc-gen-grpc_python=" + GRPC_PYTHON_PLUGIN, PROTO_REL]
            res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            if res.returncode != 0:
                raise RuntimeError("protoc failed (%s): %s" % (" ".join(cmd),
                                                              res.stderr.decode(errors="replace")))
            # A regular package (not a namespace one): no other `protos` directory on sys.path
            # can shadow or merge with it.
            open(os.path.join(gen, "protos", "__init__.py"), "w").close()
            try:
                os.rename(gen, out)
            except OSError:
                if not os.path.isfile(marker):  # lost a race only if the winner's copy is there
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if out not in sys.path:
        sys.path.insert(0, out)
    # Drop a `protos` package found elsewhere first (e.g. a namespace package from the repo root).
    mod = sys.modules.get("protos")
    if mod is not None and out not in str(getattr(mod, "__path__", "")):
        for name in [n for n in sys.modules if n == "protos" or n.startswith("protos.")]:
            del sys.modules[name]
    pb2 = importlib.import_module("protos.generation_pb2")
    pb2_grpc = importlib.import_module("protos.generation_pb2_grpc")
    return pb2, pb2_grpc


def _build_parser():
    p = argparse.ArgumentParser(
        prog="client.py",
        description="MoE Mesh client: stream a completion, or tokenize / detokenize / info.",
        usage="%(prog)s [options] PROMPT | tokenize TEXT | detokenize 1,2,3 | info")
    p.add_argument("--addr", default="127.0.0.1:50051", help="server address (host:port)")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.add_argument("--json", action="store_true", help="print one JSON object per response")
    g = p.add_argument_group("generate")
    g.add_argument("--max_tokens", type=int, default=64,
                   help="new tokens (default 64; 0 = unset: the server's default)")
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top_p", type=float, default=None)
    g.add_argument("--top_k", type=int, default=None)
    g.add_argument("--min_p", type=float, default=None)
    g.add_argument("--repetition_penalty", type=float, default=None)
    g.add_argument("--presence_penalty", type=float, default=None)
    g.add_argument("--frequency_penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop string (repeatable)")
    g.add_argument("--ignore_eos", action="store_true", default=None)
    g.add_argument("--experts_per_token", type=int, default=None)
    g.add_argument("--min_tokens", type=int, default=None, metavar="N",
                   help="tokens generated before an end token or a stop string may end it")
    g.add_argument("--logit_bias", action="append", default=[], metavar="ID:BIAS",
                   help="add BIAS (-100..100) to token ID's logit (repeatable, or comma-separated)")
    g.add_argument("--thinking_budget", type=int, default=None, metavar="N",
                   help="reasoning tokens allowed after <think> before </think> is forced")
    g.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="top-N logprobs per token (printed on stderr, or in --json)")
    g.add_argument("--prompt_logprobs", type=int, default=None, metavar="N",
                   help="also score the prompt's tokens, with top-N (0..20), printed on stderr")
    g.add_argument("--json_object", action="store_true",
                   help="response_format JSON_OBJECT: the answer is one JSON object")
    g.add_argument("--json_schema", default=None, metavar="SCHEMA",
                   help="response_format JSON_SCHEMA: the answer is one JSON object this JSON "
                        "Schema describes (the schema's text, or @FILE)")
    g.add_argument("--chat", action="store_true", help="send PROMPT as one user chat message")
    g.add_argument("--system", default=None, help="with --chat: a system message first")
    g.add_argument("--request_id", default="")
    g.add_argument("--priority", type=int, default=None,
                   help="scheduling priority: lower is admitted first (default 0)")
    g.add_argument("--prompt", default=None, help="the prompt (instead of the positional PROMPT)")
    t = p.add_argument_group("tokenize / detokenize")
    t.add_argument("--add_special_tokens", action="store_true")
    t.add_argument("--skip_special_tokens", action="store_true")
    p.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    return p


def build_request(pb2, a, prompt):
    req = pb2.GenerateRequest()
    if a.chat:
        if a.system is not None:
            req.chat.messages.add(role="system", content=a.system)
        req.chat.messages.add(role="user", content=prompt)
    else:
        req.text = prompt
    s = req.sampling
    s.SetInParent()
    if a.max_tokens is not None and a.max_tokens > 0:
        s.max_tokens = a.max_tokens
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                 "presence_penalty", "frequency_penalty", "seed", "ignore_eos",
                 "experts_per_token", "thinking_budget", "logprobs", "prompt_logprobs",
                 "min_tokens"):
        v = getattr(a, name)
        if v is not None:
            setattr(s, name, v)
    s.stop.extend(a.stop)
    for item in ",".join(a.logit_bias).split(","):
        if item:
            tid, _, bias = item.partition(":")
            try:
                s.logit_bias[int(tid)] = float(bias)
            except ValueError:
                sys.stderr.write("error: --logit_bias takes ID:BIAS, got %r\n" % item)
                sys.exit(2)
    if a.json_object:
        s.response_format = pb2.RESPONSE_FORMAT_JSON_OBJECT
    if a.json_schema:
        schema = a.json_schema
        if schema.startswith("@"):
            with open(schema[1:], encoding="utf-8") as f:
                schema = f.read()
        s.response_format = pb2.RESPONSE_FORMAT_JSON_SCHEMA
        s.json_schema = schema
    if a.request_id:
        req.request_id = a.request_id
    if a.priority is not None:
        req.priority = a.priority
    return req


def _out(text):
    sys.stdout.buffer.write(text.encode("utf-8"))
    sys.stdout.buffer.flush()


def _to_json(msg):
    from google.protobuf import json_format
    d = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    return json.dumps(d, ensure_ascii=False)


FINISH = {0: "unspecified", 1: "stop", 2: "length", 3: "cancelled"}


def run_generate(pb2, stub, a, prompt):
    import grpc
    req = build_request(pb2, a, prompt)
    t0 = time.monotonic()
    call = stub.Generate(req, timeout=a.timeout)
    finish, prompt_tokens, completion_tokens, counted = 0, 0, 0, 0
    logprobs, prompt_logprobs = [], []
    printed = False
    try:
        for resp in call:
            counted += len(resp.ids)
            if a.json:
                _out(_to_json(resp) + "\n")
            elif resp.text:
                _out(resp.text)
                printed = True
            logprobs.extend(resp.logprobs)
            prompt_logprobs.extend(resp.prompt_logprobs)
            if resp.finish_reason:
                finish = resp.finish_reason
            if resp.prompt_tokens:
                prompt_tokens = resp.prompt_tokens
            if resp.completion_tokens:
                completion_tokens = resp.completion_tokens
    except KeyboardInterrupt:
        call.cancel()
        finish = 3
        code = 130
    except grpc.RpcError as e:
        if printed:
            _out("\n")
        return _rpc_error(e)
    else:
        code = 0
    elapsed = time.monotonic() - t0
    if not completion_tokens:
        completion_tokens = counted
    if not a.json:
        _out("\n")
    if not a.json:
        if prompt_logprobs:
            sys.stderr.write("prompt:\n")
        for i, lp in enumerate(prompt_logprobs + logprobs):
            if i == len(prompt_logprobs) and prompt_logprobs and logprobs:
                sys.stderr.write("generated:\n")
            top = " ".join("%r:%.3f" % (t.text, t.logprob) for t in lp.top)
            sys.stderr.write("  %-12r id=%-6d logprob=%.4f  top: %s\n"
                             % (lp.chosen.text, lp.chosen.id, lp.chosen.logprob, top))
    tps = completion_tokens / elapsed if elapsed > 0 else 0.0
    sys.stderr.write("[finish=%s prompt_tokens=%d completion_tokens=%d tok/s=%.1f]\n"
                     % (FINISH.get(finish, str(finish)), prompt_tokens, completion_tokens, tps))
    sys.stderr.flush()
    return code


def _rpc_error(e):
    code = e.code()
    name = code.name if code is not None else "UNKNOWN"
    sys.stderr.write("error: %s: %s\n" % (name, e.details() or ""))
    sys.stderr.flush()
    return 1


def _parse_ids(args):
    ids = []
    for arg in args:
        for part in arg.replace(",", " ").split():
            ids.append(int(part))
    return ids


def main(argv=None):
    parser = _build_parser()
    a = parser.parse_intermixed_args(argv)
    pos = list(a.args)
    cmd = "generate"
    if pos and pos[0] in SUBCOMMANDS:
        cmd = pos.pop(0)

    if cmd == "generate":
        if a.prompt is not None:
            if pos:
                parser.error("give the prompt either as PROMPT or as --prompt, not both")
            prompt = a.prompt
        elif pos:
            prompt = " ".join(pos)
        else:
            parser.error("missing PROMPT")
        if a.system is not None and not a.chat:
            parser.error("--system needs --chat")
    elif cmd == "tokenize":
        if not pos:
            parser.error("tokenize: missing TEXT")
        text = " ".join(pos)
    elif cmd == "detokenize":
        try:
            ids = _parse_ids(pos)
        except ValueError:
            parser.error("detokenize: ids must be integers, e.g. 1,2,3")
        if not pos:
            parser.error("detokenize: missing IDS (e.g. 1,2,3)")
    elif pos:
        parser.error("info takes no arguments")

    try:
        pb2, pb2_grpc = load_stubs()
    except Exception as e:  # noqa: BLE001 - a setup problem, not a gRPC error
        sys.stderr.write("error: cannot load the gRPC stubs: %s\n" % e)
        return 2
    import grpc

    with grpc.insecure_channel(a.addr) as channel:
        stub = pb2_grpc.GenerationStub(channel)
        try:
            if cmd == "generate":
                return run_generate(pb2, stub, a, prompt)
            if cmd == "tokenize":
                r = stub.Tokenize(pb2.TokenizeRequest(text=text,
                                                      add_special_tokens=a.add_special_tokens),
                                  timeout=a.timeout)
                _out((_to_json(r) if a.json else ",".join(str(i) for i in r.ids)) + "\n")
            elif cmd == "detokenize":
                r = stub.Detokenize(pb2.DetokenizeRequest(
                    ids=ids, skip_special_tokens=a.skip_special_tokens), timeout=a.timeout)
                _out((_to_json(r) if a.json else r.text) + "\n")
            else:
                from google.protobuf import json_format
                r = stub.GetModelInfo(pb2.GetModelInfoRequest(), timeout=a.timeout)
                d = json_format.MessageToDict(r, preserving_proto_field_name=True,
                                              including_default_value_fields=True)
                _out(json.dumps(d, ensure_ascii=False, indent=None if a.json else 2) + "\n")
            return 0
        except grpc.RpcError as e:
            return _rpc_error(e)
        except KeyboardInterrupt:
            return 130


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:
        # e.g. `client.py ... | head`: stop quietly.
        try:
            sys.stdout = None
        finally:
            os._exit(141)
