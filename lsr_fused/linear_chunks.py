"""The chunk loop of the fused classifier + loss, shared by the local (:mod:`lsr_fused.linear`) and
the vocabulary-parallel (:mod:`lsr_fused.linear_distributed`) heads.

:meth:`ChunkLoop.run` takes the rows of ``hidden`` ``(N, H)`` in chunks ``[start, stop)``; for each:

1. ``x = hidden[start:stop] @ weight^T + bias`` into one reused ``(chunk, C)`` buffer;
2. the **row step** on ``x`` and the chunk's slice of the per-row inputs (a NamedTuple of ``(N,)``
   tensors: targets, upstream gradients, saved statistics, ...). It returns the chunk's per-row
   outputs (a NamedTuple, written into the matching ``(N,)`` outputs) and, in a gradient pass,
   writes ``G = d loss / d x`` over ``x``, in place;
3. in a gradient pass, ``d hidden[start:stop] = G W``, ``d W += G^T h``, ``d b += sum_rows G``
   (weight and bias accumulated in float32 for half weights, float64 for float64).

The row step is the one difference between the heads: a backend's row kernels (local), or this
shard's statistics, their all-reduce, the gradient coefficients and the shard gradient (sharded).
A subclass of :class:`ChunkLoop` supplies it (with :meth:`ChunkLoop.finish_gradients`, the sharded
head's all-reduce of hidden's gradient); a new per-row input or output is a field of the
subclass's NamedTuples, read or computed by its row step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, Optional, TypeVar

import torch
from torch import Tensor

from . import policy
from ._params import accumulation_dtype

__all__ = [
    "ChunkLoop",
    "Grads",
    "Needs",
    "accumulate_weight_grad",
    "check_head",
    "chunk_bounds",
    "chunk_of",
    "expected_upstream",
    "final_dtypes",
    "gradient_buffers",
    "grads_or_none",
    "hidden_grad_into",
    "logits_into",
    "matmul_inputs",
    "needs_of",
    "rescale",
]

Rows = TypeVar("Rows", bound=tuple)


class Needs(NamedTuple):
    """Which gradients a call computes (in the ops' schemas: three flat bools)."""

    need_hidden: bool
    need_weight: bool
    need_bias: bool


class Grads(NamedTuple):
    """hidden's gradient ``(N, H)``, weight's ``(C, H)`` and bias' ``(C,)`` (their accumulators
    while the loop runs); a ``(0,)`` stand-in for a gradient not asked for."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor


def check_head(hidden, weight, bias, target, class_weight, chunk_size,
               reduce_hidden_grad) -> bool:  # fmt: skip
    """The checks of both heads' tensors and switches, in one order (so that one bad argument
    raises the same error from either), run after the caller has made its checked
    :class:`lsr_fused.LossOptions`. Returns whether autocast is on for hidden's device (the dtypes
    are then cast later)."""
    policy.check_reduce_hidden_grad(reduce_hidden_grad)
    device_type = hidden.device.type if isinstance(hidden, Tensor) else "cpu"
    autocast = torch.is_autocast_enabled(device_type)
    policy.check_linear_tensors(hidden, weight, bias, target, class_weight, chunk_size, autocast)
    return autocast


def matmul_inputs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], autocast: bool):
    """``(hidden, weight, bias)`` as the matmuls read them: under autocast, in the autocast dtype
    (as ``F.linear`` would; the casts are differentiable, so float32 parameters get float32
    gradients); the loss stays float32."""
    if not autocast:
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(hidden.device.type)
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def needs_of(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Needs:
    """Which of the head's inputs want a gradient."""
    return Needs(
        hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad
    )


def expected_upstream(dtype: torch.dtype, device, denominator: Optional[Tensor]) -> Tensor:
    """``(1,)``: the upstream gradient ``loss.backward()`` sends every row, 1 for ``"sum"``, or
    ``1 / denominator`` for ``"mean"`` (computed as autograd's backward of the division will)."""
    ones = torch.ones(1, dtype=dtype, device=device)
    return ones if denominator is None else ones / denominator


def chunk_bounds(rows: int, chunk: int):
    """``(start, stop)`` of each chunk of ``chunk`` rows out of ``rows``."""
    for start in range(0, rows, chunk):
        yield start, min(rows, start + chunk)


