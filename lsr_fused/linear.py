"""Fused classifier + label-smoothed cross-entropy: the loss of ``hidden @ weight.T + bias`` without
ever holding the ``(N, C)`` logits.

The rows are processed in chunks. For a chunk of ``n`` rows with hidden states ``h`` ``(n, H)``:

1. ``x = h @ W^T + b`` into one reusable ``(chunk, C)`` buffer (torch matmul: cuBLAS / CPU BLAS);
2. the row kernel of a backend (:mod:`lsr_fused.backends`) reads ``x`` and writes ``G = d loss /
   d x`` over ``x`` itself, in place (in the forward pass of a training step, for the upstream
   gradient the caller is expected to send);
3. ``G`` feeds two more matmuls and a column sum.

Gradient derivation. With ``loss = sum_r u_r * l_r(x_r)`` (``u_r`` the upstream gradient of row
``r``; 1 for ``"sum"``, ``1 / sum(w[y])`` for ``"mean"``) and ``x_r = W h_r + b``, the chain rule
through the linear map gives, with ``G_r = u_r * d l_r / d x_r`` (the row kernel's output, formula
in :mod:`lsr_fused.backends`)::

    d loss / d h_r = G_r @ W                 (one (n, C) x (C, H) matmul per chunk)
    d loss / d W   = sum_r G_r^T h_r          (one (C, n) x (n, H) matmul per chunk, accumulated)
    d loss / d b   = sum_r G_r                (a column sum per chunk, accumulated)

so a training step costs three matmuls and one pass of the row kernel per chunk. For ``"sum"`` and
``"mean"`` the upstream is one scalar ``u`` for every row: the forward pass computes the gradients
for the expected ``g`` (what ``loss.backward()`` sends) and backward multiplies them by ``u / g``
on the device (exactly 1, and skipped by nothing, when ``u == g``). For ``"none"`` the upstreams are
only known in backward, which recomputes every chunk's logits with the saved log-sum-exps.

The custom ops (with fake implementations and autograd, so ``torch.compile(fullgraph=True)``
traces through them as single nodes):

* ``lsr_fused::linear_forward``           -> ``(loss, lse)`` per row; no gradient work
* ``lsr_fused::linear_forward_with_grad`` -> ``(loss sum, lse, grad_hidden, grad_weight,
  grad_bias)`` for upstream ``grad_guess`` (a gradient not asked for is an empty tensor)
* ``lsr_fused::linear_backward``          -> ``(grad_hidden, grad_weight, grad_bias)`` for per-row
  upstream gradients, recomputing the chunks
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import composite, ops, policy
from ._docs import extends_doc
from ._dtensor import gather_sharded_parameters
from ._params import RowParams, smoothing_masses
from ._validation import check_targets
from .errors import ArgumentValueError
from .functional import label_smoothing_cross_entropy
from .linear_chunks import accumulate_weight_grad, logits_into
from .linear_chunks import chunk_bounds as _chunks
from .policy import default_chunk_size

__all__ = ["LINEAR_DOC", "default_chunk_size", "linear_label_smoothing_cross_entropy"]

# ---------------------------------------------------------------------------------------------
# The chunk loop shared by the ops.


class _Problem:
    """The arguments of one op call, unpacked once."""

    def __init__(self, hidden, weight, bias, target, class_weight, class_weight_total, chunk_size,
                 target_extra, other_mass, z_loss, ignore_index, backend):  # fmt: skip
        self.hidden, self.weight, self.bias, self.target = hidden, weight, bias, target
        self.class_weight, self.class_weight_total = class_weight, class_weight_total
        self.rows, self.num_classes = hidden.shape[0], weight.shape[0]
        self.chunk = max(1, min(int(chunk_size), max(self.rows, 1)))
        self.params = RowParams(target_extra, other_mass, z_loss, ignore_index)
        self.backend = backend
        self.kernels = ops.backend_module(backend)
        self.acc_dtype = policy.accumulation_dtype(hidden.dtype)

    def buffer(self) -> Tensor:
        return self.hidden.new_empty((self.chunk, self.num_classes))

    def logits(self, buffer: Tensor, start: int, stop: int) -> Tensor:
        return logits_into(buffer, self.hidden[start:stop], self.weight, self.bias)

    def row_forward(self, logits: Tensor, start: int, stop: int, grad_guess=None):
        """Per-row (loss, lse) of a chunk; with ``grad_guess``, also its gradient, in place."""
        rows = policy.row_view(logits)
        target = self.target[start:stop]
        args = (rows, target, self.class_weight, self.class_weight_total, self.params)
        if grad_guess is None:
            return self.kernels.forward(*args)
        if ops.writes_grad_in_forward(self.backend, logits.device.type):
            # The kernels read each row's statistics (and the target logit) before writing the
            # row's gradient, so the gradient may overwrite the logits.
            return self.kernels.forward(*args, rows, grad_guess)
        loss, lse = self.kernels.forward(*args)
        self.row_backward(grad_guess.expand(stop - start), logits, lse, start, stop)
        return loss, lse

    def row_backward(self, upstream: Tensor, logits: Tensor, lse: Tensor, start: int, stop: int):
        """The chunk's gradient for per-row ``upstream``, written over ``logits``."""
        rows = policy.row_view(logits)
        self.kernels.backward(
            upstream, rows, self.target[start:stop], self.class_weight,
            self.class_weight_total, lse, self.params, rows,
        )  # fmt: skip

    def gradients(self, needs: tuple[bool, bool, bool]):
        """Gradient outputs: hidden's (its dtype, to be filled), weight's and bias' accumulators
        (zeros); an empty ``(0,)`` tensor for a gradient not asked for."""
        return _gradient_outputs(self.hidden, self.weight, needs, torch.zeros)

    def accumulate(self, grads, grad_logits: Tensor, start: int, stop: int) -> None:
        grad_hidden, grad_weight, grad_bias = grads
        if grad_hidden.numel():
            torch.mm(grad_logits, self.weight, out=grad_hidden[start:stop])
        if grad_weight.numel():
            accumulate_weight_grad(grad_weight, grad_logits, self.hidden[start:stop])
        if grad_bias.numel():
            grad_bias.add_(grad_logits.sum(0, dtype=grad_bias.dtype))


