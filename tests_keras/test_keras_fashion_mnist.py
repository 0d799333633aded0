"""A short Fashion-MNIST training run of a Keras model with SwitchNormalization, then recompute_stats."""

import os

import numpy as np
import pytest

import keras

from normkit.keras import SwitchNormalization, importance_report, recompute_stats

DATA_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist; nothing is downloaded


def _load(split, count):
    from experiments.batch_size.data import read_idx

    prefix = "train" if split == "train" else "t10k"
    images = read_idx(os.path.join(DATA_DIR, f"{prefix}-images-idx3-ubyte.gz"))[:count]
    labels = read_idx(os.path.join(DATA_DIR, f"{prefix}-labels-idx1-ubyte.gz"))[:count]
    return (images[..., None].astype("float32") / 255.0 - 0.286) / 0.353, labels.astype("int32")


@pytest.mark.skipif(not os.path.isdir(DATA_DIR), reason=f"Fashion-MNIST not installed at {DATA_DIR} (apt-get install dataset-fashion-mnist)")
def test_short_training_run():
    x, y = _load("train", 2000)
    x_test, y_test = _load("test", 500)
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False),
        SwitchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False),
        SwitchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Flatten(),
        keras.layers.Dense(10),
    ])
    model.compile(
        keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"]
    )
    history = model.fit(x, y, batch_size=50, epochs=2, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    report = recompute_stats(model, x, steps=10, batch_size=100)
    assert len(report.updated) == 2
    _, accuracy = model.evaluate(x_test, y_test, batch_size=250, verbose=0)
    assert accuracy > 0.6, accuracy  # chance is 0.1
    rows = importance_report(model).rows
    assert len(rows) == 2 and all(abs(sum(row.mean) - 1) < 1e-5 for row in rows)
    assert any(max(abs(w - 1 / 3) for w in row.mean) > 1e-3 for row in rows)  # the weights were learnt
