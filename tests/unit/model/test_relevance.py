"""model/relevance.py: which committed keys matter to a node — the one definition the agent
(skip commits) and status aggregation (per-node revision) share."""

from __future__ import annotations

import random

from netfence.model.enforcement import CompiledPolicy, CompiledPort, CompiledRule, Endpoint
from netfence.model.relevance import (
    NodeUses,
    classify,
    commit_relevant,
    key_relevant,
    needed_revisions,
    node_revisions,
    node_uses,
)

N = "node-1"
USES = NodeUses(N, {"policy": frozenset({"app/allow"}), "set": frozenset({"s1", "named"})})


def test_key_families() -> None:
    assert classify("endpoints/node-1/app/web") == ("endpoint", "node-1")
    assert classify("policies/app/allow") == ("policy", "app/allow")
    assert classify("sets/s1") == ("set", "s1")
    assert classify("sets2/s1/3") == ("set", "s1") and classify("sets2/s1") == ("set", "s1")
    assert classify("meta/schema") == ("layout", None)
    assert classify("meta/observed") == ("bookkeeping", "observed")
    assert classify("cpolicies/deny-all") == ("clusterpolicy", "deny-all")
    assert classify("clusternetworkpolicies/x") is None


def test_what_matters_to_a_node() -> None:
    relevant = ["endpoints/node-1/app/web", "policies/app/allow", "sets/s1", "sets2/s1/0", "sets2/named",
                "meta/schema", "newkind/anything"]  # an unknown family: applied (conservative)
    irrelevant = ["endpoints/node-2/app/web", "endpoints/node-10/a/b", "policies/app/other", "sets/s2",
                  "sets2/s2/1", "meta/observed"]
    for key in relevant:
        assert key_relevant(key, USES), key
    for key in irrelevant:
        assert not key_relevant(key, USES), key


def test_references_before_or_after_the_commit_count() -> None:
    before = NodeUses(N, {"policy": frozenset({"app/old"}), "set": frozenset({"s-old"})})
    after = NodeUses(N, {"policy": frozenset({"app/new"}), "set": frozenset({"s-new"})})
    assert commit_relevant(["sets/s-old"], before, after)
    assert commit_relevant(["policies/app/new"], before, after)
    assert not commit_relevant(["sets/s-other", "meta/observed"], before, after)
    assert not commit_relevant([], before, after)


def test_node_uses_follows_endpoints_to_policies_to_sets() -> None:
    port = CompiledPort("TCP", None, named_set="named")
    allow = CompiledPolicy("app", "allow", "u", (CompiledRule(("s1",), (port,)),), None)
    unused = CompiledPolicy("app", "other", "u", (CompiledRule(("s2",), None),), None)
    web = Endpoint(N, "app", "web", ("10.0.0.1",), ("app/allow",), ("app/missing",))
    uses = node_uses(N, [web], {"policy": {"app/allow": allow, "app/other": unused}})
    assert uses.names["policy"] == {"app/allow", "app/missing"}
    assert uses.names["set"] == {"s1", "named"}
    assert uses.names["clusterpolicy"] == frozenset()


def test_node_revisions_agree_with_key_relevance() -> None:
    """Per node: the max revision over exactly the policy's keys that key_relevant keeps."""
    rng = random.Random(7)
    for _ in range(200):
        nodes = [f"n{i}" for i in range(rng.randint(1, 5))]
        keys = ["policies/ns/p", *(f"sets/s{i}" for i in range(rng.randint(0, 3)))]
        keys += [f"endpoints/{rng.choice(nodes)}/ns/pod{i}" for i in range(rng.randint(0, 8))]
        revisions = {k: rng.randint(1, 100) for k in keys}
        got = node_revisions(keys, revisions.__getitem__, nodes)
        set_ids = frozenset(k.removeprefix("sets/") for k in keys if k.startswith("sets/"))
        for node in nodes:
            uses = NodeUses(node, {"policy": frozenset({"ns/p"}), "set": set_ids})
            assert got[node] == max(revisions[k] for k in keys if key_relevant(k, uses))


def test_needed_revisions_from_a_committed_snapshot() -> None:
    """What ``netfence status`` measures a node's lag from: its keys' newest revision, not the last commit."""
    import json

    allow = CompiledPolicy("app", "allow", "u", (CompiledRule(("s1",), None),), None)
    other = CompiledPolicy("app", "other", "u", (CompiledRule(("s2",), None),), None)
    web = Endpoint("n1", "app", "web", ("10.0.0.1",), ("app/allow",), ())
    db = Endpoint("n2", "app", "db", ("10.0.0.2",), ("app/other",), ())
    values = {
        "policies/app/allow": json.dumps(allow.to_json()).encode(),
        "policies/app/other": json.dumps(other.to_json()).encode(),
        "sets/s1": b'{"schema":1}', "sets/s2": b'{"schema":1}',
        "endpoints/n1/app/web": json.dumps(web.to_json()).encode(),
        "endpoints/n2/app/db": json.dumps(db.to_json()).encode(),
        "meta/observed": b'{"schema":1}',
    }
    mods = {"policies/app/allow": 3, "policies/app/other": 9, "sets/s1": 5, "sets/s2": 11,
            "endpoints/n1/app/web": 4, "endpoints/n2/app/db": 7, "meta/observed": 20}
    assert needed_revisions(values, mods, ["n1", "n2", "n3"]) == {"n1": 5, "n2": 11, "n3": 0}
    assert needed_revisions({**values, "meta/schema": b'{"schema":2}'}, {**mods, "meta/schema": 12},
                            ["n1"]) == {"n1": 12}
