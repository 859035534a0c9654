"""``netfence status``: rows from node reports, and their table form."""

from __future__ import annotations

from datetime import UTC, datetime

from netfence.cli_status import format_rows, status_rows

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)

REPORTS = {
    "node-b": {"node": "node-b", "appliedRevision": 90, "time": "2024-05-01T11:59:30.000+00:00",
               "lastError": "iptables-restore failed (exit 1): line 2: " + "x" * 200, "version": "0.1.0"},
    "node-a": {"node": "node-a", "appliedRevision": 120, "time": "2024-05-01T11:59:58.500+00:00",
               "lastError": None, "version": "0.1.0", "futureField": 1},
}


def test_rows_sorted_with_lag_and_age() -> None:
    rows = status_rows(REPORTS, 120, now=NOW)
    assert [r["node"] for r in rows] == ["node-a", "node-b"]
    a, b = rows
    assert a == {"node": "node-a", "appliedRevision": 120, "lag": 0, "lastSync": "2024-05-01T11:59:58.500+00:00",
                 "age": "2s ago", "lastError": "", "version": "0.1.0"}
    assert b["lag"] == 30 and b["age"] == "30s ago"
    assert b["lastError"].startswith("iptables-restore failed")


def test_lag_counts_from_the_last_change_that_matters_to_the_node() -> None:
    """Agents do not report commits that do not touch their node (issue 11): a node whose
    keys last changed at 90 and that applied 90 is in sync, whatever the last commit."""
    rows = status_rows(REPORTS, 120, now=NOW, needed={"node-b": 90, "node-a": 125})
    by_node = {r["node"]: r for r in rows}
    assert by_node["node-b"]["lag"] == 0 and by_node["node-a"]["lag"] == 5


def test_rows_tolerate_odd_reports() -> None:
    rows = status_rows({"n": {"appliedRevision": None, "time": "not a time"},
                        "z": {"appliedRevision": 5, "time": "2024-05-01T11:59:00"},  # no zone: UTC
                        "y": {"appliedRevision": 500, "time": "2024-05-01T12:00:09Z"}}, 100, now=NOW)
    by_node = {r["node"]: r for r in rows}
    assert by_node["n"]["appliedRevision"] == 0 and by_node["n"]["lag"] == 100 and by_node["n"]["age"] == ""
    assert by_node["z"]["age"] == "60s ago"
    assert by_node["y"]["lag"] == 0  # ahead of the commit we read (a commit landed in between)
    assert by_node["y"]["age"] == "0s ago"  # clock skew never shows a negative age


def test_table() -> None:
    rows = status_rows(REPORTS, 120, now=NOW)
    lines = format_rows(rows, 120)
    assert lines[0] == "controller's last commit: revision 120"
    header = lines[1].split()
    assert header[:3] == ["NODE", "APPLIED", "LAG"]
    assert "LAST" in header and "ERROR" in header and "VERSION" in header
    assert lines[2].split()[:5] == ["node-a", "120", "0", "2s", "ago"]
    assert lines[3].split()[:3] == ["node-b", "90", "30"]
    assert "iptables-restore failed" in lines[3]
    assert len(lines[3]) < 200  # long errors are shortened
    # columns line up: every value starts where its header does
    for line in lines[2:]:
        assert line.index(line.split()[1]) == lines[1].index("APPLIED")


def test_table_without_reports() -> None:
    assert format_rows([], 7) == [
        "controller's last commit: revision 7",
        "NODE  APPLIED  LAG  LAST SYNC  VERSION  LAST ERROR",
        "(no agent has reported)",
    ]
