#!/usr/bin/python3
"""End-to-end tests of MoE Mesh: real processes on 127.0.0.1, real gRPC, real checkpoints.

  bazel test //tests:cluster_test            # tests/cluster_test.sh sets the environment
  /usr/bin/python3 tests/cluster_test.py [-k NAME]
      after `bazel build //router:router //encoder_worker:encoder_worker
      //attention_worker:attention_worker //expert_worker:expert_worker //tools:moemesh`:
      the binaries are taken from bazel-bin/ (or from $MOEMESH_BIN_DIR).

Ground truth: testdata/oracle/<family>/reference.json (16 greedy ids per prompt from Hugging Face
transformers) and models/pydoc-moe-17m/reference.json (40 greedy ids per prompt).

Every process is started in its own process group and killed (SIGTERM, then SIGKILL) at the end
of the test that owns it, and again at exit whatever happened; each also gets SIGKILL if this
process dies (setpriv --pdeathsig). Every wait has a deadline, and a watchdog ends a run that
hangs anyway (after $MOEMESH_TEST_WATCHDOG_S, default 840 s) with every thread's stack.
Set MOEMESH_TEST_KEEP_LOGS=DIR to keep the processes' logs in DIR.
"""

import atexit
import contextlib
import faulthandler
import http.client
import importlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENT_PY = os.path.join(ROOT, "scripts", "client.py")
PYDOC = os.path.join(ROOT, "models", "pydoc-moe-17m")
ORACLE = os.path.join(ROOT, "testdata", "oracle")
ORACLE_FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")


def _bin_dir():
    env = os.environ.get("MOEMESH_BIN_DIR")
    if env:
        return os.path.abspath(env)
    # Under Bazel the binaries sit in the runfiles tree next to tests/; in a source checkout
    # they are in bazel-bin/.
    if os.path.isfile(os.path.join(ROOT, "router", "router")):
        return ROOT
    return os.path.join(ROOT, "bazel-bin")


BIN_DIR = _bin_dir()
ROUTER = os.path.join(BIN_DIR, "router", "router")
ENCODER = os.path.join(BIN_DIR, "encoder_worker", "encoder_worker")
ATTENTION = os.path.join(BIN_DIR, "attention_worker", "attention_worker")
EXPERT = os.path.join(BIN_DIR, "expert_worker", "expert_worker")
MOEMESH = os.path.join(BIN_DIR, "tools", "moemesh")

START_TIMEOUT = 90      # seconds for a process to print its address and answer health checks
CALL_TIMEOUT = 60       # seconds for one Generate call (each takes well under 5 s here)
STOP_TIMEOUT = 10       # seconds between SIGTERM and SIGKILL

if "XDG_CACHE_HOME" not in os.environ and os.environ.get("TEST_TMPDIR"):
    os.environ["XDG_CACHE_HOME"] = os.environ["TEST_TMPDIR"]


# ------------------------------------------------------------------------------- gRPC stubs

def _load_client_module():
    spec = importlib.util.spec_from_file_location("moemesh_client_py", CLIENT_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


client_mod = _load_client_module()
pb2, pb2_grpc = client_mod.load_stubs()

import grpc  # noqa: E402

unittest.TestCase.maxDiff = None  # show whole id lists when they differ


def _load_worker_stubs():
    """Returns (worker_pb2, worker_pb2_grpc) for protos/worker.proto.

    Generated the way scripts/client.py generates generation.proto's stubs (protoc and
    grpc_python_plugin into $XDG_CACHE_HOME/moemesh/py/<hash>), then added to the `protos`
    package that load_stubs() created, so that worker_pb2's `from protos import generation_pb2`
    is the module the client uses.
    """
    _, gen_proto = client_mod._find_proto()
    worker_proto = os.path.join(os.path.dirname(gen_proto), "worker.proto")
    if not os.path.isfile(worker_proto):
        raise RuntimeError("cannot find %s" % worker_proto)
    h = client_mod.hashlib.sha256(b"worker-layout-1\0")
    for p in (gen_proto, worker_proto):
        with open(p, "rb") as f:
            h.update(f.read())
            h.update(b"\0")
    out = os.path.join(client_mod._cache_root(), "worker-" + h.hexdigest()[:16])
    marker = os.path.join(out, "protos", "worker_pb2_grpc.py")
    if not os.path.isfile(marker):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".gen-", dir=os.path.dirname(out))
        try:
            src = os.path.join(tmp, "src")
            os.makedirs(os.path.join(src, "protos"))
            shutil.copyfile(gen_proto, os.path.join(src, "protos", "generation.proto"))
            shutil.copyfile(worker_proto, os.path.join(src, "protos", "worker.proto"))
            gen = os.path.join(tmp, "gen")
            os.makedirs(gen)
            cmd = [client_mod.PROTOC, "-I" + src, "--python_out=" + gen,
                   "--grpc_python_out=" + gen,
                   "--plugin=protoc-gen-grpc_python=" + client_mod.GRPC_PYTHON_PLUGIN,
                   "protos/worker.proto"]
            res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
            if res.returncode != 0:
                raise RuntimeError("protoc failed: %s" % res.stderr.decode(errors="replace"))
            try:
                os.rename(gen, out)
            except OSError:
                if not os.path.isfile(marker):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    pkg = sys.modules["protos"]
    extra = os.path.join(out, "protos")
    if extra not in pkg.__path__:
        pkg.__path__.append(extra)
    return (importlib.import_module("protos.worker_pb2"),
            importlib.import_module("protos.worker_pb2_grpc"))


wpb2, wpb2_grpc = _load_worker_stubs()

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_SERVING = b"\x08\x01"  # HealthCheckResponse{status: SERVING}


