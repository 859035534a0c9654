#!/usr/bin/env bash
# Set up what bench/peer_bench.py and `netfence conformance run --enforcer
# kube-network-policies` need on top of hack/setup.sh: Debian's `nftables` (the
# `nft` command: the bench counts kernel objects with it and checks this
# kernel), a check that this kernel can queue packets to user space from a
# netfilter rule inside a network namespace, and kube-network-policies built
# from its pinned Go module into ~/.cache/netfence (build-tools.sh --peer).
# Never part of `make setup`. Idempotent; prints the tools' bin folder.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() { echo "netfence: $*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || die "peer setup needs root (it installs Debian packages and programs netfilter in network namespaces); run it as root"

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

# kube-network-policies queues the first packet of new connections to user
# space: with nftables' queue expression (CONFIG_NFT_QUEUE: its own table), or,
# where the kernel lacks it, with iptables' NFQUEUE target
# (CONFIG_NETFILTER_XT_TARGET_NFQUEUE), which netfence_lab.peer installs in its
# place. Both need nfnetlink_queue. Checked in a throwaway namespace.
probe="nfpeer-check-$$"
ip netns add "$probe" || die "cannot create a network namespace (ip netns add)"
trap 'ip netns del "$probe" 2>/dev/null || true' EXIT
if out=$(ip netns exec "$probe" nft -f - 2>&1 <<'NFT'
table inet netfence-peer-check {
  chain postrouting {
    type filter hook postrouting priority srcnat - 5; policy accept;
    ct state new queue num 100
  }
}
NFT
); then
  echo "netfence: this kernel takes nftables queue rules: kube-network-policies programs its own table" >&2
elif xt=$(ip netns exec "$probe" iptables -t mangle -A POSTROUTING -m conntrack --ctstate NEW \
            -j NFQUEUE --queue-num 100 2>&1); then
  echo "netfence: this kernel has no nftables queue expression (CONFIG_NFT_QUEUE; nft: $(echo "$out" | head -1)); the peer's hook is installed with iptables' NFQUEUE target instead" >&2
else
  die "this kernel cannot queue packets to user space from a netfilter rule in a network namespace (nft: $(echo "$out" | head -1); iptables: $xt); kube-network-policies needs CONFIG_NFT_QUEUE (or CONFIG_NETFILTER_XT_TARGET_NFQUEUE) and CONFIG_NETFILTER_NETLINK_QUEUE"
fi
ip netns del "$probe"; trap - EXIT

hack/build-tools.sh --peer
