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

from types import ModuleType, SimpleNamespace
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


def _checked_forward(backend: str, logits: Tensor, target: Tensor, weight, weight_total, params,
                     *grad_args):  # fmt: skip
    """``backend``'s forward, with bad targets raising the error that names the value. A backend
    that checks targets itself on this device (``CHECKS_TARGETS``: the C++ CPU kernel, for free
    while it reads them) raises ``ValueError``; only then are the targets examined here."""
    module = backend_module(backend)
    args = (logits, target, weight, weight_total, params, *grad_args)
    if logits.device.type not in getattr(module, "CHECKS_TARGETS", ()):
        check_targets(target, logits.shape[-1], params.ignore_index)
        return module.forward(*args)
    try:
        return module.forward(*args)
    except ValueError:
        check_targets(target, logits.shape[-1], params.ignore_index)
        raise


def _row_outputs(logits: Tensor) -> tuple[Tensor, Tensor]:
    rows = logits.shape[0] * logits.shape[1]
    acc = accumulation_dtype(logits.dtype)
    return logits.new_empty(rows, dtype=acc), logits.new_empty(rows, dtype=acc)


# The scalar tail shared by every op: (target_extra, other_mass, z_loss, ignore_index, backend).
# fmt: off
def _forward_impl(
    logits: Tensor, target: Tensor, weight: Optional[Tensor], weight_total: Optional[Tensor],
    target_extra: float, other_mass: float, z_loss: float, ignore_index: int, backend: str,
    inplace_backward: bool,
) -> tuple[Tensor, Tensor]:
    """Per-row label-smoothed cross-entropy and log-sum-exp; see :mod:`lsr_fused.backends`."""
    params = RowParams(target_extra, other_mass, z_loss, ignore_index)
    return _checked_forward(backend, logits, target, weight, weight_total, params)


fused_forward = torch.library.custom_op(
    "lsr_fused::forward", mutates_args=()
)(_forward_impl)


@fused_forward.register_fake
def _(logits, target, weight, weight_total, *scalars):
    return _row_outputs(logits)


