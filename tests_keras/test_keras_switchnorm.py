"""SwitchNormalization: Keras' layer harness, equivalences, masks, dtypes, degenerate shapes, errors."""

import os

import numpy as np
import pytest

import keras
from keras import ops
from keras.src.testing import TestCase

from keras_helpers import group_moments64, moments64, switchnorm64, to_numpy
from normkit.keras import SwitchNormalization

ONE_HOT = {0: [0.0, -1e4, -1e4], 1: [-1e4, 0.0, -1e4], 2: [-1e4, -1e4, 0.0]}


def _set_logits(layer, mean_logits, var_logits=None):
    layer.mean_logits.assign(np.asarray(mean_logits, dtype="float32"))
    layer.var_logits.assign(np.asarray(mean_logits if var_logits is None else var_logits, dtype="float32"))


# Keras' harness feeds its training check a generator with shuffle=True, which Keras itself warns about.
@pytest.mark.filterwarnings("ignore:`shuffle=True` was passed:UserWarning")
class KerasHarnessTest(TestCase):
    """``keras.src.testing.TestCase.run_layer_test``: build, weights, masking, serialization,
    a training step, and (on backends that run it there) mixed precision."""

    def test_channels_last_ranks(self):
        for shape in ((4, 6), (2, 5, 5, 6)):  # ranks 3 and 5: the masked and reference tests
            self.run_layer_test(
                SwitchNormalization,
                init_kwargs={"momentum": 0.9, "sources": ("in", "ln", "bn", "gn2")},
                input_shape=shape,
                expected_output_shape=shape,
                expected_num_trainable_weights=4,
                expected_num_non_trainable_weights=2,
                expected_num_seed_generators=0,
                expected_num_losses=0,
                supports_masking=True,
            )

    def test_channels_first_and_regularizers(self):
        self.run_layer_test(
            SwitchNormalization,
            init_kwargs={"axis": 1, "gamma_regularizer": "l2", "beta_regularizer": "l2"},
            input_shape=(2, 6, 5, 5),
            expected_output_shape=(2, 6, 5, 5),
            expected_num_trainable_weights=4,
            expected_num_non_trainable_weights=2,
            expected_num_losses=2,
            supports_masking=True,
        )

    def test_without_batch_source_or_affine(self):
        self.run_layer_test(
            SwitchNormalization,
            init_kwargs={"sources": ("in", "ln"), "center": False, "scale": False},
            input_shape=(3, 5, 4),
            expected_output_shape=(3, 5, 4),
            expected_num_trainable_weights=2,
            expected_num_non_trainable_weights=0,
            supports_masking=True,
        )

    def test_masked_sequence(self):
        self.run_layer_test(
            SwitchNormalization,
            init_kwargs={},
            input_data=np.random.RandomState(0).randn(3, 7, 4).astype("float32"),
            call_kwargs={"mask": np.array([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5], dtype=bool)},
            expected_output_shape=(3, 7, 4),
            supports_masking=True,
            run_training_check=False,
        )


def _random(shape, seed=0, scale=2.0, offset=0.5):
    return (np.random.RandomState(seed).randn(*shape) * scale + offset).astype("float32")


@pytest.mark.parametrize("axis,shape", [(-1, (4, 5, 6, 8)), (1, (4, 8, 5, 6)), (-1, (6, 9, 8)), (-1, (16, 8))])
def test_one_hot_bn_equals_keras_batchnormalization(axis, shape):
    x = _random(shape)
    bn = keras.layers.BatchNormalization(axis=axis, momentum=0.8)
    sn = SwitchNormalization(axis=axis, momentum=0.8)
    bn.build(shape)
    sn.build(shape)
    _set_logits(sn, ONE_HOT[2])
    rng = np.random.RandomState(1)
    for layer in (bn, sn):
        layer.gamma.assign(np.linspace(0.5, 1.5, shape[axis]).astype("float32"))
        layer.beta.assign(np.linspace(-1, 1, shape[axis]).astype("float32"))
    start_mean, start_var = rng.randn(shape[axis]).astype("float32"), rng.rand(shape[axis]).astype("float32") + 0.5
    for layer in (bn, sn):
        layer.moving_mean.assign(start_mean)
        layer.moving_variance.assign(start_var)
    np.testing.assert_allclose(to_numpy(sn(x, training=False)), to_numpy(bn(x, training=False)), atol=1e-5)
    np.testing.assert_allclose(to_numpy(sn(x, training=True)), to_numpy(bn(x, training=True)), atol=1e-4)
    np.testing.assert_allclose(to_numpy(sn.moving_mean), to_numpy(bn.moving_mean), atol=1e-6)
    np.testing.assert_allclose(to_numpy(sn.moving_variance), to_numpy(bn.moving_variance), rtol=1e-5)


