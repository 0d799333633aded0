"""The study's command line and runs: IDX reading, data fallback, CLI errors, train / sweep
smoke runs on tiny data written here, resume, reproducibility, a 2-process gloo run.

Run from the repository root: ``python -m pytest -q experiments``."""

from __future__ import annotations

import gzip
import importlib
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
from experiments.batch_size.report import results_markdown
from experiments.batch_size.stats import interval, paired_interval, t_quantile
from experiments.batch_size.sweep import Grid, sweep
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
        (["train", "--norm", "xyz", "--batch-size", "2"], "unknown normalization name 'xyz'; valid names are bn/batch"),
        (["train", "--norm", "sn", "--batch-size", "0"], "--batch-size: expected a positive integer, got '0'"),
        (["sweep", "--batch-sizes", "2,-4"], "expected a positive integer, got '-4'"),
        (["sweep", "--norms", "bn,bogus"], "unknown normalization name 'bogus'"),
        (["sweep", "--seeds", "0,-1"], "expected a non-negative integer seed, got '-1'"),
        (["sweep", "--momenta", "0.01,2"], "expected a momentum in (0, 1]"),
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


def test_sn_at_batch_1_runs_without_its_bn_source(tmp_path):
    d = fake_fashion(tmp_path / "fm", n_train=24)
    result = train(TrainConfig(norm="sn", batch_size=1, width=4, data_dir=d, limit_test=10), progress=False, log=lambda _m: None)
    assert result["layer_options"] == {"sources": ["in", "ln"]} and result["steps"] == 24
    assert set(result["importance"][0]) == {"layer", "mean_in", "mean_ln", "var_in", "var_ln"}
    assert result["recompute"] == "no running statistics: nothing to recompute"


def test_ssn_runs_end_one_hot_with_learned_choices(tmp_path):
    """Its radius reaches one-hot within the run, and the logits learn (they leave their
    equal start, where every layer would pick the first source for both statistics)."""
    d = fake_fashion(tmp_path / "fm", n_train=48)
    result = train(TrainConfig(norm="ssn", batch_size=4, epochs=2, width=4, data_dir=d, limit_test=10),
                   progress=False, log=lambda _m: None)
    assert result["layer_options"] == {"radius_steps": 24} and result["steps"] == 24
    rows = result["importance"]
    for row in rows:
        for stat in ("mean", "var"):
            assert sorted(row[f"{stat}_{s}"] for s in ("in", "ln", "bn")) == [0.0, 0.0, 1.0], row
    assert any(row["mean_in"] != 1.0 or row["var_in"] != 1.0 for row in rows), rows


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


def test_pooled_images_and_their_statistics(tmp_path):
    data, _ = load_dataset(fake_fashion(tmp_path / "fm", size=12))
    assert data_mod.pooled(data, 1) is data
    small = data_mod.pooled(data, 2)
    assert small.train_images.shape == (96, 1, 6, 6) and small.test_images.shape == (40, 1, 6, 6)
    block = data.train_images[5, 0, 2:4, 6:8].double().mean()
    assert small.train_images[5, 0, 1, 3].item() == pytest.approx(block.item(), abs=1e-4)
    assert torch.equal(small.train_labels, data.train_labels) and small.name == "fashion-mnist (pooled 2x)"
    x = small.batch(small.train_images).double()
    assert abs(x.mean().item()) < 1e-5 and x.std().item() == pytest.approx(1.0, abs=1e-5)
    assert data_mod.pooled(data, 2) is small  # pooled once per process and dataset
    with pytest.raises(DataError, match="leaves no pixels"):
        data_mod.pooled(data, 13)


