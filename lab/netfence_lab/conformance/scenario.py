"""Pure: parse and validate conformance scenario files (format version 1).

Errors name the file, the key path and what was expected, e.g.
``scenarios/x.yaml: steps[1].expect[0].protocol: expected one of TCP, UDP, SCTP, got 'ICMP'``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PROTOCOLS = ("TCP", "UDP", "SCTP")
ACTIONS = ("apply", "delete", "label", "create-pod", "delete-pod")
CELLS = {".": True, "X": False, "?": None}
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
PORT_RE = re.compile(r"^(\d{1,5})/(TCP|UDP|SCTP)$")
E2E_PORTS = ((80, "TCP"), (81, "TCP"), (80, "UDP"), (81, "UDP"))


class ScenarioError(ValueError):
    """A scenario file is malformed; the message names file, key and expectation."""


@dataclass(frozen=True)
class PodSpec:
    namespace: str
    name: str
    labels: dict[str, str]
    ports: tuple[tuple[int, str], ...]
    node: int | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class NamespaceSpec:
    name: str
    labels: dict[str, str]


@dataclass(frozen=True)
class Action:
    kind: str  # one of ACTIONS
    body: dict[str, Any]


@dataclass(frozen=True)
class Expectation:
    port: int
    protocol: str
    clients: tuple[str, ...]
    servers: tuple[str, ...]
    cells: dict[tuple[str, str], bool | None]  # (client, server) -> expected; None = either
    family: str | None = None  # "ipv4"/"ipv6": probed over that family only, whatever the run's --ip-family


@dataclass(frozen=True)
class Step:
    actions: tuple[Action, ...]
    expect: tuple[Expectation, ...]


@dataclass(frozen=True)
class Scenario:
    name: str
    path: Path
    nodes: int
    namespaces: tuple[NamespaceSpec, ...]
    pods: tuple[PodSpec, ...]
    steps: tuple[Step, ...]
    description: str = ""
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class _Ctx:
    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, expected: str, got: Any = None, show_got: bool = True) -> ScenarioError:
        detail = f", got {got!r}" if show_got else ""
        return ScenarioError(f"{self.path}: {where}: expected {expected}{detail}")

    def mapping(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, "a mapping", value)
        return value

    def seq(self, value: Any, where: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(where, "a list", value)
        return value

    def name(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not NAME_RE.match(value):
            raise self.fail(where, "a lower-case DNS label", value)
        return value

    def labels(self, value: Any, where: str, allow_null: bool = False) -> dict[str, Any]:
        if value is None:
            return {}
        out = self.mapping(value, where)
        for key, val in out.items():
            if not isinstance(key, str):
                raise self.fail(f"{where}", "string label keys", key)
            if val is None and allow_null:
                continue
            if not isinstance(val, str | int | float | bool):
                raise self.fail(f"{where}.{key}", "a string value", val)
        return {k: (None if v is None else str(v)) for k, v in out.items()}

    def integer(self, value: Any, where: str, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(where, f"an integer from {low} to {high}", value)
        return value


def _ports(ctx: _Ctx, value: Any, where: str) -> tuple[tuple[int, str], ...]:
    out = []
    for i, item in enumerate(ctx.seq(value if value is not None else [], where)):
        match = PORT_RE.match(str(item))
        if not match or not 1 <= int(match.group(1)) <= 65535:
            raise ctx.fail(f"{where}[{i}]", '"PORT/PROTOCOL" such as "80/TCP" (TCP, UDP or SCTP)', item)
        out.append((int(match.group(1)), match.group(2)))
    return tuple(out)


def parse_pod(ctx: _Ctx, raw: Any, where: str, nodes: int) -> PodSpec:
    data = ctx.mapping(raw, where)
    unknown = set(data) - {"namespace", "name", "labels", "ports", "node"}
    if unknown:
        raise ctx.fail(where, "only namespace, name, labels, ports, node", sorted(unknown))
    node = data.get("node")
    return PodSpec(
        namespace=ctx.name(data.get("namespace"), f"{where}.namespace"),
        name=ctx.name(data.get("name"), f"{where}.name"),
        labels={k: str(v) for k, v in ctx.labels(data.get("labels"), f"{where}.labels").items()},
        ports=_ports(ctx, data.get("ports"), f"{where}.ports"),
        node=None if node is None else ctx.integer(node, f"{where}.node", 0, nodes - 1),
    )


Cells = dict[tuple[str, str], bool | None]


def parse_table(ctx: _Ctx, text: Any, where: str) -> tuple[tuple[str, ...], tuple[str, ...], Cells]:
    if not isinstance(text, str) or not text.strip():
        raise ctx.fail(where, "a table (header line, then one row per client pod)", text)
    lines = [line.split() for line in text.strip().splitlines() if line.strip()]
    header = lines[0][1:]
    if not header:
        raise ctx.fail(f"{where} header", "a placeholder then NS/POD column names", " ".join(lines[0]))
    if len(set(header)) != len(header):
        raise ctx.fail(f"{where} header", "each server pod once", " ".join(header))
    clients: list[str] = []
    cells: dict[tuple[str, str], bool | None] = {}
    for n, row in enumerate(lines[1:], start=2):
        if len(row) != len(header) + 1:
            raise ctx.fail(f"{where} line {n}", f"a client name and {len(header)} cells", " ".join(row))
        client = row[0]
        if client in clients:
            raise ctx.fail(f"{where} line {n}", "each client pod once", client)
        clients.append(client)
        for server, cell in zip(header, row[1:], strict=True):
            if cell not in CELLS:
                raise ctx.fail(f"{where} line {n}", "cells '.', 'X' or '?'", cell)
            cells[(client, server)] = CELLS[cell]
    for pod in [*header, *clients]:
        if "/" not in pod:
            raise ctx.fail(where, "pods written NS/POD", pod)
    return tuple(clients), tuple(header), cells


def parse_action(ctx: _Ctx, raw: Any, where: str, nodes: int) -> Action:
    data = ctx.mapping(raw, where)
    if len(data) != 1 or next(iter(data)) not in ACTIONS:
        raise ctx.fail(where, f"exactly one of {', '.join(ACTIONS)}", sorted(data))
    kind, body = next(iter(data.items()))
    body = ctx.mapping(body, f"{where}.{kind}")
    if kind == "apply":
        for key in ("apiVersion", "kind", "metadata"):
            if key not in body:
                raise ctx.fail(f"{where}.apply.{key}", "a full manifest with apiVersion, kind, metadata", None, False)
    elif kind == "delete":
        for key in ("kind", "name"):
            if not isinstance(body.get(key), str):
                raise ctx.fail(f"{where}.delete.{key}", "a string", body.get(key))
    elif kind == "label":
        if body.get("kind") not in ("Pod", "Namespace"):
            raise ctx.fail(f"{where}.label.kind", "Pod or Namespace", body.get("kind"))
        ctx.name(body.get("name"), f"{where}.label.name")
        if body["kind"] == "Pod":
            ctx.name(body.get("namespace"), f"{where}.label.namespace")
        ctx.labels(body.get("labels"), f"{where}.label.labels", allow_null=True)
    elif kind == "create-pod":
        pod = parse_pod(ctx, body, f"{where}.create-pod", nodes)
        body = {"pod": pod}
    elif kind == "delete-pod":
        ctx.name(body.get("namespace"), f"{where}.delete-pod.namespace")
        ctx.name(body.get("name"), f"{where}.delete-pod.name")
    return Action(kind, body)


def parse_expect(ctx: _Ctx, raw: Any, where: str) -> Expectation:
    data = ctx.mapping(raw, where)
    port = ctx.integer(data.get("port"), f"{where}.port", 1, 65535)
    protocol = str(data.get("protocol", "TCP"))
    if protocol not in PROTOCOLS:
        raise ctx.fail(f"{where}.protocol", "one of TCP, UDP, SCTP", protocol)
    family = data.get("family")
    if family is not None and family not in ("ipv4", "ipv6"):
        raise ctx.fail(f"{where}.family", "ipv4 or ipv6", family)
    clients, servers, cells = parse_table(ctx, data.get("table"), f"{where}.table")
    return Expectation(port, protocol, clients, servers, cells, family)


def e2e_preset() -> tuple[tuple[NamespaceSpec, ...], tuple[PodSpec, ...]]:
    namespaces = tuple(NamespaceSpec(ns, {"ns": ns}) for ns in ("x", "y", "z"))
    pods = tuple(
        PodSpec(ns.name, pod, {"pod": pod}, E2E_PORTS) for ns in namespaces for pod in ("a", "b", "c")
    )
    return namespaces, pods


def parse_scenario(data: Any, path: Path) -> Scenario:
    ctx = _Ctx(path)
    top = ctx.mapping(data, "top level")
    known = {"name", "description", "source", "nodes", "preset", "namespaces", "pods", "steps"}
    unknown = sorted(set(top) - known)
    if unknown:
        raise ctx.fail("top level", f"only the keys {', '.join(sorted(known))}", unknown)
    name = top.get("name")
    if not isinstance(name, str) or not re.match(r"^[a-z0-9]+(-[a-z0-9]+)*$", name):
        raise ctx.fail("name", "a kebab-case name", name)
    nodes = ctx.integer(top.get("nodes", 2), "nodes", 1, 16)
    preset = top.get("preset")
    if preset is not None:
        if preset != "e2e":
            raise ctx.fail("preset", "'e2e'", preset)
        if "namespaces" in top or "pods" in top:
            raise ctx.fail("preset", "no namespaces/pods beside a preset", sorted({"namespaces", "pods"} & set(top)))
        namespaces, pods = e2e_preset()
    else:
        if "pods" not in top:
            raise ctx.fail("pods", "a list of pods (or preset: e2e)", None, False)
        namespaces = tuple(
            NamespaceSpec(
                ctx.name(ctx.mapping(ns, f"namespaces[{i}]").get("name"), f"namespaces[{i}].name"),
                {k: str(v) for k, v in ctx.labels(ns.get("labels"), f"namespaces[{i}].labels").items()},
            )
            for i, ns in enumerate(ctx.seq(top.get("namespaces", []), "namespaces"))
        )
        pods = tuple(parse_pod(ctx, p, f"pods[{i}]", nodes) for i, p in enumerate(ctx.seq(top["pods"], "pods")))
    keys = [p.key for p in pods]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ctx.fail("pods", "unique NS/POD names", dupes)
    if "steps" not in top:
        raise ctx.fail("steps", "a list of steps", None, False)
    steps = []
    for i, raw in enumerate(ctx.seq(top["steps"], "steps")):
        step = ctx.mapping(raw if raw is not None else {}, f"steps[{i}]")
        extra = sorted(set(step) - {"actions", "expect"})
        if extra:
            raise ctx.fail(f"steps[{i}]", "only actions and expect", extra)
        actions = tuple(
            parse_action(ctx, a, f"steps[{i}].actions[{j}]", nodes)
            for j, a in enumerate(ctx.seq(step.get("actions") or [], f"steps[{i}].actions"))
        )
        expect = tuple(
            parse_expect(ctx, e, f"steps[{i}].expect[{j}]")
            for j, e in enumerate(ctx.seq(step.get("expect") or [], f"steps[{i}].expect"))
        )
        steps.append(Step(actions, expect))
    return Scenario(
        name=name,
        path=path,
        nodes=nodes,
        namespaces=namespaces,
        pods=pods,
        steps=tuple(steps),
        description=str(top.get("description", "")),
        source=str(top.get("source", "")),
        extra={"nodes_explicit": "nodes" in top},
    )


def load_scenario(path: Path) -> Scenario:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{path}: not valid YAML: {exc}") from exc
    return parse_scenario(data, path)


def collect_files(paths: list[Path]) -> list[Path]:
    """Scenario files from files and folders (every ``*.yaml``/``*.yml`` below a folder), sorted."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out.extend(sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml")))
        else:
            out.append(path)
    return out


def substitute(value: Any, ips: Mapping[str, str]) -> Any:
    """Replace ``${ip:NS/POD}`` and ``${cidr:NS/POD/LEN}`` in every string of a manifest (one
    address per pod). Runs of another IP family use :func:`netfence_lab.conformance.families.expand`."""
    from netfence_lab.conformance.families import expand, family_of  # it imports this module

    return expand(value, {pod: {family_of(ip): ip} for pod, ip in ips.items()}, "ipv4")
