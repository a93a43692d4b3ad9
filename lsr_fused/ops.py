"""Registration of the fused kernels as torch custom ops, with fake implementations and autograd.

Three ops, all over a ``(B, S, C)`` row view of the logits (see :mod:`lsr_fused.backends`):

* ``lsr_fused::forward``    -> ``(loss, lse)`` per row
* ``lsr_fused::backward``   -> a new gradient tensor
* ``lsr_fused::backward_``  -> writes the gradient into the logits (``inplace_backward=True``)

Being custom ops, they are opaque to ``torch.compile`` (no graph break, no tracing into Triton) and
free of host synchronisation, so CUDA graphs can capture them.
"""

from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from ._params import RowParams
from ._validation import check_targets


def backend_module(name: str) -> ModuleType:
    """The module implementing backend ``name`` (imported on first use: Triton is optional)."""
    if name == "triton":
        from .backends import triton_backend

        return triton_backend
    if name == "cpp":
        from .backends import cpp_backend

        return cpp_backend
    from .backends import torch_backend

    return torch_backend


def _accumulation_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


@torch.library.custom_op("lsr_fused::forward", mutates_args=())
def fused_forward(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    weight_total: Optional[Tensor],
    target_extra: float,
    other_mass: float,
    z_loss: float,
    ignore_index: int,
    backend: str,
    inplace_backward: bool,
) -> tuple[Tensor, Tensor]:
    """Per-row label-smoothed cross-entropy and log-sum-exp; see :mod:`lsr_fused.backends`."""
    check_targets(target, logits.shape[-1], ignore_index)
    params = RowParams(target_extra, other_mass, z_loss, ignore_index)
    return backend_module(backend).forward(logits, target, weight, weight_total, params)


@fused_forward.register_fake
def _(
    logits,
    target,
    weight,
    weight_total,
    target_extra,
    other_mass,
    z_loss,
    ignore_index,
    backend,
    inplace_backward,
):
    rows = logits.shape[0] * logits.shape[1]
    acc = _accumulation_dtype(logits)
    return logits.new_empty(rows, dtype=acc), logits.new_empty(rows, dtype=acc)


@torch.library.custom_op("lsr_fused::backward", mutates_args=())
def fused_backward(
    grad_loss: Tensor,
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    weight_total: Optional[Tensor],
    lse: Tensor,
    target_extra: float,
    other_mass: float,
    z_loss: float,
    ignore_index: int,
    backend: str,
) -> Tensor:
    """Gradient of the per-row losses with respect to the logits, as a new tensor."""
    # empty_like keeps the strides of a dense tensor, which the kernels rely on.
    grad_logits = torch.empty_like(logits)
    params = RowParams(target_extra, other_mass, z_loss, ignore_index)
    backend_module(backend).backward(
        grad_loss, logits, target, weight, weight_total, lse, params, grad_logits
    )
    return grad_logits


@fused_backward.register_fake
def _(
    grad_loss,
    logits,
    target,
    weight,
    weight_total,
    lse,
    target_extra,
    other_mass,
    z_loss,
    ignore_index,
    backend,
):
    return torch.empty_like(logits)


@torch.library.custom_op("lsr_fused::backward_", mutates_args=("logits",))
def fused_backward_inplace(
    grad_loss: Tensor,
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    weight_total: Optional[Tensor],
    lse: Tensor,
    target_extra: float,
    other_mass: float,
    z_loss: float,
    ignore_index: int,
    backend: str,
) -> None:
    """Same as ``lsr_fused::backward`` but overwrites ``logits`` with the gradient."""
    params = RowParams(target_extra, other_mass, z_loss, ignore_index)
    backend_module(backend).backward(
        grad_loss, logits, target, weight, weight_total, lse, params, logits
    )


@fused_backward_inplace.register_fake
def _(
    grad_loss,
    logits,
    target,
    weight,
    weight_total,
    lse,
    target_extra,
    other_mass,
    z_loss,
    ignore_index,
    backend,
):
    return None


def _setup_context(ctx, inputs, output) -> None:
    (
        logits,
        target,
        weight,
        weight_total,
        target_extra,
        other_mass,
        z_loss,
        ignore_index,
        backend,
        inplace_backward,
    ) = inputs
    ctx.save_for_backward(logits, target, weight, weight_total, output[1])
    ctx.scalars = (target_extra, other_mass, z_loss, ignore_index, backend)
    ctx.inplace_backward = inplace_backward


def _backward(ctx, grad_loss: Tensor, grad_lse: Optional[Tensor]):
    logits, target, weight, weight_total, lse = ctx.saved_tensors
    no_grads = (None,) * 9
    if grad_loss is None:
        return (None, *no_grads)
    if ctx.inplace_backward:
        torch.ops.lsr_fused.backward_(
            grad_loss, logits, target, weight, weight_total, lse, *ctx.scalars
        )
        # The op declares that it mutates `logits`, which bumps their version counter: any other
        # autograd node that saved these logits now fails loudly instead of reading a gradient.
        return (logits, *no_grads)
    grad_logits = torch.ops.lsr_fused.backward(
        grad_loss, logits, target, weight, weight_total, lse, *ctx.scalars
    )
    return (grad_logits, *no_grads)


fused_forward.register_autograd(_backward, setup_context=_setup_context)
