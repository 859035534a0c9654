"""The chart's ClusterNetworkPolicy CRD is the pinned network-policy-api module's, unmodified.

hack/fetch-cnp-crd.sh --vendor writes helm/netfence/files/vendor/clusternetworkpolicies.yaml with a
header naming the module version and the sha256 of the upstream file; ``--check`` compares it
with the module itself (needs the Go module proxy). Offline, this test checks the header against
the body and against the version pinned in hack/tools/network-policy-api/go.mod, and that the
CRD serves what the controller reads.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import yaml

from netfence.model.cluster_policy import API_GROUP, API_VERSIONS, PLURAL

REPO = Path(__file__).resolve().parents[2]
CHART_COPY = REPO / "helm/netfence/files/vendor/clusternetworkpolicies.yaml"
GO_MOD = REPO / "hack/tools/network-policy-api/go.mod"


def test_vendored_crd_matches_its_header_and_the_pinned_module() -> None:
    text = CHART_COPY.read_text()
    first, second, body = text.split("\n", 2)
    pinned = re.search(r"sigs\.k8s\.io/network-policy-api (v\S+)", GO_MOD.read_text())
    assert pinned is not None
    assert first.startswith(f"# sigs.k8s.io/network-policy-api {pinned.group(1)} config/crd/standard/")
    digest = re.search(r"sha256 ([0-9a-f]{64})", second)
    assert digest is not None and hashlib.sha256(body.encode()).hexdigest() == digest.group(1)


def test_crd_serves_the_versions_the_controller_reads() -> None:
    crd = yaml.safe_load(CHART_COPY.read_text())
    assert crd["spec"]["group"] == API_GROUP and crd["spec"]["names"]["plural"] == PLURAL
    assert crd["spec"]["scope"] == "Cluster"
    served = {v["name"] for v in crd["spec"]["versions"] if v["served"]}
    assert set(API_VERSIONS) <= served
    assert [v["name"] for v in crd["spec"]["versions"] if v["storage"]] == [API_VERSIONS[0]]
