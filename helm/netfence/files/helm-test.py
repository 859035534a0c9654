"""`helm test netfence`: the ClusterPolicyStatus CRD is served and the controller is ready.

Runs in the netfence image with only the standard library, as the test
ServiceAccount (read-only RBAC created by the test hooks). Settings come from
the environment; NETFENCE_TEST_API/_TOKEN_FILE/_CA_FILE default to the
in-cluster API server and the mounted ServiceAccount token.
"""

import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request

CRD = "clusterpolicystatuses.netfence.dev"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
API = os.environ.get("NETFENCE_TEST_API", "https://kubernetes.default.svc")
TOKEN_FILE = os.environ.get("NETFENCE_TEST_TOKEN_FILE", f"{SA_DIR}/token")
CA_FILE = os.environ.get("NETFENCE_TEST_CA_FILE", f"{SA_DIR}/ca.crt")
NAMESPACE = os.environ["NETFENCE_TEST_NAMESPACE"]
DEPLOYMENT = os.environ["NETFENCE_TEST_DEPLOYMENT"]
TIMEOUT = float(os.environ.get("NETFENCE_TEST_TIMEOUT", "120"))


def get(path):
    with open(TOKEN_FILE) as f:
        token = f.read().strip()
    request = urllib.request.Request(API + path, headers={"Authorization": "Bearer " + token})
    context = ssl.create_default_context(cafile=CA_FILE)
    with urllib.request.urlopen(request, context=context, timeout=10) as response:
        return json.load(response)


def fail(message):
    print("FAIL: " + message, flush=True)
    sys.exit(1)


def main():
    try:
        crd = get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/" + CRD)
    except urllib.error.HTTPError as exc:
        fail(f"reading CRD {CRD}: HTTP {exc.code}")
    conditions = {c["type"]: c["status"] for c in crd.get("status", {}).get("conditions", [])}
    if conditions.get("Established") != "True":
        fail(f"CRD {CRD} is not Established: {conditions}")
    served = [v["name"] for v in crd["spec"]["versions"] if v.get("served")]
    if not served:
        fail(f"CRD {CRD} serves no version")
    for version in served:
        try:
            listing = get(f"/apis/netfence.dev/{version}/clusterpolicystatuses?limit=1")
        except urllib.error.HTTPError as exc:
            fail(f"listing clusterpolicystatuses ({version}): HTTP {exc.code}")
        print(f"ok: CRD {CRD} serves {version} ({listing.get('kind')})", flush=True)

    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            status = get(f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{DEPLOYMENT}").get("status", {})
        except urllib.error.HTTPError as exc:
            fail(f"reading deployment {NAMESPACE}/{DEPLOYMENT}: HTTP {exc.code}")
        ready = status.get("readyReplicas") or 0
        if ready >= 1:
            print(f"ok: controller {NAMESPACE}/{DEPLOYMENT} has {ready} ready replica(s)", flush=True)
            return
        if time.monotonic() >= deadline:
            fail(f"controller {NAMESPACE}/{DEPLOYMENT} has no ready replica after {TIMEOUT:.0f}s")
        time.sleep(2)


main()
