"""Build normkit's fused CPU kernels (``csrc/norm_kernels.c``) into a shared library.

Standard library only: ``setup.py`` imports this file by path at install time (regular and
editable installs), without torch or the rest of normkit. The result is
``normkit/kernels/libnormkit_cpu.so`` plus a sidecar manifest ``libnormkit_cpu.json``
(sha256 of the library, compiler, flags, OpenMP, libgomp, source sha256, status "built";
or status "failed" with the exact reason, and then no library file). The loader
(:mod:`normkit.kernels._library`) only loads a library whose bytes match that manifest.

Flags: ``-O3 -std=c11 -fPIC -fno-math-errno``, ``-march=native`` (on x86 with
``-mprefer-vector-width=256``: AVX2 and AVX-512 machines then give the same bits) unless ``NORMKIT_NATIVE=0``,
``-fopenmp`` linked against the libgomp that the torch wheel bundles (found without
importing torch; rpath to it), so that torch and the kernels share one OpenMP runtime.
Fallbacks: without ``-march=native``, then without OpenMP (the manifest's ``openmp`` with
``libgomp: null`` means the compiler's own OpenMP runtime: torch had none to offer). ``$CC`` (may carry flags, split
like a shell would) replaces the compiler search (``cc``, ``gcc``, ``clang``); ``$CFLAGS``
is appended to the compile and link commands, ``$LDFLAGS`` to the link command. Every
compiler process gets ``NORMKIT_BUILD_TIMEOUT`` seconds (default 120); a timeout ends the
build (the same compiler would hang again) with a reason that says so.

Rebuild in place for a source checkout: ``python -m normkit.kernels._build`` (or
``python normkit/kernels/_build.py``, which does not import normkit).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

__all__ = [
    "LIBRARY_NAME", "SOURCE", "BuildResult", "build_cpu_library", "copy_built_library",
    "default_library_path", "manifest_path", "main",
]

LIBRARY_NAME = "libnormkit_cpu.so"
SOURCE = Path(__file__).resolve().parent / "csrc" / "norm_kernels.c"
DEFAULT_TIMEOUT = 120.0
MANIFEST_FORMAT = 1
BASE_FLAGS = ("-O3", "-std=c11", "-fPIC", "-fno-math-errno")
_TAIL = 2000  # characters of compiler output kept per failed command


def default_library_path() -> Path:
    """Where the loader looks: ``normkit/kernels/libnormkit_cpu.so`` next to this file."""
    return Path(__file__).resolve().parent / LIBRARY_NAME


def manifest_path(library: Path) -> Path:
    """The sidecar manifest of a library: the same name with ``.json``."""
    return Path(library).with_suffix(".json")


@dataclass(frozen=True)
class BuildResult:
    ok: bool
    library: Optional[Path]  # None when the build failed (no library file is left)
    manifest: Path
    reason: Optional[str]  # why it failed, None when ok
    seconds: float
    record: dict = field(repr=False)  # the manifest's content

    def __str__(self) -> str:
        if self.ok:
            r = self.record
            return (f"built {self.library} in {self.seconds:.1f}s (sha256 {r['sha256'][:12]}, "
                    f"native={r['native']}, openmp={r['openmp']}, libgomp={r['libgomp']})")
        return f"normkit CPU kernels not built ({self.seconds:.1f}s): {self.reason}"


class _Timeout(Exception):
    pass


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _timeout_from_env() -> float:
    raw = os.environ.get("NORMKIT_BUILD_TIMEOUT", "")
    if not raw.strip():
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"NORMKIT_BUILD_TIMEOUT must be a positive number of seconds, got {raw!r}")
    return value


def _compiler(cc: Union[None, str, Sequence[str]]) -> tuple[list[str], str]:
    """The compiler command (argv prefix) and where it came from; raises LookupError."""
    if cc is None and os.environ.get("CC", "").strip():
        cc, origin = os.environ["CC"], "$CC"
    elif cc is not None:
        origin = "cc argument"
    else:
        for name in ("cc", "gcc", "clang"):
            found = shutil.which(name)
            if found:
                return [found], f"found {name} on PATH"
        raise LookupError("no C compiler found (looked for cc, gcc, clang on PATH; set $CC)")
    argv = shlex.split(cc) if isinstance(cc, str) else list(cc)
    if not argv:
        raise LookupError(f"the compiler ({origin}) is empty")
    found = shutil.which(argv[0])
    if not found:
        raise LookupError(f"C compiler {argv[0]!r} ({origin}) not found or not executable")
    return [found, *argv[1:]], origin


def torch_libgomp() -> Optional[str]:
    """The libgomp bundled in the torch wheel (``torch/lib/libgomp*.so*``), found without
    importing torch; None when torch is not installed or has none."""
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        libdir = Path(location) / "lib"
        libs = sorted(p for p in libdir.glob("libgomp*.so*") if p.is_file())
        if libs:
            return str(libs[0].resolve())
    return None


def _exec(cmd: list[str], timeout: float) -> tuple[int, str]:
    """Run one command in its own process group: (exit status, output). On timeout the whole
    group (compiler driver, cc1, as, ld, a wrapper script's children) is killed and _Timeout
    raised; a command that cannot be started gives status 127."""
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
    except OSError as exc:
        return 127, f"cannot run {cmd[0]}: {exc}"
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            proc.kill()
        proc.communicate()
        raise _Timeout(f"build command timed out after {timeout:g}s (NORMKIT_BUILD_TIMEOUT): "
                       f"`{shlex.join(cmd)}`") from None
    return proc.returncode, out.decode(errors="replace").strip()


def _run(cmd: list[str], timeout: float) -> Optional[str]:
    """None on success, else the command and the tail of its output."""
    code, out = _exec(cmd, timeout)
    return None if code == 0 else f"`{shlex.join(cmd)}` exited with {code}:\n{out[-_TAIL:]}"


def _version(cc: list[str], timeout: float) -> Optional[str]:
    code, out = _exec([*cc, "--version"], timeout)
    lines = out.splitlines()
    return lines[0].strip() if code == 0 and lines else None


def _smoke_test(lib: Path, timeout: float) -> tuple[Optional[str], Optional[bool]]:
    """Load the fresh library in a separate, isolated interpreter: (error, nk_has_half())."""
    code = "import ctypes, sys; print(ctypes.CDLL(sys.argv[1]).nk_has_half())"
    status, out = _exec([sys.executable, "-I", "-c", code, str(lib)], timeout)
    if status != 0 or out.splitlines()[-1:] not in (["0"], ["1"]):
        return f"the library was built but does not load (exit status {status}):\n{out[-_TAIL:]}", None
    return None, out.splitlines()[-1] == "1"


def _attempt(cc: list[str], source: Path, work: Path, native: bool, openmp: bool, gomp: Optional[str],
             cflags: list[str], ldflags: list[str], timeout: float) -> tuple[Optional[str], dict]:
    obj, lib = work / "norm_kernels.o", work / LIBRARY_NAME
    compile_flags = [*BASE_FLAGS, *(_native_flags() if native else []), *(["-fopenmp"] if openmp else []), *cflags]
    link_flags = ["-shared"]
    if openmp:  # torch's own libgomp when it has one, else the compiler's
        link_flags += [gomp, f"-Wl,-rpath,{os.path.dirname(gomp)}"] if gomp else ["-fopenmp"]
    link_flags += [*cflags, *ldflags]
    info = {"native": native, "openmp": openmp, "libgomp": gomp if openmp else None,
            "compile_flags": compile_flags, "link_flags": link_flags}
    err = _run([*cc, *compile_flags, "-c", str(source), "-o", str(obj)], timeout)
    if err is None:
        err = _run([*cc, "-shared", str(obj), "-o", str(lib), *link_flags[1:]], timeout)
    if err is None:
        err, info["has_half"] = _smoke_test(lib, timeout)
    return err, info


def _native_flags() -> list[str]:
    """``-march=native``; on x86 also 256-bit vectors. The reassociated sums of the mixer add
    lanes in an order set by the vector width, so without the cap an AVX-512 machine's
    results differ in the last bits from an AVX2 machine's; with it, both agree bit for bit."""
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        return ["-march=native", "-mprefer-vector-width=256"]
    return ["-march=native"]


def _write_json(path: Path, record: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_cpu_library(out_path: Path, *, cc: Union[None, str, Sequence[str]] = None,
                      timeout: Optional[float] = None, native: Optional[bool] = None,
                      source: Path = SOURCE) -> BuildResult:
    """Compile ``source`` into ``out_path`` and write its manifest next to it.

    Never raises for a missing, failing or hung compiler: the result (and the manifest) then
    say ``failed`` with the reason, and no file is left at ``out_path``. ``cc`` overrides
    ``$CC``; ``timeout`` (seconds per compiler process) overrides ``NORMKIT_BUILD_TIMEOUT``;
    ``native`` overrides ``NORMKIT_NATIVE``. Raises OSError only when the destination
    directory cannot be written."""
    start = time.monotonic()
    timeout = _timeout_from_env() if timeout is None else float(timeout)
    out_path = Path(os.path.abspath(out_path))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    manifest = manifest_path(out_path)
    native = os.environ.get("NORMKIT_NATIVE", "1") != "0" if native is None else bool(native)
    cflags = shlex.split(os.environ.get("CFLAGS", ""))
    ldflags = shlex.split(os.environ.get("LDFLAGS", ""))
    record: dict = {
        "format": MANIFEST_FORMAT, "library": out_path.name, "source": str(source),
        "source_sha256": _sha256(source) if source.is_file() else None, "cflags_env": cflags,
        "ldflags_env": ldflags, "timeout_s": timeout, "machine": platform.machine(),
        "python": sys.executable, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "attempts": [],
    }
    reason: Optional[str] = None
    work = Path(tempfile.mkdtemp(prefix=".normkit-build-", dir=out_path.parent))  # same filesystem: atomic rename
    try:
        if record["source_sha256"] is None:
            raise LookupError(f"kernel source not found at {source}")
        cc_argv, origin = _compiler(cc)
        record.update(compiler=cc_argv, compiler_origin=origin, compiler_version=_version(cc_argv, timeout))
        gomp = torch_libgomp()
        tries = [(native, True), (False, True), (native, False), (False, False)]
        for native_try, openmp_try in dict.fromkeys(tries):  # ordered, without duplicates
            err, info = _attempt(cc_argv, source, work, native_try, openmp_try, gomp, cflags, ldflags, timeout)
            if err is None:
                lib = work / LIBRARY_NAME
                os.chmod(lib, 0o755)  # never group/world-writable, whatever the umask
                data = lib.read_bytes()
                record.update(info, status="built", sha256=hashlib.sha256(data).hexdigest(), size=len(data))
                os.replace(lib, out_path)
                break
            record["attempts"].append({**info, "error": err})
        else:
            first = record["attempts"][0]["error"]
            reason = f"building normkit's CPU kernels with {shlex.join(cc_argv)} failed: {first}"
    except _Timeout as exc:
        reason = f"{exc}; build abandoned, remaining fallbacks skipped (a hung compiler would hang again)"
    except LookupError as exc:
        reason = str(exc)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if reason is not None:
        out_path.unlink(missing_ok=True)  # a failed build leaves no (stale) library behind
        record.update(status="failed", reason=reason)
    record["build_seconds"] = round(time.monotonic() - start, 3)
    _write_json(manifest, record)
    return BuildResult(reason is None, out_path if reason is None else None, manifest, reason,
                       record["build_seconds"], record)


def _atomic_copy(src: Path, dst: Path, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as f, open(src, "rb") as g:
            shutil.copyfileobj(g, f)
        os.chmod(tmp, mode)
        os.replace(tmp, dst)  # a process that has the old library mapped keeps its (old) inode
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def copy_built_library(src: Path, dst: Path) -> None:
    """Publish a library built at ``src`` (and its manifest) at ``dst``, atomically, never
    rewriting a file in place; a failed build's manifest removes any library at ``dst``."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    record = json.loads(manifest_path(src).read_text())
    if record.get("status") == "built":
        _atomic_copy(src, dst, 0o755)
    else:
        dst.unlink(missing_ok=True)
    _atomic_copy(manifest_path(src), manifest_path(dst), 0o644)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m normkit.kernels._build",
                                     description="(Re)build normkit's CPU kernels in place.")
    parser.add_argument("--out", type=Path, default=default_library_path(),
                        help=f"library to write (default: {default_library_path()})")
    args = parser.parse_args(argv)
    result = build_cpu_library(args.out)
    print(result)
    print(f"manifest: {result.manifest}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
