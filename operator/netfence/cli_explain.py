"""``netfence explain SRC DST``: why a connection is allowed or denied, and where that is enforced.

Also installed as the kubectl plugin ``kubectl-netfence`` (``kubectl netfence explain ...``).
Exit code 0 whatever the verdict (the last line says it); 1 (or 2 for usage) on errors,
each one line saying what to do. Nothing is changed anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from netfence.cli import CliError, Subcommands, UsageError, add_command, out

if TYPE_CHECKING:
    from netfence.explain.gather import Target

PROTOCOL_CHOICES = ("TCP", "UDP", "SCTP")


def register(sub: Subcommands) -> None:
    from netfence.cli_options import add_etcd_flags
    from netfence.explain.gather import DEFAULT_AGENT_PORT

    cmd = add_command(sub, "explain", explain_command,
                      "why a connection is allowed or denied: the policy rule, the nearest miss, the node's counters")
    cmd.add_argument("src", metavar="SRC", help="source: namespace/pod, or an IP address (external peer)")
    cmd.add_argument("dst", metavar="DST", help="destination: namespace/pod, or an IP address (external peer)")
    cmd.add_argument("--port", default=None,
                     help="destination port number (default: the one port DST declares)")
    cmd.add_argument("--protocol", type=str.upper, choices=PROTOCOL_CHOICES, default=None,
                     help="TCP (default), UDP or SCTP")
    cmd.add_argument("-o", "--output", choices=["text", "json"], default="text")
    cmd.add_argument("--kubeconfig", default=os.environ.get("NETFENCE_KUBECONFIG"),
                     help="kubeconfig of the cluster (default: $NETFENCE_KUBECONFIG; with --etcd-endpoints "
                          "also $KUBECONFIG, ~/.kube/config, in-cluster; with neither: the kept demo)")
    add_etcd_flags(cmd)
    cmd.add_argument("--demo-dir", type=Path, default=None,
                     help="work folder of `netfence demo --keep` (default ~/.cache/netfence/demo)")
    cmd.add_argument("--node-netns", action="append", metavar="NODE=NETNS",
                     help="read NODE's counters in this network namespace (test beds; repeatable)")
    cmd.add_argument("--agent-url", action="append", metavar="NODE=URL",
                     help="read NODE's counters from its agent at URL, e.g. http://127.0.0.1:9799 (repeatable)")
    cmd.add_argument("--agent-port", type=int, default=DEFAULT_AGENT_PORT,
                     help=f"other nodes: ask the agent at http://<node InternalIP>:PORT (default {DEFAULT_AGENT_PORT})")
    cmd.add_argument("--no-counters", action="store_true", help="do not read live counters from the nodes")


def build_target(args: argparse.Namespace) -> Target:
    """Where to look, from the flags; with no connection flags, the local test bed (the kept demo)."""
    from netfence.cli_options import etcd_settings, local_beds, split_endpoints
    from netfence.explain.gather import Target, parse_mapping

    endpoints = split_endpoints(args.etcd_endpoints)
    kubeconfig = Path(args.kubeconfig) if args.kubeconfig else None
    netns: dict[str, str] = {}
    if not endpoints:
        if kubeconfig is not None:
            raise CliError("--kubeconfig given without --etcd-endpoints; pass both (explain reads the committed "
                           "model from Netfence's etcd), or neither to use the kept demo")
        beds = local_beds(args.demo_dir)
        if not beds:
            raise CliError("no cluster to ask; pass --etcd-endpoints HOST:PORT and --kubeconfig (as for "
                           "netfence status), or start the demo with: netfence demo --keep")
        bed = beds[0]
        endpoints, kubeconfig, netns = [bed.etcd_endpoint], bed.kubeconfig, dict(bed.node_netns)
    try:
        netns.update(parse_mapping(args.node_netns, "--node-netns"))
        agents = parse_mapping(args.agent_url, "--agent-url")
    except Exception as exc:
        raise UsageError(str(exc)) from None
    return Target(etcd=etcd_settings(args, endpoints), kubeconfig=kubeconfig, node_netns=netns,
                  agent_urls=agents, agent_port=args.agent_port, counters=not args.no_counters)


def explain_command(args: argparse.Namespace) -> int:
    from netfence.explain.gather import ExplainError, Question, explain, parse_endpoint_arg, parse_port
    from netfence.explain.report import format_text

    try:
        parse_endpoint_arg(args.src, "SRC")
        parse_endpoint_arg(args.dst, "DST")
        port = parse_port(args.port)
    except ExplainError as exc:
        raise UsageError(str(exc)) from None
    if not 0 < args.agent_port < 65536:
        raise UsageError(f"--agent-port {args.agent_port}: give a port number from 1 to 65535")
    target = build_target(args)
    question = Question(args.src, args.dst, port, args.protocol)
    try:
        data = asyncio.run(explain(target, question))
    except ExplainError as exc:
        raise CliError(str(exc)) from None
    if args.output == "json":
        out(json.dumps(data, indent=2))
    else:
        for line in format_text(data):
            out(line)
    return 0
