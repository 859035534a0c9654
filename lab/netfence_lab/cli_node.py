"""``netfence node up|down``: the local control plane plus one real kubelet node (testbed/node.py)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from netfence.cli import CliError, Subcommands, add_command, out
from netfence_lab.cli_errors import LAB_ERRORS

KNOWN_ERRORS = LAB_ERRORS  # netfence.cli.main reports these as one line


def register(sub: Subcommands) -> None:
    group = sub.add_parser("node", help="a real Kubernetes node on this machine (containerd + kubelet)")
    nsub = group.add_subparsers(dest="node_command", metavar="COMMAND", required=True)
    dir_help = "working directory (default: ~/.cache/netfence/node, or $NETFENCE_CACHE/node)"
    up = add_command(nsub, "up", cmd_up,
                     "start the control plane, containerd, kubelet, kube-proxy and CoreDNS in the background "
                     "(needs hack/setup-node.sh and the images of hack/node-images.sh)", needs_root=True)
    up.add_argument("--dir", type=Path, default=None, help=dir_help)
    up.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the node (default 300)")
    down = add_command(nsub, "down", cmd_down, "remove everything 'node up' created", needs_root=True)
    down.add_argument("--dir", type=Path, default=None, help=dir_help)


def _dir(args: argparse.Namespace) -> Path:
    from netfence_lab.node import default_dir

    return (args.dir or default_dir()).expanduser().resolve()


def cmd_up(args: argparse.Namespace) -> int:
    from netfence_lab.cluster import raise_on_signals
    from netfence_lab.node import NODE_NAME, LocalNode, NodeError, ensure_node_tools
    from netfence_lab.tools import ensure_tools

    workdir = _dir(args)
    restore = raise_on_signals()
    start = time.monotonic()
    try:
        node = LocalNode(workdir, ensure_tools(), ensure_node_tools())
        node.up(timeout=args.timeout)
    except NodeError as exc:
        raise CliError(f"{exc}; the logs are in {workdir}/logs") from exc
    finally:
        restore()
    out(f"netfence: node {NODE_NAME} is Ready in {time.monotonic() - start:.0f}s ({workdir})")
    out(f"  API server  {node.cluster.api_url}")
    out(f"  kubeconfig  {node.kubeconfig}")
    out(f"  logs        {workdir}/logs, {workdir}/cluster/*.log")
    out()
    out(f"export KUBECONFIG={node.kubeconfig}")
    out()
    out(f"remove it with: netfence node down --dir {workdir}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from netfence_lab.node import down

    workdir = _dir(args)
    done = down(workdir)
    if not done:
        out(f"netfence: no node recorded in {workdir}; nothing to remove")
    for line in done:
        out(f"netfence: {line}")
    return 0
