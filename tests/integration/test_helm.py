"""The Helm chart (helm/netfence) against the real helm binary, a real API server and a real etcd.

* lint, and the rendered manifests (default, external etcd, 3 etcd members)
  accepted by the API server (``kubectl apply --dry-run=server``);
* values.schema.json rejects bad values with a clear message;
* what the workloads look like (probes, security, downward API, TLS wiring);
* the chart's generated etcd certificates and etcd flags work with a real etcd
  and Netfence's own etcd client (mutual TLS, the host name the chart configures);
* install creates exactly the rendered objects; RBAC is least privilege (the
  agent can change nothing, the controller only its status objects); the
  ``helm test`` script passes/fails as it should with its own RBAC; upgrade
  reaches the API server (replicas, a new optional CRD field) and keeps the
  certificates; uninstall removes everything but what is kept on purpose.
* priority: the agent, controller and etcd pods are admitted outside
  kube-system by an API server that limits the critical priority classes
  (ResourceQuota admission ``limitedResources``), thanks to the chart's quota;
* guards: a changed ``etcd.replicas`` on an installed release, 0 controller
  replicas and a too old Kubernetes are refused with a clear message;
* metadata: the generated README is current and shown by ``helm show readme``,
  image digests, overridable security contexts, version labels, NOTES.txt for
  every combination of ``crds.keep`` and etcd persistence;
* certificates: ``etcd.tls.method`` helm / certManager / existingSecret, and
  the last two render byte-identical output every time (GitOps-safe).

The session cluster has no kubelet, controllers or scheduler: Deployments
never get pods, and nothing here needs them to.

The session cluster applied the CRD with kubectl before; the release adopts
it (Helm's ownership label and annotations, as docs/install.md tells operators
to do) and the CRD is put back as it was after the module.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.unit.test_dockerfile import parse_dockerfile

from netfence.store.errors import StoreError
from netfence.store.etcd import EtcdConfig, EtcdStore
from netfence_lab.apiserver import KubeApiServer
from netfence_lab.cluster import LocalCluster
from netfence_lab.process import ManagedProcess, free_port
from netfence_lab.tools import Tools, cache_dir

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "netfence"
CRD_NAME = "clusterpolicystatuses.netfence.dev"
INSTANCE = "app.kubernetes.io/instance"
EXTERNAL = (
    "--set", "etcd.external.enabled=true",
    "--set", "etcd.external.endpoints={https://etcd-0.example.net:2379,10.0.0.7:2379}",
    "--set", "etcd.external.secretName=my-etcd-client",
)
THREE_MEMBERS = ("--set", "etcd.replicas=3", "--set", "etcd.persistence.enabled=false")
CERT_MANAGER = ("--set", "etcd.tls.method=certManager")
EXISTING_TLS = ("--set", "etcd.tls.method=existingSecret", "--set", "etcd.tls.existingSecret=my-server",
                "--set", "etcd.tls.existingClientSecret=my-client")
CERT_MANAGER_KINDS = ("Issuer", "Certificate")
# Kinds that the chart must never create (beyond its hooks), listed to catch extras after install.
NEVER = ("role.rbac.authorization.k8s.io", "rolebinding.rbac.authorization.k8s.io", "configmap", "pod",
         "job.batch", "persistentvolumeclaim")


# --- helpers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Helm:
    binary: Path
    kubeconfig: Path
    env: dict[str, str]

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.binary), *args, "--kubeconfig", str(self.kubeconfig)],
            capture_output=True, text=True, env=self.env, timeout=timeout, check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def template(self, release: str, namespace: str, *args: str, chart: Path = CHART) -> list[dict[str, Any]]:
        out = self.run("template", release, str(chart), "--namespace", namespace, *args).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]


def is_hook(doc: dict[str, Any]) -> bool:
    return "helm.sh/hook" in (doc["metadata"].get("annotations") or {})


def resource(doc: dict[str, Any]) -> str:
    """kubectl's name for the doc's type: kind, qualified by its API group."""
    group = doc["apiVersion"].rpartition("/")[0]
    return f"{doc['kind'].lower()}.{group}" if group else doc["kind"].lower()


def identity(doc: dict[str, Any]) -> tuple[str, str, str]:
    return doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"]


def find(docs: Sequence[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, (kind, suffix, [d["metadata"]["name"] for d in found])
    return found[0]


def container(doc: dict[str, Any]) -> dict[str, Any]:
    [only] = doc["spec"]["template"]["spec"]["containers"]
    return dict(only)


def flags(args: Sequence[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in args if "=" in a)


def kubectl_json(cluster: LocalCluster, *args: str) -> Any:
    return json.loads(cluster.kubectl(*args, "-o", "json").stdout)


def can_i(cluster: LocalCluster, namespace: str, sa: str, verb: str, what: str, subresource: str = "",
          where: str | None = None) -> bool:
    """Whether ServiceAccount ``namespace``/``sa`` may ``verb`` ``what`` in namespace ``where`` (default: its own)."""
    argv = ["auth", "can-i", verb, what, "-n", where or namespace, f"--as=system:serviceaccount:{namespace}:{sa}",
            "--as-group=system:serviceaccounts", f"--as-group=system:serviceaccounts:{namespace}"]
    if subresource:
        argv.append(f"--subresource={subresource}")
    answer = cluster.kubectl(*argv, check=False).stdout.strip()
    assert answer in ("yes", "no"), (argv, answer)
    return answer == "yes"


def finalize_namespace(cluster: LocalCluster, name: str) -> None:
    """Delete a namespace and finalize it (the namespace controller's job; there is none here)."""
    cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)
    body = json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name},
                       "spec": {"finalizers": []}})
    cluster.kubectl("replace", "--raw", f"/api/v1/namespaces/{name}/finalize", "-f", "-", input=body, check=False)
    cluster.kubectl("wait", "--for=delete", f"namespace/{name}", "--timeout=30s", check=False)


def adopt_crd(cluster: LocalCluster, release: str, namespace: str) -> None:
    """Let the release take over a CRD created with kubectl (see docs/install.md)."""
    cluster.kubectl("label", "crd", CRD_NAME, "app.kubernetes.io/managed-by=Helm", "--overwrite")
    cluster.kubectl("annotate", "crd", CRD_NAME, f"meta.helm.sh/release-name={release}",
                    f"meta.helm.sh/release-namespace={namespace}", "--overwrite")


def crd_versions(cluster: LocalCluster) -> list[dict[str, Any]]:
    return list(kubectl_json(cluster, "get", "crd", CRD_NAME)["spec"]["versions"])


def served_version() -> str:
    crd = yaml.safe_load((CHART / "files" / "clusterpolicystatus.yaml").read_text())
    return str(next(v["name"] for v in crd["spec"]["versions"] if v["served"]))


