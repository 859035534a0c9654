"""A pod's servers: one asyncio process per pod, run inside the pod's network namespace.

``python -m netfence_lab.podserver --tcp 80 --udp 80 --sctp 132 --name NS/POD [--ready-file F]``

* TCP (and SCTP where the kernel has it): accept, read one line, reply with
  the pod name and a newline, close.
* UDP: reply to every datagram with the pod name.
* Every port is served over IPv4 and IPv6 (one dual-stack socket on ``::``; IPv4
  only where the namespace has no IPv6).
* When every port is bound, writes ``--ready-file`` (atomically) with a JSON
  object ``{"pid", "tcp", "udp", "sctp", "sctp_skipped"}``.
* Exits cleanly on SIGTERM or SIGINT.

Keep the imports light: start-up time multiplies by the number of pods.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

log = logging.getLogger("netfence.podserver")

READ_TIMEOUT = 5.0
MAX_LINE = 4096


@dataclass
class Bound:
    tcp: list[int] = field(default_factory=list)
    udp: list[int] = field(default_factory=list)
    sctp: list[int] = field(default_factory=list)
    sctp_skipped: list[int] = field(default_factory=list)


class _UdpEcho(asyncio.DatagramProtocol):
    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        if self.transport is not None:
            self.transport.sendto(self.reply, addr)


def _stream_handler(reply: bytes) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
            writer.write(reply + b"\n")
            await writer.drain()
        except (TimeoutError, OSError, ValueError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    return handle


def _bound_socket(kind: int, port: int, proto: int = 0) -> socket.socket:
    """A socket bound to ``port`` on every address of both families (``::``, not IPv6-only),
    or on ``0.0.0.0`` when the namespace has no IPv6."""
    try:
        sock = socket.socket(socket.AF_INET6, kind, proto)
    except OSError as exc:
        if exc.errno != errno.EAFNOSUPPORT:
            raise
        return _bound_socket_v4(kind, port, proto)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno != errno.EADDRNOTAVAIL:  # not: IPv6 disabled in this namespace
            raise
        return _bound_socket_v4(kind, port, proto)
    except BaseException:
        sock.close()
        raise
    return sock


def _bound_socket_v4(kind: int, port: int, proto: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind, proto)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _listening_socket(port: int, proto: int) -> socket.socket:
    sock = _bound_socket(socket.SOCK_STREAM, port, proto)
    try:
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve(name: str, stop: asyncio.Event, *, tcp: Sequence[int] = (), udp: Sequence[int] = (),
                sctp: Sequence[int] = (), ready_file: str | None = None) -> Bound:
    reply = name.encode()
    bound = Bound()
    servers: list[asyncio.Server] = []
    transports: list[asyncio.BaseTransport] = []
    loop = asyncio.get_running_loop()
    try:
        for port in tcp:
            servers.append(await asyncio.start_server(
                _stream_handler(reply), sock=_listening_socket(port, socket.IPPROTO_TCP), limit=MAX_LINE))
            bound.tcp.append(port)
        for port in udp:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UdpEcho(reply), sock=_bound_socket(socket.SOCK_DGRAM, port))
            transports.append(transport)
            bound.udp.append(port)
        for port in sctp:
            try:
                sock = _listening_socket(port, socket.IPPROTO_SCTP)
            except OSError as exc:
                log.warning("SCTP port %d skipped: the kernel has no SCTP (%s)", port, exc)
                bound.sctp_skipped.append(port)
                continue
            servers.append(await asyncio.start_server(_stream_handler(reply), sock=sock, limit=MAX_LINE))
            bound.sctp.append(port)
        if ready_file:
            _write_ready(ready_file, bound)
        log.info("%s serving tcp=%s udp=%s sctp=%s", name, bound.tcp, bound.udp, bound.sctp)
        await stop.wait()
    finally:
        for srv in servers:
            srv.close()
        for tr in transports:
            tr.close()
    return bound


def _write_ready(path: str, bound: Bound) -> None:
    data = {"pid": os.getpid(), "tcp": bound.tcp, "udp": bound.udp, "sctp": bound.sctp,
            "sctp_skipped": bound.sctp_skipped}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as out:
        json.dump(data, out)
    os.replace(tmp, path)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="netfence_lab.podserver", description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="reply text, normally NS/POD")
    parser.add_argument("--tcp", type=int, action="append", default=[], metavar="PORT")
    parser.add_argument("--udp", type=int, action="append", default=[], metavar="PORT")
    parser.add_argument("--sctp", type=int, action="append", default=[], metavar="PORT")
    parser.add_argument("--ready-file", help="written once every port is bound")
    parser.add_argument("--run", default="", help="test-bed run id (lets the owner find its processes)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s podserver %(levelname)s %(message)s")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(args.name, stop, tcp=args.tcp, udp=args.udp, sctp=args.sctp, ready_file=args.ready_file)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