def test_one_hot_bn_equals_keras_batchnormalization_masked():
    x = _random((3, 7, 4))
    mask = np.array([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5], dtype=bool)
    bn, sn = keras.layers.BatchNormalization(), SwitchNormalization()
    bn.build(x.shape)
    sn.build(x.shape)
    _set_logits(sn, ONE_HOT[2])
    np.testing.assert_allclose(
        to_numpy(sn(x, training=True, mask=mask)), to_numpy(bn(x, training=True, mask=mask)), atol=1e-4
    )
    np.testing.assert_allclose(to_numpy(sn.moving_mean), to_numpy(bn.moving_mean), atol=1e-6)
    np.testing.assert_allclose(to_numpy(sn.moving_variance), to_numpy(bn.moving_variance), rtol=1e-4)


@pytest.mark.parametrize("source,definition", [
    ("in", lambda c: keras.layers.GroupNormalization(groups=c, center=False, scale=False, epsilon=1e-3)),
    ("ln", lambda c: keras.layers.LayerNormalization(axis=(1, 2, 3), center=False, scale=False, epsilon=1e-3)),
    ("gn4", lambda c: keras.layers.GroupNormalization(groups=4, center=False, scale=False, epsilon=1e-3)),
])
def test_one_hot_sources_equal_keras_definitions(source, definition):
    x = _random((3, 5, 6, 8), scale=3.0, offset=2.0)
    sn = SwitchNormalization(sources=(source, "bn"), center=False, scale=False)
    sn.build(x.shape)
    _set_logits(sn, [0.0, -1e4])
    expected = to_numpy(definition(8)(x))
    for training in (True, False):  # IN / LN / GN come from the sample in both modes
        np.testing.assert_allclose(to_numpy(sn(x, training=training)), expected, atol=1e-4)


@pytest.mark.parametrize("axis,shape", [(-1, (4, 5, 6, 8)), (1, (3, 8, 7)), (2, (2, 5, 8, 3, 2))])
def test_mixture_equals_float64_reference(axis, shape):
    x = _random(shape, scale=3.0, offset=4.0)
    ax = axis % len(shape)
    positions = tuple(d for d in range(1, len(shape)) if d != ax)
    c = shape[ax]
    sn = SwitchNormalization(axis=axis, sources=("in", "ln", "bn", "gn2"), epsilon=1e-2)
    sn.build(shape)
    mean_logits, var_logits = np.array([0.3, -0.5, 1.0, 0.1]), np.array([-1.0, 0.4, 0.2, 0.6])
    _set_logits(sn, mean_logits, var_logits)
    gamma, beta = np.linspace(0.5, 2, c), np.linspace(-1, 1, c)
    sn.gamma.assign(gamma.astype("float32"))
    sn.beta.assign(beta.astype("float32"))
    x64 = x.astype(np.float64)
    inst = moments64(x64, positions)
    layer = moments64(x64, tuple(range(1, len(shape))))
    batch = moments64(x64, (0,) + positions)
    group = group_moments64(x64, ax, 2)
    weights = [np.exp(l) / np.exp(l).sum() for l in (mean_logits, var_logits)]
    expected = switchnorm64(x64, [inst, layer, batch, group], *weights, gamma, beta, 1e-2, ax)
    np.testing.assert_allclose(to_numpy(sn(x, training=True)), expected, rtol=1e-4, atol=1e-4)
    moving = (np.full(c, 0.3), np.full(c, 2.0))
    sn.moving_mean.assign(moving[0].astype("float32"))
    sn.moving_variance.assign(moving[1].astype("float32"))
    shape1 = [1] * len(shape)
    shape1[ax] = c
    running = tuple(np.reshape(m, shape1) for m in moving)
    expected = switchnorm64(x64, [inst, layer, running, group], *weights, gamma, beta, 1e-2, ax)
    np.testing.assert_allclose(to_numpy(sn(x, training=False)), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(to_numpy(sn.mean_weights), weights[0], rtol=1e-5)
    np.testing.assert_allclose(to_numpy(sn.var_weights), weights[1], rtol=1e-5)


def test_moving_statistics_follow_keras_momentum():
    x = _random((8, 4, 4, 3))
    sn = SwitchNormalization(momentum=0.75)
    sn(x, training=True)
    mean, var = moments64(x, (0, 1, 2))
    np.testing.assert_allclose(to_numpy(sn.moving_mean), 0.25 * mean.ravel(), rtol=1e-5)
    np.testing.assert_allclose(to_numpy(sn.moving_variance), 0.75 + 0.25 * var.ravel(), rtol=1e-5)


def test_mask_padded_steps_touch_no_statistic():
    x = _random((3, 7, 4))
    mask = np.array([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5], dtype=bool)
    garbage = x.copy()
    garbage[~mask] = 1e6
    outputs, stats = [], []
    for data in (x, garbage):
        sn = SwitchNormalization()
        sn.build(data.shape)
        _set_logits(sn, [0.2, -0.3, 0.5])
        outputs.append(to_numpy(sn(data, training=True, mask=mask))[mask])
        stats.append((to_numpy(sn.moving_mean), to_numpy(sn.moving_variance)))
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-5)
    np.testing.assert_allclose(stats[0], stats[1], atol=1e-6)
    # and the batch statistics are those of the valid steps only
    valid = x[mask]
    expected_mean = 0.01 * valid.mean(0)
    np.testing.assert_allclose(stats[0][0], expected_mean, atol=1e-6)


