#!/usr/bin/env bash
# The README's main job: install the batch-size experiment's dependencies
# (experiments/batch_size/requirements.txt) and normkit itself, then run the default sweep
# (SN vs BN vs GN across batch sizes on Fashion-MNIST; about 10 minutes on 2 cores).
# Extra arguments are passed to `python -m experiments.batch_size sweep`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "note: could not install dataset-fashion-mnist; the sweep falls back to scikit-learn's digits"
fi
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -r experiments/batch_size/requirements.txt
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-build-isolation --no-deps -e .
exec python3 -m experiments.batch_size sweep --out runs/demo "$@"
