"""The conformance runner: build each scenario for real, act, wait for enforcement, probe.

Each scenario gets a fresh Netfence state on a shared control plane: a new
etcd prefix, a new controller, new namespace nodes with one agent each, and
its namespaces and pods; afterwards everything it created is deleted.

Every probe of a run is a new flow: the run's :class:`~netfence_lab.probe.Prober`
binds each probe to a source port from one per-run
:class:`~netfence_lab.ports.SourcePorts`, which hands a port out again only
after every conntrack entry the earlier probe could have left has expired, and
never uses a port the run probes as a destination. (A reused 5-tuple would be a
packet of the earlier probe's flow, and could pass a policy that denies new ones.)

IP families (``ip_family``, :mod:`netfence_lab.conformance.families`): ``ipv4``
probes over IPv4 on an IPv4-only test bed, as the shared format describes (a
scenario that pins IPv6 — an expectation with ``family: ipv6``, a ``${ip6:..}`` or
``${cidr6:..}`` placeholder — gets a dual-stack bed); ``ipv6`` and ``dual`` run
every scenario on a dual-stack bed (IPv6 primary for ``ipv6``) and probe over IPv6,
or over both families in one parallel batch, each cell judged per family.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import json
import logging
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netfence_lab.cluster import LocalCluster
from netfence_lab.conformance.families import (
    DEFAULT_MODE,
    FAMILIES,
    IpFamily,
    Mode,
    expand,
    family_name,
    placeholder_pins,
    pod_addresses,
    probe_families,
)
from netfence_lab.conformance.scenario import (
    Expectation,
    PodSpec,
    Scenario,
    ScenarioError,
    Step,
)
from netfence_lab.conformance.tables import diff_table, format_table
from netfence_lab.env import EnforcementTimeout, NetfenceEnv
from netfence_lab.fabric import node_pod_cidr6
from netfence_lab.peer_env import ENFORCERS, PeerEnv
from netfence_lab.ports import SourcePorts
from netfence_lab.probe import Probe, Prober

log = logging.getLogger(__name__)


@dataclass
class ExpectResult:
    port: int
    protocol: str
    passed: bool
    skipped: bool
    expected: dict[tuple[str, str], bool | None]
    observed: dict[tuple[str, str], bool | None]  # per cell: a wrong family's observation, else the first's
    wrong: list[tuple[str, str]] = field(default_factory=list)  # cells wrong over any family
    families: tuple[IpFamily, ...] = ("ipv4",)  # probed over these
    observed_by_family: dict[IpFamily, dict[tuple[str, str], bool | None]] = field(default_factory=dict)
    wrong_by_family: dict[IpFamily, list[tuple[str, str]]] = field(default_factory=dict)

    def wrong_families(self, cell: tuple[str, str]) -> list[IpFamily]:
        """The families over which ``cell`` was wrong."""
        return [f for f in self.families if cell in self.wrong_by_family.get(f, ())]

    def family_note(self, cell: tuple[str, str]) -> str:
        """`` over ipv6`` (the failing families), empty on an IPv4-only judgement (the shared format's)."""
        if self.families == ("ipv4",):
            return ""
        return " over " + " and ".join(self.wrong_families(cell))

    @property
    def status(self) -> str:
        """``failed`` (a wrong cell), ``skipped`` (no probe could be made: no SCTP) or ``passed``."""
        if not self.passed:
            return "failed"
        if self.observed and all(v is None for v in self.observed.values()):
            return "skipped"
        return "passed"


@dataclass
class StepResult:
    index: int
    passed: bool
    enforce_seconds: float | None
    expects: list[ExpectResult] = field(default_factory=list)
    error: str | None = None
    dump: str | None = None

    @property
    def status(self) -> str:
        """``skipped`` when every expectation of the step was skipped (SCTP only, no SCTP here)."""
        if not self.passed:
            return "failed"
        if self.expects and all(e.status == "skipped" for e in self.expects):
            return "skipped"
        return "passed"


@dataclass
class ScenarioResult:
    name: str
    path: str
    status: str  # passed, failed, skipped, error
    steps: list[StepResult] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "status": self.status,
            "error": self.error,
            "seconds": round(self.seconds, 3),
            "steps": [
                {
                    "index": s.index,
                    "status": s.status,
                    "passed": s.passed,
                    "enforceSeconds": None if s.enforce_seconds is None else round(s.enforce_seconds, 4),
                    "error": s.error,
                    "dump": s.dump,
                    "expect": [
                        {
                            "port": e.port,
                            "protocol": e.protocol,
                            "status": e.status,
                            "passed": e.passed,
                            "skipped": e.skipped,
                            "families": list(e.families),
                            "wrong": [f"{c} -> {s_}{e.family_note((c, s_))}" for c, s_ in e.wrong],
                        }
                        for e in s.expects
                    ],
                }
                for s in self.steps
            ],
        }


