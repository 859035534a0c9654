"""``netfence cluster up|down|status``: a local control plane that outlives the command."""

from __future__ import annotations

import argparse
import json
import ssl
import urllib.request
from pathlib import Path

from netfence.cli import CliError, Subcommands, add_command, out
from netfence_lab.cli_errors import LAB_ERRORS
from netfence_lab.pki import Pki
from netfence_lab.process import port_in_use
from netfence_lab.tools import cache_dir

KNOWN_ERRORS = LAB_ERRORS  # netfence.cli.main reports these as one line

EXIT_NOT_RUNNING = 3


class NotRunningError(CliError):
    exit_code = EXIT_NOT_RUNNING


def default_dir() -> Path:
    return cache_dir() / "cluster"


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 1-65535")
    return port


def register(sub: Subcommands) -> None:
    group = sub.add_parser("cluster", help="a local control plane (etcd, kube-apiserver, Netfence's etcd)")
    csub = group.add_subparsers(dest="cluster_command", metavar="COMMAND", required=True)
    dir_help = "working directory (default: ~/.cache/netfence/cluster, or $NETFENCE_CACHE/cluster)"

    up = add_command(
        csub, "up", cmd_up,
        "start the cluster in the background (builds the tools first if needed; that takes minutes once)",
    )
    up.add_argument("--dir", type=Path, default=None, help=dir_help)
    up.add_argument("--port", type=_port, default=None,
                    help="API server port on 127.0.0.1 (default: a free one)")

    down = add_command(csub, "down", cmd_down, "stop the processes of a cluster started with 'cluster up'")
    down.add_argument("--dir", type=Path, default=None, help=dir_help)

    status = add_command(csub, "status", cmd_status, "show whether the cluster runs (exit 3 if not)")
    status.add_argument("--dir", type=Path, default=None, help=dir_help)


def _dir(args: argparse.Namespace) -> Path:
    return (args.dir or default_dir()).expanduser().resolve()


def _api_get(workdir: Path, api_url: str, path: str) -> dict[str, object] | None:
    pki = Pki(workdir / "pki")
    try:
        ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
        ctx.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
        with urllib.request.urlopen(f"{api_url}{path}", context=ctx, timeout=3) as resp:
            body = resp.read().decode()
    except (OSError, ValueError, ssl.SSLError):
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return {"text": body}
    return data if isinstance(data, dict) else None


def cmd_up(args: argparse.Namespace) -> int:
    from netfence_lab.cluster import LocalCluster, raise_on_signals, read_state
    from netfence_lab.tools import ensure_tools

    workdir = _dir(args)
    if args.port is not None and port_in_use(args.port):
        raise CliError(f"port {args.port} on 127.0.0.1 is already in use; "
                       "choose another with --port or stop the program using it")
    state = read_state(workdir)
    if state is not None and state.running():
        raise CliError(f"a cluster is already running in {workdir}; stop it with "
                       f"'netfence cluster down --dir {workdir}' or use another --dir")
    restore = raise_on_signals()
    try:
        tools = ensure_tools()
        cluster = LocalCluster(workdir, tools, api_port=args.port)
        cluster.start()  # stops what it started if it fails or is interrupted
        cluster.detach()
    finally:
        restore()
    version = _api_get(workdir, cluster.api_url, "/version") or {}
    out(f"netfence: local cluster is up in {workdir}")
    out(f"  API server     {cluster.api_url} (kube-apiserver {version.get('gitVersion', '?')})")
    out(f"  netfence etcd  {cluster.netfence_etcd.endpoint}")
    out(f"  kubeconfig     {cluster.kubeconfig}")
    out(f"  logs           {workdir}/*.log, {workdir}/*-etcd/*.log")
    out()
    out(f"export KUBECONFIG={cluster.kubeconfig}")
    out()
    out(f"stop it with: netfence cluster down --dir {workdir}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from netfence_lab.cluster import read_state, stop_recorded

    workdir = _dir(args)
    state = read_state(workdir)
    if state is None:
        out(f"netfence: no cluster recorded in {workdir}; nothing to stop")
        return 0
    stopped = stop_recorded(state)
    if stopped:
        out(f"netfence: stopped {', '.join(stopped)} (files kept in {workdir})")
    else:
        out(f"netfence: nothing was running in {workdir}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from netfence_lab.cluster import read_state

    workdir = _dir(args)
    state = read_state(workdir)
    if state is None:
        raise NotRunningError(
            f"no cluster recorded in {workdir}; start one with 'netfence cluster up --dir {workdir}'"
        )
    running = state.running()
    ready = bool(running) and _api_get(workdir, state.api_url, "/readyz") is not None
    if running and len(running) == len(state.processes) and ready:
        summary = "running"
    elif running:
        summary = "partly running (run 'netfence cluster down' then 'netfence cluster up')"
    else:
        summary = "stopped"
    out(f"cluster in {workdir}: {summary}")
    for rec in state.processes:
        ports = " ".join(f"{k}={v}" for k, v in rec.ports.items())
        out(f"  {rec.name:<15} pid {rec.pid:<8} {'running' if rec.alive() else 'stopped':<8} {ports}")
    out(f"  API server      {state.api_url} ({'ready' if ready else 'not ready'})")
    out(f"  netfence etcd   {state.netfence_etcd}")
    out(f"  kubeconfig      {state.kubeconfig}")
    return 0 if summary == "running" else EXIT_NOT_RUNNING
