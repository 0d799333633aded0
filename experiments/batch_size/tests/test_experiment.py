"""The experiment command (issue 5): IDX reading, data fallback, CLI errors, train / sweep
smoke runs on tiny data written here, resume, reproducibility, a 2-process gloo run.

Run from the repository root: ``python -m pytest -q experiments``."""

from __future__ import annotations

import gzip
import json
import math
import os
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from experiments.batch_size import data as data_mod
from experiments.batch_size.cli import main
from experiments.batch_size.data import DataError, load_dataset, read_idx
from experiments.batch_size.sweep import results_markdown, sweep
from experiments.batch_size.train import ConfigError, TrainConfig, _lr_at, scaled_lr, train

# experiments/batch_size/tests/ -> the repository root, from where `-m experiments.batch_size` runs.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """IDX encoding written from the format's definition (independent of read_idx)."""
    header = struct.pack(">HBB", 0, type_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write(path, payload: bytes) -> str:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)
    return str(path)


def fake_fashion(directory, n_train=96, n_test=40, size=12, seed=0) -> str:
    """A tiny learnable Fashion-MNIST stand-in: class k lights up row band k of the image."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    for split, n, gz in (("train", n_train, True), ("t10k", n_test, False)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, size, size)).astype(np.uint8)
        for i, k in enumerate(labels):
            images[i, k % size] = 250
        suffix = ".gz" if gz else ""
        write(os.path.join(directory, f"{split}-images-idx3-ubyte{suffix}"), idx_bytes(images))
        write(os.path.join(directory, f"{split}-labels-idx1-ubyte{suffix}"), idx_bytes(labels))
    return str(directory)


# ---------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
def test_read_idx_plain_and_gzip(tmp_path, name):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    got = read_idx(write(tmp_path / name, idx_bytes(images)))
    assert got.dtype == np.uint8 and got.shape == (2, 3, 4)
    np.testing.assert_array_equal(got, images)


def test_read_idx_big_endian_int32(tmp_path):
    values = np.array([[1, -2, 70000], [3, 4, -5]], dtype=np.int32)
    got = read_idx(write(tmp_path / "v.idx", idx_bytes(values, 0x0C)))
    assert got.tolist() == [[1, -2, 70000], [3, 4, -5]]


def test_truncated_idx_names_file_and_sizes(tmp_path):
    payload = idx_bytes(np.zeros((5, 28, 28), np.uint8))  # 16-byte header + 3920 bytes
    path = write(tmp_path / "train-images-idx3-ubyte", payload[:-100])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: expected 3936 bytes for shape \(5, 28, 28\).*got 3836"):
        read_idx(path)


def test_truncated_gzip_names_file(tmp_path):
    raw = gzip.compress(idx_bytes(np.zeros((50, 28, 28), np.uint8)))
    path = write(tmp_path / "t10k-images-idx3-ubyte.gz", b"")
    with open(path, "wb") as f:
        f.write(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: cannot read it .*truncated or corrupt"):
        read_idx(path)


def test_bad_magic_and_short_header(tmp_path):
    with pytest.raises(DataError, match="bad.idx: not an IDX file"):
        read_idx(write(tmp_path / "bad.idx", b"\x89PNG\r\n\x1a\n" + bytes(100)))
    with pytest.raises(DataError, match="short.idx: expected an IDX header of at least 4 bytes, got 2"):
        read_idx(write(tmp_path / "short.idx", b"\x00\x00"))


def test_labels_must_match_images(tmp_path):
    d = fake_fashion(tmp_path / "fm")
    write(os.path.join(d, "t10k-labels-idx1-ubyte"), idx_bytes(np.zeros(7, np.uint8)))
    with pytest.raises(DataError, match="expected 40 labels"):
        load_dataset(d)


def test_load_dataset_reads_fake_fashion(tmp_path):
    d = fake_fashion(tmp_path / "fm")
    ds, notice = load_dataset(d)
    assert notice is None and ds.name == "fashion-mnist"
    assert ds.train_images.shape == (96, 1, 12, 12) and ds.test_labels.shape == (40,)
    pixels = ds.train_images.double() / 255
    assert math.isclose(ds.mean, float(pixels.mean()), rel_tol=1e-12)
    batch = ds.batch(ds.train_images[:8])
    assert batch.dtype == torch.float32
    torch.testing.assert_close(batch.double(), (pixels[:8] - ds.mean) / ds.std, rtol=1e-5, atol=1e-5)


def test_missing_dirs(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="data directory .*nowhere.* not found"):
        load_dataset(str(tmp_path / "nowhere"))
    monkeypatch.setattr(data_mod, "DEFAULT_DATA_DIR", str(tmp_path / "absent"))
    with pytest.raises(DataError, match="not found"):
        load_dataset(None, "fashion-mnist")
    ds, notice = load_dataset()
    assert ds.name == "digits" and "using scikit-learn's 8x8 digits" in notice
    assert ds.train_images.shape == (1497, 1, 8, 8) and ds.test_labels.shape == (300,)


# ---------------------------------------------------------------------------------- CLI errors


@pytest.mark.parametrize(
    "argv, match",
    [
        (["train", "--norm", "xyz", "--batch-size", "2"], "unknown norm 'xyz'; valid names are bn/batch"),
        (["train", "--norm", "sn", "--batch-size", "0"], "--batch-size: expected a positive integer, got '0'"),
        (["sweep", "--batch-sizes", "2,-4"], "expected a positive integer, got '-4'"),
        (["sweep", "--norms", "bn,bogus"], "unknown norm 'bogus'"),
    ],
)
def test_bad_arguments_one_line(argv, match, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert match in err


def test_missing_data_dir_exits_without_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable, "-m", "experiments.batch_size", "train", "--norm", "bn", "--batch-size", "4",
            "--data-dir", str(tmp_path / "none"),
        ],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, timeout=60,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "not found" in proc.stderr


def test_batch_larger_than_data_is_a_config_error(tmp_path, capsys):
    d = fake_fashion(tmp_path / "fm")
    argv = ["train", "--norm", "gn", "--batch-size", "500", "--data-dir", d, "--quiet", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "batch-size 500 is larger than the 96 training samples" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="epochs must be a positive integer, got 0"):
        train(TrainConfig(epochs=0))


# ---------------------------------------------------------------------------------- schedule


def test_scaled_lr_linear_with_cap():
    assert scaled_lr(2) == pytest.approx(0.1 * 2 / 32)
    assert scaled_lr(32) == pytest.approx(0.1)
    assert scaled_lr(16, world_size=2) == pytest.approx(0.1)
    assert scaled_lr(128) == pytest.approx(0.2)  # 0.4 capped


def test_lr_schedule_warmup_then_cosine():
    total, peak = 100, 0.5
    lrs = [_lr_at(s, total, peak, 0.05) for s in range(total)]
    assert lrs[:5] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert lrs[5] == pytest.approx(0.5)
    assert lrs[5 + 95 // 2] == pytest.approx(0.5 * peak * (1 + math.cos(math.pi * 47 / 95)))
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))


# ---------------------------------------------------------------------------------- train / sweep


def test_train_writes_result_and_is_reproducible(tmp_path):
    d = fake_fashion(tmp_path / "fm")
    cfg = TrainConfig(norm="sn", batch_size=8, epochs=2, width=4, data_dir=d, seed=3, recompute_samples=64, threads=1)
    first = train(cfg, str(tmp_path / "a"), progress=False, log=lambda _m: None)
    second = train(cfg, str(tmp_path / "b"), progress=False, log=lambda _m: None)
    stored = json.loads((tmp_path / "a" / "result.json").read_text())
    assert stored["config"] == cfg.to_dict() and stored["steps"] == 2 * (96 // 8)
    assert [h["epoch"] for h in stored["history"]] == [1, 2]
    for key in ("test_accuracy", "test_accuracy_recomputed"):
        assert 0.0 <= stored[key] <= 1.0 and stored[key] * 40 == pytest.approx(round(stored[key] * 40))
        assert first[key] == second[key]
    assert first["history"] == second["history"]
    assert len(stored["importance"]) == 10 and set(stored["importance"][0]) >= {"layer", "mean_bn", "var_in"}
    assert (tmp_path / "a" / "importance.png").stat().st_size > 1000
    assert "mean BN" in (tmp_path / "a" / "importance.txt").read_text()
    assert "recompute_stats: 1 batches (64 samples), 10 layers updated" == stored["recompute"]


def test_sweep_smoke_and_resume(tmp_path, monkeypatch):
    d = fake_fashion(tmp_path / "fm")
    base = TrainConfig(epochs=1, width=4, data_dir=d, recompute_samples=32, limit_test=20, threads=1)
    out = str(tmp_path / "sweep")
    runs = sweep(base, ["bn", "sn"], [4, 8], out, progress=False, log=lambda _m: None)
    assert [(r["config"]["norm"], r["config"]["batch_size"]) for r in runs] == [("bn", 4), ("bn", 8), ("sn", 4), ("sn", 8)]
    assert all(r["train_samples"] == 96 and r["test_samples"] == 20 for r in runs)
    for name in ("results.json", "results.md", "accuracy_vs_batch.png", "importance_vs_batch.png"):
        assert os.path.getsize(os.path.join(out, name)) > 100
    md = (tmp_path / "sweep" / "results.md").read_text()
    assert "| SN-BN |" in md and "| SN-GN |" not in md
    # Resume: nothing is retrained; a changed setting retrains only the affected runs.
    import experiments.batch_size.sweep as sweep_mod

    calls = []
    monkeypatch.setattr(sweep_mod, "train", lambda cfg, *a, **k: calls.append(cfg) or pytest.fail("retrained"))
    again = sweep(base, ["bn", "sn"], [4, 8], out, progress=False, log=lambda _m: None)
    assert again == runs and calls == []


def _fake_run(norm, batch, acc, acc_recomputed, importance=None):
    return {
        "config": TrainConfig(norm=norm, batch_size=batch).to_dict(), "dataset": "fashion-mnist", "train_samples": 100,
        "test_samples": 50, "world_size": 1, "lr_rule": "rule", "machine": "m", "wall_seconds": 1.0,
        "test_accuracy": acc, "test_accuracy_recomputed": acc_recomputed, **({"importance": importance} if importance else {}),
    }


def test_results_markdown_table_and_differences():
    weights = [
        {"layer": "a", "mean_in": 0.2, "mean_ln": 0.2, "mean_bn": 0.6, "var_in": 0.1, "var_ln": 0.3, "var_bn": 0.6},
        {"layer": "b", "mean_in": 0.4, "mean_ln": 0.4, "mean_bn": 0.2, "var_in": 0.3, "var_ln": 0.3, "var_bn": 0.4},
    ]
    runs = [
        _fake_run("bn", 2, 0.50, 0.70), _fake_run("bn", 32, 0.90, 0.91),
        _fake_run("gn", 2, 0.85, 0.85), _fake_run("gn", 32, 0.86, 0.86),
        _fake_run("sn", 2, 0.80, 0.88, weights), _fake_run("sn", 32, 0.90, 0.92, weights),
    ]
    md = results_markdown(runs).splitlines()
    tables = [i for i, line in enumerate(md) if line.startswith("| norm |")]
    batch_avg = md[tables[0] : tables[0] + 7]
    assert batch_avg[0] == "| norm | batch 2 | batch 32 |"
    assert batch_avg[2:] == [
        "| BN | 70.00 | 91.00 |", "| GN | 85.00 | 86.00 |", "| SN | 88.00 | 92.00 |",
        "| SN-BN | +18.00 | +1.00 |", "| SN-GN | +3.00 | +6.00 |",
    ]
    assert md[tables[1] + 2] == "| BN | 50.00 | 90.00 |"
    assert "| 2 | 0.300 | 0.300 | 0.400 | 0.200 | 0.300 | 0.500 |" in md


# ---------------------------------------------------------------------------------- multi-process


@pytest.mark.slow
def test_torchrun_two_process_gloo(tmp_path):
    d = fake_fashion(tmp_path / "fm", n_train=64, n_test=20)
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "experiments.batch_size",
        "train", "--norm", "sn", "--batch-size", "4", "--width", "4", "--data-dir", d, "--out", str(out), "--quiet",
        "--sync-stats",
    ]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    # Own session, so that a timeout kills torchrun's workers too (no orphans left waiting).
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=100)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("torchrun with 2 gloo processes did not finish in 100 s")
    assert proc.returncode == 0, stderr[-2000:]
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["global_batch"] == 8
    assert result["train_samples"] == 64 and result["steps"] == 64 // 2 // 4
    assert stdout.count("test acc") == 1  # one summary: only rank 0 reports
    assert "10 layers updated" in result["recompute"]


@pytest.mark.parametrize("norm, kind", [("bn", "BatchNorm2d"), ("gn", "GroupNorm"), ("ln", "GroupNorm"), ("in", "InstanceNorm2d"), ("sn", "SwitchNorm2d")])
def test_model_norms_come_from_create_norm(norm, kind):
    from experiments.batch_size import ResNetSmall

    model = ResNetSmall(norm, width=12, gn_groups=8)
    norms = [m for m in model.modules() if type(m).__name__ == kind]
    assert len(norms) == 10
    if kind == "GroupNorm":  # GN: gcd(8, C) groups (4 for 12 and 24 channels, 8 for 48); LN: 1 group
        expected = {12: 4, 24: 8, 48: 8} if norm == "gn" else {12: 1, 24: 1, 48: 1}
        assert all(m.num_groups == expected[m.num_channels] for m in norms)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
