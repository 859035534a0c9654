#!/usr/bin/env python3
"""Write the generated copies of the CRDs: ``crds/*.yaml`` is the one source.

Every ``crds/<name>.yaml`` is copied, under a "generated, do not edit" comment,
to ``helm/netfence/files/<name>.yaml`` (the chart renders it as a template) and
``operator/netfence/crds/<name>.yaml`` (package data, applied by the test bed).

    hack/gen_crds.py           write the copies (``make crds``)
    hack/gen_crds.py --check   write nothing; exit 1 if a copy differs

tests/unit/test_crd.py compares the copies with :func:`generated` and fails
when they differ. Standard library only, so it runs without the .venv.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIR = "crds"
TARGET_DIRS = ("helm/netfence/files", "operator/netfence/crds")

log = logging.getLogger("gen_crds")


def header(source: str) -> str:
    """The comment that opens every generated copy of ``source`` (a repository-relative path)."""
    return (
        f"# GENERATED from {source} by hack/gen_crds.py: do not edit this copy.\n"
        f"# Edit {source} and run `make crds`.\n"
    )


def generated(sources: Mapping[str, str]) -> dict[str, str]:
    """Every generated file's text by repository-relative path, from the sources' texts by path."""
    out: dict[str, str] = {}
    for source, text in sorted(sources.items()):
        name = PurePosixPath(source).name
        for target in TARGET_DIRS:
            out[f"{target}/{name}"] = header(source) + text
    return out


def read_sources(repo: Path = REPO) -> dict[str, str]:
    """The source CRDs' texts by repository-relative path."""
    return {f"{SOURCE_DIR}/{p.name}": p.read_text() for p in sorted((repo / SOURCE_DIR).glob("*.yaml"))}


def differing(repo: Path = REPO) -> list[str]:
    """Generated files that are missing or differ from what :func:`generated` makes, and copies with no source."""
    wanted = generated(read_sources(repo))
    wrong = [rel for rel, text in wanted.items() if not (repo / rel).is_file() or (repo / rel).read_text() != text]
    for target in TARGET_DIRS:
        wrong += [f"{target}/{p.name}" for p in sorted((repo / target).glob("*.yaml"))
                  if f"{target}/{p.name}" not in wanted]
    return sorted(wrong)


def write(repo: Path = REPO) -> list[str]:
    """Write every generated file whose text changed; the paths written."""
    written = []
    for rel, text in generated(read_sources(repo)).items():
        path = repo / rel
        if not path.is_file() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            written.append(rel)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a generated copy differs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.check:
        wrong = differing()
        for rel in wrong:
            log.error("%s differs from what hack/gen_crds.py generates", rel)
        if wrong:
            log.error("run `make crds` (remove a copy whose source is gone)")
        return 1 if wrong else 0
    written = write()
    for rel in written:
        log.info("wrote %s", rel)
    extra = [rel for rel in differing() if rel not in written]
    for rel in extra:
        log.warning("%s has no source in %s/: remove it if the CRD is gone", rel, SOURCE_DIR)
    if not written and not extra:
        log.info("CRD copies are up to date")
    return 1 if extra else 0


if __name__ == "__main__":
    sys.exit(main())
