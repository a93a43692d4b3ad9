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

from . import ops
from ._params import accumulation_dtype as accumulation_dtype  # the rule, re-exported
from ._validation import is_dense

REDUCTIONS = ("none", "sum", "mean")
SPREADS = ("all", "others")
BACKENDS = ("auto", "triton", "cpp", "torch")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# Backend availability is a property of the installation, not of the tensors: torch.compile
# evaluates these once while tracing instead of tracing into imports and builds.
@torch.compiler.assume_constant_result
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_usable(device: torch.device) -> bool:
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
    if sharded:
        if backend == "triton" or (backend == "auto" and device.type == "cuda"):
            if triton_usable(device):
                return "triton"
            if backend == "triton":
                raise ValueError(
                    "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors, "
                    f"and an installed triton (logits are on {device})"
                )
        return "torch"
    if backend == "auto":
        if device.type == "cuda" and triton_usable(device):
            return "triton"
        return "cpp" if _cpp_usable(device.type) else "torch"
    if backend == "triton" and not triton_usable(device):
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


def check_tensors(logits, target, weight, spread, *, shard: bool = False) -> None:
    """Validate logits, target and class weights; ``shard``: the logits hold this rank's slice
    of the classes (so ``C`` is only known after the ranks' exchange)."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a Tensor, got {type(logits).__name__}")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a Tensor, got {type(target).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
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
    # A shard may be empty, and C is the sum over ranks: those two checks follow the exchange.
    if num_classes == 0 and not shard:
        raise ValueError("logits must have at least one class (C == 0)")
    if spread == "others" and num_classes == 1 and not shard:
        raise ValueError("spread='others' needs at least 2 classes (C == 1 leaves no other class)")
    if weight is not None:
        if not isinstance(weight, Tensor):
            raise TypeError(f"weight must be a Tensor or None, got {type(weight).__name__}")
        if not weight.is_floating_point():
            raise TypeError(f"weight must be floating point, got {weight.dtype}")
        if tuple(weight.shape) != (num_classes,):
            what = "this rank's slice of the class weights" if shard else "one per class"
            raise ValueError(
                f"weight must have shape ({num_classes},), {what}, got {tuple(weight.shape)}"
            )
        if weight.device != logits.device:
            raise ValueError(f"weight is on {weight.device} but logits are on {logits.device}")


def row_view(logits: Tensor) -> Tensor:
    """A ``(B, S, C)`` view (a copy only for layouts that no strided view can express)."""
    if logits.dim() == 1:
        rows = logits.view(1, 1, -1)
    elif logits.dim() == 2:
        rows = logits.unsqueeze(1)
    else:
        rows = logits.movedim(1, -1).flatten(1, -2)
    # The kernels write the gradient with the logits' strides, which requires a dense layout.
    return rows if is_dense(rows) else rows.contiguous()


def mean_denominator(
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


def reduce(loss: Tensor, target_shape, reduction: str, denominator: Optional[Tensor]) -> Tensor:
    """Apply ``reduction`` to per-element losses ``(rows,)``; ``denominator`` for ``"mean"``."""
    if reduction == "none":
        return loss.view(target_shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / denominator
