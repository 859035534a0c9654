#!/bin/sh
# Entry point of the agent image: pick the iptables backend the node already
# uses, put its commands first on PATH, then exec the netfence-agent console
# script with the container's arguments.
#
# NETFENCE_IPTABLES_BACKEND: auto (default), nft or legacy. auto follows the
# logic of Kubernetes' iptables-wrappers: the backend holding the kubelet's
# KUBE-IPTABLES-HINT / KUBE-KUBELET-CANARY chains (mangle table) wins; failing
# that, the backend with more rules; nft on a tie.
set -eu
lib_dir=${NETFENCE_IPTABLES_LIB_DIR:-/usr/local/lib/netfence}
backend=${NETFENCE_IPTABLES_BACKEND:-auto}

kubelet_chains() {
  ( "iptables-$1-save" -t mangle || true; "ip6tables-$1-save" -t mangle || true ) 2>/dev/null \
    | grep -c -E '^:(KUBE-IPTABLES-HINT|KUBE-KUBELET-CANARY)' || true
}

rules() {
  ( "iptables-$1-save" || true; "ip6tables-$1-save" || true ) 2>/dev/null | grep -c '^-' || true
}

detect() {
  if [ "$(kubelet_chains nft)" -gt 0 ]; then echo nft; return; fi
  if [ "$(kubelet_chains legacy)" -gt 0 ]; then echo legacy; return; fi
  if [ "$(rules legacy)" -gt "$(rules nft)" ]; then echo legacy; else echo nft; fi
}

case $backend in
  auto) backend=$(detect) ;;
  nft | legacy) ;;
  *)
    echo "netfence-agent: NETFENCE_IPTABLES_BACKEND must be auto, nft or legacy, not '$backend'" >&2
    exit 2
    ;;
esac
echo "netfence-agent: using the iptables $backend backend" >&2
PATH="$lib_dir/iptables-$backend:$PATH"
export PATH
exec netfence-agent "$@"
