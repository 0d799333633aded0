"""The install-time kernel build (normkit/kernels/_build.py) and the verified loader
(normkit/kernels/_library.py).

Both modules are loaded by file path, so these tests depend on nothing else in normkit.
One real compile (module fixture, a few seconds); every refusal is checked on a copy of it,
with ctypes.CDLL replaced so that a refused file provably never reaches dlopen.
"""

import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[1] / "normkit" / "kernels"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_test_normkit_{name}", KERNELS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


build = _load("_build")
library = _load("_library")
KernelUnavailable = library.KernelUnavailable
NAME = build.LIBRARY_NAME


def _dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = _dir(tmp_path_factory.mktemp("build") / "kernels") / NAME
    result = build.build_cpu_library(out)
    assert result.ok, result.reason
    return result


@pytest.fixture
def copy(built, tmp_path):
    """A fresh, loadable copy of the built library and its manifest."""
    dst = _dir(tmp_path / "lib") / NAME
    shutil.copy2(built.library, dst)
    shutil.copy2(built.manifest, build.manifest_path(dst))
    return dst


@pytest.fixture
def no_dlopen(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"dlopen reached for a file that should have been refused: {args}")

    monkeypatch.setattr(library.ctypes, "CDLL", refuse)


def test_build_writes_library_and_manifest(built):
    record = json.loads(built.manifest.read_text())
    assert record["status"] == "built" and record["library"] == NAME
    assert record["sha256"] == build._sha256(built.library) and record["size"] == built.library.stat().st_size
    assert record["source_sha256"] == build._sha256(build.SOURCE)
    assert record["compile_flags"][:4] == ["-O3", "-std=c11", "-fPIC", "-fno-math-errno"]
    assert record["openmp"] in (True, False) and isinstance(record["compiler"], list)
    assert stat.S_IMODE(built.library.stat().st_mode) == 0o755
    assert not [p for p in built.library.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_load_verified_library(built):
    lib = library.load_cpu_library(built.library)
    assert lib.nk_has_half() in (0, 1)
    assert bool(lib.nk_has_half()) == json.loads(built.manifest.read_text())["has_half"]
    assert library.load_cpu_library(built.library) is lib  # cached per path


def test_default_paths_agree():
    assert library.cpu_library_path() == build.default_library_path() == KERNELS / NAME


def test_truncated_library_is_refused(copy, no_dlopen):
    data = copy.read_bytes()
    copy.write_bytes(data[: len(data) // 2])
    with pytest.raises(KernelUnavailable, match=r"sha256 .* does not match the manifest's .*truncated"):
        library.load_cpu_library(copy)


def test_truncated_library_never_runs_in_a_fresh_process(copy):
    # a truncated library that got mapped would crash the process (SIGBUS); refused, it exits cleanly
    copy.write_bytes(copy.read_bytes()[:4096])
    code = textwrap.dedent(f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("lib", {str(KERNELS / "_library.py")!r})
        m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
        try:
            m.load_cpu_library({str(copy)!r})
        except m.KernelUnavailable as e:
            print("refused:", e)
    """)
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("refused:") and "truncated" in done.stdout


def test_changed_bytes_are_refused(copy, no_dlopen):
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(KernelUnavailable, match=r"does not match the manifest's .*another library"):
        library.load_cpu_library(copy)


def test_foreign_library_is_refused(copy, no_dlopen):
    import _ctypes  # any real shared object that is not ours

    shutil.copyfile(_ctypes.__file__, copy)
    with pytest.raises(KernelUnavailable, match=r"sha256 .* does not match"):
        library.load_cpu_library(copy)


def test_symlinked_library_is_refused(copy, tmp_path, no_dlopen):
    target = tmp_path / "elsewhere.so"
    copy.rename(target)
    copy.symlink_to(target)
    with pytest.raises(KernelUnavailable, match="symlink"):
        library.load_cpu_library(copy)


def test_symlinked_manifest_is_refused(copy, tmp_path, no_dlopen):
    manifest = build.manifest_path(copy)
    manifest.rename(tmp_path / "elsewhere.json")
    manifest.symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(KernelUnavailable, match="manifest .* symlink"):
        library.load_cpu_library(copy)


@pytest.mark.parametrize("which", ["library", "manifest", "directory"])
@pytest.mark.parametrize("mode", [0o775, 0o757])
def test_writable_by_others_is_refused(copy, no_dlopen, which, mode):
    path = {"library": copy, "manifest": build.manifest_path(copy), "directory": copy.parent}[which]
    path.chmod(mode)
    with pytest.raises(KernelUnavailable, match=rf"refusing {which} .*group- or world-writable.*chmod go-w"):
        library.load_cpu_library(copy)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown to another user needs root")
def test_owned_by_another_user_is_refused(copy, no_dlopen):
    os.chown(copy, 65534, -1)
    with pytest.raises(KernelUnavailable, match=r"owned by uid 65534"):
        library.load_cpu_library(copy)


def test_missing_manifest_is_refused(copy, no_dlopen):
    build.manifest_path(copy).unlink()
    with pytest.raises(KernelUnavailable, match="has no manifest"):
        library.load_cpu_library(copy)


def test_nothing_built(tmp_path, no_dlopen):
    with pytest.raises(KernelUnavailable, match=r"not built: no .* and no manifest; build it with `pip install -e \.`"):
        library.load_cpu_library(_dir(tmp_path / "empty") / NAME)


def test_manifest_built_but_library_missing(copy, no_dlopen):
    copy.unlink()
    with pytest.raises(KernelUnavailable, match="manifest says built but the library is missing"):
        library.load_cpu_library(copy)


def test_stale_library_is_refused(copy, no_dlopen):
    source = _dir(copy.parent / "csrc") / "norm_kernels.c"
    source.write_text(build.SOURCE.read_text() + "\n/* edited after the build */\n")
    with pytest.raises(KernelUnavailable, match="stale"):
        library.load_cpu_library(copy)


def test_failed_manifest_reason_is_reported(tmp_path, monkeypatch, built, no_dlopen):
    out = _dir(tmp_path / "lib") / NAME
    shutil.copy2(built.library, out)  # a stale library from an earlier build: removed by the failed one
    monkeypatch.setenv("CC", "/nonexistent")
    result = build.build_cpu_library(out)
    assert not result.ok and result.library is None and not out.exists()
    assert "'/nonexistent' ($CC) not found" in result.reason
    record = json.loads(result.manifest.read_text())
    assert record["status"] == "failed" and record["reason"] == result.reason
    with pytest.raises(KernelUnavailable, match=r"not built: C compiler '/nonexistent' \(\$CC\) not found"):
        library.load_cpu_library(out)


def test_hung_compiler_times_out(tmp_path, monkeypatch):
    cc = tmp_path / "hang-cc"
    cc.write_text("#!/bin/sh\nsleep 1000\n")  # a child that keeps the pipes open: the group is killed
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("NORMKIT_BUILD_TIMEOUT", "2")
    start = time.monotonic()
    result = build.build_cpu_library(_dir(tmp_path / "lib") / NAME)
    assert time.monotonic() - start < 10
    assert not result.ok and re.search(r"timed out after 2s \(NORMKIT_BUILD_TIMEOUT\)", result.reason)
    assert json.loads(result.manifest.read_text())["status"] == "failed"
    assert not (tmp_path / "lib" / NAME).exists()


def test_cc_flags_cflags_and_fallbacks(tmp_path, monkeypatch):
    # a compiler that logs its arguments and fails: the fallbacks and flags, without compiling
    log = tmp_path / "args.log"
    cc = tmp_path / "fake-cc"
    cc.write_text(f'#!/bin/sh\necho "$@" >> {log}\n[ "$1 $2" = "-m64 --version" ] && exit 0\nexit 1\n')
    cc.chmod(0o755)
    monkeypatch.setenv("CC", f"{cc} -m64")
    monkeypatch.setenv("CFLAGS", "-DNK_TEST=1 -g")
    monkeypatch.setenv("NORMKIT_NATIVE", "0")
    result = build.build_cpu_library(_dir(tmp_path / "lib") / NAME)
    assert not result.ok and "exited with 1" in result.reason
    calls = log.read_text().splitlines()
    assert calls[0] == "-m64 --version"
    compiles = calls[1:]
    assert len(compiles) == 2 and all(c.startswith("-m64 -O3 -std=c11 -fPIC -fno-math-errno") for c in compiles)
    assert "-fopenmp" in compiles[0] and "-fopenmp" not in compiles[1]
    assert all("-march=native" not in c and "-DNK_TEST=1 -g -c" in c for c in compiles)
    assert [(a["native"], a["openmp"]) for a in result.record["attempts"]] == [(False, True), (False, False)]


def test_bad_timeout_setting_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMKIT_BUILD_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="NORMKIT_BUILD_TIMEOUT must be a positive number"):
        build.build_cpu_library(tmp_path / NAME)


def test_main_reports_the_result(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CC", "/nonexistent")
    assert build.main(["--out", str(_dir(tmp_path / "lib") / NAME)]) == 1
    assert "not built" in capsys.readouterr().out


def test_copy_built_library_publishes_both(built, tmp_path):
    dst = _dir(tmp_path / "src") / NAME
    build.copy_built_library(built.library, dst)
    assert dst.read_bytes() == built.library.read_bytes() and stat.S_IMODE(dst.stat().st_mode) == 0o755
    assert library.load_cpu_library(dst).nk_has_half() in (0, 1)


def test_installed_library_verifies():
    path = library.cpu_library_path()
    manifest = build.manifest_path(path)
    if not manifest.exists():
        pytest.fail(f"no {manifest}: normkit is not installed from this checkout; run `pip install -e .`")
    record = json.loads(manifest.read_text())
    if record["status"] != "built":
        pytest.skip(f"the installed CPU kernels were not built: {record.get('reason')}")
    assert library.load_cpu_library(path).nk_has_half() in (0, 1)