def _gradient_outputs(hidden: Tensor, weight: Tensor, needs, fill=torch.empty):
    """(grad_hidden, weight accumulator, bias accumulator); ``(0,)`` where not needed. The
    accumulators are float32 for half weights (float64 for float64)."""
    need_hidden, need_weight, need_bias = needs
    acc = policy.accumulation_dtype(weight.dtype)
    device = weight.device
    return (
        hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty(0),
        fill(weight.shape, dtype=acc, device=device) if need_weight else hidden.new_empty(0),
        fill(weight.shape[0], dtype=acc, device=device) if need_bias else hidden.new_empty(0),
    )


def _device_type(t: Tensor) -> str:
    return t.device.type


# ---------------------------------------------------------------------------------------------
# Custom ops.


# The scalar tail shared by the ops:
# (chunk_size, target_extra, other_mass, z_loss, ignore_index, backend).
# fmt: off
@torch.library.custom_op("lsr_fused::linear_forward", mutates_args=())
def linear_forward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
    class_weight: Optional[Tensor], class_weight_total: Optional[Tensor], chunk_size: int,
    target_extra: float, other_mass: float, z_loss: float, ignore_index: int, backend: str,
) -> tuple[Tensor, Tensor]:
    """Per-row loss and log-sum-exp of ``hidden @ weight^T + bias``, chunk by chunk."""
    check_targets(target, weight.shape[0], ignore_index)
    p = _Problem(hidden, weight, bias, target, class_weight, class_weight_total, chunk_size,
                 target_extra, other_mass, z_loss, ignore_index, backend)
    loss = hidden.new_empty(p.rows, dtype=p.acc_dtype)
    lse = hidden.new_empty(p.rows, dtype=p.acc_dtype)
    with torch.autocast(_device_type(hidden), enabled=False):
        buffer = p.buffer()
        for start, stop in _chunks(p.rows, p.chunk):
            chunk_loss, chunk_lse = p.row_forward(p.logits(buffer, start, stop), start, stop)
            loss[start:stop] = chunk_loss
            lse[start:stop] = chunk_lse
    return loss, lse