Cell = tuple[str, str]  # (client pod key, server pod key)
#: Called after a step's probes, before the next step acts (the state probed is still in force).
AfterStep = Callable[["ScenarioRun", StepResult], Awaitable[None]]


def judge(
    port: int, protocol: str, expected: Mapping[Cell, bool | None], observed: Mapping[Cell, bool | None]
) -> ExpectResult:
    """Compare the probed cells with the expected table (pure).

    A cell is wrong only when both its expectation and its probe are known
    (not None) and differ. A probe that could not be made (None: no SCTP) is
    never wrong; it marks the result ``skipped``.
    """
    wrong = [
        cell
        for cell, seen in observed.items()
        if (want := expected[cell]) is not None and seen is not None and seen != want
    ]
    skipped = any(v is None for v in observed.values())
    return ExpectResult(port, protocol, not wrong, skipped, dict(expected), dict(observed), wrong)


def judge_families(
    port: int,
    protocol: str,
    expected: Mapping[Cell, bool | None],
    observed: Mapping[IpFamily, Mapping[Cell, bool | None]],
) -> ExpectResult:
    """:func:`judge` over each family probed (pure): a cell must hold over every family.

    ``wrong`` lists each cell wrong over any family once (in table order);
    ``wrong_by_family`` says over which; ``observed`` shows per cell the
    observation of the first family it was wrong over, else of the first family.
    """
    families = tuple(observed)
    if not families:
        raise ValueError("judge_families: no family was probed")
    per = {family: judge(port, protocol, expected, cells) for family, cells in observed.items()}
    wrong_cells = {cell for r in per.values() for cell in r.wrong}
    first = per[families[0]].observed
    combined = {
        cell: next((per[f].observed[cell] for f in families if cell in per[f].wrong), first[cell]) for cell in first
    }
    return ExpectResult(
        port, protocol,
        passed=not wrong_cells,
        skipped=any(r.skipped for r in per.values()),
        expected=dict(expected),
        observed=combined,
        wrong=[cell for cell in first if cell in wrong_cells],
        families=families,
        observed_by_family={f: r.observed for f, r in per.items()},
        wrong_by_family={f: r.wrong for f, r in per.items()},
    )


