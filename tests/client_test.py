#!/usr/bin/python3
"""Tests the clients (scripts/client.py and, when MOEMESH_CLIENT_BIN is set, tools/moemesh_client)
against a fake moemesh.v1.Generation server running in-process.

  /usr/bin/python3 tests/client_test.py                                   # Python client only
  MOEMESH_CLIENT_BIN=bazel-bin/tools/moemesh_client /usr/bin/python3 tests/client_test.py

Under Bazel: `bazel test //tests:client_test` (tests/client_test.sh sets the environment).
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import unittest
from concurrent import futures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENT_PY = os.path.join(ROOT, "scripts", "client.py")
CLIENT_BIN = os.environ.get("MOEMESH_CLIENT_BIN", "")
if CLIENT_BIN and not os.path.isabs(CLIENT_BIN):
    CLIENT_BIN = os.path.abspath(CLIENT_BIN)


def _load_client_module():
    spec = importlib.util.spec_from_file_location("moemesh_client_py", CLIENT_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


client_mod = _load_client_module()
pb2, pb2_grpc = client_mod.load_stubs()

import grpc  # noqa: E402  (after the stubs: same grpc either way, but keeps the import order clear)

CHUNKS = ["Hel", "lo", " world"]
PROMPT_TOKENS = 4
SAMPLING_OPTIONAL = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty", "seed", "max_tokens", "ignore_eos",
                     "logprobs", "experts_per_token")


class FakeGeneration(pb2_grpc.GenerationServicer):
    """Answers Generate with 3 fixed chunks and a final response; records every request.

    A prompt of "bad" gets INVALID_ARGUMENT; "midway-error" fails after the first chunk.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = []

    def _record(self, req):
        with self.lock:
            self.requests.append(req)

    def Generate(self, request, context):
        self._record(request)
        if request.WhichOneof("input") == "text" and request.text == "bad":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "temperature must be >= 0")
        for i, chunk in enumerate(CHUNKS):
            resp = pb2.GenerateResponse(ids=[100 + i], text=chunk)
            if request.sampling.HasField("logprobs"):
                lp = resp.logprobs.add()
                lp.chosen.id, lp.chosen.logprob, lp.chosen.text = 100 + i, -0.5, chunk
                lp.top.add(id=100 + i, logprob=-0.5, text=chunk)
            yield resp
            if i == 0 and request.text == "midway-error":
                context.abort(grpc.StatusCode.INTERNAL, "worker lost")
        yield pb2.GenerateResponse(finish_reason=pb2.FINISH_REASON_LENGTH,
                                   prompt_tokens=PROMPT_TOKENS, completion_tokens=len(CHUNKS))

    def Tokenize(self, request, context):
        self._record(request)
        return pb2.TokenizeResponse(ids=[ord(c) for c in request.text])

    def Detokenize(self, request, context):
        self._record(request)
        return pb2.DetokenizeResponse(text="".join(chr(i) for i in request.ids))

    def GetModelInfo(self, request, context):
        self._record(request)
        info = pb2.ModelInfo(family="qwen3_moe", num_layers=2, hidden_size=64, vocab_size=512,
                             num_experts=8, experts_per_token=2, max_context=1024, version="test")
        info.workers.add(role="router", address="127.0.0.1:1", device="cpu")
        return info


