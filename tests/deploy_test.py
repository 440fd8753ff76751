#!/usr/bin/python3
"""deploy/kubernetes/moemesh.yaml checked without a Kubernetes cluster.

Static: every Service selects one workload and targets its container ports; headless Services
name their StatefulSets; every flag a container passes is one its binary accepts (its
--helpfull); every peer address names a Service (or a StatefulSet pod of one) on a port it
serves; the expert StatefulSet's replicas, its --even_share and the attention worker's --experts
agree; probes hit container ports.

Live: the manifest's containers run as local processes, all started at once and in reverse
order (router first, as Kubernetes may), with their own arguments except that each pod's
addresses become free ports on 127.0.0.1, /opt/moemesh paths the repository's and $(POD_INDEX)
the pod's index. The router's HTTP API must then answer a completion with the same text as
`moemesh generate` and a health probe.

Environment: MOEMESH_BIN_DIR (bazel-bin), run from the repository root.
"""
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest

import yaml

ROOT = os.getcwd()
BIN = os.environ.get("MOEMESH_BIN_DIR", os.path.join(ROOT, "bazel-bin"))
MANIFEST = os.path.join(ROOT, "deploy", "kubernetes", "moemesh.yaml")
BINARIES = {
    "router": "router/router",
    "encoder_worker": "encoder_worker/encoder_worker",
    "expert_worker": "expert_worker/expert_worker",
    "attention_worker": "attention_worker/attention_worker",
    "moemesh": "tools/moemesh",
}
# Flags whose values name peers as HOST:PORT[,HOST:PORT...].
PEER_FLAGS = ("encoder", "experts", "attention")
# Flags whose values are this pod's own listening address.
LISTEN_FLAGS = ("address", "http_address")


def load():
    with open(MANIFEST) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    workloads = {d["metadata"]["name"]: d for d in docs
                 if d["kind"] in ("Deployment", "StatefulSet")}
    return services, workloads


def container(w):
    cs = w["spec"]["template"]["spec"]["containers"]
    assert len(cs) == 1, w["metadata"]["name"]
    return cs[0]


def flags(args):
    """{name: value} of --name=value arguments."""
    out = {}
    for a in args:
        m = re.match(r"--([a-z_]+)=(.*)$", a)
        assert m, "argument %r is not --name=value" % a
        out[m.group(1)] = m.group(2)
    return out


