"""Lazy rendering of a key → JSON state, with change tracking between drains.

Producers mark keys dirty; :meth:`ChangeTracker.materialise` re-renders only
those keys. The value each key had at the last drain is remembered the first
time it changes, so :meth:`ChangeTracker.drain` reports exactly the keys whose
value differs from the previous drain (a change undone in between is not
reported).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

Json = dict[str, Any]


class ChangeTracker:
    def __init__(self) -> None:
        self._state: dict[str, Json] = {}
        self._dirty: set[str] = set()
        self._pending: dict[str, Json | None] = {}  # key -> value at the last drain
        self._previous: dict[str, Json | None] = {}  # keys of the last drain -> value before it

    def mark(self, key: str) -> None:
        self._dirty.add(key)

    def materialise(self, render: Callable[[str], Json | None]) -> None:
        """Re-render every dirty key (``render`` returns None for an absent key)."""
        for key in self._dirty:
            value = render(key)
            before = self._state.get(key)
            if value == before:
                continue
            if key not in self._pending:
                self._pending[key] = before
            if value is None:
                del self._state[key]
            else:
                self._state[key] = value
        self._dirty.clear()

    def state(self) -> Mapping[str, Json]:
        """The rendered state as of the last :meth:`materialise` (read-only view)."""
        return MappingProxyType(self._state)

    def drain(self) -> dict[str, Json | None]:
        """Keys changed since the last drain, with their new value (None = deleted)."""
        changes: dict[str, Json | None] = {}
        previous: dict[str, Json | None] = {}
        for key, before in self._pending.items():
            current = self._state.get(key)
            if current != before:
                changes[key] = current
                previous[key] = before
        self._pending.clear()
        self._previous = previous
        return changes

    def value_before_last_drain(self, key: str) -> Json | None:
        """For a key reported by the last :meth:`drain`: its value before that change."""
        return self._previous.get(key)
