"""Build script of the compiled extension ``lsr_fused._C`` (package metadata is in pyproject.toml).

Install with ``pip install --no-build-isolation .`` (or ``-e .``) so that the extension is compiled
against the torch already installed in the environment.

What is compiled, with which flags, and the environment variables that steer it
(``LSR_FUSED_FORCE_CUDA``, ``LSR_FUSED_CUDA_ARCH_LIST``, ``LSR_FUSED_NO_EXTENSION``,
``LSR_FUSED_REQUIRE_EXTENSION``) are defined once, in ``lsr_fused/_build_config.py``, which the
just-in-time build of the C++ backend reads too.

The extension is optional: if it fails to build, the install still succeeds with a warning (set
``LSR_FUSED_REQUIRE_EXTENSION=1`` to make that an error).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _load_build_config():
    # By file path: importing the package would need torch and the package's own imports.
    path = ROOT / "lsr_fused" / "_build_config.py"
    spec = importlib.util.spec_from_file_location("_lsr_fused_build_config", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses looks the module up while building the class
    spec.loader.exec_module(module)
    return module


config = _load_build_config()


def _extensions() -> tuple[list, dict]:
    if config.env_flag("LSR_FUSED_NO_EXTENSION"):
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        # No torch at build time (e.g. an isolated build): ship the pure-Python package.
        return [], {}

    build = config.configure(python_module=True)
    if build.arch_list is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = build.arch_list
    csrc = Path(config.CSRC_DIR)  # setuptools wants sources relative to setup.py
    extra_compile_args = {"cxx": list(build.cxx_flags)}
    if build.with_cuda:
        extra_compile_args["nvcc"] = list(build.nvcc_flags)
    extension = (CUDAExtension if build.with_cuda else CppExtension)(
        name="lsr_fused._C",
        sources=[str(csrc / rel) for rel in build.sources],
        include_dirs=[str(ROOT / csrc)],
        define_macros=list(build.defines),
        extra_compile_args=extra_compile_args,
        extra_link_args=list(build.link_flags),
    )
    require = bool(config.env_flag("LSR_FUSED_REQUIRE_EXTENSION"))
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
