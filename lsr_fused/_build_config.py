"""The one build configuration of the compiled extension, read by ``setup.py`` and by the
just-in-time build of :mod:`lsr_fused.backends.cpp_backend`.

This module imports nothing of :mod:`lsr_fused` and no torch at import time (``setup.py`` loads it
by file path, before the package is importable); :func:`configure` imports torch when called.

Environment variables (all parsed here, by :func:`env_flag`, with one meaning: unset or empty =
automatic/default, ``1``/``true``/``yes``/``on`` = on, ``0``/``false``/``no``/``off`` = off,
case-insensitive; any other value counts as unset):

* ``LSR_FUSED_FORCE_CUDA``: on = compile the CUDA kernels (needs nvcc) even with a CPU torch;
  off = never; unset = when torch is a CUDA build and a CUDA toolkit is found;
* ``LSR_FUSED_CUDA_ARCH_LIST``: the GPU architectures of a CUDA build, used as
  ``TORCH_CUDA_ARCH_LIST`` when that is unset;
* ``LSR_FUSED_NO_EXTENSION`` (``setup.py``): on = install the pure-Python package only;
* ``LSR_FUSED_REQUIRE_EXTENSION`` (``setup.py``): on = a failed build is an error, not a warning;
* ``LSR_FUSED_NO_JIT`` (just in time): on = never compile at first use;
* ``LSR_FUSED_VERBOSE_BUILD`` (just in time): on = show the compiler's output;
* ``LSR_FUSED_CACHE_DIR`` (just in time): the build cache, else ``$XDG_CACHE_HOME/lsr_fused``,
  else ``~/.cache/lsr_fused``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

# Paths below are relative to this directory (the repository's csrc/).
CSRC_DIR = "csrc"
# Link order matters: the baseline kernels come before the ISA variants (csrc/cpu/isa_prelude.h).
CPU_SOURCES = (
    "ops.cpp",
    "train_step.cpp",
    "grad_pool.cpp",
    "cpu/kernel_default.cpp",
    "cpu/kernel_avx2.cpp",
    "cpu/kernel_avx512.cpp",
)
CUDA_SOURCES = ("cuda/ops_cuda.cpp", "cuda/kernels.cu")
# The PyInit of ``lsr_fused._C``: only in the importable module that setup.py builds (the
# just-in-time build is a plain shared library loaded for its op registrations).
MODULE_SOURCE = "module.cpp"
# What the cache key of a just-in-time build hashes: every file of csrc/ with these suffixes.
SOURCE_SUFFIXES = (".h", ".cpp", ".cu", ".cuh")

NVCC_FLAGS = ("-O3", "--expt-relaxed-constexpr")
CUDA_DEFINES = (("LSR_FUSED_WITH_CUDA", "1"),)

_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")


def env_flag(name: str) -> bool | None:
    """``True``/``False`` when ``$name`` says on/off, ``None`` when unset (or unrecognised)."""
    value = os.environ.get(name, "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    return None


def cuda_arch_list() -> str | None:
    """The ``TORCH_CUDA_ARCH_LIST`` of a CUDA build (``None``: torch's default, the local GPUs)."""
    return (
        os.environ.get("TORCH_CUDA_ARCH_LIST") or os.environ.get("LSR_FUSED_CUDA_ARCH_LIST") or None
    )


def cache_root() -> Path:
    """Where just-in-time builds are kept."""
    explicit = os.environ.get("LSR_FUSED_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lsr_fused"


@dataclass(frozen=True)
class BuildConfig:
    """Everything a compiler is told, for one build (paths relative to ``csrc/``)."""

    with_cuda: bool
    sources: tuple[str, ...]
    cxx_flags: tuple[str, ...]
    link_flags: tuple[str, ...]
    nvcc_flags: tuple[str, ...]
    defines: tuple[tuple[str, str], ...]
    arch_list: str | None  # TORCH_CUDA_ARCH_LIST of a CUDA build

    def define_flags(self) -> list[str]:
        return [f"-D{name}={value}" for name, value in self.defines]

    def key(self) -> tuple[str, ...]:
        """Every input of the build but the sources' contents (part of a cache key)."""
        return (
            *self.sources,
            *self.cxx_flags,
            *self.link_flags,
            *self.nvcc_flags,
            *self.define_flags(),
            f"arch={self.arch_list}",
        )


def configure(*, python_module: bool, with_cuda: bool | None = None) -> BuildConfig:
    """The build for this machine's torch: ``python_module`` adds ``module.cpp`` (setup.py);
    ``with_cuda=None`` decides from ``LSR_FUSED_FORCE_CUDA`` (see the module docstring)."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if with_cuda is None:
        forced = env_flag("LSR_FUSED_FORCE_CUDA")
        with_cuda = (
            (CUDA_HOME is not None and torch.version.cuda is not None) if forced is None else forced
        )
    # at::parallel_for is a header template: without the compiler's OpenMP flag it compiles to a
    # serial loop when torch uses its OpenMP backend (the default on Linux/Windows wheels).
    use_openmp = torch.backends.openmp.is_available() and sys.platform != "darwin"
    if os.name == "nt":
        cxx_flags = ("/O2", *(("/openmp",) if use_openmp else ()))
        link_flags: tuple[str, ...] = ()
    else:
        cxx_flags = ("-O3", "-fvisibility-inlines-hidden", *(("-fopenmp",) if use_openmp else ()))
        link_flags = ("-fopenmp",) if use_openmp else ()
    sources = ((MODULE_SOURCE,) if python_module else ()) + CPU_SOURCES
    return BuildConfig(
        with_cuda=with_cuda,
        sources=sources + (CUDA_SOURCES if with_cuda else ()),
        cxx_flags=cxx_flags,
        link_flags=link_flags,
        nvcc_flags=NVCC_FLAGS if with_cuda else (),
        defines=CUDA_DEFINES if with_cuda else (),
        arch_list=cuda_arch_list() if with_cuda else None,
    )
