#!/usr/bin/env bash
# Set up everything Netfence's demo and tests need on a fresh Debian machine:
# Debian packages (iptables, ipset, iproute2, conntrack, openssl), the Python
# environment in .venv, and the control-plane tools built from pinned Go
# modules into ~/.cache/netfence (once per machine).
# Idempotent and quiet when everything is already there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() { echo "netfence: $*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "setup needs root (it installs Debian packages, and Netfence programs netfilter in network namespaces); run it as root, e.g. with sudo"

need=()
for pair in iptables:iptables ipset:ipset ip:iproute2 conntrack:conntrack openssl:openssl; do
  cmd=${pair%%:*}; pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
  echo "netfence: installing Debian packages: ${need[*]}" >&2
  command -v apt-get >/dev/null 2>&1 || die "missing ${need[*]} and no apt-get to install them; install them with your package manager"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || die "apt-get update failed; check the machine's Debian package sources"
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null || die "apt-get install ${need[*]} failed"
fi

python=${PYTHON:-python3}
command -v "$python" >/dev/null 2>&1 || die "Python 3.11+ is missing; install python3 (with venv) and run this again"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "Python 3.11+ is required, found $("$python" --version 2>&1)"

stamp=.venv/.netfence-installed
want="$(cat pyproject.toml lab/pyproject.toml | sha256sum | cut -c1-16)"
if [[ ! -x .venv/bin/python || ! -f $stamp || "$(cat $stamp)" != "$want" ]]; then
  echo "netfence: preparing the Python environment in .venv" >&2
  [[ -x .venv/bin/python ]] || "$python" -m venv .venv || die "could not create .venv (is the python3-venv package installed?)"
  .venv/bin/pip install -q --disable-pip-version-check -e '.[dev]' -e ./lab || die "pip install failed; check that PyPI is reachable"
  echo "$want" > $stamp
fi

hack/build-tools.sh >/dev/null
