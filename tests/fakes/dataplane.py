"""An in-memory fake of the agent's ``Dataplane`` (``dataplane/apply.py``): the kernel is a Ruleset.

* ``apply`` makes the kernel hold exactly the desired Ruleset, or raises the
  next queued :class:`ApplyError` (``fail``) and leaves the kernel as it was,
  like ``iptables-restore`` (atomic per family);
* after a failure, ``forget_applied`` or at the start the next apply is a
  *full sync* (recorded in :attr:`FakeDataplane.applies`);
* ``hold()`` blocks applies (they run in a worker thread) until ``release()``:
  commits arriving meanwhile pile up;
* anything that would flush or remove our rules (``uninstall``) is recorded,
  so tests can assert that it never happens (fail-static).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from netfence.dataplane.apply import ApplyError, ApplyResult
from netfence.dataplane.kernel import KernelState, TableState
from netfence.dataplane.ruleset import Family, Ruleset
from netfence.dataplane.runner import Result


@dataclass(frozen=True, slots=True)
class Applied:
    ruleset: Ruleset
    full: bool
    ok: bool


class FakeDataplane:
    def __init__(self, families: tuple[Family, ...] = ("v4",), kernel: Ruleset | None = None) -> None:
        self.families = families
        self.kernel = kernel or Ruleset()  # what netfilter holds now
        self.applies: list[Applied] = []  # every apply attempted, in order
        self.failures: list[str] = []  # stderr of the next applies to fail, in order
        self.uninstalls = 0
        self.hooks_ensured = 0
        self.drifted = False
        self._applied: Ruleset | None = None  # None: the next apply is a full sync
        self._gate = threading.Event()
        self._gate.set()
        self.entered = threading.Event()  # set when an apply has started (and is maybe held)
        self._drift_gate = threading.Event()
        self._drift_gate.set()
        self.drift_entered = threading.Event()  # set when a drift check has started (and is maybe held)
        self.applying = False  # an apply is between its start and its return
        self.drift_checks = 0
        self.drift_checks_during_apply = 0  # a kernel read racing an apply (must stay 0)

    # -- test controls ---------------------------------------------------------------------

    def fail(self, *stderr: str) -> None:
        """The next ``len(stderr)`` applies fail with these tool errors."""
        self.failures.extend(stderr)

    def hold(self) -> None:
        self.entered.clear()
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def hold_drift(self) -> None:
        """Hold the next drift checks in their kernel read until :meth:`release_drift`."""
        self.drift_entered.clear()
        self._drift_gate.clear()

    def release_drift(self) -> None:
        self._drift_gate.set()

    # -- the Dataplane interface the agent uses ----------------------------------------------

    def ensure_hooks(self) -> None:
        self.hooks_ensured += 1

    def apply(self, desired: Ruleset) -> ApplyResult:
        self.applying = True
        try:
            return self._apply(desired)
        finally:
            self.applying = False

    def _apply(self, desired: Ruleset) -> ApplyResult:
        self.entered.set()
        if not self._gate.wait(timeout=10):
            raise TimeoutError("FakeDataplane held for more than 10s (release() missing?)")
        desired = desired.restricted(self.families)
        full = self._applied is None
        self._applied = None
        if self.failures:
            stderr = self.failures.pop(0)
            self.applies.append(Applied(desired, full, False))
            raise ApplyError("iptables-restore", Result(1, "", stderr))
        self.kernel = desired
        self._applied = desired
        self.applies.append(Applied(desired, full, True))
        return ApplyResult(desired.rule_count, desired.set_count, 0.0, full)

    def forget_applied(self) -> None:
        self._applied = None

    def check_drift(self) -> bool:
        """``drifted``; a check that overlaps an apply also says drifted (a real read then sees the
        new rules against the old record)."""
        self.drift_checks += 1
        self.drift_checks_during_apply += self.applying
        self.drift_entered.set()
        if not self._drift_gate.wait(timeout=10):
            raise TimeoutError("FakeDataplane drift check held for more than 10s (release_drift() missing?)")
        return self.drifted or self.applying

    def read_state(self) -> KernelState:
        rs = self.kernel
        tables = {fam: TableState(chains=dict(rs.family_chains(fam)), hooks=(1,)) for fam in rs.families}
        return KernelState(tables=tables, set_names=frozenset(rs.sets), sets=dict(rs.sets))

    def uninstall(self) -> None:
        self.uninstalls += 1
        self.kernel = Ruleset()
