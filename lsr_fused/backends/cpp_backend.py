"""The compiled backend: the row kernels of ``csrc/`` exposed as ``torch.ops.lsr_fused_C.*``
(:class:`lsr_fused.backends.contract.RowBackend`, whose parameter types are written there).

Loading is lazy (nothing happens when :mod:`lsr_fused` is imported) and happens once, on the first
call to :func:`is_available`, :func:`unavailable_reason`, :func:`forward` or :func:`backward`:

1. ``import lsr_fused._C``, the extension built by ``setup.py`` (``pip install .``);
2. otherwise, when the sources are present (a source checkout), compile them just in time with
   :func:`torch.utils.cpp_extension.load` into a cache directory keyed by a hash of the sources, the
   build configuration and the torch/Python versions (``$LSR_FUSED_CACHE_DIR``, else
   ``$XDG_CACHE_HOME/lsr_fused``, else ``~/.cache/lsr_fused``), printing one line to stderr. Set
   ``LSR_FUSED_NO_JIT=1`` to skip this step;
3. otherwise the backend is unavailable and :func:`unavailable_reason` says why.

The ops ``lsr_fused_C::forward`` and ``lsr_fused_C::backward`` are this backend's kernel entry
points (as the Triton kernels are the Triton backend's): in the package, only :func:`forward` and
:func:`backward` below call them, from inside the ``lsr_fused::*`` custom ops of
:mod:`lsr_fused.ops`, the op layer that autograd and ``torch.compile`` see. Their schemas are
declared once, in ``csrc/ops.cpp``; what is compiled, and how, is in
:mod:`lsr_fused._build_config` (shared with ``setup.py``).

Training steps (``WRITES_GRAD_IN_FORWARD``, CPU only: the CUDA forward raises
``NotImplementedError`` when given them): given ``grad_logits`` and a ``(1,)`` ``grad_guess``,
``forward`` also writes each row's gradient for upstream ``grad_guess``, right after the row's
statistics while the row is still in the caches (one read of the logits instead of two for
forward + backward); ``backward`` given the same ``grad_guess`` rewrites only the rows whose
``grad_loss`` differs from it and touches nothing of the others. On the CPU, contiguous rows of
up to 512 KiB of float32 (float64) values take a pipelined path with one exp per element instead
of two (the kernels are compute-bound there): the gradients it writes equal backward's within
rounding, not bit for bit.

On the CPU a target outside ``[0, C)`` (other than ``ignore_index``) raises ``ValueError``; on CUDA
it gives NaN loss and gradient rows.

CPU tuning knobs (environment variables, read by the compiled code):

* ``LSR_FUSED_CPU_CAPABILITY=default|avx2|avx512``: cap the kernel variant (see
  :func:`set_cpu_capability`);
* ``LSR_FUSED_STREAM_MIN_BYTES``: gradients at least this large (default 32 MiB) that do not alias
  the logits are written with non-temporal stores; a negative value disables them;
* ``LSR_FUSED_THP=0``: do not ask for transparent huge pages on a large, freshly allocated gradient
  (Linux ``madvise(MADV_HUGEPAGE)``; it only changes how fast its first write page-faults);
* ``LSR_FUSED_GRAD_POOL_BYTES``: the bound of the CPU gradient pool (below; default 1 GiB, ``0``
  turns the pool off).

The CPU gradient pool (``csrc/grad_pool.h``): the logits-sized gradients this backend returns on
the CPU (:func:`empty_grad`, at least 1 MiB) are memory it owns. When the last tensor using one is
gone (``x.grad = None``, ``optimizer.zero_grad()``), its pages, already faulted in, go back to a
small pool and the next step's gradient reuses them: steady-state training touches no fresh pages,
so it pays no page faults and no huge-page compaction stalls (issue 14). A gradient still
referenced anywhere is never reused. The pool keeps at most ``max_bytes`` of released buffers (the
least recently released are unmapped first, a larger buffer is never kept); unmapped memory goes
back to the system. :func:`set_gradient_pool` changes the bound (``0`` disables the pool),
:func:`trim_gradient_pool` empties it, :func:`gradient_pool_stats` reports it.
"""

from __future__ import annotations

import hashlib
import importlib
import operator
import os
import platform
import shutil
import sys
import threading
from pathlib import Path

import torch
from torch import Tensor

from .. import _build_config
from .._params import RowParams

