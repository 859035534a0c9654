"""``make node-e2e``: install, enforce, upgrade, roll back and uninstall the Helm chart on a real node.

Expects ``hack/setup-node.sh`` and ``hack/node-images.sh`` to have run (the make
target runs both). Brings the node up (testbed/node.py), runs the checks,
prints a report and ``N passed, N failed``, takes the node down, and exits 1
if a check failed.

Images: ``--tags`` names the install tag, an upgrade tag of the same code and an
upgrade tag whose image reports another version (``TAG=VERSION``, built by
``hack/node-images.sh`` with the Dockerfile's VERSION build argument); the rollouts
check that the agents report the version of the image they run.

``--reduced`` (what CI runs, tests/integration/node/test_node_e2e.py): install with
default values, one policy ``Enforced`` with probes both ways, and one upgrade to a
second tag (the same image retagged is fine) with probes every 100 ms during the
rollout; two tags. The full flow (``make node-e2e``) adds the connectivity check
before policies, ``helm test``, the upgrade to another version, the rollback and
the uninstall.

Uninstall: the rules stay on the node as last programmed (fail-static, see
docs/install.md "Uninstall"); the e2e checks an allowed and a denied pair after
``helm uninstall`` and that the ClusterPolicyStatus CRD is kept.

Workloads: server pods (TCP 8080 and UDP 8081 answer "ok") and client pods in
namespaces nf-a, nf-b, nf-c, all from the controller image (Python, no other
image needed). Probes are real connections from inside the pods.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from netfence.cli import out
from netfence_lab.cluster import raise_on_signals
from netfence_lab.node import NODE_NETNS, LocalNode, NodeError, default_dir, down, ensure_node_tools
from netfence_lab.tools import ensure_tools, find_repo_root

log = logging.getLogger(__name__)

RELEASE = "netfence"
NAMESPACE = "netfence-system"
IMAGE_REPO = "ghcr.io/netfence/netfence-{target}"
AGENT_HEALTH_PORT = 9799  # the chart's agent.healthPort; the agent serves it on the node's loopback
DEFAULT_TAGS = "0.1.0,0.1.0-b,0.1.0-c=0.1.0+c"  # keep equal to the Makefile's NODE_TAGS
REDUCED_TAGS = "0.1.0,0.1.0-b"  # --reduced: the install tag and an upgrade tag of the same code

SERVER = """
import socket, threading
def udp():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("", 8081))
    while True:
        d, a = u.recvfrom(64); u.sendto(b"ok", a)
threading.Thread(target=udp, daemon=True).start()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", 8080)); s.listen(128)
while True:
    c, _ = s.accept(); c.sendall(b"ok"); c.close()
"""

# argv: ip port proto -> prints allow/deny
PROBE = """
import socket, sys
ip, port, proto = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def probe():
    try:
        if proto == "tcp":
            with socket.create_connection((ip, port), timeout=0.5) as c:
                return c.recv(2) == b"ok"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.settimeout(0.5); u.sendto(b"x", (ip, port)); return u.recv(2) == b"ok"
    except OSError:
        return False
print("allow" if probe() else "deny")
"""

# env TARGETS="name=ip:port/proto,..."; every 100 ms one probe per target (started on time, whatever
# earlier probes still wait for), one JSON line each ("t": when it started), written by one thread
PROBER = """
import json, os, queue, socket, sys, threading, time
targets = [t.split("=") for t in os.environ["TARGETS"].split(",") if t]
results = queue.Queue()
def probe(ip, port, proto):
    try:
        if proto == "tcp":
            with socket.create_connection((ip, int(port)), timeout=1.0) as c:
                return c.recv(2) == b"ok", ""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.settimeout(1.0); u.sendto(b"x", (ip, int(port))); return u.recv(2) == b"ok", ""
    except OSError as exc:
        return False, type(exc).__name__
def one(name, spec, t):
    hostport, proto = spec.split("/"); ip, port = hostport.split(":")
    ok, err = probe(ip, port, proto)
    results.put(json.dumps({"t": t, "target": name, "allow": ok, "err": err, "s": round(time.time() - t, 3)}))
def ticker():
    due = time.monotonic()
    while True:
        now = time.time()
        for name, spec in targets:
            threading.Thread(target=one, args=(name, spec, now), daemon=True).start()
        due += 0.1
        time.sleep(max(0.0, due - time.monotonic()))
