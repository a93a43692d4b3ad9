"""Policy: everything between a user's call and a backend, written once for every entry point.

The local loss (:mod:`lsr_fused.functional`), the vocabulary-parallel loss
(:mod:`lsr_fused.distributed`) and the fused classifier + loss (:mod:`lsr_fused.linear`) all use
these rules: option and tensor checks that name the argument, the backend choice, the ``(B, S, C)``
row view the kernels read, the accumulation dtype and the reduction. Kernels live in
:mod:`lsr_fused.backends` and see only row views; custom ops live in :mod:`lsr_fused.ops`.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch
from torch import Tensor

from . import composite, ops
from ._params import accumulation_dtype as accumulation_dtype  # the rule, re-exported
from ._validation import is_dense
from .errors import ArgumentTypeError, ArgumentValueError
from .options import BACKENDS as BACKENDS  # re-exported: the option tables live there
from .options import REDUCTIONS as REDUCTIONS
from .options import SPREADS as SPREADS
from .options import loss_options

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# Backend availability is a property of the installation, not of the tensors: each answer is
# computed once (a dict lookup afterwards: this is on every call's path), and torch.compile takes
# it as a constant instead of tracing into imports and builds.
_INSTALLATION: dict[tuple[str, str], bool] = {}


def _constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing ``torch._dynamo`` (1.5 s) at
    import time: the decorator only sets this attribute, which the compiler reads when tracing."""
    fn._dynamo_marked_constant = True
    return fn


def _installed(what: str, device_type: str, probe) -> bool:
    key = (what, device_type)
    answer = _INSTALLATION.get(key)
    if answer is None:
        answer = _INSTALLATION[key] = bool(probe())
    return answer


@_constant_result
def _triton_installed() -> bool:
    return _installed("triton", "", lambda: importlib.util.find_spec("triton") is not None)


def triton_usable(device: torch.device) -> bool:
    """Triton can run on ``device``: compiled on CUDA (where CUDA is available), interpreted on
    the CPU under ``TRITON_INTERPRET=1`` (read at call time, as Triton itself reads it)."""
    if not _triton_installed():
        return False
    if device.type == "cuda":
        return _cuda_available()
    flag = os.environ.get("TRITON_INTERPRET", "").strip().lower()
    return device.type == "cpu" and flag in ("1", "true", "on", "yes")


@_constant_result
def _cuda_available() -> bool:
    return _installed("cuda", "cuda", torch.cuda.is_available)