def _forward_with_grad_impl(
    logits: Tensor, target: Tensor, weight: Optional[Tensor], weight_total: Optional[Tensor],
    grad_guess: Tensor, target_extra: float, other_mass: float, z_loss: float, ignore_index: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """``lsr_fused::forward`` that also returns the gradient for upstream ``grad_guess``."""
    params = RowParams(target_extra, other_mass, z_loss, ignore_index)
    # empty_like's layout (the strides of a dense tensor), which autograd's layout contract wants.
    grad_logits = new_gradient(logits, backend)
    loss, lse = _checked_forward(
        backend, logits, target, weight, weight_total, params, grad_logits, grad_guess
    )
    return loss, lse, grad_logits


fused_forward_with_grad = torch.library.custom_op(
    "lsr_fused::forward_with_grad", mutates_args=()
)(_forward_with_grad_impl)


@fused_forward_with_grad.register_fake
def _(logits, target, weight, weight_total, grad_guess, *scalars):
    return (*_row_outputs(logits), torch.empty_like(logits))


def _backward_impl(
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


fused_backward = torch.library.custom_op(
    "lsr_fused::backward", mutates_args=()
)(_backward_impl)


@fused_backward.register_fake
def _(grad_loss, logits, *rest):
    return torch.empty_like(logits)


def _backward_inplace_impl(
    grad_loss: Tensor, logits: Tensor, target: Tensor, weight: Optional[Tensor],
    weight_total: Optional[Tensor], lse: Tensor, target_extra: float, other_mass: float,
    z_loss: float, ignore_index: int, backend: str,
) -> None:
    """Same as ``lsr_fused::backward`` but overwrites ``logits`` with the gradient."""
    params = RowParams(target_extra, other_mass, z_loss, ignore_index)
    backend_module(backend).backward(
        grad_loss, logits, target, weight, weight_total, lse, params, logits
    )


fused_backward_inplace = torch.library.custom_op(
    "lsr_fused::backward_", mutates_args=("logits",)
)(_backward_inplace_impl)


@fused_backward_inplace.register_fake
def _(*args):
    return None


def _redo_gradient_impl(
    grad_loss: Tensor, logits: Tensor, target: Tensor, weight: Optional[Tensor],
    weight_total: Optional[Tensor], lse: Tensor, grad_guess: Tensor, grad_logits: Tensor,
    target_extra: float, other_mass: float, z_loss: float, ignore_index: int, backend: str,
) -> None:
    """Recompute the rows of ``grad_logits`` whose ``grad_loss`` differs from ``grad_guess``."""
    params = RowParams(target_extra, other_mass, z_loss, ignore_index)
    backend_module(backend).backward(
        grad_loss, logits, target, weight, weight_total, lse, params, grad_logits, grad_guess
    )


redo_gradient = torch.library.custom_op(
    "lsr_fused::redo_gradient_", mutates_args=("grad_logits",)
)(_redo_gradient_impl)


@redo_gradient.register_fake
def _(*args):
    return None
# fmt: on

_NO_GRADS = (None,) * 9


def _increment_version_after(kernel):
    def run(grad_loss, logits, *rest):
        kernel(grad_loss, logits, *rest)
        # What the op's declared mutation does through the dispatcher: anything else that saved
        # these logits now fails loudly instead of reading a gradient.
        torch.autograd.graph.increment_version(logits)

    return run


# The kernels as the backward passes call them: through the dispatcher (what torch.compile
# traces), or directly from an eager call (the same functions, without the op's per-call cost).
_DIRECT = SimpleNamespace(
    forward_with_grad=_forward_with_grad_impl,
    backward=_backward_impl,
    backward_=_increment_version_after(_backward_inplace_impl),
    redo_gradient_=_redo_gradient_impl,
)


def _kernels(ctx) -> SimpleNamespace:
    return _DIRECT if getattr(ctx, "direct", False) else torch.ops.lsr_fused


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
    kernels = _kernels(ctx)
    args = (grad_loss, logits, target, weight, weight_total, lse, *ctx.scalars)
    if ctx.inplace_backward:
        # The kernel mutates `logits` and bumps their version counter: any other autograd node
        # that saved these logits now fails loudly instead of reading a gradient.
        kernels.backward_(*args)
        return (logits, *_NO_GRADS)
    return (kernels.backward(*args), *_NO_GRADS)


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
    kernels = _kernels(ctx)
    grad_buffer, ctx.grad_buffer = ctx.grad_buffer, None
    if grad_buffer is None:
        # A second backward (retain_graph): autograd may own the first buffer by now. Redo the
        # first backward's arithmetic exactly (the forward's gradient pass, then the rows whose
        # upstream differs), so that repeated backward passes agree bitwise, as gradcheck asks.
        grad_buffer = kernels.forward_with_grad(
            logits, target, weight, weight_total, grad_guess, *ctx.scalars
        )[2]
    kernels.redo_gradient_(
        grad_loss, logits, target, weight, weight_total, lse, grad_guess, grad_buffer, *ctx.scalars
    )
    return (grad_buffer, *_NO_GRADS)


fused_forward_with_grad.register_autograd(
    _backward_forward_with_grad, setup_context=_setup_forward_with_grad
)


# ---------------------------------------------------------------------------------------------
# The eager route: the same functions and autograd formulas as the ops above, as an
# autograd.Function. The op dispatcher costs tens of microseconds per call in Python (defaults
# filled in, redispatch, a dynamo-disabled wrapper), which decides small problems; an eager call
# on plain tensors skips it. Anything traced or transformed (torch.compile, fake or meta tensors,
# tensor subclasses) takes the ops.


class _EagerForward(torch.autograd.Function):
    # The scalars travel as one tuple: apply's per-argument cost is part of what is saved here.
    @staticmethod
    def forward(ctx, logits, target, weight, weight_total, scalars):
        inputs = (logits, target, weight, weight_total, *scalars)
        output = _forward_impl(*inputs)
        _setup_forward(ctx, inputs, output)
        ctx.direct = True
        ctx.mark_non_differentiable(output[1])
        return output

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        return _backward_forward(ctx, grad_loss, grad_lse)[:5]


class _EagerReducedLoss(torch.autograd.Function):
    """The ``"sum"`` / ``"mean"`` training step as one node: the kernels of
    ``lsr_fused::forward_with_grad`` with the reduction inside, so that autograd runs one backward
    node instead of three (the reduction's nodes cost more than the kernels on small problems).
    Same arithmetic as the op route: loss ``sum(l) [/ d]``; the upstream of every row is
    ``g [/ d]`` for the incoming ``g``, compared with the guess ``1 [/ d]`` as there."""

    @staticmethod
    def forward(ctx, logits, target, weight, weight_total, denominator, scalars):
        if denominator is None:
            grad_guess = torch.ones(1, dtype=accumulation_dtype(logits.dtype), device=logits.device)
        else:
            # IEEE 1 / d, as the backward's g / d is for g = 1 (a guess one ulp off would only
            # cost a recomputation, never a wrong gradient).
            grad_guess = denominator.reshape(1).reciprocal()
        inputs = (logits, target, weight, weight_total, grad_guess, *scalars)
        output = _forward_with_grad_impl(*inputs)
        _setup_forward_with_grad(ctx, inputs, output)
        ctx.direct = True
        ctx.denominator = denominator
        total = output[0].sum()
        return total if denominator is None else total / denominator

    @staticmethod
    def backward(ctx, grad_total):
        if grad_total is None:
            return (None,) * 6
        upstream = grad_total if ctx.denominator is None else grad_total / ctx.denominator
        upstream = upstream.reshape(1)
        grad_guess = ctx.saved_tensors[5]
        no_grads = (None,) * 5
        if (
            upstream.device.type == "cpu"
            and ctx.scalars[-1] == "cpp"
            and ctx.grad_buffer is not None
            and not torch.is_grad_enabled()
            and torch.equal(upstream, grad_guess)
        ):
            # Every row's upstream is the guess (a free host comparison on the CPU): the
            # gradient written in forward is the answer, and the C++ kernel's redo pass would
            # touch no row (the other backends on the CPU are the test interpreters).
            grad_buffer, ctx.grad_buffer = ctx.grad_buffer, None
            return (grad_buffer, *no_grads)
        rows = ctx.saved_tensors[1].shape[0]
        grads = _backward_forward_with_grad(ctx, upstream.expand(rows), None, None)
        return (grads[0], *no_grads)


def reduced_loss_with_grad(logits, target, weight, weight_total, denominator, scalars) -> Tensor:
    """The eager route of a ``"sum"`` (``denominator`` None) or ``"mean"`` training step's loss
    (see :class:`_EagerReducedLoss`); call only where :func:`eager_call_allowed`."""
    return _EagerReducedLoss.apply(logits, target, weight, weight_total, denominator, scalars)


def eager_call_allowed(logits: Tensor) -> bool:
    """Whether a call may skip the op dispatcher (see above): plain CPU/CUDA tensors, untraced."""
    if torch.compiler.is_compiling():
        return False
    return type(logits) in (Tensor, torch.nn.Parameter) and logits.device.type in ("cpu", "cuda")


def forward(logits, target, weight, weight_total, *scalars, inplace_backward: bool):
    """``(loss, lse)`` per row: ``lsr_fused::forward``, or its eager route."""
    if not eager_call_allowed(logits):
        return fused_forward(logits, target, weight, weight_total, *scalars, inplace_backward)
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return _forward_impl(logits, target, weight, weight_total, *scalars, inplace_backward)
    scalars = (*scalars, inplace_backward)
    return _EagerForward.apply(logits, target, weight, weight_total, scalars)