def policy_status(name: str, extra_spec: dict[str, Any] | None = None) -> str:
    return json.dumps({
        "apiVersion": f"netfence.dev/{served_version()}", "kind": "ClusterPolicyStatus",
        "metadata": {"name": name},
        "spec": {"policy": {"namespace": "helm", "name": name}, "policyRef": f"helm/{name}", **(extra_spec or {})},
    })


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def helm(tools: Tools, cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    home = tmp_path_factory.mktemp("helm-home")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    return Helm(tools.helm, cluster.kubeconfig, env)


@pytest.fixture
def namespace(cluster: LocalCluster) -> Iterator[str]:
    name = f"helm-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    finalize_namespace(cluster, name)


@pytest.fixture(scope="module")
def crd_guard(cluster: LocalCluster) -> Iterator[None]:
    """Put the session's CRD back as it was (spec, labels, annotations) after this module."""
    before = kubectl_json(cluster, "get", "crd", CRD_NAME)
    yield
    now = kubectl_json(cluster, "get", "crd", CRD_NAME)
    now["spec"] = before["spec"]
    for field in ("labels", "annotations"):
        now["metadata"][field] = before["metadata"].get(field) or {}
    cluster.kubectl("replace", "-f", "-", input=json.dumps(now))


@dataclass(frozen=True)
class Release:
    name: str
    namespace: str

    @property
    def fullname(self) -> str:
        return f"{self.name}-netfence"


@pytest.fixture(scope="module")
def release(helm: Helm, cluster: LocalCluster, crd_guard: None) -> Iterator[Release]:
    """One installed release (default values) for the install/RBAC/test/upgrade/uninstall tests, in order."""
    rel = Release("nfr", f"helm-rel-{uuid.uuid4().hex[:6]}")
    cluster.kubectl("create", "namespace", rel.namespace)
    adopt_crd(cluster, rel.name, rel.namespace)
    helm.run("install", rel.name, str(CHART), "--namespace", rel.namespace)
    try:
        yield rel
    finally:
        helm.run("uninstall", rel.name, "--namespace", rel.namespace, check=False)
        cluster.kubectl("delete", CRD_NAME, "-l", f"helm-test={rel.namespace}", "--ignore-not-found",
                        check=False)
        finalize_namespace(cluster, rel.namespace)


# --- lint, render, schema --------------------------------------------------------------------


@pytest.mark.parametrize("values", [(), EXTERNAL, THREE_MEMBERS, CERT_MANAGER, EXISTING_TLS],
                         ids=["default", "external-etcd", "etcd-3", "cert-manager", "existing-secret"])
def test_helm_lint_passes(helm: Helm, values: tuple[str, ...]) -> None:
    result = helm.run("lint", "--strict", str(CHART), *values)
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout, result.stdout


@pytest.mark.parametrize("values", [(), EXTERNAL, THREE_MEMBERS, CERT_MANAGER, EXISTING_TLS],
                         ids=["default", "external-etcd", "etcd-3", "cert-manager", "existing-secret"])
def test_rendered_manifest_is_accepted_by_the_api_server(
    helm: Helm, cluster: LocalCluster, namespace: str, values: tuple[str, ...]
) -> None:
    # cert-manager's kinds are not served here (no cert-manager); test_tls_method_cert_manager checks them.
    docs = [d for d in helm.template("dry", namespace, *values)
            if d["apiVersion"].split("/")[0] != "cert-manager.io"]
    manifest = "\n---\n".join(yaml.safe_dump(d) for d in docs)
    result = cluster.kubectl("apply", "--dry-run=server", "--validate=strict", "-n", namespace, "-f", "-",
                             input=manifest, timeout=120)
    accepted = set(re.findall(r"^(\S+) \w+ \(server dry run\)$", result.stdout, re.MULTILINE))
    for doc in docs:
        group = doc["apiVersion"].rpartition("/")[0]
        qualified = f"{doc['kind'].lower()}{'.' + group if group else ''}/{doc['metadata']['name']}"
        assert qualified in accepted, (qualified, result.stdout)
    assert len(accepted) == len(docs)
    # The helm test hook is part of the rendering, and accepted too.
    assert any(d["kind"] == "Pod" and is_hook(d) for d in docs)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (("--set", "etcd.replicas=2"), "at '/etcd/replicas': value must be one of 1, 3"),
        (("--set", "controller.replicas=-1"), "at '/controller/replicas': minimum: got -1, want 0"),
        (("--set", "controller.image.pullPolicy=Sometimes"),
         "at '/controller/image/pullPolicy': value must be one of 'Always', 'IfNotPresent', 'Never'"),
        (("--set", "agent.image.pullPolicy=always"), "at '/agent/image/pullPolicy': value must be one of"),
        (("--set", "etcd.external.enabled=true"), "at '/etcd/external/endpoints': minItems: got 0, want 1"),
        (("--set", "etcd.external.enabled=true", "--set", "etcd.external.endpoints={etcd:2379}"),
         "at '/etcd/external/secretName': minLength: got 0, want 1"),
        (("--set", "etcd.external.enabled=true", "--set", "etcd.external.secretName=s",
          "--set", "etcd.external.endpoints={http://etcd:2379}"),
         "at '/etcd/external/endpoints/0': 'http://etcd:2379' does not match pattern"),
        (("--set", "etcd.tls.existingSecret=mine"),
         "at '/etcd/tls/existingClientSecret': minLength: got 0, want 1"),
        (("--set", "agent.iptablesBackend=bpf"),
         "at '/agent/iptablesBackend': value must be one of 'auto', 'nft', 'legacy'"),
        (("--set", "etcd.replica=3"), "at '/etcd': additional properties 'replica' not allowed"),
    ],
    ids=["etcd-2", "negative-replicas", "pull-policy", "pull-policy-case", "external-no-endpoints",
         "external-no-secret", "external-http", "half-tls", "backend", "typo"],
)
def test_schema_rejects_bad_values_clearly(helm: Helm, values: tuple[str, ...], message: str) -> None:
    result = helm.run("template", "bad", str(CHART), *values, check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema(s)" in result.stderr, result.stderr
    assert message in result.stderr, result.stderr


# --- what the workloads look like ------------------------------------------------------------


def test_controller_deployment(helm: Helm) -> None:
    docs = helm.template("t", "nf")
    deploy = find(docs, "Deployment", "-controller")
    spec = deploy["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    [term] = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()
    assert pod["serviceAccountName"] == "t-netfence-controller"
    ctr = container(deploy)
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert ctr["image"] == f"ghcr.io/netfence/netfence-controller:{app_version}"
    # --identity from the pod name (downward API); no kubeconfig: in-cluster config.
    assert "--identity=$(POD_NAME)" in ctr["args"]
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in ctr["env"]
    assert not [e for e in ctr["env"] if e["name"] in ("KUBECONFIG", "NETFENCE_KUBECONFIG")]
    assert not [a for a in ctr["args"] if a.startswith("--kubeconfig")]
    # Health port: container port, readiness probe, Service and --health-port agree; liveness is
    # the process-only /livez on its own port (NETFENCE_LIVENESS_PORT), never etcd's state.
    port = int(flags(ctr["args"])["--health-port"])
    assert ctr["ports"] == [{"name": "health", "containerPort": port, "protocol": "TCP"},
                            {"name": "liveness", "containerPort": 8081, "protocol": "TCP"},
                            {"name": "metrics", "containerPort": 8082, "protocol": "TCP"}]  # test_helm_metrics.py
    assert ctr["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert ctr["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "liveness"}
    assert ctr["startupProbe"]["httpGet"] == ctr["livenessProbe"]["httpGet"]
    assert ctr["startupProbe"]["periodSeconds"] * ctr["startupProbe"]["failureThreshold"] >= 300
    assert {"name": "NETFENCE_LIVENESS_PORT", "value": "8081"} in ctr["env"]
    service = find(docs, "Service", "-controller")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "health"
    assert service["spec"]["ports"][0]["port"] == port
    pdb = find(docs, "PodDisruptionBudget", "-controller")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # Non-root, the same uid as the controller image's USER.
    image_user = next(i.args for i in parse_dockerfile() if i.stage == "controller" and i.keyword == "USER")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert f'{pod["securityContext"]["runAsUser"]}:{pod["securityContext"]["runAsGroup"]}' == image_user
    assert ctr["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert ctr["securityContext"]["readOnlyRootFilesystem"] is True
    assert ctr["securityContext"]["allowPrivilegeEscalation"] is False
    assert set(ctr["resources"]) == {"requests", "limits"}


def test_agent_daemonset(helm: Helm) -> None:
    docs = helm.template("t", "nf")
    ds = find(docs, "DaemonSet", "-agent")
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["automountServiceAccountToken"] is False
    assert pod["tolerations"] == [{"operator": "Exists"}]
    ctr = container(ds)
    assert ctr["image"].startswith("ghcr.io/netfence/netfence-agent:")
    sc = ctr["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert {"name": "NETFENCE_NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in ctr["env"]
    assert {"name": "NETFENCE_IPTABLES_BACKEND", "value": "auto"} in ctr["env"]
    # off by default (the controller's and etcd's own pods would be dropped after they all restart);
    # on: a new pod is denied until its rules exist, the node's pod CIDRs from the controller (nodes/<node>)
    assert not [e for e in ctr["env"] if e["name"] == "NETFENCE_POD_CIDRS"]
    on = container(find(helm.template("t", "nf", "--set", "agent.dropUnknownWorkloads=true"), "DaemonSet", "-agent"))
    assert {"name": "NETFENCE_POD_CIDRS", "value": "auto"} in on["env"]
    [lock] = [v for v in pod["volumes"] if v["name"] == "xtables-lock"]
    assert lock["hostPath"] == {"path": "/run/xtables.lock", "type": "FileOrCreate"}
    assert {"name": "xtables-lock", "mountPath": "/run/xtables.lock"} in ctr["volumeMounts"]
    args = flags(ctr["args"])
    port = int(args["--health-port"])
    assert args["--health-host"] == "127.0.0.1"
    assert ctr["ports"][0]["containerPort"] == port
    assert ctr["livenessProbe"]["httpGet"] == {"host": "127.0.0.1", "path": "/healthz", "port": "health"}
    # a slow start (a loaded node) is never killed by liveness: up to 5 min of startup probe first
    assert ctr["startupProbe"]["httpGet"] == ctr["livenessProbe"]["httpGet"]
    assert ctr["startupProbe"]["periodSeconds"] * ctr["startupProbe"]["failureThreshold"] >= 300
    assert ctr["readinessProbe"]["httpGet"] == {"host": "127.0.0.1", "path": "/readyz", "port": "health"}
    sa = find(docs, "ServiceAccount", "-agent")
    assert sa["automountServiceAccountToken"] is False
    # No Role/ClusterRole binding names the agent's ServiceAccount.
    for binding in [d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")]:
        assert all(s["name"] != sa["metadata"]["name"] for s in binding["subjects"]), binding


@pytest.mark.parametrize("values", [(), EXTERNAL], ids=["bundled", "external"])
def test_controller_and_agent_always_use_etcd_tls_with_client_certificates(
    helm: Helm, values: tuple[str, ...]
) -> None:
    docs = helm.template("t", "nf", *values)
    expected_secret = "my-etcd-client" if values else "t-netfence-etcd-client-tls"
    expected_endpoints = ("etcd-0.example.net:2379,10.0.0.7:2379" if values
                          else "t-netfence-etcd.nf.svc.cluster.local:2379")
    for kind in ("Deployment", "DaemonSet"):
        workload = find(docs, kind)
        ctr = container(workload)
        args = flags(ctr["args"])
        # host:port, as the etcd client wants them (TLS comes from the CA, not a scheme)
        assert args["--etcd-endpoints"] == expected_endpoints
        [mount] = [m for m in ctr["volumeMounts"] if m["name"] == "etcd-client-tls"]
        assert mount["readOnly"] is True
        for flag, key in (("--etcd-ca", "ca.crt"), ("--etcd-cert", "tls.crt"), ("--etcd-key", "tls.key")):
            assert args[flag] == f"{mount['mountPath']}/{key}"
        [volume] = [v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == "etcd-client-tls"]
        assert volume["secret"]["secretName"] == expected_secret
    kinds = {d["kind"] for d in docs}
    if values:
        assert "StatefulSet" not in kinds and "Secret" not in kinds
        assert not [d for d in docs if d["kind"] == "Service" and "etcd" in d["metadata"]["name"]]
    else:
        secret = find(docs, "Secret", "-client-tls")
        assert secret["type"] == "kubernetes.io/tls"
        assert set(secret["data"]) == {"ca.crt", "tls.crt", "tls.key"}


@pytest.mark.parametrize("members", [1, 3])
def test_bundled_etcd_statefulset(helm: Helm, members: int) -> None:
    docs = helm.template("t", "nf", "--set", f"etcd.replicas={members}")
    sts = find(docs, "StatefulSet")
    assert sts["spec"]["replicas"] == members
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    headless = find(docs, "Service", "-etcd-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert sts["spec"]["serviceName"] == headless["metadata"]["name"]
    client_service = find(docs, "Service", "-etcd")
    assert client_service["spec"]["ports"][0]["port"] == 2379
    args = flags(container(sts)["args"])
    cluster_members = args["--initial-cluster"].split(",")
    assert [m.split("=")[0] for m in cluster_members] == [f"t-netfence-etcd-{i}" for i in range(members)]
    assert all(m.split("=")[1].startswith("https://") for m in cluster_members)
    assert args["--client-cert-auth"] == "true" and args["--peer-client-cert-auth"] == "true"
    assert args["--listen-client-urls"].startswith("https://")
    [claim] = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["metadata"]["labels"][INSTANCE] == "t"  # what docs/install.md's PVC clean-up selects
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget" and d["metadata"]["name"].endswith("-etcd")]
    assert len(pdbs) == (1 if members == 3 else 0)


def test_image_tags_default_to_app_version_and_can_be_set(helm: Helm) -> None:
    docs = helm.template("t", "nf", "--set", "agent.image.tag=9.9.9", "--set", "controller.image.pullPolicy=Always")
    assert container(find(docs, "DaemonSet"))["image"] == "ghcr.io/netfence/netfence-agent:9.9.9"
    assert container(find(docs, "Deployment"))["imagePullPolicy"] == "Always"


def test_crd_is_a_kept_template_rendered_from_the_repository_file(helm: Helm) -> None:
    docs = helm.template("t", "nf")
    crd = find(docs, "CustomResourceDefinition")
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert not is_hook(crd)
    source = yaml.safe_load((REPO / "crds" / "clusterpolicystatus.yaml").read_text())
    assert crd["spec"] == source["spec"]
    assert crd["metadata"]["name"] == source["metadata"]["name"]
    assert source["metadata"]["labels"].items() <= crd["metadata"]["labels"].items()


# --- the chart's etcd TLS material with a real etcd and Netfence's client --------------------


def b64(secret: dict[str, Any], key: str) -> bytes:
    return base64.b64decode(secret["data"][key])


def dns_names(cert: Path) -> set[str]:
    out = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", str(cert)],
                         capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"DNS:([^,\s]+)", out))


def write_secret(secret: dict[str, Any], directory: Path) -> Path:
    directory.mkdir()
    for key in secret["data"]:
        (directory / key).write_bytes(b64(secret, key))
    return directory


async def test_generated_certificates_and_etcd_flags_work_with_real_etcd(
    helm: Helm, tools: Tools, tmp_path: Path
) -> None:
    docs = helm.template("t", "nf", "--set", "etcd.replicas=3")
    server = write_secret(find(docs, "Secret", "-server-tls"), tmp_path / "server")
    client = write_secret(find(docs, "Secret", "-client-tls"), tmp_path / "client")
    sts_args = container(find(docs, "StatefulSet"))["args"]
    host, _, port = flags(container(find(docs, "Deployment"))["args"])["--etcd-endpoints"].rpartition(":")
    assert port == "2379"

    # The chart's own flags, with only the per-pod network identity and the paths swapped for loopback ones.
    network = {"--name", "--data-dir", "--listen-client-urls", "--advertise-client-urls", "--listen-peer-urls",
               "--initial-advertise-peer-urls", "--initial-cluster", "--listen-metrics-urls"}
    kept = [a.replace("/etc/etcd/tls/", f"{server}/") for a in sts_args if a.split("=")[0] not in network]
    assert {a.split("=")[0] for a in sts_args} - {a.split("=")[0] for a in kept} == network
    cport, pport, mport = free_port(), free_port(), free_port()
    argv = [str(tools.etcd), *kept, "--name=m0", f"--data-dir={tmp_path / 'data'}",
            f"--listen-client-urls=https://127.0.0.1:{cport}", f"--advertise-client-urls=https://127.0.0.1:{cport}",
            f"--listen-peer-urls=https://127.0.0.1:{pport}",
            f"--initial-advertise-peer-urls=https://127.0.0.1:{pport}",
            f"--initial-cluster=m0=https://127.0.0.1:{pport}", f"--listen-metrics-urls=http://127.0.0.1:{mport}",
            "--log-level=warn"]
    etcd = ManagedProcess("chart-etcd", argv, tmp_path / "etcd.log")

    def probe(path: str) -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}{path}", timeout=1) as resp:
            return bool(resp.status == 200)

    etcd.start()
    try:
        etcd.wait_until(lambda: probe("/readyz"), 30, "ready")  # the chart's startup/readiness path
        assert probe("/livez")  # the chart's liveness path

        def config(**kw: Any) -> EtcdConfig:
            return EtcdConfig(endpoints=[f"127.0.0.1:{cport}"], prefix="/helm-test/", timeout=3, **kw)

        # Mutual TLS with the client Secret, verifying the very host name the chart configures.
        store = EtcdStore(config(ca_file=client / "ca.crt", cert_file=client / "tls.crt",
                                 key_file=client / "tls.key", tls_server_name=host))
        await store.connect()
        try:
            await store.write({"meta/schema": b'{"schema": 1}'}, None)
            got = await store.get("meta/schema")
            assert got is not None and json.loads(got.value) == {"schema": 1}
        finally:
            await store.close()
        # etcd refuses a client without a certificate, and the client refuses a server name the cert lacks.
        for bad in (config(ca_file=client / "ca.crt", tls_server_name=host),
                    config(ca_file=client / "ca.crt", cert_file=client / "tls.crt", key_file=client / "tls.key",
                           tls_server_name="elsewhere.example.net")):
            store = EtcdStore(bad)
            with pytest.raises(StoreError):
                await asyncio.wait_for(store.connect(), 20)
            await store.close()
    finally:
        etcd.stop()

    # Every peer host name of --initial-cluster is covered by a SAN of the server certificate.
    names = dns_names(server / "tls.crt")
    for member in flags(sts_args)["--initial-cluster"].split(","):
        peer_host = member.split("=", 1)[1].removeprefix("https://").rsplit(":", 1)[0]
        assert "*." + peer_host.split(".", 1)[1] in names, (peer_host, names)
    assert host in names


# --- install, RBAC, helm test, upgrade, uninstall (one release, in this order) ---------------


def listed(cluster: LocalCluster, release: Release, types: Sequence[str]) -> set[tuple[str, str, str]]:
    items = kubectl_json(cluster, "get", ",".join(types), "-A", "-l", f"{INSTANCE}={release.name}")["items"]
    return {identity(i) for i in items}


def test_install_creates_every_rendered_object(helm: Helm, cluster: LocalCluster, release: Release) -> None:
    rendered = [d for d in helm.template(release.name, release.namespace) if not is_hook(d)]
    expected = {identity(d) for d in rendered}
    types = sorted({resource(d) for d in rendered} | set(NEVER))
    assert listed(cluster, release, types) == expected
    # The release's manifest is the same set of objects.
    manifest = helm.run("get", "manifest", release.name, "-n", release.namespace).stdout
    assert {identity(d) for d in yaml.safe_load_all(manifest) if d} == expected
    # The CRD is now the chart's (labels of this release) and still Established.
    crd = kubectl_json(cluster, "get", "crd", CRD_NAME)
    assert crd["metadata"]["labels"][INSTANCE] == release.name
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions["Established"] == "True"
    status = helm.run("status", release.name, "-n", release.namespace).stdout
    assert "STATUS: deployed" in status and "kubectl get policystatus" in status


AGENT_FORBIDDEN = [
    ("pods", ""), ("networkpolicies.networking.k8s.io", ""), (CRD_NAME, ""), (CRD_NAME, "status"),
    ("nodes", ""), ("secrets", ""), ("configmaps", ""), ("namespaces", ""), ("events", ""),
    ("serviceaccounts", ""), ("deployments.apps", ""), ("daemonsets.apps", ""),
    ("customresourcedefinitions.apiextensions.k8s.io", ""), ("clusterroles.rbac.authorization.k8s.io", ""),
]


def test_agent_service_account_can_change_nothing(cluster: LocalCluster, release: Release) -> None:
    sa = f"{release.fullname}-agent"
    for what, sub in AGENT_FORBIDDEN:
        for verb in ("create", "update", "patch", "delete"):
            assert not can_i(cluster, release.namespace, sa, verb, what, sub), (verb, what, sub)
    assert not can_i(cluster, release.namespace, sa, "get", "secrets")
    assert not can_i(cluster, release.namespace, sa, "list", "pods")
    # Nothing binds a role to it: its rules are only the built-in self-review ones every account has.
    rules = cluster.kubectl("auth", "can-i", "--list", "-n", release.namespace,
                            f"--as=system:serviceaccount:{release.namespace}:{sa}").stdout
    resources = {line.split()[0] for line in rules.splitlines()[1:] if line and not line.startswith(" ")}
    resources = {r for r in resources if not r.startswith("[")}  # non-resource URLs (discovery)
    assert resources <= {"selfsubjectreviews.authentication.k8s.io",
                         "selfsubjectaccessreviews.authorization.k8s.io",
                         "selfsubjectrulesreviews.authorization.k8s.io"}, rules
    bindings = kubectl_json(cluster, "get", "rolebindings,clusterrolebindings", "-A")["items"]
    for binding in bindings:
        for subject in binding.get("subjects") or []:
            assert not (subject.get("kind") == "ServiceAccount" and subject.get("name") == sa), binding


def test_controller_rbac_is_least_privilege(cluster: LocalCluster, release: Release) -> None:
    sa = f"{release.fullname}-controller"
    ns = release.namespace
    for where in (ns, "default"):
        for verb in ("create", "update", "patch", "delete"):
            for what in ("pods", "networkpolicies.networking.k8s.io", "namespaces", "nodes", "secrets"):
                assert not can_i(cluster, ns, sa, verb, what, where=where), (where, verb, what)
        for verb in ("get", "list", "watch"):
            for what in ("pods", "networkpolicies.networking.k8s.io", "namespaces", "nodes"):
                assert can_i(cluster, ns, sa, verb, what, where=where), (where, verb, what)
        assert can_i(cluster, ns, sa, "create", "events", where=where)
        assert can_i(cluster, ns, sa, "patch", "events", where=where)
        assert not can_i(cluster, ns, sa, "get", "secrets", where=where)
        assert not can_i(cluster, ns, sa, "get", "configmaps", where=where)
    for verb in ("get", "list", "watch", "create", "update", "patch", "delete"):
        assert can_i(cluster, ns, sa, verb, CRD_NAME)
    assert can_i(cluster, ns, sa, "patch", CRD_NAME, "status")
    assert can_i(cluster, ns, sa, "update", CRD_NAME, "status")
    assert not can_i(cluster, ns, sa, "patch", "customresourcedefinitions.apiextensions.k8s.io")


def test_helm_test_script_checks_the_crd_and_the_controller(
    helm: Helm, cluster: LocalCluster, release: Release, tmp_path: Path
) -> None:
    """Runs the test hook's script here, with the hook's own ServiceAccount and RBAC (no kubelet to run the Pod)."""
    hooks = helm.template(release.name, release.namespace, "--show-only", "templates/tests/test-ready.yaml")
    [pod] = [d for d in hooks if d["kind"] == "Pod"]
    rbac = [d for d in hooks if d["kind"] != "Pod"]
    assert all(is_hook(d) and d["metadata"]["annotations"]["helm.sh/hook"] == "test" for d in hooks)
    manifest = "\n---\n".join(yaml.safe_dump(d) for d in rbac)
    cluster.kubectl("apply", "-n", release.namespace, "-f", "-", input=manifest)
    try:
        sa = pod["spec"]["serviceAccountName"]
        token = cluster.kubectl("create", "token", sa, "-n", release.namespace).stdout.strip()
        (tmp_path / "token").write_text(token)
        kubeconfig = yaml.safe_load(cluster.kubeconfig.read_text())
        (tmp_path / "ca.crt").write_bytes(
            base64.b64decode(kubeconfig["clusters"][0]["cluster"]["certificate-authority-data"]))
        ctr = pod["spec"]["containers"][0]
        assert ctr["command"][:2] == ["python", "-c"]
        assert ctr["command"][2] == (CHART / "files" / "helm-test.py").read_text()
        env = {e["name"]: e["value"] for e in ctr["env"]} | {
            "NETFENCE_TEST_API": cluster.api_url, "NETFENCE_TEST_TOKEN_FILE": str(tmp_path / "token"),
            "NETFENCE_TEST_CA_FILE": str(tmp_path / "ca.crt"), "NETFENCE_TEST_TIMEOUT": "1",
        }
        assert env["NETFENCE_TEST_DEPLOYMENT"] == f"{release.fullname}-controller"

        def run() -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-c", ctr["command"][2]], env=env, capture_output=True,
                                  text=True, timeout=60, check=False)

        # No kubelet: the controller never becomes ready, and the test says so.
        result = run()
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"ok: CRD {CRD_NAME} serves" in result.stdout
        assert f"FAIL: controller {release.namespace}/{release.fullname}-controller has no ready replica" \
            in result.stdout
        # Once the deployment reports a ready replica, the test passes.
        cluster.kubectl("patch", "deployment", f"{release.fullname}-controller", "-n", release.namespace,
                        "--subresource=status", "--type=merge", "-p",
                        json.dumps({"status": {"replicas": 2, "updatedReplicas": 2, "readyReplicas": 1,
                                               "availableReplicas": 1}}))
        result = run()
        assert result.returncode == 0, result.stdout + result.stderr
        assert "has 1 ready replica(s)" in result.stdout
    finally:
        cluster.kubectl("delete", "-n", release.namespace, "-f", "-", "--ignore-not-found", input=manifest)


def add_optional_crd_field(chart: Path) -> None:
    path = chart / "files" / "clusterpolicystatus.yaml"
    crd = yaml.safe_load(path.read_text())
    for version in crd["spec"]["versions"]:
        spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
        spec["properties"]["comment"] = {"type": "string", "maxLength": 256,
                                         "description": "A note from whoever owns the policy."}
    path.write_text(yaml.safe_dump(crd, sort_keys=False))
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    meta["version"] = "0.1.1-helmtest"
    (chart / "Chart.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))


def test_upgrade_reaches_the_api_server_and_keeps_the_certificates(
    helm: Helm, cluster: LocalCluster, release: Release, tmp_path: Path
) -> None:
    ns = release.namespace

    def snapshot() -> dict[str, Any]:
        def template_annotations(kind: str, name: str) -> dict[str, str]:
            obj = kubectl_json(cluster, "get", kind, name, "-n", ns)
            return dict(obj["spec"]["template"]["metadata"].get("annotations") or {})

        return {
            "client": kubectl_json(cluster, "get", "secret", f"{release.fullname}-etcd-client-tls", "-n", ns)["data"],
            "server": kubectl_json(cluster, "get", "secret", f"{release.fullname}-etcd-server-tls", "-n", ns)["data"],
            "deploy": template_annotations("deployment", f"{release.fullname}-controller"),
            "ds": template_annotations("daemonset", f"{release.fullname}-agent"),
            "sts": template_annotations("statefulset", f"{release.fullname}-etcd"),
        }

    before = snapshot()
    assert "checksum/etcd-client-tls" in before["deploy"]
    chart = tmp_path / "netfence"
    shutil.copytree(CHART, chart)
    add_optional_crd_field(chart)
    helm.run("upgrade", release.name, str(chart), "-n", ns, "--reuse-values", "--set", "controller.replicas=3")

    deploy = kubectl_json(cluster, "get", "deployment", f"{release.fullname}-controller", "-n", ns)
    assert deploy["spec"]["replicas"] == 3
    for version in crd_versions(cluster):
        spec_schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
        assert spec_schema["properties"]["comment"]["type"] == "string", version["name"]
    # The field is really served: the API server keeps it instead of pruning it.
    name = f"{ns}.upgrade-field"
    cluster.kubectl("create", "-f", "-", input=policy_status(name, {"comment": "hello"}))
    cluster.kubectl("label", CRD_NAME, name, f"helm-test={ns}")
    assert kubectl_json(cluster, "get", CRD_NAME, name)["spec"]["comment"] == "hello"
    cluster.kubectl("delete", CRD_NAME, name)
    # Certificates (looked up, not regenerated) and so the pods' checksums are unchanged: no restart for nothing.
    assert snapshot() == before
    history = json.loads(helm.run("history", release.name, "-n", ns, "-o", "json").stdout)
    assert [h["status"] for h in history] == ["superseded", "deployed"]

    # Back to the repository's chart: the CRD follows it again (the field is gone), replicas are kept.
    helm.run("upgrade", release.name, str(CHART), "-n", ns, "--reuse-values")
    for version in crd_versions(cluster):
        assert "comment" not in version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    deploy = kubectl_json(cluster, "get", "deployment", f"{release.fullname}-controller", "-n", ns)
    assert deploy["spec"]["replicas"] == 3
    assert snapshot() == before


def test_uninstall_removes_everything_but_what_is_kept(
    helm: Helm, cluster: LocalCluster, release: Release
) -> None:
    rendered = [d for d in helm.template(release.name, release.namespace) if not is_hook(d)]
    # A status object stands for the users' data the CRD protects.
    name = f"{release.namespace}.kept"
    cluster.kubectl("create", "-f", "-", input=policy_status(name))
    cluster.kubectl("label", CRD_NAME, name, f"helm-test={release.namespace}")

    result = helm.run("uninstall", release.name, "-n", release.namespace)
    assert "kept due to the resource policy" in result.stdout, result.stdout
    assert CRD_NAME in result.stdout

    types = sorted({resource(d) for d in rendered} | set(NEVER) | {"secret"})
    left = listed(cluster, release, types)
    assert left == {("CustomResourceDefinition", "", CRD_NAME)}
    for doc in rendered:
        args = ["get", resource(doc), doc["metadata"]["name"], "--ignore-not-found", "-o", "name"]
        if doc["metadata"].get("namespace"):
            args += ["-n", doc["metadata"]["namespace"]]
        found = cluster.kubectl(*args).stdout.strip()
        assert bool(found) == (doc["kind"] == "CustomResourceDefinition"), (identity(doc), found)
    # The users' status objects survive; so would the etcd PVCs (none here: no StatefulSet controller).
    assert kubectl_json(cluster, "get", CRD_NAME, name)["spec"]["policyRef"] == f"helm/{name}"
    assert kubectl_json(cluster, "get", "pvc", "-n", release.namespace)["items"] == []
    # Helm's own release records are gone too.
    assert kubectl_json(cluster, "get", "secrets", "-n", release.namespace, "-l", "owner=helm")["items"] == []
    cluster.kubectl("delete", CRD_NAME, name)
    install_doc = (REPO / "docs" / "install.md").read_text()
    assert "helm.sh/resource-policy: keep" in install_doc
    assert f"kubectl delete pvc -n <namespace> -l {INSTANCE}=<release>" in install_doc



# --- priority: critical pods admitted outside kube-system (issue 14, point 3) ------------------

CRITICAL = ("system-node-critical", "system-cluster-critical")
# The API server's ResourceQuota admission limiting the critical classes to namespaces with a
# covering quota, as GKE configures it (kubernetes.io/docs/concepts/policy/resource-quotas,
# "Limit Priority Class consumption by default").
LIMITED_PRIORITY_ADMISSION = {
    "apiVersion": "apiserver.config.k8s.io/v1",
    "kind": "AdmissionConfiguration",
    "plugins": [{
        "name": "ResourceQuota",
        "configuration": {
            "apiVersion": "apiserver.config.k8s.io/v1",
            "kind": "ResourceQuotaConfiguration",
            "limitedResources": [{
                "resource": "pods",
                "matchScopes": [{"scopeName": "PriorityClass", "operator": "In", "values": list(CRITICAL)}],
            }],
        },
    }],
}


def quota_scope(quota: dict[str, Any]) -> list[str]:
    [expr] = quota["spec"]["scopeSelector"]["matchExpressions"]
    assert (expr["scopeName"], expr["operator"]) == ("PriorityClass", "In")
    return list(expr["values"])


def test_priority_classes_and_the_critical_pods_quota(helm: Helm) -> None:
    docs = helm.template("t", "nf")
    classes = {kind: find(docs, kind)["spec"]["template"]["spec"].get("priorityClassName")
               for kind in ("DaemonSet", "Deployment", "StatefulSet")}
    assert classes == {"DaemonSet": "system-node-critical", "Deployment": "system-cluster-critical",
                       "StatefulSet": "system-cluster-critical"}
    quota = find(docs, "ResourceQuota", "-critical-pods")
    assert quota["metadata"]["namespace"] == "nf"
    assert sorted(quota_scope(quota)) == sorted(CRITICAL)
    assert quota["spec"]["hard"] == {"pods": "10000"}
    # Overridable; the quota follows the classes the pods use.
    docs = helm.template("t", "nf", "--set", "controller.priorityClassName=netfence-high",
                         "--set", "etcd.priorityClassName=", "--set", "priority.criticalPodsQuota.pods=50")
    assert container(find(docs, "Deployment"))  # rendered
    assert find(docs, "Deployment")["spec"]["template"]["spec"]["priorityClassName"] == "netfence-high"
    assert "priorityClassName" not in find(docs, "StatefulSet")["spec"]["template"]["spec"]
    quota = find(docs, "ResourceQuota")
    assert quota_scope(quota) == ["netfence-high", "system-node-critical"]
    assert quota["spec"]["hard"] == {"pods": "50"}
    # External etcd: its class is not the chart's business.
    assert sorted(quota_scope(find(helm.template("t", "nf", *EXTERNAL), "ResourceQuota"))) == sorted(CRITICAL)
    # No quota when disabled, or when no pod has a priority class.
    assert not [d for d in helm.template("t", "nf", "--set", "priority.criticalPodsQuota.enabled=false")
                if d["kind"] == "ResourceQuota"]
    none = ("--set", "agent.priorityClassName=", "--set", "controller.priorityClassName=",
            "--set", "etcd.priorityClassName=")
    assert not [d for d in helm.template("t", "nf", *none) if d["kind"] == "ResourceQuota"]


class LimitedPriorityApiServer(KubeApiServer):
    """A second kube-apiserver (own etcd prefix) whose ResourceQuota admission limits the critical classes."""

    def __init__(self, *args: Any, admission_config: Path, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.admission_config = admission_config

    def argv(self) -> list[str]:
        return [*super().argv(), f"--admission-control-config-file={self.admission_config}"]


@dataclass(frozen=True)
class Kubectl:
    binary: Path
    kubeconfig: Path

    def __call__(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(self.binary), f"--kubeconfig={self.kubeconfig}", *args], input=input,
                                capture_output=True, text=True, timeout=60, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
        return result


@pytest.fixture(scope="module")
def limited_priority_api(cluster: LocalCluster, tools: Tools,
                         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kubectl]:
    work = tmp_path_factory.mktemp("limited-priority-api")
    config = work / "admission.yaml"
    config.write_text(yaml.safe_dump(LIMITED_PRIORITY_ADMISSION))
    assert cluster.api_etcd is not None
    server = LimitedPriorityApiServer(
        tools.kube_apiserver, work, cluster.api_etcd.url, pki=cluster.apiserver.pki,
        name="kube-apiserver-limited-priority", etcd_prefix=f"/registry-limited-{uuid.uuid4().hex[:8]}",
        admission_config=config,
    )
    server.start(timeout=120)
    try:
        yield Kubectl(tools.kubectl, server.kubeconfig)
    finally:
        server.stop()


def pod_of(workload: dict[str, Any], name: str) -> dict[str, Any]:
    """The Pod the workload's controller would create (there is none here), with its template's spec."""
    template = workload["spec"]["template"]
    spec = dict(template["spec"])
    for claim in workload["spec"].get("volumeClaimTemplates", []):
        claim_name = claim["metadata"]["name"]
        spec["volumes"] = [*spec.get("volumes", []),
                           {"name": claim_name, "persistentVolumeClaim": {"claimName": f"{claim_name}-{name}"}}]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": workload["metadata"]["namespace"],
                         "labels": template["metadata"]["labels"]},
            "spec": spec}


def test_critical_pods_are_admitted_outside_kube_system_with_the_chart_quota(
    helm: Helm, limited_priority_api: Kubectl
) -> None:
    kubectl = limited_priority_api
    ns = f"netfence-prio-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", ns)
    docs = helm.template("prio", ns)
    pods = {kind: pod_of(find(docs, kind), f"prio-{kind.lower()}-0")
            for kind in ("DaemonSet", "Deployment", "StatefulSet")}
    # This API server limits the critical classes: without the quota the agent is refused.
    refused = kubectl("create", "-f", "-", input=json.dumps(pods["DaemonSet"]), check=False)
    assert refused.returncode != 0, refused.stdout
    assert "insufficient quota to match these scopes" in refused.stderr, refused.stderr
    assert "PriorityClass" in refused.stderr and "system-node-critical" in refused.stderr

    quota = find(docs, "ResourceQuota")
    kubectl("create", "-f", "-", input=json.dumps(quota))
    # What the quota controller (not running here) would write: the quota is known and nothing used.
    kubectl("patch", "resourcequota", quota["metadata"]["name"], "-n", ns, "--subresource=status",
            "--type=merge", "-p", json.dumps({"status": {"hard": quota["spec"]["hard"], "used": {"pods": "0"}}}))
    priorities = {}
    for kind, pod in pods.items():
        created = json.loads(kubectl("create", "-f", "-", "-o", "json", input=json.dumps(pod)).stdout)
        priorities[kind] = (created["spec"]["priorityClassName"], created["spec"]["priority"])
    # The Priority admission resolved the built-in classes.
    assert priorities == {"DaemonSet": ("system-node-critical", 2000001000),
                          "Deployment": ("system-cluster-critical", 2000000000),
                          "StatefulSet": ("system-cluster-critical", 2000000000)}
    used = json.loads(kubectl("get", "resourcequota", quota["metadata"]["name"], "-n", ns, "-o", "json").stdout)
    assert used["status"]["used"]["pods"] == "3"
    # A pod of another namespace without the quota is still refused: the quota is per namespace.
    other = f"{ns}-other"
    kubectl("create", "namespace", other)
    stray = pods["DaemonSet"] | {"metadata": {"name": "stray", "namespace": other}}
    assert kubectl("create", "-f", "-", input=json.dumps(stray), check=False).returncode != 0


# --- guards (issue 14, point 4) ----------------------------------------------------------------


def test_zero_controller_replicas_needs_allow_zero(helm: Helm) -> None:
    result = helm.run("template", "t", str(CHART), "--set", "controller.replicas=0", check=False)
    assert result.returncode != 0
    assert "controller.replicas is 0: no controller would run" in result.stderr, result.stderr
    assert "controller.allowZero=true" in result.stderr
    docs = helm.template("t", "nf", "--set", "controller.replicas=0", "--set", "controller.allowZero=true")
    assert find(docs, "Deployment")["spec"]["replicas"] == 0
    assert not [d for d in docs if d["kind"] == "PodDisruptionBudget" and d["metadata"]["name"].endswith("-controller")]


def test_chart_declares_the_kubernetes_versions_it_supports(helm: Helm, cluster: LocalCluster) -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["kubeVersion"] == ">=1.25.0-0"
    assert "Kubernetes ≥ 1.25" in (REPO / "docs" / "install.md").read_text()
    old = helm.run("template", "t", str(CHART), "--kube-version", "1.24.17", check=False)
    assert old.returncode != 0
    assert "chart requires kubeVersion: >=1.25.0-0 which is incompatible with Kubernetes v1.24.17" in old.stderr
    for version in ("1.25.0", "1.30.2-gke.1587003", "1.35.4"):
        assert helm.template("t", "nf", "--kube-version", version)
    # The real API server's version is accepted (what `helm install` checks).
    server = json.loads(cluster.kubectl("version", "-o", "json").stdout)["serverVersion"]["gitVersion"]
    assert helm.template("t", "nf", "--kube-version", server)


def test_changing_etcd_replicas_of_an_installed_release_is_refused(
    helm: Helm, cluster: LocalCluster, namespace: str
) -> None:
    rel = "nfg"
    sts = f"{rel}-netfence-etcd"
    base = ("--set", "crds.install=false", "--set", "etcd.persistence.enabled=false")
    helm.run("install", rel, str(CHART), "--namespace", namespace, *base)
    try:
        before = kubectl_json(cluster, "get", "statefulset", sts, "-n", namespace)
        message = (f"etcd.replicas cannot change on an existing release: StatefulSet {namespace}/{sts} runs "
                   "1 member(s)")
        attempts = {
            "upgrade": ("upgrade", rel, str(CHART), "-n", namespace, "--reuse-values", "--set", "etcd.replicas=3"),
            "upgrade --dry-run=server": ("upgrade", rel, str(CHART), "-n", namespace, "--reuse-values",
                                         "--set", "etcd.replicas=3", "--dry-run=server"),
            "template --dry-run=server": ("template", rel, str(CHART), "-n", namespace, *base,
                                          "--set", "etcd.replicas=3", "--dry-run=server"),
        }
        for what, argv in attempts.items():
            result = helm.run(*argv, check=False)
            assert result.returncode != 0, (what, result.stdout[-500:])
            assert message in result.stderr, (what, result.stderr)
            assert "etcd.replicas is now 3" in result.stderr and "Keep etcd.replicas=1" in result.stderr
        after = kubectl_json(cluster, "get", "statefulset", sts, "-n", namespace)
        assert after["spec"] == before["spec"]
        history = json.loads(helm.run("history", rel, "-n", namespace, "-o", "json").stdout)
        assert [h["status"] for h in history] == ["deployed"]
        # An upgrade that keeps the member count passes the guard.
        helm.run("upgrade", rel, str(CHART), "-n", namespace, "--reuse-values", "--set", "controller.replicas=1")
        history = json.loads(helm.run("history", rel, "-n", namespace, "-o", "json").stdout)
        assert [h["status"] for h in history] == ["superseded", "deployed"]
        assert kubectl_json(cluster, "get", "statefulset", sts, "-n", namespace)["spec"]["replicas"] == 1
    finally:
        helm.run("uninstall", rel, "--namespace", namespace, check=False)
    # A fresh install (nothing to look up) may choose either member count.
    assert find(helm.template(rel, namespace, "--set", "etcd.replicas=3", "--dry-run=server"),
                "StatefulSet")["spec"]["replicas"] == 3


# --- chart metadata (issue 14, point 6) --------------------------------------------------------


def test_chart_readme_is_generated_current_and_shown(helm: Helm, tools: Tools, tmp_path: Path) -> None:
    check = subprocess.run(["bash", str(REPO / "hack" / "chart-readme.sh"), "--check"],
                           capture_output=True, text=True, timeout=300, check=False)
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-2000:]
    assert (cache_dir() / "bin" / "helm-docs").exists()
    # The packaged chart carries it: `helm show readme` is the README.
    helm.run("package", str(CHART), "--destination", str(tmp_path))
    [package] = tmp_path.glob("netfence-*.tgz")
    shown = helm.run("show", "readme", str(package)).stdout
    assert shown.strip() == (CHART / "README.md").read_text().strip()
    assert "## Values" in shown and "| etcd.tls.method |" in shown
    meta = yaml.safe_load(helm.run("show", "chart", str(package)).stdout)
    assert meta["icon"].startswith("https://") and meta["icon"].endswith("/helm/netfence/icon.svg")