def test_pool_is_left_out_of_the_config_key_at_its_default(tmp_path):
    assert "pool" not in TrainConfig().to_dict() and TrainConfig(pool=2).to_dict()["pool"] == 2
    d = fake_fashion(tmp_path / "fm", size=12)
    cfg = TrainConfig(norm="bn", batch_size=8, width=4, data_dir=d, pool=2, recompute_samples=32)
    first = train(cfg, str(tmp_path / "a"), progress=False, log=lambda _m: None)
    assert first["image_size"] == [6, 6] and first["config"]["pool"] == 2 and first["dataset"] == "fashion-mnist (pooled 2x)"
    assert train(cfg, None, progress=False, log=lambda _m: None)["history"] == first["history"]
    assert "10 norm layers) on 6x6 images (2x2 average-pooled);" in results_markdown([first])
    assert train(TrainConfig(norm="bn", batch_size=8, width=4, data_dir=d), None, progress=False, log=lambda _m: None)["image_size"] == [12, 12]
    assert "pool must be a positive integer" in str(pytest.raises(ConfigError, train, TrainConfig(pool=0)).value)


def test_full_sweep_reuses_the_committed_study_runs():
    """`sweep --full` builds exactly the config key stored in docs/study/runs/*/result.json,
    so new options (``pool``) leave the finished full-study runs reusable."""
    from experiments.batch_size.cli import _config, _fill_sweep_defaults, build_parser
    from experiments.batch_size.sweep import _finished, grid_configs, run_dir

    study = os.path.join(REPO, "docs", "study", "runs")
    if not os.path.isdir(study):
        pytest.skip("no committed full-study runs")
    args = build_parser().parse_args(["sweep", "--full"])
    _fill_sweep_defaults(args)
    grid = Grid(args.norms, args.batch_sizes, args.seeds, args.momenta, args.momentum_norms, args.momentum_batch)
    configs = {os.path.basename(run_dir("", c)): c for c in grid_configs(_config(args, args.norms[0], args.batch_sizes[0]), grid)}
    names = sorted(os.listdir(study))
    assert len(names) >= 12
    for name in names:
        assert _finished(os.path.join(study, name), configs[name]) is not None, name


def test_a_stored_run_whose_layers_changed_is_trained_again(tmp_path):
    """A result whose config matches but whose layer options are not what this code builds
    (an SSN run from before its radius followed the run's length) is not reused."""
    from experiments.batch_size.sweep import _finished

    d = fake_fashion(tmp_path / "fm", n_train=24)
    cfg = TrainConfig(norm="ssn", batch_size=4, width=4, data_dir=d, limit_test=10)
    run = tmp_path / "run"
    result = train(cfg, str(run), progress=False, log=lambda _m: None)
    assert _finished(str(run), cfg) == json.loads((run / "result.json").read_text()) and result["steps"] == 6
    stale = dict(result, layer_options={})
    (run / "result.json").write_text(json.dumps(stale))
    assert _finished(str(run), cfg) is None


def test_committed_full_study_tables_come_from_its_runs():
    """docs/study/results.md is what the report writes from the committed runs, digit for
    digit: every run in results.json is the run stored under docs/study/runs/, and no table
    was edited by hand."""
    from experiments.batch_size.sweep import run_dir

    study = os.path.join(REPO, "docs", "study")
    if not os.path.isfile(os.path.join(study, "results.json")):
        pytest.skip("no committed full-study report")
    with open(os.path.join(study, "results.json")) as f:
        report = json.load(f)
    for run in report["runs"]:
        name = os.path.basename(run_dir("", TrainConfig(**run["config"])))
        with open(os.path.join(study, "runs", name, "result.json")) as f:
            assert json.load(f) == run, name
    with open(os.path.join(study, "results.md")) as f:
        assert f.read() == results_markdown(report["runs"], report["command"], report["elapsed_seconds"])


