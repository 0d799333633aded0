"""Load normkit's CPU kernel library, but only the one that was built and verified.

The library is built at install time (``pip install -e .`` or ``python -m
normkit.kernels._build``; see :mod:`normkit.kernels._build`) into
``normkit/kernels/libnormkit_cpu.so`` with a manifest ``libnormkit_cpu.json`` next to it.
Nothing is compiled here, and nothing is read from a cache or an environment-controlled
directory. Before ``dlopen`` ever sees the file, :func:`load_cpu_library` checks that

* the manifest exists and says "built" (else its failure reason is reported);
* the library and the manifest are regular files, not symlinks, owned by this user or root,
  and neither they nor their directory are writable by group or others;
* the sha256 of the library's bytes equals the manifest's (a truncated, damaged or foreign
  file is refused, never mapped);
* the manifest's source hash matches ``csrc/norm_kernels.c`` next to it, when present
  (a library built from other source would not match the ctypes bindings).

The bytes are hashed from the same open file descriptor that is then loaded
(``/proc/self/fd/N`` on Linux), so the verified file is the loaded file. Any failure raises
:class:`KernelUnavailable` with the reason and the fix.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import stat
import threading
from pathlib import Path
from typing import Optional

__all__ = ["KernelUnavailable", "cpu_library_path", "load_cpu_library"]

LIBRARY_NAME = "libnormkit_cpu.so"  # as in normkit.kernels._build
_HERE = Path(__file__).resolve().parent
_FIX_BUILD = "build it with `pip install -e .` (or `python -m normkit.kernels._build` in a source checkout)"
_FIX_REBUILD = ("rebuild it with `python -m normkit.kernels._build` (source checkout) or reinstall normkit "
                "(`pip install -e .`)")
_O_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)

_loaded: dict[str, ctypes.CDLL] = {}
_lock = threading.Lock()


class KernelUnavailable(RuntimeError):
    """The compiled CPU kernels cannot be used; ``reason`` says why and how to fix it."""

    def __init__(self, reason: str, path: Optional[Path] = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path = path


def cpu_library_path() -> Path:
    """``normkit/kernels/libnormkit_cpu.so``, next to this module (its manifest: ``.json``)."""
    return _HERE / LIBRARY_NAME


def _open_checked(path: Path, what: str, missing: str) -> int:
    """An O_NOFOLLOW descriptor of ``path`` after checking type, owner and mode (fstat)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise KernelUnavailable(missing, path) from None
    if stat.S_ISLNK(st.st_mode):
        raise KernelUnavailable(
            f"refusing {what} {path}: it is a symlink (to {os.readlink(path)!r}); it must be a regular file "
            f"written by the build; {_FIX_REBUILD}", path)
    try:
        fd = os.open(path, _O_FLAGS)
    except OSError as exc:
        raise KernelUnavailable(f"cannot open {what} {path}: {exc}", path) from None
    try:
        _check_owner_mode(os.fstat(fd), path, what)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_owner_mode(st: os.stat_result, path: Path, what: str) -> None:
    if what != "directory" and not stat.S_ISREG(st.st_mode):
        raise KernelUnavailable(f"refusing {what} {path}: not a regular file (mode {stat.filemode(st.st_mode)})", path)
    if st.st_uid not in (os.geteuid(), 0):
        raise KernelUnavailable(
            f"refusing {what} {path}: owned by uid {st.st_uid}, it must be owned by you (uid {os.geteuid()}) or "
            f"root; {_FIX_REBUILD}", path)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise KernelUnavailable(
            f"refusing {what} {path}: it is group- or world-writable (mode {stat.filemode(st.st_mode)}), so "
            f"another user could replace the code; fix: chmod go-w {path}" +
            ("" if what == "directory" else f" and {_FIX_REBUILD}"), path)


def _read_manifest(manifest: Path, library: Path) -> dict:
    fd = _open_checked(manifest, "manifest", f"refusing {library}: its manifest {manifest} vanished; {_FIX_REBUILD}")
    with os.fdopen(fd, "rb") as f:
        raw = f.read()
    try:
        record = json.loads(raw)
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise KernelUnavailable(f"refusing {library}: its manifest {manifest} is unreadable ({exc}); "
                                f"{_FIX_REBUILD}", library) from None
    return record


def _verify_and_open(library: Path) -> int:
    """Everything in the module docstring; returns a descriptor of the verified file."""
    manifest = library.with_suffix(".json")
    if not os.path.lexists(manifest):
        if os.path.lexists(library):
            raise KernelUnavailable(f"refusing {library}: it has no manifest {manifest.name}, so its content "
                                    f"cannot be verified; {_FIX_REBUILD}", library)
        raise KernelUnavailable(f"normkit's CPU kernels are not built: no {library} and no manifest; "
                                f"{_FIX_BUILD}", library)
    _check_owner_mode(os.stat(library.parent), library.parent, "directory")
    record = _read_manifest(manifest, library)
    if record.get("status") != "built":
        raise KernelUnavailable(f"normkit's CPU kernels were not built: {record.get('reason', 'no reason recorded')} "
                                f"(manifest {manifest}); fix the cause, then {_FIX_REBUILD}", library)
    expected = str(record.get("sha256", ""))
    source = library.parent / "csrc" / "norm_kernels.c"
    if record.get("source_sha256") and source.is_file():
        found_src = hashlib.sha256(source.read_bytes()).hexdigest()
        if found_src != record["source_sha256"]:
            raise KernelUnavailable(
                f"refusing {library}: it is stale, built from a source with sha256 {record['source_sha256'][:12]}… "
                f"but {source} now has {found_src[:12]}…; {_FIX_REBUILD}", library)
    fd = _open_checked(library, "library", f"refusing {library}: the manifest says built but the library is "
                                           f"missing; {_FIX_REBUILD}")
    try:
        digest, size = hashlib.sha256(), 0
        while chunk := os.read(fd, 1 << 20):
            digest.update(chunk)
            size += len(chunk)
        found = digest.hexdigest()
        if found != expected:
            what = (f"{size} bytes instead of {record['size']}: truncated or damaged"
                    if record.get("size") not in (None, size) else "damaged, or another library put in its place")
            raise KernelUnavailable(
                f"refusing {library}: its sha256 {found[:12]}… does not match the manifest's {expected[:12]}… "
                f"({what}); it was not loaded; {_FIX_REBUILD}", library)
    except BaseException:
        os.close(fd)
        raise
    return fd


def load_cpu_library(path: Optional[Path] = None) -> ctypes.CDLL:
    """The verified library at ``path`` (default :func:`cpu_library_path`), loaded once per path.

    Raises :class:`KernelUnavailable` (with the reason and the fix) instead of ever loading a
    file that is missing, unverified, a symlink, writable by others or not the built one."""
    library = Path(os.path.abspath(path if path is not None else cpu_library_path()))
    key = str(library)
    with _lock:
        if key in _loaded:
            return _loaded[key]
        fd = _verify_and_open(library)
        try:
            # load the very file that was hashed (same descriptor), not whatever the path names now
            target = f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else key
            try:
                lib = ctypes.CDLL(target)
                lib._name = key  # for repr and messages, instead of the descriptor path
            except OSError as exc:
                raise KernelUnavailable(f"{library} was verified but cannot be loaded: {exc}; {_FIX_REBUILD}",
                                        library) from None
        finally:
            os.close(fd)
        _loaded[key] = lib
        return lib