_OP_NAMESPACE = "lsr_fused_C"
_SOURCE_ROOT = Path(__file__).resolve().parents[2] / _build_config.CSRC_DIR

# Device types whose kernels write the gradient in forward (see lsr_fused.backends). The CUDA C++
# forward does not (on CUDA the Triton backend is the default; this one is its fallback).
WRITES_GRAD_IN_FORWARD = frozenset({"cpu"})
# The CPU kernel raises ValueError for a target out of range while it reads the targets anyway.
CHECKS_TARGETS = frozenset({"cpu"})

_lock = threading.RLock()
_state: dict[str, object] = {"tried": False, "loaded": False, "reason": None, "how": None}


def _ops_registered() -> bool:
    return hasattr(getattr(torch.ops, _OP_NAMESPACE), "forward")


def _env_flag(name: str) -> bool:
    return bool(_build_config.env_flag(name))


def _jit_digest(build: _build_config.BuildConfig) -> str:
    h = hashlib.sha256()
    parts = (torch.__version__, str(torch.version.cuda), sys.version, platform.machine())
    for part in (*parts, *build.key()):
        h.update(part.encode())
        h.update(b"\0")
    for path in sorted(_SOURCE_ROOT.rglob("*")):
        if path.suffix in _build_config.SOURCE_SUFFIXES and path.is_file():
            h.update(path.relative_to(_SOURCE_ROOT).as_posix().encode())
            h.update(b"\0")
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _jit_build(with_cuda: bool) -> None:
    from torch.utils.cpp_extension import load

    build = _build_config.configure(python_module=False, with_cuda=with_cuda)
    digest = _jit_digest(build)
    build_dir = _build_config.cache_root() / f"{'cuda' if with_cuda else 'cpu'}-{digest}"
    build_dir.mkdir(parents=True, exist_ok=True)
    name = f"lsr_fused_C_jit_{digest}"
    if not any(build_dir.glob(f"{name}.*")):  # a cached build is just loaded, silently
        print(
            f"lsr_fused: compiling the C++ backend just in time into {build_dir} "
            "(first use only, about a minute)",
            file=sys.stderr,
            flush=True,
        )
    # TORCH_CUDA_ARCH_LIST is read from the environment by torch: set it for this build only.
    saved_arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if build.arch_list is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = build.arch_list
    try:
        load(
            name=name,
            sources=[str(_SOURCE_ROOT / rel) for rel in build.sources],
            extra_cflags=[*build.cxx_flags, *build.define_flags()],
            extra_ldflags=list(build.link_flags),
            extra_cuda_cflags=[*build.nvcc_flags, *build.define_flags()] if with_cuda else None,
            extra_include_paths=[str(_SOURCE_ROOT)],
            build_directory=str(build_dir),
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=_env_flag("LSR_FUSED_VERBOSE_BUILD"),
        )
    finally:
        if saved_arch_list is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved_arch_list


def _load() -> tuple[bool, str | None, str | None]:
    """Try every way of getting the ops; return (loaded, reason if not, how if so)."""
    if _ops_registered():  # e.g. loaded by hand with torch.ops.load_library
        return True, None, "already registered"
    try:
        importlib.import_module("lsr_fused._C")
    except ImportError as exc:
        prebuilt_error = f"lsr_fused._C could not be imported ({exc})"
    else:
        if _ops_registered():
            return True, None, "lsr_fused._C"
        prebuilt_error = "lsr_fused._C was imported but registered no lsr_fused_C ops"

    if _env_flag("LSR_FUSED_NO_JIT"):
        return False, f"{prebuilt_error}; just-in-time build disabled by LSR_FUSED_NO_JIT", None
    missing = [rel for rel in _build_config.CPU_SOURCES if not (_SOURCE_ROOT / rel).is_file()]
    if missing:
        return False, f"{prebuilt_error}; no C++ sources for a just-in-time build ({missing})", None
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return False, f"{prebuilt_error}; no C++ compiler ({compiler!r} not found)", None

    # A CUDA build as setup.py would make one (LSR_FUSED_FORCE_CUDA, else a CUDA torch and a
    # toolkit), falling back to the CPU kernels alone when it fails.
    attempts = [True, False] if _build_config.configure(python_module=False).with_cuda else [False]
    errors = []
    for with_cuda in attempts:
        try:
            _jit_build(with_cuda)
        except Exception as exc:  # compiler errors, missing headers, ninja missing, ...
            text = str(exc).strip().splitlines()
            summary = text[-1] if text else ""
            errors.append(
                f"{'CUDA' if with_cuda else 'CPU'} build: {type(exc).__name__}: {summary}"
            )
            if _ops_registered():  # loaded despite a late error
                break
            continue
        if _ops_registered():
            return True, None, f"just-in-time build ({'CPU+CUDA' if with_cuda else 'CPU'})"
        errors.append("the just-in-time library registered no lsr_fused_C ops")
    if _ops_registered():
        return True, None, "just-in-time build"
    return False, f"{prebuilt_error}; just-in-time build failed: {'; '.join(errors)}", None


