"""The one-command GPU check (benchmarks/gpu_check.sh, gpu_check.py) on the CPU.

The script's dry run runs every phase on the CPU with small shapes, the Triton kernels in
Triton's interpreter, in processes of its own (the pytest process never imports the kernels
in interpreter mode). The other tests call the script's pieces in this process with the
composed-ATen kernel set, and break it on purpose to show that a wrong kernel fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common_layers import LAYER_NORM_CASES, variants
from normkit import kernels

ROOT = Path(__file__).resolve().parents[1]
FILES = ("log.txt", "correctness.json", "correctness.md", "timing.json", "timing.md", "summary.md")


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


gpu_check = _load_script()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    pytest.importorskip("triton", reason="triton is not installed (pip install 'normkit[triton]')")
    out, brought_back = tmp_path_factory.mktemp("gpu_check"), tmp_path_factory.mktemp("device_out")
    env = {k: v for k, v in os.environ.items() if k != "NORMKIT_BACKEND"}
    env["OUT"] = str(brought_back)  # the device tool's folder: the script copies its results there
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    docs = {p: json.loads((out / f"{p}.json").read_text()) for p in ("correctness", "timing")
            if (out / f"{p}.json").exists()}
    return done, out, docs, brought_back


def _log(done, out) -> str:
    log = (out / "log.txt").read_text() if (out / "log.txt").exists() else ""
    return f"exit {done.returncode}\n{log[-6000:]}\n{done.stderr[-2000:]}"


def test_dry_run_passes_and_writes_every_file(dry_run):
    done, out, docs, brought_back = dry_run
    problems = {n: r.get("detail") for n, r in docs.get("correctness", {}).get("records", {}).items()
                if r["status"] not in ("pass", "n/a")}
    assert done.returncode == 0 and not problems, (problems, _log(done, out))
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert sorted(p.name for p in brought_back.iterdir()) == sorted(FILES)
    assert "**Correctness: PASSED**" in (out / "summary.md").read_text()


def test_dry_run_covers_the_layer_table(dry_run):
    _, out, docs, _ = dry_run
    layers = [r for r in docs["correctness"]["records"].values() if r.get("check") == "layer"]
    table = {c.variant for c in variants() + variants(LAYER_NORM_CASES)}
    assert table <= {r["row"] for r in layers}
    assert {r["dtype"] for r in layers} == {"float32", "bfloat16", "float16"}
    assert {r["layout"] for r in layers} == {layout.name for layout in gpu_check.layouts(dry_run=True)}
    assert {(r["mode"], r["masked"], r["params"]) for r in layers} >= {("train", True, "float32"),
                                                                       ("eval", False, "float32"),
                                                                       ("train", False, "same")}
    unmasked = [r for r in layers if not r["masked"]]
    assert unmasked and all(r["route"].startswith("triton passes") for r in unmasked), unmasked
    assert all(r["calls"]["backward_apply"] >= 1 for r in unmasked)
    others = {r.get("check") for r in docs["correctness"]["records"].values()}
    assert others >= {"backend", "definitions", "autocast", "compile", "opcheck"}


def test_dry_run_timing_tables(dry_run):
    _, out, docs, _ = dry_run
    data = docs["timing"]["data"]
    assert {r["variant"] for r in data["layers"]} == set(gpu_check.bench_gpu.LAYER_VARIANTS)
    assert {r["format"] for r in data["layers"]} == {"nchw", "channels_last"}
    assert all(r["fwd_bwd_us"] > 0 and r["fwd_bwd_peak"] > 0 for r in data["layers"])
    assert [r["norm"] for r in data["resnet"]] == list(gpu_check.bench_gpu.RESNET_NORMS)
    assert data["profiles"] and data["profiles"][0]["launches_per_step"] > 0
    md = (out / "timing.md").read_text()
    for heading in ("## Goals", "forward+backward, us (median)", "## ResNet-50 training step", "## Profiles"):
        assert heading in md


# --------------------------------------------------------------------------- in this process


def _correctness(tmp_path, *only: str, backend: str = "aten") -> tuple[int, dict]:
    argv = ["--phase", "correctness", "--dry-run", "--backend", backend, "--out", str(tmp_path)]
    for part in only:
        argv += ["--only", part]
    status = gpu_check.main(argv)
    return status, json.loads((tmp_path / "correctness.json").read_text())["records"]


def test_layer_check_passes_on_a_sound_kernel_set(tmp_path):
    status, records = _correctness(tmp_path, "backend", "layer/sn/bfloat16/nchw/train")
    assert status == 0, records
    assert records["layer/sn/bfloat16/nchw/train"]["route"] == "aten passes"


def test_wrong_kernel_output_fails_the_check_and_the_phase(tmp_path, monkeypatch):
    sound = kernels.load("aten")

    def apply_off_by_a_little(x, mu, scale, shift, axis):
        return sound.apply(x, mu, scale, shift, axis) * (1 + 1e-3)

    monkeypatch.setitem(kernels._loaded, "aten", sound._replace(apply=apply_off_by_a_little))
    status, records = _correctness(tmp_path, "backend", "layer/bn/float32/nchw/train")
    assert status == gpu_check.EXIT_FAILED
    assert records["backend"]["status"] == "pass"  # the other checks still ran
    failed = records["layer/bn/float32/nchw/train"]
    assert failed["status"] == "fail" and "y: max |error| / tolerance" in failed["detail"]


def test_layer_that_skips_the_kernels_fails(tmp_path, monkeypatch):
    sound = kernels.load("aten")
    monkeypatch.setitem(kernels._loaded, "aten", sound._replace(supports=lambda x, axis: "refused"))
    status, records = _correctness(tmp_path, "layer/gn2/float32/nchw/train")
    assert status == gpu_check.EXIT_FAILED
    assert "the 'aten' kernels did not run" in records["layer/gn2/float32/nchw/train"]["detail"]


def test_compare_states_the_error_against_the_tolerance():
    want = {"y": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)}
    margins = gpu_check.compare({"y": want["y"].float() + 1e-5}, want, torch.float32)
    assert 0 < margins["y"] < 1
    with pytest.raises(gpu_check.CheckFailed, match=r"y: max \|error\| / tolerance = .* rtol 0.0001, atol 0.0001"):
        gpu_check.compare({"y": want["y"] + 1e-3}, want, torch.float32)
    with pytest.raises(gpu_check.CheckFailed, match="y: non-finite values"):
        gpu_check.compare({"y": torch.tensor([float("nan"), -2.0, 0.5])}, want, torch.float32)
    with pytest.raises(gpu_check.CheckFailed, match=r"outputs differ: got \['y', 'z'\]"):
        gpu_check.compare({"y": want["y"], "z": want["y"]}, want, torch.float32)


def test_recorder_keeps_every_outcome_on_disk(tmp_path):
    rec = gpu_check.Recorder(tmp_path, "correctness", {}, time.monotonic() + 600, gpu_check.render_correctness)
    rec.run("a", lambda: {"worst": 0.5})
    rec.run("b", lambda: gpu_check._raise(gpu_check.CheckFailed("off")))  # not passed: written at once
    on_disk = json.loads((tmp_path / "correctness.json").read_text())["records"]
    assert {n: r["status"] for n, r in on_disk.items()} == {"a": "pass", "b": "fail"}
    rec.run("c", lambda: gpu_check._raise(ZeroDivisionError("boom")))
    rec.run("d", lambda: gpu_check._raise(gpu_check.NotApplicable("nothing here")))
    assert (tmp_path / "current_check.txt").read_text() == "d"
    rec.finish()
    assert not (tmp_path / "current_check.txt").exists()
    on_disk = json.loads((tmp_path / "correctness.json").read_text())["records"]
    assert {n: r["status"] for n, r in on_disk.items()} == {"a": "pass", "b": "fail", "c": "error", "d": "n/a"}
    assert "ZeroDivisionError: boom" in on_disk["c"]["detail"]
    assert rec.exit_status() == gpu_check.EXIT_FAILED
    assert "`b`: **fail**: off" in (tmp_path / "correctness.md").read_text()


def test_time_limit_skips_the_remaining_checks(tmp_path):
    rec = gpu_check.Recorder(tmp_path, "correctness", {}, time.monotonic() - 1, gpu_check.render_correctness)
    ran = []
    assert rec.run("late", lambda: ran.append(1))["status"] == "skipped"
    assert not ran and rec.exit_status() == gpu_check.EXIT_INCOMPLETE


def test_check_that_needs_more_time_than_is_left_is_skipped(tmp_path):
    rec = gpu_check.Recorder(tmp_path, "timing", {}, time.monotonic() + 30, gpu_check.render_timing)
    ran = []
    skipped = rec.run("compile", lambda: ran.append(1), needs=90)
    assert skipped["status"] == "skipped" and "less than the 90 s it needs" in skipped["detail"]
    assert rec.run("small", lambda: ran.append(2))["status"] == "pass" and ran == [2]


def test_resume_keeps_finished_checks_and_marks_the_one_that_crashed(tmp_path):
    records = {"done": {"status": "pass"}, "late": {"status": "skipped"}}
    (tmp_path / "correctness.json").write_text(json.dumps({"records": records}))
    (tmp_path / "current_check.txt").write_text("died")
    rec = gpu_check.Recorder(tmp_path, "correctness", {}, time.monotonic() + 600, gpu_check.render_correctness,
                             resume=True)
    ran = []
    for name in ("done", "died", "late"):
        rec.run(name, lambda n=name: ran.append(n))
    assert ran == ["late"]
    assert rec.records["died"]["status"] == "crashed"
    assert rec.exit_status() == gpu_check.EXIT_FAILED


def test_covering_subsets_hold_every_value():
    rows = gpu_check.table_rows()
    units = gpu_check.layer_units(rows, dry_run=False)
    single = gpu_check.covering(units, pairs=False)
    paired = gpu_check.covering(units, pairs=True)
    assert len(single) < len(paired) < len(units)
    for attr in ("dtype", "train", "masked", "params"):
        assert {getattr(u, attr) for u in single} == {getattr(u, attr) for u in units}
    assert {(u.row.name, u.dtype) for u in paired} == {(u.row.name, u.dtype) for u in units}
    assert {u.row.name for u in single} == {r.name for r in rows}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the phase would run")
def test_gpu_phases_refuse_to_run_without_cuda(tmp_path):
    with pytest.raises(SystemExit, match="the timing phase needs a CUDA device.*pass --dry-run"):
        gpu_check.main(["--phase", "timing", "--out", str(tmp_path)])


def test_dry_run_of_triton_kernels_needs_the_interpreter(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit, match="needs Triton's interpreter, and TRITON_INTERPRET is not 1"):
        gpu_check.main(["--phase", "correctness", "--dry-run", "--out", str(tmp_path)])


def test_shell_script_refuses_unknown_options():
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--fast"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "unknown option --fast" in done.stderr
