#!/bin/sh
# Install the netfence wheel found in WHEEL_DIR into a new virtualenv VENV.
#   install-wheel.sh VENV WHEEL_DIR
# The Dockerfile's runtime stage runs exactly this, and
# tests/integration/test_image.py runs it into a fresh venv and starts every entry point.
set -eu
venv=$1
wheel_dir=$2
python -m venv "$venv"
"$venv/bin/pip" install --no-cache-dir --disable-pip-version-check "$wheel_dir"/netfence-*.whl
"$venv/bin/pip" check
