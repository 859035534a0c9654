"""Names of Netfence's chains and ipsets (pure, deterministic, length-bounded)."""

from __future__ import annotations

import hashlib
import re
from typing import Literal

from netfence.dataplane.ruleset import Family

Direction = Literal["ingress", "egress"]
DIRECTIONS: tuple[Direction, ...] = ("ingress", "egress")

#: iptables chain names are limited to 28 characters (XT_EXTENSION_MAXNAMELEN is 29 incl. NUL).
MAX_CHAIN_NAME = 28
#: ipset names are limited to 31 characters (IPSET_MAXNAMELEN 32 incl. NUL).
MAX_SET_NAME = 31
#: Longest set id used verbatim in a set name: `nf4-` + id + `-t` (swap temporary) <= 30.
_MAX_SET_ID = 24
_SET_ID_RE = re.compile(rf"[A-Za-z0-9_]{{1,{_MAX_SET_ID}}}")
_HASH_LEN = 16


def _digest(text: str, length: int = _HASH_LEN) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def endpoint_chain(direction: Direction, endpoint_key: str) -> str:
    """`nf-tw-<h>` (to workload = ingress) or `nf-fw-<h>` (from workload = egress)."""
    prefix = "nf-tw-" if direction == "ingress" else "nf-fw-"
    return prefix + _digest("endpoint|" + endpoint_key)


def policy_chain(direction: Direction, policy_key: str) -> str:
    """`nf-pi-<h>` / `nf-po-<h>`, h from the policy's identity ("ns/name").

    Named by identity, not content: a change of a policy's rules rewrites this
    one chain in place and leaves the endpoint chains that jump to it alone.
    """
    prefix = "nf-pi-" if direction == "ingress" else "nf-po-"
    return prefix + _digest("policy|" + policy_key)


def set_name(family: Family, set_id: str) -> str:
    """`nf4-<id>` / `nf6-<id>`; ids that are too long or unusual are hashed."""
    sid = set_id if _SET_ID_RE.fullmatch(set_id) else "x" + _digest("set|" + set_id, 20)
    return ("nf4-" if family == "v4" else "nf6-") + sid


def temp_set_name(name: str) -> str:
    """The temporary set a full sync fills and swaps with ``name``."""
    return name + "-t"
