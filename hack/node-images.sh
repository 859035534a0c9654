#!/usr/bin/env bash
# Build the images `netfence node up` and `make node-e2e` run, without a
# registry, into OCI archives that `ctr -n k8s.io images import` loads:
#
#   localhost/netfence/python:3.11-bookworm  base: a Debian bookworm root file
#       system made by mmdebstrap from Debian's packages (python3, venv, pip),
#       imported with `podman import`; stands in for python:3.11-slim-bookworm
#   ghcr.io/netfence/netfence-controller:TAG and ghcr.io/netfence/netfence-agent:TAG
#       the project's Dockerfile, targets controller and agent, built by podman
#       with --build-arg PYTHON_IMAGE=<that base> (the Dockerfile is unchanged)
#   registry.k8s.io/etcd:3.5.21-0     the Go-built etcd (hack/build-tools.sh)
#   registry.k8s.io/pause:3.10        pause.c of the pinned k8s.io/kubernetes module
#   registry.k8s.io/coredns/coredns:v1.15.0   the Go-built CoreDNS
#
#   hack/node-images.sh OUTDIR [TAG[=VERSION]...]   (default TAG: the chart's appVersion)
#
# VERSION (default: the chart's appVersion) is the Dockerfile's VERSION build
# argument, the version the image's Netfence reports: 0.1.0-c=0.1.0+c builds
# the same code as a visibly different version.
#
# Every image is built once per input: an archive whose inputs did not change
# is kept. podman is used for building only (`podman run` fails on this kind
# of VM); containerd runs the images.
#
# Build cache: podman keeps its images and layers in a store of its own under
# the cache ($NETFENCE_CACHE/podman, default ~/.cache/netfence/podman), so a CI
# cache of ~/.cache/netfence keeps the layers too. The Dockerfile puts the slow
# layers (the locked dependencies from PyPI, Debian's iptables) before the code
# layer, so a change of operator/ alone rebuilds the wheel and one small layer
# per target (bench figures: docs/design.md "Node test bed").
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
die() { echo "netfence: $*" >&2; exit 1; }

