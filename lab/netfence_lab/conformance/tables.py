"""Pure: render connectivity tables for people (aligned, like the scenario format)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

Cell = bool | None


def _symbol(value: Cell) -> str:
    return "?" if value is None else ("." if value else "X")


def format_table(
    pods: Sequence[str], cells: Mapping[tuple[str, str], Cell], indent: int = 0, diagonal: str = "-"
) -> str:
    """Rows are clients, columns servers; the diagonal is shown as ``diagonal``."""
    width = max([len(p) for p in pods] + [1])
    pad = " " * indent
    lines = [pad + " " * width + " " + " ".join(p.ljust(width) for p in pods)]
    for client in pods:
        row = [
            (diagonal if client == server else _symbol(cells.get((client, server)))).ljust(width)
            for server in pods
        ]
        lines.append(pad + client.ljust(width) + " " + " ".join(row).rstrip())
    return "\n".join(lines)


def diff_table(
    pods: Sequence[str],
    expected: Mapping[tuple[str, str], Cell],
    observed: Mapping[tuple[str, str], Cell],
    indent: int = 0,
) -> str:
    """A table with ``!`` where a checked cell differs and ``.`` elsewhere."""
    marks: dict[tuple[str, str], Cell] = {}
    for key, want in expected.items():
        got = observed.get(key)
        marks[key] = want is None or got is None or want == got
    text = format_table(pods, marks, indent)
    return text.replace(" X", " !")
