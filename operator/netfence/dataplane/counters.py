"""Live packet counters of Netfence's chains, read from ``iptables-save -c`` (read-only).

``netfence explain`` shows them next to its verdict: in the test bed it reads a
node's network namespace directly; in a cluster the agent serves them on its
health port (``GET /counters?chains=...``, agent/health.py). Only chains
Netfence owns can be asked for, at most :data:`MAX_CHAINS` per request.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from netfence.dataplane.names import MAX_CHAIN_NAME
from netfence.dataplane.ruleset import Family, is_owned_chain
from netfence.dataplane.runner import CommandRunner

MAX_CHAINS = 64
_CHAIN_NAME = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_CHAIN_NAME}}}")
_SAVE = {"v4": "iptables-save", "v6": "ip6tables-save"}
_RULE = re.compile(r"^\[(\d+):(\d+)\] -A (\S+)(?: (.*))?$")


class CounterError(Exception):
    """The counters could not be read (the message says why, one line)."""


@dataclass(frozen=True, slots=True)
class RuleCounter:
    packets: int
    bytes: int
    rule: str  # the rule as iptables-save prints it, without "-A CHAIN"

    def to_json(self) -> dict[str, Any]:
        return {"packets": self.packets, "bytes": self.bytes, "rule": self.rule}

    @classmethod
    def from_json(cls, data: Any) -> RuleCounter:
        try:
            return cls(int(data["packets"]), int(data["bytes"]), str(data["rule"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise CounterError(f"malformed counter entry {data!r}") from exc


Counters = dict[str, list[RuleCounter] | None]  # chain -> its rules with counters (None: no such chain)


def check_chain_names(names: Iterable[str]) -> list[str]:
    """The names, deduplicated; CounterError unless each is one of Netfence's chains (and few enough)."""
    out = list(dict.fromkeys(n for n in names if n))
    if len(out) > MAX_CHAINS:
        raise CounterError(f"at most {MAX_CHAINS} chains per request, got {len(out)}")
    for name in out:
        if not _CHAIN_NAME.fullmatch(name) or not is_owned_chain(name):
            raise CounterError(f"{name!r} is not a Netfence chain (NETFENCE-*, nf-fw/tw/pi/po-*)")
    return out


def parse_counters(text: str, chains: Iterable[str]) -> Counters:
    """The rules (with counters) of ``chains`` in ``iptables-save -c`` output; None for absent chains."""
    wanted = list(dict.fromkeys(chains))
    out: Counters = dict.fromkeys(wanted)
    want = set(wanted)
    in_filter = False
    for line in text.splitlines():
        if line.startswith("*"):
            in_filter = line.strip() == "*filter"
            continue
        if not in_filter:
            continue
        if line.startswith(":"):
            name = line[1:].split(" ", 1)[0]
            if name in want and out[name] is None:
                out[name] = []
            continue
        match = _RULE.match(line)
        if match and match.group(3) in want:
            rules = out[match.group(3)]
            if rules is None:
                rules = out[match.group(3)] = []
            rules.append(RuleCounter(int(match.group(1)), int(match.group(2)), match.group(4) or ""))
    return out


def read_counters(runner: CommandRunner, chains: Iterable[str], family: Family = "v4") -> Counters:
    """Read the counters of ``chains`` through ``runner`` (a node's namespace or the host)."""
    names = check_chain_names(chains)
    result = runner.run([_SAVE[family], "-c", "-t", "filter"])
    if not result.ok:
        raise CounterError(f"{_SAVE[family]} failed (exit {result.returncode}): {result.stderr.strip()[:300]}")
    return parse_counters(result.stdout, names)


def counters_json(counters: Counters) -> dict[str, list[dict[str, Any]] | None]:
    return {name: None if rules is None else [r.to_json() for r in rules] for name, rules in counters.items()}


def counters_from_json(data: Any) -> Counters:
    if not isinstance(data, dict):
        raise CounterError(f"expected an object of chains, got {type(data).__name__}")
    out: Counters = {}
    for name, rules in data.items():
        if rules is not None and not isinstance(rules, list):
            raise CounterError(f"chain {name}: expected a list of rules")
        out[str(name)] = None if rules is None else [RuleCounter.from_json(r) for r in rules]
    return out