def test_sweep_smoke_resume_and_parallel(tmp_path, monkeypatch):
    d = fake_fashion(tmp_path / "fm")
    base = TrainConfig(epochs=1, width=4, data_dir=d, recompute_samples=32, limit_test=20)
    grid = Grid(["bn", "sn"], [4, 8], seeds=[0, 1], momenta=[0.01], momentum_norms=["bn"], momentum_batch=8)
    out = str(tmp_path / "sweep")
    runs = sweep(base, grid, out, progress=False, log=lambda _m: None)
    keys = [(r["config"]["norm"], r["config"]["batch_size"], r["config"]["seed"], r["config"]["norm_momentum"]) for r in runs]
    assert keys == [
        ("bn", 4, 0, None), ("bn", 4, 1, None), ("bn", 8, 0, None), ("bn", 8, 1, None),
        ("sn", 4, 0, None), ("sn", 4, 1, None), ("sn", 8, 0, None), ("sn", 8, 1, None),
        ("bn", 8, 0, 0.01), ("bn", 8, 1, 0.01),
    ]
    assert all(r["train_samples"] == 96 and r["test_samples"] == 20 and r["samples_per_second"] > 0 for r in runs)
    assert runs[6]["layer_options"] == {} and "mean_bn" in runs[6]["importance"][0]
    assert runs[8]["layer_options"] == {"momentum": 0.01}
    for name in ("results.json", "results.md", "accuracy_vs_batch.png", "importance_vs_batch.png"):
        assert os.path.getsize(os.path.join(out, name)) > 100
    md = (tmp_path / "sweep" / "results.md").read_text()
    assert "| SN - BN |" in md and "| SN - GN |" not in md and "## Moving vs batch averages" in md
    assert "| BN | 8 | 0.01 |" in md
    # Resume: nothing is retrained.
    import experiments.batch_size.sweep as sweep_mod

    calls = []
    monkeypatch.setattr(sweep_mod, "train", lambda cfg, *a, **k: calls.append(cfg) or pytest.fail("retrained"))
    again = sweep(base, grid, out, progress=False, log=lambda _m: None)
    assert again == runs and calls == []
    monkeypatch.undo()
    # Two processes give the numbers of one (each run is single-threaded and seeded).
    two = sweep(base, Grid(["sn"], [8], seeds=[0, 1]), str(tmp_path / "two"), jobs=2, progress=False, log=lambda _m: None)
    for mine, theirs in zip(two, runs[6:8]):
        for key in ("test_accuracy", "test_accuracy_recomputed", "history", "importance"):
            assert mine[key] == theirs[key]


def _fake_run(norm, batch, seed, acc, acc_recomputed, importance=None, momentum=None):
    return {
        "config": TrainConfig(norm=norm, batch_size=batch, seed=seed, norm_momentum=momentum).to_dict(),
        "dataset": "fashion-mnist", "train_samples": 100, "test_samples": 50, "world_size": 1, "lr_rule": "rule",
        "machine": "m", "wall_seconds": 1.0, "train_cpu_seconds": 1.0, "samples_per_second": 100.0 * batch, "steps": 100,
        "test_accuracy": acc, "test_accuracy_recomputed": acc_recomputed, **({"importance": importance} if importance else {}),
    }


def _weights(bn_weight):
    rest = (1 - bn_weight) / 2
    return [
        {"layer": "a", "mean_in": rest, "mean_ln": rest, "mean_bn": bn_weight, "var_in": 0.3, "var_ln": 0.3, "var_bn": 0.4},
        {"layer": "b", "mean_in": rest, "mean_ln": rest, "mean_bn": bn_weight, "var_in": 0.2, "var_ln": 0.4, "var_bn": 0.4},
    ]


