"""The Keras front end's tests: one process per backend (``KERAS_BACKEND=jax`` / ``torch`` / ...).

``scripts/test_keras.sh`` runs this folder once per backend. Run alone, it takes JAX.
"""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/ (data reader)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded():
    import keras

    keras.utils.set_random_seed(0)
    yield
    keras.config.set_dtype_policy("float32")


def pytest_configure(config):
    # Keras' JAX backend converts variables with np.array(variable), which numpy 2 flags
    # (saving a model, reading weights); a Keras-on-JAX matter, not this package's.
    config.addinivalue_line(
        "filterwarnings", "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
    )