threading.Thread(target=ticker, daemon=True).start()
while True:
    sys.stdout.write(results.get() + "\\n"); sys.stdout.flush()
"""


@dataclass
class Report:
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    facts: dict[str, str] = field(default_factory=dict)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append((name, ok, detail))
        out(f"{'PASS' if ok else 'FAIL'}  {name}{('  (' + detail + ')') if detail else ''}")
        return ok

    def run(self, name: str, func: Callable[[], str]) -> bool:
        start = time.monotonic()
        try:
            detail = func()
        except Exception as exc:  # a failed step is a failed check, the run goes on
            return self.check(name, False, f"{type(exc).__name__}: {str(exc).strip()[-600:]}")
        return self.check(name, True, f"{detail}, {time.monotonic() - start:.1f}s" if detail
                          else f"{time.monotonic() - start:.1f}s")

    def summary(self) -> str:
        passed = sum(1 for _, ok, _ in self.checks if ok)
        return f"{passed} passed, {len(self.checks) - passed} failed"


def pod(name: str, ns: str, labels: dict[str, str], image: str, script: str,
        env: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "main", "image": image, "imagePullPolicy": "Never",
                "command": ["python", "-c", script],
                "env": [{"name": k, "value": v} for k, v in (env or {}).items()],
            }],
        },
    }


POLICIES: list[dict[str, Any]] = [
    {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
     "metadata": {"name": "default-deny", "namespace": "nf-b"},
     "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}},
    {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
     "metadata": {"name": "allow-clients-of-a", "namespace": "nf-b"},
     "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"],
              "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "nf-a"}},
                                     "podSelector": {"matchLabels": {"role": "client"}}}],
                           "ports": [{"protocol": "TCP", "port": 8080}]}]}},
]
REDUCED_POLICY = POLICIES[1]
MID_ROLLOUT_POLICY: dict[str, Any] = {
    "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
    "metadata": {"name": "only-own-namespace", "namespace": "nf-a"},
    "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"],
             "ingress": [{"from": [{"podSelector": {}}]}]},
}


class RuleWatch:
    """Netfence's rules and sets in the node's kernel, sampled in a thread (every ``interval``
    s, as fast as iptables-save allows under load): the distinct states in the order they
    appeared, each as ``<rules>r/<members>m@+<seconds>s`` (``since``: the time 0)."""

    def __init__(self, since: float, interval: float = 0.2):
        self.since = since
        self.interval = interval
        self._stop = threading.Event()
        self._states: list[str] = []
        self._thread = threading.Thread(target=self._run, name="rule-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(timeout=30)
        return self._states

    @staticmethod
    def sample() -> tuple[int, int, str] | None:
        """Rules (lines naming a Netfence chain, counters dropped), set members, and a digest of both."""
        try:
            rules = subprocess.run(["ip", "netns", "exec", NODE_NETNS, "iptables-save", "-t", "filter"],
                                   capture_output=True, text=True, timeout=10, check=True).stdout
            sets = subprocess.run(["ip", "netns", "exec", NODE_NETNS, "ipset", "save"],
                                  capture_output=True, text=True, timeout=10, check=True).stdout
        except (subprocess.SubprocessError, OSError):
            return None
        ours = [line for line in rules.splitlines() if line.startswith("-A") and " nf-" in line]
        members = sorted(line for line in sets.splitlines() if line.startswith("add nf"))
        text = "\n".join(ours + members)
        return len(ours), len(members), hashlib.sha256(text.encode()).hexdigest()

    def _run(self) -> None:
        last = ""
        while not self._stop.is_set():
            found = self.sample()
            if found is not None and found[2] != last:
                last = found[2]
                self._states.append(f"{found[0]}r/{found[1]}m@+{time.time() - self.since:.1f}s")
            self._stop.wait(self.interval)


class E2E:
    def __init__(self, node: LocalNode, chart: Path, tags: tuple[str, str], report: Report,
                 policies: list[dict[str, Any]] | None = None):
        self.node = node
        self.chart = chart
        self.tags = tags
        self.report = report
        # the installed policies: all of POLICIES, or (--reduced) REDUCED_POLICY alone, which gives
        # the same verdicts (it isolates nf-b/server, admitting nf-a's clients on TCP 8080 only)
        self.installed_policies = POLICIES if policies is None else policies
        self.ips: dict[str, str] = {}
        self.probes_checked = 0

    def k(self, *args: str, input: str | None = None, timeout: float = 180) -> str:
        return self.node.kubectl(*args, input=input, timeout=timeout).stdout

    def helm(self, *args: str, timeout: float = 600) -> str:
        res = subprocess.run([str(self.node.tools.helm), *args], capture_output=True, text=True,
                             env=self.node.cluster.env(), timeout=timeout, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"helm {' '.join(args)} exited {res.returncode}: {res.stderr.strip()}")
        return res.stdout

    def values(self, tag: str) -> list[str]:
        return [
            "--set", f"controller.image.tag={tag}", "--set", f"agent.image.tag={tag}",
            "--set", "controller.image.pullPolicy=Never", "--set", "agent.image.pullPolicy=Never",
            "--set", "etcd.image.pullPolicy=Never",
            # one node, no storage provisioner: the bundled etcd keeps its data in an emptyDir
            "--set", "etcd.persistence.enabled=false",
        ]

    # -- steps ---------------------------------------------------------------------------------
    def install(self) -> str:
        self.helm("install", RELEASE, str(self.chart), "-n", NAMESPACE, "--create-namespace",
                  *self.values(self.tags[0]), "--wait", "--timeout", "10m")
        return "helm install --wait"

    def pods_ready(self) -> str:
        # helm --wait counts a DaemonSet ready at desired - maxUnavailable (0 of 1 on one node):
        # wait for the rollouts themselves, bounded, before judging the pods.
        for kind, part in (("statefulset", "etcd"), ("deployment", "controller"), ("daemonset", "agent")):
            workload = f"{kind}/{RELEASE}-{part}"
            self.k("-n", NAMESPACE, "rollout", "status", workload, "--timeout=120s", timeout=150)
        pods = json.loads(self.k("-n", NAMESPACE, "get", "pods", "-o", "json"))["items"]
        not_ready = [p["metadata"]["name"] for p in pods
                     if not any(c["type"] == "Ready" and c["status"] == "True"
                                for c in p["status"].get("conditions", []))]
        if not_ready:
            raise RuntimeError(f"not Ready: {not_ready}")
        self.report.facts["pods ready"] = f"{len(pods)}/{len(pods)}"
        return f"{len(pods)} pods Ready: " + ", ".join(sorted(p["metadata"]["name"] for p in pods))

    def workloads(self) -> str:
        image = f"{IMAGE_REPO.format(target='controller')}:{self.tags[0]}"
        docs: list[dict[str, Any]] = [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}} for n in ("nf-a", "nf-b", "nf-c")
        ]
        for ns in ("nf-a", "nf-b"):
            docs.append(pod("server", ns, {"app": "server"}, image, SERVER))
        for ns in ("nf-a", "nf-c"):
            docs.append(pod("client", ns, {"role": "client"}, image, "import time\nwhile True: time.sleep(3600)"))
        self.k("apply", "-f", "-", input=yaml.safe_dump_all(docs))
        for ns, name in (("nf-a", "server"), ("nf-b", "server"), ("nf-a", "client"), ("nf-c", "client")):
            self.k("-n", ns, "wait", "--for=condition=Ready", f"pod/{name}", "--timeout=180s", timeout=200)
            self.ips[f"{ns}/{name}"] = self.k("-n", ns, "get", "pod", name, "-o", "jsonpath={.status.podIP}")
        return ", ".join(f"{k}={v}" for k, v in self.ips.items())

    def probe(self, src: str, dst: str, port: int, proto: str) -> str:
        ns, name = src.split("/")
        return self.k("-n", ns, "exec", name, "--", "python", "-c", PROBE, self.ips[dst], str(port), proto,
                      timeout=30).strip()

    def expect(self, cases: list[tuple[str, str, int, str, str]]) -> str:
        wrong = []
        for src, dst, port, proto, want in cases:
            got = self.probe(src, dst, port, proto)
            self.probes_checked += 1
            if got != want:
                wrong.append(f"{src}->{dst}:{port}/{proto} {got}, want {want}")
        if wrong:
            raise RuntimeError("; ".join(wrong))
        return f"{len(cases)} probes as expected"

    def expect_within(self, cases: list[tuple[str, str, int, str, str]], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.expect(cases)
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def policies(self) -> str:
        start = time.monotonic()
        self.k("apply", "-f", "-", input=yaml.safe_dump_all(self.installed_policies))
        enforced = self.wait_enforced(len(self.installed_policies))
        self.report.facts["policies enforced"] = f"{enforced} ({time.monotonic() - start:.1f}s after apply)"
        return enforced

    def wait_enforced(self, count: int, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        phases: dict[str, str] = {}
        while time.monotonic() < deadline:
            items = json.loads(self.k("get", "clusterpolicystatuses", "-o", "json"))["items"]
            phases = {i["metadata"]["name"]: (i.get("status") or {}).get("phase", "") for i in items}
            if len(phases) >= count and all(p == "Enforced" for p in phases.values()):
                return f"{len(phases)} Enforced"
            time.sleep(1)
        raise RuntimeError(f"policy statuses not all Enforced: {phases}")

    def enforcement_cases(self, mid: bool) -> list[tuple[str, str, int, str, str]]:
        return [
            ("nf-a/client", "nf-b/server", 8080, "tcp", "allow"),
            ("nf-a/client", "nf-b/server", 8081, "udp", "deny"),
            ("nf-c/client", "nf-b/server", 8080, "tcp", "deny"),
            ("nf-a/client", "nf-a/server", 8081, "udp", "allow"),
            ("nf-c/client", "nf-a/server", 8080, "tcp", "deny" if mid else "allow"),
            ("nf-b/server", "nf-a/server", 8080, "tcp", "deny" if mid else "allow"),
        ]

    def start_probers(self) -> str:
        image = f"{IMAGE_REPO.format(target='controller')}:{self.tags[0]}"
        b = self.ips["nf-b/server"]
        docs = [
            pod("prober", "nf-a", {"role": "client"}, image, PROBER,
                {"TARGETS": f"b-tcp={b}:8080/tcp,b-udp={b}:8081/udp,a-udp={self.ips['nf-a/server']}:8081/udp"}),
            pod("prober", "nf-c", {"role": "client"}, image, PROBER, {"TARGETS": f"b-tcp={b}:8080/tcp"}),
        ]
        self.k("apply", "-f", "-", input=yaml.safe_dump_all(docs))
        for ns in ("nf-a", "nf-c"):
            self.k("-n", ns, "wait", "--for=condition=Ready", "pod/prober", "--timeout=120s", timeout=150)
        return "2 probers"

    def prober_results(self, since: float, until: float) -> tuple[int, list[str], list[float]]:
        """Probes started between ``since`` and ``until``: how many, the wrong ones (when,
        which, how it failed), and how long each answered probe of an allowed pair took.
        The probers' verdicts never change: the policy changed mid-rollout does not
        concern their pairs."""
        want = {("nf-a", "b-tcp"): True, ("nf-a", "b-udp"): False, ("nf-a", "a-udp"): True,
                ("nf-c", "b-tcp"): False}
        total = 0
        wrong: list[str] = []
        answered: list[float] = []
        for ns in ("nf-a", "nf-c"):
            for line in self.k("-n", ns, "logs", "prober").splitlines():
                with_t = json.loads(line)
                if not since <= with_t["t"] <= until:
                    continue
                total += 1
                if with_t["allow"] and "s" in with_t:
                    answered.append(float(with_t["s"]))
                if want[(ns, with_t["target"])] != with_t["allow"]:
                    wrong.append(f"+{with_t['t'] - since:.1f}s {ns} {with_t['target']} allow={with_t['allow']} "
                                 f"{with_t.get('err', '')} after {with_t.get('s', '?')}s")
        return total, sorted(wrong), answered

    def versions(self) -> tuple[set[str], set[str]]:
        """The version every agent reports on its health endpoint, and the Netfence
        version installed in every controller pod."""
        agents: set[str] = set()
        controllers: set[str] = set()
        for component, found in (("agent", agents), ("controller", controllers)):
            pods = json.loads(self.k("-n", NAMESPACE, "get", "pods", "-l",
                                     f"app.kubernetes.io/component={component}", "-o", "json"))["items"]
            for p in pods:
                if p["metadata"].get("deletionTimestamp"):
                    continue
                script = (f"import json, urllib.request; print(json.load(urllib.request.urlopen("
                          f"'http://127.0.0.1:{AGENT_HEALTH_PORT}/healthz', timeout=5))['version'])"
                          if component == "agent" else "import netfence; print(netfence.__version__)")
                found.add(self.k("-n", NAMESPACE, "exec", p["metadata"]["name"], "--", "python", "-c", script,
                                 timeout=30).strip())
        return agents, controllers

    def check_version(self, want: str) -> str:
        agents, controllers = self.versions()
        if agents != {want} or controllers != {want}:
            raise RuntimeError(f"agents report {sorted(agents)}, controllers run {sorted(controllers)}; want {want}")
        return f"agents and controllers at {want}"

    def rollout(self, action: list[str], what: str, version: str) -> str:
        since = time.time()
        watch = RuleWatch(since)
        watch.start()
        self.helm(*action)
        # the policy change in the middle of the rollout
        self.k("apply", "-f", "-", input=yaml.safe_dump(MID_ROLLOUT_POLICY))
        self.k("-n", NAMESPACE, "rollout", "status", f"daemonset/{RELEASE}-agent", "--timeout=300s", timeout=320)
        self.k("-n", NAMESPACE, "rollout", "status", f"deployment/{RELEASE}-controller", "--timeout=300s",
               timeout=320)
        ended = time.time()
        time.sleep(1.5)  # let the probers' last probes (1 s timeout) land in their logs
        states = watch.stop()
        try:
            self.wait_enforced(len(self.installed_policies) + 1)
            self.expect(self.enforcement_cases(mid=True))
            versions = self.check_version(version)
        finally:  # the next step starts from the installed policies whatever failed here
            self.k("delete", "-f", "-", input=yaml.safe_dump(MID_ROLLOUT_POLICY))
            self.wait_enforced(len(self.installed_policies))
            # no status says when a deleted policy's rules are gone from the node: bounded retries
            self.expect_within(self.enforcement_cases(mid=False), timeout=30)
        total, wrong, answered = self.prober_results(since, ended)
        self.report.facts[f"{what} rollout ({ended - since:.0f}s) probes"] = f"{total} checked, {len(wrong)} wrong"
        # Evidence for the wrong-probe question (a gap in enforcement, or answers slower than the
        # timeout): how slow the allowed pairs' answers were, and every state Netfence's rules
        # passed through in the node's kernel (a gap would show as a state with rules missing).
        slow = sorted(answered)
        if slow:
            self.report.facts[f"{what} answer times"] = (
                f"median {slow[len(slow) // 2] * 1000:.0f} ms, max {slow[-1] * 1000:.0f} ms, "
                f"{sum(1 for x in slow if x > 0.3)} of {len(slow)} over 300 ms")
        self.report.facts[f"{what} rule states"] = " -> ".join(states) or "none sampled"
        self.probes_checked += total
        if total == 0 or wrong:
            raise RuntimeError(f"{total} probes, {len(wrong)} wrong: " + "; ".join(wrong[:12]))
        return f"{total} probes, 0 wrong; mid-rollout policy enforced after it; {versions}"

    def uninstall(self) -> str:
        """docs/install.md "Uninstall": the CRD is kept and the rules stay as last programmed
        (fail-static): every pair keeps its verdict once no Netfence pod is left."""
        self.helm("uninstall", RELEASE, "-n", NAMESPACE, "--wait", "--timeout", "5m")
        crd = self.node.kubectl("get", "crd", "clusterpolicystatuses.netfence.dev", check=False)
        if crd.returncode != 0:
            raise RuntimeError("the ClusterPolicyStatus CRD is gone after helm uninstall")
        deadline = time.monotonic() + 180
        while left := self.k("-n", NAMESPACE, "get", "pods", "-l", f"app.kubernetes.io/instance={RELEASE}",
                             "-o", "name").split():
            if time.monotonic() > deadline:
                raise RuntimeError(f"release pods still there 180 s after helm uninstall: {left}")
            time.sleep(1)
        verdicts = self.expect(self.enforcement_cases(mid=False))
        self.report.facts["after uninstall"] = f"rules stay: {verdicts}"
        return f"CRD kept, no release pod left, rules stay: {verdicts}"


def run_flow(e2e: E2E, tags: list[str], versions: list[str], reduced: bool) -> None:
    """The checks after ``node up``, in order; a failed check does not stop the ones after it."""
    report = e2e.report
    t0 = time.monotonic()
    if report.run("helm install (bundled etcd)", e2e.install):
        report.facts["install time"] = f"{time.monotonic() - t0:.0f}s"
    report.run("all release pods Running/Ready", e2e.pods_ready)
    report.run("test workloads Ready", e2e.workloads)
    if not reduced:
        report.run("connectivity before policies", lambda: e2e.expect(
            [(s, d, p, pr, "allow") for s, d, p, pr, _ in e2e.enforcement_cases(False)]))
    report.run("policies Enforced (policystatus)", e2e.policies)
    report.run("real connections match the policies", lambda: e2e.expect(e2e.enforcement_cases(False)))
    if not reduced:
        report.run("helm test",
                   lambda: e2e.helm("test", RELEASE, "-n", NAMESPACE, "--timeout", "5m") and "passed")
    report.run("probers running (every 100 ms)", e2e.start_probers)
    report.run(f"helm upgrade to {tags[1]} (same code): zero wrong probes", lambda: e2e.rollout(
        ["upgrade", RELEASE, str(e2e.chart), "-n", NAMESPACE, *e2e.values(tags[1])],
        f"upgrade to {tags[1]}", versions[1]))
    if reduced:
        return
    report.run(f"helm upgrade to {tags[2]} (version {versions[2]}): zero wrong probes", lambda: e2e.rollout(
        ["upgrade", RELEASE, str(e2e.chart), "-n", NAMESPACE, *e2e.values(tags[2])],
        f"upgrade to {tags[2]}", versions[2]))
    report.run(f"helm rollback to {tags[0]}: zero wrong probes", lambda: e2e.rollout(
        ["rollback", RELEASE, "1", "-n", NAMESPACE], f"rollback to {tags[0]}", versions[0]))
    report.run("helm uninstall: CRD kept, rules stay", e2e.uninstall)


def chart_app_version(chart: Path) -> str:
    return str(yaml.safe_load((chart / "Chart.yaml").read_text())["appVersion"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="node-e2e")
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--tags", default=None,
                        help="install tag, upgrade tag (same code), upgrade tag=version (another version); "
                             f"default {DEFAULT_TAGS}, with --reduced the first two: {REDUCED_TAGS}")
    parser.add_argument("--reduced", action="store_true",
                        help="what CI runs: install, one policy Enforced with probes both ways, one upgrade")
    parser.add_argument("--keep", action="store_true", help="leave the node up at the end")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    workdir = (args.dir or default_dir()).resolve()
    root = find_repo_root()
    if root is None:
        log.error("node-e2e runs from a Netfence checkout")
        return 2
    specs = [t.partition("=") for t in (args.tags or (REDUCED_TAGS if args.reduced else DEFAULT_TAGS)).split(",")]
    if len(specs) != (2 if args.reduced else 3):
        parser.error("--tags: " + (f"two tags with --reduced, e.g. {REDUCED_TAGS}" if args.reduced
                                   else f"three tags, e.g. {DEFAULT_TAGS}"))
    base_version = chart_app_version(root / "helm" / "netfence")
    tags = [tag for tag, _, _ in specs]
    versions = [version or base_version for _, _, version in specs]
    report = Report()
    down(workdir)
    # only the images this run uses (importing one takes seconds to tens of seconds)
    images = ["etcd", "pause", "coredns", *(f"netfence-{target}-{tag}" for tag in tags
                                           for target in ("controller", "agent"))]
    node = LocalNode(workdir, ensure_tools(), ensure_node_tools(), images)
    start = time.monotonic()
    # SIGTERM/SIGHUP (a CI job's timeout, the pytest wrapper giving up) still take the node down
    restore_signals = raise_on_signals()
    try:
        try:
            node.up()
            report.check("node up: Node Ready, CoreDNS ready", True, f"{time.monotonic() - start:.0f}s")
        except NodeError as exc:
            report.check("node up", False, str(exc)[-800:])
            raise
        e2e = E2E(node, root / "helm" / "netfence", (tags[0], tags[1]), report,
                  [REDUCED_POLICY] if args.reduced else POLICIES)
        run_flow(e2e, tags, versions, args.reduced)
        report.facts["probes checked"] = str(e2e.probes_checked)
    except NodeError:
        pass
    finally:
        if not args.keep:
            for line in down(workdir):
                log.info("%s", line)
        restore_signals()
    out()
    out("node-e2e report")
    for key, value in report.facts.items():
        out(f"  {key}: {value}")
    out(f"  total time: {time.monotonic() - start:.0f}s")
    out(report.summary())
    return 0 if all(ok for _, ok, _ in report.checks) else 1


if __name__ == "__main__":
    sys.exit(main())
