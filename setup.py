"""Builds the optional oneDNN convolution extension (`ssl3d_jax/ops/_onednn_conv*.so`).

Everything else about the package is in pyproject.toml. The extension is a plain shared library
of XLA FFI handlers (`ssl3d_jax/ops/csrc/onednn_conv.cc`, loaded with ctypes by
`ssl3d_jax/ops/onednn.py`), compiled against jaxlib's FFI headers and oneDNN's development
package, both build requirements in pyproject.toml (from the package registry; nothing else is
downloaded). When either is missing (a platform without oneDNN wheels) or the compiler fails,
installation still succeeds without it, says why here, and the library logs once at run time
that it uses the XLA path.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

_SOURCE = "ssl3d_jax/ops/csrc/onednn_conv.cc"
_DNNL_SONAME = "libdnnl.so.3"


def _dist_file(dist: str, suffix: str) -> str | None:
    """Absolute path of the file of installed distribution `dist` whose path ends in `suffix`."""
    try:
        files = importlib.metadata.distribution(dist).files or ()
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        # RECORD paths are relative to site-packages ('../../libdnnl.so.3'): resolve them first.
        path = os.path.normpath(str(f.locate()))
        if path.replace(os.sep, "/").endswith(suffix):
            return path
    return None


def _locate() -> tuple[dict | None, str]:
    """(compiler settings, '') or (None, why the extension cannot be built here)."""
    if not sys.platform.startswith("linux"):
        return None, f"oneDNN's pip packages are for Linux only (this is {sys.platform})"
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        return None, "jaxlib (the XLA FFI headers) is not installed in the build environment"
    ffi_include = os.path.join(list(spec.submodule_search_locations)[0], "include")
    if not os.path.exists(os.path.join(ffi_include, "xla", "ffi", "api", "ffi.h")):
        return None, f"jaxlib has no XLA FFI headers in {ffi_include}"
    header = _dist_file("onednn-devel-cpu-gomp", "include/oneapi/dnnl/dnnl.hpp")
    library = _dist_file("onednn-cpu-gomp", f"lib/{_DNNL_SONAME}")
    if header is None or library is None:
        return None, (
            "oneDNN's development package (onednn-devel-cpu-gomp) is not installed in the build "
            "environment (no wheel for this platform?)"
        )
    dnnl_include = os.path.dirname(os.path.dirname(os.path.dirname(header)))
    return {
        "include_dirs": [ffi_include, dnnl_include],
        "library_dirs": [os.path.dirname(library)],
        # By file name: the package ships libdnnl.so.3 (the linker's `-ldnnl` would want the
        # unversioned name, which only some of its wheels have).
        "extra_link_args": [f"-l:{_DNNL_SONAME}", "-Wl,-rpath,$ORIGIN/../../../.."],
    }, ""


class BuildExt(build_ext):
    """Builds the extension where it can, and says why not where it cannot."""

    def run(self):
        settings, why = _locate()
        if settings is None:
            print(f"ssl3d_jax: not building the oneDNN extension: {why}.", file=sys.stderr)
            self.extensions = []
            return
        for ext in self.extensions:
            for key, value in settings.items():
                getattr(ext, key).extend(value)
        super().run()

    def get_ext_filename(self, fullname):
        # A plain shared library (no Python module init), loaded with ctypes: a fixed name
        # instead of the interpreter-specific `*.cpython-311-x86_64-linux-gnu.so`.
        return os.path.join(*fullname.split(".")) + ".so"


setup(
    ext_modules=[
        Extension(
            "ssl3d_jax.ops._onednn_conv",
            sources=[_SOURCE],
            language="c++",
            extra_compile_args=["-std=c++17", "-O2", "-w"],
            optional=True,  # a compiler error skips the extension; the XLA path remains
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
