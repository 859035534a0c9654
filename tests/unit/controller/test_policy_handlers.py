"""The NetworkPolicy / ClusterNetworkPolicy event handlers (controller/handlers.py): world, status, warnings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from tests.unit.controller.test_controller_metrics import bed, handler

from netfence.config import ControllerConfig
from netfence.controller import handlers


@dataclass
class MarkingStatus:
    marked: list[tuple[str, str]] = field(default_factory=list)
    removed: list[tuple[str, str]] = field(default_factory=list)

    def mark(self, keys: set[tuple[str, str]]) -> None:
        self.marked.extend(sorted(keys))

    def policies_removed(self, keys: list[tuple[str, str]]) -> None:
        self.removed.extend(keys)


def policy(rv: int, cidr: str = "10.0.0.0/8") -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": "p", "resourceVersion": str(rv), "uid": "u", "generation": 1},
            "spec": {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": cidr}}]}]}}


def cluster_policy(rv: int) -> dict[str, Any]:
    return {"metadata": {"name": "c", "resourceVersion": str(rv), "uid": "u", "generation": 1},
            "spec": {"tier": "Admin", "priority": 1, "subject": {"namespaces": {}},
                     "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]}}


@pytest.mark.parametrize(("name", "body", "key"), [
    ("policy_event", policy, ("ns", "p")),
    ("cluster_policy_event", cluster_policy, ("", "c")),
])
async def test_a_repeated_event_costs_no_status_pass_and_no_warning_check(
        name: str, body: Any, key: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Kopf hands every object over again after each (re)connect (``type`` None); an unchanged one
    is not evaluated again (at a cold start of 1,000 policies that was a status pass and a
    warning check per policy on top of the start-up listing's)."""
    b = bed()
    status = MarkingStatus()
    b.runtime.status = status  # type: ignore[assignment]
    views: list[tuple[str, str]] = []
    real_view = b.runtime.engine.policy_view

    def counting_view(namespace: str, policy_name: str, **kwargs: Any) -> Any:
        views.append((namespace, policy_name))
        return real_view(namespace, policy_name, **kwargs)

    monkeypatch.setattr(b.runtime.engine, "policy_view", counting_view)
    monkeypatch.setattr(handlers.kopf, "warn", lambda *args, **kwargs: None)
    event = handler(handlers.build_registry(ControllerConfig(), b.metrics), name)
    memo = type("Memo", (), {"runtime": b.runtime})()
    await event(memo=memo, type="ADDED", body=body(5))
    assert status.marked == [key] and views == [key]
    await event(memo=memo, type=None, body=body(5))  # Kopf's listing: the same object
    assert status.marked == [key] and views == [key]
    await event(memo=memo, type="MODIFIED", body=body(6))  # a change is evaluated again
    assert status.marked == [key, key] and views == [key, key]
    await event(memo=memo, type="DELETED", body=body(7))
    assert status.removed == [key]


async def test_a_repeat_seen_first_as_a_standby_is_checked_once_leading(monkeypatch: pytest.MonkeyPatch) -> None:
    """A standby does not check warnings; the first repeat after it leads does (nothing is lost)."""
    warned: list[str] = []
    monkeypatch.setattr(handlers.kopf, "warn", lambda body, reason, message: warned.append(message))
    b = bed()
    status = MarkingStatus()
    b.runtime.status = status  # type: ignore[assignment]
    b.election.is_leader = False
    event = handler(handlers.build_registry(ControllerConfig(), b.metrics), "policy_event")
    memo = type("Memo", (), {"runtime": b.runtime})()
    await event(memo=memo, type="ADDED", body=policy(5))
    assert ("ns", "p") not in b.runtime.warnings_posted
    b.election.is_leader = True
    await event(memo=memo, type=None, body=policy(5))
    assert ("ns", "p") in b.runtime.warnings_posted and status.marked == [("ns", "p"), ("ns", "p")]
    assert len(warned) == 1  # the 10.0.0.0/8 ipBlock holds pod addresses: a warning, posted once