class ScenarioRun:
    """Runs one parsed scenario on a prepared environment."""

    def __init__(self, scenario: Scenario, env: NetfenceEnv, prober: Prober, timeout: float,
                 out: Callable[[str], None], dump_dir: Path, after_step: AfterStep | None = None,
                 ip_family: Mode = DEFAULT_MODE):
        self.scenario = scenario
        self.ip_family = ip_family
        self.env = env
        self.prober = prober
        self.timeout = timeout
        self.out = out
        self.dump_dir = dump_dir
        self.after_step = after_step
        self.pods: dict[str, PodSpec] = {}
        self.round_robin = itertools.count()

    def place(self, pod: PodSpec) -> int:
        if pod.node is not None:
            return pod.node
        return next(self.round_robin) % self.scenario.nodes

    async def setup(self) -> dict[str, int]:
        marks: dict[str, int] = {}
        namespaces = {ns.name: ns.labels for ns in self.scenario.namespaces}
        for pod in self.scenario.pods:
            namespaces.setdefault(pod.namespace, {})
        for name, labels in namespaces.items():
            self._mark(marks, await self.env.ensure_namespace(name, labels))
        # Pods start concurrently (their servers' start-up dominates a scenario's set-up). Node and
        # address are still assigned in listing order: each task places its pod and takes its address
        # before its first suspension, and tasks start in the order they were created.
        created = await asyncio.gather(*(self._create_pod(pod) for pod in self.scenario.pods), return_exceptions=True)
        for outcome in created:
            if isinstance(outcome, BaseException):
                raise outcome
            self._mark(marks, outcome)
        self._check_addresses()
        return marks

    def _check_addresses(self) -> None:
        """The format fixes every address (k-th pod placed on node i: 10.244.i.(10+k), on a dual-stack
        bed also fd00:10:244:i::(10+k)); make sure."""
        assert self.env.kubelet is not None
        handles = self.env.kubelet.pods
        placed: dict[int, int] = {}
        for pod in self.scenario.pods:
            handle = handles[pod.key]
            k = placed.get(handle.node_index, 0)
            placed[handle.node_index] = k + 1
            want = expected_addresses(handle.node_index, k, self.env.ip_families)
            if handle.ips != want:
                raise RuntimeError(f"pod {pod.key} got addresses {handle.ips}, the format says {want}")

    async def _create_pod(self, pod: PodSpec) -> tuple[str, int]:
        node = self.place(pod)
        result = await self.env.create_pod(pod.namespace, pod.name, pod.labels, list(pod.ports), node)
        self.pods[pod.key] = pod
        return result

    @staticmethod
    def _mark(marks: dict[str, int], kind_rv: tuple[str, int]) -> None:
        kind, rv = kind_rv
        marks[kind] = max(marks.get(kind, 0), rv)

    def addresses(self) -> dict[str, dict[IpFamily, str]]:
        """Every pod's address per family."""
        assert self.env.kubelet is not None
        return pod_addresses(self.env.kubelet.pods)

    async def act(self, step: Step) -> dict[str, int]:
        marks: dict[str, int] = {}
        for action in step.actions:
            body = action.body
            if action.kind == "apply":
                manifest = expand(body, self.addresses(), self.ip_family)
                self._mark(marks, await self.env.apply_manifest(manifest))
            elif action.kind == "delete":
                if body["kind"] == "ClusterNetworkPolicy":
                    self._mark(marks, await self.env.delete_cluster_policy(body["name"]))
                    continue
                if body["kind"] != "NetworkPolicy":
                    raise ScenarioError(f"{self.scenario.path}: delete of {body['kind']} is not supported")
                self._mark(marks, await self.env.delete_policy(body.get("namespace", "default"), body["name"]))
            elif action.kind == "label":
                self._mark(
                    marks,
                    await self.env.label(body["kind"], body["name"], body.get("labels") or {}, body.get("namespace")),
                )
            elif action.kind == "create-pod":
                pod: PodSpec = body["pod"]
                assert self.env.kubelet is not None
                self._mark(marks, await self.env.ensure_namespace(pod.namespace, {}))
                self._mark(marks, await self._create_pod(pod))
            elif action.kind == "delete-pod":
                self._mark(marks, await self.env.delete_pod(body["namespace"], body["name"]))
                self.pods.pop(f"{body['namespace']}/{body['name']}", None)
        return marks

    def families_of(self, expect: Expectation) -> tuple[IpFamily, ...]:
        """The families a table is probed over: its own ``family``, else the run's."""
        for family in FAMILIES:
            if expect.family == family:
                return (family,)
        return probe_families(self.ip_family)

    def probe_step(self, expects: list[Expectation]) -> list[ExpectResult]:
        """Probe every cell of every table of a step, over each of its families, in one parallel batch
        (each probe is made once)."""
        assert self.env.kubelet is not None
        handles = self.env.kubelet.pods
        addresses = pod_addresses(handles)
        present = set(handles)
        plans: list[tuple[Expectation, dict[IpFamily, dict[tuple[str, str], Probe]]]] = []
        for expect in expects:
            listed = set(expect.clients) | set(expect.servers)
            if listed != present or set(expect.clients) != set(expect.servers):
                missing = sorted(present - listed)
                extra = sorted(listed - present)
                raise ScenarioError(
                    f"{self.scenario.path}: table for {expect.port}/{expect.protocol} must list every existing pod "
                    f"once as row and column (missing {missing}, unknown {extra})"
                )
            pairs = [(c, s) for c in expect.clients for s in expect.servers if c != s]
            per_family: dict[IpFamily, dict[tuple[str, str], Probe]] = {}
            for family in self.families_of(expect):
                lacking = sorted(pod for pod in present if family not in addresses[pod])
                if lacking:
                    raise ScenarioError(
                        f"{self.scenario.path}: table for {expect.port}/{expect.protocol} over {family}: "
                        f"pods {lacking} have no {family_name(family)} address"
                    )
                per_family[family] = {
                    (c, s): Probe(handles[c].netns, addresses[s][family], expect.port, expect.protocol)
                    for c, s in pairs
                }
            plans.append((expect, per_family))
        batch = [p for _, per_family in plans for probes in per_family.values() for p in probes.values()]
        results = self.prober.probe_many(batch, timeout=1.0)
        out = []
        for expect, per_family in plans:
            observed = {f: {pair: results[p] for pair, p in probes.items()} for f, probes in per_family.items()}
            out.append(judge_families(expect.port, expect.protocol, expect.cells, observed))
        return out

    def dump(self, step_index: int) -> str:
        path = self.dump_dir / f"{self.scenario.name}-step{step_index}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        parts = []
        for agent in self.env.agents.values():
            saves = [["iptables-save", "-c", "-t", "filter"]]
            if self.env.dual_stack:
                saves.append(["ip6tables-save", "-c", "-t", "filter"])
            for argv in (*saves, ["ipset", "save"]):
                res = subprocess.run(
                    ["ip", "netns", "exec", agent.netns, *argv], capture_output=True, text=True, check=False
                )
                text = "\n".join(
                    line for line in res.stdout.splitlines()
                    if "NETFENCE" in line or "nf-" in line or "nf4-" in line or "nf6-" in line or line.startswith("*")
                )
                parts.append(f"### node {agent.node} ({agent.netns}): {' '.join(argv)}\n{text}\n")
        processes = [*self.env.controllers.values(), *(a.process for a in self.env.agents.values())]
        if isinstance(self.env, PeerEnv):  # an external enforcer: its hooks and its processes
            parts += self.env.dump_nodes()
            processes += self.env.enforcer_processes()
        for proc in processes:
            state = "running" if proc.alive() else "exited"
            parts.append(f"### {proc.name} ({state}), last lines of {proc.log_path}\n{proc.tail(40)}\n")
        path.write_text("\n".join(parts))
        return str(path)

    async def wait_by_probing(self, expects: list[Expectation]) -> tuple[float, list[ExpectResult]]:
        """The barrier for an external enforcer (no signal says a change is in force): probe the
        step's tables again until every cell shows its expected verdict, or ``timeout`` passes.
        Returns the seconds waited and the last round's results (with its wrong cells if the
        tables never matched). Every round's probes are new flows, like every probe of a run."""
        started = time.monotonic()
        while True:
            results = await asyncio.to_thread(self.probe_step, expects)
            waited = time.monotonic() - started
            if all(r.passed for r in results) or waited > self.timeout:
                return waited, results

    async def run(self) -> ScenarioResult:
        started = time.monotonic()
        result = ScenarioResult(self.scenario.name, str(self.scenario.path), "passed")
        marks = await self.setup()
        for index, step in enumerate(self.scenario.steps):
            step_marks = await self.act(step)
            for kind, rv in marks.items():
                step_marks[kind] = max(step_marks.get(kind, 0), rv)
            marks = {}
            step_result = StepResult(index, True, None)
            result.steps.append(step_result)
            probed: list[ExpectResult] | None = None
            try:
                if isinstance(self.env, PeerEnv):  # no enforcement signal: the probes are the barrier
                    step_result.enforce_seconds, probed = await self.wait_by_probing(list(step.expect))
                else:
                    step_result.enforce_seconds = await self.env.wait_enforced(step_marks, self.timeout)
            except EnforcementTimeout as exc:
                step_result.passed = False
                step_result.error = f"not enforced within {self.timeout:.0f}s: {exc}"
                step_result.dump = self.dump(index)
                self.out(f"  step {index}: FAIL ({step_result.error}); dump: {step_result.dump}")
                result.status = "failed"
                break
            if step.expect:
                step_result.expects = (
                    probed if probed is not None else await asyncio.to_thread(self.probe_step, list(step.expect))
                )
                if self.after_step is not None:  # e.g. tests comparing `netfence explain` with the probes
                    await self.after_step(self, step_result)
            step_result.passed = all(er.passed for er in step_result.expects)
            if step_result.status == "skipped":
                only = ", ".join(f"{e.port}/{e.protocol}" for e in step_result.expects)
                self.out(
                    f"  step {index}: skipped (enforced in {step_result.enforce_seconds:.2f}s; "
                    f"every expectation is {only}: no SCTP in this kernel)"
                )
            elif step_result.passed:
                skipped = [f"{e.port}/{e.protocol}" for e in step_result.expects if e.skipped]
                note = f"; skipped {', '.join(skipped)} (no SCTP in this kernel)" if skipped else ""
                self.out(f"  step {index}: pass (enforced in {step_result.enforce_seconds:.2f}s){note}")
            else:
                step_result.dump = self.dump(index)
                result.status = "failed"
                self.out(f"  step {index}: FAIL (enforced in {step_result.enforce_seconds:.2f}s)")
                for er in step_result.expects:
                    if er.passed:
                        continue
                    failing = [f for f in er.families if er.wrong_by_family.get(f)] or list(er.families)
                    only_ipv4 = er.families == ("ipv4",)  # the shared format's output, unchanged
                    over = "" if only_ipv4 else f" over {' and '.join(failing)}"
                    self.out(f"    {er.port}/{er.protocol}{over}: {len(er.wrong)} wrong cells")
                    order = list(dict.fromkeys(c for c, _ in er.expected))
                    self.out("    expected:\n" + format_table(order, er.expected, indent=6))
                    for family in failing:
                        seen = er.observed_by_family.get(family, er.observed)
                        label = "" if only_ipv4 else f" over {family}"
                        self.out(f"    observed{label}:\n" + format_table(order, seen, indent=6))
                        self.out(f"    differences{label}:\n" + diff_table(order, er.expected, seen, indent=6))
                    for c, s in er.wrong:
                        want = "allowed" if er.expected[(c, s)] else "denied"
                        self.out(f"      {c} -> {s}{er.family_note((c, s))}: expected {want}, observed the opposite")
                self.out(f"    netfilter dump of the nodes: {step_result.dump}")
        if (
            result.status == "passed"
            and any(s.expects for s in result.steps)
            and all(e.status == "skipped" for s in result.steps for e in s.expects)
        ):
            result.status = "skipped"
        result.seconds = time.monotonic() - started
        return result


