"""recompute_stats and the RecomputeStats callback: exact population statistics from any dataset kind."""

import numpy as np
import pytest

import keras

from keras_helpers import to_numpy
from normkit.keras import RecomputeStats, SwitchNormalization, recompute_stats

N = 24


def _model():
    return keras.Sequential([
        keras.Input((6, 6, 3)),
        keras.layers.Conv2D(4, 3, padding="same", name="conv"),
        SwitchNormalization(name="sn"),
        keras.layers.ReLU(),
        keras.layers.Dropout(0.5),
        keras.layers.Conv2D(5, 3, padding="same", name="conv2"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(2),
    ])


def _data():
    rng = np.random.RandomState(0)
    return (rng.randn(N, 6, 6, 3) * 2 + 1).astype("float32"), rng.randn(N, 2).astype("float32")


def _population(values, axis=-1):
    flat = np.moveaxis(np.asarray(values, np.float64), axis, -1).reshape(-1, values.shape[axis])
    return flat.mean(0), flat.var(0)


def _stats(layer):
    return to_numpy(layer.moving_mean), to_numpy(layer.moving_variance)


def test_exact_population_statistics_of_every_layer():
    model, (x, _) = _model(), _data()
    report = recompute_stats(model, x, batch_size=N)
    assert (report.batches, report.samples, report.updated) == (1, N, ["sn", "bn"])
    sn, bn = model.get_layer("sn"), model.get_layer("bn")
    first = to_numpy(model.get_layer("conv")(x))
    for got, want in zip(_stats(sn), _population(first)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # the second layer sees the first one normalised with the batch's statistics, dropout off
    second = to_numpy(model.get_layer("conv2")(keras.ops.relu(sn(first, training=True))))
    for got, want in zip(_stats(bn), _population(second)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert "call" not in vars(sn) and "call" not in vars(bn)  # the recording wrapper is gone


def test_unequal_batches_are_merged_exactly():
    model, (x, _) = _model(), _data()
    recompute_stats(model, x, batch_size=7)  # 7 + 7 + 7 + 3: an average of batch variances would differ
    expected = _population(to_numpy(model.get_layer("conv")(x)))
    for got, want in zip(_stats(model.get_layer("sn")), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


class _Batches(keras.utils.PyDataset):
    def __init__(self, x, y, size):
        super().__init__()
        self.x, self.y, self.size = x, y, size

    def __len__(self):
        return -(-len(self.x) // self.size)

    def __getitem__(self, index):
        part = slice(index * self.size, (index + 1) * self.size)
        return self.x[part], self.y[part]


def _kinds(x, y):
    yield "array", x
    yield "tuple", (x, y)
    yield "generator", ((x[i : i + 8], y[i : i + 8]) for i in range(0, N, 8))
    yield "list", [x[i : i + 5] for i in range(0, N, 5)]
    yield "pydataset", _Batches(x, y, 6)


def test_every_dataset_kind_gives_the_same_statistics():
    x, y = _data()
    for kind, dataset in _kinds(x, y):
        model = _model()
        report = recompute_stats(model, dataset, batch_size=8)
        assert report.samples == N, kind
        expected = _population(to_numpy(model.get_layer("conv")(x)))
        for a, b in zip(_stats(model.get_layer("sn")), expected):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=kind)


def test_tf_data_dataset():
    tf = pytest.importorskip("tensorflow")
    x, y = _data()
    model = _model()
    report = recompute_stats(model, tf.data.Dataset.from_tensor_slices((x, y)).batch(10))
    assert (report.batches, report.samples) == (3, N)
    for got, want in zip(_stats(model.get_layer("sn")), _population(to_numpy(model.get_layer("conv")(x)))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_steps_limits_the_batches():
    model, (x, _) = _model(), _data()
    report = recompute_stats(model, x, steps=2, batch_size=5)
    assert (report.batches, report.samples) == (2, 10)
    expected = _population(to_numpy(model.get_layer("conv")(x[:10])))
    np.testing.assert_allclose(_stats(model.get_layer("sn"))[1], expected[1], rtol=1e-5)


def test_masks_are_honoured():
    rng = np.random.RandomState(0)
    x = rng.randn(6, 9, 3).astype("float32") + 2
    lengths = np.array([9, 4, 1, 7, 2, 5])
    valid = np.arange(9)[None, :] < lengths[:, None]
    x[~valid] = 0.0
    model = keras.Sequential([keras.Input((9, 3)), keras.layers.Masking(0.0), SwitchNormalization(name="sn")])
    recompute_stats(model, x, batch_size=4)
    for got, want in zip(_stats(model.get_layer("sn")), _population(x[valid])):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


class _Branches(keras.Model):
    """A subclassed model whose second norm layer is never called."""

    def __init__(self):
        super().__init__()
        self.used = keras.layers.BatchNormalization(name="used")
        self.unused = SwitchNormalization(name="unused")

    def build(self, input_shape):
        self.used.build(input_shape)
        self.unused.build(input_shape)

    def call(self, x, training=False):
        return self.used(x, training=training)


def test_frozen_and_unreached_layers_are_left_alone():
    model = _Branches()
    x = np.random.RandomState(0).randn(8, 4).astype("float32")
    model(x)
    frozen = _model()
    frozen.get_layer("bn").trainable = False
    frozen(np.zeros((1, 6, 6, 3), "float32"))
    before = _stats(frozen.get_layer("bn"))
    report = recompute_stats(frozen, _data()[0])
    assert report.frozen == ["bn"] and report.updated == ["sn"]
    np.testing.assert_array_equal(_stats(frozen.get_layer("bn"))[0], before[0])
    report = recompute_stats(model, x)
    assert (report.updated, report.unreached) == (["used"], ["unused"])
    np.testing.assert_array_equal(_stats(model.unused)[1], np.ones(4))
    assert "never reached: unused" in str(report)


def test_callback_recomputes_at_the_chosen_epochs():
    x, y = _data()
    model = _model()
    model.compile(keras.optimizers.SGD(0.05), "mse")
    callback = RecomputeStats(x, epochs=[2], batch_size=12)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[callback])
    assert [(epoch, report.batches) for epoch, report in callback.reports] == [(2, 2)]
    after_fit = _stats(model.get_layer("bn"))  # what fit left in the model's variables
    recompute_stats(model, x, batch_size=12)
    for a, b in zip(after_fit, _stats(model.get_layer("bn"))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"steps": 0}, ValueError, "steps must be a positive int or None, got 0"),
    ({"batch_size": 0}, ValueError, "batch_size must be a positive int, got 0"),
    ({"dataset": []}, ValueError, "needs at least one batch, but the dataset gave none"),
    ({"dataset": 5}, TypeError, "recompute_stats needs arrays.*got int"),
])
def test_errors(kwargs, error, match):
    arguments = {"dataset": _data()[0], **kwargs}
    with pytest.raises(error, match=match):
        recompute_stats(_model(), **arguments)


def test_callback_epochs_error():
    with pytest.raises(ValueError, match=r"epochs must be None or 1-based epoch numbers.*got \[0\]"):
        RecomputeStats(_data()[0], epochs=[0])
