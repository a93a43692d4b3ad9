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
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import composite
from ._params import RowParams, accumulation_dtype
from ._validation import check_mix_targets, check_targets

_LOADED_BACKENDS: dict[str, ModuleType] = {}


def backend_module(name: str) -> ModuleType:
    """The module of :mod:`lsr_fused.backends` implementing backend ``name`` (imported on first use:
    Triton is optional; a dictionary lookup afterwards, as this is on every call's path). Plain
    imports, not ``importlib``, so that torch.compile traces through."""
    module = _LOADED_BACKENDS.get(name)
    if module is not None:
        return module
    if name == "triton":
        from .backends import triton_backend as module
    elif name == "triton_sharded":
        from .backends import triton_sharded as module
    elif name == "cpp":
        from .backends import cpp_backend as module
    else:
        from .backends import torch_backend as module
    _LOADED_BACKENDS[name] = module
    return module


def writes_grad_in_forward(backend: str, device_type: str) -> bool:
    """Whether ``backend`` can write the gradient during the forward pass on ``device_type``."""
    return device_type in getattr(backend_module(backend), "WRITES_GRAD_IN_FORWARD", ())


def new_gradient(logits: Tensor, backend: str) -> Tensor:
    """A logits-sized gradient buffer (``torch.empty_like`` layout) from ``backend``'s allocator
    when it has one (the C++ backend's CPU gradient pool), else ``torch.empty_like``."""
    make = getattr(backend_module(backend), "empty_grad", None)
    return torch.empty_like(logits) if make is None else make(logits)


class RowInputs(NamedTuple):
    """The tensors every op reads, in schema order: a ``(B, S, C)`` row view of the logits, the
    ``(rows,)`` int64 targets, class weights and their ``(1,)`` sum (or None), and the mixed
    target's ``(rows,)`` int64 second class and ``(rows,)`` weight ``lam`` (or None)."""

    logits: Tensor
    target: Tensor
    weight: Optional[Tensor]
    weight_total: Optional[Tensor]
    mix_target: Optional[Tensor]
    mix_lambda: Optional[Tensor]


def _mix(inputs) -> dict:
    """The backends' ``mix=`` keyword (absent without a mixed target: their unchanged path)."""
    mix_target, mix_lambda = inputs[4], inputs[5]
    return {} if mix_target is None else {"mix": (mix_target, mix_lambda)}


def _checked_forward(backend: str, inputs, params: RowParams, *grad_args, stats=None):
    """``backend``'s forward, with bad targets raising the error that names the value. A backend
    that checks targets itself on this device (``CHECKS_TARGETS``: the C++ CPU kernel, for free
    while it reads them) raises ``ValueError``; only then are the targets examined here. Mixed
    targets are always examined here (where examining is on: see :func:`check_targets`)."""
    module = backend_module(backend)
    logits, target = inputs[0], inputs[1]
    num_classes = logits.shape[-1]
    if inputs[4] is not None:
        check_mix_targets(target, inputs[4], num_classes, params.ignore_index)
    kwargs = _mix(inputs)
    if stats is not None:
        kwargs["stats"] = stats
    args = (logits, target, inputs[2], inputs[3], params, *grad_args)
    if logits.device.type not in getattr(module, "CHECKS_TARGETS", ()):
        check_targets(target, num_classes, params.ignore_index)
        return module.forward(*args, **kwargs)
    try:
        return module.forward(*args, **kwargs)
    except ValueError:
        check_targets(target, num_classes, params.ignore_index)
        raise


def _row_outputs(logits: Tensor) -> tuple[Tensor, Tensor]:
    rows = logits.shape[0] * logits.shape[1]
    acc = accumulation_dtype(logits.dtype)
    return logits.new_empty(rows, dtype=acc), logits.new_empty(rows, dtype=acc)


def _stats_outputs(logits: Tensor, wanted: bool) -> tuple[Tensor, Tensor]:
    """The per-row absolute log-sum-exp and arg-max the forward fills for ``return_stats``
    (empty when not wanted: an op's outputs are fixed by its schema)."""
    rows = logits.shape[0] * logits.shape[1] if wanted else 0
    acc = accumulation_dtype(logits.dtype)
    return logits.new_empty(rows, dtype=acc), logits.new_empty(rows, dtype=torch.int64)


