#!/usr/bin/env bash
# The README's test command: installs normkit with its test dependencies, then runs pytest
# (tests/ and experiments/), then the Keras front end's tests on the JAX and PyTorch backends.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -r requirements-dev.txt
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-build-isolation --no-deps -e .
python3 -m pytest -q "$@"
# the Keras front end, once per Keras backend in its own process (installs keras and jax)
bash scripts/test_keras.sh
