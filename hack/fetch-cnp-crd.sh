#!/usr/bin/env bash
# Copy the ClusterNetworkPolicy CRD (standard channel) out of the pinned Go module
# sigs.k8s.io/network-policy-api (hack/tools/network-policy-api/go.mod, checked against
# its go.sum) into the tool cache, once per machine:
#
#   hack/fetch-cnp-crd.sh            fetch if missing, print the CRD's path
#   hack/fetch-cnp-crd.sh --vendor   also write the chart's copy (helm/netfence/files/)
#   hack/fetch-cnp-crd.sh --check    exit 1 if the chart's copy differs from the module's
#
# The test bed applies $NETFENCE_CACHE/crds/clusternetworkpolicies.yaml when it exists
# (hack/build-tools.sh runs this script); the chart installs its copy only with
# clusterNetworkPolicy.installCRD=true.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${NETFENCE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/netfence}"
module_dir="$here/tools/network-policy-api"
version="$(awk '/sigs.k8s.io\/network-policy-api/ {print $NF; exit}' "$module_dir/go.mod")"
source_path="config/crd/standard/policy.networking.k8s.io_clusternetworkpolicies.yaml"
dest_dir="$cache/crds/network-policy-api-$version"
dest="$dest_dir/clusternetworkpolicies.yaml"
chart_copy="$here/../helm/netfence/files/vendor/clusternetworkpolicies.yaml"

die() { echo "netfence: $*" >&2; exit 1; }

if [[ ! -s $dest ]]; then
  command -v go >/dev/null 2>&1 || die "the Go toolchain is missing: install Go >= 1.25 and run this again"
  dir="$(cd "$module_dir" && GOFLAGS=-mod=mod go mod download -json sigs.k8s.io/network-policy-api \
         | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  [[ -n $dir && -s $dir/$source_path ]] \
    || die "could not download sigs.k8s.io/network-policy-api $version (is the Go module proxy reachable?)"
  mkdir -p "$dest_dir"
  cp "$dir/$source_path" "$dest.tmp.$$"
  mv "$dest.tmp.$$" "$dest"
fi
mkdir -p "$cache/crds"
ln -sfn "$dest" "$cache/crds/clusternetworkpolicies.yaml"

header() {
  echo "# sigs.k8s.io/network-policy-api $version $source_path"
  echo "# sha256 $(sha256sum "$dest" | cut -c1-64). Copied by hack/fetch-cnp-crd.sh --vendor: do not edit."
}
case "${1:-}" in
  --vendor)
    { header; cat "$dest"; } >"$chart_copy"
    echo "netfence: wrote $chart_copy" >&2 ;;
  --check)
    if ! cmp -s <(header; cat "$dest") "$chart_copy"; then
      die "$chart_copy is not the CRD of sigs.k8s.io/network-policy-api $version: run hack/fetch-cnp-crd.sh --vendor"
    fi ;;
  "") ;;
  *) die "usage: hack/fetch-cnp-crd.sh [--vendor|--check]" ;;
esac
echo "$dest"