@linear_forward.register_fake
def _(hidden, weight, bias, target, *rest):
    acc = policy.accumulation_dtype(hidden.dtype)
    rows = hidden.shape[0]
    return hidden.new_empty(rows, dtype=acc), hidden.new_empty(rows, dtype=acc)


@torch.library.custom_op("lsr_fused::linear_forward_with_grad", mutates_args=())
def linear_forward_with_grad(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
    class_weight: Optional[Tensor], class_weight_total: Optional[Tensor], grad_guess: Tensor,
    chunk_size: int, target_extra: float, other_mass: float, z_loss: float, ignore_index: int,
    backend: str, need_hidden: bool, need_weight: bool, need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Sum of the row losses, per-row lse, and the gradients for upstream ``grad_guess`` on every
    row: hidden's (its dtype), weight's and bias' (float32 accumulators for half weights)."""
    check_targets(target, weight.shape[0], ignore_index)
    p = _Problem(hidden, weight, bias, target, class_weight, class_weight_total, chunk_size,
                 target_extra, other_mass, z_loss, ignore_index, backend)
    loss = hidden.new_empty(p.rows, dtype=p.acc_dtype)
    lse = hidden.new_empty(p.rows, dtype=p.acc_dtype)
    grads = p.gradients((need_hidden, need_weight, need_bias))
    with torch.autocast(_device_type(hidden), enabled=False):
        buffer = p.buffer()
        for start, stop in _chunks(p.rows, p.chunk):
            logits = p.logits(buffer, start, stop)
            chunk_loss, chunk_lse = p.row_forward(logits, start, stop, grad_guess)
            loss[start:stop] = chunk_loss
            lse[start:stop] = chunk_lse
            p.accumulate(grads, logits, start, stop)  # `logits` now holds their gradient
    return (loss.sum(), lse, *grads)




@linear_forward_with_grad.register_fake
def _(hidden, weight, bias, target, class_weight, class_weight_total, grad_guess, chunk_size,
      target_extra, other_mass, z_loss, ignore_index, backend, need_hidden, need_weight,
      need_bias):
    acc = policy.accumulation_dtype(hidden.dtype)
    return (
        hidden.new_empty((), dtype=acc),
        hidden.new_empty(hidden.shape[0], dtype=acc),
        *_gradient_outputs(hidden, weight, (need_hidden, need_weight, need_bias)),
    )


@torch.library.custom_op("lsr_fused::linear_backward", mutates_args=())
def linear_backward(
    grad_loss: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
    class_weight: Optional[Tensor], class_weight_total: Optional[Tensor], lse: Tensor,
    chunk_size: int, target_extra: float, other_mass: float, z_loss: float, ignore_index: int,
    backend: str, need_hidden: bool, need_weight: bool, need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for per-row upstream ``grad_loss`` ``(N,)``, recomputing each chunk's logits
    (the saved ``lse`` spares the statistics pass); in the dtypes of hidden, weight and bias."""
    p = _Problem(hidden, weight, bias, target, class_weight, class_weight_total, chunk_size,
                 target_extra, other_mass, z_loss, ignore_index, backend)
    grads = p.gradients((need_hidden, need_weight, need_bias))
    with torch.autocast(_device_type(hidden), enabled=False):
        buffer = p.buffer()
        for start, stop in _chunks(p.rows, p.chunk):
            logits = p.logits(buffer, start, stop)
            p.row_backward(grad_loss[start:stop], logits, lse[start:stop], start, stop)
            p.accumulate(grads, logits, start, stop)
    return _final_dtypes(grads, weight, bias)


@linear_backward.register_fake
def _(grad_loss, hidden, weight, bias, target, class_weight, class_weight_total, lse, chunk_size,
      target_extra, other_mass, z_loss, ignore_index, backend, need_hidden, need_weight,
      need_bias):
    grads = _gradient_outputs(hidden, weight, (need_hidden, need_weight, need_bias))
    return _final_dtypes(grads, weight, bias)
# fmt: on


def _final_dtypes(grads, weight: Tensor, bias: Optional[Tensor]):
    """Cast the weight and bias accumulators to the parameters' dtypes (the ``(0,)`` stand-ins
    of gradients not asked for stay as they are)."""
    grad_hidden, grad_weight, grad_bias = grads
    if grad_weight.dim() == 2:
        grad_weight = grad_weight.to(weight.dtype)
    if bias is not None and grad_bias.numel():  # C >= 1 always
        grad_bias = grad_bias.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------
# Autograd.

_SCALARS = 6  # chunk_size, target_extra, other_mass, z_loss, ignore_index, backend


def _needs(ctx) -> tuple[bool, bool, bool]:
    return tuple(bool(n) for n in ctx.needs_input_grad[:3])  # hidden, weight, bias


def _setup_forward(ctx, inputs, output) -> None:
    hidden, weight, bias, target, class_weight, class_weight_total, *scalars = inputs
    ctx.save_for_backward(hidden, weight, bias, target, class_weight, class_weight_total, output[1])
    ctx.scalars = tuple(scalars)
    ctx.set_materialize_grads(False)


def _grads_out(grads, computed, n_inputs: int):
    """The autograd outputs: each computed gradient, None for the rest."""
    return (
        *(grad if done else None for grad, done in zip(grads, computed, strict=True)),
        *((None,) * (n_inputs - 3)),
    )


def _composite_gradients(ctx, upstream: Tensor, needs, hidden, weight, bias, target, class_weight):
    """The gradients as a differentiable graph (``create_graph=True``): the chunk loop's
    arithmetic is invisible to autograd, so the head is recomputed from the composite form."""
    params = RowParams(*ctx.scalars[1:5])
    inputs = tuple(t for t, need in zip((hidden, weight, bias), needs, strict=True) if need)

    def losses_of(*wanted):
        given = iter(wanted)
        tensors = (hidden, weight, bias)
        h, w, b = (next(given) if need else t for t, need in zip(tensors, needs, strict=True))
        logits = torch.nn.functional.linear(h, w, b)
        return composite.row_losses(logits, target, class_weight, params)

    grads = iter(composite.input_gradients(losses_of, inputs, upstream))
    return tuple(next(grads) if need else None for need in needs)


def _backward_forward(ctx, grad_loss, grad_lse):
    hidden, weight, bias, target, class_weight, class_weight_total, lse = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * (6 + _SCALARS)
    needs = _needs(ctx)
    if torch.is_grad_enabled():
        grads = _composite_gradients(
            ctx, grad_loss, needs, hidden, weight, bias, target, class_weight
        )
        return _grads_out(grads, needs, 6 + _SCALARS)
    grads = torch.ops.lsr_fused.linear_backward(
        grad_loss.to(lse.dtype), hidden, weight, bias, target, class_weight, class_weight_total,
        lse, *ctx.scalars, *needs,
    )  # fmt: skip
    return _grads_out(grads, needs, 6 + _SCALARS)


linear_forward.register_autograd(_backward_forward, setup_context=_setup_forward)

_WITH_GRAD_INPUTS = 7 + _SCALARS + 3


def _setup_forward_with_grad(ctx, inputs, output) -> None:
    hidden, weight, bias, target, class_weight, class_weight_total, grad_guess = inputs[:7]
    scalars = inputs[7 : 7 + _SCALARS]
    ctx.save_for_backward(
        hidden, weight, bias, target, class_weight, class_weight_total, output[1], grad_guess
    )
    ctx.scalars = tuple(scalars)
    ctx.computed = tuple(bool(n) for n in inputs[7 + _SCALARS :])
    ctx.set_materialize_grads(False)
    # Kept off save_for_backward on purpose: backward scales them in place. They are handed out
    # once (detached: a gradient carries no autograd history).
    ctx.grads = tuple(grad.detach() for grad in output[2:])


def _backward_forward_with_grad(ctx, grad_loss, grad_lse, *unused):
    saved = ctx.saved_tensors
    hidden, weight, bias, target, class_weight, class_weight_total, lse, grad_guess = saved
    if grad_loss is None:
        return (None,) * _WITH_GRAD_INPUTS
    if torch.is_grad_enabled():
        upstream = grad_loss.to(lse.dtype).reshape(1).expand(lse.shape[0])
        grads = _composite_gradients(
            ctx, upstream, ctx.computed, hidden, weight, bias, target, class_weight
        )
        return _grads_out(grads, ctx.computed, _WITH_GRAD_INPUTS)
    grads, ctx.grads = ctx.grads, None
    if grads is None:
        # A second backward (retain_graph): autograd may own the first gradients by now. Redo the
        # forward's gradient pass exactly, so that repeated backward passes agree bitwise.
        grads = torch.ops.lsr_fused.linear_forward_with_grad(
            hidden, weight, bias, target, class_weight, class_weight_total, grad_guess,
            *ctx.scalars, *ctx.computed,
        )[2:]  # fmt: skip
    # The gradients were computed for upstream `grad_guess`; the real one is `grad_loss`. The
    # ratio is exactly 1 when they agree (and kept 1 when both are inf: all rows ignored, mean).
    upstream = grad_loss.to(lse.dtype).reshape(1)
    scale = torch.where(upstream == grad_guess, 1.0, upstream / grad_guess)
    for grad, done in zip(grads, ctx.computed, strict=True):
        if done:
            grad.mul_(scale)
    grads = _final_dtypes(grads, weight, bias)
    return _grads_out(grads, ctx.computed, _WITH_GRAD_INPUTS)


linear_forward_with_grad.register_autograd(
    _backward_forward_with_grad, setup_context=_setup_forward_with_grad
)


# ---------------------------------------------------------------------------------------------
# Policy: the functional form.

LINEAR_DOC = r"""
    Equal (up to rounding) to
    ``label_smoothing_cross_entropy(F.linear(hidden, weight, bias), target, label_smoothing, ...,
    weight=class_weight)``, gradients of ``hidden``, ``weight`` and ``bias`` included, without
    ever holding the ``(N, C)`` logits, probabilities or gradient: rows go in chunks of
    ``chunk_size``; each chunk's logits are computed with a torch matmul, the row kernel writes
    their gradient over them, and two more matmuls turn it into the gradients of ``hidden`` and
    ``weight``. ``weight``'s gradient is accumulated across chunks in float32 for half weights.

    Shapes: ``hidden`` ``(..., H)``, ``weight`` ``(C, H)`` (as ``nn.Linear`` stores it), ``bias``
    ``(C,)`` or None, ``target`` ``(...)`` (hidden's shape without ``H``) of int64/int32 class
    indices. ``hidden``, ``weight`` and ``bias`` share a float dtype (under ``torch.autocast`` all
    three are cast to the autocast dtype, as ``F.linear`` would). The loss is float32 (float64 for
    float64 inputs).

    Args:
        label_smoothing, ignore_index, reduction, spread, z_loss, backend: as
            :func:`label_smoothing_cross_entropy`.
        bias: optional ``(C,)`` classifier bias.
        class_weight: optional ``(C,)`` class weights (the ``weight`` of
            :func:`label_smoothing_cross_entropy`).
        chunk_size: rows per chunk. None: all rows while float32 ``(N, C)`` logits would take at
            most 256 MiB, else at most 1/8 of that size and at most 256 MiB.
        process_group: a ``torch.distributed`` group over which the classes are sharded (a
            tensor-parallel LM head): ``weight``, ``bias`` and ``class_weight`` hold this rank's
            contiguous slice of the classes (ordered by rank; uneven slices allowed), ``hidden``
            is the same on every rank, ``target`` holds global class indices. Every rank gets the
            loss of the unsharded head; only O(N) statistics per chunk cross the network. See
            :mod:`lsr_fused.linear_distributed`.
        reduce_hidden_grad: with ``process_group``, whether ``hidden``'s gradient is summed over
            the group inside the op (True: the true gradient of the loss, correct for plain code)
            or is this rank's contribution only (False: for frameworks that all-reduce the
            gradient of the head's input themselves, as Megatron-LM's
            ``copy_to_tensor_model_parallel_region`` does). Without ``process_group`` every class
            is local and both give the full gradient.
"""


@extends_doc(LINEAR_DOC)
def linear_label_smoothing_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    label_smoothing: float = 0.1,
    *,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    class_weight: Optional[Tensor] = None,
    spread: str = "all",
    z_loss: float = 0.0,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    process_group: Optional[object] = None,
    reduce_hidden_grad: bool = True,
) -> Tensor:
    """Fused classifier + label-smoothed cross-entropy: the loss of
    ``F.linear(hidden, weight, bias)`` without its ``(N, C)`` logits."""
    # FSDP2 shards (DTensors outside their module's forward) become plain tensors: _dtensor.py.
    weight, bias = gather_sharded_parameters(weight, bias, process_group)
    if process_group is not None:
        # The classes are sharded over the group: checks run inside a collective exchange so that
        # one rank's bad argument raises on every rank instead of leaving the others waiting.
        from .linear_distributed import sharded_linear_label_smoothing_cross_entropy

        return sharded_linear_label_smoothing_cross_entropy(
            hidden, weight, target, label_smoothing, bias=bias, ignore_index=ignore_index,
            reduction=reduction, class_weight=class_weight, spread=spread, z_loss=z_loss,
            chunk_size=chunk_size, backend=backend, process_group=process_group,
            reduce_hidden_grad=reduce_hidden_grad,
        )  # fmt: skip
    policy.check_reduce_hidden_grad(reduce_hidden_grad)
    policy.check_options(label_smoothing, ignore_index, reduction, spread, z_loss, backend)
    device_type = hidden.device.type if isinstance(hidden, Tensor) else "cpu"
    autocast = torch.is_autocast_enabled(device_type)
    policy.check_linear_tensors(hidden, weight, bias, target, class_weight, chunk_size, autocast)
    num_classes, features = weight.shape
    if num_classes == 0:
        raise ArgumentValueError("weight must have at least one class (C == 0)")
    if spread == "others" and num_classes == 1:
        raise ArgumentValueError(
            "spread='others' needs at least 2 classes (C == 1 leaves no other class)"
        )
    backend = policy.resolve_backend(backend, hidden.device)
    if features == 0 or composite.wants_composite(hidden, weight, bias, weights=(class_weight,)):
        # No features (the logits are the bias), class weights that require grad, or a
        # torch.func transform: the logits exist anyway, or autograd must see the arithmetic.
        return label_smoothing_cross_entropy(
            torch.nn.functional.linear(hidden, weight, bias), target, label_smoothing,
            ignore_index=ignore_index, reduction=reduction, weight=class_weight, spread=spread,
            z_loss=z_loss, backend=backend,
        )  # fmt: skip
    if autocast:
        # As F.linear under autocast: the matmuls run in the autocast dtype (the casts are
        # differentiable, so float32 parameters get float32 gradients), the loss in float32.
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None

    flat_hidden = hidden.reshape(-1, features)
    flat_target = policy.flat_targets(target)
    rows = flat_hidden.shape[0]
    if chunk_size is None:
        chunk_size = policy.default_chunk_size(rows, num_classes, hidden.dtype)
    # Any chunk of at least N rows is one chunk (and then fits the op schema's int64).
    chunk_size = min(chunk_size, max(rows, 1))
    target_extra, other_mass = smoothing_masses(float(label_smoothing), num_classes, spread)
    acc_dtype = policy.accumulation_dtype(hidden.dtype)
    class_weight, class_weight_total = policy.class_weights(class_weight, acc_dtype)
    scalars = (int(chunk_size), target_extra, other_mass, float(z_loss), ignore_index, backend)
    denominator = None
    if reduction == "mean":
        denominator = policy.mean_denominator(
            flat_target, class_weight, ignore_index, num_classes, acc_dtype
        )
    tensors = (flat_hidden, weight, bias, flat_target, class_weight, class_weight_total)
    needs = (
        flat_hidden.requires_grad,
        weight.requires_grad,
        bias is not None and bias.requires_grad,
    )
    training = torch.is_grad_enabled() and any(needs)
    if training and reduction != "none":
        # One upstream value for every row, 1 (sum) or 1 / denominator (mean) when the caller runs
        # loss.backward(): the gradients are computed now for that value and scaled in backward.
        # Computed as autograd's backward of the division will (ones / denominator).
        grad_guess = torch.ones(1, dtype=acc_dtype, device=hidden.device)
        if denominator is not None:
            grad_guess = grad_guess / denominator
        loss_sum = torch.ops.lsr_fused.linear_forward_with_grad(
            *tensors, grad_guess, *scalars, *needs
        )[0]
        return policy.reduce(loss_sum.reshape(1), target.shape, reduction, denominator)
    loss, _ = torch.ops.lsr_fused.linear_forward(*tensors, *scalars)
    return policy.reduce(loss, target.shape, reduction, denominator)
