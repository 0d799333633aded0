"""Keras: replace BatchNormalization with SwitchNormalization, train, recompute the statistics, plot.

The keras-switchnorm README's use case on Keras 3 (JAX, PyTorch or TensorFlow backend):
``SwitchNormalization(axis=-1)`` where the model had ``BatchNormalization(axis=-1)``. After
training, ``recompute_stats`` sets the exact population statistics of the BN source (the
paper's "batch average", which keras-switchnorm said a Keras layer could not do), then the
importance weights are printed and drawn.

Usage::

    KERAS_BACKEND=jax python examples/keras_switchnorm.py          # or KERAS_BACKEND=torch
    KERAS_BACKEND=jax python examples/keras_switchnorm.py --epochs 3 --out importance.png

Fashion-MNIST is read from Debian's ``dataset-fashion-mnist`` files when they are installed
(nothing is downloaded); otherwise scikit-learn's 8x8 digits are used, and the script says so.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from normkit.keras import SwitchNormalization, importance_report, plot_importance, recompute_stats  # noqa: E402

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def load_data(train_count: int, test_count: int):
    """``(x_train, y_train, x_test, y_test, name)``, images NHWC float32 standardised."""
    if os.path.isdir(FASHION_DIR):
        from experiments.batch_size.data import read_idx

        def split(prefix, count):
            images = read_idx(os.path.join(FASHION_DIR, f"{prefix}-images-idx3-ubyte.gz"))[:count]
            labels = read_idx(os.path.join(FASHION_DIR, f"{prefix}-labels-idx1-ubyte.gz"))[:count]
            return (images[..., None].astype("float32") / 255.0 - 0.286) / 0.353, labels.astype("int32")

        return (*split("train", train_count), *split("t10k", test_count), "Fashion-MNIST")
    from sklearn.datasets import load_digits

    print(f"note: {FASHION_DIR} not found (apt-get install dataset-fashion-mnist); using scikit-learn's digits")
    digits = load_digits()
    x = (digits.images[..., None].astype("float32") / 16.0 - 0.3) / 0.4
    y = digits.target.astype("int32")
    return x[:1400], y[:1400], x[1400:], y[1400:], "digits"


def build_model(input_shape) -> keras.Model:
    """A small conv net, written as with BatchNormalization, with SwitchNormalization instead."""
    inputs = keras.Input(input_shape)
    x = inputs
    for filters in (16, 32):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = SwitchNormalization(axis=-1)(x)  # was: keras.layers.BatchNormalization(axis=-1)(x)
        x = keras.layers.Activation("relu")(x)
        x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(64, use_bias=False)(x)
    x = SwitchNormalization(axis=-1)(x)  # (N, C) features: the IN source is the value itself
    x = keras.layers.Activation("relu")(x)
    outputs = keras.layers.Dense(10)(x)
    return keras.Model(inputs, outputs)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train", type=int, default=6000, help="training images used")
    parser.add_argument("--out", default="keras_importance.png", help="importance figure")
    parser.add_argument("--save", default="keras_switchnorm.keras", help="saved model")
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(0)

    x, y, x_test, y_test, name = load_data(args.train, 2000)
    model = build_model(x.shape[1:])
    model.compile(
        keras.optimizers.Adam(2e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    print(f"backend {keras.backend.backend()}, {name}: {len(x)} training images, {len(x_test)} test images")
    model.fit(x, y, batch_size=args.batch_size, epochs=args.epochs, verbose=2)
    _, moving = model.evaluate(x_test, y_test, verbose=0)

    report = recompute_stats(model, x, batch_size=256)
    print(report)
    _, batch_average = model.evaluate(x_test, y_test, verbose=0)
    print(f"test accuracy: {moving:.4f} with moving averages, {batch_average:.4f} after recompute_stats")

    model.save(args.save)
    reloaded = keras.saving.load_model(args.save)
    same = np.allclose(keras.ops.convert_to_numpy(reloaded(x_test[:8])), keras.ops.convert_to_numpy(model(x_test[:8])), atol=1e-5)
    print(f"saved to {args.save}; reloaded model gives the same outputs: {same}")

    print(importance_report(model))
    print(f"importance figure: {plot_importance(model, args.out, title=f'Keras SN importance ({name})')}")


if __name__ == "__main__":
    main()