out=${1:?usage: hack/node-images.sh OUTDIR [TAG[=VERSION]...]}
shift
mkdir -p "$out"
out="$(cd "$out" && pwd)"
app_version="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$root/helm/netfence/Chart.yaml")"
tags=("$@")
((${#tags[@]})) || tags=("$app_version")

bin="$("$here/build-tools.sh")"
cache="${NETFENCE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/netfence}"
mkdir -p "$cache/podman/storage"
# runroot: podman's run-time state (locks, mounts), in /run like podman's own default
printf '[storage]\ndriver = "overlay"\ngraphroot = "%s"\nrunroot = "/run/netfence-podman"\n' \
  "$cache/podman/storage" >"$cache/podman/storage.conf"
export CONTAINERS_STORAGE_CONF="$cache/podman/storage.conf"
node_bin="$("$here/build-tools.sh" --node)"
base=localhost/netfence/python:3.11-bookworm
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

stamp_ok() { [[ -f "$out/$1.oci.tar" && -f "$out/$1.stamp" && "$(cat "$out/$1.stamp")" == "$2" ]]; }
save() {  # save IMAGE FILE STAMP
  rm -f "$out/$2.oci.tar"
  # uncompressed: a third of the time of gzip (the archives only go to the local containerd)
  podman save --quiet --format oci-archive --uncompressed -o "$out/$2.oci.tar" "$1" >/dev/null
  echo "$3" >"$out/$2.stamp"
  echo "netfence: image $1 -> $out/$2.oci.tar" >&2
}

# The base trusts the CAs this machine trusts beyond Debian's (a TLS-inspecting
# egress proxy's, /usr/local/share/ca-certificates): the Dockerfile's RUN steps
# install from PyPI and Debian through it. Only the local stand-in base gets
# them; the images built for users start from the public base.
add_machine_cas() {
  local ctx="$work/base-ctx"; mkdir -p "$ctx/cas"
  cp /usr/local/share/ca-certificates/*.crt "$ctx/cas/" 2>/dev/null || true
  printf 'FROM %s\nCOPY cas/ /usr/local/share/ca-certificates/\nRUN update-ca-certificates >/dev/null\n' \
    "$base-rootfs" >"$ctx/Containerfile"
  podman build --quiet --network=none --pull=never -t "$base" -f "$ctx/Containerfile" "$ctx" >/dev/null \
    || die "adding the machine's CA certificates to the base failed"
}

# -- the base: Debian bookworm + Python from Debian's packages ------------------
base_stamp="bookworm python3 python3-venv python3-pip python-is-python3 ca-certificates machine-cas v2"
if ! podman image exists "$base" || [[ "$(cat "$out/base.stamp" 2>/dev/null)" != "$base_stamp" ]]; then
  echo "netfence: making the Debian bookworm base with mmdebstrap" >&2
  # Debian's python3 is the system's: pip's "externally managed" marker is
  # removed so the Dockerfile's `pip install` behaves as in python:*-slim.
  mmdebstrap --quiet --variant=apt --format=tar \
    --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
    --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    bookworm "$work/rootfs.tar" \
    || die "mmdebstrap failed (it needs Debian's package mirror)"
  podman import --change 'CMD ["python3"]' "$work/rootfs.tar" "$base-rootfs" >/dev/null
  add_machine_cas
  echo "$base_stamp" >"$out/base.stamp"
fi

# -- Netfence: the Dockerfile, controller and agent targets ---------------------
src_hash="$(cd "$root" && { cat Dockerfile; find image operator pyproject.toml README.md -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum; podman image inspect --format '{{.Id}}' "$base"; } | sha256sum | cut -c1-16)"
for spec in "${tags[@]}"; do
  tag=${spec%%=*}; version=$app_version
  [[ $spec == *=* ]] && version=${spec#*=}
  for target in controller agent; do
    image="ghcr.io/netfence/netfence-$target:$tag"
    if stamp_ok "netfence-$target-$tag" "$src_hash $version"; then continue; fi
    echo "netfence: building $image" >&2
    # --network=host: the RUN steps install from PyPI and Debian (the
    # registries this machine reaches) without podman's own network set-up.
    (cd "$root" && podman build --quiet --network=host --pull=never \
       --build-arg "PYTHON_IMAGE=$base" --build-arg "VERSION=$version" \
       --target "$target" -t "$image" -f Dockerfile .) >/dev/null \
      || die "podman build of $image failed"
    save "$image" "netfence-$target-$tag" "$src_hash $version"
  done
done

# the code layers the tags no longer use
podman image prune -f >/dev/null

# -- etcd, pause, CoreDNS from the Go builds -----------------------------------
k8s_mod="$(cd "$here/tools/kube-apiserver" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)"
images=(
  "registry.k8s.io/etcd:3.5.21-0|etcd|$(sha256sum "$bin/etcd" | cut -c1-16)"
  "registry.k8s.io/pause:3.10|pause|$(sha256sum "$k8s_mod/build/pause/linux/pause.c" | cut -c1-16)"
  "registry.k8s.io/coredns/coredns:v1.15.0|coredns|$(sha256sum "$node_bin/coredns" | cut -c1-16)"
)
for spec in "${images[@]}"; do
  IFS='|' read -r image name stamp <<<"$spec"
  if stamp_ok "$name" "$stamp"; then continue; fi
  ctx="$work/$name"; mkdir -p "$ctx"
  case $name in
    etcd)
      cp "$bin/etcd" "$ctx/etcd"
      printf 'FROM scratch\nCOPY etcd /usr/local/bin/etcd\nENV PATH=/usr/local/bin\nUSER 0\nENTRYPOINT ["/usr/local/bin/etcd"]\n' >"$ctx/Containerfile" ;;
    pause)
      gcc -Os -static -DVERSION=3.10 -o "$ctx/pause" "$k8s_mod/build/pause/linux/pause.c" || die "compiling pause.c failed"
      printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' >"$ctx/Containerfile" ;;
    coredns)
      cp "$node_bin/coredns" "$ctx/coredns"
      printf 'FROM scratch\nCOPY coredns /coredns\nEXPOSE 53 53/udp\nENTRYPOINT ["/coredns"]\n' >"$ctx/Containerfile" ;;
  esac
  podman build --quiet --network=none -t "$image" -f "$ctx/Containerfile" "$ctx" >/dev/null \
    || die "podman build of $image failed"
  save "$image" "$name" "$stamp"
done
echo "$out"
