#!/usr/bin/env bash
# Tests of the Keras front end (tests_keras/), once per Keras backend, each in its own process:
# a Keras process picks its backend once, at import. Exits non-zero if any backend fails.
#   KERAS_TEST_BACKENDS="jax torch" (default); add tensorflow to also install and run tensorflow-cpu.
#   Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
pip_install() { python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore "$@"; }
backends=${KERAS_TEST_BACKENDS:-jax torch}
pip_install -r requirements-keras.txt || exit 1
python3 -c "import torch" 2>/dev/null || { echo "test_keras.sh: torch is missing; install normkit first (scripts/test.sh)"; exit 1; }
case " $backends " in *" tensorflow "*) pip_install tensorflow-cpu || exit 1 ;; esac
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "note: could not install dataset-fashion-mnist; the Fashion-MNIST test will be skipped"
fi
echo "test_keras.sh: installed in $(( $(date +%s) - start )) s"
status=0
for backend in $backends; do
  t0=$(date +%s)
  echo "== KERAS_BACKEND=$backend"
  KERAS_BACKEND=$backend JAX_PLATFORMS=cpu python3 -m pytest -q -p no:cacheprovider tests_keras "$@" || status=1
  echo "== KERAS_BACKEND=$backend: $(( $(date +%s) - t0 )) s"
done
echo "test_keras.sh: total $(( $(date +%s) - start )) s"
exit $status