def test_mask_through_a_model_and_fully_masked_batch():
    model = keras.Sequential([keras.Input((5, 3)), keras.layers.Masking(0.0), SwitchNormalization(momentum=0.5)])
    sn = model.layers[-1]
    x = _random((2, 5, 3))
    x[:, 3:] = 0.0
    model(x, training=True)
    np.testing.assert_allclose(to_numpy(sn.moving_mean), 0.5 * x[:, :3].reshape(-1, 3).mean(0), rtol=1e-5)
    before = to_numpy(sn.moving_mean), to_numpy(sn.moving_variance)
    out = to_numpy(model(np.zeros((2, 5, 3), "float32"), training=True))
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(to_numpy(sn.moving_mean), before[0])
    np.testing.assert_array_equal(to_numpy(sn.moving_variance), before[1])


def test_large_offset_is_stable_in_float32():
    rng = np.random.RandomState(0)
    x = (1e4 + rng.randn(8, 6, 6, 4)).astype("float32")
    sn = SwitchNormalization(epsilon=1e-5)
    out = to_numpy(sn(x, training=True))
    x64 = x.astype(np.float64)
    stats = [moments64(x64, (1, 2)), moments64(x64, (1, 2, 3)), moments64(x64, (0, 1, 2))]
    expected = switchnorm64(x64, stats, [1 / 3] * 3, [1 / 3] * 3, np.ones(4), np.zeros(4), 1e-5)
    np.testing.assert_allclose(out, expected, atol=2e-2)  # float32 input carries ~1e-3 of the offset
    assert out.std() > 0.5  # E[x^2] - E[x]^2 would have cancelled to noise or 0


@pytest.mark.parametrize("shape", [(4, 6), (4, 1, 1, 6), (1, 5, 5, 6), (1, 6)])
def test_degenerate_shapes_give_no_nan(shape):
    x = _random(shape)
    sn = SwitchNormalization()
    for training in (True, False):
        out = to_numpy(sn(x, training=training))
        assert np.isfinite(out).all()
    assert np.isfinite(to_numpy(sn.moving_variance)).all()


def test_batch_one_bn_source_equals_in_source():
    x = _random((1, 5, 5, 6))
    outs = []
    for source in ("in", "bn"):
        sn = SwitchNormalization(sources=(source,))
        outs.append(to_numpy(sn(x, training=True)))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)


