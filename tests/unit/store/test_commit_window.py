"""CommitWindow: which watched writes belong to a controller change and which are foreign."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from netfence.store.commit_window import CommitWindow, foreign_in_snapshot

COMMIT = b'{"schema":1,"seq":1}'
PENDING = b'{"schema":1,"seq":1}'


def test_single_transaction_change_is_committed() -> None:
    window = CommitWindow(10)
    batch, foreign = window.feed(11, {"policies/a/b": b"v", "meta/observed": b"o", "commit": COMMIT})
    assert foreign == {}
    assert batch is not None and batch.is_commit
    assert batch.changes == {"policies/a/b": b"v", "meta/observed": b"o"} and batch.commit_revision == 11
    assert batch.foreign == {} and window.position == 11


def test_multi_transaction_change_from_pending_to_commit() -> None:
    window = CommitWindow(10)
    assert window.feed(11, {"pending": PENDING, "sets/s1": b"1"}) == (None, {})
    assert window.feed(12, {"sets/s2": b"2", "endpoints/n/a/b": None}) == (None, {})
    batch, foreign = window.feed(13, {"sets/s3": b"3", "pending": None, "commit": COMMIT})
    assert foreign == {}
    assert batch is not None
    assert batch.changes == {"sets/s1": b"1", "sets/s2": b"2", "endpoints/n/a/b": None, "sets/s3": b"3"}
    # the window closed with the commit: the next write outside a change is foreign again
    assert window.feed(14, {"sets/s1": b"x"}) == (None, {"sets/s1": 14})


def test_writes_outside_a_change_are_foreign_and_never_committed() -> None:
    window = CommitWindow(10)
    assert window.feed(11, {"policies/a/b": b"garbage"}) == (None, {"policies/a/b": 11})
    assert window.feed(12, {"sets/s1": None}) == (None, {"sets/s1": 12})  # a foreign deletion
    assert window.feed(13, {"status/nodes/n1": b"{}", "leader": b"x"}) == (None, {})  # not committed keys
    batch, foreign = window.feed(14, {"sets/s2": b"2", "commit": COMMIT})
    assert foreign == {} and batch is not None
    assert batch.changes == {"sets/s2": b"2"}
    assert batch.foreign == {"policies/a/b": 11, "sets/s1": 12}


def test_a_committed_value_supersedes_an_earlier_foreign_write() -> None:
    window = CommitWindow(10)
    window.feed(11, {"policies/a/b": b"garbage"})
    batch, _ = window.feed(12, {"policies/a/b": b"good", "commit": COMMIT})
    assert batch is not None and batch.changes == {"policies/a/b": b"good"} and batch.foreign == {}


def test_include_filters_both_changes_and_foreign_writes() -> None:
    window = CommitWindow(10, include=lambda k: not k.startswith("endpoints/other/"))
    assert window.feed(11, {"endpoints/other/a/b": b"x", "endpoints/me/a/b": b"y"}) == (
        None, {"endpoints/me/a/b": 11})
    batch, _ = window.feed(12, {"endpoints/other/a/c": b"x", "sets/s": b"s", "commit": COMMIT})
    assert batch is not None and batch.changes == {"sets/s": b"s"}


def test_restart_forgets_the_half_seen_change() -> None:
    window = CommitWindow(10)
    window.feed(11, {"pending": PENDING, "sets/s1": b"1"})
    window.restart()
    assert window.window_start is None and window.buffer == {}
    assert window.position == 10


def test_snapshot_keys_written_after_the_commit_are_foreign() -> None:
    mods = {"policies/a/b": 5, "sets/s": 9, "sets/t": 12}
    assert foreign_in_snapshot(mods, 9) == {"sets/t": 12}
    assert foreign_in_snapshot(mods, 0) == mods  # nothing ever committed: nobody wrote them legitimately
    assert foreign_in_snapshot({}, 3) == {}


# --- property: controller changes interleaved with foreign writes -------------------------------------

KEYS = ["policies/a/p", "sets/s1", "sets/s2", "endpoints/n/a/x", "meta/observed"]
Write = tuple[str, bytes | None]
WRITE = st.tuples(st.sampled_from(KEYS), st.one_of(st.none(), st.binary(min_size=1, max_size=3)))
# ("change", transactions) or ("foreign", [writes]): one transaction per revision
OP = st.one_of(
    st.tuples(st.just("change"), st.lists(st.lists(WRITE, max_size=3), min_size=1, max_size=4)),
    st.tuples(st.just("foreign"), st.lists(st.lists(WRITE, min_size=1, max_size=2), min_size=1, max_size=1)),
)


def _apply(state: dict[str, bytes], changes: dict[str, bytes | None]) -> None:
    for key, value in changes.items():
        if value is None:
            state.pop(key, None)
        else:
            state[key] = value


@settings(max_examples=200, deadline=None)
@given(st.lists(OP, max_size=25))
def test_batches_carry_exactly_the_controller_changes(ops: list[tuple[str, list[list[Write]]]]) -> None:
    """Applying the batches gives the controller's state; every foreign write is reported, none applied."""
    window = CommitWindow(0)
    revision = 0
    controller: dict[str, bytes] = {}
    reader: dict[str, bytes] = {}
    reported: set[str] = set()
    foreign_written: set[str] = set()
    for kind, txns in ops:
        for index, writes in enumerate(txns):
            revision += 1
            changes: dict[str, bytes | None] = dict(writes)
            if kind == "foreign":
                foreign_written |= changes.keys()
                batch, found = window.feed(revision, changes)
                assert batch is None and set(found) == set(changes)
                reported |= set(found)
                continue
            _apply(controller, changes)
            last = index == len(txns) - 1
            if len(txns) > 1 and (index == 0 or last):
                changes["pending"] = None if last else b"{}"
            if last:
                changes["commit"] = b"{}"
            batch, found = window.feed(revision, changes)
            assert found == {}
            assert (batch is not None) == last
            if batch is not None:
                assert batch.commit_revision == revision and not (batch.changes.keys() & batch.foreign.keys())
                _apply(reader, batch.changes)
                assert reader == controller
    assert reported == foreign_written
    assert reader == controller