@_constant_result
def _cpp_usable(device_type: str) -> bool:
    return _installed(
        "cpp", device_type, lambda: ops.backend_module("cpp").is_available(device_type)
    )


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device``, in the order ``backend="auto"`` prefers them."""
    device = torch.device(device)
    names = []
    if triton_usable(device):
        names.append("triton")
    if _cpp_usable(device.type):
        names.append("cpp")
    names.append("torch")
    if device.type == "cpu" and "triton" in names:
        # The interpreter is for testing; "auto" never picks it on the CPU.
        names.append(names.pop(0))
    return names


def resolve_backend(backend: str, device: torch.device, *, sharded: bool = False) -> str:
    """The backend that runs ``backend`` (``"auto"`` resolved) on ``device``, or ``ValueError``.

    ``"auto"`` prefers Triton on CUDA, then the C++ extension (its CUDA kernels on CUDA, its CPU
    kernels on the CPU), then pure PyTorch. The vocabulary-parallel loss (``sharded``) has Triton
    and torch kernels only: there ``"cpp"`` and ``"auto"`` off CUDA run ``"torch"``.
    """
    if backend == "triton" and not triton_usable(device):
        raise ArgumentValueError(
            "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors, and an "
            f"installed triton (the tensors are on {device})"
        )
    if backend == "auto" and device.type == "cuda" and triton_usable(device):
        return "triton"
    if sharded:
        return "triton" if backend == "triton" else "torch"
    if backend == "auto":
        return "cpp" if _cpp_usable(device.type) else "torch"
    if backend == "cpp" and not _cpp_usable(device.type):
        reason = ops.backend_module("cpp").unavailable_reason()
        raise ArgumentValueError(f"backend='cpp' is unavailable: {reason}")
    return backend


def check_options(label_smoothing, ignore_index, reduction, spread, z_loss, backend) -> None:
    """Validate the scalar options (the checks of :class:`lsr_fused.options.LossOptions`)."""
    loss_options(
        label_smoothing, ignore_index, reduction, spread, z_loss, None, False, False, backend
    )


def check_reduce_hidden_grad(reduce_hidden_grad) -> None:
    """The fused head's ``reduce_hidden_grad`` switch must be a bool (a truthy tensor or string
    would silently pick a gradient convention)."""
    if not isinstance(reduce_hidden_grad, bool):
        raise ArgumentTypeError(
            f"reduce_hidden_grad must be a bool, got {type(reduce_hidden_grad).__name__}"
        )


def check_target_dtype(target: Tensor, name: str = "target") -> None:
    """Targets are class indices of any integer dtype (uint8 as PyTorch accepts, int32, int64,
    ...); floating targets would be class probabilities, which these losses do not take."""
    dtype = target.dtype
    if dtype.is_floating_point or dtype.is_complex:
        raise ArgumentTypeError(
            f"{name} must hold integer class indices, got {dtype}: class-probability (soft) "
            "targets are not supported"
        )
    if dtype == torch.bool:
        raise ArgumentTypeError(f"{name} must hold integer class indices, got torch.bool")


def check_tensors(logits, target, weight, spread, *, shard: bool = False) -> None:
    """Validate logits, target and class weights; ``shard``: the logits hold this rank's slice
    of the classes (so ``C`` is only known after the ranks' exchange)."""
    if not isinstance(logits, Tensor):
        raise ArgumentTypeError(f"logits must be a Tensor, got {type(logits).__name__}")
    if not isinstance(target, Tensor):
        raise ArgumentTypeError(f"target must be a Tensor, got {type(target).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise ArgumentTypeError(
            f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}"
        )
    check_target_dtype(target)
    if logits.dim() == 0:
        raise ArgumentValueError(
            "logits must have at least 1 dimension (the classes), got a scalar"
        )
    expected_target_shape = logits.shape[:1] + logits.shape[2:] if logits.dim() > 1 else ()
    if tuple(target.shape) != tuple(expected_target_shape):
        hint = ""
        if logits.dim() >= 3 and tuple(target.shape) == tuple(logits.shape[:-1]):
            # The language-model layout (B, T, V): classes last, where PyTorch wants them second.
            hint = (
                "; for (B, T, V) logits with classes last, pass logits.flatten(0, -2) and "
                "target.flatten(), or logits.movedim(-1, 1)"
            )
        raise ArgumentValueError(
            f"target shape {tuple(target.shape)} does not match logits shape "
            f"{tuple(logits.shape)}: expected {tuple(expected_target_shape)}{hint}"
        )
    if target.device != logits.device:
        raise ArgumentValueError(f"target is on {target.device} but logits are on {logits.device}")
    num_classes = logits.shape[1] if logits.dim() > 1 else logits.shape[0]
    # A shard may be empty, and C is the sum over ranks: those two checks follow the exchange.
    if num_classes == 0 and not shard:
        raise ArgumentValueError("logits must have at least one class (C == 0)")
    if spread == "others" and num_classes == 1 and not shard:
        raise ArgumentValueError(
            "spread='others' needs at least 2 classes (C == 1 leaves no other class)"
        )
    if weight is not None:
        if not isinstance(weight, Tensor):
            raise ArgumentTypeError(f"weight must be a Tensor or None, got {type(weight).__name__}")
        if not weight.is_floating_point():
            raise ArgumentTypeError(f"weight must be floating point, got {weight.dtype}")
        if tuple(weight.shape) != (num_classes,):
            what = "this rank's slice of the class weights" if shard else "one per class"
            raise ArgumentValueError(
                f"weight must have shape ({num_classes},), {what}, got {tuple(weight.shape)}"
            )
        if weight.device != logits.device:
            raise ArgumentValueError(
                f"weight is on {weight.device} but logits are on {logits.device}"
            )