def test_trainable_false_is_inference_mode_with_frozen_statistics():
    x = _random((8, 4, 4, 3))
    sn = SwitchNormalization()
    sn.build(x.shape)
    expected = to_numpy(sn(x, training=False))
    sn.trainable = False
    np.testing.assert_allclose(to_numpy(sn(x, training=True)), expected, atol=1e-6)
    np.testing.assert_array_equal(to_numpy(sn.moving_mean), np.zeros(3))
    model = keras.Sequential([keras.Input((4, 4, 3)), sn, keras.layers.Flatten(), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    model.fit(x, np.ones((8, 1)), epochs=1, verbose=0)
    np.testing.assert_array_equal(to_numpy(sn.moving_mean), np.zeros(3))
    np.testing.assert_array_equal(to_numpy(sn.mean_logits), np.zeros(3))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_half_precision_policies_keep_float32_statistics(policy):
    x = (300.0 + 30.0 * np.random.RandomState(0).randn(4, 6, 6, 8)).astype("float32")  # x^2 overflows float16
    reference = SwitchNormalization()
    expected = to_numpy(reference(x, training=True))
    keras.config.set_dtype_policy(policy)
    sn = SwitchNormalization()
    half = policy.split("_")[1]
    out = sn(ops.cast(x, half), training=True)
    assert keras.backend.standardize_dtype(out.dtype) == half
    for weight in sn.weights:
        assert keras.backend.standardize_dtype(weight.dtype) == "float32"
    np.testing.assert_allclose(to_numpy(ops.cast(out, "float32")), expected, atol=0.05 if half == "bfloat16" else 0.01)
    np.testing.assert_allclose(to_numpy(sn.moving_mean), to_numpy(reference.moving_mean), rtol=1e-2)
    assert np.isfinite(to_numpy(sn.moving_variance)).all()


def _small_model(sn_kwargs=None):
    return keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(6, 3, padding="same"),
        SwitchNormalization(**(sn_kwargs or {})),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(2),
    ])


def test_fit_trains_logits_and_moves_statistics():
    model = _small_model({"momentum": 0.5})
    rng = np.random.RandomState(0)
    x, y = rng.randn(32, 8, 8, 3).astype("float32"), rng.randn(32, 2).astype("float32")
    model.compile(keras.optimizers.SGD(0.5), "mse")
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    sn = model.layers[1]
    assert np.abs(to_numpy(sn.mean_logits)).max() > 1e-4
    assert np.abs(to_numpy(sn.var_logits)).max() > 1e-4
    assert np.abs(to_numpy(sn.moving_mean)).max() > 1e-3


def test_get_config_and_keras_file_round_trip(tmp_path):
    layer = SwitchNormalization(axis=1, momentum=0.9, epsilon=1e-4, sources=("in", "gn2"), gamma_regularizer="l2")
    clone = SwitchNormalization.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert clone.sources == ("in", "gn2")
    model = _small_model({"sources": ("in", "ln", "bn", "gn3")})
    x = _random((4, 8, 8, 3))
    model(x, training=True)
    model.layers[1].mean_logits.assign(np.array([0.1, 0.2, -0.3, 0.4], "float32"))
    path = os.path.join(tmp_path, "sn.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.layers[1], SwitchNormalization)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    np.testing.assert_allclose(to_numpy(loaded(x, training=False)), to_numpy(model(x, training=False)), atol=1e-6)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"axis": [1, 2]}, TypeError, "axis must be one int"),
    ({"momentum": 1.5}, ValueError, r"momentum must be in \[0, 1\].*got 1.5"),
    ({"epsilon": 0.0}, ValueError, "epsilon must be > 0, got 0.0"),
    ({"synchronized": True}, ValueError, "got synchronized=True, pass synchronized=False"),
    ({"sources": ("in", "xn")}, ValueError, "unknown normalizer source 'xn'"),
    ({"sources": ()}, ValueError, "sources must name at least one"),
])
def test_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        SwitchNormalization(**kwargs)


@pytest.mark.parametrize("kwargs,shape,match", [
    ({"axis": 0}, (4, 3), "not the batch axis 0.*got axis=0"),
    ({"axis": 3}, (4, 3, 2), "rank-3 input.*got axis=3"),
    ({}, (4,), r"rank >= 2\), got input shape \(4,\)"),
    ({"sources": ("gn4",)}, (2, 6), "source 'gn4' needs a group count that divides num_features=6"),
    ({"axis": 1}, (2, None, 3), "must have a known size"),
])
def test_build_errors(kwargs, shape, match):
    with pytest.raises(ValueError, match=match):
        SwitchNormalization(**kwargs).build(shape)


def test_mask_rank_error():
    sn = SwitchNormalization()
    with pytest.raises(ValueError, match=r"one dim fewer than the inputs.*mask.shape=\(3, 7, 4\)"):
        sn(_random((3, 7, 4)), mask=np.ones((3, 7, 4), bool))
