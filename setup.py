"""Build hook: compile normkit's CPU kernels at install time (regular and editable installs).

All metadata lives in pyproject.toml. The kernels are plain C + OpenMP loaded with ctypes,
not a Python extension module; the placeholder Extension only makes setuptools run
``build_ext`` (and tag the wheel as platform-specific). ``build_extension`` calls
:func:`normkit.kernels._build.build_cpu_library`, imported by file path so that neither torch
nor normkit is imported here. A missing or failing compiler does not fail the install: the
manifest ``normkit/kernels/libnormkit_cpu.json`` then records status "failed" and the reason,
and normkit runs on its reference path and reports why.
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

_spec = importlib.util.spec_from_file_location(
    "_normkit_kernels_build", Path(__file__).resolve().parent / "normkit" / "kernels" / "_build.py")
_build = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _build  # dataclasses look their module up there
_spec.loader.exec_module(_build)

KERNELS = "normkit.kernels.libnormkit_cpu"


class BuildCpuKernels(build_ext):
    """build_ext whose one 'extension' is the ctypes kernel library and its manifest."""

    def get_ext_filename(self, fullname):
        # a fixed name, not importable as a Python module by accident; setuptools asks with the
        # full dotted name, distutils' get_ext_fullpath with its last part only
        if fullname in (KERNELS, KERNELS.rpartition(".")[2]):
            return os.path.join(*fullname.split(".")[:-1], _build.LIBRARY_NAME)
        return super().get_ext_filename(fullname)

    def build_extension(self, ext):
        if ext.name != KERNELS:
            return super().build_extension(ext)
        result = _build.build_cpu_library(Path(self.get_ext_fullpath(ext.name)))
        print(f"normkit: {result}", file=sys.stderr)  # pip shows it with -v; the manifest keeps it

    def copy_extensions_to_source(self):
        # editable / --inplace: publish library + manifest atomically (never rewrite a mapped file)
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            if ext.name == KERNELS:
                inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
                _build.copy_built_library(Path(regular_file), Path(inplace_file))
        others = [ext for ext in self.extensions if ext.name != KERNELS]
        if others:
            saved, self.extensions = self.extensions, others
            try:
                super().copy_extensions_to_source()
            finally:
                self.extensions = saved

    def _get_output_mapping(self):
        yield from super()._get_output_mapping()
        if self.inplace:
            build_py = self.get_finalized_command("build_py")
            for ext in self.extensions:
                if ext.name == KERNELS:
                    inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
                    yield str(_build.manifest_path(regular_file)), str(_build.manifest_path(inplace_file))

    def get_outputs(self):
        outputs = super().get_outputs()
        if not self.inplace:
            outputs += [str(_build.manifest_path(self.get_ext_fullpath(ext.name)))
                        for ext in self.extensions if ext.name == KERNELS]
        return outputs


setup(
    ext_modules=[Extension(KERNELS, sources=["normkit/kernels/csrc/norm_kernels.c"])],
    cmdclass={"build_ext": BuildCpuKernels},
)