def _ensure_loaded() -> bool:
    if _state["tried"]:
        return bool(_state["loaded"])
    with _lock:
        if not _state["tried"]:
            loaded, reason, how = _load()
            _state.update(loaded=loaded, reason=reason, how=how, tried=True)
    return bool(_state["loaded"])


def is_available(device: torch.device | str | None = None) -> bool:
    """Whether the compiled ops can be used (building them just in time if needed).

    With ``device``, also whether kernels exist for that device type (``"cpu"`` or ``"cuda"``).
    """
    if not _ensure_loaded():
        return False
    if device is None:
        return True
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{_OP_NAMESPACE}::forward", key)


def unavailable_reason() -> str | None:
    """Why :func:`is_available` is False (``None`` when the backend is available)."""
    _ensure_loaded()
    return None if _state["loaded"] else str(_state["reason"])


def load_source() -> str | None:
    """How the ops were obtained (``"lsr_fused._C"``, ``"just-in-time build (CPU)"``, ...)."""
    _ensure_loaded()
    return _state["how"]  # type: ignore[return-value]


def _require() -> None:
    if not _ensure_loaded():
        raise RuntimeError(f"lsr_fused C++ backend unavailable: {_state['reason']}")


def cpu_capability() -> str:
    """The CPU kernel variant in use: ``"default"``, ``"avx2"`` or ``"avx512"``."""
    _require()
    return torch.ops.lsr_fused_C.cpu_capability()


def set_cpu_capability(name: str) -> str:
    """Select the CPU kernel variant (``"default"``, ``"avx2"``, ``"avx512"`` or ``"auto"``).

    Returns the previous one; raises ``ValueError`` when the variant is unsupported here. The
    initial choice is the best supported one, capped by ``$LSR_FUSED_CPU_CAPABILITY``.
    """
    _require()
    return torch.ops.lsr_fused_C.set_cpu_capability(name)


# The smallest buffer the pool serves (csrc/grad_pool.h): below it, empty_like without the op call.
_POOL_MIN_BYTES = 1 << 20


def empty_grad(logits: Tensor) -> Tensor:
    """A gradient buffer with the layout of ``torch.empty_like(logits)``: from the gradient pool on
    the CPU (for at least 1 MiB, while the pool is on), else ``torch.empty_like``."""
    if logits.device.type != "cpu" or logits.numel() * logits.element_size() < _POOL_MIN_BYTES:
        return torch.empty_like(logits)
    _require()
    return torch.ops.lsr_fused_C.empty_grad(logits)


_POOL_STATS = (
    "max_bytes",
    "cached_bytes",
    "cached_buffers",
    "outstanding_bytes",
    "outstanding_buffers",
    "hits",
    "misses",
)


def set_gradient_pool(max_bytes: int | None) -> int:
    """Bound the CPU gradient pool to ``max_bytes`` of released buffers; return the previous bound.

    ``0`` disables the pool (and unmaps what it holds); ``None`` restores the default
    (``$LSR_FUSED_GRAD_POOL_BYTES``, else 1 GiB). Buffers beyond a lower bound are unmapped now;
    gradients in use are unaffected (unmapped when released, if they no longer fit). A no-op
    returning 0 when the C++ backend is unavailable.
    """
    if max_bytes is None:
        value = -1
    else:
        # int(1.5) or int(True) would silently become a 1-byte bound: only integers are bytes.
        if isinstance(max_bytes, bool) or not hasattr(max_bytes, "__index__"):
            raise TypeError(
                f"max_bytes must be an int (bytes) or None, got {type(max_bytes).__name__}"
            )
        value = operator.index(max_bytes)
        if value < 0:
            raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes}")
    if not _ensure_loaded():
        return 0
    return int(torch.ops.lsr_fused_C.grad_pool_set_max_bytes(value))


