#!/usr/bin/env bash
# Set up what bench/peer_bench.py needs on top of hack/setup.sh: Debian's
# `nftables` (the `nft` command: the bench counts the peer's kernel objects
# with it and checks the kernel here), a check that this kernel can queue
# packets to user space from an nftables rule (nfnetlink_queue) inside a network
# namespace, and kube-network-policies built from its pinned Go module into
# ~/.cache/netfence (hack/build-tools.sh --peer). Never part of `make setup`.
# Idempotent; prints the tools' bin folder.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() { echo "netfence: $*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || die "peer setup needs root (it installs Debian packages and programs nftables in network namespaces); run it as root"

hack/setup.sh

if ! command -v nft >/dev/null 2>&1; then
  echo "netfence: installing Debian packages: nftables" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || die "apt-get update failed; check the machine's Debian package sources"
  apt-get install -y -qq --no-install-recommends nftables >/dev/null || die "apt-get install nftables failed"
  # Debian's package ships a service that loads /etc/nftables.conf on the host;
  # the bench only ever programs its own namespaces.
  if command -v systemctl >/dev/null 2>&1 && systemctl is-enabled -q nftables 2>/dev/null; then
    systemctl disable --now nftables >/dev/null 2>&1 || true
  fi
fi

# The kernel must let an nftables rule queue packets to user space inside a
# network namespace (what kube-network-policies installs on every node).
probe="nfpeer-check-$$"
ip netns add "$probe" || die "cannot create a network namespace (ip netns add)"
trap 'ip netns del "$probe" 2>/dev/null || true' EXIT
if ! out=$(ip netns exec "$probe" nft -f - 2>&1 <<'NFT'
table inet netfence-peer-check {
  chain postrouting {
    type filter hook postrouting priority srcnat - 5; policy accept;
    ct state new queue num 100
  }
}
NFT
); then
  die "this kernel cannot queue packets from an nftables rule in a network namespace ($out); kube-network-policies needs nf_tables and nfnetlink_queue (CONFIG_NFT_QUEUE, CONFIG_NETFILTER_NETLINK_QUEUE): load them (modprobe nft_queue nfnetlink_queue) or use a kernel that has them"
fi
ip netns del "$probe"; trap - EXIT

hack/build-tools.sh --peer
