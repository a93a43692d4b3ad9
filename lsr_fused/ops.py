"""Registration of the fused kernels as torch custom ops, with fake implementations and autograd.

All ops work on a ``(B, S, C)`` row view of the logits (see :mod:`lsr_fused.backends`):

* ``lsr_fused::forward``            -> ``(loss, lse)`` per row
* ``lsr_fused::forward_with_grad``  -> ``(loss, lse, grad)``: a training step's forward that also
  writes the gradient for an expected upstream value ``grad_guess`` (Triton backend)
* ``lsr_fused::backward``           -> a new gradient tensor
* ``lsr_fused::backward_``          -> writes the gradient into the logits (``inplace_backward``)
* ``lsr_fused::redo_gradient_``     -> rewrites, in a ``forward_with_grad`` gradient, the rows
  whose real upstream differs from the guess (none, usually: then it touches no memory)

Being custom ops, they are opaque to ``torch.compile`` (no graph break, no tracing into Triton) and
free of host synchronisation, so CUDA graphs can capture them. This is the one op layer between
autograd and the backends: the C++ extension's ``lsr_fused_C::*`` ops are kernel entry points of
the ``"cpp"`` backend, called from inside these ops only. (The fused classifier + loss registers its
ops the same way, in :mod:`lsr_fused.linear`.)

The vocabulary-parallel forms (:mod:`lsr_fused.distributed`, :mod:`lsr_fused.linear_distributed`)
use ``torch.autograd.Function`` instead, on purpose: their forward runs collectives on a
``ProcessGroup`` object and raises agreement errors on every rank, and a custom op's schema can
carry neither the group nor that control flow. They run eagerly (``torch.compile`` breaks the graph
around them), as torch.distributed code generally does.
"""

from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from . import composite
from ._params import RowParams, accumulation_dtype
from ._validation import check_targets


def backend_module(name: str) -> ModuleType:
    """The module of :mod:`lsr_fused.backends` implementing backend ``name`` (imported on first use:
    Triton is optional). Plain imports, not ``importlib``, so that torch.compile traces through."""
    if name == "triton":
        from .backends import triton_backend

        return triton_backend
    if name == "triton_sharded":
        from .backends import triton_sharded

        return triton_sharded
    if name == "cpp":
        from .backends import cpp_backend

        return cpp_backend
    from .backends import torch_backend

    return torch_backend


def writes_grad_in_forward(backend: str, device_type: str) -> bool:
    """Whether ``backend`` can write the gradient during the forward pass on ``device_type``."""
    return device_type in getattr(backend_module(backend), "WRITES_GRAD_IN_FORWARD", ())


def new_gradient(logits: Tensor, backend: str) -> Tensor:
    """A logits-sized gradient buffer (``torch.empty_like`` layout) from ``backend``'s allocator
    when it has one (the C++ backend's CPU gradient pool), else ``torch.empty_like``."""
    make = getattr(backend_module(backend), "empty_grad", None)
    return torch.empty_like(logits) if make is None else make(logits)


def _row_outputs(logits: Tensor) -> tuple[Tensor, Tensor]:
    rows = logits.shape[0] * logits.shape[1]
    acc = accumulation_dtype(logits.dtype)
    return logits.new_empty(rows, dtype=acc), logits.new_empty(rows, dtype=acc)


# The scalar tail shared by every op: (target_extra, other_mass, z_loss, ignore_index, backend).
# fmt: off
@torch.library.custom_op("lsr_fused::forward", mutates_args=())
def fused_forward(
    logits: Tensor, target: Tensor, weight: Optional[Tensor], weight_total: Optional[Tensor],
    target_extra: float, other_mass: float, z_loss: float, ignore_index: int, backend: str,
    inplace_backward: bool,
) -> tuple[Tensor, Tensor]:
    """Per-row label-smoothed cross-entropy and log-sum-exp; see :mod:`lsr_fused.backends`."""
    check_targets(target, logits.shape[-1], ignore_index)
    params = RowParams(target_extra, other_mass, z_loss, ignore_index)
    return backend_module(backend).forward(logits, target, weight, weight_total, params)


@fused_forward.register_fake
def _(logits, target, weight, weight_total, *scalars):
    return _row_outputs(logits)