def trim_gradient_pool() -> int:
    """Unmap every buffer the CPU gradient pool holds (the pool stays on); return the bytes given
    back to the system."""
    if not _ensure_loaded():
        return 0
    return int(torch.ops.lsr_fused_C.grad_pool_trim())


def gradient_pool_stats() -> dict[str, int]:
    """The CPU gradient pool now: ``max_bytes`` (the bound), ``cached_bytes`` / ``cached_buffers``
    (released buffers kept), ``outstanding_bytes`` / ``outstanding_buffers`` (pooled gradients
    alive), ``hits`` / ``misses`` (hand-outs that reused a buffer / mapped a new one). All zero when
    the C++ backend is unavailable."""
    if not _ensure_loaded():
        return dict.fromkeys(_POOL_STATS, 0)
    return dict(zip(_POOL_STATS, torch.ops.lsr_fused_C.grad_pool_stats(), strict=True))


def _decline_on_cuda(logits: Tensor, params: RowParams, mix: object, stats: object) -> None:
    """The CUDA C++ kernels implement none of issue 22's options: name the first one given."""
    if logits.device.type != "cuda":
        return
    for name, given in (
        ("softcap", params.softcap > 0),
        ("mix", mix is not None),
        ("stats", stats is not None),
    ):
        if given:
            raise NotImplementedError(
                f"{name} is not supported by the CUDA C++ kernels; use backend='triton' or 'torch'"
            )


def _kernel_options(params: RowParams, grad_logits, grad_guess, mix) -> tuple:
    """The arguments the two ``lsr_fused_C`` kernels take in the same order (csrc/ops.cpp's
    schemas): the scalars, the gradient output and its guess, the softcap and the mixed target."""
    mix_target, mix_lambda = (None, None) if mix is None else mix
    return (
        float(params.target_extra), float(params.other_mass), float(params.z_loss),
        int(params.ignore_index), grad_logits, grad_guess, float(params.softcap), mix_target,
        mix_lambda,
    )  # fmt: skip


def forward(logits, target, weight, weight_total, params, grad_logits=None, grad_guess=None, *,
            mix=None, stats=None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Per-row loss and saved lse of ``(B, S, C)`` logits (the contract of
    :mod:`lsr_fused.backends`); with ``grad_logits`` and ``grad_guess`` also the gradient for
    upstream ``grad_guess`` (CPU only).

    ``params.softcap > 0`` reads every logit as ``softcap * tanh(x / softcap)``. ``mix`` =
    ``(mix_target, mix_lambda)``: ``(B * S,)`` int64 ``y2`` and ``(B * S,)`` accumulation-dtype
    ``lam`` (any stride, 0 included): the target mass ``a - b`` is split ``lam`` to ``target`` and
    ``1 - lam`` to ``y2``. ``stats`` = ``(lse_out, argmax_out)``: ``(B * S,)`` accumulation-dtype
    and int64 outputs, written for every row: the absolute log-sum-exp and ``torch.argmax`` of the
    (capped) logits. On CUDA these options raise ``NotImplementedError``.
    """
    _require()
    _decline_on_cuda(logits, params, mix, stats)
    stats_lse, stats_argmax = (None, None) if stats is None else stats
    loss, lse = torch.ops.lsr_fused_C.forward(
        logits, target, weight, weight_total,
        *_kernel_options(params, grad_logits, grad_guess, mix), stats_lse, stats_argmax,
    )  # fmt: skip
    return loss, lse


def backward(grad_loss, logits, target, weight, weight_total, lse, params, grad_logits,
             grad_guess=None, *, mix=None) -> None:  # fmt: skip
    """Writes the gradient of :func:`forward`'s per-row loss for upstream ``grad_loss`` into
    ``grad_logits`` (which may be ``logits``); ``params.softcap`` and ``mix`` as in
    :func:`forward`. With ``grad_guess``, rows whose ``grad_loss`` equals it are left as the
    forward wrote them."""
    _require()
    _decline_on_cuda(logits, params, mix, None)
    torch.ops.lsr_fused_C.backward(
        grad_loss, logits, target, weight, weight_total, lse,
        *_kernel_options(params, grad_logits, grad_guess, mix),
    )  # fmt: skip
