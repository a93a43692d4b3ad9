"""Build script of the compiled extension ``lsr_fused._C`` (package metadata is in pyproject.toml).

Install with ``pip install --no-build-isolation .`` (or ``-e .``) so that the extension is compiled
against the torch already installed in the environment.

Environment variables:

* ``LSR_FUSED_FORCE_CUDA=1``: build the CUDA kernels even when torch is a CPU build (needs nvcc);
  ``LSR_FUSED_FORCE_CUDA=0`` never builds them. By default they are built when a CUDA toolkit is
  found and torch is a CUDA build.
* ``LSR_FUSED_NO_EXTENSION=1``: install the pure-Python package only (the C++ backend then builds
  itself just in time on first use, or the torch backend is used).
* ``LSR_FUSED_CUDA_ARCH_LIST``: forwarded to ``TORCH_CUDA_ARCH_LIST`` when that is unset.

The extension is optional: if it fails to build, the install still succeeds with a warning (set
``LSR_FUSED_REQUIRE_EXTENSION=1`` to make that an error).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = Path("csrc")

# Order matters: the baseline kernels are linked before the ISA variants (csrc/cpu/isa_prelude.h).
CPU_SOURCES = [
    CSRC / "module.cpp",
    CSRC / "ops.cpp",
    CSRC / "cpu" / "kernel_default.cpp",
    CSRC / "cpu" / "kernel_avx2.cpp",
    CSRC / "cpu" / "kernel_avx512.cpp",
]
CUDA_SOURCES = [CSRC / "cuda" / "ops_cuda.cpp", CSRC / "cuda" / "kernels.cu"]


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return None


def _extensions() -> tuple[list, dict]:
    if _env_flag("LSR_FUSED_NO_EXTENSION"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        # No torch at build time (e.g. an isolated build): ship the pure-Python package.
        return [], {}

    force_cuda = _env_flag("LSR_FUSED_FORCE_CUDA")
    if force_cuda is None:
        with_cuda = CUDA_HOME is not None and torch.version.cuda is not None
    else:
        with_cuda = force_cuda
    if with_cuda and "TORCH_CUDA_ARCH_LIST" not in os.environ:
        arch_list = os.environ.get("LSR_FUSED_CUDA_ARCH_LIST")
        if arch_list:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list

    # at::parallel_for is a header template: without the compiler's OpenMP flag it compiles to a
    # serial loop when torch uses its OpenMP backend (the default on Linux/Windows wheels).
    use_openmp = torch.backends.openmp.is_available() and sys.platform != "darwin"
    if os.name == "nt":
        cxx_flags = ["/O2"] + (["/openmp"] if use_openmp else [])
        link_flags = []
    else:
        cxx_flags = ["-O3", "-fvisibility-inlines-hidden"] + (["-fopenmp"] if use_openmp else [])
        link_flags = ["-fopenmp"] if use_openmp else []
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr"]
    sources = [str(p) for p in CPU_SOURCES]
    define_macros = []
    if with_cuda:
        sources += [str(p) for p in CUDA_SOURCES]
        define_macros.append(("LSR_FUSED_WITH_CUDA", "1"))
        extension_type = CUDAExtension
        extra_compile_args = {"cxx": cxx_flags, "nvcc": nvcc_flags}
    else:
        extension_type = CppExtension
        extra_compile_args = {"cxx": cxx_flags}
    extension = extension_type(
        name="lsr_fused._C",
        sources=sources,
        include_dirs=[str(ROOT / CSRC)],
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=link_flags,
    )
    require = bool(_env_flag("LSR_FUSED_REQUIRE_EXTENSION"))
    extension.optional = not require

    class OptionalBuildExtension(BuildExtension.with_options(use_ninja=True)):
        """Turns any failure to build the (optional) extension into a warning."""

        def build_extensions(self) -> None:
            try:
                super().build_extensions()
            except Exception as exc:  # the compiler checks run before setuptools' own filter
                if require:
                    raise
                self.warn(
                    f"lsr_fused: building the C++ extension failed ({type(exc).__name__}: {exc}); "
                    "installing without it (the torch backend, or a just-in-time build, is used)"
                )

    return [extension], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="lsr_fused",
    packages=find_packages(include=["lsr_fused", "lsr_fused.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
