"""Importance report and figure of a Keras model; the optional-extra import rules."""

import os
import subprocess
import sys

import numpy as np
import pytest

import keras

from normkit.keras import SwitchNormalization, importance_report, plot_importance


def _model():
    inner = keras.Sequential([keras.Input((4, 4, 6)), SwitchNormalization(name="inner_sn", sources=("in", "gn2"))])
    return keras.Sequential([keras.Input((4, 4, 6)), SwitchNormalization(name="sn1"), inner])


def test_report_has_every_sn_layer_and_its_weights():
    model = _model()
    model.get_layer("sn1").mean_logits.assign(np.log(np.array([0.2, 0.3, 0.5], "float32")))
    report = importance_report(model)
    assert [row.layer for row in report.rows] == ["sn1", "inner_sn"]
    np.testing.assert_allclose(report.rows[0].mean, [0.2, 0.3, 0.5], rtol=1e-5)
    assert report.rows[1].sources == ("in", "gn2") and report.rows[1].var == (0.5, 0.5)
    lines = str(report).splitlines()
    assert lines[0].split() == ["layer", "mean", "IN", "mean", "LN", "mean", "BN", "mean", "GN2",
                                "var", "IN", "var", "LN", "var", "BN", "var", "GN2"]
    assert lines[2].split() == ["inner_sn", "0.500", "-", "-", "0.500", "0.500", "-", "-", "0.500"]
    assert report.to_dicts()[0]["mean_bn"] == pytest.approx(0.5)


def test_plot_writes_the_figure(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_importance(_model(), os.path.join(tmp_path, "importance.png"), title="keras")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no SwitchNorm layer"):
        plot_importance(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]), os.path.join(tmp_path, "x.png"))


def test_import_rules_of_the_optional_extra():
    """In one fresh process: ``import normkit`` leaves Keras alone; without Keras, ``import
    normkit.keras`` fails with one line naming the extra; with Keras but not its backend, the
    error says which variable to set."""
    code = """
import os, sys
import normkit
print('keras imported:', 'keras' in sys.modules)
sys.modules['keras'] = None
try:
    import normkit.keras
except ImportError as err:
    print(type(err).__name__ + ': ' + str(err))
del sys.modules['keras']
os.environ['KERAS_BACKEND'] = 'tensorflow'
sys.modules['tensorflow'] = None
try:
    import normkit.keras
except ImportError as err:
    print(type(err).__name__ + ': ' + str(err))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "keras imported: False"
    assert lines[1] == "ImportError: normkit.keras needs Keras 3, which is not installed: pip install normkit[keras]"
    assert "cannot load its backend" in lines[2] and "set KERAS_BACKEND" in lines[2]