def test_results_markdown_intervals_and_resolved_claims():
    runs = []
    for seed, offset in enumerate((0.0, 0.005, 0.01)):
        runs += [
            _fake_run("bn", 2, seed, 0.60 + offset, 0.70 + offset), _fake_run("bn", 32, seed, 0.90, 0.90 + 1.2 * offset),
            _fake_run("gn", 2, seed, 0.85 + offset, 0.85 + offset), _fake_run("gn", 32, seed, 0.85 - offset, 0.85 - offset),
            _fake_run("sn", 2, seed, 0.88, 0.88 + offset, _weights(0.30 - offset)),
            _fake_run("sn", 32, seed, 0.88, 0.884, _weights(0.40 + offset)),
            _fake_run("bn", 2, seed, 0.50 + 2 * offset, 0.70 + offset, momentum=0.01),
        ]
    md = results_markdown(runs)
    lines = md.splitlines()
    tables = [i for i, line in enumerate(lines) if line.startswith("| norm |")]
    # mean +- t(0.975, 2) * sd / sqrt(3); sd 0.5 points: 4.303 * 0.5 / 1.732 = 1.24
    assert lines[tables[0] + 2 : tables[0] + 5] == [
        "| BN | 70.50 ± 1.24 | 90.60 ± 1.49 |", "| GN | 85.50 ± 1.24 | 84.50 ± 1.24 |", "| SN | 88.50 ± 1.24 | 88.40 ± 0.00 |",
    ]
    assert lines[tables[1] + 2] == "| BN | 60.50 ± 1.24 | 90.00 ± 0.00 |"
    # Paired by seed: BN at 2 minus BN at 32 is -20.0, -20.1, -20.2 (sd 0.1, half width 0.25).
    assert "- BN: best at batch 32 (90.6 [89.1, 92.1]%); lower beyond seed noise at batch 2 (-20.1 [-20.3, -19.9])\n" in md
    assert "- GN: best at batch 2 (85.5 [84.3, 86.7]%); within noise of its best at batch 32 (largest gap -1.0 [-3.5, +1.5] at 32) -> flat within noise\n" in md
    assert "- SN - BN: higher beyond noise at batch 2 (+18.0 [+18.0, +18.0]); lower beyond noise at batch 32 (-2.2 [-3.7, -0.7])\n" in md
    assert "- SN - GN: higher beyond noise at batch 2 (+3.0 [+3.0, +3.0]), 32 (+3.9 [+2.7, +5.1])\n" in md
    assert "BN 0.405 -> 0.295 (-0.110 [-0.135, -0.085], resolved)" in md
    assert "- BN batch 2, momentum 0.1: moving - batch average -10.0 [-10.0, -10.0], moving averages worse beyond noise\n" in md
    assert "- BN batch 2, momentum 0.01: moving - batch average -19.5 [-20.7, -18.3], moving averages worse beyond noise\n" in md
    assert "| BN | 2 | 0.01 | 51.00 ± 2.48 | 70.50 ± 1.24 | -19.50 ± 1.24 |" in md
    # importance: layer mean +- half width over seeds (smallest-largest layer); columns mean IN, LN, BN, var IN, LN, BN
    row = next(line for line in lines if line.startswith("| 2 | "))
    assert row.split(" | ")[3].startswith("0.295 ± 0.012 (")
    assert row.endswith("| 0.250 ± 0.000 (0.20-0.30) | 0.350 ± 0.000 (0.30-0.40) | 0.400 ± 0.000 (0.40-0.40) |")
    assert "| BN | 200 (200) | 3200 (3200) |" in md  # 100 samples, 1 CPU second per run


def test_results_markdown_compares_a_second_switchable_norm_with_the_first():
    """With BRN and SSN in the grid: SN and SSN each against BN and BRN, and SSN against SN
    (the pair the five-norm grid is run for); SN is not compared back against SSN."""
    runs = []
    for seed, offset in enumerate((0.0, 0.005, 0.01)):
        for batch in (2, 32):
            runs += [
                _fake_run("bn", batch, seed, 0.80 + offset, 0.80 + offset),
                _fake_run("sn", batch, seed, 0.88, 0.88 + offset, _weights(0.30)),
                _fake_run("brn", batch, seed, 0.82 + offset, 0.82 + offset),
                _fake_run("ssn", batch, seed, 0.88, 0.87 + 2 * offset, _weights(0.40)),
            ]
    md = results_markdown(runs)
    rows = [line.split(" |")[0] for line in md.splitlines() if line.startswith("| ") and " - " in line.split(" |")[0]]
    assert rows[4:] == ["| SN - BN", "| SN - BRN", "| SSN - BN", "| SSN - BRN", "| SSN - SN"]
    # per seed SSN - SN: -1.0, -0.5, 0.0 points
    assert "| SSN - SN | -0.50 ± 1.24 | -0.50 ± 1.24 |" in md
    assert "- SSN - SN: within noise at batch 2, 32\n" in md
    assert "- SSN - BRN: higher beyond noise at batch 2 (+5.5 [+4.3, +6.7]), 32 (+5.5 [+4.3, +6.7])\n" in md
    assert "| SN - SSN" not in md and "- SN - SSN" not in md


