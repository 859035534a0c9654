"""The local control plane: a real kube-apiserver + etcd, Netfence's own etcd, the CRD, the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from etcd3aio import Etcd3Client

from netfence_lab.apiserver import KubeApiServer
from netfence_lab.cluster import (
    ClusterError,
    LocalCluster,
    describe_failure,
    proc_start_time,
    read_state,
    start_etcd,
    stop_recorded,
)
from netfence_lab.etcd_server import EtcdServer
from netfence_lab.process import StartupError
from netfence_lab.tools import Tools

K8S_VERSION = "v1.35.4"


def alive(pid: int) -> bool:
    return proc_start_time(pid) is not None


def api_request(cluster: LocalCluster, path: str, *, client_cert: bool, token: str | None = None) -> int:
    ctx = cluster.apiserver.ssl_context(client_cert=client_cert)
    req = urllib.request.Request(f"{cluster.api_url}{path}")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture
def namespace(cluster: LocalCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    name = "cp-" + request.node.name.replace("_", "-")[:40].strip("-")
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false")


def test_admin_kubeconfig_and_real_version(cluster: LocalCluster) -> None:
    result = cluster.kubectl("version", "-o", "json")
    assert json.loads(result.stdout)["serverVersion"]["gitVersion"] == K8S_VERSION
    with urllib.request.urlopen(f"{cluster.api_url}/version", context=cluster.apiserver.ssl_context()) as r:
        assert json.load(r)["gitVersion"] == K8S_VERSION
    who = json.loads(cluster.kubectl("auth", "whoami", "-o", "json").stdout)
    assert who["status"]["userInfo"]["username"] == "netfence-admin"
    assert "system:masters" in who["status"]["userInfo"]["groups"]
    # the kubeconfig is self-contained: it works from the environment alone
    env = cluster.env()
    assert env["KUBECONFIG"] == str(cluster.kubeconfig)
    out = subprocess.run([str(cluster.tools.kubectl), "get", "ns", "default", "-o", "name"], env=env,
                         capture_output=True, text=True, check=True, timeout=30).stdout
    assert out.strip() == "namespace/default"


def test_networkpolicy_and_pod_round_trip(cluster: LocalCluster, namespace: str) -> None:
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "allow-web", "namespace": namespace},
        "spec": {
            "podSelector": {"matchLabels": {"app": "web"}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                "ports": [{"protocol": "TCP", "port": 80}],
            }],
        },
    }
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(policy))
    got = json.loads(
        cluster.kubectl("get", "networkpolicy", "allow-web", "-n", namespace, "-o", "json").stdout
    )
    assert got["spec"] == policy["spec"]
    assert got["metadata"]["uid"]

    # Pods can be created without a service-account controller (ServiceAccount admission is off).
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": namespace, "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "c", "image": "example.invalid/none"}]},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))
    got = json.loads(cluster.kubectl("get", "pod", "web", "-n", namespace, "-o", "json").stdout)
    assert got["metadata"]["labels"] == {"app": "web"}
    assert got["status"]["phase"] == "Pending"


def test_requests_without_credentials_are_refused(cluster: LocalCluster) -> None:
    assert api_request(cluster, "/api/v1/namespaces", client_cert=True) == 200
    assert api_request(cluster, "/api/v1/namespaces", client_cert=False) in (401, 403)
    assert api_request(cluster, "/api/v1/namespaces", client_cert=False, token="not-a-valid-token") == 401
    # the server certificate verifies against the cluster CA for 127.0.0.1 (no verification switched off)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{cluster.api_url}/version", context=ssl.create_default_context(), timeout=5)


def test_unprivileged_token_user_is_forbidden_until_granted(cluster: LocalCluster, namespace: str) -> None:
    kc = str(cluster.unprivileged_kubeconfig)
    who = json.loads(cluster.kubectl("--kubeconfig", kc, "auth", "whoami", "-o", "json").stdout)
    assert who["status"]["userInfo"]["username"] == cluster.unprivileged_user  # authenticated ...
    denied = cluster.kubectl("--kubeconfig", kc, "get", "pods", "-n", namespace, check=False)
    assert denied.returncode != 0
    assert "Forbidden" in denied.stderr and cluster.unprivileged_user in denied.stderr  # ... not authorized
    assert api_request(cluster, "/api/v1/pods", client_cert=False, token=cluster.unprivileged_token) == 403

    cluster.kubectl("create", "role", "pod-reader", "-n", namespace, "--verb=list,get", "--resource=pods")
    cluster.kubectl("create", "rolebinding", "pod-reader", "-n", namespace, "--role=pod-reader",
                    f"--user={cluster.unprivileged_user}")
    deadline = time.monotonic() + 10
    while True:
        allowed = cluster.kubectl("--kubeconfig", kc, "get", "pods", "-n", namespace, check=False)
        if allowed.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert allowed.returncode == 0, allowed.stderr
    # still nothing outside the granted namespace
    assert cluster.kubectl("--kubeconfig", kc, "get", "pods", "-A", check=False).returncode != 0


def test_crd_is_established_and_empty(cluster: LocalCluster) -> None:
    crd = json.loads(cluster.kubectl("get", "crd", "clusterpolicystatuses.netfence.dev", "-o", "json").stdout)
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions["Established"] == "True"
    for name in ("policystatus", "cps", "clusterpolicystatuses.netfence.dev"):
        result = cluster.kubectl("get", name)
        assert result.stdout == ""
        assert "No resources found" in result.stderr


def test_clusterpolicystatus_with_status_subresource(cluster: LocalCluster) -> None:
    name = "cp-ns.allow-web"
    obj = {
        "apiVersion": "netfence.dev/v1alpha1",
        "kind": "ClusterPolicyStatus",
        "metadata": {"name": name},
        "spec": {"policy": {"namespace": "cp-ns", "name": "allow-web", "uid": "u-1"},
                 "policyRef": "cp-ns/allow-web", "generation": 1, "kind": "NetworkPolicy"},
        "status": {"phase": "Enforced"},  # ignored on create: status is a subresource
    }
    cluster.kubectl("create", "-f", "-", input=json.dumps(obj))
    try:
        got = json.loads(cluster.kubectl("get", "cps", name, "-o", "json").stdout)
        assert got["spec"] == obj["spec"]
        assert "status" not in got

        status = {
            "phase": "Pending", "requiredNodes": 2, "syncedNodes": 1, "synced": "1/2", "endpoints": 3,
            "revision": 42, "observedGeneration": 1,
            "nodes": [{"name": "node-0", "synced": True, "appliedRevision": 42},
                      {"name": "node-1", "synced": False, "appliedRevision": 40, "message": "applying"}],
            "conditions": [{"type": "Ready", "status": "False", "reason": "WaitingForNodes",
                            "message": "1 of 2 nodes synced", "lastTransitionTime": "2026-01-01T00:00:00Z",
                            "observedGeneration": 1}],
            "warnings": ["named port 'http' matches no pod"],
        }
        cluster.kubectl("patch", "clusterpolicystatus", name, "--subresource=status", "--type=merge",
                        "-p", json.dumps({"status": status}))
        got = json.loads(cluster.kubectl("get", "policystatus", name, "-o", "json").stdout)
        assert got["status"] == status

        table = cluster.kubectl("get", "policystatus").stdout.splitlines()
        assert table[0].split() == ["NAME", "KIND", "POLICY", "PHASE", "SYNCED", "ENDPOINTS", "AGE"]
        assert table[1].split()[:6] == [name, "NetworkPolicy", "cp-ns/allow-web", "Pending", "1/2", "3"]
        wide = cluster.kubectl("get", "policystatus", "-o", "wide").stdout.splitlines()
        # -o wide adds the Ready condition's reason and message (not an internal revision).
        assert wide[0].split()[-2:] == ["REASON", "MESSAGE"] and "REVISION" not in wide[0].split()
        assert wide[1].split()[-6:] == ["WaitingForNodes", "1", "of", "2", "nodes", "synced"]

        bad = cluster.kubectl("patch", "cps", name, "--subresource=status", "--type=merge",
                              "-p", '{"status": {"phase": "Bogus"}}', check=False)
        assert bad.returncode != 0 and "Unsupported value" in bad.stderr
        missing = cluster.kubectl("create", "-f", "-", check=False, input=json.dumps(
            {"apiVersion": "netfence.dev/v1alpha1", "kind": "ClusterPolicyStatus",
             "metadata": {"name": "no-spec"}, "spec": {"policyRef": "a/b"}}))
        assert missing.returncode != 0 and "spec.policy" in missing.stderr
    finally:
        cluster.kubectl("delete", "cps", name, "--ignore-not-found")


async def test_netfence_etcd_put_get_watch(cluster: LocalCluster) -> None:
    client = Etcd3Client([cluster.netfence_etcd.endpoint])
    await client.connect()
    try:
        assert client.kv is not None and client.watch is not None
        first = await client.kv.put("/netfence/test/key", "v1")
        got = await client.kv.get("/netfence/test/key")
        assert [kv.value for kv in got.kvs] == [b"v1"]

        async def collect() -> list[bytes]:
            assert client.watch is not None
            seen: list[bytes] = []
            async for response in client.watch.watch("/netfence/test/key",
                                                     start_revision=first.header.revision):
                seen.extend(event.kv.value for event in response.events)
                if b"v3" in seen:
                    return seen
            return seen

        # The watch starts at the first put's revision, so it replays whatever was written since:
        # the puts below need not wait for it to be established.
        task = asyncio.create_task(collect())
        await client.kv.put("/netfence/test/key", "v2")
        await client.kv.put("/netfence/test/key", "v3")
        assert await asyncio.wait_for(task, timeout=10) == [b"v1", b"v2", b"v3"]
        await client.kv.delete("/netfence/test/key")
    finally:
        await client.close()

    # Netfence's etcd is not the API server's: no /registry there, and our key is not in the other.
    assert cluster.api_etcd is not None
    assert cluster.api_etcd.endpoint != cluster.netfence_etcd.endpoint
    for endpoint, prefix, expect in ((cluster.netfence_etcd.endpoint, "/registry/", 0),
                                     (cluster.api_etcd.endpoint, "/registry/", 1),
                                     (cluster.api_etcd.endpoint, "/netfence/", 0)):
        c = Etcd3Client([endpoint])
        await c.connect()
        try:
            assert c.kv is not None
            end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
            resp = await c.kv.get(prefix, end, count_only=True)
            assert (resp.count > 0) == bool(expect), (endpoint, prefix)
        finally:
            await c.close()


def test_two_clusters_at_once_and_nothing_left_after_stop(
    cluster: LocalCluster, tools: Tools, tmp_path: Path
) -> None:
    second = LocalCluster(tmp_path / "second", tools)
    with second:
        assert second.api_url != cluster.api_url
        ports = {cluster.netfence_etcd.client_port, second.netfence_etcd.client_port,
                 cluster.apiserver.port, second.apiserver.port}
        assert len(ports) == 4
        assert json.loads(second.kubectl("version", "-o", "json").stdout)["serverVersion"]["gitVersion"] \
            == K8S_VERSION
        second.kubectl("create", "namespace", "only-in-second")
        assert cluster.kubectl("get", "namespace", "only-in-second", check=False).returncode != 0
        pids = second.pids()
        assert set(pids) == {"api-etcd", "kube-apiserver", "netfence-etcd"}
        assert all(alive(pid) for pid in pids.values())
        state = read_state(second.workdir)
        assert state is not None and {p.name: p.pid for p in state.processes} == pids
    assert not [name for name, pid in pids.items() if alive(pid)]
    second.stop()  # idempotent
    assert cluster.kubectl("get", "ns", "default").returncode == 0  # the session cluster is untouched


def test_port_in_use_is_reported_and_nothing_started(tools: Tools, tmp_path: Path, taken_port: int) -> None:
    # explicit port, checked before anything starts
    with pytest.raises(ClusterError, match=f"port {taken_port} on 127.0.0.1 is already in use; choose"):
        LocalCluster(tmp_path / "a", tools, api_port=taken_port).start()
    assert read_state(tmp_path / "a") is None
    with pytest.raises(ClusterError, match="already in use"):
        start_etcd(tools.etcd, tmp_path / "e", "etcd-x", client_port=taken_port)

    # a process that fails on the port: its log is recognised, and it is gone afterwards
    etcd = EtcdServer(tools.etcd, tmp_path / "etcd", client_port=taken_port)
    with pytest.raises(StartupError):
        etcd.start()
    etcd.stop()
    message, in_use = describe_failure("etcd", etcd.process.log_path.read_text(), etcd.process.log_path)
    assert in_use and f"127.0.0.1:{taken_port}" in message
    assert etcd.process.pid is not None and not alive(etcd.process.pid)

    api = KubeApiServer(tools.kube_apiserver, tmp_path / "api", "http://127.0.0.1:1", port=taken_port)
    with pytest.raises(StartupError):
        api.start(timeout=60)
    api.stop()
    message, in_use = describe_failure("kube-apiserver", api.log_path.read_text(), api.log_path)
    assert in_use and message.startswith(f"kube-apiserver could not listen on 127.0.0.1:{taken_port}")
    assert api.pid is not None and not alive(api.pid)


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "netfence.cli", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_cli_up_status_down(tools: Tools, tmp_path: Path) -> None:
    workdir = tmp_path / "cli-cluster"
    try:
        up = cli("cluster", "up", "--dir", str(workdir))
        assert up.returncode == 0, up.stderr
        kubeconfig = workdir / "admin.kubeconfig"
        assert f"export KUBECONFIG={kubeconfig}" in up.stdout.splitlines()
        assert f"netfence cluster down --dir {workdir}" in up.stdout
        state = read_state(workdir)
        assert state is not None and len(state.processes) == 3
        assert all(p.alive() for p in state.processes)  # they outlive the command

        env = dict(os.environ, KUBECONFIG=str(kubeconfig), KUBECACHEDIR=str(tmp_path / "kc"))
        got = subprocess.run([str(tools.kubectl), "get", "policystatus"], env=env, capture_output=True,
                             text=True, timeout=30, check=False)
        assert got.returncode == 0 and "No resources found" in got.stderr

        again = cli("cluster", "up", "--dir", str(workdir))
        assert again.returncode == 1
        assert again.stderr.startswith("netfence: a cluster is already running in") and \
            len(again.stderr.splitlines()) == 1

        status = cli("cluster", "status", "--dir", str(workdir))
        assert status.returncode == 0, status.stdout + status.stderr
        assert "running" in status.stdout and "(ready)" in status.stdout

        down = cli("cluster", "down", "--dir", str(workdir))
        assert down.returncode == 0, down.stderr
        assert "stopped netfence-etcd, kube-apiserver, api-etcd" in down.stdout
        assert not [p.name for p in state.processes if p.alive() or alive(p.pid)]
        assert kubeconfig.exists() and (workdir / "api-etcd" / "data").is_dir()  # down removes nothing

        status = cli("cluster", "status", "--dir", str(workdir))
        assert status.returncode == 3 and "stopped" in status.stdout
        assert "nothing was running" in cli("cluster", "down", "--dir", str(workdir)).stdout
    finally:
        leftover = read_state(workdir)
        if leftover is not None:
            stop_recorded(leftover)


def test_cli_up_interrupted_leaves_nothing_running(tools: Tools, tmp_path: Path) -> None:
    workdir = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, "-m", "netfence.cli", "cluster", "up", "--dir", str(workdir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        state = None
        while time.monotonic() < deadline:  # wait until something has started
            try:
                state = read_state(workdir)
            except ClusterError:  # caught mid-write
                state = None
            if state is not None and state.processes:
                break
            time.sleep(0.05)
        assert state is not None and state.processes, "cluster up never recorded a process"
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130
        assert err.splitlines() == ["netfence: interrupted; whatever this command had started was stopped"]
        final = read_state(workdir)
        assert final is not None
        assert not [p.name for p in [*state.processes, *final.processes] if alive(p.pid)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        leftover = read_state(workdir)
        if leftover is not None:
            stop_recorded(leftover)
