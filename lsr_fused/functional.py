"""Policy layer: argument checks, layout canonicalisation, backend choice and the reduction.

Kernels live in :mod:`lsr_fused.backends` and see only a ``(B, S, C)`` row view; everything a user
can get wrong is caught here, before any kernel runs.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch
from torch import Tensor

from . import ops
from ._params import smoothing_masses
from ._validation import is_dense

REDUCTIONS = ("none", "sum", "mean")
SPREADS = ("all", "others")
BACKENDS = ("auto", "triton", "cpp", "torch")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

LOSS_DOC = r"""
    Per element with logits ``x`` (``C`` classes), target ``y``, class weights ``w`` (ones by
    default) and smoothing ``eps``, the smoothed target distribution is
    ``q_i = b + (a - b) [i == y]`` with

    * ``spread="all"`` (PyTorch's convention): ``a = 1 - eps + eps / C``, ``b = eps / C``
    * ``spread="others"`` (Inception-v3): ``a = 1 - eps``, ``b = eps / (C - 1)``

    and the loss is ``sum_i q_i w_i (logsumexp(x) - x_i) + z_loss * logsumexp(x) ** 2``; with
    ``spread="all"`` and ``z_loss=0`` this equals ``F.cross_entropy(..., label_smoothing=eps)``.
    Elements whose target is ``ignore_index`` contribute 0. ``reduction="mean"`` divides the sum by
    ``sum(w[y])`` over non-ignored elements (their count without weights): NaN when all are ignored.

    Shapes: logits ``(N, C)``, ``(C,)`` or ``(N, C, d1, ..., dk)``; target ``(N,)``, ``()`` or
    ``(N, d1, ..., dk)`` of int64/int32 class indices. Logits may be float16, bfloat16, float32 or
    float64 and non-contiguous. The loss is float32 (float64 for float64 logits), accumulated in
    float32; the gradient has the logits' dtype. No one-hot, log-prob or probability tensor of the
    logits' size is ever created.

    Args:
        label_smoothing: ``eps`` in ``[0, 1]``.
        ignore_index: target value whose elements are skipped.
        reduction: ``"none"`` (shape of target), ``"sum"`` or ``"mean"``.
        weight: optional ``(C,)`` floating class weights.
        spread: ``"all"`` or ``"others"`` (see above).
        z_loss: coefficient of the auxiliary ``logsumexp(x) ** 2`` term (PaLM), ``>= 0``.
        inplace_backward: write the gradient into the logits' storage during backward: no
            logits-sized allocation at all. The logits then hold the gradient; autograd raises if
            anything that saved them runs its backward afterwards. Ignored (a normal gradient is
            returned) for leaf logits, whose storage belongs to the caller.
        backend: ``"auto"`` (CUDA: Triton; CPU: the C++ extension, else ``"torch"``),
            ``"triton"``, ``"cpp"`` or ``"torch"``.
        process_group: a ``torch.distributed`` group over which the class dimension is sharded
            (vocabulary parallelism): ``logits`` hold this rank's contiguous slice of the classes,
            ``weight`` the matching slice, ``target`` global class indices. See
            :mod:`lsr_fused.distributed`.

    Targets outside ``[0, C)`` that are not ``ignore_index`` raise ``ValueError`` on the CPU; on
    CUDA they give a NaN loss unless :func:`lsr_fused.set_validation` turns on the (syncing) check.
"""


# Backend availability is a property of the installation, not of the tensors: torch.compile
# evaluates these once while tracing instead of tracing into imports and builds.
@torch.compiler.assume_constant_result
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_usable(device: torch.device) -> bool:
    if not _triton_installed():
        return False
    flag = os.environ.get("TRITON_INTERPRET", "").strip().lower()
    interpreted = flag in ("1", "true", "on", "yes")
    return device.type == "cuda" or interpreted


@torch.compiler.assume_constant_result
def _cpp_usable(device_type: str) -> bool:
    return ops.backend_module("cpp").is_available(device_type)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device``, in the order ``backend="auto"`` prefers them."""
    device = torch.device(device)
    names = []
    if _triton_usable(device):
        names.append("triton")
    if _cpp_usable(device.type):
        names.append("cpp")
    names.append("torch")
    if device.type == "cpu" and "triton" in names:
        # The interpreter is for testing; "auto" never picks it on the CPU.
        names.append(names.pop(0))
    return names


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        if device.type == "cuda" and _triton_usable(device):
            return "triton"
        return "cpp" if _cpp_usable(device.type) else "torch"
    if backend == "triton" and not _triton_usable(device):
        raise ValueError(
            "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors, and an "
            f"installed triton (logits are on {device})"
        )
    if backend == "cpp" and not _cpp_usable(device.type):
        reason = ops.backend_module("cpp").unavailable_reason()
        raise ValueError(f"backend='cpp' is unavailable: {reason}")
    return backend


def check_options(label_smoothing, ignore_index, reduction, spread, z_loss, backend) -> None:
    """Validate the scalar options (shared by the functional form and the module's constructor)."""
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a float, got {type(label_smoothing).__name__}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if isinstance(z_loss, bool) or not isinstance(z_loss, (int, float)):
        raise TypeError(f"z_loss must be a float, got {type(z_loss).__name__}")
    if not 0.0 <= float(z_loss) < float("inf"):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if spread not in SPREADS:
        raise ValueError(f"spread must be one of {SPREADS}, got {spread!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _check_tensors(logits, target, weight, spread) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a Tensor, got {type(logits).__name__}")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a Tensor, got {type(target).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"target must hold int64 or int32 class indices, got {target.dtype} (probability "
            "targets are not supported)"
        )
    if logits.dim() == 0:
        raise ValueError("logits must have at least 1 dimension (the classes), got a scalar")
    expected_target_shape = logits.shape[:1] + logits.shape[2:] if logits.dim() > 1 else ()
    if tuple(target.shape) != tuple(expected_target_shape):
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits shape "
            f"{tuple(logits.shape)}: expected {tuple(expected_target_shape)}"
        )
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    num_classes = logits.shape[1] if logits.dim() > 1 else logits.shape[0]
    if num_classes == 0:
        raise ValueError("logits must have at least one class (C == 0)")
    if spread == "others" and num_classes == 1:
        raise ValueError("spread='others' needs at least 2 classes (C == 1 leaves no other class)")
    if weight is not None:
        if not isinstance(weight, Tensor):
            raise TypeError(f"weight must be a Tensor or None, got {type(weight).__name__}")
        if not weight.is_floating_point():
            raise TypeError(f"weight must be floating point, got {weight.dtype}")
        if tuple(weight.shape) != (num_classes,):
            raise ValueError(
                f"weight must have shape ({num_classes},), one per class, got {tuple(weight.shape)}"
            )
        if weight.device != logits.device:
            raise ValueError(f"weight is on {weight.device} but logits are on {logits.device}")


