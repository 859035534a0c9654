"""The Kopf settings the controller relies on (controller/handlers.py)."""

from __future__ import annotations

from typing import Any

import kopf

from netfence.config import ControllerConfig
from netfence.controller import handlers


def test_only_event_handlers_so_no_essence_is_built() -> None:
    """Kopf builds an essence (a deep copy of the body) per event for change detection; the
    controller skips it, which is sound only while every resource handler is an ``on.event``
    handler (no on.create/update/delete/field/resume handlers, no daemons or timers)."""
    registry = handlers.build_registry(ControllerConfig())
    assert registry._watching.get_all_handlers()  # pods, namespaces, nodes, policies, statuses
    assert registry._changing.get_all_handlers() == []
    assert registry._spawning.get_all_handlers() == []
    body: Any = kopf.Body({"metadata": {"name": "a", "labels": {"x": "y"}}, "spec": {"big": list(range(100))}})
    assert handlers._NoDiffBase().build(body=body, extra_fields=[]) == {}
