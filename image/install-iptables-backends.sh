#!/bin/sh
# Make one PATH directory per iptables backend:
#   LIB_DIR/iptables-nft/{iptables,iptables-save,iptables-restore,ip6tables,...}
#   LIB_DIR/iptables-legacy/...
# each a symlink to the backend's own binary in SBIN (Debian's iptables package
# ships both). agent-entrypoint.sh puts one of them first on PATH, so the agent
# needs no writable root file system (no update-alternatives at run time).
#   install-iptables-backends.sh LIB_DIR [SBIN]
set -eu
lib_dir=$1
sbin=${2:-/usr/sbin}
for backend in nft legacy; do
  mkdir -p "$lib_dir/iptables-$backend"
  for tool in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
    family=${tool%%-*}
    suffix=${tool#"$family"}
    target="$sbin/$family-$backend$suffix"
    [ -x "$target" ] || { echo "install-iptables-backends: $target is missing" >&2; exit 1; }
    ln -sf "$target" "$lib_dir/iptables-$backend/$tool"
  done
done
