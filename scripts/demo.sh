#!/usr/bin/env bash
# The README's main job: install the batch-size study's dependencies
# (experiments/batch_size/requirements.txt) and normkit itself, then run the demo grid
# (BN, GN, SN x batch 1..32 x 3 seeds, plus a momentum sweep: 60 runs, each on 2000 Fashion-MNIST
# images average-pooled to 14x14, 2 epochs, 5000 test images; 2 processes of 1 thread each, about
# 11 minutes on 2 idle cores, measured as 1297 CPU seconds / 2) and print its summary.
# Writes runs/demo/: results.md, results.json, accuracy_vs_batch.png, importance_vs_batch.png.
# Extra arguments go to `python -m experiments.batch_size sweep` (e.g. --full, --jobs 1, --quiet).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "note: could not install dataset-fashion-mnist; the study falls back to scikit-learn's digits"
fi
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -r experiments/batch_size/requirements.txt
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-build-isolation --no-deps -e .
# the paper's three in about 11 minutes; --norms bn,gn,sn,brn,ssn adds Batch Renorm and Sparse SN
# (96 runs, 1.56x the CPU time: about 17 minutes), --full runs the whole study (28x28, all images) with all five
exec python3 -m experiments.batch_size sweep --out runs/demo --norms bn,gn,sn "$@"