async def run_scenarios(
    scenarios: list[Scenario | ScenarioError],
    cluster: LocalCluster,
    workdir: Path,
    *,
    default_nodes: int | None = None,
    timeout: float = 60.0,
    out: Callable[[str], None],
    source_ports: SourcePorts | None = None,
    after_step: AfterStep | None = None,
    ip_family: Mode = DEFAULT_MODE,
    enforcer: str = "netfence",
) -> list[ScenarioResult]:
    """Run ``scenarios`` one after the other; ``source_ports`` defaults to a fresh
    :meth:`SourcePorts.for_run` reserving every port the scenarios use; ``ip_family``:
    ``ipv4``, ``ipv6`` or ``dual`` (module docstring). ``enforcer``: ``netfence`` (controller +
    agents, the enforcement barrier) or ``kube-network-policies`` (:class:`~netfence_lab.peer_env.PeerEnv`:
    the peer on every node, no barrier: each step waits by probing)."""
    if enforcer not in ENFORCERS:
        raise ValueError(f"unknown enforcer {enforcer!r}; choose one of {', '.join(ENFORCERS)}")
    if source_ports is None:
        source_ports = SourcePorts.for_run(scenario_ports(scenarios))
    prober = Prober(source_ports=source_ports)
    results: list[ScenarioResult] = []
    for number, item in enumerate(scenarios):
        if isinstance(item, ScenarioError):
            out(f"ERROR {item}")
            results.append(ScenarioResult(str(item).split(":")[0], str(item).split(":")[0], "error", error=str(item)))
            continue
        scenario = item
        explicit = scenario.extra.get("nodes_explicit", True)
        nodes = scenario.nodes if explicit or default_nodes is None else default_nodes
        families = bed_families(scenario, ip_family)
        stack = "" if ip_family == DEFAULT_MODE and families == ("ipv4",) else f", {ip_family}: {'+'.join(families)}"
        out(f"scenario {scenario.name} ({scenario.path}, {nodes} nodes{stack})")
        env_type = NetfenceEnv if enforcer == "netfence" else PeerEnv
        env = env_type(cluster, workdir / f"s{number}-{scenario.name}", nodes=nodes, ip_families=families)
        run: ScenarioRun | None = None
        try:
            await env.start()
            scenario_for_run = scenario if nodes == scenario.nodes else _with_nodes(scenario, nodes)
            run = ScenarioRun(scenario_for_run, env, prober, timeout, out, workdir / "dumps", after_step, ip_family)
            result = await run.run()
        except ScenarioError as exc:
            result = ScenarioResult(scenario.name, str(scenario.path), "error", error=str(exc))
            out(f"  ERROR {exc}")
        except Exception as exc:
            log.exception("scenario %s crashed", scenario.name)
            result = ScenarioResult(scenario.name, str(scenario.path), "error", error=f"{type(exc).__name__}: {exc}")
            out(f"  ERROR {type(exc).__name__}: {exc}")
        finally:
            with contextlib.suppress(Exception):
                await env.delete_user_state()
            await env.close()
        out(f"{result.status.upper()} {scenario.name} ({result.seconds:.1f}s)")
        results.append(result)
    return results