def health_ok(addr, timeout=2.0):
    """True when grpc.health.v1.Health/Check on `addr` (service "") answers SERVING."""
    try:
        with grpc.insecure_channel(addr) as ch:
            check = ch.unary_unary(HEALTH_CHECK, request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
            return check(b"", timeout=timeout) == HEALTH_SERVING
    except grpc.RpcError:
        return False


def wait_healthy(addr, timeout=START_TIMEOUT, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            proc.check_alive()
        if health_ok(addr):
            return
        time.sleep(0.2)
    raise AssertionError("%s is not healthy after %ds%s"
                         % (addr, timeout, proc.describe() if proc else ""))


# -------------------------------------------------------------------------------- processes

SETPRIV = shutil.which("setpriv", path="/usr/bin:/bin")
_LOG_ROOT = tempfile.mkdtemp(prefix="logs-", dir=os.environ.get("TEST_TMPDIR") or None)
_ALL_PROCS = []
_ALL_PROCS_LOCK = threading.Lock()


def _tail(path, n=3000):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _proc_stat(pid):
    """(state, ppid, pgrp, session) of a live pid, or None."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    rest = data[data.rfind(")") + 2:].split()
    return rest[0], int(rest[1]), int(rest[2]), int(rest[3])


def _all_pids():
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def descendants(pid):
    """Live (non-zombie) descendants of `pid`, by walking /proc's parent links."""
    children = {}
    for p in _all_pids():
        st = _proc_stat(p)
        if st is not None:
            children.setdefault(st[1], []).append(p)
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return [p for p in out if alive(p)]


def alive(pid):
    st = _proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


class Proc:
    """A process in its own process group, stdout and stderr to log files."""

    def __init__(self, name, argv):
        self.name = name
        self.argv = argv
        self.out_path = os.path.join(_LOG_ROOT, "%s-%d.out" % (name, len(_ALL_PROCS)))
        self.err_path = self.out_path[:-4] + ".err"
        # setpriv execs the command (same pid) with SIGKILL as its parent-death signal: nothing
        # outlives a test process that is killed outright. (The signal follows the thread that
        # started the process: processes are started from the main thread only.)
        wrap = [SETPRIV, "--pdeathsig", "KILL", "--"] if SETPRIV else []
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.p = subprocess.Popen(wrap + argv, stdout=out, stderr=err,
                                      stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True)
        self.pid = self.p.pid
        self.extra_pids = []  # descendants seen (for processes that escape the group)
        with _ALL_PROCS_LOCK:
            _ALL_PROCS.append(self)

    def describe(self):
        return ("\n--- %s (pid %d, rc %s): %s\n--- stdout:\n%s\n--- stderr:\n%s"
                % (self.name, self.pid, self.p.poll(), " ".join(self.argv),
                   _tail(self.out_path), _tail(self.err_path)))

    def check_alive(self):
        if self.p.poll() is not None:
            raise AssertionError("%s exited early%s" % (self.name, self.describe()))

    def wait_for(self, regex, stream="err", timeout=START_TIMEOUT):
        """Waits for `regex` in the complete lines of the process's stdout or stderr; returns
        the match. (std::cerr writes a line in pieces: "serving ... on cpu (fp32 products),
        listening" must not pass for the whole line, nor "on 127.0.0.1:4" for its address.)"""
        path = self.err_path if stream == "err" else self.out_path
        pat = re.compile(regex, re.M)
        deadline = time.monotonic() + timeout
        while True:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8", errors="replace")
            m = pat.search(text[:text.rfind("\n") + 1])
            if m:
                return m
            if self.p.poll() is not None:
                raise AssertionError("%s exited before printing /%s/%s"
                                     % (self.name, regex, self.describe()))
            if time.monotonic() > deadline:
                raise AssertionError("%s did not print /%s/ in %ds%s"
                                     % (self.name, regex, timeout, self.describe()))
            time.sleep(0.1)

    def stop(self):
        if self.p.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)  # whatever is left of the group
        except (ProcessLookupError, PermissionError):
            pass
        for pid in self.extra_pids:
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            self.p.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass


def _stop_all():
    with _ALL_PROCS_LOCK:
        procs = list(_ALL_PROCS)
    for p in reversed(procs):
        p.stop()
    keep = os.environ.get("MOEMESH_TEST_KEEP_LOGS")
    if keep:
        shutil.copytree(_LOG_ROOT, os.path.join(keep, os.path.basename(_LOG_ROOT)),
                        dirs_exist_ok=True)
    if not os.environ.get("TEST_TMPDIR"):  # Bazel removes its own temporary directory
        shutil.rmtree(_LOG_ROOT, ignore_errors=True)


atexit.register(_stop_all)
# `kill -USR1 PID` prints every thread's stack.
faulthandler.register(signal.SIGUSR1, all_threads=True)


def _watchdog(seconds):
    """Ends a hung run before Bazel's limit: stacks to stderr, processes stopped, exit 1."""
    time.sleep(seconds)
    sys.stderr.write("\nwatchdog: the run took more than %.0f s; stacks:\n" % seconds)
    faulthandler.dump_traceback(all_threads=True)
    _stop_all()
    os._exit(1)


threading.Thread(target=_watchdog, args=(float(os.environ.get("MOEMESH_TEST_WATCHDOG_S", "840")),),
                 daemon=True, name="watchdog").start()
for _sig in (signal.SIGTERM, signal.SIGHUP):
    signal.signal(_sig, lambda signum, frame: sys.exit(128 + signum))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ------------------------------------------------------------------------------ models, data

def load_config(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    assert experts, "no num_experts / num_local_experts in %s" % model_dir
    return cfg, int(experts), int(cfg["num_hidden_layers"])


def oracle_cases(model_dir):
    """[(input_ids, greedy)] of a model's reference.json (oracle list or pydoc's "prompts")."""
    with open(os.path.join(model_dir, "reference.json")) as f:
        ref = json.load(f)
    entries = ref["prompts"] if isinstance(ref, dict) else ref
    return [(list(e["input_ids"]), list(e["greedy"])) for e in entries]


def even_shards(model_dir, n):
    _, experts, layers = load_config(model_dir)
    out = []
    for i in range(n):
        lo, hi = experts * i // n, experts * (i + 1) // n
        out.append("0-%d:%d-%d" % (layers - 1, lo, hi - 1))
    return out


def uneven_shards(model_dir):
    """Three contiguous expert ranges of different sizes, every layer (e.g. 16: 0-3, 4-9, 10-15)."""
    _, experts, layers = load_config(model_dir)
    assert experts >= 3
    a = max(1, experts // 4)
    b = max(1, (experts - a) // 2)
    bounds = [(0, a), (a, a + b), (a + b, experts)]
    assert all(hi > lo for lo, hi in bounds)
    return ["0-%d:%s" % (layers - 1, "%d" % lo if hi - lo == 1 else "%d-%d" % (lo, hi - 1))
            for lo, hi in bounds]


MODELS = [(fam, os.path.join(ORACLE, fam)) for fam in ORACLE_FAMILIES] + [("pydoc", PYDOC)]


def heldout_ids():
    with open(os.path.join(PYDOC, "heldout_ids.json")) as f:
        return json.load(f)


# ------------------------------------------------------------------------------- the cluster

class Cluster:
    """encoder_worker + expert workers (one per shard spec) + attention_worker + router."""

    def __init__(self, model_dir, shards, name="c", kv_capacity_tokens=None,
                 router_flags=(), encoder=None, experts=None, attention_workers=1,
                 expert_flags=(), attention_flags=()):
        self.model_dir = model_dir
        self.procs = []
        self.expert_flags = list(expert_flags)
        mflag = "--model=" + model_dir
        if encoder is None:
            enc = self._start("%s-encoder" % name, [ENCODER, mflag, "--address=127.0.0.1:0"])
            exps = [self._start("%s-expert%d" % (name, i), self.expert_argv(spec))
                    for i, spec in enumerate(shards)]
            self.expert_procs = exps
            self.encoder = enc.wait_for(r"encoder_worker: serving .* on (\S+)").group(1)
            self.experts = [p.wait_for(r"expert_worker: serving .* on (\S+)").group(1)
                            for p in exps]
            for p, addr in zip([enc] + exps, [self.encoder] + self.experts):
                wait_healthy(addr, proc=p)
        else:  # share another cluster's encoder and expert workers
            self.encoder, self.experts = encoder, list(experts)
        aflags = [ATTENTION, mflag, "--address=127.0.0.1:0", "--threads=1",
                  "--encoder=" + self.encoder, "--experts=" + ",".join(self.experts)]
        if kv_capacity_tokens:
            aflags.append("--kv_capacity_tokens=%d" % kv_capacity_tokens)
        aflags += list(attention_flags)
        atts = [self._start("%s-attention%s" % (name, i or ""), aflags)
                for i in range(attention_workers)]
        self.attention_procs = atts
        self.attentions = [a.wait_for(r"attention_worker: serving on ([^;\s]+)").group(1)
                           for a in atts]
        self.attention = self.attentions[0]
        router = self._start("%s-router" % name,
                             [ROUTER, mflag, "--address=127.0.0.1:0",
                              "--attention=" + ",".join(self.attentions)] + list(router_flags))
        self.addr = router.wait_for(r"serving moemesh\.v1\.Generation on (\S+)").group(1)
        for p, addr in [(router, self.addr)] + list(zip(atts, self.attentions)):
            wait_healthy(addr, proc=p)
        self.channel = grpc.insecure_channel(self.addr)
        self.stub = pb2_grpc.GenerationStub(self.channel)
        self.att_channels = [grpc.insecure_channel(a) for a in self.attentions]
        self.att_stubs = [wpb2_grpc.AttentionStub(ch) for ch in self.att_channels]
        self.att_channel, self.att_stub = self.att_channels[0], self.att_stubs[0]

    def _start(self, name, argv):
        p = Proc(name, argv)
        self.procs.append(p)
        return p

    def expert_argv(self, spec, address="127.0.0.1:0"):
        """The command of an expert worker of this cluster holding `spec` (--shards)."""
        return ([EXPERT, "--model=" + self.model_dir, "--address=" + address, "--threads=1",
                 "--shards=" + spec] + self.expert_flags)

    def stats(self):
        return self.att_stub.GetStats(wpb2.StatsRequest(), timeout=10)

    def describe(self):
        return "".join(p.describe() for p in self.procs)

    def stop(self):
        for ch in [getattr(self, "channel", None)] + getattr(self, "att_channels", []):
            if ch is not None:
                ch.close()
        for p in reversed(self.procs):
            p.stop()


def start_cluster(model_dir, shards, **kw):
    """Starts a cluster; on failure stops what was started and re-raises."""
    c = Cluster.__new__(Cluster)
    try:
        Cluster.__init__(c, model_dir, shards, **kw)
    except BaseException:
        Cluster.stop(c)
        raise
    return c


# ------------------------------------------------------------------------------ requests

def make_request(ids, max_tokens, temperature=0.0, top_p=None, seed=None, ignore_eos=True,
                 **extra):
    req = pb2.GenerateRequest()
    req.token_ids.ids.extend(ids)
    s = req.sampling
    s.temperature = temperature
    s.max_tokens = max_tokens
    s.ignore_eos = ignore_eos
    if top_p is not None:
        s.top_p = top_p
    if seed is not None:
        s.seed = seed
    for k, v in extra.items():
        setattr(s, k, v)
    return req


class Result:
    def __init__(self):
        self.ids, self.text, self.responses = [], "", 0
        self.finish_reason = None
        self.prompt_tokens = self.completion_tokens = None


def generate(stub, req, timeout=CALL_TIMEOUT):
    """Runs one Generate call to the end; returns a Result (raises grpc.RpcError on errors)."""
    r = Result()
    for resp in stub.Generate(req, timeout=timeout):
        r.responses += 1
        r.ids.extend(resp.ids)
        r.text += resp.text
        if resp.finish_reason:
            assert r.finish_reason is None, "two responses with a finish reason"
            r.finish_reason = resp.finish_reason
            r.prompt_tokens = resp.prompt_tokens
            r.completion_tokens = resp.completion_tokens
    return r


def greedy_ids(stub, ids, n):
    return generate(stub, make_request(ids, n)).ids


class Background:
    """Runs fn() in a thread; join() returns its result or re-raises its exception."""

    def __init__(self, fn):
        self.result, self.error = None, None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn):
        try:
            self.result = fn()
        except BaseException as e:  # noqa: BLE001 - handed to join()
            self.error = e

    def failed(self):
        """True when fn() has ended with an exception."""
        return not self.thread.is_alive() and self.error is not None

    def join(self, timeout=CALL_TIMEOUT + 30):
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError("background call still running after %ds" % timeout)
        if self.error is not None:
            raise self.error
        return self.result


def poll_until(fn, timeout, interval=0.1):
    """Calls fn() until it returns a true value or `timeout` passes; returns the last value."""
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(interval)


# --------------------------------------------------------------------------- shared cluster

_SHARED = {}


def shared_pydoc_cluster():
    """One pydoc cluster with two expert workers (even split), reused by several tests."""
    c = _SHARED.get("pydoc")
    if c is None:
        c = start_cluster(PYDOC, even_shards(PYDOC, 2), name="shared")
        _SHARED["pydoc"] = c
    return c


def tearDownModule():
    for c in _SHARED.values():
        c.stop()
    _SHARED.clear()


PYDOC_CASES = oracle_cases(PYDOC)
PYDOC_CONTEXT = load_config(PYDOC)[0]["max_position_embeddings"]
PYDOC_VOCAB = load_config(PYDOC)[0]["vocab_size"]


# ================================================================================== tests

class OracleTest(unittest.TestCase):
    """Greedy ids through clusters of several shapes and in-process match the references."""

    def check_oracle(self, family, model_dir, stub, where):
        for i, (ids, greedy) in enumerate(oracle_cases(model_dir)):
            with self.subTest(model=family, prompt=i, where=where):
                try:
                    r = generate(stub, make_request(ids, len(greedy)))
                except grpc.RpcError as e:
                    # A server that fails or hangs once would make every later prompt wait for
                    # its deadline too: report this one and stop.
                    self.fail("%s prompt %d via %s: %s: %s"
                              % (family, i, where, e.code(), e.details()))
                self.assertEqual(r.ids, greedy, "%s prompt %d via %s" % (family, i, where))
                self.assertEqual(r.finish_reason, pb2.FINISH_REASON_LENGTH)
                self.assertEqual(r.prompt_tokens, len(ids))
                self.assertEqual(r.completion_tokens, len(greedy))

    def run_cluster(self, family, model_dir, shards, where):
        c = start_cluster(model_dir, shards, name="%s-%d" % (family, len(shards)))
        try:
            info = c.stub.GetModelInfo(pb2.GetModelInfoRequest(), timeout=10)
            self.assertEqual(info.num_experts, load_config(model_dir)[1])
            self.check_oracle(family, model_dir, c.stub, where)
        except AssertionError as e:
            raise AssertionError("%s%s" % (e, c.describe())) from None
        finally:
            c.stop()

    def test_two_expert_workers_even_split(self):
        for family, model_dir in MODELS:
            if family == "pydoc" and "pydoc" in _SHARED:
                self.check_oracle(family, model_dir, _SHARED["pydoc"].stub, "shared cluster")
                continue
            self.run_cluster(family, model_dir, even_shards(model_dir, 2),
                             "2 expert workers %s" % even_shards(model_dir, 2))

    def test_int8_workers_match_in_process_int8(self):
        # --quantize_experts=int8 on both expert workers of the embedded model and
        # --quantize_attention=int8 on the attention worker: every reference prompt's greedy ids
        # equal those of `moemesh generate` with the same flags in one process (the two modes must
        # agree; engine/model_test checks int8 against transformers), and they are int8's, not
        # fp32's: int8 tips the near-tie that starts prompt 2.
        model_dir = dict(MODELS)["pydoc"]
        cases = oracle_cases(model_dir)
        want = []
        for ids, greedy in cases:
            out = subprocess.run(
                [MOEMESH, "generate", "--model=" + model_dir, "--greedy", "--quantize_experts=int8",
                 "--quantize_attention=int8",
                 "--input_ids=" + ",".join(map(str, ids)), "--max_new_tokens=%d" % len(greedy)],
                capture_output=True, text=True, timeout=CALL_TIMEOUT, check=True)
            want.append(json.loads(out.stdout)["ids"])
        self.assertNotEqual(want[2], cases[2][1], "int8 should differ from fp32 on prompt 2")
        c = start_cluster(model_dir, even_shards(model_dir, 2), name="int8",
                          expert_flags=["--quantize_experts=int8"],
                          attention_flags=["--quantize_attention=int8"])
        try:
            for p in c.expert_procs:
                p.wait_for(r"expert_worker: serving .* \(int8 products\)")
            c.attention_procs[0].wait_for(r"attention_worker: serving on \S+ \(cpu, int8 products\)")
            for i, ((ids, greedy), w) in enumerate(zip(cases, want)):
                r = generate(c.stub, make_request(ids, len(greedy)))
                self.assertEqual(r.ids, w, "prompt %d: cluster vs in-process int8" % i)
        except AssertionError as e:
            raise AssertionError("%s%s" % (e, c.describe())) from None
        finally:
            c.stop()

    def test_three_expert_workers_uneven_split(self):
        for family, model_dir in MODELS:
            shards = uneven_shards(model_dir)
            self.run_cluster(family, model_dir, shards, "3 expert workers %s" % shards)

    def test_in_process_serve(self):
        for family, model_dir in MODELS:
            p, addr = start_serve(model_dir, "serve-" + family)
            try:
                with grpc.insecure_channel(addr) as ch:
                    self.check_oracle(family, model_dir, pb2_grpc.GenerationStub(ch),
                                      "moemesh serve")
            except AssertionError as e:
                raise AssertionError("%s%s" % (e, p.describe())) from None
            finally:
                p.stop()


def start_serve(model_dir, name, extra=()):
    """Starts `moemesh serve` on a free port (retrying if the port got taken); returns (Proc, addr)."""
    last = None
    for _ in range(3):
        port = free_port()
        p = Proc(name, [MOEMESH, "serve", "--model=" + model_dir, "--port=%d" % port,
                        "--threads=1"] + list(extra))
        try:
            # "serving on HOST:PORT" (it may name the model between the two words).
            m = p.wait_for(r"\bserving\b.*\bon (\S+:\d+)\s*$")
        except AssertionError as e:
            p.stop()
            last = e
            if "in use" in _tail(p.err_path) or "cannot listen" in _tail(p.err_path):
                continue
            raise
        addr = m.group(1)
        wait_healthy(addr, proc=p)
        return p, addr
    raise last


class ConcurrencyTest(unittest.TestCase):
    PROMPT_LENS = [3, 200, 17, 150, 64, 5, 120, 33, 90, 8, 180, 45, 12, 77, 199, 26]
    MAX_TOKENS = [1, 48, 7, 30, 16, 48, 2, 25, 40, 11, 3, 48, 20, 9, 33, 1]

    def requests(self):
        held = heldout_ids()
        reqs = []
        for i, (plen, mt) in enumerate(zip(self.PROMPT_LENS, self.MAX_TOKENS)):
            start = (i * 1999) % (len(held) - plen)
            ids = held[start:start + plen]
            if i % 2 == 0:
                reqs.append(make_request(ids, mt))
            else:
                reqs.append(make_request(ids, mt, temperature=0.9, top_p=0.95, seed=i))
        return reqs

    def test_sixteen_concurrent_streams_match_solo_runs(self):
        c = shared_pydoc_cluster()
        reqs = self.requests()
        solo = [generate(c.stub, r) for r in reqs]
        for i, r in enumerate(solo):
            self.assertEqual(len(r.ids), self.MAX_TOKENS[i], "solo run %d" % i)
            self.assertEqual(r.finish_reason, pb2.FINISH_REASON_LENGTH)
        barrier = threading.Barrier(len(reqs))

        def run(req):
            barrier.wait(timeout=30)
            return generate(c.stub, req, timeout=240)

        jobs = [Background(lambda req=req: run(req)) for req in reqs]
        together = [j.join(timeout=300) for j in jobs]
        for i, (a, b) in enumerate(zip(solo, together)):
            kind = "greedy" if i % 2 == 0 else "sampled seed=%d" % i
            with self.subTest(stream=i, kind=kind, prompt_tokens=self.PROMPT_LENS[i]):
                self.assertEqual(b.ids, a.ids, "stream %d (%s): concurrent ids differ from solo"
                                 % (i, kind))
                self.assertEqual(b.text, a.text)
                self.assertEqual(b.finish_reason, a.finish_reason)
                self.assertEqual(b.completion_tokens, a.completion_tokens)
                self.assertEqual(b.prompt_tokens, self.PROMPT_LENS[i])


class DataParallelAttentionTest(unittest.TestCase):
    @staticmethod
    def two_worker_cluster(name):
        """Two attention workers and a router over the shared cluster's encoder and experts."""
        shared = shared_pydoc_cluster()
        return Cluster(PYDOC, None, name=name, encoder=shared.encoder, experts=shared.experts,
                       attention_workers=2)

    def test_two_attention_workers_share_requests_and_match_references(self):
        c = self.two_worker_cluster("dp")
        try:
            info = c.stub.GetModelInfo(pb2.GetModelInfoRequest(), timeout=10)
            self.assertEqual(sorted(w.address for w in info.workers if w.role == "attention"),
                             sorted(c.attentions))
            # Given only --attention, the router lists the encoder and expert workers the
            # attention workers reach (each once, though both reach them), with their devices.
            self.assertEqual([(w.role, w.address, w.device) for w in info.workers
                              if w.role in ("encoder", "expert")],
                             [("encoder", c.encoder, "cpu")] +
                             [("expert", e, "cpu") for e in c.experts])
            before = [s.GetStats(wpb2.StatsRequest(), timeout=10) for s in c.att_stubs]
            barrier = threading.Barrier(len(PYDOC_CASES))

            def run(ids, n):
                barrier.wait(timeout=30)
                return generate(c.stub, make_request(ids, n), timeout=240)

            jobs = [Background(lambda ids=ids, g=g: run(ids, len(g))) for ids, g in PYDOC_CASES]
            for i, (j, (ids, greedy)) in enumerate(zip(jobs, PYDOC_CASES)):
                self.assertEqual(j.join(timeout=300).ids, greedy, "prompt %d" % i)
            # The router admitted requests to both workers (the one with the most free KV cache
            # each time), and each worker released what it ran. The router sends releases after
            # it has delivered the last tokens: wait for them (at most 10 s).
            def released():
                after = [s.GetStats(wpb2.StatsRequest(), timeout=10) for s in c.att_stubs]
                return [a.released_sequences - b.released_sequences
                        for a, b in zip(after, before)]

            poll_until(lambda: sum(released()) >= len(PYDOC_CASES), 10, interval=0.05)
            done = released()
            self.assertEqual(sum(done), len(PYDOC_CASES), "released per worker: %r" % done)
            for i, d in enumerate(done):
                self.assertGreaterEqual(d, len(PYDOC_CASES) // 2 - 1,
                                        "attention worker %d ran %d of %d requests"
                                        % (i, d, len(PYDOC_CASES)))
        except AssertionError as e:
            raise AssertionError("%s%s" % (e, c.describe())) from None
        finally:
            c.stop()

    def test_a_killed_attention_worker_loses_no_request(self):
        """SIGKILL one of two attention workers mid-stream: every request still completes, with
        the ids it gets when nothing fails (greedy): the router moves the dead worker's requests
        to the other, which rebuilds their KV cache from the prompt and the tokens so far."""
        c = self.two_worker_cluster("dpkill")
        try:
            held = heldout_ids()
            reqs = [make_request(held[i * 500:i * 500 + 20 + 7 * i], 160) for i in range(6)]
            solo = [generate(c.stub, r, timeout=240).ids for r in reqs]
            jobs = [Background(lambda r=r: generate(c.stub, r, timeout=240)) for r in reqs]
            # Kill worker 1 while it holds sequences, some of their tokens streamed.
            victim = [p for p in c.procs if p.name == "dpkill-attention1"][0]

            def held_after_20_steps():
                s = c.att_stubs[1].GetStats(wpb2.StatsRequest(), timeout=5)
                return s.active_sequences if s.steps > 20 else 0

            held_then = poll_until(held_after_20_steps, 60, interval=0.01)
            os.kill(victim.pid, signal.SIGKILL)
            self.assertGreater(held_then, 0, "attention worker 1 held no sequence when killed")
            for i, (j, want) in enumerate(zip(jobs, solo)):
                self.assertEqual(j.join(timeout=300).ids, want, "request %d" % i)
            # The survivor serves new requests.
            self.assertEqual(generate(c.stub, reqs[0], timeout=120).ids, solo[0])
        except AssertionError as e:
            raise AssertionError("%s%s" % (e, c.describe())) from None
        finally:
            c.stop()


class TwoRoutersTest(unittest.TestCase):
    def test_two_routers_over_one_small_kv_cache_lose_no_request(self):
        """A rolling update's overlap: two routers over one attention worker whose KV cache
        holds what either admits, not both. The worker refuses the rows it has no room for; the
        router of each refused sequence queues it again (to start over, replaying its tokens)
        instead of failing it, and admits around the other router's rows. Every request ends
        with its reference ids and the cache ends empty."""
        shared = shared_pydoc_cluster()
        # 12 requests per router reserve 2 x (32 + 6 x 40) = 544 of the 600 rows, so each
        # router admits all of its own; together they would hold up to 2 x 532 rows.
        c = start_cluster(PYDOC, None, name="tworouters", kv_capacity_tokens=600,
                          encoder=shared.encoder, experts=shared.experts)
        try:
            other = c._start("tworouters-router2",
                             [ROUTER, "--model=" + PYDOC, "--address=127.0.0.1:0",
                              "--attention=" + c.attention])
            addr = other.wait_for(r"serving moemesh\.v1\.Generation on (\S+)").group(1)
            wait_healthy(addr, proc=other)
            with grpc.insecure_channel(addr) as ch:
                stubs = [c.stub, pb2_grpc.GenerationStub(ch)]
                cases = PYDOC_CASES * 2
                barrier = threading.Barrier(len(stubs) * len(cases))

                def run(stub, ids, n):
                    barrier.wait(timeout=30)
                    return generate(stub, make_request(ids, n), timeout=240)

                jobs = [(i, Background(lambda s=s, ids=ids, g=g: run(s, ids, len(g))))
                        for s in stubs for i, (ids, g) in enumerate(cases)]
                for n, (i, j) in enumerate(jobs):
                    self.assertEqual(j.join(timeout=300).ids, cases[i][1],
                                     "router %d, prompt %d" % (n // len(cases), i))
            # The worker did run out of room (the case this test is about), and told the
            # routers so; the routers kept it from failing any request.
            logs = "".join(_tail(p.err_path, 100000) for p in c.procs if "router" in p.name)
            self.assertIn("has no KV cache room for", logs)
            s = poll_until(lambda: c.stats().kv_used_tokens == 0 or None, 10)
            self.assertIsNotNone(s, "KV rows left: %s" % c.stats())
        except AssertionError as e:
            raise AssertionError("%s%s" % (e, c.describe())) from None
        finally:
            c.stop()


class PausedRouterTest(unittest.TestCase):
    def test_a_router_stopped_past_the_idle_release_loses_no_request(self):
        """SIGSTOP the router during three streams for longer than the attention worker's
        --idle_sequence_seconds (1 s here): the worker releases their sequences at the next step,
        which answers "unknown sequence". The router starts each request again (replaying its
        tokens) instead of failing it, and every stream ends with the ids of a solo run."""
        shared = shared_pydoc_cluster()
        c = start_cluster(PYDOC, None, name="pausedrouter", encoder=shared.encoder,
                          experts=shared.experts, attention_flags=["--idle_sequence_seconds=1"])
        try:
            cases = PYDOC_CASES[:3]
            solo = [greedy_ids(c.stub, ids, 300) for ids, _ in cases]
            for (ids, greedy), ref in zip(cases, solo):
                self.assertEqual(ref[:len(greedy)], greedy)
            first = threading.Event()

            def run(ids):
                got = []
                for resp in c.stub.Generate(make_request(ids, 300), timeout=120):
                    got.extend(resp.ids)
                    first.set()
                return got

            jobs = [Background(lambda ids=ids: run(ids)) for ids, _ in cases]
            self.assertTrue(first.wait(60), "no token streamed")
            self.assertTrue(poll_until(lambda: c.stats().active_sequences == 3, 30))
            router = next(p for p in c.procs if p.name.endswith("-router"))
            os.kill(router.pid, signal.SIGSTOP)
            try:
                time.sleep(2.5)
            finally:
                os.kill(router.pid, signal.SIGCONT)
            for i, (j, ref) in enumerate(zip(jobs, solo)):
                self.assertEqual(j.join(timeout=120), ref, "stream %d" % i)
            self.assertEqual(c.stats().idle_released_sequences, 3)
            self.assertIn("no longer has the sequences of 3 of its requests",
                          _tail(router.err_path, 100000))
        except AssertionError as e:
            raise AssertionError("%s%s" % (e, c.describe())) from None
        finally:
            c.stop()


class ExpertFailoverTest(unittest.TestCase):
    def test_hung_killed_and_restarted_expert_workers(self):
        """Expert workers A (experts 0..E/2-1), B (the rest) and C (every expert, a replica of
        both); the attention worker's --expert_timeout is 2 s.
        - Stop B (SIGSTOP: hung, not dead): a request waits out one call's deadline, then B's
          rows go to C and the request gives the reference ids; later requests send B no rows
          (no more failovers), only probes. Resume B: a probe finds it and it is used again.
        - SIGKILL A while six greedy streams run: every stream still gives the reference ids,
          its rows going to C.
        - Kill C as well: experts 0..E/2-1 have no holder left, so a request's step fails, and
          the router keeps it queued for its --outage_wait_seconds (2 s here) while the
          attention worker reports not_ready; then it fails with UNAVAILABLE naming the
          worker, and the attention worker stays up.
        - Start a new worker for those experts on A's address: requests succeed again, without
          restarting anything else."""
        _, experts, layers = load_config(PYDOC)
        half = experts // 2
        shards = ["0-%d:0-%d" % (layers - 1, half - 1),
                  "0-%d:%d-%d" % (layers - 1, half, experts - 1),
                  "0-%d:0-%d" % (layers - 1, experts - 1)]
        c = start_cluster(PYDOC, shards, name="failover", attention_flags=["--expert_timeout=2"],
                          router_flags=["--http_address=127.0.0.1:0", "--outage_wait_seconds=2"])
        hung = c.expert_procs[1]
        try:
            a, b, r = c.experts
            ids, greedy = PYDOC_CASES[0]
            http_addr = c.procs[-1].wait_for(r"OpenAI-compatible HTTP API on (\S+)").group(1)
            worker0 = (("worker", "0"),)

            os.kill(hung.pid, signal.SIGSTOP)
            self.assertEqual(greedy_ids(c.stub, ids, len(greedy)), greedy)
            s = c.stats()
            self.assertGreater(s.expert_failovers, 0)
            self.assertEqual(list(s.expert_workers_down), [b])
            self.assertEqual(greedy_ids(c.stub, ids, len(greedy)), greedy)
            self.assertEqual(c.stats().expert_failovers, s.expert_failovers,
                             "rows were sent to the hung worker again")
            os.kill(hung.pid, signal.SIGCONT)

            def b_back():
                greedy_ids(c.stub, ids, 4)  # the calls that start probes
                return not c.stats().expert_workers_down

            self.assertTrue(poll_until(b_back, 20, interval=0.2), "B not used again")

            first = threading.Event()

            def run(ids, n):
                out = Result()
                for resp in c.stub.Generate(make_request(ids, n), timeout=240):
                    out.ids.extend(resp.ids)
                    first.set()
                return out

            before = c.stats().expert_failovers
            jobs = [Background(lambda ids=ids, g=g: run(ids, len(g))) for ids, g in PYDOC_CASES]
            self.assertTrue(first.wait(120), "no token streamed")
            os.kill(c.expert_procs[0].pid, signal.SIGKILL)
            for i, (j, (pids, pgreedy)) in enumerate(zip(jobs, PYDOC_CASES)):
                self.assertEqual(j.join(timeout=300).ids, pgreedy, "prompt %d" % i)
            s = c.stats()
            self.assertGreater(s.expert_failovers, before)  # A failed mid-stream
            self.assertEqual(list(s.expert_workers_down), [a])
            m = scrape_metrics(self, http_addr)  # the router reports what the worker does
            self.assertEqual(m[("moemesh_expert_failovers_total", worker0)], s.expert_failovers)
            self.assertEqual(m[("moemesh_expert_workers_down", worker0)], 1)
            self.assertEqual(greedy_ids(c.stub, ids, len(greedy)), greedy)  # A still down

            os.kill(c.expert_procs[2].pid, signal.SIGKILL)
            t0 = time.monotonic()
            with self.assertRaises(grpc.RpcError) as cm:
                generate(c.stub, make_request(ids, 8), timeout=60)
            self.assertEqual(cm.exception.code(), grpc.StatusCode.UNAVAILABLE,
                             cm.exception.details())
            self.assertIn("expert worker", cm.exception.details())
            self.assertIn("--outage_wait_seconds=2", cm.exception.details())
            self.assertLess(time.monotonic() - t0, 30)
            self.assertEqual(sorted(c.stats().expert_workers_down), sorted([a, r]))
            self.assertEqual(scrape_metrics(self, http_addr)[("moemesh_expert_workers_down",
                                                              worker0)], 2)

            back = c._start("failover-expert0-again", c.expert_argv(shards[0], address=a))
            back.wait_for(r"expert_worker: serving .* on (\S+)")
            wait_healthy(a, proc=back)
            t0 = time.monotonic()

            def served():
                try:
                    return greedy_ids(c.stub, ids, len(greedy))
                except grpc.RpcError:
                    return None

            got = poll_until(served, 30, interval=0.2)
            self.assertEqual(got, greedy, "no request served within 30 s of the restart")
            print("expert worker restarted: serving again after %.1f s" % (time.monotonic() - t0))
            self.assertEqual(list(c.stats().expert_workers_down), [r])
            # Nothing leaked: the failed steps' sequences were released with the others.
            def idle():
                s = c.stats()
                return s.active_sequences == 0 and s.kv_used_tokens == 0

            self.assertTrue(poll_until(idle, 10, interval=0.05),
                            "sequences or KV rows left: %s" % c.stats())
        except AssertionError as e:
            raise AssertionError("%s%s" % (e, c.describe())) from None
        finally:
            try:
                os.kill(hung.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            c.stop()


class CancelAndDeadlineTest(unittest.TestCase):
    def wait_idle(self, c, timeout=10):
        s = poll_until(lambda: c.stats().active_sequences == 0 or None, timeout)
        self.assertIsNotNone(s, "the attention worker still has active sequences: %s" % c.stats())

    def test_cancel_mid_stream_frees_the_sequence(self):
        c = shared_pydoc_cluster()
        self.wait_idle(c)
        before = c.stats()
        ids, greedy = PYDOC_CASES[0]
        call = c.stub.Generate(make_request(ids, 500), timeout=CALL_TIMEOUT)
        got = []
        for resp in call:
            got.extend(resp.ids)
            if len(got) >= 3:
                break
        self.assertEqual(got, greedy[:len(got)])
        self.assertGreaterEqual(c.stats().active_sequences, 1)
        call.cancel()

        def freed():
            s = c.stats()
            return s if (s.released_sequences >= before.released_sequences + 1 and
                         s.active_sequences == 0) else None

        s = poll_until(freed, 5)
        self.assertIsNotNone(s, "sequence not released 5 s after the cancel: before %s now %s"
                             % (before, c.stats()))
        self.assertEqual(s.kv_used_tokens, before.kv_used_tokens, "KV cache not freed: %s" % s)
        self.assertEqual(greedy_ids(c.stub, ids, len(greedy)), greedy)

    def test_one_ms_deadline(self):
        c = shared_pydoc_cluster()
        ids, greedy = PYDOC_CASES[1]
        with self.assertRaises(grpc.RpcError) as cm:
            generate(c.stub, make_request(ids, 200), timeout=0.001)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.DEADLINE_EXCEEDED)
        self.wait_idle(c)
        self.assertEqual(greedy_ids(c.stub, ids, len(greedy)), greedy)

    def test_deadline_mid_stream_frees_the_sequence(self):
        """A deadline that expires while tokens stream: the server ends the sequence too."""
        c = shared_pydoc_cluster()
        self.wait_idle(c)
        before = c.stats()
        ids, greedy = PYDOC_CASES[2]
        got = []
        with self.assertRaises(grpc.RpcError) as cm:
            # 900 tokens take seconds on any machine: the 0.5 s deadline ends the stream early.
            for resp in c.stub.Generate(make_request(ids, 900), timeout=0.5):
                got.extend(resp.ids)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.DEADLINE_EXCEEDED)
        self.assertLess(len(got), 900)
        self.assertEqual(got[:len(greedy)], greedy[:len(got)])

        def freed():
            s = c.stats()
            return s if (s.released_sequences >= before.released_sequences + 1 and
                         s.active_sequences == 0) else None

        self.assertIsNotNone(poll_until(freed, 5), "sequence not released 5 s after the "
                             "deadline: before %s now %s" % (before, c.stats()))
        self.assertEqual(greedy_ids(c.stub, ids, len(greedy)), greedy)


def think_sections(ids, start, end):
    """Lengths of the thinking sections in ids: tokens after each start marker up to its end
    marker (or the last token); (length, closed) pairs."""
    out, n = [], None
    for t in ids:
        if t == start:
            if n is not None:
                out.append((n, False))
            n = 0
        elif t == end:
            if n is not None:
                out.append((n, True))
            n = None
        elif n is not None:
            n += 1
    if n is not None:
        out.append((n, False))
    return out


class ThinkingBudgetTest(unittest.TestCase):
    """SamplingParams.thinking_budget with --think_tokens=(,) on the embedded model, whose
    tokenizer has no <think>: "(" opens a section, ")" closes it."""

    BUDGET = 3

    def test_budget_matches_generate_and_bounds_every_section(self):
        shared = shared_pydoc_cluster()
        c = start_cluster(PYDOC, [], name="think", encoder=shared.encoder,
                          experts=shared.experts, router_flags=["--think_tokens=(,)"])
        try:
            tok = lambda text: list(c.stub.Tokenize(pb2.TokenizeRequest(text=text),
                                                    timeout=10).ids)
            open_id, close_id = tok("(")[0], tok(")")[0]
            prompt = tok("def f(")
            self.assertEqual(prompt[-1], open_id)
            # Greedy: the model would write commas for ever; the budget closes after 3 tokens,
            # then the model goes on, and in-process generate gives the same ids.
            plain = generate(c.stub, make_request(prompt, 16)).ids
            self.assertEqual(think_sections(prompt + plain, open_id, close_id), [(16, False)])
            budget = generate(c.stub, make_request(prompt, 16, thinking_budget=self.BUDGET)).ids
            self.assertEqual(budget[:self.BUDGET], plain[:self.BUDGET])
            self.assertEqual(budget[self.BUDGET], close_id)
            out = subprocess.run(
                [MOEMESH, "generate", "--model=" + PYDOC, "--greedy", "--ignore_eos",
                 "--input_ids=" + ",".join(map(str, prompt)), "--max_new_tokens=16",
                 "--thinking_budget=%d" % self.BUDGET, "--think_tokens=(,)"],
                capture_output=True, text=True, timeout=CALL_TIMEOUT, check=True)
            self.assertEqual(budget, json.loads(out.stdout)["ids"], "cluster vs moemesh generate")
            # Sampled: no section outlives the budget, and some were closed by it.
            forced = 0
            for seed in range(6):
                ids = generate(c.stub, make_request(prompt, 48, temperature=1.0, seed=seed,
                                                    thinking_budget=self.BUDGET)).ids
                sections = think_sections(prompt + ids, open_id, close_id)
                self.assertTrue(all(n <= self.BUDGET for n, _ in sections),
                                "seed %d: sections %s" % (seed, sections))
                forced += sum(1 for n, closed in sections if closed and n == self.BUDGET)
            self.assertGreater(forced, 0)
        except AssertionError as e:
            raise AssertionError("%s%s" % (e, c.describe())) from None
        finally:
            c.stop()


class PrefixCacheTest(unittest.TestCase):
    """--prefix_cache_tokens on the attention worker: released sequences' KV rows are reused by
    later prompts that start with the same tokens; the ids are those of a worker without it."""

    OUT = 24

    def test_prompts_sharing_a_prefix_reuse_its_rows(self):
        shared = shared_pydoc_cluster()
        held = heldout_ids()
        a = held[:600]                          # three prefill chunks of 256, 256, 88
        b = held[:400] + held[5000:5100]        # shares 400 tokens with a
        ref = {name: greedy_ids(shared.stub, ids, self.OUT) for name, ids in
               (("a", a), ("b", b))}
        c_prompt = a + ref["a"] + held[7000:7050]  # the next turn after a's answer
        ref["c"] = greedy_ids(shared.stub, c_prompt, self.OUT)
        # Budget 700: a's 623 rows (600 + 23 generated ones fed back) or b's 523, not both.
        c = start_cluster(PYDOC, [], name="prefix", encoder=shared.encoder,
                          experts=shared.experts, attention_flags=["--prefix_cache_tokens=700"])
        try:
            def run(ids):
                before = c.stats().prefix_hit_tokens
                got = greedy_ids(c.stub, ids, self.OUT)
                # The router releases a finished sequence after its last token: wait for it.
                poll_until(lambda: c.stats().kv_used_tokens == 0, 10, interval=0.02)
                return got, c.stats().prefix_hit_tokens - before

            # Each prefill chunk computes at least its last token: a hit on all of a's 600
            # prompt tokens copies 255 + 255 + 87 rows.
            self.assertEqual(run(a), (ref["a"], 0))
            self.assertEqual(c.stats().prefix_cache_tokens, 623)
            self.assertEqual(run(a), (ref["a"], 597))
            self.assertEqual(c.stats().prefix_cache_tokens, 623)  # kept once
            self.assertEqual(run(b), (ref["b"], 255 + 144))  # the 400 shared tokens
            # b's rows pushed a's out (least recently used): a now finds only b's 400.
            self.assertEqual(c.stats().prefix_cache_tokens, 523)
            self.assertEqual(run(a), (ref["a"], 255 + 144))
            # The next turn of a chat: a's prompt, its 23 fed-back answer tokens, then new text.
            self.assertEqual(run(c_prompt), (ref["c"], 255 + 255 + 111))
            st = c.stats()
            self.assertLessEqual(st.prefix_cache_tokens, 700)
            self.assertEqual(st.kv_used_tokens, 0)
            self.assertEqual(st.kv_capacity_tokens, 65536)  # the router's admission unchanged
        except AssertionError as e:
            raise AssertionError("%s%s" % (e, c.describe())) from None
        finally:
            c.stop()


class SpeculativeDecodingTest(unittest.TestCase):
    """--speculative_tokens on the attention worker: the tokens of a worker without it, greedy or
    seeded, alone or batched, cut by max_tokens or a stop string inside a step's confirmed
    drafts; the worker confirms drafts (the embedded model's text repeats itself)."""

    def test_tokens_are_those_of_plain_decoding(self):
        shared = shared_pydoc_cluster()
        c = start_cluster(PYDOC, [], name="spec", encoder=shared.encoder, experts=shared.experts,
                          attention_flags=["--speculative_tokens=4"])
        try:
            for ids, greedy in PYDOC_CASES:
                self.assertEqual(greedy_ids(c.stub, ids, len(greedy)), greedy)
            held = heldout_ids()
            reqs = [make_request(held[i * 50:i * 50 + 30], 120) for i in range(4)]
            reqs.append(make_request(held[300:340], 37, temperature=0.8, seed=3,
                                     frequency_penalty=0.2, logprobs=2))
            want = [generate(shared.stub, r) for r in reqs]
            jobs = [Background(lambda r=r: generate(c.stub, r)) for r in reqs]
            got = [j.join(timeout=240) for j in jobs]
            for w, g in zip(want, got):
                self.assertEqual(g.ids, w.ids)
                self.assertEqual(g.text, w.text)
            self.assertEqual(got[-1].completion_tokens, 37)
            # Logprobs come with every token, confirmed drafts too.
            resp = list(c.stub.Generate(reqs[-1], timeout=CALL_TIMEOUT))
            self.assertEqual(sum(len(r.logprobs) for r in resp), 37)
            self.assertTrue(all(len(lp.top) == 2 for r in resp for lp in r.logprobs))
            # A stop string that ends inside a step's run of tokens.
            text = want[0].text
            stop = text[len(text) // 2:len(text) // 2 + 6]
            req = make_request(held[0:30], 120)
            req.sampling.stop.append(stop)
            self.assertEqual(generate(c.stub, req).text, generate(shared.stub, req).text)
            st = c.stats()
            self.assertGreater(st.accepted_draft_tokens, 0)
            self.assertGreaterEqual(st.draft_tokens, st.accepted_draft_tokens)
            poll_until(lambda: c.stats().kv_used_tokens == 0, 10, interval=0.02)
            self.assertEqual(c.stats().kv_used_tokens, 0)
        finally:
            c.stop()


def scrape_metrics(t, http_addr):
    """GET /metrics of the router at http_addr, parsed: {(name, labels): value}, labels a sorted
    tuple of pairs; checks the text format on the way with t's assertions (HELP and TYPE before
    each family's samples; histograms' buckets cumulative, their +Inf bucket equal to _count)."""
    conn = http.client.HTTPConnection(http_addr, timeout=CALL_TIMEOUT)
    try:
        conn.request("GET", "/metrics")
        r = conn.getresponse()
        t.assertEqual(r.status, 200)
        t.assertTrue(r.getheader("Content-Type").startswith("text/plain; version=0.0.4"))
        text = r.read().decode("utf-8")
    finally:
        conn.close()
    sample = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
    label = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
    types, out = {}, {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            t.assertNotIn(name, types)
            types[name] = kind
            continue
        m = sample.match(line)
        t.assertIsNotNone(m, line)
        name, labels, value = m.group(1), m.group(2) or "", m.group(3)
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        t.assertIn(family, types, line)
        out[(name, tuple(sorted(label.findall(labels))))] = float(value)
    for name, kind in types.items():
        if kind != "histogram":
            continue
        buckets = sorted((float(dict(k[1])["le"]), v) for k, v in out.items()
                         if k[0] == name + "_bucket")
        t.assertEqual(buckets[-1][0], float("inf"))
        counts = [v for _, v in buckets]
        t.assertEqual(counts, sorted(counts), name)
        t.assertEqual(counts[-1], out[(name + "_count", ())], name)
    return out


class HttpApiTest(unittest.TestCase):
    """The router's OpenAI-compatible HTTP API (--http_address) beside its gRPC API: the same
    completions, streamed or not, OpenAI's error objects, a client that leaves mid-stream."""

    @classmethod
    def setUpClass(cls):
        shared = shared_pydoc_cluster()
        cls.c = start_cluster(PYDOC, [], name="http", encoder=shared.encoder,
                              experts=shared.experts,
                              router_flags=["--http_address=127.0.0.1:0"])
        cls.http = cls.c.procs[-1].wait_for(
            r"OpenAI-compatible HTTP API on (\S+) \(model 'pydoc-moe-17m'\)").group(1)

    @classmethod
    def tearDownClass(cls):
        cls.c.stop()

    def call(self, method, path, body=None):
        """(status, parsed JSON or text) of one request."""
        conn = http.client.HTTPConnection(self.http, timeout=CALL_TIMEOUT)
        try:
            data = None if body is None else json.dumps(body)
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            raw = r.read().decode("utf-8")
            try:
                return r.status, json.loads(raw)
            except ValueError:
                return r.status, raw
        finally:
            conn.close()

    def events(self, path, body):
        """The data fields of a streamed response's server-sent events."""
        conn = http.client.HTTPConnection(self.http, timeout=CALL_TIMEOUT)
        try:
            conn.request("POST", path, body=json.dumps(body),
                         headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            self.assertEqual(r.status, 200)
            self.assertEqual(r.getheader("Content-Type"), "text/event-stream")
            text = r.read().decode("utf-8")
        finally:
            conn.close()
        self.assertTrue(text.endswith("\n\n"))
        return [e[len("data: "):] for e in text.split("\n\n") if e.startswith("data: ")]

    def test_completions_match_the_grpc_api(self):
        ids = PYDOC_CASES[1][0]
        want = generate(self.c.stub, make_request(ids, 20))
        status, got = self.call("POST", "/v1/completions",
                                {"model": "pydoc-moe-17m", "prompt": ids, "max_tokens": 20,
                                 "temperature": 0, "ignore_eos": True, "logprobs": 2})
        self.assertEqual(status, 200, got)
        self.assertEqual(got["object"], "text_completion")
        choice = got["choices"][0]
        self.assertEqual(choice["text"], want.text)
        self.assertEqual(choice["finish_reason"], "length")
        self.assertEqual(got["usage"], {"prompt_tokens": len(ids), "completion_tokens": 20,
                                        "total_tokens": len(ids) + 20})
        lp = choice["logprobs"]
        self.assertEqual(len(lp["tokens"]), 20)
        self.assertEqual("".join(lp["tokens"]), want.text)
        self.assertTrue(all(len(t) <= 2 for t in lp["top_logprobs"]))
        self.assertTrue(all(x <= 0 for x in lp["token_logprobs"]))
        # Streamed: the chunks' texts add up to the same completion; usage last, then [DONE].
        ev = self.events("/v1/completions", {"prompt": ids, "max_tokens": 20, "temperature": 0,
                                             "ignore_eos": True, "stream": True,
                                             "stream_options": {"include_usage": True}})
        self.assertEqual(ev[-1], "[DONE]")
        chunks = [json.loads(e) for e in ev[:-1]]
        self.assertEqual("".join(c["choices"][0]["text"] for c in chunks[:-1]), want.text)
        self.assertEqual(chunks[-2]["choices"][0]["finish_reason"], "length")
        self.assertEqual(chunks[-1]["usage"]["completion_tokens"], 20)

    def test_chat_completions_match_the_grpc_api(self):
        req = pb2.GenerateRequest()
        req.chat.messages.add(role="user", content="How do I open a file?")
        req.sampling.temperature = 0
        req.sampling.max_tokens = 12
        req.sampling.ignore_eos = True
        want = generate(self.c.stub, req)
        body = {"messages": [{"role": "user", "content": "How do I open a file?"}],
                "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        status, got = self.call("POST", "/v1/chat/completions", body)
        self.assertEqual(status, 200, got)
        self.assertEqual(got["choices"][0]["message"], {"role": "assistant",
                                                        "content": want.text})
        self.assertEqual(got["usage"]["prompt_tokens"], want.prompt_tokens)
        ev = self.events("/v1/chat/completions", dict(body, stream=True))
        chunks = [json.loads(e) for e in ev[:-1]]
        self.assertEqual(chunks[0]["choices"][0]["delta"], {"role": "assistant", "content": ""})
        self.assertEqual("".join(c["choices"][0]["delta"].get("content", "")
                                 for c in chunks), want.text)
        self.assertEqual(chunks[-1]["choices"][0]["finish_reason"], "length")

    def test_concurrent_requests_match_solo_ones(self):
        # 16 completions at once, half streamed, half not, with a bad one among them: each
        # good one gets its solo text; the bad one its 400.
        held = heldout_ids()

        def body(i, stream):
            return {"prompt": held[i * 37:i * 37 + 50], "max_tokens": 24, "temperature": 0,
                    "ignore_eos": True, "stream": stream}

        def run(i, stream):
            if not stream:
                status, got = self.call("POST", "/v1/completions", body(i, False))
                self.assertEqual(status, 200, got)
                return got["choices"][0]["text"]
            ev = self.events("/v1/completions", body(i, True))
            return "".join(json.loads(e)["choices"][0]["text"] for e in ev[:-1])

        solo = [run(i, False) for i in range(8)]
        jobs = [Background(lambda k=k: run(k % 8, k >= 8)) for k in range(16)]
        bad = Background(lambda: self.call("POST", "/v1/completions",
                                           {"prompt": "x", "top_p": 7}))
        self.assertEqual(bad.join(timeout=120)[0], 400)
        for k, j in enumerate(jobs):
            self.assertEqual(j.join(timeout=240), solo[k % 8], "request %d" % k)

    def test_several_prompts_and_choices_match_the_grpc_api(self):
        # Two prompts x n=2, sampled with a seed: choice p * 2 + j is prompt p sampled with
        # seed + j over gRPC, streamed or not; each prompt's tokens count once in the usage.
        a, b = PYDOC_CASES[0][0], PYDOC_CASES[1][0]
        want = [generate(self.c.stub, make_request(p, 12, temperature=0.8, seed=5 + j)).text
                for p in (a, b) for j in range(2)]
        body = {"prompt": [a, b], "n": 2, "seed": 5, "temperature": 0.8, "max_tokens": 12,
                "ignore_eos": True}
        status, got = self.call("POST", "/v1/completions", body)
        self.assertEqual(status, 200, got)
        self.assertEqual([c["index"] for c in got["choices"]], [0, 1, 2, 3])
        self.assertEqual([c["text"] for c in got["choices"]], want)
        self.assertEqual(got["usage"], {"prompt_tokens": len(a) + len(b), "completion_tokens": 48,
                                        "total_tokens": len(a) + len(b) + 48})
        ev = self.events("/v1/completions", dict(body, stream=True,
                                                 stream_options={"include_usage": True}))
        self.assertEqual(ev[-1], "[DONE]")
        chunks = [json.loads(e) for e in ev[:-1]]
        texts = ["", "", "", ""]
        for c in chunks[:-1]:
            texts[c["choices"][0]["index"]] += c["choices"][0]["text"]
        self.assertEqual(texts, want)
        self.assertEqual(chunks[-1]["usage"]["completion_tokens"], 48)
        # Chat with n=3: three role chunks, then three answers, each the seeded gRPC one.
        req = pb2.GenerateRequest()
        req.chat.messages.add(role="user", content="How do I open a file?")
        req.sampling.temperature = 0.8
        req.sampling.max_tokens = 8
        req.sampling.ignore_eos = True
        chat_want = []
        for j in range(3):
            req.sampling.seed = 11 + j
            chat_want.append(generate(self.c.stub, req).text)
        ev = self.events("/v1/chat/completions",
                         {"messages": [{"role": "user", "content": "How do I open a file?"}],
                          "n": 3, "seed": 11, "temperature": 0.8, "max_tokens": 8,
                          "ignore_eos": True, "stream": True})
        chunks = [json.loads(e) for e in ev[:-1]]
        self.assertEqual(sorted(c["choices"][0]["index"] for c in chunks
                                if "role" in c["choices"][0]["delta"]), [0, 1, 2])
        texts = ["", "", ""]
        for c in chunks:
            texts[c["choices"][0]["index"]] += c["choices"][0]["delta"].get("content", "")
        self.assertEqual(texts, chat_want)

    def test_connections_are_kept_alive_and_pipelined(self):
        ids = PYDOC_CASES[1][0]
        want = generate(self.c.stub, make_request(ids, 6)).text
        body = json.dumps({"prompt": ids, "max_tokens": 6, "temperature": 0, "ignore_eos": True})
        conn = http.client.HTTPConnection(self.http, timeout=CALL_TIMEOUT)
        try:
            socks = []
            for stream in (False, True, False):
                b = json.loads(body)
                b["stream"] = stream
                conn.request("POST", "/v1/completions", body=json.dumps(b))
                r = conn.getresponse()
                self.assertEqual(r.status, 200)
                self.assertEqual(r.getheader("Connection"), "keep-alive")
                raw = r.read().decode()
                socks.append(conn.sock)
                if not stream:
                    self.assertEqual(json.loads(raw)["choices"][0]["text"], want)
                else:
                    self.assertIn("data: [DONE]", raw)
            self.assertIsNotNone(socks[0])
            self.assertTrue(all(s is socks[0] for s in socks), "the connection was not reused")
        finally:
            conn.close()
        # Two requests sent at once on one socket are answered in order; Connection: close on
        # the second ends the connection after it.
        sock = socket.create_connection(tuple(self.http.rsplit(":", 1)), timeout=60)
        try:
            req = ("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n%s")
            sock.sendall((req % (len(body), "", body) +
                          req % (len(body), "Connection: close\r\n", body)).encode())
            got = b""
            while True:
                part = sock.recv(65536)
                if not part:
                    break
                got += part
        finally:
            sock.close()
        answers = []  # (head, parsed body) of each response, by Content-Length
        while got:
            head, _, rest = got.partition(b"\r\n\r\n")
            n = int(re.search(rb"Content-Length: (\d+)", head).group(1))
            answers.append((head.decode(), json.loads(rest[:n])))
            got = rest[n:]
        self.assertEqual(len(answers), 2)
        self.assertTrue(all(h.startswith("HTTP/1.1 200 OK") for h, _ in answers))
        self.assertIn("Connection: keep-alive", answers[0][0])
        self.assertIn("Connection: close", answers[1][0])
        self.assertEqual([a["choices"][0]["text"] for _, a in answers], [want, want])

    def test_echo_scores_the_prompt_as_lm_eval_asks(self):
        # lm-eval's loglikelihood request: context + continuation as token ids, echo, logprobs 1,
        # max_tokens 1. The continuation's logprob is the log-softmax of transformers' logits
        # after the context (the reference's last_logits); every prompt token is scored but the
        # first; the top entry tells whether the continuation is greedy.
        with open(os.path.join(PYDOC, "reference.json")) as f:
            cases = json.load(f)["prompts"][:2]
        for case in cases:
            ctx, last = case["input_ids"], case["last_logits"]
            mx = max(last)
            lse = mx + math.log(sum(math.exp(v - mx) for v in last))
            best = max(range(len(last)), key=lambda i: (last[i], -i))
            second = max((i for i in range(len(last)) if i != best), key=lambda i: last[i])
            text = self.c.stub.Detokenize(pb2.DetokenizeRequest(ids=ctx + [second])).text
            for cont, greedy in ((best, True), (second, False)):
                status, got = self.call("POST", "/v1/completions",
                                        {"prompt": ctx + [cont], "max_tokens": 1, "echo": True,
                                         "logprobs": 1, "temperature": 0})
                self.assertEqual(status, 200, got)
                lp = got["choices"][0]["logprobs"]
                n = len(ctx) + 1
                self.assertEqual(len(lp["tokens"]), n + 1)  # the prompt's and one generated
                self.assertIsNone(lp["token_logprobs"][0])
                self.assertIsNone(lp["top_logprobs"][0])
                self.assertTrue(all(x <= 0 for x in lp["token_logprobs"][1:]))
                self.assertAlmostEqual(lp["token_logprobs"][n - 1], last[cont] - lse, places=3)
                top = lp["top_logprobs"][n - 1]
                self.assertEqual(max(top, key=top.get) == lp["tokens"][n - 1], greedy)
                self.assertEqual(got["usage"]["prompt_tokens"], n)
            # max_tokens 0: the prompt alone, as text and scores.
            status, got = self.call("POST", "/v1/completions",
                                    {"prompt": ctx + [second], "max_tokens": 0, "echo": True,
                                     "logprobs": 0})
            self.assertEqual(status, 200, got)
            choice = got["choices"][0]
            self.assertEqual(choice["text"], text)
            self.assertEqual(len(choice["logprobs"]["tokens"]), len(ctx) + 1)
            self.assertEqual("".join(choice["logprobs"]["tokens"]), text)
            self.assertAlmostEqual(choice["logprobs"]["token_logprobs"][-1], last[second] - lse,
                                   places=3)
            self.assertEqual(got["usage"]["completion_tokens"], 0)
        # Streamed echo: the first chunk starts with the prompt; a string prompt comes back as
        # given.
        ev = self.events("/v1/completions", {"prompt": "import os", "max_tokens": 3, "echo": True,
                                             "stream": True, "temperature": 0})
        first = json.loads(ev[0])["choices"][0]["text"]
        self.assertTrue(first.startswith("import os"), first)
        # Over gRPC: sampling.prompt_logprobs puts the same scores in the first response.
        req = make_request(cases[0]["input_ids"], 2)
        req.sampling.prompt_logprobs = 2
        responses = list(self.c.stub.Generate(req, timeout=CALL_TIMEOUT))
        plp = responses[0].prompt_logprobs
        self.assertEqual([e.chosen.id for e in plp], cases[0]["input_ids"])
        self.assertEqual(len(plp[0].top), 0)
        self.assertTrue(all(len(e.top) == 2 and e.chosen.text for e in plp[1:]))
        self.assertTrue(all(len(r.prompt_logprobs) == 0 for r in responses[1:]))
        # Bad values name their field.
        status, got = self.call("POST", "/v1/chat/completions",
                                {"messages": [{"role": "user", "content": "x"}], "echo": True})
        self.assertEqual(status, 400)
        self.assertIn("echo", got["error"]["message"])
        status, got = self.call("POST", "/v1/completions", {"prompt": "x", "max_tokens": 0})
        self.assertEqual(status, 400)
        req.sampling.prompt_logprobs = 21
        with self.assertRaises(grpc.RpcError) as cm:
            list(self.c.stub.Generate(req, timeout=CALL_TIMEOUT))
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("prompt_logprobs", cm.exception.details())

    def test_json_object_answers_are_json(self):
        # response_format json_object: every answer is (the start of) one JSON object, and those
        # that end by themselves parse as one; the same requests without it are not JSON.
        def ask(seed, json_mode):
            body = {"prompt": "The JSON config:", "max_tokens": 64, "temperature": 0.8,
                    "seed": seed}
            if json_mode:
                body["response_format"] = {"type": "json_object"}
            status, got = self.call("POST", "/v1/completions", body)
            self.assertEqual(status, 200, got)
            return got["choices"][0]

        finished = 0
        for seed in range(8):
            c = ask(seed, True)
            self.assertTrue(c["text"].lstrip().startswith("{"), c["text"])
            if c["finish_reason"] == "stop":
                self.assertIsInstance(json.loads(c["text"]), dict, c["text"])
                finished += 1
        self.assertGreater(finished, 0)
        self.assertFalse(all(ask(seed, False)["text"].lstrip().startswith("{")
                             for seed in range(8)))
        # Chat, greedy, streamed.
        ev = self.events("/v1/chat/completions",
                         {"messages": [{"role": "user", "content": "Give me JSON"}],
                          "max_tokens": 48, "temperature": 0, "stream": True,
                          "response_format": {"type": "json_object"}})
        text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in ev[:-1])
        self.assertTrue(text.lstrip().startswith("{"), text)
        # Combinations that cannot hold are refused by name.
        req = make_request(PYDOC_CASES[0][0], 8)  # ignore_eos=True
        req.sampling.response_format = pb2.RESPONSE_FORMAT_JSON_OBJECT
        with self.assertRaises(grpc.RpcError) as cm:
            list(self.c.stub.Generate(req, timeout=CALL_TIMEOUT))
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("response_format", cm.exception.details())

    def test_json_schema_answers_follow_the_schema(self):
        # response_format json_schema: answers that end by themselves parse as objects of the
        # schema, keys in its order; every answer starts as the schema says; a schema the subset
        # lacks is a 400 naming the keyword. (No free strings: the embedded model's strings run
        # on past max_tokens; json_schema_test samples those.)
        schema = {"type": "object",
                  "properties": {"lang": {"enum": ["python", "c", "rust"]},
                                 "stars": {"type": "integer"},
                                 "tags": {"type": "array", "items": {"enum": ["web", "cli"]},
                                          "minItems": 1, "maxItems": 2},
                                 "note": {"type": ["integer", "null"]},
                                 "ok": {"type": "boolean"}},
                  "required": ["lang", "stars", "tags", "ok"]}
        fmt = {"type": "json_schema", "json_schema": {"name": "repo", "schema": schema}}
        finished = 0
        for seed in range(8):
            status, got = self.call("POST", "/v1/completions",
                                    {"prompt": "The JSON config:", "max_tokens": 128,
                                     "temperature": 0.8, "seed": seed, "response_format": fmt})
            self.assertEqual(status, 200, got)
            c = got["choices"][0]
            self.assertTrue(re.match(r'\s*\{\s*("(l(a(n(g("(\s*(:.*)?)?)?)?)?)?)?)?$',
                                     c["text"], re.S), c["text"])
            if c["finish_reason"] != "stop":
                continue
            finished += 1
            doc = json.loads(c["text"])
            keys = ["lang", "stars", "tags"] + (["note"] if "note" in doc else []) + ["ok"]
            self.assertEqual(list(doc), keys, c["text"])
            self.assertIn(doc["lang"], ["python", "c", "rust"])
            self.assertIsInstance(doc["stars"], int)
            self.assertTrue(1 <= len(doc["tags"]) <= 2 and
                            all(t in ("web", "cli") for t in doc["tags"]), c["text"])
            self.assertTrue(doc.get("note") is None or isinstance(doc["note"], int))
            self.assertIsInstance(doc["ok"], bool)
        self.assertGreater(finished, 0)
        # Over gRPC, the same field; an unsupported keyword is named.
        req = make_request(PYDOC_CASES[0][0], 8)
        req.sampling.ClearField("ignore_eos")
        req.sampling.response_format = pb2.RESPONSE_FORMAT_JSON_SCHEMA
        req.sampling.json_schema = json.dumps({"type": "object", "properties": {
            "d": {"type": "string", "format": "email"}}})
        with self.assertRaises(grpc.RpcError) as cm:
            list(self.c.stub.Generate(req, timeout=CALL_TIMEOUT))
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn('format "email" is not supported', cm.exception.details())
        status, got = self.call("POST", "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {
                "type": "object", "properties": {"d": {"type": "string", "pattern": "x"}}}}}})
        self.assertEqual(status, 400, got)
        self.assertIn("keyword 'pattern'", got["error"]["message"])

    def test_logit_bias_and_min_tokens_steer_greedy_decoding(self):
        ids = PYDOC_CASES[1][0]
        plain = greedy_ids(self.c.stub, ids, 12)
        # -100 on the first greedy token: the first token is another; +100 on a token: every
        # token is that one.
        req = make_request(ids, 12)
        req.sampling.logit_bias[plain[0]] = -100
        banned = generate(self.c.stub, req).ids
        self.assertNotEqual(banned[0], plain[0])
        self.assertNotIn(plain[0], banned)
        req = make_request(ids, 6)
        req.sampling.logit_bias[plain[3]] = 100
        self.assertEqual(generate(self.c.stub, req).ids, [plain[3]] * 6)
        # The fourth greedy token as a stop token id ends the answer there; with min_tokens=8
        # it is held back until 8 tokens are out. The first three tokens are the same.
        stop = plain[3]
        first = next(i for i, t in enumerate(plain) if t == stop)
        req = make_request(ids, 12, ignore_eos=False)
        req.sampling.stop_token_ids.append(stop)
        early = generate(self.c.stub, req)
        self.assertEqual(early.ids, plain[:first + 1])
        self.assertEqual(early.finish_reason, pb2.FINISH_REASON_STOP)
        req.sampling.min_tokens = 8
        late = generate(self.c.stub, req)
        self.assertGreaterEqual(len(late.ids), 8)
        self.assertNotIn(stop, late.ids[:7])
        self.assertEqual(late.ids[:first], plain[:first])
        # Over HTTP: the same fields, OpenAI's spelling.
        status, got = self.call("POST", "/v1/completions",
                                {"prompt": ids, "max_tokens": 6, "temperature": 0,
                                 "ignore_eos": True, "logit_bias": {str(plain[3]): 100}})
        self.assertEqual(status, 200, got)
        self.assertEqual(got["usage"]["completion_tokens"], 6)
        status, got = self.call("POST", "/v1/completions",
                                {"prompt": ids, "max_tokens": 4, "min_tokens": 5})
        self.assertEqual(status, 400)
        self.assertIn("min_tokens", got["error"]["message"])

    def test_errors_are_openai_error_objects(self):
        status, got = self.call("POST", "/v1/completions", {"prompt": "x", "temperature": -1})
        self.assertEqual(status, 400)
        self.assertEqual(got["error"]["type"], "invalid_request_error")
        self.assertIn("temperature", got["error"]["message"])
        status, got = self.call("POST", "/v1/completions", {"prompt": "x", "model": "gpt-4"})
        self.assertEqual(status, 404)
        self.assertIn("pydoc-moe-17m", got["error"]["message"])
        status, got = self.call("POST", "/v1/completions",
                                {"prompt": heldout_ids()[:PYDOC_CONTEXT + 1]})
        self.assertEqual(status, 400)
        self.assertEqual(self.call("GET", "/v1/completions")[0], 405)
        self.assertEqual(self.call("GET", "/nowhere")[0], 404)
        status, got = self.call("GET", "/v1/models")
        self.assertEqual([m["id"] for m in got["data"]], ["pydoc-moe-17m"])
        self.assertEqual(self.call("GET", "/health"), (200, "ok\n"))
        # Not JSON at all.
        conn = http.client.HTTPConnection(self.http, timeout=30)
        conn.request("POST", "/v1/completions", body="{oops")
        r = conn.getresponse()
        self.assertEqual(r.status, 400)
        self.assertIn("JSON", json.loads(r.read())["error"]["message"])
        conn.close()

    def metrics(self):
        return scrape_metrics(self, self.http)

    def test_tokenize_and_detokenize_match_the_grpc_api(self):
        text = "import os\nprint(os.getcwd())"
        status, got = self.call("POST", "/tokenize", {"prompt": text})
        self.assertEqual(status, 200, got)
        want = list(self.c.stub.Tokenize(pb2.TokenizeRequest(text=text, add_special_tokens=True),
                                         timeout=CALL_TIMEOUT).ids)
        self.assertEqual(got["tokens"], want)
        self.assertEqual(got["count"], len(want))
        self.assertEqual(got["max_model_len"], PYDOC_CONTEXT)
        # Chat messages: as many tokens as a chat completion's prompt.
        msgs = [{"role": "user", "content": "Hi there"}]
        status, tok = self.call("POST", "/tokenize", {"messages": msgs})
        self.assertEqual(status, 200, tok)
        status, chat = self.call("POST", "/v1/chat/completions",
                                 {"messages": msgs, "max_tokens": 1})
        self.assertEqual(status, 200, chat)
        self.assertEqual(tok["count"], chat["usage"]["prompt_tokens"])
        status, got = self.call("POST", "/detokenize", {"tokens": want})
        self.assertEqual(status, 200, got)
        self.assertEqual(got["prompt"], self.c.stub.Detokenize(
            pb2.DetokenizeRequest(ids=want), timeout=CALL_TIMEOUT).text)
        self.assertEqual(got["prompt"], text)
        status, got = self.call("POST", "/detokenize", {"tokens": [PYDOC_VOCAB]})
        self.assertEqual(status, 400)
        self.assertIn("outside the vocabulary", got["error"]["message"])
        self.assertEqual(self.call("POST", "/tokenize", {"text": "x"})[0], 400)
        self.assertEqual(self.call("POST", "/tokenize", {"prompt": "x", "model": "gpt-4"})[0], 404)
        self.assertEqual(self.call("GET", "/tokenize")[0], 405)

    def test_metrics_count_what_the_router_served(self):
        ids = PYDOC_CASES[2][0]
        before = self.metrics()
        status, got = self.call("POST", "/v1/completions",
                                {"prompt": ids, "max_tokens": 12, "temperature": 0,
                                 "ignore_eos": True})
        self.assertEqual(status, 200, got)
        status, _ = self.call("POST", "/v1/completions",
                              {"prompt": heldout_ids()[:PYDOC_CONTEXT + 1]})
        self.assertEqual(status, 400)
        after = self.metrics()

        def delta(name, **labels):
            key = (name, tuple(sorted(labels.items())))
            return after[key] - before[key]
        self.assertEqual(delta("moemesh_generation_tokens_total"), 12)
        self.assertEqual(delta("moemesh_prompt_tokens_total"), len(ids))
        self.assertEqual(delta("moemesh_requests_submitted_total"), 1)
        self.assertEqual(delta("moemesh_requests_finished_total", reason="length"), 1)
        self.assertEqual(delta("moemesh_requests_finished_total", reason="stop"), 0)
        self.assertEqual(delta("moemesh_requests_rejected_total", reason="invalid"), 1)
        self.assertEqual(delta("moemesh_time_to_first_token_seconds_count"), 1)
        self.assertGreater(delta("moemesh_time_to_first_token_seconds_sum"), 0)
        self.assertEqual(delta("moemesh_inter_token_latency_seconds_count"), 11)
        self.assertEqual(delta("moemesh_e2e_request_latency_seconds_count"), 1)
        self.assertGreaterEqual(delta("moemesh_e2e_request_latency_seconds_sum"),
                                delta("moemesh_time_to_first_token_seconds_sum"))
        self.assertEqual(delta("moemesh_request_generation_tokens_sum"), 12)
        self.assertEqual(delta("moemesh_request_prompt_tokens_sum"), len(ids))
        self.assertEqual(after[("moemesh_requests_running", ())], 0)
        self.assertEqual(after[("moemesh_worker_up", (("worker", "0"),))], 1)
        self.assertGreater(delta("moemesh_worker_steps_total", worker="0"), 0)
        self.assertEqual(after[("moemesh_kv_cache_reserved_tokens", (("worker", "0"),))], 0)
        self.assertGreater(after[("moemesh_kv_cache_capacity_tokens", (("worker", "0"),))], 0)
        # The worker's own report: no rows in use once done, time spent on the completion.
        self.assertEqual(after[("moemesh_kv_cache_used_tokens", (("worker", "0"),))], 0)
        self.assertGreater(delta("moemesh_worker_attention_seconds_total", worker="0"), 0)
        self.assertGreater(delta("moemesh_worker_expert_wait_seconds_total", worker="0"), 0)
        self.assertEqual(delta("moemesh_spec_draft_tokens_total", worker="0"), 0)
        self.assertEqual(delta("moemesh_expert_failovers_total", worker="0"), 0)
        self.assertEqual(after[("moemesh_expert_workers_down", (("worker", "0"),))], 0)
        self.assertEqual(delta("moemesh_worker_idle_released_sequences_total", worker="0"), 0)
        self.assertEqual(delta("moemesh_worker_stale_released_sequences_total", worker="0"), 0)
        self.assertEqual(self.call("POST", "/metrics")[0], 405)

    def test_a_client_leaving_mid_stream_cancels_its_request(self):
        steps_before = self.c.stats().steps
        sock = socket.create_connection(tuple(self.http.rsplit(":", 1)), timeout=30)
        # Two choices: leaving cancels both.
        body = json.dumps({"prompt": PYDOC_CASES[0][0], "max_tokens": 900, "temperature": 0,
                           "ignore_eos": True, "stream": True, "n": 2})
        sock.sendall(("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                      "application/json\r\nContent-Length: %d\r\n\r\n%s"
                      % (len(body), body)).encode())
        got = b""
        while b"data: " not in got:
            got += sock.recv(4096)
        self.assertIn(b"200 OK", got)
        poll_until(lambda: self.c.stats().active_sequences == 2, 20, interval=0.05)
        self.assertEqual(self.c.stats().active_sequences, 2)
        sock.close()
        # Cancelled at a step boundary and released: the worker holds no sequence.
        poll_until(lambda: self.c.stats().active_sequences == 0, 20, interval=0.05)
        st = self.c.stats()
        self.assertEqual(st.active_sequences, 0)
        self.assertEqual(st.kv_used_tokens, 0)
        # Stopped early: far fewer steps than the 900 tokens it asked for.
        self.assertLess(st.steps - steps_before, 450)


class WorkerDownHealthTest(unittest.TestCase):
    """A router whose only attention worker is gone: GET /health answers 503 (a readiness probe
    takes the pod out), a request fails UNAVAILABLE once the router's outage wait is over."""

    def test_health_is_503_while_no_attention_worker_is_up(self):
        shared = shared_pydoc_cluster()
        c = start_cluster(PYDOC, [], name="down", encoder=shared.encoder,
                          experts=shared.experts,
                          router_flags=["--http_address=127.0.0.1:0", "--outage_wait_seconds=1"])
        try:
            http_addr = c.procs[-1].wait_for(r"OpenAI-compatible HTTP API on (\S+)").group(1)

            def get(path):
                conn = http.client.HTTPConnection(http_addr, timeout=CALL_TIMEOUT)
                conn.request("GET", path)
                r = conn.getresponse()
                out = (r.status, r.read().decode())
                conn.close()
                return out
            self.assertEqual(get("/health"), (200, "ok\n"))
            c.attention_procs[0].stop()
            status, text = get("/health")
            self.assertEqual(status, 503)
            self.assertTrue(text.startswith("no attention worker can serve: UNAVAILABLE"), text)
            with self.assertRaises(grpc.RpcError) as cm:
                generate(c.stub, make_request(PYDOC_CASES[0][0], 4))
            self.assertEqual(cm.exception.code(), grpc.StatusCode.UNAVAILABLE)
            self.assertEqual(get("/health")[0], 503)
        finally:
            c.stop()


class PriorityTest(unittest.TestCase):
    """A router running one sequence at a time (--max_running=1): of two waiting requests the
    one with the lower priority value is admitted first, though it came second."""

    def test_more_urgent_waiting_request_is_served_first(self):
        shared = shared_pydoc_cluster()
        c = start_cluster(PYDOC, [], name="prio", encoder=shared.encoder,
                          experts=shared.experts,
                          router_flags=["--http_address=127.0.0.1:0", "--max_running=1"])
        try:
            http_addr = c.procs[-1].wait_for(r"OpenAI-compatible HTTP API on (\S+)").group(1)

            def waiting():
                conn = http.client.HTTPConnection(http_addr, timeout=CALL_TIMEOUT)
                conn.request("GET", "/metrics")
                text = conn.getresponse().read().decode()
                conn.close()
                return int(float(re.search(r"^moemesh_requests_waiting (\S+)$", text,
                                           re.M).group(1)))

            ids = PYDOC_CASES[0][0]
            done = []

            def run(name, n, priority):
                req = make_request(ids, n)
                req.priority = priority
                r = generate(c.stub, req)
                done.append(name)
                return r

            first = Background(lambda: run("first", 900, 0))
            poll_until(lambda: c.stats().active_sequences == 1, 30, interval=0.05)
            later = Background(lambda: run("later", 4, 5))
            poll_until(lambda: waiting() == 1, 30, interval=0.05)
            urgent = Background(lambda: run("urgent", 4, -1))
            poll_until(lambda: waiting() == 2, 30, interval=0.05)
            self.assertEqual(waiting(), 2)
            for b in (first, later, urgent):
                self.assertEqual(b.join().finish_reason, pb2.FINISH_REASON_LENGTH)
            self.assertEqual(done, ["first", "urgent", "later"])
        finally:
            c.stop()


class DrainTest(unittest.TestCase):
    """SIGTERM to a router: it stops taking requests (UNAVAILABLE, HTTP 503, health NOT_SERVING),
    lets the stream in flight run to its last token, then exits 0."""

    def test_sigterm_drains_the_requests_in_flight(self):
        shared = shared_pydoc_cluster()
        c = start_cluster(PYDOC, [], name="drain", encoder=shared.encoder,
                          experts=shared.experts,
                          router_flags=["--http_address=127.0.0.1:0", "--drain_seconds=120"])
        try:
            router = c.procs[-1]
            http_addr = router.wait_for(r"OpenAI-compatible HTTP API on (\S+)").group(1)
            ids, want = PYDOC_CASES[0]
            n = 600
            bg = Background(lambda: generate(c.stub, make_request(ids, n)))
            poll_until(lambda: c.stats().active_sequences == 1, 30, interval=0.05)
            os.killpg(router.pid, signal.SIGTERM)
            router.wait_for(r"router: shutting down: draining 1 requests")
            with self.assertRaises(grpc.RpcError) as cm:
                generate(c.stub, make_request(ids, 4))
            self.assertEqual(cm.exception.code(), grpc.StatusCode.UNAVAILABLE)
            self.assertIn("shutting down", cm.exception.details())
            self.assertFalse(health_ok(c.addr))
            conn = http.client.HTTPConnection(http_addr, timeout=CALL_TIMEOUT)
            conn.request("GET", "/health")
            r = conn.getresponse()
            self.assertEqual((r.status, r.read()), (503, b"draining\n"))
            conn.close()
            got = bg.join()
            self.assertEqual(got.finish_reason, pb2.FINISH_REASON_LENGTH)
            self.assertEqual(len(got.ids), n)
            self.assertEqual(got.ids[:len(want)], want)
            self.assertEqual(router.p.wait(timeout=60), 0)
            router.wait_for(r"router: drained")
        finally:
            c.stop()


class BadInputTest(unittest.TestCase):
    """Each bad request fails with the right code while a good greedy stream runs beside it."""

    GOOD_TOKENS = 200  # long enough (> 1 s) that the bad request surely lands mid-stream
    _good_reference = None

    def good_reference(self, c):
        """The good stream's ids when run alone: 200 greedy ids starting with the oracle's 40."""
        if BadInputTest._good_reference is None:
            ids, greedy = PYDOC_CASES[0]
            ref = greedy_ids(c.stub, ids, self.GOOD_TOKENS)
            self.assertEqual(ref[:len(greedy)], greedy)
            BadInputTest._good_reference = ref
        return BadInputTest._good_reference

    def with_good_stream(self, bad_call):
        """Starts a greedy stream, waits for its first token, runs bad_call(c) (which must raise
        grpc.RpcError, returned), then checks the stream ends with its solo ids."""
        c = shared_pydoc_cluster()
        expected = self.good_reference(c)
        ids = PYDOC_CASES[0][0]
        first = threading.Event()
        result = Result()

        def good():
            for resp in c.stub.Generate(make_request(ids, self.GOOD_TOKENS), timeout=CALL_TIMEOUT):
                result.ids.extend(resp.ids)
                if resp.finish_reason:
                    result.finish_reason = resp.finish_reason
                first.set()
            return result

        job = Background(good)
        self.assertTrue(first.wait(60), "the good stream produced nothing in 60 s")
        try:
            with self.assertRaises(grpc.RpcError) as cm:
                bad_call(c)
            overlapped = job.thread.is_alive()
        finally:
            r = job.join()
        self.assertEqual(r.ids, expected, "the good stream beside the bad request")
        self.assertEqual(r.finish_reason, pb2.FINISH_REASON_LENGTH)
        self.assertTrue(overlapped, "test timing: the good stream had ended before the bad "
                        "request was answered")
        return cm.exception

    def assert_invalid(self, err, *words):
        self.assertEqual(err.code(), grpc.StatusCode.INVALID_ARGUMENT, err.details())
        for w in words:
            self.assertIn(w, err.details())

    def test_prompt_longer_than_context(self):
        ids = heldout_ids()[:PYDOC_CONTEXT + 1]
        err = self.with_good_stream(lambda c: generate(c.stub, make_request(ids, 4)))
        self.assert_invalid(err)

    def test_top_p_out_of_range(self):
        err = self.with_good_stream(
            lambda c: generate(c.stub, make_request([1, 2, 3], 4, temperature=0.5, top_p=1.5)))
        self.assert_invalid(err, "top_p")

    def test_negative_temperature(self):
        err = self.with_good_stream(
            lambda c: generate(c.stub, make_request([1, 2, 3], 4, temperature=-1.0)))
        self.assert_invalid(err, "temperature")

    def test_experts_per_token_out_of_range(self):
        err = self.with_good_stream(
            lambda c: generate(c.stub, make_request([1, 2, 3], 4, experts_per_token=99)))
        self.assert_invalid(err, "experts_per_token")

    def test_thinking_budget_without_think_tokens(self):
        # The embedded tokenizer has no <think>, and the shared cluster names no other markers.
        err = self.with_good_stream(
            lambda c: generate(c.stub, make_request([1, 2, 3], 4, thinking_budget=8)))
        self.assert_invalid(err, "thinking_budget", "<think>")

    def test_token_id_outside_vocabulary(self):
        err = self.with_good_stream(
            lambda c: generate(c.stub, make_request([1, 999999, 3], 4)))
        self.assert_invalid(err)

    def test_detokenize_bad_id(self):
        err = self.with_good_stream(
            lambda c: c.stub.Detokenize(pb2.DetokenizeRequest(ids=[5, 999999]), timeout=10))
        self.assert_invalid(err)

    def test_queue_full(self):
        """--max_queue=1: while a long request holds the KV cache, one request waits, the next is
        refused with RESOURCE_EXHAUSTED; the running and the waiting ones are unharmed."""
        shared = shared_pydoc_cluster()
        small = start_cluster(PYDOC, None, name="small", kv_capacity_tokens=600,
                              router_flags=["--max_queue=1"], encoder=shared.encoder,
                              experts=shared.experts)
        try:
            ids, greedy = PYDOC_CASES[0]
            # The first needs 5 + 590 of the 600 slots (seconds of decoding); the others need
            # 5 + 40 each, so they must wait for it.
            first_call = small.stub.Generate(make_request(ids, 590), timeout=CALL_TIMEOUT)
            first_ids = list(next(first_call).ids)

            def drain():
                try:
                    for resp in first_call:
                        first_ids.extend(resp.ids)
                except grpc.RpcError as e:
                    return e
                return None

            first = Background(drain)
            second = Background(lambda: generate(small.stub, make_request(ids, len(greedy))))
            time.sleep(0.3)
            third = Background(lambda: generate(small.stub, make_request(ids, len(greedy))))
            refused = poll_until(lambda: [j for j in (second, third) if j.failed()], 20)
            first_running = first.thread.is_alive()
            first_call.cancel()  # makes room for the waiting one
            outcomes = []
            for job in (second, third):
                try:
                    outcomes.append(job.join())
                except grpc.RpcError as e:
                    outcomes.append(e)
            first.join()
            self.assertTrue(first_running, "test timing: the 590-token request ended before the "
                            "others were refused (%d ids)" % len(first_ids))
            errors = [o for o in outcomes if isinstance(o, grpc.RpcError)]
            done = [o for o in outcomes if isinstance(o, Result)]
            self.assertEqual(len(errors), 1, "expected exactly one refusal, got %r (refused "
                             "while the first ran: %d)"
                             % ([(e.code(), e.details()) for e in errors], len(refused or [])))
            self.assertEqual(errors[0].code(), grpc.StatusCode.RESOURCE_EXHAUSTED,
                             errors[0].details())
            self.assertIn("queue", errors[0].details())
            self.assertEqual(done[0].ids, greedy, "the request that waited")
            self.assertEqual(done[0].finish_reason, pb2.FINISH_REASON_LENGTH)
            self.assertLess(len(first_ids), 590)
            self.assertEqual(first_ids[:len(greedy)], greedy[:len(first_ids)])
            # The small attention worker ends idle.
            s = poll_until(lambda: small.stats().active_sequences == 0 or None, 10)
            self.assertIsNotNone(s, "active sequences left: %s" % small.stats())
        except AssertionError as e:
            raise AssertionError("%s%s" % (e, small.describe())) from None
        finally:
            small.stop()


class ClientScriptTest(unittest.TestCase):
    def test_client_py_streams_a_completion(self):
        c = shared_pydoc_cluster()
        argv = [sys.executable, CLIENT_PY, "--addr=" + c.addr, "--timeout=60", "--max_tokens=12",
                "--ignore_eos", "--temperature=0", "The os module provides"]
        res = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        out = res.stdout.decode("utf-8")
        err = res.stderr.decode("utf-8", errors="replace")
        self.assertEqual(res.returncode, 0, "stdout=%r stderr=%r" % (out, err))
        self.assertTrue(out.strip(), "no text: stdout=%r stderr=%r" % (out, err))
        m = re.search(r"^\[finish=(\w+) prompt_tokens=(\d+) completion_tokens=(\d+) ", err, re.M)
        self.assertIsNotNone(m, "no summary line: %r" % err)
        self.assertEqual(m.group(1), "length")
        self.assertGreater(int(m.group(2)), 0)
        self.assertEqual(int(m.group(3)), 12)


HOST_PORT = r"(?:\d{1,3}\.){3}\d{1,3}:\d+|localhost:\d+|\[[0-9a-fA-F:]+\]:\d+"


class ClusterCommandTest(unittest.TestCase):
    def start_cluster_command(self, extra=()):
        """Starts `moemesh cluster` (2 expert workers); returns (Proc, ready line, router address).

        The command takes --port for the router and the ports after it for the other processes;
        if one of those was taken meanwhile it exits, and this tries another port (3 tries).
        """
        last = None
        for _ in range(3):
            port = free_port()
            logs = tempfile.mkdtemp(prefix="moemesh-cluster-", dir=_LOG_ROOT)
            p = Proc("moemesh-cluster", [MOEMESH, "cluster", "--model=" + PYDOC,
                                         "--expert_workers=2", "--port=%d" % port, "--threads=1",
                                         "--log_dir=" + logs] + list(extra))
            try:
                line = p.wait_for(r"^.*\bready\b.*$", stream="out").group(0)
            except AssertionError as e:
                p.stop()
                last = e
                # Its processes' logs (attention.log, ...) say why one did not start.
                said = _tail(p.err_path) + _tail(p.out_path) + "".join(
                    _tail(os.path.join(logs, f)) for f in os.listdir(logs))
                if p.p.poll() is not None and re.search(r"in use|cannot listen|bind", said):
                    continue
                raise
            m = (re.search(r"router\D*?(%s)" % HOST_PORT, line) or
                 re.search(r"(%s)" % HOST_PORT, line))
            self.assertIsNotNone(m, "no router address in the ready line %r" % line)
            p.logs = logs
            return p, line, m.group(1)
        raise last

    @contextlib.contextmanager
    def explained(self, p):
        """Stops `moemesh cluster` `p` at the end; an assertion that fails inside gets its output
        and its processes' logs."""
        try:
            yield
        except AssertionError as e:
            children = "".join("\n--- %s:\n%s" % (f, _tail(os.path.join(p.logs, f), 1500))
                               for f in sorted(os.listdir(p.logs)))
            raise AssertionError("%s%s%s" % (e, p.describe(), children)) from None
        finally:
            p.stop()

    def test_moemesh_cluster_serves_and_stops_on_sigint(self):
        p, line, addr = self.start_cluster_command(extra=["--attention_workers=2"])
        with self.explained(p):
            # The processes of the cluster: everything the command started.
            kids = descendants(p.pid)
            p.extra_pids = list(kids)
            self.assertGreaterEqual(len(kids), 6, "expected encoder, 2 expert workers, 2 "
                                    "attention workers and router under pid %d, found %r"
                                    % (p.pid, kids))
            m = re.search(r"attention (%s), (%s)," % (HOST_PORT, HOST_PORT), line)
            self.assertIsNotNone(m, "two attention workers in the ready line %r" % line)
            wait_healthy(addr, proc=p)
            with grpc.insecure_channel(addr) as ch:
                stub = pb2_grpc.GenerationStub(ch)
                for ids, greedy in PYDOC_CASES[:2]:
                    self.assertEqual(greedy_ids(stub, ids, len(greedy)), greedy)
                info = stub.GetModelInfo(pb2.GetModelInfoRequest(), timeout=10)
                self.assertEqual(sorted(w.address for w in info.workers if w.role == "attention"),
                                 sorted(m.groups()))
            p.extra_pids = sorted(set(p.extra_pids) | set(descendants(p.pid)))
            # A stream in flight at SIGINT finishes whole: the router drains before the workers
            # are stopped.
            ids, want = PYDOC_CASES[0]
            ch = grpc.insecure_channel(addr)
            bg = Background(lambda: generate(pb2_grpc.GenerationStub(ch), make_request(ids, 600)))

            def active():
                n = 0
                for a in m.groups():
                    with grpc.insecure_channel(a) as ach:
                        n += wpb2_grpc.AttentionStub(ach).GetStats(
                            wpb2.StatsRequest(), timeout=10).active_sequences
                return n
            poll_until(lambda: active() == 1, 30, interval=0.05)
            os.kill(p.pid, signal.SIGINT)  # to the command only, as `kill -INT PID` does
            got = bg.join()
            ch.close()
            self.assertEqual(len(got.ids), 600)
            self.assertEqual(got.ids[:len(want)], want)
            try:
                rc = p.p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.fail("moemesh cluster still running 30 s after SIGINT")
            poll_until(lambda: not any(alive(k) for k in p.extra_pids), 5)
            left = [k for k in p.extra_pids if alive(k)]
            self.assertEqual(left, [], "processes of the cluster still running after SIGINT")
            self.assertIn(rc, (0, 130, -signal.SIGINT), "exit status after SIGINT")
            self.assertFalse(health_ok(addr, timeout=1), "the router still answers")

    @staticmethod
    def pid_of(p, binary, *args):
        """The pid of the process under `moemesh cluster` `p` running `binary` with `args`."""
        for k in descendants(p.pid):
            try:
                with open("/proc/%d/cmdline" % k, "rb") as f:
                    argv = f.read().decode().split("\0")
            except OSError:
                continue
            if argv[0].endswith(binary) and all(a in argv for a in args):
                return k
        return None

    @staticmethod
    def out_of_service(p):
        """The failed steps the router of `moemesh cluster` `p` logged so far."""
        with open(os.path.join(p.logs, "router.log")) as f:
            return f.read().count("is out of service")

    def streams_through(self, stub, fault, what):
        """Three greedy streams; `fault()` at their first token. Each must give the reference ids.
        Returns the longest pause between two of a stream's responses (s)."""
        first = threading.Event()

        def run(ids, n):
            out = Result()
            out.stall, last = 0.0, None
            for resp in stub.Generate(make_request(ids, n), timeout=120):
                out.ids.extend(resp.ids)
                now = time.monotonic()
                out.stall = max(out.stall, now - (last or now))
                last = now
                first.set()
            return out

        jobs = [Background(lambda ids=ids, g=g: run(ids, len(g))) for ids, g in PYDOC_CASES[:3]]
        self.assertTrue(first.wait(60), "no token streamed")
        fault()
        stall = 0.0
        for i, (j, (_, greedy)) in enumerate(zip(jobs, PYDOC_CASES)):
            got = j.join(timeout=180)
            self.assertEqual(got.ids, greedy, "%s: prompt %d" % (what, i))
            stall = max(stall, got.stall)
        return stall

    # The worker processes of `moemesh cluster`: (name, binary, arguments that tell it apart).
    WORKERS = [("expert1", "/expert_worker", ["--index=1"]),
               ("attention", "/attention_worker", []),
               ("encoder", "/encoder_worker", [])]

    def workers_of(self, p):
        """(name, binary, args, pid) of each of WORKERS, which must be running under `p`."""
        for name, binary, args in self.WORKERS:
            pid = self.pid_of(p, binary, *args)
            self.assertIsNotNone(pid, "no %s process under %d" % (name, p.pid))
            yield name, binary, args, pid

    def assert_given(self, p, flag, *binaries):
        """`moemesh cluster` `p` passed `flag` to its processes running `binaries`."""
        for binary in binaries:
            self.assertIsNotNone(self.pid_of(p, binary, flag), "%s not given %s" % (binary, flag))

    def test_killed_processes_start_again_and_lose_no_request(self):
        """SIGKILL an expert worker, then the attention worker, then the encoder of a running
        `moemesh cluster`, each at the first token of three greedy streams: the command starts
        the process again on its address, the router keeps the streams' requests queued until
        the attention worker can serve a step again (its GetStats not_ready empty), and every
        stream gives the reference ids. The command passes its router flags
        (--outage_wait_seconds here) to the router. A process that exits a sixth time within a
        minute stops the cluster."""
        p, _, addr = self.start_cluster_command(extra=["--outage_wait_seconds=30"])
        with self.explained(p):
            wait_healthy(addr, proc=p)
            self.assert_given(p, "--outage_wait_seconds=30", "/router")
            ch = grpc.insecure_channel(addr)
            stub = pb2_grpc.GenerationStub(ch)
            for name, binary, args, old in self.workers_of(p):
                failures = self.out_of_service(p)
                stall = self.streams_through(stub, lambda: os.kill(old, signal.SIGKILL),
                                             "%s killed" % name)
                print("%s killed mid-stream: the streams paused %.1f s at most" % (name, stall))
                self.assertGreater(self.out_of_service(p), failures,
                                   "%s killed: no step failed (the streams had ended?)" % name)
                self.assertTrue(
                    poll_until(lambda: (self.pid_of(p, binary, *args) or old) != old, 10),
                    "%s not started again" % name)
                self.assertIn("%s exited (killed by signal 9); starting it again" % name,
                              _tail(p.err_path, 5000))
            ch.close()
            # A process that keeps exiting: after 5 restarts within a minute, the next exit
            # stops the cluster (expert1 was restarted once above).
            for i in range(5):
                old = self.pid_of(p, "/expert_worker", "--index=1")
                self.assertIsNotNone(old, "expert1 not running")
                os.kill(old, signal.SIGKILL)
                if i < 4:  # restarts 2-5
                    self.assertTrue(poll_until(
                        lambda: (self.pid_of(p, "/expert_worker", "--index=1") or old) != old, 10))
            try:
                rc = p.p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.fail("moemesh cluster still running after expert1's 6th exit in a minute")
            self.assertEqual(rc, 1)
            self.assertIn("expert1 exited (killed by signal 9, its 6th exit within a minute); "
                          "stopping the cluster", _tail(p.err_path, 5000))

    def test_stopped_processes_fail_their_calls_within_the_peer_timeout(self):
        """Two attention workers. SIGSTOP an expert worker, then an attention worker, then the
        encoder, each at the first token of three greedy streams: the calls in flight to it (the
        router's steps, the attention workers' expert or encoder calls) fail within
        --peer_timeout (2 s here; the calls' own deadlines are 30 and 60 s), as their keepalive
        pings go unanswered. The router puts the requests back in the queue (or, for the stopped
        attention worker's, moves them to the other); once the process continues (SIGCONT, 3 s
        after the failure), every stream gives the reference ids. While an attention worker is
        stopped, GET /health answers 200 at once: it does not wait for the stopped one."""
        peer = 2.0
        http_addr = "127.0.0.1:%d" % free_port()
        p, _, addr = self.start_cluster_command(
            extra=["--attention_workers=2", "--outage_wait_seconds=60",
                   "--peer_timeout=%g" % peer, "--http_address=" + http_addr])
        router_log = os.path.join(p.logs, "router.log")
        with self.explained(p):
            wait_healthy(addr, proc=p)
            self.assert_given(p, "--peer_timeout=%g" % peer, "/router", "/attention_worker")
            ch = grpc.insecure_channel(addr)
            stub = pb2_grpc.GenerationStub(ch)
            for name, binary, args, pid in self.workers_of(p):
                failures = self.out_of_service(p)
                logged = os.path.getsize(router_log)
                detected, health = [], []

                def stop_then_continue():
                    os.kill(pid, signal.SIGSTOP)
                    t0 = time.monotonic()
                    try:
                        if binary == "/attention_worker":
                            conn = http.client.HTTPConnection(http_addr, timeout=30)
                            conn.request("GET", "/health")
                            r = conn.getresponse()
                            health.append((r.status, r.read().decode(), time.monotonic() - t0))
                            conn.close()
                        failed = poll_until(lambda: self.out_of_service(p) > failures, 20)
                        detected.append(time.monotonic() - t0 if failed else None)
                        time.sleep(3)
                    finally:
                        os.kill(pid, signal.SIGCONT)

                self.streams_through(stub, stop_then_continue, "%s stopped" % name)
                self.assertIsNotNone(detected[0], "%s stopped: no step failed in 20 s" % name)
                print("%s stopped mid-stream: its calls failed after %.1f s" % (name, detected[0]))
                # The ping that goes unanswered is sent within peer/2 s and given peer/2 s;
                # the rest is slack for a loaded machine (the calls' deadlines are 30 s, 60 s).
                self.assertLess(detected[0], 3 * peer, "%s stopped" % name)
                with open(router_log) as f:
                    f.seek(logged)
                    self.assertIn("no answer to a keepalive ping within 1 s (--peer_timeout=2)",
                                  f.read(), "%s stopped" % name)
                self.assertEqual(self.pid_of(p, binary, *args), pid, "%s was restarted" % name)
                if health:
                    status, text, seconds = health[0]
                    print("GET /health with an attention worker stopped: %d in %.2f s"
                          % (status, seconds))
                    self.assertEqual((status, text), (200, "ok\n"))
                    # Asked one after the other, the stopped worker's 5 s deadline came first.
                    self.assertLess(seconds, 2.5)
            ch.close()
        # A timeout too short for the servers' ping limit is refused.
        res = subprocess.run([MOEMESH, "cluster", "--model=" + PYDOC, "--peer_timeout=0.2"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        self.assertEqual(res.returncode, 2)
        self.assertIn("--peer_timeout must be 0 (off) or at least 0.5 s, not 0.2",
                      res.stderr.decode())

    def test_a_killed_router_leaves_no_kv_cache_taken(self):
        """SIGKILL the router while three streams run: their clients get UNAVAILABLE, and
        `moemesh cluster` starts the router again on its address. Its sequence ids do not reuse
        the dead router's, and, being the same router (--router_name: host and address), it has
        the attention worker free the sequences its killed run left before it serves, rather
        than after --idle_sequence_seconds (600 s here): no KV cache row is taken once it is
        up, and after a request through it. A second router started on the address while the
        first serves stops (the port is in use) and frees nothing."""
        p, line, addr = self.start_cluster_command()
        m = re.search(r"attention (%s)" % HOST_PORT, line)
        self.assertIsNotNone(m, "no attention address in the ready line %r" % line)
        with self.explained(p), grpc.insecure_channel(m.group(1)) as ach:
            attention = wpb2_grpc.AttentionStub(ach)

            def stats():
                return attention.GetStats(wpb2.StatsRequest(), timeout=10)

            wait_healthy(addr, proc=p)
            router = self.pid_of(p, "/router")
            ch = grpc.insecure_channel(addr)
            stub = pb2_grpc.GenerationStub(ch)
            first = threading.Event()

            def run(ids):
                try:
                    for _ in stub.Generate(make_request(ids, 500), timeout=120):
                        first.set()
                except grpc.RpcError as e:
                    return e.code()
                return grpc.StatusCode.OK

            jobs = [Background(lambda ids=ids: run(ids)) for ids, _ in PYDOC_CASES[:3]]
            self.assertTrue(first.wait(60), "no token streamed")
            self.assertTrue(poll_until(lambda: stats().active_sequences == 3, 30))
            # A second router on the running one's address (its name too) stops, the port in
            # use, before it frees anything of the first's.
            second = subprocess.run(
                [ROUTER, "--config=" + os.path.join(p.logs, "cluster.textproto")],
                capture_output=True, text=True, timeout=120)
            self.assertNotEqual(second.returncode, 0, second.stderr)
            self.assertIn("in use", second.stderr)
            self.assertEqual((stats().stale_released_sequences, stats().active_sequences), (0, 3))
            os.kill(router, signal.SIGKILL)
            for j in jobs:
                self.assertEqual(j.join(timeout=60), grpc.StatusCode.UNAVAILABLE)
            ch.close()
            taken = stats().kv_used_tokens
            self.assertGreater(taken, 0, "the dead router's sequences left no rows?")
            self.assertTrue(poll_until(
                lambda: (self.pid_of(p, "/router") or router) != router, 10),
                "the router was not started again")
            wait_healthy(addr, proc=p)
            s = stats()
            self.assertEqual((s.stale_released_sequences, s.idle_released_sequences), (3, 0))
            self.assertEqual((s.active_sequences, s.kv_used_tokens), (0, 0),
                             "rows still taken (%d before)" % taken)
            with grpc.insecure_channel(addr) as ch2:
                ids, greedy = PYDOC_CASES[0]
                self.assertEqual(greedy_ids(pb2_grpc.GenerationStub(ch2), ids, len(greedy)),
                                 greedy)
            # The router releases a finished sequence right after its last token goes out.
            self.assertTrue(poll_until(lambda: stats().kv_used_tokens == 0, 10))
            self.assertEqual(stats().stale_released_sequences, 3)
            with open(os.path.join(p.logs, "attention.log")) as f:
                self.assertIn("released 3 sequences of router ", f.read())

    def test_dummy_weights_are_the_same_model_in_every_process(self):
        """--load_format=dummy makes each tensor from its name alone: `moemesh cluster` passes the
        flags to its 5 processes, and they serve the same model as `moemesh serve`."""
        flags = ["--load_format=dummy", "--num_layers=3"]
        ids = heldout_ids()[:20]
        p, _, addr = self.start_cluster_command(flags)
        with self.explained(p):
            wait_healthy(addr, proc=p)
            with grpc.insecure_channel(addr) as ch:
                stub = pb2_grpc.GenerationStub(ch)
                info = stub.GetModelInfo(pb2.GetModelInfoRequest(), timeout=10)
                self.assertEqual(info.num_layers, 3)
                from_cluster = greedy_ids(stub, ids, 12)
        s, saddr = start_serve(PYDOC, "serve-dummy", flags)
        try:
            with grpc.insecure_channel(saddr) as ch:
                from_serve = greedy_ids(pb2_grpc.GenerationStub(ch), ids, 12)
        finally:
            s.stop()
        self.assertEqual(len(from_cluster), 12)
        self.assertEqual(from_cluster, from_serve)

    def test_generate_runs_the_switch_encoder_decoder(self):
        """`moemesh generate` on the switch_transformers oracle: the prompt's text, tokenised and
        encoded, decodes greedily to transformers' ids; a sampling request is refused by name."""
        model_dir = os.path.join(ORACLE, "switch")
        with open(os.path.join(model_dir, "reference.json")) as f:
            ref = json.load(f)
        for case in ref:
            out = subprocess.run(
                [MOEMESH, "generate", "--model=" + model_dir, "--prompt=" + case["prompt"],
                 "--greedy", "--max_new_tokens=%d" % (len(case["greedy"]) - 1)],
                capture_output=True, text=True, timeout=CALL_TIMEOUT)
            self.assertEqual(out.returncode, 0, out.stderr[-2000:])
            got = json.loads(out.stdout)
            self.assertEqual(got["prompt_tokens"], len(case["input_ids"]))
            self.assertEqual(got["ids"], case["greedy"][1:])  # after decoder_start_token_id
        bad = subprocess.run([MOEMESH, "generate", "--model=" + model_dir, "--input_ids=5,6",
                              "--greedy", "--temperature=0.7", "--max_new_tokens=2"],
                             capture_output=True, text=True, timeout=CALL_TIMEOUT)
        self.assertEqual(bad.returncode, 1)
        self.assertIn("--temperature", bad.stderr)

    def test_a_load_out_of_memory_is_a_clear_error(self):
        """Two layers of Qwen3-30B-A3B's shape (~2.4 GB of packed bf16 weights) in a process
        limited to 1.5 GiB of address space: a one-line error and exit status 1, not a crash."""
        import resource
        limit = 1536 << 20

        def limit_memory():
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

        p = subprocess.run(
            [MOEMESH, "generate", "--model=" + os.path.join(ROOT, "models", "configs", "qwen3-30b-a3b"),
             "--load_format=dummy", "--num_layers=2", "--compute_dtype=bf16", "--input_ids=1,2",
             "--max_new_tokens=1"],
            capture_output=True, text=True, timeout=300, preexec_fn=limit_memory)
        self.assertEqual(p.returncode, 1, p.stderr[-2000:])
        self.assertRegex(p.stderr, r"no memory|out of memory")


if __name__ == "__main__":
    unittest.main(verbosity=2)
