#!/usr/bin/env bash
# The README's test command: installs normkit with its test dependencies, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -r requirements-dev.txt
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-build-isolation --no-deps -e .
exec python3 -m pytest -q "$@"