# Every op takes the row inputs first and ends with the packed options: ``params``
# (RowParams.packed()'s floats), ``ignore_index`` and ``backend``.
# fmt: off
def _forward_impl(
    logits: Tensor, target: Tensor, weight: Optional[Tensor], weight_total: Optional[Tensor],
    mix_target: Optional[Tensor], mix_lambda: Optional[Tensor], inplace_backward: bool,
    stats: bool, params: list[float], ignore_index: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row ``(loss, lse, stats lse, stats arg-max)``; see :mod:`lsr_fused.backends`."""
    inputs = (logits, target, weight, weight_total, mix_target, mix_lambda)
    outputs = _stats_outputs(logits, stats)
    loss, lse = _checked_forward(
        backend, inputs, RowParams.unpacked(params, ignore_index),
        stats=outputs if stats else None,
    )
    return loss, lse, *outputs


fused_forward = torch.library.custom_op(
    "lsr_fused::forward", mutates_args=()
)(_forward_impl)


@fused_forward.register_fake
def _(logits, target, weight, weight_total, mix_target, mix_lambda, inplace_backward, stats,
      *packed):
    return (*_row_outputs(logits), *_stats_outputs(logits, stats))


def _forward_with_grad_impl(
    logits: Tensor, target: Tensor, weight: Optional[Tensor], weight_total: Optional[Tensor],
    mix_target: Optional[Tensor], mix_lambda: Optional[Tensor], grad_guess: Tensor, stats: bool,
    params: list[float], ignore_index: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``lsr_fused::forward`` that also returns the gradient for upstream ``grad_guess``:
    ``(loss, lse, gradient, stats lse, stats arg-max)``."""
    inputs = (logits, target, weight, weight_total, mix_target, mix_lambda)
    # empty_like's layout (the strides of a dense tensor), which autograd's layout contract wants.
    grad_logits = new_gradient(logits, backend)
    outputs = _stats_outputs(logits, stats)
    loss, lse = _checked_forward(
        backend, inputs, RowParams.unpacked(params, ignore_index), grad_logits, grad_guess,
        stats=outputs if stats else None,
    )
    return loss, lse, grad_logits, *outputs


fused_forward_with_grad = torch.library.custom_op(
    "lsr_fused::forward_with_grad", mutates_args=()
)(_forward_with_grad_impl)


@fused_forward_with_grad.register_fake
def _(logits, target, weight, weight_total, mix_target, mix_lambda, grad_guess, stats, *packed):
    return (*_row_outputs(logits), torch.empty_like(logits), *_stats_outputs(logits, stats))


def _backward_impl(
    grad_loss: Tensor, logits: Tensor, target: Tensor, weight: Optional[Tensor],
    weight_total: Optional[Tensor], mix_target: Optional[Tensor], mix_lambda: Optional[Tensor],
    lse: Tensor, params: list[float], ignore_index: int, backend: str,
) -> Tensor:
    """Gradient of the per-row losses with respect to the logits, as a new tensor."""
    grad_logits = new_gradient(logits, backend)
    _backward_into(grad_logits, grad_loss, logits, target, weight, weight_total, mix_target,
                   mix_lambda, lse, params, ignore_index, backend)
    return grad_logits


def _backward_into(grad_logits, grad_loss, logits, target, weight, weight_total, mix_target,
                   mix_lambda, lse, params, ignore_index, backend, grad_guess=None) -> None:
    inputs = (logits, target, weight, weight_total, mix_target, mix_lambda)
    backend_module(backend).backward(
        grad_loss, logits, target, weight, weight_total, lse,
        RowParams.unpacked(params, ignore_index), grad_logits,
        *(() if grad_guess is None else (grad_guess,)), **_mix(inputs),
    )


fused_backward = torch.library.custom_op(
    "lsr_fused::backward", mutates_args=()
)(_backward_impl)


@fused_backward.register_fake
def _(grad_loss, logits, *rest):
    return torch.empty_like(logits)


def _backward_inplace_impl(
    grad_loss: Tensor, logits: Tensor, target: Tensor, weight: Optional[Tensor],
    weight_total: Optional[Tensor], mix_target: Optional[Tensor], mix_lambda: Optional[Tensor],
    lse: Tensor, params: list[float], ignore_index: int, backend: str,
) -> None:
    """Same as ``lsr_fused::backward`` but overwrites ``logits`` with the gradient."""
    _backward_into(logits, grad_loss, logits, target, weight, weight_total, mix_target,
                   mix_lambda, lse, params, ignore_index, backend)


fused_backward_inplace = torch.library.custom_op(
    "lsr_fused::backward_", mutates_args=("logits",)
)(_backward_inplace_impl)


@fused_backward_inplace.register_fake
def _(*args):
    return None


def _redo_gradient_impl(
    grad_loss: Tensor, logits: Tensor, target: Tensor, weight: Optional[Tensor],
    weight_total: Optional[Tensor], mix_target: Optional[Tensor], mix_lambda: Optional[Tensor],
    lse: Tensor, grad_guess: Tensor, grad_logits: Tensor, params: list[float], ignore_index: int,
    backend: str,
) -> None:
    """Recompute the rows of ``grad_logits`` whose ``grad_loss`` differs from ``grad_guess``."""
    _backward_into(grad_logits, grad_loss, logits, target, weight, weight_total, mix_target,
                   mix_lambda, lse, params, ignore_index, backend, grad_guess)


redo_gradient = torch.library.custom_op(
    "lsr_fused::redo_gradient_", mutates_args=("grad_logits",)
)(_redo_gradient_impl)


@redo_gradient.register_fake
def _(*args):
    return None
# fmt: on


# The double-backward gradient of lsr_fused_C::train_step (csrc/train_step.cpp), whose C++ node
# reaches the composite formula through the dispatcher: CompositeImplicitAutograd, so that autograd
# records the composite's ATen ops and the result is differentiable again.
torch.library.define(
    "lsr_fused::composite_logits_grad",
    "(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, float[] params, "
    "int ignore_index) -> Tensor",
)


@torch.library.impl("lsr_fused::composite_logits_grad", "CompositeImplicitAutograd")
def _composite_logits_grad(grad_loss, logits, target, weight, params, ignore_index):
    """Gradient of ``sum(grad_loss * row_losses(logits))`` for ``(N, C)`` logits and class
    weights (or None) as the kernels read them, as a graph (see
    :func:`lsr_fused.composite.input_gradients`)."""
    row_params = RowParams.unpacked(params, ignore_index)
    (grad_logits,) = composite.input_gradients(
        lambda x: composite.row_losses(x, target, weight, row_params), (logits,), grad_loss
    )
    return grad_logits


_NO_GRADS = (None,) * 10


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
    *row_inputs, inplace_backward, _stats, floats, ignore_index, backend = inputs
    ctx.save_for_backward(*row_inputs, output[1])
    ctx.packed = (floats, ignore_index, backend)
    ctx.inplace_backward = inplace_backward
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*output[1:])


