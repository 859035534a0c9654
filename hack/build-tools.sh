#!/usr/bin/env bash
# Build the pinned control-plane tools (etcd, kube-apiserver, kubectl, helm)
# and helm-docs (the chart README generator) from Go modules into a cache
# outside the checkout, once per machine.
#
#   hack/build-tools.sh            build what is missing, print the bin folder
#   hack/build-tools.sh --node     build the node tools instead (kubelet,
#                                  kube-scheduler, kube-controller-manager,
#                                  kube-proxy, coredns) for `netfence node up`;
#                                  never part of `make setup`
#   hack/build-tools.sh --peer     build the comparison peer instead:
#                                  kube-network-policies (bench/peer_bench.py,
#                                  hack/setup-peer.sh); never part of `make setup`
#   hack/build-tools.sh NAME...    build only the named tools (of either group)
#   NETFENCE_CACHE=/path ...       use another cache root (default ~/.cache/netfence)
#
# Each tool lands in $NETFENCE_CACHE/tools/<tool>-<version>-<hash of its module>/,
# so a changed pin builds anew and an unchanged one is reused in milliseconds.
# $NETFENCE_CACHE/bin holds symlinks to the current builds.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${NETFENCE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/netfence}"
mkdir -p "$cache/tools" "$cache/bin"

# One build at a time per cache: a second setup (another checkout, a parallel
# test session) waits here and then finds the tools built instead of building
# them again beside the first.
group=default
if [[ ${1:-} == --node ]]; then group=node; shift; fi
if [[ ${1:-} == --peer ]]; then group=peer; shift; fi
# The node and peer groups have locks of their own, so that their builds never
# hold up `make setup` (they build other folders of the cache).
lockfile="$cache/.build.lock"
[[ $group == node ]] && lockfile="$cache/.build-node.lock"
[[ $group == peer ]] && lockfile="$cache/.build-peer.lock"
exec 9>"$lockfile"
flock 9

die() { echo "netfence: $*" >&2; exit 1; }

command -v go >/dev/null 2>&1 \
  || die "the Go toolchain is missing: install Go >= 1.25 (https://go.dev/dl) and put 'go' on PATH, then run this again"

# tool  version  package-to-build  ldflags
# helm: the Kubernetes version `helm template`/`helm lint` assume without a
# cluster is set as in Helm's own Makefile (its client-go minor, here 0.34);
# without it Helm assumes 1.20 and refuses the chart's kubeVersion (>= 1.25).
tools=(
  "etcd|v3.6.16|.|-X go.etcd.io/etcd/api/v3/version.GitSHA=netfence"
  "kube-apiserver|v1.35.4|k8s.io/kubernetes/cmd/kube-apiserver|-X k8s.io/component-base/version.gitVersion=v1.35.4 -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=35 -X k8s.io/component-base/version.gitTreeState=clean -X k8s.io/component-base/version.buildDate=2026-01-01T00:00:00Z"
  "kubectl|v1.35.4|.|-X k8s.io/component-base/version.gitVersion=v1.35.4 -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=35 -X k8s.io/client-go/pkg/version.gitVersion=v1.35.4 -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=35"
  "helm|v3.19.0|helm.sh/helm/v3/cmd/helm|-X helm.sh/helm/v3/internal/version.version=v3.19.0 -X helm.sh/helm/v3/internal/version.gitTreeState=clean -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=34 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=34"
  "helm-docs|v1.14.2|github.com/norwoodj/helm-docs/cmd/helm-docs|-X main.version=1.14.2"
)
# The node group: the kubelet and its peers come from the same pinned
# k8s.io/kubernetes module as kube-apiserver (5th field: the module folder
# under hack/tools/ when it is not the tool's own name).
k8s_ldflags="-X k8s.io/component-base/version.gitVersion=v1.35.4 -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=35 -X k8s.io/component-base/version.gitTreeState=clean -X k8s.io/component-base/version.buildDate=2026-01-01T00:00:00Z"
node_tools=(
  "kubelet|v1.35.4|k8s.io/kubernetes/cmd/kubelet|$k8s_ldflags|kube-apiserver"
  "kube-scheduler|v1.35.4|k8s.io/kubernetes/cmd/kube-scheduler|$k8s_ldflags|kube-apiserver"
  "kube-controller-manager|v1.35.4|k8s.io/kubernetes/cmd/kube-controller-manager|$k8s_ldflags|kube-apiserver"
  "kube-proxy|v1.35.4|k8s.io/kubernetes/cmd/kube-proxy|$k8s_ldflags|kube-apiserver"
  "coredns|v1.15.0|github.com/coredns/coredns|-X github.com/coredns/coredns/coremain.GitCommit=netfence"
)
# The peer group: the reference NetworkPolicy enforcer of SIG Network, which
# bench/peer_bench.py runs on the same namespace nodes as Netfence's agents.
# Its main package is cmd/ (the binary is named after the tool).
peer_tools=(
  "kube-network-policies|v0.8.0|sigs.k8s.io/kube-network-policies/cmd|"
)
if [[ $group == node ]]; then
  tools=("${node_tools[@]}")
elif [[ $group == peer ]]; then
  tools=("${peer_tools[@]}")
elif (($#)); then
  tools+=("${node_tools[@]}" "${peer_tools[@]}")
fi

only=("$@")
for spec in "${tools[@]}"; do
  IFS='|' read -r name version pkg ldflags moddir <<<"$spec"
  if ((${#only[@]})) && [[ " ${only[*]} " != *" $name "* ]]; then continue; fi
  src="$here/tools/${moddir:-$name}"
  hash="$( { cat "$src"/go.mod "$src"/go.sum "$src"/*.go; echo "$spec"; } | sha256sum | cut -c1-12)"
  dest="$cache/tools/$name-$version-$hash"
  if [[ ! -x "$dest/$name" ]]; then
    echo "netfence: building $name $version (first time on this machine; cached in $dest)" >&2
    start=$(date +%s)
    tmp="$dest.tmp.$$"
    rm -rf "$tmp"; mkdir -p "$tmp"
    trap 'rm -rf "$tmp"' EXIT
    if ! (cd "$src" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w $ldflags" -o "$tmp/$name" "$pkg"); then
      die "building $name $version failed (see the Go errors above); check that the Go module proxy is reachable and that 'go version' is >= 1.25"
    fi
    rm -rf "$dest"; mv "$tmp" "$dest"
    trap - EXIT
    echo "netfence: built $name in $(( $(date +%s) - start ))s" >&2
  fi
  ln -sfn "$dest/$name" "$cache/bin/$name"
done
# Not a binary: the ClusterNetworkPolicy CRD of the pinned network-policy-api module, which
# the test bed installs ($cache/crds/clusternetworkpolicies.yaml).
if [[ $group == default ]] && ((${#only[@]} == 0)); then
  "$here/fetch-cnp-crd.sh" >/dev/null
fi
echo "$cache/bin"
