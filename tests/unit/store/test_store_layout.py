"""The etcd key layout and value encoding (pure)."""

from __future__ import annotations

import json

import pytest

from netfence.store import layout as L
from netfence.store.errors import CorruptValueError
from netfence.store.layout import Layout


def test_default_prefix_and_absolute_keys() -> None:
    lay = Layout()
    assert lay.prefix == "/netfence/v1/"
    assert lay.key(lay.policy("default", "web")) == b"/netfence/v1/policies/default/web"
    assert lay.key(lay.set("p0123456789ab")) == b"/netfence/v1/sets/p0123456789ab"
    assert lay.key(lay.endpoint("node-1", "ns", "pod")) == b"/netfence/v1/endpoints/node-1/ns/pod"
    assert lay.key(lay.commit) == b"/netfence/v1/commit"
    assert lay.key(lay.leader) == b"/netfence/v1/leader"
    assert lay.key(lay.meta_schema) == b"/netfence/v1/meta/schema"
    assert lay.key(lay.node_status("node-1")) == b"/netfence/v1/status/nodes/node-1"
    assert lay.endpoints_of("node-1") == "endpoints/node-1/"


def test_custom_prefix_must_be_slash_delimited() -> None:
    assert Layout("/x/").key("commit") == b"/x/commit"
    for bad in ("x/", "/x", ""):
        with pytest.raises(ValueError, match="prefix"):
            Layout(bad)


def test_relative_strips_prefix_and_rejects_foreign_keys() -> None:
    lay = Layout("/a/b/")
    assert lay.relative(b"/a/b/sets/s1") == "sets/s1"
    assert lay.relative(lay.key("policies/ns/n")) == "policies/ns/n"
    with pytest.raises(ValueError, match="outside the prefix"):
        lay.relative(b"/a/c/sets/s1")


def test_parsers_round_trip_and_reject_other_shapes() -> None:
    lay = Layout()
    assert lay.parse_policy(lay.policy("ns", "p")) == ("ns", "p")
    assert lay.parse_set(lay.set("q1")) == "q1"
    assert lay.parse_endpoint(lay.endpoint("n1", "ns", "pod")) == ("n1", "ns", "pod")
    assert lay.parse_node_status(lay.node_status("n1")) == "n1"
    assert lay.parse_policy("policies/ns") is None
    assert lay.parse_policy("policies/ns/p/extra") is None
    assert lay.parse_policy("sets/x") is None
    assert lay.parse_set("sets/") is None
    assert lay.parse_endpoint("endpoints/n1/ns") is None
    assert lay.parse_node_status("status/nodes/") is None
    assert lay.parse_node_status("commit") is None


@pytest.mark.parametrize("bad", ["", "a/b"])
def test_builders_reject_bad_components(bad: str) -> None:
    lay = Layout()
    with pytest.raises(ValueError, match="invalid"):
        lay.policy("ns", bad)
    with pytest.raises(ValueError, match="invalid"):
        lay.set(bad)
    with pytest.raises(ValueError, match="invalid"):
        lay.endpoint(bad, "ns", "p")
    with pytest.raises(ValueError, match="invalid"):
        lay.node_status(bad)


def test_committed_key_families() -> None:
    lay = Layout()
    for rel in (lay.policy("a", "b"), lay.set("s"), lay.endpoint("n", "a", "b"), lay.meta_schema):
        assert L.is_committed_key(rel)
    for rel in (lay.commit, lay.pending, lay.leader, lay.node_status("n"), "other/x"):
        assert not L.is_committed_key(rel)


def test_encode_is_compact_sorted_and_adds_schema() -> None:
    raw = L.encode({"b": 1, "a": [1, 2], "name": "ü"})
    assert raw == '{"a":[1,2],"b":1,"name":"ü","schema":1}'.encode()
    assert L.encode({"schema": 1, "z": None, "a": {"y": 1, "x": 2}}) == b'{"a":{"x":2,"y":1},"schema":1,"z":null}'
    assert L.encode({"schema": 2}) == b'{"schema":2}'  # an explicit schema is kept
    assert Layout().encode({"k": "v"}) == L.encode({"k": "v"})
    with pytest.raises(TypeError):
        L.encode([1, 2])  # type: ignore[arg-type]


def test_decode_round_trip_keeps_unknown_fields() -> None:
    value = {"schema": 1, "id": "p1", "members": ["10.0.0.1"], "futureField": {"x": 1}}
    assert L.decode(L.encode(value), "sets/p1") == value
    assert Layout().decode(L.encode(value), key="sets/p1") == value


def test_decode_accepts_older_and_newer_schema_unless_strict() -> None:
    assert L.decode(b'{"schema":1}', "k") == {"schema": 1}
    assert L.decode(b'{"schema":7,"x":1}', "k") == {"schema": 7, "x": 1}
    with pytest.raises(CorruptValueError, match="newer than supported"):
        L.decode(b'{"schema":7}', "k", strict=True)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "not UTF-8 JSON"),
        (b"\xff\xfe", "not UTF-8 JSON"),
        (b"[1,2]", "expected a JSON object"),
        (b'"text"', "expected a JSON object"),
        (b'{"id":"x"}', "missing 'schema'"),
        (b'{"schema":"1"}', "invalid schema"),
        (b'{"schema":0}', "invalid schema"),
        (b'{"schema":true}', "invalid schema"),
    ],
)
def test_decode_rejects_corrupt_values_naming_the_key(raw: bytes, reason: str) -> None:
    with pytest.raises(CorruptValueError, match=reason) as info:
        L.decode(raw, "policies/default/web")
    assert "policies/default/web" in str(info.value)
    assert info.value.key == "policies/default/web"
    assert isinstance(info.value, ValueError)


def test_encode_decode_matches_json_semantics() -> None:
    value = {"schema": 1, "n": 1.5, "t": True, "l": [None, "x"]}
    assert json.loads(L.encode(value)) == L.decode(L.encode(value))