class ClientTestBase:
    """Shared cases; subclasses say how to run the client (cmd) and how it passes stop strings."""

    @classmethod
    def setUpClass(cls):
        cls.servicer = FakeGeneration()
        cls.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb2_grpc.add_GenerationServicer_to_server(cls.servicer, cls.server)
        cls.port = cls.server.add_insecure_port("127.0.0.1:0")
        assert cls.port, "could not bind a port"
        cls.server.start()
        cls.addr = "127.0.0.1:%d" % cls.port

    @classmethod
    def tearDownClass(cls):
        cls.server.stop(grace=None).wait()

    def cmd(self):
        raise NotImplementedError

    def run_client(self, *args, expect_rc=0):
        with self.servicer.lock:
            self.servicer.requests.clear()
        argv = self.cmd() + ["--addr=" + self.addr, "--timeout=20"] + list(args)
        res = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        out = res.stdout.decode("utf-8")
        err = res.stderr.decode("utf-8", errors="replace")
        if expect_rc is not None:
            self.assertEqual(res.returncode, expect_rc,
                             "argv=%r\nstdout=%r\nstderr=%r" % (argv, out, err))
        return res.returncode, out, err

    def last_request(self):
        with self.servicer.lock:
            self.assertEqual(len(self.servicer.requests), 1)
            return self.servicer.requests[0]

    def summary(self, err):
        m = re.search(r"^\[finish=(\w+) prompt_tokens=(\d+) completion_tokens=(\d+) "
                      r"tok/s=([0-9.]+(?:e[+-]?\d+)?|inf)\]$", err, re.M)
        self.assertIsNotNone(m, "no summary line in stderr: %r" % err)
        return m.group(1), int(m.group(2)), int(m.group(3))

    # --- generate -----------------------------------------------------------------------------

    def test_streams_text_and_summary(self):
        _, out, err = self.run_client("Say hello")
        self.assertEqual(out, "Hello world\n")
        self.assertEqual(self.summary(err), ("length", PROMPT_TOKENS, len(CHUNKS)))
        req = self.last_request()
        self.assertEqual(req.WhichOneof("input"), "text")
        self.assertEqual(req.text, "Say hello")

    def test_only_given_sampling_fields_are_set(self):
        self.run_client("--temperature", "0.5", "--seed", "3", "Say hello")
        s = self.last_request().sampling
        self.assertTrue(s.HasField("temperature"))
        self.assertAlmostEqual(s.temperature, 0.5)
        self.assertTrue(s.HasField("seed"))
        self.assertEqual(s.seed, 3)
        # max_tokens is the one field the clients always send: their documented default, 64.
        self.assertTrue(s.HasField("max_tokens"))
        self.assertEqual(s.max_tokens, 64)
        for name in SAMPLING_OPTIONAL:
            if name not in ("temperature", "seed", "max_tokens"):
                self.assertFalse(s.HasField(name), "%s should be unset" % name)
        self.assertEqual(list(s.stop), [])
        self.assertEqual(list(s.stop_token_ids), [])

    def test_defaults_leave_sampling_unset(self):
        self.run_client("--max_tokens=0", "Say hello")
        s = self.last_request().sampling
        for name in SAMPLING_OPTIONAL:
            self.assertFalse(s.HasField(name), "%s should be unset" % name)

    def test_all_sampling_flags(self):
        self.run_client("--max_tokens=7", "--temperature=0", "--top_p=0.9", "--top_k=5",
                        "--experts_per_token=1", "--logprobs=2", *self.stop_args(["###", "END"]),
                        "Say hello")
        s = self.last_request().sampling
        self.assertEqual(s.max_tokens, 7)
        self.assertTrue(s.HasField("temperature"))  # 0 (greedy) is set, not unset
        self.assertEqual(s.temperature, 0.0)
        self.assertAlmostEqual(s.top_p, 0.9, places=6)
        self.assertEqual(s.top_k, 5)
        self.assertEqual(s.experts_per_token, 1)
        self.assertEqual(s.logprobs, 2)
        self.assertEqual(list(s.stop), ["###", "END"])
        self.assertFalse(s.HasField("seed"))
        self.assertEqual(s.response_format, pb2.RESPONSE_FORMAT_TEXT)
        self.run_client("--json_object", "Say hello")
        self.assertEqual(self.last_request().sampling.response_format,
                         pb2.RESPONSE_FORMAT_JSON_OBJECT)
        schema = '{"type": "object", "properties": {"a": {"type": "integer"}}}'
        self.run_client("--json_schema=" + schema, "Say hello")
        self.assertEqual(self.last_request().sampling.response_format,
                         pb2.RESPONSE_FORMAT_JSON_SCHEMA)
        self.assertEqual(self.last_request().sampling.json_schema, schema)
        self.run_client("--min_tokens=3", "--logit_bias=5:-100,7:2.5", "--priority=-3",
                        "Say hello")
        self.assertEqual(self.last_request().priority, -3)
        s = self.last_request().sampling
        self.assertEqual(s.min_tokens, 3)
        self.assertEqual(dict(s.logit_bias), {5: -100.0, 7: 2.5})
        _, _, err = self.run_client("--logit_bias=5", "x", expect_rc=2)
        self.assertIn("ID:BIAS", err)

    def test_chat_sends_one_user_message(self):
        _, out, err = self.run_client("--chat", "Hi there")
        self.assertEqual(out, "Hello world\n")
        req = self.last_request()
        self.assertEqual(req.WhichOneof("input"), "chat")
        self.assertEqual([(m.role, m.content) for m in req.chat.messages], [("user", "Hi there")])

    def test_utf8_prompt(self):
        self.run_client("héllo → 世界")
        self.assertEqual(self.last_request().text, "héllo → 世界")

    def test_invalid_argument_exits_1(self):
        rc, out, err = self.run_client("bad", expect_rc=1)
        self.assertIn("error: INVALID_ARGUMENT: temperature must be >= 0", err)
        self.assertEqual(out, "")

    def test_error_midway(self):
        rc, out, err = self.run_client("midway-error", expect_rc=1)
        self.assertTrue(out.startswith("Hel"), out)
        self.assertIn("error: INTERNAL: worker lost", err)

    def test_unavailable_server_exits_1(self):
        with socket_closed_port() as port:
            argv = self.cmd() + ["--addr=127.0.0.1:%d" % port, "--timeout=10", "hello"]
            res = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        self.assertEqual(res.returncode, 1)
        self.assertIn("error: UNAVAILABLE: ", res.stderr.decode())

    def test_json_one_object_per_response(self):
        _, out, err = self.run_client("--json", "Say hello")
        lines = [json.loads(l) for l in out.splitlines()]
        self.assertEqual(len(lines), len(CHUNKS) + 1)
        self.assertEqual("".join(l.get("text", "") for l in lines), "Hello world")
        self.assertEqual(lines[0]["ids"], [100])
        self.assertEqual(lines[-1]["finish_reason"], "FINISH_REASON_LENGTH")
        self.assertEqual(lines[-1]["prompt_tokens"], PROMPT_TOKENS)
        self.assertEqual(lines[-1]["completion_tokens"], len(CHUNKS))

    # --- other RPCs ---------------------------------------------------------------------------

    def test_tokenize(self):
        _, out, _ = self.run_client("tokenize", "abc")
        self.assertEqual(out.strip(), "97,98,99")
        self.assertEqual(self.last_request().text, "abc")

    def test_detokenize(self):
        _, out, _ = self.run_client("detokenize", "104,105")
        self.assertEqual(out, "hi\n")
        self.assertEqual(list(self.last_request().ids), [104, 105])

    def test_info(self):
        _, out, _ = self.run_client("info")
        info = json.loads(out)
        self.assertEqual(info["family"], "qwen3_moe")
        self.assertEqual(info["num_experts"], 8)
        self.assertEqual(info["experts_per_token"], 2)
        self.assertEqual(info["workers"][0]["role"], "router")


class socket_closed_port:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""

    def __enter__(self):
        import socket
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        return self.port

    def __exit__(self, *exc):
        return False


class PythonClientTest(ClientTestBase, unittest.TestCase):
    def cmd(self):
        return [sys.executable, CLIENT_PY]

    def stop_args(self, stops):
        return ["--stop=" + s for s in stops]

    def test_executable_with_shebang(self):
        self.assertTrue(os.access(CLIENT_PY, os.X_OK), "scripts/client.py is not executable")
        with open(CLIENT_PY) as f:
            self.assertIn("/usr/bin/python3", f.readline())


@unittest.skipUnless(CLIENT_BIN, "MOEMESH_CLIENT_BIN is not set (path of tools/moemesh_client)")
class CppClientTest(ClientTestBase, unittest.TestCase):
    def cmd(self):
        return [CLIENT_BIN]

    def stop_args(self, stops):
        return ["--stop=" + ",".join(stops)]

    def test_prompt_flag(self):
        _, out, err = self.run_client("--prompt=Say hello")
        self.assertEqual(out, "Hello world\n")
        self.assertEqual(self.last_request().text, "Say hello")


if __name__ == "__main__":
    unittest.main(verbosity=2)