def row_view(logits: Tensor) -> Tensor:
    """A ``(B, S, C)`` view (a copy only for layouts that no strided view can express)."""
    if logits.dim() == 1:
        rows = logits.view(1, 1, -1)
    elif logits.dim() == 2:
        rows = logits.unsqueeze(1)
    else:
        rows = logits.movedim(1, -1).flatten(1, -2)
    # Kept as a view when every element has its own memory and the gradient (empty_like: the same
    # strides when dense, else contiguous) shares its class stride: a slice of a padded vocabulary
    # (unit class stride, gaps between rows) is read in place instead of copied.
    unit_class_stride = rows.stride(-1) == 1 or rows.shape[-1] == 1
    if not is_dense(rows, allow_gaps=unit_class_stride):
        rows = rows.contiguous()
    batch, inner = rows.shape[0], rows.shape[1]
    if inner > 1 and rows.stride(0) == inner * rows.stride(1):
        # Rows evenly spaced (a (B, S, C) tensor seen as (B, C, S)): one row dimension.
        return rows.flatten(0, 1).unsqueeze(1)
    if inner > 1 and batch > _MAX_OUTER_ROWS:
        # The Triton kernels address (B, S) rows by a (S, B) grid, whose second dimension holds
        # at most 65535 programs; such a view is rare, and its copy has evenly spaced rows.
        return rows.contiguous().flatten(0, 1).unsqueeze(1)
    return rows


# See row_view (lsr_fused.backends.triton_common.MAX_GRID_Y, without importing Triton here).
_MAX_OUTER_ROWS = 65535


def check_sharded_autograd(class_weight: Optional[Tensor], name: str) -> None:
    """What the vocabulary-parallel forms do not differentiate, refused (inside their agreement
    exchange, so that every rank raises): class weights that require grad."""
    if class_weight is not None and class_weight.requires_grad and torch.is_grad_enabled():
        raise ArgumentValueError(
            f"{name} requires grad, which process_group= does not support (its gradient would "
            f"be silently missing); pass {name}.detach(), or call without process_group"
        )


def refuse_forward_ad() -> None:
    """The vocabulary-parallel forms have no forward-mode AD (their autograd Functions have no
    tangent formula): refused inside their agreement exchange, so that every rank raises, instead
    of outputs that silently carry no tangent."""
    if composite.forward_ad_active():
        raise ArgumentValueError(
            "forward-mode AD (a torch.autograd.forward_ad.dual_level) is not supported with "
            "process_group=: the loss would carry no tangent; call without process_group"
        )


def refuse_double_backward(what: str) -> None:
    """Raise in a backward pass run with ``create_graph=True`` that cannot build a graph."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"double backward (create_graph=True) is not supported by {what}; the first-order "
            "gradient would have no graph"
        )


def flat_targets(target: Tensor) -> Tensor:
    """``target`` as the kernels read it: ``(rows,)`` int64, contiguous (a strided, expanded or
    offset view is copied; that is ``rows`` integers, never logits-sized)."""
    return target.reshape(-1).to(torch.int64).contiguous()


def may_overwrite(logits: Tensor) -> bool:
    """Whether ``inplace_backward`` may write the gradient into ``logits``' storage: not when
    that storage belongs to a leaf the caller holds (``logits`` is the leaf, or a view of it:
    ``p[:, :]``, ``p.view(...)``), whose data the caller still owns and whose ``.grad`` would
    alias it. Everything else is an intermediate result autograd tracks (version counter)."""
    base = logits if logits._base is None else logits._base
    return not base.is_leaf


def class_weights(
    weight: Optional[Tensor], acc_dtype: torch.dtype
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Class weights as the kernels read them: contiguous, in the accumulation dtype, with their
    ``(1,)`` sum kept as a tensor (CUDA callers never read it on the host). ``(None, None)``
    without weights."""
    if weight is None:
        return None, None
    weight = weight.to(acc_dtype).contiguous()
    return weight, weight.sum().reshape(1)


