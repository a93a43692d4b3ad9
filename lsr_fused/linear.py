"""Fused classifier + label-smoothed cross-entropy: the loss of ``hidden @ weight.T + bias`` without
ever holding the ``(N, C)`` logits.

The rows are processed in chunks by the chunk loop of :mod:`lsr_fused.linear_chunks` (the one the
sharded head runs too), whose row step here is a backend's row kernels. For a chunk of ``n`` rows
with hidden states ``h`` ``(n, H)``:

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

Their arguments are groups (:class:`_Head`'s tensors, :class:`_Scalars`, ...) declared once per op
as a :class:`_Layout`, from which the flat schema and the unpacking derive.
"""

from __future__ import annotations

import typing
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor
from typing_extensions import Unpack

from . import composite, ops, policy
from ._docs import extends_doc
from ._dtensor import gather_sharded_parameters
from ._params import RowParams
from ._validation import check_mix_targets, check_targets
from .errors import ArgumentValueError
from .functional import loss_with_options
from .linear_chunks import (
    ChunkLoop,
    Grads,
    Needs,
    check_head,
    expected_upstream,
    final_dtypes,
    gradient_buffers,
    grads_or_none,
    matmul_inputs,
    needs_of,
    rescale,
)
from .linear_chunks import chunk_bounds as _chunks
from .options import (
    HEAD_KEYWORDS,
    HeadKeywords,
    LossOptions,
    loss_options,
    option_fields,
    shows_option_keywords,
)
from .policy import default_chunk_size
from .stats import LossStats, loss_stats

__all__ = ["default_chunk_size", "linear_label_smoothing_cross_entropy"]

# ---------------------------------------------------------------------------------------------
# The ops' arguments: groups of flat schema arguments, each a NamedTuple everywhere else.


class _Head(NamedTuple):
    """The tensors every op reads (``class_weight`` in the accumulation dtype, with its ``(1,)``
    sum ``class_weight_total``)."""

    hidden: Tensor  # (N, H)
    weight: Tensor  # (C, H)
    bias: Optional[Tensor]  # (C,)
    target: Tensor  # (N,) int64
    class_weight: Optional[Tensor]  # (C,)
    class_weight_total: Optional[Tensor]  # (1,)
    mix_target: Optional[Tensor]  # (N,) int64: the mixed target's second class
    mix_lambda: Optional[Tensor]  # (N,) accumulation dtype, any stride: its weight lam


class _Scalars(NamedTuple):
    """The scalar options every op takes (runtime values: a new value never recompiles)."""

    chunk_size: int  # rows per chunk, at most max(N, 1)
    target_extra: float
    other_mass: float
    z_loss: float
    ignore_index: int
    backend: str  # resolved
    softcap: float  # 0.0: off
    stats: bool  # also return the per-row absolute lse and arg-max (else (0,) tensors)

    @property
    def params(self) -> RowParams:
        return RowParams(
            self.target_extra, self.other_mass, self.z_loss, self.ignore_index, self.softcap
        )


_SCHEMA_TYPES = {Tensor: "Tensor", Optional[Tensor]: "Tensor?", int: "SymInt", float: "float",
                 str: "str", bool: "bool"}  # fmt: skip


class _Layout:
    """The flat arguments of one op, written once: its groups in order, each a NamedTuple class (its
    fields) or one ``(name, type)`` argument. The schema and the unpacking derive from it."""

    def __init__(self, *groups):
        self.groups = groups
        # Where each group's values sit in the flat arguments: a slice, or one position.
        self.places, at = [], 0
        for group in groups:
            if isinstance(group, type):
                self.places.append((group, slice(at, at + len(group._fields))))
                at += len(group._fields)
            else:
                self.places.append((None, at))
                at += 1
        self.size = at

    def __len__(self) -> int:
        return self.size

    def schema(self, returns: str) -> str:
        arguments = []
        for group in self.groups:
            fields = typing.get_type_hints(group).items() if isinstance(group, type) else [group]
            arguments += [f"{_SCHEMA_TYPES[kind]} {name}" for name, kind in fields]
        return f"({', '.join(arguments)}) -> {returns}"

    def unpack(self, flat) -> list:
        """The op's flat arguments (or autograd's ``inputs``), one value per group."""
        # tuple.__new__ is NamedTuple._make without its Python frame (this runs on every call).
        return [
            flat[at] if group is None else tuple.__new__(group, flat[at])
            for group, at in self.places
        ]

    def input_grads(self, grads) -> tuple:
        """Autograd's outputs: ``grads`` for hidden, weight and bias (they lead every
        differentiable op's arguments), None for the rest."""
        return (*grads, *(None,) * (len(self) - len(grads)))