def bed_families(scenario: Scenario, mode: Mode) -> tuple[IpFamily, ...]:
    """The test bed's families for ``scenario`` in a run of ``mode``, the pods' primary family first.

    ``ipv4`` keeps the shared format's IPv4-only bed unless the scenario pins IPv6 itself.
    """
    if mode == "ipv6":
        return ("ipv6", "ipv4")
    if mode == "dual" or "ipv6" in pinned_families(scenario):
        return ("ipv4", "ipv6")
    return ("ipv4",)


def pinned_families(scenario: Scenario) -> set[IpFamily]:
    """Families the scenario names itself: tables' ``family``, ``${ip4/ip6/cidr4/cidr6:..}`` placeholders."""
    found: set[IpFamily] = set()
    for step in scenario.steps:
        found.update(f for e in step.expect for f in FAMILIES if e.family == f)
        for action in step.actions:
            if action.kind == "apply":
                found |= placeholder_pins(action.body)
    return found


def expected_addresses(node_index: int, k: int, families: tuple[str, ...]) -> tuple[str, ...]:
    """The addresses the format gives the k-th pod placed on node ``node_index``, in ``families`` order."""
    by_family = {
        "ipv4": f"10.244.{node_index}.{10 + k}",
        "ipv6": str(ipaddress.ip_network(node_pod_cidr6(node_index)).network_address + 10 + k),
    }
    return tuple(by_family[f] for f in families)