def chunk_of(rows: Rows, start: int, stop: int) -> Rows:
    """``rows``, a NamedTuple of per-row tensors (or of such NamedTuples; None for one a pass does
    not have), cut to rows ``[start, stop)``."""
    part = slice(start, stop)
    cut = [
        field[part] if isinstance(field, Tensor)
        else None if field is None
        else chunk_of(field, start, stop)
        for field in rows
    ]  # fmt: skip
    return tuple.__new__(type(rows), cut)  # NamedTuple._make without its Python frame


def logits_into(buffer: Tensor, h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``h @ weight^T (+ bias)`` written into the first ``len(h)`` rows of ``buffer``."""
    out = buffer[: h.shape[0]]
    if bias is None:
        torch.mm(h, weight.t(), out=out)
    else:
        torch.addmm(bias, h, weight.t(), out=out)
    return out


def hidden_grad_into(out: Tensor, grad_logits: Tensor, weight: Tensor) -> None:
    """``out = grad_logits @ weight`` in ``out``'s dtype (float32 for half inputs where the sharded
    head sums the contributions over ranks)."""
    if out.dtype == grad_logits.dtype:
        torch.mm(grad_logits, weight, out=out)
    elif out.device.type == "cuda":
        torch.ops.aten.mm.dtype_out(grad_logits, weight, out.dtype, out=out)
    else:  # the CPU has no mixed-dtype matmul
        out.copy_(torch.mm(grad_logits, weight))


def accumulate_weight_grad(acc: Tensor, grad_logits: Tensor, h: Tensor) -> None:
    """``acc += grad_logits^T @ h``, accumulated in ``acc``'s dtype."""
    if acc.dtype == grad_logits.dtype:
        acc.addmm_(grad_logits.t(), h)
    elif acc.device.type == "cuda":
        # cuBLAS multiplies half operands into the float32 accumulator directly.
        torch.ops.aten.addmm.dtype_out(acc, grad_logits.t(), h, acc.dtype, out=acc)
    else:
        # The CPU has no mixed-dtype matmul: multiply in the accumulator's dtype.
        acc.addmm_(grad_logits.t().to(acc.dtype), h.to(acc.dtype))


def gradient_buffers(
    hidden: Tensor, weight: Tensor, needs: Sequence[bool], hidden_dtype=None, fill=torch.zeros
) -> Grads:
    """The gradients a loop fills: hidden's (uninitialised, ``hidden_dtype``, default hidden's),
    weight's and bias' accumulators (``fill``ed; float32 for half weights, float64 for float64);
    ``(0,)`` where not needed. ``fill=torch.empty`` gives the shapes and dtypes only."""
    need_hidden, need_weight, need_bias = needs
    acc, device = accumulation_dtype(weight.dtype), weight.device
    # A fresh stand-in each: the ops' outputs must not alias one another.
    return Grads(
        hidden.new_empty(hidden.shape, dtype=hidden_dtype or hidden.dtype)
        if need_hidden
        else hidden.new_empty(0),
        fill(weight.shape, dtype=acc, device=device) if need_weight else hidden.new_empty(0),
        fill(weight.shape[0], dtype=acc, device=device) if need_bias else hidden.new_empty(0),
    )


def final_dtypes(grads: Grads, needs: Sequence[bool], hidden: Tensor, weight: Tensor,
                 bias: Optional[Tensor]) -> Grads:  # fmt: skip
    """Each computed gradient in its input's dtype (the accumulators cast down); the ``(0,)``
    stand-ins stay as they are."""
    grad_hidden, grad_weight, grad_bias = grads
    need_hidden, need_weight, need_bias = needs
    # Compared first: a dtype test costs a fraction of a no-op ``.to`` on every call.
    return Grads(
        grad_hidden.to(hidden.dtype) if need_hidden and grad_hidden.dtype != hidden.dtype
        else grad_hidden,
        grad_weight.to(weight.dtype) if need_weight and grad_weight.dtype != weight.dtype
        else grad_weight,
        grad_bias.to(bias.dtype) if need_bias and grad_bias.dtype != bias.dtype else grad_bias,
    )  # fmt: skip


