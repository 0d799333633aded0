"""importance_report and plot_importance."""

import sys

import pytest
import torch
from torch import nn

import normkit


def _softmax(logits):
    e = [2.718281828459045 ** v for v in logits]
    return [v / sum(e) for v in e]


def _model():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), normkit.SwitchNorm2d(4),
        nn.Sequential(nn.Conv2d(4, 4, 1), normkit.SwitchNorm2d(4, sources=("in", "bn", "gn2"))),
        normkit.BatchNorm2d(4),
    )
    with torch.no_grad():
        model[1].mean_logits.copy_(torch.tensor([0.0, 1.0, 2.0]))
        model[1].var_logits.copy_(torch.tensor([3.0, 0.0, -1.0]))
        model[2][1].mean_logits.copy_(torch.tensor([1.0, 1.0, 0.0]))
    return model


def test_report_rows_table_and_dicts():
    report = normkit.importance_report(_model())
    assert [r.layer for r in report.rows] == ["1", "2.1"] and len(report) == 2
    assert report.sources == ("in", "ln", "bn", "gn2")
    dicts = report.to_dicts()
    for key, expected in zip(("mean_in", "mean_ln", "mean_bn"), _softmax([0.0, 1.0, 2.0])):
        assert dicts[0][key] == pytest.approx(expected, rel=1e-6)
    for key, expected in zip(("var_in", "var_ln", "var_bn"), _softmax([3.0, 0.0, -1.0])):
        assert dicts[0][key] == pytest.approx(expected, rel=1e-6)
    assert dicts[1]["mean_gn2"] == pytest.approx(_softmax([1.0, 1.0, 0.0])[2], rel=1e-6)
    assert "mean_ln" not in dicts[1]
    lines = str(report).splitlines()
    assert lines[0].split() == ["layer", "mean", "IN", "mean", "LN", "mean", "BN", "mean", "GN2",
                                "var", "IN", "var", "LN", "var", "BN", "var", "GN2"]
    assert lines[1].split()[:4] == ["1", "0.090", "0.245", "0.665"]
    assert lines[2].split()[2] == "-"  # layer 2.1 has no LN source
    assert len({len(line) for line in lines}) == 1  # aligned
    assert str(normkit.importance_report(nn.Linear(2, 2))) == "importance_report: no SwitchNorm layers"


def test_plot_writes_a_nontrivial_png(tmp_path):
    path = tmp_path / "importance.png"
    assert normkit.plot_importance(_model(), path) == str(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    image = __import__("matplotlib.image", fromlist=["imread"]).imread(str(path))
    assert image.shape[0] > 300 and image.shape[1] > 600
    # fixed source colours are in the picture (IN blue, BN green)
    pixels = (image[..., :3] * 255).round().reshape(-1, 3)
    for colour in ("#4C72B0", "#55A868"):
        rgb = torch.tensor([int(colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=torch.float32)
        assert (torch.from_numpy(pixels).float() - rgb).abs().sum(1).lt(3).sum() > 200
    normkit.plot_importance(normkit.importance_report(_model()), tmp_path / "again.png")


def test_plot_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no SwitchNorm layer"):
        normkit.plot_importance(nn.Linear(2, 2), tmp_path / "x.png")
    with pytest.raises(TypeError, match="expects an nn.Module or an ImportanceReport, got str"):
        normkit.plot_importance("model", tmp_path / "x.png")
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install normkit\[plot\]"):
        normkit.plot_importance(_model(), tmp_path / "x.png")