def scenario_ports(scenarios: list[Scenario | ScenarioError]) -> set[int]:
    """Every port the scenarios' pods serve or their tables probe (never used as a source port)."""
    ports: set[int] = set()
    for scenario in scenarios:
        if isinstance(scenario, ScenarioError):
            continue
        pods = list(scenario.pods)
        for step in scenario.steps:
            ports.update(e.port for e in step.expect)
            pods += [a.body["pod"] for a in step.actions if a.kind == "create-pod"]
        ports.update(port for pod in pods for port, _ in pod.ports)
    return ports


def _with_nodes(scenario: Scenario, nodes: int) -> Scenario:
    import dataclasses

    return dataclasses.replace(scenario, nodes=nodes)


def summary_line(results: list[ScenarioResult]) -> str:
    passed = sum(r.status == "passed" for r in results)
    failed = sum(r.status in ("failed", "error") for r in results)
    skipped = sum(r.status == "skipped" for r in results)
    line = f"{passed} passed, {failed} failed"
    return line + (f", {skipped} skipped" if skipped else "")


def write_json(results: list[ScenarioResult], path: Path) -> None:
    enforce = sorted(
        s.enforce_seconds for r in results for s in r.steps if s.enforce_seconds is not None
    )
    report = {
        "summary": summary_line(results),
        "scenarios": [r.to_json() for r in results],
        "steps": sum(len(r.steps) for r in results),
        "enforceSeconds": {
            "p50": round(enforce[len(enforce) // 2], 4) if enforce else None,
            "max": round(enforce[-1], 4) if enforce else None,
        },
    }
    path.write_text(json.dumps(report, indent=2))