def _row_view(logits: Tensor) -> Tensor:
    """A ``(B, S, C)`` view (a copy only for layouts that no strided view can express)."""
    if logits.dim() == 1:
        rows = logits.view(1, 1, -1)
    elif logits.dim() == 2:
        rows = logits.unsqueeze(1)
    else:
        rows = logits.movedim(1, -1).flatten(1, -2)
    # The kernels write the gradient with the logits' strides, which requires a dense layout.
    return rows if is_dense(rows) else rows.contiguous()


def label_smoothing_cross_entropy(
    logits: Tensor,
    target: Tensor,
    label_smoothing: float = 0.1,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    weight: Optional[Tensor] = None,
    spread: str = "all",
    z_loss: float = 0.0,
    inplace_backward: bool = False,
    backend: str = "auto",
    process_group: Optional[object] = None,
) -> Tensor:
    if process_group is not None:
        # The sharded path checks its options inside a collective exchange, so that one rank's
        # bad argument raises on every rank instead of leaving the others waiting.
        from .distributed import sharded_label_smoothing_cross_entropy

        return sharded_label_smoothing_cross_entropy(
            logits,
            target,
            label_smoothing,
            ignore_index=ignore_index,
            reduction=reduction,
            weight=weight,
            spread=spread,
            z_loss=z_loss,
            inplace_backward=inplace_backward,
            backend=backend,
            process_group=process_group,
        )
    check_options(label_smoothing, ignore_index, reduction, spread, z_loss, backend)
    _check_tensors(logits, target, weight, spread)
    backend = _resolve_backend(backend, logits.device)
    rows = _row_view(logits)
    num_classes = rows.shape[-1]
    flat_target = target.reshape(-1).to(torch.int64)
    target_extra, other_mass = smoothing_masses(float(label_smoothing), num_classes, spread)
    acc_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    weight_total = None
    if weight is not None:
        weight = weight.to(acc_dtype).contiguous()
        weight_total = weight.sum().reshape(1)
    # In place needs storage we own: a leaf's data belongs to the caller (and its .grad would
    # alias it), so leaves always get a fresh gradient.
    inplace = bool(inplace_backward) and not (logits.is_leaf and logits.requires_grad)
    scalars = (target_extra, other_mass, float(z_loss), ignore_index, backend)
    denominator = None
    if reduction == "mean":
        denominator = _mean_denominator(flat_target, weight, ignore_index, num_classes, acc_dtype)
    training = torch.is_grad_enabled() and logits.requires_grad
    if (
        training
        and not inplace
        and reduction != "none"
        and ops.writes_grad_in_forward(backend, logits.device.type)
    ):
        # The upstream gradient of each row is 1 / denominator (mean) or 1 (sum) when the caller
        # runs loss.backward(); the forward pass writes the gradient for that value right away.
        # Computed as autograd's DivBackward will (ones / denominator): the two are bitwise equal.
        grad_guess = torch.ones(1, dtype=acc_dtype, device=logits.device)
        if denominator is not None:
            grad_guess = grad_guess / denominator
        loss, _, _ = ops.fused_forward_with_grad(
            rows, flat_target, weight, weight_total, grad_guess, *scalars
        )
    else:
        loss, _ = ops.fused_forward(rows, flat_target, weight, weight_total, *scalars, inplace)
    if reduction == "none":
        return loss.view(target.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / denominator


def _mean_denominator(
    flat_target: Tensor,
    weight: Optional[Tensor],
    ignore_index: int,
    num_classes: int,
    acc_dtype: torch.dtype,
) -> Tensor:
    """Sum of ``weight[target]`` over non-ignored elements (their count without weights)."""
    counted = flat_target != ignore_index
    if weight is None:
        return counted.sum(dtype=acc_dtype)
    # Clamped so that a bad target cannot index out of bounds; its loss is NaN anyway.
    safe_target = flat_target.clamp(0, num_classes - 1)
    return (weight.gather(0, safe_target) * counted).sum()


label_smoothing_cross_entropy.__doc__ = (
    "Label-smoothed cross-entropy fused with log-softmax (a drop-in for\n"
    "    ``F.cross_entropy(logits, target, label_smoothing=...)``).\n" + LOSS_DOC
)