_FORWARD = _Layout(_Head, _Scalars)
_WITH_GRAD = _Layout(_Head, ("grad_guess", Tensor), _Scalars, Needs)
_BACKWARD = _Layout(("grad_loss", Tensor), _Head, ("lse", Tensor), _Scalars, Needs)

# ---------------------------------------------------------------------------------------------
# The local row step.


class _Rows(NamedTuple):
    """The per-row inputs of the row step (``(N,)`` each; None where a pass has none)."""

    target: Tensor
    mix_target: Optional[Tensor] = None
    mix_lambda: Optional[Tensor] = None
    upstream: Optional[Tensor] = None  # backward: d loss / d loss_r
    lse: Optional[Tensor] = None  # backward: the forward pass's (saved) log-sum-exp


class _RowOut(NamedTuple):
    """The per-row outputs of the forward row step (``(N,)``; the last two only with
    ``stats``)."""

    loss: Tensor
    lse: Tensor
    stats_lse: Optional[Tensor] = None  # the absolute log-sum-exp
    stats_argmax: Optional[Tensor] = None  # int64


def _mix(rows) -> dict:
    """The backends' ``mix=`` keyword for these rows (absent without a mixed target)."""
    return {} if rows.mix_target is None else {"mix": (rows.mix_target, rows.mix_lambda)}


def _rows_of(head: _Head, **more) -> _Rows:
    return _Rows(head.target, head.mix_target, head.mix_lambda, **more)


class _Problem(ChunkLoop):
    """The chunk loop of one op call, with a backend's row kernels as its row step; with
    ``grad_guess`` (the upstream gradient of every row), forward also writes the gradient."""

    def __init__(self, head: _Head, scalars: _Scalars, grad_guess: Optional[Tensor] = None):
        super().__init__(head.hidden, head.weight, head.bias, scalars.chunk_size)
        self.class_weight, self.class_weight_total = head.class_weight, head.class_weight_total
        self.params, self.backend, self.stats = scalars.params, scalars.backend, scalars.stats
        self.kernels = ops.backend_module(scalars.backend)
        self.grad_guess = grad_guess
        device_type = head.hidden.device.type
        self.grad_in_forward = grad_guess is not None and ops.writes_grad_in_forward(
            scalars.backend, device_type
        )

    def chunks(self):
        # Through this module's name, which the tests watch for chunk work.
        return _chunks(self.rows, self.chunk)

    def row_outputs(self) -> _RowOut:
        def new(dtype=self.acc_dtype):
            return self.hidden.new_empty(self.rows, dtype=dtype)

        if not self.stats:
            return _RowOut(new(), new())
        return _RowOut(new(), new(), new(), new(torch.int64))

    def forward_rows(self, logits: Tensor, rows: _Rows) -> tuple:
        """The chunk's per-row (loss, lse[, stats lse, stats arg-max]) (:class:`_RowOut`'s
        fields); with ``grad_guess``, its gradient over ``logits``."""
        view = policy.row_view(logits)
        args = (view, rows.target, self.class_weight, self.class_weight_total, self.params)
        kwargs = _mix(rows)
        if self.stats:
            n = logits.shape[0]
            kwargs["stats"] = (view.new_empty(n, dtype=self.acc_dtype),
                               view.new_empty(n, dtype=torch.int64))  # fmt: skip
        extra = tuple(kwargs.get("stats", ()))
        if self.grad_guess is None:
            return (*self.kernels.forward(*args, **kwargs), *extra)
        if self.grad_in_forward:
            # The kernels read each row's statistics (and the target logits) before writing the
            # row's gradient, so the gradient may overwrite the logits.
            return (*self.kernels.forward(*args, view, self.grad_guess, **kwargs), *extra)
        loss, lse = self.kernels.forward(*args, **kwargs)
        upstream = self.grad_guess.expand(logits.shape[0])
        self.backward_rows(logits, rows._replace(upstream=upstream, lse=lse))
        return (loss, lse, *extra)

    def backward_rows(self, logits: Tensor, rows: _Rows) -> tuple:
        """The chunk's gradient for per-row ``rows.upstream``, written over ``logits``."""
        view = policy.row_view(logits)
        self.kernels.backward(
            rows.upstream, view, rows.target, self.class_weight, self.class_weight_total,
            rows.lse, self.params, view, **_mix(rows),
        )  # fmt: skip
        return ()


