"""The sync index (status/sync_index.py): which policies a node report change can affect."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from netfence.status.aggregate import BadKey, NodeReport, Unenforceable
from netfence.status.sync_index import ReportChange, SyncIndex, report_change

P1, P2, P3 = ("ns", "p1"), ("ns", "p2"), ("ns", "p3")


def test_a_new_applied_revision_pops_exactly_the_policies_it_covers() -> None:
    index = SyncIndex()
    index.advance("n1", 10)
    index.update(P1, 12, frozenset({"n1"}))
    index.update(P2, 15, frozenset({"n1", "n2"}))
    index.update(P3, 9, frozenset({"n1"}))  # already synced on n1: never pending
    assert index.pending_on("n1") == {P1: 12, P2: 15}
    assert index.required_on("n1") == {P1, P2, P3}
    assert index.advance("n1", 11) == []
    assert index.advance("n1", 13) == [P1]
    assert index.advance("n1", 20) == [P2]
    assert index.pending_on("n1") == {}
    assert index.pending_on("n2") == {P2: 15}  # n2 has no report: still pending there


def test_updates_move_policies_between_nodes_and_revisions() -> None:
    index = SyncIndex()
    index.advance("n1", 0)
    index.update(P1, 5, frozenset({"n1"}))
    index.update(P1, 8, frozenset({"n2"}))  # moved to n2 with a newer revision
    assert index.required_on("n1") == frozenset() and index.pending_on("n1") == {}
    assert index.advance("n1", 10) == []  # its old entry on n1 is stale
    index.update(P1, 8, frozenset({"n1"}))
    index.update(P1, 3, frozenset({"n1"}))  # fewer relevant keys: a lower revision, covered by n1's 10
    assert index.pending_on("n1") == {}
    index.remove(P1)
    assert P1 not in index and index.required_on("n1") == frozenset()


def test_stale_heap_entries_stay_bounded() -> None:
    index = SyncIndex()
    index.advance("n1", 0)
    for revision in range(1, 5000):
        index.update(P1, revision, frozenset({"n1"}))
    assert index.pending_on("n1") == {P1: 4999}
    assert index.heap_size("n1") < 200
    assert index.advance("n1", 4999) == [P1]


def report(applied: int, **fields: object) -> NodeReport:
    return NodeReport("n1", applied, **fields)  # type: ignore[arg-type]


def test_report_change_classification() -> None:
    assert report_change(None, None) is ReportChange.NONE
    assert report_change(None, report(1)) is ReportChange.ALL  # the node came (back)
    assert report_change(report(1), None) is ReportChange.ALL  # its lease expired
    assert report_change(report(1), report(2)) is ReportChange.REVISION
    assert report_change(report(1), report(1, time="later", rules=9, sets=3, version="x")) is ReportChange.NONE
    assert report_change(report(2), report(1)) is ReportChange.ALL  # went back (etcd restored)
    assert report_change(report(1), report(1, last_error="boom")) is ReportChange.ALL
    # while failing, the status shows the node's applied revision: every unsynced policy changes
    assert report_change(report(1, last_error="boom"), report(2, last_error="boom")) is ReportChange.ALL
    assert report_change(report(1), report(1, bad_keys=(BadKey("policies/ns/p1"),))) is ReportChange.ALL
    assert report_change(report(1), report(1, bad_keys_total=40)) is ReportChange.ALL
    assert report_change(report(1), report(1, unenforceable=(Unenforceable("ns/p1", "x"),))) is ReportChange.ALL


NODES = ("n1", "n2", "n3")
POLICIES = [("ns", f"p{i}") for i in range(6)]

operations = st.lists(
    st.one_of(
        st.tuples(st.just("update"), st.sampled_from(POLICIES), st.integers(0, 30),
                  st.frozensets(st.sampled_from(NODES))),
        st.tuples(st.just("advance"), st.sampled_from(NODES), st.one_of(st.none(), st.integers(0, 30))),
        st.tuples(st.just("remove"), st.sampled_from(POLICIES)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_the_index_agrees_with_recomputing_everything(ops: list[tuple[object, ...]]) -> None:
    """Driven as the status writer drives it (a report that lowers the revision re-evaluates
    the node's policies), the policies an advance returns are exactly those whose synced state
    on that node flips to synced, and pending is exactly the unsynced required policies."""
    index = SyncIndex()
    truth: dict[tuple[str, str], tuple[int, frozenset[str]]] = {}
    applied: dict[str, int] = {}

    def unsynced(node: str) -> dict[tuple[str, str], int]:
        return {p: rev for p, (rev, nodes) in truth.items()
                if node in nodes and (node not in applied or applied[node] < rev)}

    for op in ops:
        if op[0] == "update":
            _, policy, revision, nodes = op
            assert isinstance(policy, tuple) and isinstance(revision, int) and isinstance(nodes, frozenset)
            index.update(policy, revision, nodes)
            truth[policy] = (revision, nodes)
        elif op[0] == "remove":
            policy = op[1]
            assert isinstance(policy, tuple)
            index.remove(policy)
            truth.pop(policy, None)
        else:
            _, node, new = op
            assert isinstance(node, str)
            before = unsynced(node)
            lowered = new is not None and node in applied and new < applied[node]
            if new is None:
                applied.pop(node, None)
            else:
                assert isinstance(new, int)
                applied[node] = new
            covered = index.advance(node, new)
            if new is None or lowered:
                for policy in index.required_on(node):  # the writer re-evaluates them (ReportChange.ALL)
                    index.update(policy, *truth[policy])
            else:
                assert set(covered) == before.keys() - unsynced(node).keys()
                assert len(covered) == len(set(covered))
        for node in NODES:
            assert index.pending_on(node) == unsynced(node)
            assert index.required_on(node) == {p for p, (_, nodes) in truth.items() if node in nodes}
