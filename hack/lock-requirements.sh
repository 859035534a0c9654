#!/usr/bin/env bash
# Regenerate image/requirements.lock: the image's runtime dependencies
# (pyproject.toml [project].dependencies and everything they need), each pinned
# to one version with the sha256 of every file PyPI serves for it. The
# Dockerfile installs exactly these with `pip install --require-hashes`.
# Also image/build-requirements.lock from image/build-requirements.in (the
# build stage's tools).
#
#   hack/lock-requirements.sh            keep the current pins where pyproject still allows them
#   hack/lock-requirements.sh --upgrade  move every pin to the newest allowed version
#
# Run it with Python 3.11 (the image's) after changing the dependencies in
# pyproject.toml; tests/unit/test_dockerfile.py fails until the lock matches.
# The first line records a digest of pyproject's dependency list (the
# test recomputes it: any change there needs a new lock).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
lock=image/requirements.lock
venv=${VENV:-.venv}
# Only PyPI: no local wheel folders (PIP_FIND_LINKS) in the resolution or the file.
env -u PIP_FIND_LINKS CUSTOM_COMPILE_COMMAND="hack/lock-requirements.sh" "$venv/bin/pip-compile" --quiet --generate-hashes --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links \
  --output-file "$lock" "$@" pyproject.toml
# The build stage's tools (build, setuptools, wheel: pyproject's [build-system]).
env -u PIP_FIND_LINKS CUSTOM_COMPILE_COMMAND="hack/lock-requirements.sh" "$venv/bin/pip-compile" --quiet --generate-hashes --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links \
  --output-file image/build-requirements.lock "$@" image/build-requirements.in
digest="$("$venv/bin/python" - <<'PY'
import hashlib, re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(hashlib.sha256("\n".join(sorted({re.sub(r"\s+", "", d) for d in deps})).encode()).hexdigest())
PY
)"
tmp="$(mktemp)"
{ echo "# pyproject-dependencies-sha256: $digest"; cat "$lock"; } >"$tmp"
mv "$tmp" "$lock"
chmod 0644 "$lock"