# ---------------------------------------------------------------------------------------------
# Custom ops.


@torch.library.custom_op(
    "lsr_fused::linear_forward",
    mutates_args=(),
    schema=_FORWARD.schema("(Tensor, Tensor, Tensor, Tensor)"),
)
def linear_forward(*flat) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row loss, log-sum-exp, and (with ``stats``, else ``(0,)``) absolute log-sum-exp and
    arg-max of ``hidden @ weight^T + bias``, chunk by chunk (arguments: :data:`_FORWARD`)."""
    head, scalars = _FORWARD.unpack(flat)
    _check_targets(head, scalars)
    loop = _Problem(head, scalars)
    outputs = loop.run(loop.forward_rows, _rows_of(head), loop.row_outputs())
    return _with_stats(head.hidden, outputs)


def _check_targets(head: _Head, scalars: _Scalars) -> None:
    check_targets(head.target, head.weight.shape[0], scalars.ignore_index)
    if head.mix_target is not None:
        check_mix_targets(head.target, head.mix_target, head.weight.shape[0], scalars.ignore_index)


def _with_stats(hidden: Tensor, outputs: _RowOut) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four per-row outputs of the schema: ``(0,)`` statistics where none were asked for."""
    if outputs.stats_lse is not None:
        return tuple(outputs)
    empty = hidden.new_empty(0, dtype=outputs.lse.dtype)
    return outputs.loss, outputs.lse, empty, hidden.new_empty(0, dtype=torch.int64)


def _fake_rows(head: _Head, scalars: _Scalars) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    acc = policy.accumulation_dtype(head.hidden.dtype)
    rows = head.hidden.shape[0]
    wanted = rows if scalars.stats else 0
    new = head.hidden.new_empty
    return (
        new(rows, dtype=acc),
        new(rows, dtype=acc),
        new(wanted, dtype=acc),
        new(wanted, dtype=torch.int64),
    )


@linear_forward.register_fake
def _(*flat):
    return _fake_rows(*_FORWARD.unpack(flat))


@torch.library.custom_op(
    "lsr_fused::linear_forward_with_grad",
    mutates_args=(),
    schema=_WITH_GRAD.schema("(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"),
)
def linear_forward_with_grad(*flat) -> tuple[Tensor, ...]:
    """Sum of the row losses, per-row lse, and the gradients for upstream ``grad_guess`` on every
    row: hidden's (its dtype), weight's and bias' (float32 accumulators for half weights); a
    gradient not asked for is a ``(0,)`` tensor; then the statistics as in ``linear_forward``
    (arguments: :data:`_WITH_GRAD`)."""
    head, grad_guess, scalars, needs = _WITH_GRAD.unpack(flat)
    _check_targets(head, scalars)
    loop = _Problem(head, scalars, grad_guess)
    grads = loop.gradients(needs)
    outputs = loop.run(loop.forward_rows, _rows_of(head), loop.row_outputs(), grads)
    loss, lse, stats_lse, stats_argmax = _with_stats(head.hidden, outputs)
    return (loss.sum(), lse, *grads, stats_lse, stats_argmax)


