#!/usr/bin/env python3
"""Rewrite the renderer's golden files (tests/unit/dataplane/golden/) from the current renderer.

    make golden            (or: .venv/bin/python hack/update_golden.py)

The tests never write these files; they only compare. After running this,
review ``git diff tests/unit/dataplane/golden`` as you would any change to
the rules Netfence installs. Golden files of removed cases are deleted.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "unit" / "dataplane"))

from golden_cases import CASES, golden_path, rendered, stale_files  # noqa: E402

log = logging.getLogger("update_golden")


def main() -> int:
    logging.basicConfig(level=logging.ERROR, format="%(message)s")  # not the renderer's warnings
    log.setLevel(logging.INFO)
    changed = 0
    for case in sorted(CASES):
        path, text = golden_path(case), rendered(case)
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            changed += 1
            log.info("wrote %s", path.relative_to(REPO))
    for path in stale_files():
        path.unlink()
        changed += 1
        log.info("removed %s (no such case)", path.relative_to(REPO))
    log.info("%d golden files changed%s", changed, "; review the diff" if changed else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
