"""Every Python block of the README runs as written."""

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    if "onnx" in BLOCKS[index]:
        pytest.importorskip("onnxscript", reason="torch.onnx.export needs onnxscript")
        pytest.importorskip("onnx", reason="torch.onnx.export needs onnx")
    monkeypatch.chdir(tmp_path)
    import warnings

    with warnings.catch_warnings():
        # torch.onnx's exporter warns about its own internals (deprecations inside torch.export).
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        exec(compile(BLOCKS[index], f"README block {index}", "exec"), {"__name__": "__readme__"})
    if "importance.png" in BLOCKS[index]:
        assert os.path.getsize("importance.png") > 5000