def test_intervals_by_hand():
    iv = interval([1.0, 2.0, 3.0])
    assert (iv.mean, iv.n) == (2.0, 3) and iv.half_width == pytest.approx(4.303 / math.sqrt(3))
    assert interval([5.0]).text() == "5.00 (n=1)" and not interval([5.0]).excludes_zero()
    assert paired_interval({0: 3.0, 1: 5.0, 2: 9.0}, {0: 1.0, 1: 2.0, 7: 0.0}).mean == pytest.approx(2.5)  # seeds 0, 1
    assert t_quantile(100) == 1.96
    with pytest.raises(ValueError, match="degrees of freedom must be >= 1, got 0"):
        t_quantile(0)
    with pytest.raises(ValueError, match="interval of no values: need at least one"):
        interval([])
    with pytest.raises(ValueError, match=r"no common seeds to pair: \[0\] vs \[1\]"):
        paired_interval({0: 1.0}, {1: 1.0})


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


# ---------------------------------------------------------------------------------- command-line behaviour


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("python -m experiments.batch_size 0.3.0 (normkit ") and out.count("\n") == 1


def _no_training(monkeypatch):
    import experiments.batch_size.sweep as sweep_mod
    train_mod = importlib.import_module("experiments.batch_size.train")

    monkeypatch.setattr(train_mod, "train", lambda *a, **k: pytest.fail("trained although a dependency is missing"))
    monkeypatch.setattr(sweep_mod, "sweep", lambda *a, **k: pytest.fail("swept although a dependency is missing"))