def _composite_gradient(ctx, grad_loss: Tensor, inputs) -> Tensor:
    """The logits' gradient as a differentiable graph (``create_graph=True``): the fused kernels'
    arithmetic is invisible to autograd, so it is recomputed from the composite form."""
    params = RowParams.unpacked(*ctx.packed[:2])
    logits, target, weight = inputs[:3]
    extra = {} if inputs[4] is None else {"mix": (inputs[4], inputs[5])}
    (grad_logits,) = composite.input_gradients(
        lambda x: composite.row_losses(x, target, weight, params, **extra), (logits,), grad_loss
    )
    return grad_logits


def _backward_forward(ctx, grad_loss: Optional[Tensor], *unused):
    *inputs, lse = ctx.saved_tensors
    if grad_loss is None:
        return (None, *_NO_GRADS)
    if torch.is_grad_enabled():
        return (_composite_gradient(ctx, grad_loss, inputs), *_NO_GRADS)
    kernels = _kernels(ctx)
    args = (grad_loss, *inputs, lse, *ctx.packed)
    if ctx.inplace_backward:
        # The kernel mutates `logits` and bumps their version counter: any other autograd node
        # that saved these logits now fails loudly instead of reading a gradient.
        kernels.backward_(*args)
        return (inputs[0], *_NO_GRADS)
    return (kernels.backward(*args), *_NO_GRADS)


fused_forward.register_autograd(_backward_forward, setup_context=_setup_forward)


def _setup_forward_with_grad(ctx, inputs, output) -> None:
    *row_inputs, grad_guess, stats, floats, ignore_index, backend = inputs
    ctx.save_for_backward(*row_inputs, output[1], grad_guess)
    ctx.packed = (floats, ignore_index, backend)
    ctx.stats = stats
    # Unused outputs (lse, the gradient buffer) must not get zero-filled logits-sized gradients.
    ctx.set_materialize_grads(False)
    # Kept off save_for_backward on purpose: the backward mutates it (redo_gradient_), which
    # would trip the saved-tensor version check. Detached: a gradient carries no autograd history.
    ctx.grad_buffer = output[2].detach()


def _backward_forward_with_grad(ctx, grad_loss, *unused):
    *inputs, lse, grad_guess = ctx.saved_tensors
    if grad_loss is None:
        return (None, *_NO_GRADS)
    if torch.is_grad_enabled():
        return (_composite_gradient(ctx, grad_loss, inputs), *_NO_GRADS)
    kernels = _kernels(ctx)
    grad_buffer, ctx.grad_buffer = ctx.grad_buffer, None
    if grad_buffer is None:
        # A second backward (retain_graph): autograd may own the first buffer by now. Redo the
        # first backward's arithmetic exactly (the forward's gradient pass, then the rows whose
        # upstream differs), so that repeated backward passes agree bitwise, as gradcheck asks.
        grad_buffer = kernels.forward_with_grad(*inputs, grad_guess, False, *ctx.packed)[2]
    kernels.redo_gradient_(grad_loss, *inputs, lse, grad_guess, grad_buffer, *ctx.packed)
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
    # Everything but the logits travels as one tuple: apply's per-argument cost is part of what
    # is saved here (nothing else is differentiated on this route: class weights or lam that
    # require grad take the composite path).
    @staticmethod
    def forward(ctx, logits, rest):
        inputs = (logits, *rest)
        output = _forward_impl(*inputs)
        _setup_forward(ctx, inputs, output)
        ctx.direct = True
        return output

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        return _backward_forward(ctx, grad_loss)[0], None


