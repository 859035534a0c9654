#!/bin/sh
# Install the locked runtime dependencies and the netfence wheel found in
# WHEEL_DIR into the virtualenv VENV (made if missing).
#   install-wheel.sh VENV WHEEL_DIR LOCK
# LOCK (image/requirements.lock) pins every dependency with its hashes: pip
# refuses any file whose sha256 is not listed, and installs nothing else
# (--no-deps; `pip check` then proves the set is complete).
# Either WHEEL_DIR or LOCK may be "-" (skip that part): the Dockerfile installs
# the lock in one layer (which changes only with the lock) and the wheel in a
# later one (the code layer), so a code change rebuilds only the latter.
# tests/integration/test_image.py runs it the same two ways into a fresh venv and
# starts every entry point.
set -eu
venv=$1
wheel_dir=$2
lock=$3
[ -x "$venv/bin/python" ] || python -m venv "$venv"
if [ "$lock" != - ]; then
  "$venv/bin/pip" install --no-cache-dir --disable-pip-version-check --require-hashes --no-deps -r "$lock"
fi
if [ "$wheel_dir" != - ]; then
  "$venv/bin/pip" install --no-cache-dir --disable-pip-version-check --no-deps "$wheel_dir"/netfence-*.whl
fi
"$venv/bin/pip" check