def test_missing_scikit_learn_is_one_line_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data_mod, "DEFAULT_DATA_DIR", str(tmp_path / "absent"))
    monkeypatch.setitem(sys.modules, "sklearn", None)
    _no_training(monkeypatch)
    for argv in (["train", "--norm", "bn", "--batch-size", "2"], ["sweep", "--norms", "bn", "--dataset", "digits"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "needs scikit-learn, which is not installed; pip install scikit-learn" in err


def test_missing_matplotlib_still_writes_every_result(tmp_path, monkeypatch, capsys):
    d = fake_fashion(tmp_path / "fm")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "one"
    assert main(["train", "--norm", "sn", "--batch-size", "8", "--width", "4", "--data-dir", d, "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "notice: matplotlib is not installed, so no figures will be drawn" in err and err.count("\n") == 1
    assert json.loads((out / "result.json").read_text())["importance"]
    assert "mean BN" in (out / "importance.txt").read_text() and not (out / "importance.png").exists()
    grid = tmp_path / "grid"
    argv = ["sweep", "--norms", "gn", "--batch-sizes", "8", "--seeds", "0", "--no-momentum-sweep", "--width", "4",
            "--data-dir", d, "--out", str(grid), "--quiet", "--jobs", "1"]
    assert main(argv) == 0
    assert sorted(os.listdir(grid)) == ["results.json", "results.md", "runs"]


def test_default_outputs_and_grids(tmp_path, monkeypatch):
    import experiments.batch_size.sweep as sweep_mod
    train_mod = importlib.import_module("experiments.batch_size.train")
    from experiments.batch_size.norms import available_norms

    seen = {}
    monkeypatch.setattr(train_mod, "train", lambda cfg, out, **k: seen.update(cfg=cfg, out=out))
    monkeypatch.setattr(sweep_mod, "sweep", lambda cfg, grid, out, **k: seen.update(cfg=cfg, grid=grid, out=out, jobs=k["jobs"]))
    d = fake_fashion(tmp_path / "fm")
    assert main(["train", "--norm", "BN", "--batch-size", "4", "--seed", "2", "--data-dir", d]) == 0
    assert seen["out"] == os.path.join("runs", "train", "bn-b4-s2") and seen["cfg"].threads == 1 and seen["cfg"].epochs == 1
    assert seen["cfg"].pool == 1 and "pool" not in seen["cfg"].to_dict()
    assert main(["sweep", "--data-dir", d]) == 0
    assert seen["out"] == os.path.join("runs", "sweep") and seen["jobs"] == min(2, os.cpu_count())
    assert seen["grid"].norms == available_norms() and available_norms()[:3] == ["bn", "gn", "sn"]
    assert list(seen["grid"].batch_sizes) == [1, 2, 4, 8, 16, 32] and list(seen["grid"].seeds) == [0, 1, 2]
    demo = (seen["cfg"].limit_train, seen["cfg"].epochs, seen["cfg"].limit_test, seen["cfg"].pool, seen["grid"].momenta)
    assert demo == (2000, 2, 5000, 2, [0.01, 0.003])
    assert main(["sweep", "--full", "--data-dir", d, "--no-momentum-sweep"]) == 0
    assert seen["out"] == os.path.join("runs", "full") and (seen["cfg"].limit_train, seen["cfg"].epochs) == (None, 4)
    assert (seen["cfg"].limit_test, seen["cfg"].pool, seen["cfg"].width) == (None, 1, 16)
    assert seen["grid"].momenta == [] and seen["grid"].momentum_norms == []
    assert main(["sweep", "--pool", "1", "--data-dir", d]) == 0 and seen["cfg"].pool == 1


def test_interrupted_train_does_not_promise_a_resume(tmp_path, monkeypatch, capsys):
    train_mod = importlib.import_module("experiments.batch_size.train")

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "train", interrupted)
    assert main(["train", "--norm", "bn", "--batch-size", "4", "--data-dir", fake_fashion(tmp_path / "fm")]) == 130
    assert "interrupted; train keeps no checkpoint, so running it again starts from step 0" in capsys.readouterr().err


def test_progress_plain_lines_off_a_terminal():
    import io

    from experiments.batch_size.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    plain, terminal = io.StringIO(), Terminal()
    for stream in (plain, terminal):
        bar = Progress(8, "bn batch 2", stream=stream)
        for _ in range(8):
            bar.update(1, "loss 0.5")
        bar.close()
    lines = plain.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == ["bn batch 2: 2/8 (25%)", "bn batch 2: 4/8 (50%)", "bn batch 2: 6/8 (75%)", "bn batch 2: 8/8 (100%)"]
    assert "\r" not in plain.getvalue() and "\x1b" not in plain.getvalue()
    assert terminal.getvalue().startswith("\rbn batch 2: ") and "\n" not in terminal.getvalue()


def test_norms_come_from_normkit_at_run_time():
    from experiments.batch_size.norms import available_norms, layer_options

    assert available_norms(("bn", "no-such-norm", "sn")) == ["bn", "sn"]
    assert layer_options("sn", 1) == {"sources": ("in", "ln")} and layer_options("sn", 2) == {}
    assert layer_options("bn", 1, momentum=0.01) == {"momentum": 0.01}
    # Sparse SN's radius grows over the whole run (one-hot from 0.816 of it on); the others
    # have no radius
    assert layer_options("ssn", 4, total_steps=500) == {"radius_steps": 500}
    assert layer_options("ssn", 1, total_steps=500) == {"sources": ("in", "ln"), "radius_steps": 500}
    assert layer_options("sn", 4, total_steps=500) == {} and layer_options("ssn", 4) == {}
    with pytest.raises(ConfigError, match="norm momentum needs a normalizer with running averages .*got 'gn'"):
        train(TrainConfig(norm="gn", norm_momentum=0.01))
    with pytest.raises(ConfigError, match="unknown normalization name 'xyz'"):
        train(TrainConfig(norm="xyz"))


def test_pin_cpu_kernels_sets_avx2_only_where_unset_and_only_with_avx2(tmp_path, monkeypatch):
    from experiments.batch_size import cli

    has_avx2 = cli._has_avx2
    env = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}
    monkeypatch.setattr(cli, "_has_avx2", lambda: True)
    assert cli.pin_cpu_kernels(env) == {"ATEN_CPU_CAPABILITY": "avx2"}
    assert env == {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "ATEN_CPU_CAPABILITY": "avx2"}  # the user's value wins
    monkeypatch.setattr(cli, "_has_avx2", lambda: False)
    env = {}
    assert cli.pin_cpu_kernels(env) == {} and env == {}
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu sse2 avx fma avx2\n")
    assert has_avx2(str(info))
    info.write_text("processor : 0\nflags : fpu sse2 avx\n")
    assert not has_avx2(str(info))
    assert not has_avx2(str(tmp_path / "missing"))