class _EagerReducedLoss(torch.autograd.Function):
    """The ``"sum"`` / ``"mean"`` training step as one node: the kernels of
    ``lsr_fused::forward_with_grad`` with the reduction inside, so that autograd runs one backward
    node instead of three (the reduction's nodes cost more than the kernels on small problems).
    Same arithmetic as the op route: loss ``sum(l) [/ d]``; the upstream of every row is
    ``g [/ d]`` for the incoming ``g``, compared with the guess ``1 [/ d]`` as there. Outputs
    ``(loss, stats lse, stats arg-max)``, the last two not differentiable."""

    @staticmethod
    def forward(ctx, logits, rest):
        *tensors, denominator, call = rest
        target, weight, weight_total, mix_target, mix_lambda = tensors
        if denominator is None:
            grad_guess = torch.ones(1, dtype=accumulation_dtype(logits.dtype), device=logits.device)
        else:
            # IEEE 1 / d, as the backward's g / d is for g = 1 (a guess one ulp off would only
            # cost a recomputation, never a wrong gradient).
            grad_guess = denominator.reshape(1).reciprocal()
        inputs = (logits, target, weight, weight_total, mix_target, mix_lambda, grad_guess, *call)
        output = _forward_with_grad_impl(*inputs)
        _setup_forward_with_grad(ctx, inputs, output)
        ctx.direct = True
        ctx.denominator = denominator
        total = output[0].sum()
        total = total if denominator is None else total / denominator
        if not call[0]:
            return total  # one output: each one costs autograd bookkeeping
        ctx.mark_non_differentiable(output[3], output[4])
        return total, output[3], output[4]

    @staticmethod
    def backward(ctx, grad_total, *unused):
        no_grads = (None,)  # for the tuple of everything else
        if grad_total is None:
            return (None, *no_grads)
        upstream = grad_total if ctx.denominator is None else grad_total / ctx.denominator
        upstream = upstream.reshape(1)
        grad_guess = ctx.saved_tensors[-1]
        if (
            upstream.device.type == "cpu"
            and ctx.packed[-1] == "cpp"
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
        grads = _backward_forward_with_grad(ctx, upstream.expand(rows))
        return (grads[0], *no_grads)


def eager_call_allowed(logits: Tensor) -> bool:
    """Whether a call may skip the op dispatcher (see above): plain CPU/CUDA tensors, untraced."""
    if torch.compiler.is_compiling():
        return False
    return type(logits) in (Tensor, torch.nn.Parameter) and logits.device.type in ("cpu", "cuda")


def forward(
    inputs: RowInputs, params: RowParams, backend: str, *, inplace_backward: bool, stats: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, lse, stats lse, stats arg-max)`` per row: ``lsr_fused::forward``, or its eager
    route (the last two empty unless ``stats``)."""
    call = (inplace_backward, stats, *params.packed(), backend)
    logits = inputs[0]
    if not eager_call_allowed(logits):
        return fused_forward(*inputs, *call)
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return _forward_impl(*inputs, *call)
    return _EagerForward.apply(logits, (*inputs[1:], *call))


def reduced_loss_with_grad(
    inputs: RowInputs, denominator: Optional[Tensor], params: RowParams, backend: str, stats: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """A ``"sum"`` (``denominator`` None) or ``"mean"`` training step's ``(loss, stats lse,
    stats arg-max)``, whose forward pass already writes the gradient for the upstream value
    ``loss.backward()`` sends (1, or 1 / denominator); backward only redoes rows whose real
    upstream differs (see :class:`_EagerReducedLoss`)."""
    call = (stats, *params.packed(), backend)
    if eager_call_allowed(inputs[0]):
        output = _EagerReducedLoss.apply(inputs[0], (*inputs[1:], denominator, call))
        return output if stats else (output, None, None)
    # Computed as autograd's DivBackward will (ones / denominator): the two are bitwise equal.
    logits = inputs[0]
    grad_guess = torch.ones(1, dtype=accumulation_dtype(logits.dtype), device=logits.device)
    if denominator is not None:
        grad_guess = grad_guess / denominator
    loss, _, _, stats_lse, stats_argmax = fused_forward_with_grad(*inputs, grad_guess, *call)
    total = loss.sum()
    return (total if denominator is None else total / denominator), stats_lse, stats_argmax