def grads_or_none(grads: Sequence[Optional[Tensor]], needs: Sequence[bool]) -> tuple:
    """The autograd outputs for hidden, weight and bias: each computed gradient, else None."""
    (grad_hidden, grad_weight, grad_bias), (need_hidden, need_weight, need_bias) = grads, needs
    return (
        grad_hidden if need_hidden else None,
        grad_weight if need_weight else None,
        grad_bias if need_bias else None,
    )


def rescale(grads: Grads, needs: Sequence[bool], upstream: Tensor, grad_guess: Tensor) -> None:
    """Gradients computed for the upstream ``grad_guess`` ``(1,)``, scaled in place to the real
    ``upstream`` (one value, in ``grad_guess``'s dtype): by exactly 1 when they agree (kept 1 when
    both are inf: every row ignored, ``"mean"``)."""
    upstream = upstream.reshape(1)
    scale = torch.where(upstream == grad_guess, 1.0, upstream / grad_guess)
    for grad, need in zip(grads, needs, strict=True):
        if need:
            grad.mul_(scale)


class ChunkLoop:
    """The chunk loop of one call on ``hidden`` ``(N, H)``, ``weight`` ``(C, H)`` (this rank's
    classes when sharded) and ``bias``; a subclass supplies the row step (see the module doc)."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], chunk_size: int,
                 hidden_grad_dtype: Optional[torch.dtype] = None):  # fmt: skip
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.rows, self.width = hidden.shape[0], weight.shape[0]
        self.chunk = max(1, min(int(chunk_size), max(self.rows, 1)))
        self.acc_dtype = accumulation_dtype(hidden.dtype)
        self.hidden_grad_dtype = hidden_grad_dtype or hidden.dtype

    def chunks(self):
        """``(start, stop)`` of every chunk, in order."""
        return chunk_bounds(self.rows, self.chunk)

    def gradients(self, needs: Sequence[bool]) -> Grads:
        """The gradient outputs of a pass (zeroed accumulators; see :func:`gradient_buffers`)."""
        return gradient_buffers(self.hidden, self.weight, needs, self.hidden_grad_dtype)

    def accumulate(self, grads: Grads, grad_logits: Tensor, start: int, stop: int) -> None:
        """The chunk's share of each gradient, from its logits' gradient ``G``."""
        if grads.hidden.numel():
            out = grads.hidden[start:stop]
            if out.dtype == grad_logits.dtype:
                torch.mm(grad_logits, self.weight, out=out)
            else:
                hidden_grad_into(out, grad_logits, self.weight)
        if grads.weight.numel():
            accumulate_weight_grad(grads.weight, grad_logits, self.hidden[start:stop])
        if grads.bias.numel():
            grads.bias.add_(grad_logits.sum(0, dtype=grads.bias.dtype))

    def finish_gradients(self, grads: Grads) -> None:
        """What a gradient pass does after the last chunk (nothing here)."""

    def run(self, step: Callable[[Tensor, Rows], tuple], rows: Rows, outputs: tuple = (),
            grads: Optional[Grads] = None) -> tuple:  # fmt: skip
        """One pass over the chunks: ``step(logits, rows cut to the chunk)`` on each chunk's logits,
        its results written into ``outputs`` (returned); with ``grads``, ``step`` must have written
        the logits' gradient over them, and it is accumulated into ``grads``."""
        device_type = self.hidden.device.type
        if torch.is_autocast_enabled(device_type):
            # The matmuls run in the inputs' dtypes. (Only here: entering the context costs
            # microseconds on every call.)
            with torch.autocast(device_type, enabled=False):
                return self._pass(step, rows, outputs, grads)
        return self._pass(step, rows, outputs, grads)

    def _pass(self, step, rows, outputs: tuple, grads: Optional[Grads]) -> tuple:
        buffer = self.hidden.new_empty((self.chunk, self.width))
        for start, stop in self.chunks():
            logits = logits_into(buffer, self.hidden[start:stop], self.weight, self.bias)
            whole = start == 0 and stop == self.rows  # the common case: one chunk
            results = step(logits, rows if whole else chunk_of(rows, start, stop))
            # (An output slot left None is one this pass does not produce.)
            written = (output for output in outputs if output is not None)
            for output, result in zip(written, results, strict=True):
                output[start:stop] = result
            if grads is not None:
                self.accumulate(grads, logits, start, stop)  # `logits` holds G now
        if grads is not None:
            self.finish_gradients(grads)
        return outputs