@torch.library.custom_op("lsr_fused::forward_with_grad", mutates_args=())
def fused_forward_with_grad(
    logits: Tensor, target: Tensor, weight: Optional[Tensor], weight_total: Optional[Tensor],
    grad_guess: Tensor, target_extra: float, other_mass: float, z_loss: float, ignore_index: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """``lsr_fused::forward`` that also returns the gradient for upstream ``grad_guess``."""
    check_targets(target, logits.shape[-1], ignore_index)
    params = RowParams(target_extra, other_mass, z_loss, ignore_index)
    # empty_like's layout (the strides of a dense tensor), which autograd's layout contract wants.
    grad_logits = new_gradient(logits, backend)
    loss, lse = backend_module(backend).forward(
        logits, target, weight, weight_total, params, grad_logits, grad_guess
    )
    return loss, lse, grad_logits


@fused_forward_with_grad.register_fake
def _(logits, target, weight, weight_total, grad_guess, *scalars):
    return (*_row_outputs(logits), torch.empty_like(logits))


@torch.library.custom_op("lsr_fused::backward", mutates_args=())
def fused_backward(
    grad_loss: Tensor, logits: Tensor, target: Tensor, weight: Optional[Tensor],
    weight_total: Optional[Tensor], lse: Tensor, target_extra: float, other_mass: float,
    z_loss: float, ignore_index: int, backend: str,
) -> Tensor:
    """Gradient of the per-row losses with respect to the logits, as a new tensor."""
    grad_logits = new_gradient(logits, backend)
    params = RowParams(target_extra, other_mass, z_loss, ignore_index)
    backend_module(backend).backward(
        grad_loss, logits, target, weight, weight_total, lse, params, grad_logits
    )
    return grad_logits


@fused_backward.register_fake
def _(grad_loss, logits, *rest):
    return torch.empty_like(logits)


@torch.library.custom_op("lsr_fused::backward_", mutates_args=("logits",))
def fused_backward_inplace(
    grad_loss: Tensor, logits: Tensor, target: Tensor, weight: Optional[Tensor],
    weight_total: Optional[Tensor], lse: Tensor, target_extra: float, other_mass: float,
    z_loss: float, ignore_index: int, backend: str,
) -> None:
    """Same as ``lsr_fused::backward`` but overwrites ``logits`` with the gradient."""
    params = RowParams(target_extra, other_mass, z_loss, ignore_index)
    backend_module(backend).backward(
        grad_loss, logits, target, weight, weight_total, lse, params, logits
    )


@fused_backward_inplace.register_fake
def _(*args):
    return None


@torch.library.custom_op("lsr_fused::redo_gradient_", mutates_args=("grad_logits",))
def redo_gradient(
    grad_loss: Tensor, logits: Tensor, target: Tensor, weight: Optional[Tensor],
    weight_total: Optional[Tensor], lse: Tensor, grad_guess: Tensor, grad_logits: Tensor,
    target_extra: float, other_mass: float, z_loss: float, ignore_index: int, backend: str,
) -> None:
    """Recompute the rows of ``grad_logits`` whose ``grad_loss`` differs from ``grad_guess``."""
    params = RowParams(target_extra, other_mass, z_loss, ignore_index)
    backend_module(backend).backward(
        grad_loss, logits, target, weight, weight_total, lse, params, grad_logits, grad_guess
    )


@redo_gradient.register_fake
def _(*args):
    return None
# fmt: on

_NO_GRADS = (None,) * 9


def _setup_forward(ctx, inputs, output) -> None:
    logits, target, weight, weight_total, *scalars, inplace_backward = inputs
    ctx.save_for_backward(logits, target, weight, weight_total, output[1])
    ctx.scalars = tuple(scalars)
    ctx.inplace_backward = inplace_backward
    ctx.set_materialize_grads(False)


def _composite_gradient(ctx, grad_loss: Tensor, logits, target, weight) -> Tensor:
    """The logits' gradient as a differentiable graph (``create_graph=True``): the fused kernels'
    arithmetic is invisible to autograd, so it is recomputed from the composite form."""
    params = RowParams(*ctx.scalars[:4])
    (grad_logits,) = composite.input_gradients(
        lambda x: composite.row_losses(x, target, weight, params), (logits,), grad_loss
    )
    return grad_logits


def _backward_forward(ctx, grad_loss: Optional[Tensor], grad_lse: Optional[Tensor]):
    logits, target, weight, weight_total, lse = ctx.saved_tensors
    if grad_loss is None:
        return (None, *_NO_GRADS)
    if torch.is_grad_enabled():
        return (_composite_gradient(ctx, grad_loss, logits, target, weight), *_NO_GRADS)
    if ctx.inplace_backward:
        torch.ops.lsr_fused.backward_(
            grad_loss, logits, target, weight, weight_total, lse, *ctx.scalars
        )
        # The op declares that it mutates `logits`, which bumps their version counter: any other
        # autograd node that saved these logits now fails loudly instead of reading a gradient.
        return (logits, *_NO_GRADS)
    grad_logits = torch.ops.lsr_fused.backward(
        grad_loss, logits, target, weight, weight_total, lse, *ctx.scalars
    )
    return (grad_logits, *_NO_GRADS)


fused_forward.register_autograd(_backward_forward, setup_context=_setup_forward)


def _setup_forward_with_grad(ctx, inputs, output) -> None:
    logits, target, weight, weight_total, grad_guess, *scalars = inputs
    ctx.save_for_backward(logits, target, weight, weight_total, output[1], grad_guess)
    ctx.scalars = tuple(scalars)
    # Unused outputs (lse, the gradient buffer) must not get zero-filled logits-sized gradients.
    ctx.set_materialize_grads(False)
    # Kept off save_for_backward on purpose: the backward mutates it (redo_gradient_), which
    # would trip the saved-tensor version check. Detached: a gradient carries no autograd history.
    ctx.grad_buffer = output[2].detach()


def _backward_forward_with_grad(ctx, grad_loss, grad_lse, grad_of_grad):
    logits, target, weight, weight_total, lse, grad_guess = ctx.saved_tensors
    if grad_loss is None:
        return (None, *_NO_GRADS)
    if torch.is_grad_enabled():
        return (_composite_gradient(ctx, grad_loss, logits, target, weight), *_NO_GRADS)
    grad_buffer, ctx.grad_buffer = ctx.grad_buffer, None
    if grad_buffer is None:
        # A second backward (retain_graph): autograd may own the first buffer by now. Redo the
        # first backward's arithmetic exactly (the forward's gradient pass, then the rows whose
        # upstream differs), so that repeated backward passes agree bitwise, as gradcheck asks.
        grad_buffer = torch.ops.lsr_fused.forward_with_grad(
            logits, target, weight, weight_total, grad_guess, *ctx.scalars
        )[2]
    torch.ops.lsr_fused.redo_gradient_(
        grad_loss, logits, target, weight, weight_total, lse, grad_guess, grad_buffer, *ctx.scalars
    )
    return (grad_buffer, *_NO_GRADS)


fused_forward_with_grad.register_autograd(
    _backward_forward_with_grad, setup_context=_setup_forward_with_grad
)