def test_image_digests(helm: Helm) -> None:
    digest = "sha256:" + "ab" * 32
    docs = helm.template("t", "nf", "--set", f"controller.image.digest={digest}",
                         "--set", f"agent.image.digest={digest}", "--set", f"etcd.image.digest={digest}",
                         "--set", "agent.image.tag=9.9.9")
    assert container(find(docs, "Deployment"))["image"] == f"ghcr.io/netfence/netfence-controller@{digest}"
    assert container(find(docs, "DaemonSet"))["image"] == f"ghcr.io/netfence/netfence-agent@{digest}"
    assert container(find(docs, "StatefulSet"))["image"] == f"registry.k8s.io/etcd@{digest}"
    hook = next(d for d in docs if d["kind"] == "Pod" and is_hook(d))
    assert hook["spec"]["containers"][0]["image"] == f"ghcr.io/netfence/netfence-controller@{digest}"
    # Only the digest moves: without one, each image keeps its tag.
    docs = helm.template("t", "nf", "--set", f"agent.image.digest={digest}")
    assert container(find(docs, "StatefulSet"))["image"] == "registry.k8s.io/etcd:3.5.21-0"
    bad = helm.run("template", "t", str(CHART), "--set", "agent.image.digest=latest", check=False)
    assert bad.returncode != 0 and "at '/agent/image/digest'" in bad.stderr, bad.stderr


