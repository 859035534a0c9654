"""The node report's ``badKeys`` and ``unenforceable`` fields (pure; contract in docs/design.md).

``badKeys``: keys this agent could not decode or that were written outside a
controller commit, each with a one-line reason that also says what the agent
enforces meanwhile. ``unenforceable``: policies applied on this node with rules
the kernel cannot match (rendered to match nothing). Both are capped at
:data:`MAX_ENTRIES` entries (sorted), with the full count in ``*Total``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from netfence.dataplane.pins import PinKey

MAX_ENTRIES = 32
MAX_REASON = 300


@dataclass(frozen=True, slots=True)
class KeyState:
    """What the agent does about one bad key."""

    pin: PinKey | None  # what it would pin while the key has no good value (None: nothing to pin)
    good: bool  # a last good value is in force
    found: bool | None  # pinned: whether the kernel held rules/sets for it (None: not read yet)


#: What is enforced for a key without a good value when the kernel held nothing for it, by pin kind.
_NOTHING_PINNED: dict[str, str] = {
    "endpoint": "this endpoint has no rules here",
    "cluster_policy": "traffic that reaches it on the endpoints naming it is denied",
}


def nothing_pinned(pin: PinKey) -> str:
    """What happens to ``pin``'s traffic when there was nothing to pin (fail closed)."""
    return _NOTHING_PINNED.get(pin[0], "it matches nothing")


def describe(reason: str, state: KeyState) -> str:
    """One line: why the key is bad, and what is enforced for it meanwhile."""
    if state.pin is None:
        what = ""
    elif state.good:
        what = "; the last good value stays in force"
    elif state.found is None:
        what = "; no good value yet"
    elif state.found:
        what = "; no good value: the rules already in the kernel for it are kept"
    else:
        what = f"; no good value and no rules in the kernel for it: {nothing_pinned(state.pin)}"
    text = " ".join(f"{reason}{what}".split())  # one line
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def bad_key_entries(bad: Mapping[str, str], states: Mapping[str, KeyState]) -> list[dict[str, str]]:
    """``badKeys`` entries for every bad key, sorted by key (uncapped)."""
    none = KeyState(None, False, None)
    return [{"key": key, "reason": describe(bad[key], states.get(key, none))} for key in sorted(bad)]


def unenforceable_entries(pairs: Iterable[tuple[str, str]]) -> list[dict[str, str]]:
    """``unenforceable`` entries, sorted by policy then feature (uncapped)."""
    return [{"policy": policy, "feature": feature} for policy, feature in sorted(set(pairs))]


def report_fields(bad: list[dict[str, str]], unenforceable: list[dict[str, str]]) -> dict[str, Any]:
    """The report fields of the contract, capped at MAX_ENTRIES entries each."""
    return {
        "badKeys": bad[:MAX_ENTRIES],
        "badKeysTotal": len(bad),
        "unenforceable": unenforceable[:MAX_ENTRIES],
        "unenforceableTotal": len(unenforceable),
    }