@linear_forward_with_grad.register_fake
def _(*flat):
    head, _, scalars, needs = _WITH_GRAD.unpack(flat)
    loss, lse, stats_lse, stats_argmax = _fake_rows(head, scalars)
    grads = gradient_buffers(head.hidden, head.weight, needs, fill=torch.empty)
    return (loss.new_empty(()), lse, *grads, stats_lse, stats_argmax)


@torch.library.custom_op(
    "lsr_fused::linear_backward",
    mutates_args=(),
    schema=_BACKWARD.schema("(Tensor, Tensor, Tensor)"),
)
def linear_backward(*flat) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for per-row upstream ``grad_loss`` ``(N,)``, recomputing each chunk's logits
    (the saved ``lse`` spares the statistics pass); in the dtypes of hidden, weight and bias
    (arguments: :data:`_BACKWARD`)."""
    grad_loss, head, lse, scalars, needs = _BACKWARD.unpack(flat)
    loop = _Problem(head, scalars)
    grads = loop.gradients(needs)
    loop.run(loop.backward_rows, _rows_of(head, upstream=grad_loss, lse=lse), (), grads)
    return tuple(final_dtypes(grads, needs, head.hidden, head.weight, head.bias))


@linear_backward.register_fake
def _(*flat):
    _, head, _, _, needs = _BACKWARD.unpack(flat)
    grads = gradient_buffers(head.hidden, head.weight, needs, fill=torch.empty)
    return tuple(final_dtypes(grads, needs, head.hidden, head.weight, head.bias))


# ---------------------------------------------------------------------------------------------
# Autograd.


def _composite_gradients(head: _Head, scalars: _Scalars, needs: Needs, upstream: Tensor):
    """The gradients as a differentiable graph (``create_graph=True``): the chunk loop's
    arithmetic is invisible to autograd, so the head is recomputed from the composite form."""
    tensors = (head.hidden, head.weight, head.bias)
    inputs = tuple(t for t, need in zip(tensors, needs, strict=True) if need)

    def losses_of(*wanted):
        given = iter(wanted)
        h, w, b = (next(given) if need else t for t, need in zip(tensors, needs, strict=True))
        logits = torch.nn.functional.linear(h, w, b)
        mix = {} if head.mix_target is None else {"mix": (head.mix_target, head.mix_lambda)}
        return composite.row_losses(logits, head.target, head.class_weight, scalars.params, **mix)

    grads = iter(composite.input_gradients(losses_of, inputs, upstream))
    return tuple(next(grads) if need else None for need in needs)


def _setup_forward(ctx, inputs, output) -> None:
    head, ctx.scalars = _FORWARD.unpack(inputs)
    ctx.save_for_backward(*head, output[1])
    ctx.set_materialize_grads(False)


def _backward_forward(ctx, grad_loss, *unused):
    *tensors, lse = ctx.saved_tensors
    head = _Head._make(tensors)
    if grad_loss is None:
        return _FORWARD.input_grads(())
    needs = Needs(*map(bool, ctx.needs_input_grad[: len(Needs._fields)]))  # they lead the inputs
    if torch.is_grad_enabled():
        return _FORWARD.input_grads(_composite_gradients(head, ctx.scalars, needs, grad_loss))
    grads = torch.ops.lsr_fused.linear_backward(
        grad_loss.to(lse.dtype), *head, lse, *ctx.scalars, *needs
    )
    return _FORWARD.input_grads(grads_or_none(grads, needs))


linear_forward.register_autograd(_backward_forward, setup_context=_setup_forward)


def _setup_forward_with_grad(ctx, inputs, output) -> None:
    head, grad_guess, ctx.scalars, ctx.computed = _WITH_GRAD.unpack(inputs)
    ctx.save_for_backward(*head, output[1], grad_guess)
    ctx.set_materialize_grads(False)
    # Kept off save_for_backward on purpose: backward scales them in place. They are handed out
    # once (detached: a gradient carries no autograd history).
    grad_hidden, grad_weight, grad_bias = output[2:5]
    ctx.grads = Grads(grad_hidden.detach(), grad_weight.detach(), grad_bias.detach())


def _backward_forward_with_grad(ctx, grad_loss, grad_lse, *unused):
    *tensors, lse, grad_guess = ctx.saved_tensors
    head, needs = _Head._make(tensors), ctx.computed
    if grad_loss is None:
        return _WITH_GRAD.input_grads(())
    upstream = grad_loss.to(lse.dtype)
    if torch.is_grad_enabled():
        every_row = upstream.reshape(1).expand(lse.shape[0])
        return _WITH_GRAD.input_grads(_composite_gradients(head, ctx.scalars, needs, every_row))
    grads, ctx.grads = ctx.grads, None
    if grads is None:
        # A second backward (retain_graph): autograd may own the first gradients by now. Redo the
        # forward's gradient pass exactly, so that repeated backward passes agree bitwise.
        grads = torch.ops.lsr_fused.linear_forward_with_grad(
            *head, grad_guess, *ctx.scalars, *needs
        )[2:5]
    rescale(grads, needs, upstream, grad_guess)
    grads = final_dtypes(grads, needs, head.hidden, head.weight, head.bias)
    return _WITH_GRAD.input_grads(grads_or_none(grads, needs))


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
        label_smoothing, ignore_index, reduction, spread, z_loss, softcap, mix_target,
            mix_lambda, return_stats, backend: as :func:`label_smoothing_cross_entropy` (the
            softcap applies to ``hidden @ weight.T + bias``).
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
@shows_option_keywords(HEAD_KEYWORDS)
def linear_label_smoothing_cross_entropy(
    hidden: Tensor, weight: Tensor, target: Tensor, label_smoothing: float = 0.1, *,
    bias: Optional[Tensor] = None, class_weight: Optional[Tensor] = None,
    mix_target: Optional[Tensor] = None, mix_lambda: Union[float, Tensor] = 1.0,
    chunk_size: Optional[int] = None, process_group: Optional[object] = None,
    reduce_hidden_grad: bool = True, **options: Unpack[HeadKeywords],
) -> Union[Tensor, tuple[Tensor, LossStats]]:  # fmt: skip
    """Fused classifier + label-smoothed cross-entropy: the loss of
    ``F.linear(hidden, weight, bias)`` without its ``(N, C)`` logits; ``options`` are the keyword
    fields of :class:`lsr_fused.LossOptions` but ``inplace_backward``."""
    if process_group is not None:
        # The classes are sharded over the group: checks run inside a collective exchange so that
        # one rank's bad argument raises on every rank instead of leaving the others waiting.
        from .linear_distributed import sharded_linear_label_smoothing_cross_entropy

        weight, bias = gather_sharded_parameters(weight, bias, process_group)
        return sharded_linear_label_smoothing_cross_entropy(
            hidden, weight, target, label_smoothing, bias=bias, class_weight=class_weight,
            mix_target=mix_target, mix_lambda=mix_lambda, chunk_size=chunk_size,
            process_group=process_group, reduce_hidden_grad=reduce_hidden_grad, **options,
        )  # fmt: skip
    fields = option_fields(label_smoothing, options, "linear_label_smoothing_cross_entropy",
                           HEAD_KEYWORDS)  # fmt: skip
    head_options = loss_options(*fields)
    policy.check_reduce_hidden_grad(reduce_hidden_grad)
    return head_with_options(hidden, weight, target, head_options, bias, class_weight,
                             (mix_target, mix_lambda), chunk_size)  # fmt: skip


def head_with_options(
    hidden: Tensor, weight: Tensor, target: Tensor, options: LossOptions, bias: Optional[Tensor],
    class_weight: Optional[Tensor], mix: tuple, chunk_size: Optional[int],
) -> Union[Tensor, tuple[Tensor, LossStats]]:  # fmt: skip
    """:func:`linear_label_smoothing_cross_entropy` of one process with its options already made
    (the module's call); ``mix`` = ``(mix_target, mix_lambda)``."""
    # FSDP2 shards (DTensors outside their module's forward) become plain tensors: _dtensor.py.
    weight, bias = gather_sharded_parameters(weight, bias, None)
    autocast = check_head(hidden, weight, bias, target, class_weight, chunk_size, True)
    _check_classes(weight, options.spread)
    features = weight.shape[1]
    backend = policy.resolve_backend(options.backend, hidden.device)
    mix_target, mix_lambda = mix
    lam = mix_lambda if isinstance(mix_lambda, Tensor) else None
    if features == 0 or composite.wants_composite(hidden, weight, bias, lam,
                                                  weights=(class_weight, lam)):  # fmt: skip
        # No features (the logits are the bias), class weights or lam that require grad, or a
        # torch.func transform: the logits exist anyway, or autograd must see the arithmetic.
        logits = torch.nn.functional.linear(hidden, weight, bias)
        return loss_with_options(logits, target, options.replace(backend=backend), class_weight,
                                 mix_target, mix_lambda)  # fmt: skip
    hidden, weight, bias = matmul_inputs(hidden, weight, bias, autocast)
    return _fused(hidden, weight, bias, target, class_weight, options, chunk_size, backend, mix)


def _check_classes(weight: Tensor, spread: str) -> None:
    num_classes = weight.shape[0]
    if num_classes == 0:
        raise ArgumentValueError("weight must have at least one class (C == 0)")
    if spread == "others" and num_classes == 1:
        raise ArgumentValueError(
            "spread='others' needs at least 2 classes (C == 1 leaves no other class)"
        )


def _fused(hidden, weight, bias, target, class_weight, options: LossOptions, chunk_size, backend,
           mix) -> Union[Tensor, tuple[Tensor, LossStats]]:  # fmt: skip
    """The checked call on the ops: per-row losses, or (a ``"sum"``/``"mean"`` training step) their
    sum with every gradient computed in the same pass; then the reduction (and statistics)."""
    num_classes, features = weight.shape
    flat_hidden = hidden.reshape(-1, features)
    flat_target = policy.flat_targets(target)
    rows = flat_hidden.shape[0]
    if chunk_size is None:
        chunk_size = policy.default_chunk_size(rows, num_classes, hidden.dtype)
    acc_dtype = policy.accumulation_dtype(hidden.dtype)
    flat_mix = policy.mix_inputs(*mix, target, acc_dtype)
    class_weight, class_weight_total = policy.class_weights(class_weight, acc_dtype)
    head = _Head(flat_hidden, weight, bias, flat_target, class_weight, class_weight_total,
                 *flat_mix)  # fmt: skip
    params = options.row_params(num_classes)
    # Any chunk of at least N rows is one chunk (and then fits the op schema's int64).
    chunk_size = min(chunk_size, max(rows, 1))
    scalars = _Scalars(
        chunk_size, params.target_extra, params.other_mass, params.z_loss, params.ignore_index,
        backend, params.softcap, options.return_stats,
    )  # fmt: skip
    denominator = None
    if options.reduction == "mean":
        denominator = policy.mean_denominator(
            flat_target, class_weight, options.ignore_index, num_classes, acc_dtype, flat_mix
        )
    needs = needs_of(flat_hidden, weight, bias)
    if torch.is_grad_enabled() and any(needs) and options.reduction != "none":
        # One upstream value for every row (what loss.backward() sends): the gradients are
        # computed now for that value and scaled in backward by the real one.
        grad_guess = expected_upstream(acc_dtype, hidden.device, denominator)
        out = torch.ops.lsr_fused.linear_forward_with_grad(*head, grad_guess, *scalars, *needs)
        loss, row_stats = out[0].reshape(1), out[5:]
    else:
        loss, _, *row_stats = torch.ops.lsr_fused.linear_forward(*head, *scalars)
    loss = policy.reduce(loss, target.shape, options.reduction, denominator)
    if not options.return_stats:
        return loss
    return loss, loss_stats(*row_stats, flat_target, options, target.shape, denominator)
