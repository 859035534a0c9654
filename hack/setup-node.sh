#!/usr/bin/env bash
# Set up what `netfence node up` and `make node-e2e` need on top of
# hack/setup.sh: containerd, runc and the standard CNI plugins from Debian,
# podman (image builds only) and mmdebstrap (the local Debian base image),
# and the node tools (kubelet, kube-scheduler, kube-controller-manager,
# kube-proxy, CoreDNS) built from pinned Go modules into ~/.cache/netfence.
# Idempotent; prints the tools' bin folder.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() { echo "netfence: $*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || die "node setup needs root (it installs Debian packages and runs containerd and a kubelet); run it as root"

hack/setup.sh

need=()
for pair in containerd:containerd runc:runc /usr/lib/cni/ptp:containernetworking-plugins \
            podman:podman mmdebstrap:mmdebstrap; do
  cmd=${pair%%:*}; pkg=${pair#*:}
  if [[ $cmd == /* ]]; then [[ -x $cmd ]] || need+=("$pkg"); continue; fi
  command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
  echo "netfence: installing Debian packages: ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || die "apt-get update failed; check the machine's Debian package sources"
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null || die "apt-get install ${need[*]} failed"
  # Debian starts containerd as a service on install; the node test bed runs
  # its own containerd in the node's namespaces, so the host's stays off.
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active -q containerd 2>/dev/null; then
    systemctl disable --now containerd >/dev/null 2>&1 || true
  fi
fi

hack/build-tools.sh --node