def selects(service, workload):
    sel = service["spec"].get("selector", {})
    labels = workload["spec"]["template"]["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in sel.items())


def split_peer(hostport):
    """(service, pod or None, port) of a peer address: SERVICE:PORT or POD.SERVICE:PORT (a
    StatefulSet pod by its headless Service)."""
    host, port = hostport.rsplit(":", 1)
    parts = host.split(".")
    assert len(parts) <= 2, hostport
    return parts[-1], (parts[0] if len(parts) == 2 else None), int(port)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ManifestTest(unittest.TestCase):
    def setUp(self):
        self.services, self.workloads = load()

    def owner(self, service_name):
        """The one workload a Service selects."""
        svc = self.services[service_name]
        owners = [w for w in self.workloads.values() if selects(svc, w)]
        self.assertEqual(len(owners), 1, "service %s selects %d workloads"
                         % (service_name, len(owners)))
        return owners[0]

    def resolve(self, hostport):
        """(workload, pod index or None, port) a peer address names."""
        svc_name, pod, port = split_peer(hostport)
        self.assertIn(svc_name, self.services, hostport)
        w = self.owner(svc_name)
        index = None
        if pod is not None:  # <statefulset>-<i>.<headless service>
            self.assertEqual(w["kind"], "StatefulSet", hostport)
            self.assertEqual(w["spec"]["serviceName"], svc_name, hostport)
            prefix = w["metadata"]["name"] + "-"
            self.assertTrue(pod.startswith(prefix), hostport)
            index = int(pod[len(prefix):])
            self.assertLess(index, w["spec"]["replicas"], hostport + ": no such pod")
        svc_ports = {p["port"]: p["targetPort"] for p in self.services[svc_name]["spec"]["ports"]}
        self.assertIn(port, svc_ports, "%s: service %s has no port %d" % (hostport, svc_name, port))
        container_ports = [p["containerPort"] for p in container(w).get("ports", [])]
        self.assertIn(svc_ports[port], container_ports, hostport)
        return w, index, svc_ports[port]

    def test_services_select_one_workload_on_its_ports(self):
        for name, svc in self.services.items():
            w = self.owner(name)
            ports = [p["containerPort"] for p in container(w)["ports"]]
            for p in svc["spec"]["ports"]:
                self.assertIn(p["targetPort"], ports, name)
            if w["kind"] == "StatefulSet":
                self.assertEqual(svc["spec"].get("clusterIP"), "None", name)
                self.assertEqual(w["spec"]["serviceName"], name)

    def test_flags_are_the_binaries_flags(self):
        for name, w in self.workloads.items():
            c = container(w)
            binary = os.path.basename(c["command"][0])
            self.assertEqual(c["command"][0], "/opt/moemesh/bin/" + binary)
            self.assertIn(binary, BINARIES, name)
            helpfull = subprocess.run([os.path.join(BIN, BINARIES[binary]), "--helpfull"],
                                      capture_output=True, text=True, timeout=60)
            known = set(re.findall(r"^\s+--([a-z_0-9]+) \(", helpfull.stdout + helpfull.stderr,
                                   re.M))
            self.assertIn("model", known, binary)
            for flag in flags(c.get("args", [])):
                self.assertIn(flag, known, "%s: %s has no --%s" % (name, binary, flag))
            # Listening addresses are this pod's own ports.
            ports = [p["containerPort"] for p in c["ports"]]
            for flag in LISTEN_FLAGS:
                if flag in flags(c["args"]):
                    host, port = flags(c["args"])[flag].rsplit(":", 1)
                    self.assertEqual(host, "0.0.0.0", "%s --%s" % (name, flag))
                    self.assertIn(int(port), ports, "%s --%s" % (name, flag))
            for probe in ("readinessProbe", "livenessProbe"):
                p = c.get(probe)
                if p:
                    port = (p.get("grpc") or p.get("httpGet"))["port"]
                    self.assertIn(port, ports, "%s %s" % (name, probe))

    def test_peers_name_services_and_the_expert_shares_agree(self):
        expert_pods = set()
        for name, w in self.workloads.items():
            f = flags(container(w).get("args", []))
            for flag in PEER_FLAGS:
                for addr in f.get(flag, "").split(","):
                    if not addr:
                        continue
                    target, index, _ = self.resolve(addr)
                    if flag == "experts":
                        self.assertEqual(os.path.basename(container(target)["command"][0]),
                                         "expert_worker", addr)
                        expert_pods.add(index)
        experts = [w for w in self.workloads.values()
                   if os.path.basename(container(w)["command"][0]) == "expert_worker"]
        self.assertEqual(len(experts), 1)
        replicas = experts[0]["spec"]["replicas"]
        share = flags(container(experts[0])["args"])["even_share"]
        self.assertEqual(share, "$(POD_INDEX)/%d" % replicas)
        self.assertEqual(expert_pods, set(range(replicas)), "attention --experts vs replicas")
        env = {e["name"]: e for e in container(experts[0]).get("env", [])}
        self.assertEqual(env["POD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"],
                         "metadata.labels['apps.kubernetes.io/pod-index']")


class ManifestRunsLocallyTest(unittest.TestCase):
    def test_the_manifests_processes_serve_a_completion(self):
        services, workloads = load()
        # Pods: (workload name, index); each container port gets a local one.
        pods = []
        for name, w in workloads.items():
            for i in range(w["spec"]["replicas"]):
                pods.append((name, i))
        local = {(n, i, p["containerPort"]): free_port()
                 for n, i in pods for p in container(workloads[n])["ports"]}

        def owner(svc_name):
            return [n for n, w in workloads.items() if selects(services[svc_name], w)][0]

        def peer(hostport):
            svc_name, pod, port = split_peer(hostport)
            target = {p["port"]: p["targetPort"]
                      for p in services[svc_name]["spec"]["ports"]}[port]
            name = owner(svc_name)
            index = int(pod[len(name) + 1:]) if pod is not None else 0
            return "127.0.0.1:%d" % local[(name, index, target)]

        logs = tempfile.mkdtemp(prefix="moemesh-deploy-test-")
        procs = []
        http_addr = None
        try:
            # Reverse order: the router first, the encoder last; each waits for its peers.
            for name, i in reversed(pods):
                c = container(workloads[name])
                argv = [os.path.join(BIN, BINARIES[os.path.basename(c["command"][0])])]
                for flag, value in flags(c["args"]).items():
                    value = value.replace("$(POD_INDEX)", str(i))
                    value = value.replace("/opt/moemesh/models/", os.path.join(ROOT, "models", ""))
                    if flag in LISTEN_FLAGS:
                        port = local[(name, i, int(value.rsplit(":", 1)[1]))]
                        value = "127.0.0.1:%d" % port
                        if flag == "http_address":
                            http_addr = value
                    elif flag in PEER_FLAGS:
                        value = ",".join(peer(a) for a in value.split(","))
                    elif flag == "threads":
                        value = "1"  # four processes on this 2-core machine
                    argv.append("--%s=%s" % (flag, value))
                with open(os.path.join(logs, "%s-%d.log" % (name, i)), "w") as log:
                    procs.append((name, subprocess.Popen(argv, stdout=log, stderr=log)))
            self.assertIsNotNone(http_addr)
            prompt = "def read_file(path):"
            deadline = time.time() + 180
            while True:
                for name, p in procs:
                    if p.poll() is not None:
                        self.fail("%s exited (%d); logs in %s" % (name, p.returncode, logs))
                try:
                    conn = http.client.HTTPConnection(http_addr, timeout=60)
                    conn.request("GET", "/health")
                    if conn.getresponse().status == 200:
                        break
                except OSError:
                    pass
                self.assertLess(time.time(), deadline, "no /health in 180 s; logs in " + logs)
                time.sleep(0.3)
            conn = http.client.HTTPConnection(http_addr, timeout=120)
            conn.request("POST", "/v1/completions",
                         body=json.dumps({"model": "pydoc-moe-17m", "prompt": prompt,
                                          "max_tokens": 12, "temperature": 0,
                                          "ignore_eos": True}))
            r = conn.getresponse()
            got = json.loads(r.read())
            self.assertEqual(r.status, 200, got)
            want = subprocess.run(
                [os.path.join(BIN, "tools/moemesh"), "generate", "--model=" +
                 os.path.join(ROOT, "models", "pydoc-moe-17m"), "--prompt=" + prompt,
                 "--greedy", "--ignore_eos", "--max_new_tokens=12", "--threads=1"],
                capture_output=True, text=True, timeout=120, check=True)
            self.assertEqual(got["choices"][0]["text"], json.loads(want.stdout)["text"])
            shutil.rmtree(logs)  # kept when the test fails
        finally:
            for _, p in procs:
                if p.poll() is None:
                    p.terminate()
            for _, p in procs:
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()


if __name__ == "__main__":
    unittest.main(verbosity=2)
