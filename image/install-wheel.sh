#!/bin/sh
# Install the locked runtime dependencies and the netfence wheel found in
# WHEEL_DIR into a new virtualenv VENV.
#   install-wheel.sh VENV WHEEL_DIR LOCK
# LOCK (image/requirements.lock) pins every dependency with its hashes: pip
# refuses any file whose sha256 is not listed, and installs nothing else
# (--no-deps; `pip check` then proves the set is complete).
# The Dockerfile's runtime stage runs exactly this, and
# tests/integration/test_image.py runs it into a fresh venv and starts every entry point.
set -eu
venv=$1
wheel_dir=$2
lock=$3
python -m venv "$venv"
"$venv/bin/pip" install --no-cache-dir --disable-pip-version-check --require-hashes --no-deps -r "$lock"
"$venv/bin/pip" install --no-cache-dir --disable-pip-version-check --no-deps "$wheel_dir"/netfence-*.whl
"$venv/bin/pip" check