def mix_inputs(
    mix_target: Optional[Tensor], mix_lambda, target: Tensor, acc_dtype: torch.dtype
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The mixed target as the kernels read it: ``(rows,)`` int64 classes and ``(rows,)``
    ``lam`` in the accumulation dtype (a float broadcast with stride 0), or ``(None, None)``.

    ``mix_lambda`` is a float in ``[0, 1]`` or a floating tensor of the target's shape (or 0-d);
    a tensor's values are not examined (that would synchronize with the device)."""
    if mix_target is None:
        if not (_is_python_number(mix_lambda) and float(mix_lambda) == 1.0):
            raise ArgumentValueError("mix_lambda is given without mix_target; pass both or neither")
        return None, None
    if not isinstance(mix_target, Tensor):
        raise ArgumentTypeError(
            f"mix_target must be a Tensor or None, got {type(mix_target).__name__}"
        )
    check_target_dtype(mix_target, "mix_target")
    if tuple(mix_target.shape) != tuple(target.shape):
        raise ArgumentValueError(
            f"mix_target shape {tuple(mix_target.shape)} does not match target shape "
            f"{tuple(target.shape)}"
        )
    if mix_target.device != target.device:
        raise ArgumentValueError(
            f"mix_target is on {mix_target.device} but target is on {target.device}"
        )
    rows = target.numel()
    if _is_python_number(mix_lambda):
        if not 0.0 <= float(mix_lambda) <= 1.0:
            raise ArgumentValueError(f"mix_lambda must be in [0, 1], got {mix_lambda}")
        lam = torch.full((1,), float(mix_lambda), dtype=acc_dtype, device=target.device)
        return flat_targets(mix_target), lam.expand(rows)
    if not isinstance(mix_lambda, Tensor):
        raise ArgumentTypeError(
            f"mix_lambda must be a float or a Tensor, got {type(mix_lambda).__name__}"
        )
    if not mix_lambda.is_floating_point():
        raise ArgumentTypeError(f"mix_lambda must be floating point, got {mix_lambda.dtype}")
    if mix_lambda.dim() != 0 and tuple(mix_lambda.shape) != tuple(target.shape):
        raise ArgumentValueError(
            f"mix_lambda must be a float, a 0-d tensor or a tensor of the target's shape "
            f"{tuple(target.shape)}, got shape {tuple(mix_lambda.shape)}"
        )
    if mix_lambda.device != target.device:
        raise ArgumentValueError(
            f"mix_lambda is on {mix_lambda.device} but target is on {target.device}"
        )
    lam = mix_lambda.to(acc_dtype)
    lam = lam.reshape(1).expand(rows) if lam.dim() == 0 else lam.reshape(-1)
    return flat_targets(mix_target), lam


def _is_python_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def mean_denominator(
    flat_target: Tensor,
    weight: Optional[Tensor],
    ignore_index: int,
    num_classes: int,
    acc_dtype: torch.dtype,
    mix: tuple[Optional[Tensor], Optional[Tensor]] = (None, None),
) -> Tensor:
    """Sum of ``weight[target]`` over non-ignored elements (their count without weights); with a
    mixed target ``(y2, lam)``, of ``lam w[y1] + (1 - lam) w[y2]``."""
    counted = flat_target != ignore_index
    if weight is None:
        return counted.sum(dtype=acc_dtype)
    # Clamped so that a bad target cannot index out of bounds; its loss is NaN anyway.
    target_weight = weight.gather(0, flat_target.clamp(0, num_classes - 1))
    mix_target, mix_lambda = mix
    if mix_target is not None:
        mix_weight = weight.gather(0, mix_target.clamp(0, num_classes - 1))
        target_weight = mix_lambda * target_weight + (1.0 - mix_lambda) * mix_weight
    return (target_weight * counted).sum()


def reduce(loss: Tensor, target_shape, reduction: str, denominator: Optional[Tensor]) -> Tensor:
    """Apply ``reduction`` to per-element losses ``(rows,)``; ``denominator`` for ``"mean"``."""
    if reduction == "none":
        return loss.view(target_shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / denominator


# ---------------------------------------------------------------------------------------------
# The fused classifier + loss (lsr_fused.linear, lsr_fused.linear_distributed).

# Beyond this many bytes of float32 (N, C) logits, the default chunk holds at most 1/8 of them.
_FULL_LOGITS_LIMIT = 256 << 20
_CHUNK_FRACTION = 8
# ... and never more than this many bytes, whatever N.
_CHUNK_MAX_BYTES = 256 << 20
# A chunk of at least this many rows is rounded down to a multiple of it (GEMM-friendly).
_CHUNK_ALIGN = 64


def default_chunk_size(rows: int, num_classes: int, dtype: torch.dtype) -> int:
    """Rows per chunk for ``rows`` x ``num_classes`` logits of ``dtype`` (the memory rule).

    Up to 256 MiB of float32 ``(N, C)`` logits, one chunk (the unfused path would hold that much
    too). Beyond, a chunk takes at most 1/8 of that float32 size and at most 256 MiB.
    """
    rows = max(int(rows), 1)
    num_classes = max(int(num_classes), 1)
    full_fp32 = rows * num_classes * 4
    if full_fp32 <= _FULL_LOGITS_LIMIT:
        return rows
    budget = min(full_fp32 // _CHUNK_FRACTION, _CHUNK_MAX_BYTES)
    chunk = max(1, budget // (num_classes * dtype.itemsize))
    if chunk >= _CHUNK_ALIGN:
        chunk -= chunk % _CHUNK_ALIGN
    return min(chunk, rows)


def check_linear_tensors(hidden, weight, bias, target, class_weight, chunk_size, autocast) -> None:
    """Validate the fused classifier + loss's tensors (``autocast``: dtypes are cast later)."""
    if not isinstance(hidden, Tensor):
        raise ArgumentTypeError(f"hidden must be a Tensor, got {type(hidden).__name__}")
    if not isinstance(weight, Tensor):
        raise ArgumentTypeError(f"weight must be a Tensor, got {type(weight).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise ArgumentTypeError(f"bias must be a Tensor or None, got {type(bias).__name__}")
    if not isinstance(target, Tensor):
        raise ArgumentTypeError(f"target must be a Tensor, got {type(target).__name__}")
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in FLOAT_DTYPES:
            raise ArgumentTypeError(
                f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}"
            )
    if not autocast:
        if weight.dtype != hidden.dtype:
            raise ArgumentTypeError(
                f"hidden and weight must have the same dtype, got hidden {hidden.dtype} and "
                f"weight {weight.dtype}"
            )
        if bias is not None and bias.dtype != weight.dtype:
            raise ArgumentTypeError(
                f"bias must have the dtype of weight ({weight.dtype}), got {bias.dtype}"
            )
    if hidden.dim() < 1:
        raise ArgumentValueError(
            "hidden must have at least 1 dimension (the features), got a scalar"
        )
    if weight.dim() != 2:
        raise ArgumentValueError(f"weight must be 2-D (C, H), got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ArgumentValueError(
            f"weight has {weight.shape[1]} input features but hidden has {hidden.shape[-1]} "
            f"(weight shape {tuple(weight.shape)}, hidden shape {tuple(hidden.shape)})"
        )
    if weight.device != hidden.device:
        raise ArgumentValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        if tuple(bias.shape) != (weight.shape[0],):
            raise ArgumentValueError(
                f"bias must have shape ({weight.shape[0]},), one per class, got {tuple(bias.shape)}"
            )
        if bias.device != hidden.device:
            raise ArgumentValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ArgumentValueError(
            f"target shape {tuple(target.shape)} does not match hidden shape "
            f"{tuple(hidden.shape)}: expected {tuple(hidden.shape[:-1])}"
        )
    check_chunk_size(chunk_size)
    check_target_dtype(target)
    if target.device != hidden.device:
        raise ArgumentValueError(f"target is on {target.device} but hidden is on {hidden.device}")
    _check_class_weight(class_weight, weight.shape[0], hidden.device)


def check_chunk_size(chunk_size) -> None:
    """The fused head's ``chunk_size``: an int >= 1, or None (the default rule); the one check of
    the local and the vocabulary-parallel forms."""
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise ArgumentTypeError(
            f"chunk_size must be an int or None, got {type(chunk_size).__name__}"
        )
    if chunk_size < 1:
        raise ArgumentValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _check_class_weight(class_weight, num_classes: int, device: torch.device) -> None:
    if class_weight is None:
        return
    if not isinstance(class_weight, Tensor):
        raise ArgumentTypeError(
            f"class_weight must be a Tensor or None, got {type(class_weight).__name__}"
        )
    if not class_weight.is_floating_point():
        raise ArgumentTypeError(f"class_weight must be floating point, got {class_weight.dtype}")
    if tuple(class_weight.shape) != (num_classes,):
        raise ArgumentValueError(
            f"class_weight must have shape ({num_classes},), one per class, got "
            f"{tuple(class_weight.shape)}"
        )
    if class_weight.device != device:
        raise ArgumentValueError(
            f"class_weight is on {class_weight.device} but hidden is on {device}"
        )