DEFAULT_SECURITY = {
    "Deployment": ({"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                    "seccompProfile": {"type": "RuntimeDefault"}},
                   {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "privileged": False,
                    "capabilities": {"drop": ["ALL"]}}),
    "DaemonSet": ({"seccompProfile": {"type": "RuntimeDefault"}},
                  {"runAsUser": 0, "runAsNonRoot": False, "privileged": False, "allowPrivilegeEscalation": False,
                   "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}}),
    "StatefulSet": ({"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532,
                     "seccompProfile": {"type": "RuntimeDefault"}},
                    {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "privileged": False,
                     "capabilities": {"drop": ["ALL"]}}),
}


def test_security_contexts_default_to_todays_and_can_be_overridden(
    helm: Helm, cluster: LocalCluster, namespace: str
) -> None:
    docs = helm.template("t", "nf")
    for kind, (pod_sc, ctr_sc) in DEFAULT_SECURITY.items():
        workload = find(docs, kind)
        assert workload["spec"]["template"]["spec"]["securityContext"] == pod_sc, kind
        assert container(workload)["securityContext"] == ctr_sc, kind
    # OpenShift's restricted SCC assigns uid, gid and fsGroup itself: null them.
    openshift = [a for key in ("runAsUser", "runAsGroup", "fsGroup") for component in ("controller", "etcd")
                 for a in ("--set", f"{component}.podSecurityContext.{key}=null")]
    docs = helm.template("t", namespace, *openshift, "--set", "agent.securityContext.readOnlyRootFilesystem=false")
    for kind in ("Deployment", "StatefulSet"):
        pod_sc = find(docs, kind)["spec"]["template"]["spec"]["securityContext"]
        assert pod_sc == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}, kind
    assert container(find(docs, "DaemonSet"))["securityContext"]["readOnlyRootFilesystem"] is False
    hook = next(d for d in docs if d["kind"] == "Pod" and is_hook(d))
    assert hook["spec"]["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    # The API server accepts the overridden workloads.
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet")]
    manifest = "\n---\n".join(yaml.safe_dump(d) for d in workloads)
    cluster.kubectl("apply", "--dry-run=server", "--validate=strict", "-n", namespace, "-f", "-", input=manifest)


def test_version_labels_follow_the_image_tags(helm: Helm) -> None:
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    version = "app.kubernetes.io/version"

    def versions(docs: list[dict[str, Any]], kind: str) -> tuple[str, str]:
        workload = find(docs, kind)
        assert version not in workload["spec"]["selector"]["matchLabels"]  # selectors never change
        return workload["metadata"]["labels"][version], workload["spec"]["template"]["metadata"]["labels"][version]

    docs = helm.template("t", "nf")
    assert versions(docs, "Deployment") == (app_version, app_version)
    assert versions(docs, "DaemonSet") == (app_version, app_version)
    assert versions(docs, "StatefulSet") == ("3.5.21-0", "3.5.21-0")
    docs = helm.template("t", "nf", "--set", "controller.image.tag=1.2.3-rc.1", "--set", "agent.image.tag=v2+build.7")
    assert versions(docs, "Deployment") == ("1.2.3-rc.1", "1.2.3-rc.1")
    assert find(docs, "Service", "-controller")["metadata"]["labels"][version] == "1.2.3-rc.1"
    assert versions(docs, "DaemonSet") == ("v2_build.7", "v2_build.7")  # "+" is not allowed in a label value
    assert find(docs, "CustomResourceDefinition")["metadata"]["labels"][version] == app_version


def notes(helm: Helm, namespace: str, *values: str) -> str:
    # A dry run changes nothing; --take-ownership only skips the check that the CRD, owned by
    # another release of this module, could be adopted.
    out = helm.run("install", "notes", str(CHART), "-n", namespace, "--dry-run=server", "--take-ownership",
                   *values).stdout
    return out.split("NOTES:\n", 1)[1]


@pytest.mark.parametrize(("keep", "persistence", "crds", "external"),
                         [(*combo, True, False) for combo in itertools.product([True, False], repeat=2)]
                         + [(True, True, False, False), (True, True, True, True), (False, True, True, True)],
                         ids=lambda v: str(v).lower())
def test_notes_are_correct_for_every_combination(
    helm: Helm, namespace: str, keep: bool, persistence: bool, crds: bool, external: bool
) -> None:
    values = ["--set", f"crds.keep={str(keep).lower()}", "--set", f"crds.install={str(crds).lower()}",
              "--set", f"etcd.persistence.enabled={str(persistence).lower()}"]
    if external:
        values += list(EXTERNAL)
    text = notes(helm, namespace, *values)
    kept = []
    if crds and keep:
        kept.append("the ClusterPolicyStatus CRD (and every ClusterPolicyStatus)")
    if persistence and not external:
        kept.append("the etcd volumes (PVCs data-notes-netfence-etcd-N)")
    if kept:
        assert f"`helm uninstall` keeps {' and '.join(kept)} on purpose; see docs/install.md." in text, text
    else:
        assert "`helm uninstall` removes every object of the release; nothing is kept." in text, text
    assert ("crds.keep=false: uninstalling deletes the ClusterPolicyStatus CRD" in text) == (crds and not keep)
    assert ("WARNING: etcd.persistence.enabled=false" in text) == (not persistence and not external)
    assert ("crds.install=false" in text) == (not crds)
    # Well-formed: no empty subject, no doubled words or spaces, every sentence ends.
    for line in text.splitlines():
        assert "  " not in line.strip(), line
        assert not re.search(r"\b(keeps|and) (and|on purpose)\b", line), line
        assert "()" not in line and " ." not in line, line
    assert text.startswith("Netfence ") and "\n\netcd: " in text and "\n\n`helm uninstall`" in text


# --- certificates: etcd.tls.method (issue 14, point 2) -----------------------------------------


def test_tls_method_helm_generates_secrets_and_is_not_deterministic(helm: Helm) -> None:
    first, second = (helm.run("template", "t", str(CHART), "-n", "nf").stdout for _ in range(2))
    # Documented: without the cluster, `lookup` finds nothing and every render makes a new CA.
    assert first != second
    docs = [d for d in yaml.safe_load_all(first) if d]
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"} == {
        "t-netfence-etcd-server-tls", "t-netfence-etcd-client-tls"}
    assert not [d for d in docs if d["kind"] in CERT_MANAGER_KINDS]
    assert "checksum/etcd-client-tls" in find(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]


@pytest.mark.parametrize("values", [CERT_MANAGER, EXISTING_TLS, (*CERT_MANAGER, *THREE_MEMBERS),
                                    (*CERT_MANAGER, "--set", "etcd.tls.certManager.issuerRef.kind=ClusterIssuer",
                                     "--set", "etcd.tls.certManager.issuerRef.name=corp-ca")],
                         ids=["cert-manager", "existing-secret", "cert-manager-3", "cert-manager-issuer"])
def test_gitops_tls_methods_render_byte_identical_output(helm: Helm, values: tuple[str, ...]) -> None:
    runs = [helm.run("template", "t", str(CHART), "-n", "nf", *values).stdout for _ in range(2)]
    assert runs[0] == runs[1]
    assert "BEGIN CERTIFICATE" not in runs[0] and "checksum/" not in runs[0]
    docs = [d for d in yaml.safe_load_all(runs[0]) if d]
    assert not [d for d in docs if d["kind"] == "Secret"]


def certificates(docs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "Certificate"}


def test_tls_method_cert_manager(helm: Helm) -> None:
    docs = helm.template("t", "nf", *CERT_MANAGER, "--set", "etcd.replicas=3")
    for d in docs:
        if d["kind"] in CERT_MANAGER_KINDS:
            assert d["apiVersion"] == "cert-manager.io/v1" and d["metadata"]["namespace"] == "nf"
    issuers = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Issuer"}
    assert issuers == {"t-netfence-etcd-selfsigned": {"selfSigned": {}},
                       "t-netfence-etcd-ca": {"ca": {"secretName": "t-netfence-etcd-ca"}}}
    certs = certificates(docs)
    assert set(certs) == {"t-netfence-etcd-ca", "t-netfence-etcd-server-tls", "t-netfence-etcd-client-tls"}
    ca = certs["t-netfence-etcd-ca"]["spec"]
    assert ca["isCA"] is True and ca["secretName"] == "t-netfence-etcd-ca"
    assert ca["issuerRef"] == {"group": "cert-manager.io", "kind": "Issuer", "name": "t-netfence-etcd-selfsigned"}
    server, client = certs["t-netfence-etcd-server-tls"]["spec"], certs["t-netfence-etcd-client-tls"]["spec"]
    for spec in (server, client):
        assert spec["issuerRef"] == {"group": "cert-manager.io", "kind": "Issuer", "name": "t-netfence-etcd-ca"}
        assert spec["duration"] == "2160h" and spec["renewBefore"] == "720h"
        assert spec["privateKey"]["rotationPolicy"] == "Always"
    assert {"server auth", "client auth"} <= set(server["usages"])  # etcd peers are clients of each other
    assert "server auth" not in client["usages"] and "client auth" in client["usages"]
    # The pods mount exactly the Secrets cert-manager writes.
    sts = find(docs, "StatefulSet")
    [tls] = [v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls"]
    assert tls["secret"]["secretName"] == server["secretName"] == "t-netfence-etcd-server-tls"
    for kind in ("Deployment", "DaemonSet"):
        [vol] = [v for v in find(docs, kind)["spec"]["template"]["spec"]["volumes"] if v["name"] == "etcd-client-tls"]
        assert vol["secret"]["secretName"] == client["secretName"] == "t-netfence-etcd-client-tls"
        # A renewal must not roll the pods: no checksum of the certificate.
        annotations = find(docs, kind)["spec"]["template"]["metadata"].get("annotations") or {}
        assert not [a for a in annotations if a.startswith("checksum/")]
    # The same names as the certificates the helm method generates (which test_generated_certificates_* runs).
    generated = write_secret_names(helm)
    assert set(server["dnsNames"]) == generated
    assert server["ipAddresses"] == ["127.0.0.1"]
    # The client Service and every --initial-cluster peer host are covered.
    host = flags(container(find(docs, "Deployment"))["args"])["--etcd-endpoints"].rsplit(":", 1)[0]
    assert host in server["dnsNames"]
    for member in flags(container(sts)["args"])["--initial-cluster"].split(","):
        peer = member.split("=", 1)[1].removeprefix("https://").rsplit(":", 1)[0]
        assert "*." + peer.split(".", 1)[1] in server["dnsNames"], peer
    # Your own issuer instead of the chart's CA.
    docs = helm.template("t", "nf", *CERT_MANAGER, "--set", "etcd.tls.certManager.issuerRef.kind=ClusterIssuer",
                         "--set", "etcd.tls.certManager.issuerRef.name=corp-ca")
    assert not [d for d in docs if d["kind"] == "Issuer"]
    certs = certificates(docs)
    assert set(certs) == {"t-netfence-etcd-server-tls", "t-netfence-etcd-client-tls"}
    for cert in certs.values():
        assert cert["spec"]["issuerRef"] == {"group": "cert-manager.io", "kind": "ClusterIssuer", "name": "corp-ca"}


def write_secret_names(helm: Helm) -> set[str]:
    """DNS names of the server certificate the helm method generates."""
    secret = find(helm.template("t", "nf", "--set", "etcd.replicas=3"), "Secret", "-server-tls")
    out = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName"], input=b64(secret, "tls.crt"),
                         capture_output=True, check=True).stdout.decode()
    return set(re.findall(r"DNS:([^,\s]+)", out))


def test_tls_method_existing_secret(helm: Helm) -> None:
    docs = helm.template("t", "nf", *EXISTING_TLS)
    assert not [d for d in docs if d["kind"] in ("Secret", *CERT_MANAGER_KINDS)]
    [tls] = [v for v in find(docs, "StatefulSet")["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls"]
    assert tls["secret"]["secretName"] == "my-server"
    for kind in ("Deployment", "DaemonSet"):
        [vol] = [v for v in find(docs, kind)["spec"]["template"]["spec"]["volumes"] if v["name"] == "etcd-client-tls"]
        assert vol["secret"]["secretName"] == "my-client"
    # Naming Secrets without choosing the method, or the method without the Secrets, is refused.
    for values, message in (
        (("--set", "etcd.tls.existingSecret=a", "--set", "etcd.tls.existingClientSecret=b"),
         "at '/etcd/tls/method': value must be 'existingSecret'"),
        (("--set", "etcd.tls.method=existingSecret"), "at '/etcd/tls/existingSecret': minLength: got 0, want 1"),
        (("--set", "etcd.tls.method=vault"), "at '/etcd/tls/method': value must be one of"),
    ):
        result = helm.run("template", "t", str(CHART), *values, check=False)
        assert result.returncode != 0 and message in result.stderr, (values, result.stderr)
