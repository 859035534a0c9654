"""Apply Rulesets to the kernel through a CommandRunner (I/O edge).

:class:`Dataplane` keeps the last successfully applied Ruleset and applies
deltas against it; the first apply, and every apply after a failure, is a full
sync that reads the kernel's current state. It never touches chains or sets
that do not carry our prefixes, and never removes anything on shutdown.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from netfence.dataplane.kernel import (
    KernelState,
    TableState,
    hook_fix,
    hook_positions,
    parse_ipset_save,
    parse_iptables_save,
    parse_set_names,
)
from netfence.dataplane.plan import Plan, plan, uninstall_plan
from netfence.dataplane.render import Features
from netfence.dataplane.ruleset import FAMILIES, FORWARD_CHAIN, Family, IpSet, Ruleset
from netfence.dataplane.runner import CommandRunner, Result

log = logging.getLogger(__name__)

_IPT = {"v4": "iptables", "v6": "ip6tables"}
_PROBE_CHAIN = "NETFENCE-PROBE"
#: A kernel read started by ensure_hooks() serves the first full sync only if it is this recent.
PREFETCH_MAX_AGE = 30.0


class ApplyError(RuntimeError):
    """A dataplane tool failed; ``stderr`` is its message."""

    def __init__(self, what: str, result: Result) -> None:
        self.what = what
        self.returncode = result.returncode
        self.stderr = result.stderr.strip()
        super().__init__(f"{what} failed (exit {result.returncode}): {self.stderr}")


@dataclass(frozen=True, slots=True)
class ApplyResult:
    rules: int
    sets: int
    duration: float
    full: bool = False


@dataclass
class _Snapshot:
    """Our part of the kernel as read back (or derived) after the last apply."""

    chains: dict[Family, dict[str, tuple[str, ...]]] = field(default_factory=dict)
    sets: dict[str, IpSet] = field(default_factory=dict)


class Dataplane:
    """``rewrite_all``: a full sync rewrites every chain and refills every set, even
    those the kernel already holds as desired (the behaviour before full syncs
    diffed against the kernel; benchmarks measure it with this switch).
    ``prefetch``: :meth:`ensure_hooks` starts reading our chains and sets in the
    background, for the first full sync (an agent start: the tools run while the
    agent reads etcd and renders)."""

    def __init__(self, runner: CommandRunner, ipv6: bool = True, *, rewrite_all: bool = False,
                 prefetch: bool = False) -> None:
        self.runner = runner
        self.ipv6 = ipv6
        self.rewrite_all = rewrite_all
        self.prefetch = prefetch and not rewrite_all
        self._prefetched: tuple[float, Future[KernelState]] | None = None
        self.families: tuple[Family, ...] = FAMILIES if ipv6 else FAMILIES[:1]
        self._applied: Ruleset | None = None
        self._desired: Ruleset | None = None
        self._snapshot: _Snapshot | None = None
        # rendered rule -> the kernel's spelling, learned on full syncs (normally empty)
        self._spelling: dict[str, str] = {}

    @property
    def applied(self) -> Ruleset | None:
        """The last successfully applied Ruleset (None: the next apply is a full sync)."""
        return self._applied

    # ---- running tools ------------------------------------------------------
    def _run(self, what: str, argv: Sequence[str], input: str | None = None) -> Result:
        result = self.runner.run(argv, input)
        if not result.ok:
            raise ApplyError(what, result)
        return result

    def _restore(self, family: Family, text: str) -> None:
        self._run(f"{_IPT[family]}-restore", [f"{_IPT[family]}-restore", "-w", "--noflush"], text)

    def _read_kernel(self, *, contents: bool) -> KernelState:
        tables = {
            fam: parse_iptables_save(self._run("iptables-save", [f"{_IPT[fam]}-save", "-t", "filter"]).stdout)
            for fam in self.families
        }
        if contents:
            sets = parse_ipset_save(self._run("ipset save", ["ipset", "save"]).stdout)
            return KernelState(tables=tables, set_names=frozenset(sets), sets=sets)
        names = parse_set_names(self._run("ipset list", ["ipset", "list", "-n"]).stdout)
        return KernelState(tables=tables, set_names=names)

    def _execute(self, p: Plan) -> None:
        if p.ipset_restore:
            self._run("ipset restore", ["ipset", "restore", "-exist"], p.ipset_restore)
        for fam, text in p.iptables_restore.items():
            self._restore(fam, text)
        if p.ipset_destroy:
            result = self.runner.run(["ipset", "restore", "-exist"], p.ipset_destroy)
            if not result.ok:  # rules are in force; a leftover set shows up as drift
                log.warning("could not destroy stale ipsets: %s", result.stderr.strip())

    # ---- public API ---------------------------------------------------------
    def ensure_hooks(self) -> None:
        """Make `-j NETFENCE-FORWARD` the first rule of FORWARD, once, in every family."""
        for fam in self.families:
            ipt = _IPT[fam]
            check = self.runner.run([ipt, "-w", "-C", "FORWARD", "-j", FORWARD_CHAIN])
            positions: tuple[int, ...] = ()
            if check.ok:
                listing = self._run(f"{ipt} -S", [ipt, "-w", "-S", "FORWARD"]).stdout
                positions = hook_positions(listing)
            elif check.returncode != 1:  # our chain does not exist yet: create it empty
                self.runner.run([ipt, "-w", "-N", FORWARD_CHAIN])
            fix = hook_fix(positions)
            if fix:
                log.info("%s: placing the %s hook at the top of FORWARD", ipt, FORWARD_CHAIN)
                self._restore(fam, "*filter\n" + "".join(f"{ln}\n" for ln in fix) + "COMMIT\n")
        if self.prefetch and self._applied is None and self._prefetched is None:
            self._start_prefetch()

    def _start_prefetch(self) -> None:
        future: Future[KernelState] = Future()

        def read() -> None:
            try:
                future.set_result(self._read_kernel(contents=True))
            except BaseException as exc:  # handed to the full sync, which reads again
                future.set_exception(exc)

        self._prefetched = (time.monotonic(), future)
        threading.Thread(target=read, name="kernel-prefetch", daemon=True).start()

    def _full_sync_read(self) -> KernelState:
        """The kernel state a full sync plans against: the prefetched read if recent, else read now."""
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is not None and time.monotonic() - prefetched[0] < PREFETCH_MAX_AGE:
            try:
                return prefetched[1].result()
            except Exception as exc:
                log.warning("reading the kernel ahead failed (%s); reading it again", exc)
        return self._read_kernel(contents=not self.rewrite_all)

    def apply(self, desired: Ruleset) -> ApplyResult:
        """Make the kernel match ``desired`` (a delta, or a full sync when needed).

        Raises ApplyError on failure; the previous rules stay in force and the
        next apply is a full sync.
        """
        desired = desired.restricted(self.families)
        self._desired = desired
        start = time.perf_counter()
        applied, self._applied = self._applied, None
        if applied is None:
            self._snapshot = None  # until the full sync succeeds, check_drift() says "not in sync"
        # A full sync reads our chains and sets and rewrites only what differs (rewrite_all: everything).
        kernel = self._full_sync_read() if applied is None else None
        p = plan(applied, desired, kernel=kernel, spell=self._spell)
        try:
            self._execute(p)
        except ApplyError:
            self._snapshot = None  # check_drift() now reports "not in sync"
            raise
        self._applied = desired
        if p.full:
            # Nothing written: the kernel is as just read, no need to read it back.
            self._record_full(desired, kernel if p.empty else None)
            log.info("full sync: %d rules, %d sets (%d chains and %d sets written)", desired.rule_count,
                     desired.set_count, sum(len(c) for c in p.changed_chains.values()), len(p.changed_sets))
        else:
            self._record_delta(p, desired)
        return ApplyResult(desired.rule_count, desired.set_count, time.perf_counter() - start, p.full)

    def check_drift(self) -> bool:
        """True when our chains, sets or hooks in the kernel differ from the last apply."""
        if self._snapshot is None:
            return self._desired is not None
        kernel = self._read_kernel(contents=True)
        diffs = self._differences(kernel, self._snapshot)
        for diff in diffs[:10]:
            log.warning("drift: %s", diff)
        return bool(diffs)

    def read_state(self) -> KernelState:
        """Our chains (every family) and our sets with their members, as the kernel holds them now."""
        return self._read_kernel(contents=True)

    def forget_applied(self) -> None:
        """Make the next ``apply()`` a full sync (after drift or a failed apply)."""
        self._applied = None

    def repair(self) -> ApplyResult:
        """Full sync to the last desired Ruleset."""
        if self._desired is None:
            raise RuntimeError("repair() before any apply()")
        self._applied = None
        return self.apply(self._desired)

    def uninstall(self) -> None:
        """Remove our hook, chains and sets (an explicit operator action only)."""
        self._execute_strict(uninstall_plan(self._read_kernel(contents=False)))
        self._applied = self._desired = self._snapshot = None

    def detect_features(self) -> Features:
        """Probe what the kernel accepts (in a throwaway chain, one transaction)."""
        probe = (
            f"*filter\n:{_PROBE_CHAIN} - [0:0]\n-A {_PROBE_CHAIN} -p sctp -m sctp --dport 1 -j RETURN\n"
            f"-F {_PROBE_CHAIN}\n-X {_PROBE_CHAIN}\nCOMMIT\n"
        )
        result = self.runner.run(["iptables-restore", "-w", "--noflush"], probe)
        if not result.ok:
            log.warning("SCTP port matching unsupported: %s", result.stderr.strip())
        return Features(ipv6=self.ipv6, sctp_port_match=result.ok)

    # ---- bookkeeping --------------------------------------------------------
    def _execute_strict(self, p: Plan) -> None:
        for fam, text in p.iptables_restore.items():
            self._restore(fam, text)
        if p.ipset_destroy:
            self._run("ipset destroy", ["ipset", "restore", "-exist"], p.ipset_destroy)

    def _spell(self, rules: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(self._spelling.get(r, r) for r in rules) if self._spelling else rules

    def _spelled(self, chains: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        return {c: self._spell(r) for c, r in chains.items()}

    def _record_full(self, desired: Ruleset, kernel: KernelState | None = None) -> None:
        """Take the snapshot after a full sync from ``kernel`` (read back now if None)."""
        if kernel is None or kernel.sets is None:
            kernel = self._read_kernel(contents=True)
        for fam in self.families:
            got = kernel.table(fam).chains
            for chain, rules in desired.family_chains(fam).items():
                actual = got.get(chain, ())
                if actual != rules and len(actual) == len(rules):
                    for mine, theirs in zip(rules, actual, strict=True):
                        if mine != theirs:
                            log.warning("kernel spells %r as %r", mine, theirs)
                            self._spelling[mine] = theirs
        self._snapshot = _Snapshot(
            chains={fam: dict(kernel.table(fam).chains) for fam in self.families},
            sets=dict(kernel.sets or {}),
        )
        diffs = self._differences(kernel, self._expected(desired))
        for diff in diffs[:10]:
            log.warning("after full sync: %s", diff)

    def _expected(self, desired: Ruleset) -> _Snapshot:
        return _Snapshot(
            chains={fam: self._spelled(desired.family_chains(fam)) for fam in self.families},
            sets=dict(desired.sets),
        )

    def _record_delta(self, p: Plan, desired: Ruleset) -> None:
        snap = self._snapshot
        if snap is None:
            return
        for fam in self.families:
            chains = snap.chains.setdefault(fam, {})
            for chain in p.changed_chains.get(fam, ()):
                chains[chain] = self._spell(desired.family_chains(fam)[chain])
            for chain in p.removed_chains.get(fam, ()):
                chains.pop(chain, None)
        for name in p.changed_sets:
            snap.sets[name] = desired.sets[name]
        for name in p.removed_sets:
            snap.sets.pop(name, None)

    def _differences(self, kernel: KernelState, expected: _Snapshot) -> list[str]:
        diffs: list[str] = []
        for fam in self.families:
            table: TableState = kernel.table(fam)
            if table.hooks != (1,):
                diffs.append(f"{fam}: hook positions in FORWARD {table.hooks}, want (1,)")
            want = expected.chains.get(fam, {})
            for chain in sorted(set(want) | set(table.chains)):
                if want.get(chain) != table.chains.get(chain):
                    state = "differs" if chain in want and chain in table.chains else "missing/unexpected"
                    diffs.append(f"{fam}: chain {chain} {state}")
        got_sets = kernel.sets or {}
        for name in sorted(set(expected.sets) | set(got_sets)):
            if expected.sets.get(name) != got_sets.get(name):
                diffs.append(f"set {name} {'missing' if name not in got_sets else 'differs'}")
        return diffs
