"""The fused classifier + label-smoothed loss with the classes sharded over a process group: a
tensor-parallel (vocabulary-parallel) LM head whose logits never exist, on any rank.

Reached through ``linear_label_smoothing_cross_entropy(..., process_group=pg)`` or
``LinearLabelSmoothingCE(..., process_group=pg)``. Rank ``k`` of the group holds the classifier rows
of its contiguous slice ``[offset_k, offset_k + C_k)`` of the ``C = sum_k C_k`` classes (``weight``
``(C_k, H)``, ``bias`` and ``class_weight`` ``(C_k,)``; slices may be uneven, empty included, and
are ordered by rank, exactly as for the vocabulary-parallel loss of :mod:`lsr_fused.distributed`).
``hidden`` ``(..., H)`` is the same on every rank and ``target`` holds global class indices.

Per chunk of ``n`` rows (the chunk loop of :mod:`lsr_fused.linear`, the statistics of
:mod:`lsr_fused.distributed`)::

    x_k   = h W_k^T + b_k                       (n, C_k) in one reusable buffer, torch matmul
    stats = shard_stats(x_k)                    (6, n): max, sum-exp, sum w (x - r), x_y - r, w_y, r
    all_reduce(MAX) of n values, all_reduce(SUM) of 4 n values   -> lse, S, loss per row
                                                (r: this shard's reference for the row)
    G_k   = shard_grad(x_k)                     written over x_k, in place (training, sum/mean)
    d h  += G_k W_k      d W_k += G_k^T h       d b_k += sum_rows G_k

so only O(n) statistics per chunk cross the network (never logits, never weights), and every rank
computes the same loss, equal to the unsharded one (the smoothing masses use the global ``C``).
``W_k`` and ``b_k`` get their own slice of the true gradient. ``hidden``'s true gradient is the sum
over ranks of ``G_k W_k``: by default the op all-reduces it (one SUM of ``N x H`` values, in float32
for half inputs) so that plain code is correct; ``reduce_hidden_grad=False`` hands back this rank's
contribution only, for frameworks whose "copy to tensor-parallel region" already all-reduces the
gradient of the head's input (Megatron-LM's ``copy_to_tensor_model_parallel_region``)::

    hidden_tp = copy_to_tensor_parallel_region(hidden, tp_group)  # identity; backward: all-reduce
    loss = linear_label_smoothing_cross_entropy(
        hidden_tp, lm_head.weight, labels, 0.1,  # lm_head.weight: this rank's (C_k, H) rows
        process_group=tp_group, reduce_hidden_grad=False,
    )

Collectives per call: the agreement exchange of :mod:`lsr_fused.distributed` (one small all-gather:
shapes, dtype, options, chunk size, and the options below must agree, else every rank raises the
same ``ValueError``); with class weights, one SUM of 2 values (their total ``W`` and the mean's
denominator ``sum w_y``); per chunk, the MAX and the SUM above; the hidden gradient's SUM (in the
forward pass of a ``"sum"``/``"mean"`` training step, where the gradients are computed; in backward
for ``"none"``, which recomputes the chunks with the saved log-sum-exps and needs no statistics).
Every rank must therefore run the same calls, backward included (as with any collective).

Chunks: ``chunk_size`` must be the same on every rank (checked); the default follows the memory rule
of :func:`lsr_fused.linear.default_chunk_size` for the widest shard, so every rank runs the same
number of chunks. Backends: the sharded kernels (``"auto"``: Triton on CUDA, torch elsewhere;
``"cpp"`` runs torch), as for the vocabulary-parallel loss. Being built on host-side agreement and
collectives, the sharded form runs eagerly (``torch.compile`` breaks the graph around it).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import policy
from ._params import smoothing_masses
from .distributed.agreement import (
    Field,
    ShardInput,
    agree,
    check_exchange_values,
    describe,
    resolve_group,
    run_checks,
    shown_as,
)
from .distributed.shard_math import (
    all_reduce_stats,
    grad_coefs,
    local_targets,
    row_terms,
    shard_kernels,
)
from .linear_chunks import accumulate_weight_grad, chunk_bounds, logits_into

__all__ = ["sharded_linear_label_smoothing_cross_entropy"]

_CALLER = "linear_label_smoothing_cross_entropy"
# The common fields of the agreement exchange (by key), in this entry point's words.
_RENAMES = {
    "ndim": "the number of hidden dimensions",
    "dtype": "the dtype of hidden and weight",
    "has_weight": "whether class_weight is given",
}
# ... and its own fields, in the order of ``describe``'s ``extra``.
_EXTRA_FIELDS = (
    Field("features", "the number of features (hidden's last dimension)"),
    Field("has_bias", "whether bias is given", show=shown_as(bool)),
    Field("chunk_size", "chunk_size (0: the default)"),
    Field("hidden_grad", "whether hidden requires a gradient (with grad mode on)",
          show=shown_as(bool)),
    Field("reduce_hidden_grad", "whether reduce_hidden_grad", show=shown_as(bool)),
)  # fmt: skip


class _Setup(NamedTuple):
    group: object
    backend: str
    num_classes: int
    masses: tuple[float, float]
    z_loss: float
    ignore_index: int
    chunk: int
    reduce_hidden_grad: bool
    needs: tuple[bool, bool, bool]  # hidden, weight, bias

    @property
    def row_scalars(self):
        return self.num_classes, self.masses, self.z_loss, self.ignore_index


def _hidden_grad_into(out: Tensor, grad_logits: Tensor, weight: Tensor) -> None:
    """``out = grad_logits @ weight`` in ``out``'s dtype (float32 for half inputs when the
    contributions are summed over ranks)."""
    if out.dtype == grad_logits.dtype:
        torch.mm(grad_logits, weight, out=out)
    elif out.device.type == "cuda":
        torch.ops.aten.mm.dtype_out(grad_logits, weight, out.dtype, out=out)
    else:  # the CPU has no mixed-dtype matmul
        out.copy_(torch.mm(grad_logits, weight))


class _Loop:
    """The chunk loop of one call, on this rank's classes."""

    def __init__(self, hidden, weight, bias, local_target, class_weight, setup: _Setup):
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.local_target, self.class_weight, self.setup = local_target, class_weight, setup
        self.rows, self.width = hidden.shape[0], weight.shape[0]
        self.stats_fn, self.grad_fn = shard_kernels(setup.backend)
        self.acc = policy.accumulation_dtype(hidden.dtype)

    def buffer(self) -> Tensor:
        return self.hidden.new_empty((min(self.setup.chunk, max(self.rows, 1)), self.width))

    def logits(self, buffer: Tensor, start: int, stop: int) -> Tensor:
        return logits_into(buffer, self.hidden[start:stop], self.weight, self.bias)

    def gradients(self, needs) -> list[Tensor]:
        """hidden's gradient (to be filled; the accumulation dtype when summed over ranks),
        weight's and bias' zeroed accumulators; ``(0,)`` where not needed."""
        need_hidden, need_weight, need_bias = needs
        empty = self.hidden.new_empty(0)
        hidden_dtype = self.acc if self.setup.reduce_hidden_grad else self.hidden.dtype
        zeros = dict(dtype=policy.accumulation_dtype(self.weight.dtype), device=self.weight.device)
        return [
            self.hidden.new_empty(self.hidden.shape, dtype=hidden_dtype) if need_hidden else empty,
            torch.zeros(self.weight.shape, **zeros) if need_weight else empty,
            torch.zeros(self.width, **zeros) if need_bias else empty,
        ]

    def write_grad(self, logits: Tensor, coefs: Tensor, start: int, stop: int) -> None:
        rows = logits.unsqueeze(1)  # (n, 1, C_k): the row view of a contiguous buffer
        self.grad_fn(rows, self.local_target[start:stop], self.class_weight, coefs, rows)

    def accumulate(self, grads, grad_logits: Tensor, start: int, stop: int) -> None:
        grad_hidden, grad_weight, grad_bias = grads
        if grad_hidden.numel():
            _hidden_grad_into(grad_hidden[start:stop], grad_logits, self.weight)
        if grad_weight.numel():
            accumulate_weight_grad(grad_weight, grad_logits, self.hidden[start:stop])
        if grad_bias.numel():
            grad_bias.add_(grad_logits.sum(0, dtype=grad_bias.dtype))

    def reduce_hidden(self, grads, needs) -> None:
        """Sum hidden's gradient over the group, when asked (the same decision on every rank)."""
        if needs[0] and self.setup.reduce_hidden_grad and self.rows:
            dist.all_reduce(grads[0], op=dist.ReduceOp.SUM, group=self.setup.group)

    def cast(self, grads, needs):
        """Each gradient in its input's dtype; None for those not asked for."""
        grad_hidden, grad_weight, grad_bias = grads
        return (
            grad_hidden.to(self.hidden.dtype) if needs[0] else None,
            grad_weight.to(self.weight.dtype) if needs[1] else None,
            grad_bias.to(self.bias.dtype) if needs[2] else None,
        )


class _ShardedLinear(torch.autograd.Function):
    """Forward: per-row losses ``(N,)``, or, given ``grad_guess``, their sum with every gradient
    computed for that upstream value (scaled in backward by the real one)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, flat_target, local_target, class_weight, total_weight,
                grad_guess, setup: _Setup):  # fmt: skip
        loop = _Loop(hidden, weight, bias, local_target, class_weight, setup)
        rows, acc = loop.rows, loop.acc
        total = float(setup.num_classes) if total_weight is None else total_weight
        # W_k, this shard's class-weight sum (its width without weights).
        shard_weight = float(loop.width) if class_weight is None else class_weight.sum()
        # loss, lse, lse - r_k, r_k, S, w_y
        per_row = torch.empty(6, rows, dtype=acc, device=hidden.device)
        with_grad = grad_guess is not None
        grads = loop.gradients(setup.needs) if with_grad else None
        with torch.autocast(hidden.device.type, enabled=False):
            buffer = loop.buffer()
            stats = torch.empty(6 * buffer.shape[0], dtype=acc, device=hidden.device)
            for start, stop in chunk_bounds(rows, setup.chunk):
                n = stop - start
                logits = loop.logits(buffer, start, stop)
                chunk_stats = stats[: 6 * n].view(6, n)
                chunk_target = local_target[start:stop]
                loop.stats_fn(logits.unsqueeze(1), chunk_target, class_weight, chunk_stats)
                reduced = all_reduce_stats(
                    chunk_stats, chunk_target, shard_weight, None, setup.group
                )
                terms = row_terms(reduced, total, flat_target[start:stop], setup.row_scalars)
                per_row[:, start:stop] = torch.stack(
                    [terms.loss, terms.lse, terms.shard_lse, terms.reference, terms.total_mass,
                     terms.target_weight]
                )  # fmt: skip
                if with_grad:
                    coefs = grad_coefs(grad_guess.expand(n), *terms[1:], setup.masses, setup.z_loss)
                    loop.write_grad(logits, coefs, start, stop)
                    loop.accumulate(grads, logits, start, stop)  # `logits` holds G now
            if with_grad:
                loop.reduce_hidden(grads, setup.needs)
        loss, lse, shard_lse, reference, total_mass, target_weight = per_row
        ctx.save_for_backward(
            hidden, weight, bias, flat_target, local_target, class_weight, lse, shard_lse,
            reference, total_mass, target_weight, grad_guess,
        )  # fmt: skip
        ctx.setup = setup
        ctx.set_materialize_grads(False)
        # Kept off save_for_backward on purpose: backward scales them in place. They are handed
        # out once; a second backward (retain_graph) recomputes them.
        ctx.grads = grads
        return loss.sum() if with_grad else loss

    @staticmethod
    def backward(ctx, grad_out):
        policy.refuse_double_backward("the vocabulary-parallel fused head (process_group=)")
        saved = ctx.saved_tensors
        hidden, weight, bias, flat_target, local_target, class_weight = saved[:6]
        lse, shard_lse, reference, total_mass, target_weight, grad_guess = saved[6:]
        setup = ctx.setup
        nones = (None,) * 6
        if grad_out is None:
            return (None, None, None, *nones)
        grads, ctx.grads = ctx.grads, None
        if grads is not None:
            # Computed for upstream `grad_guess`; the real one is `grad_out`. The ratio is exactly
            # 1 when they agree (and kept 1 when both are inf: all rows ignored, mean).
            upstream = grad_out.to(lse.dtype).reshape(1)
            scale = torch.where(upstream == grad_guess, 1.0, upstream / grad_guess)
            for grad, need in zip(grads, setup.needs, strict=True):
                if need:
                    grad.mul_(scale)
            loop = _Loop(hidden, weight, bias, local_target, class_weight, setup)
            return (*loop.cast(grads, setup.needs), *nones)
        loop = _Loop(hidden, weight, bias, local_target, class_weight, setup)
        upstream = grad_out.to(lse.dtype).reshape(-1).expand(loop.rows)
        ignored = flat_target == setup.ignore_index
        in_range = (flat_target >= 0) & (flat_target < setup.num_classes)
        needs = setup.needs
        grads = loop.gradients(needs)
        with torch.autocast(hidden.device.type, enabled=False):
            buffer = loop.buffer()
            for start, stop in chunk_bounds(loop.rows, setup.chunk):
                logits = loop.logits(buffer, start, stop)
                part = slice(start, stop)
                coefs = grad_coefs(
                    upstream[part], lse[part], shard_lse[part], reference[part], total_mass[part],
                    target_weight[part], ignored[part], in_range[part], setup.masses, setup.z_loss,
                )  # fmt: skip
                loop.write_grad(logits, coefs, start, stop)
                loop.accumulate(grads, logits, start, stop)
            loop.reduce_hidden(grads, needs)
        return (*loop.cast(grads, needs), *nones)


class _Checked(NamedTuple):
    """This rank's arguments, checked: its description row and what the call goes on with."""

    description: Tensor
    backend: str
    flat_target: Tensor
    dtype: torch.dtype  # of the matmuls (the autocast dtype under autocast)
    autocast: bool


def _check(hidden, weight, bias, target, class_weight, options, chunk_size, backend,
           reduce_hidden_grad) -> _Checked:  # fmt: skip
    """Every local check, then :func:`describe`; raises what a check raises."""
    label_smoothing, ignore_index, _, _, z_loss = options
    check_exchange_values(label_smoothing, ignore_index, z_loss, chunk_size)
    policy.check_options(*options, backend)
    policy.check_reduce_hidden_grad(reduce_hidden_grad)
    device_type = hidden.device.type if isinstance(hidden, Tensor) else "cpu"
    autocast = torch.is_autocast_enabled(device_type)
    policy.check_linear_tensors(hidden, weight, bias, target, class_weight, chunk_size, autocast)
    policy.check_sharded_autograd(class_weight, "class_weight")
    resolved = policy.resolve_backend(backend, hidden.device, sharded=True)
    dtype = torch.get_autocast_dtype(device_type) if autocast else hidden.dtype
    flat_target = policy.flat_targets(target)
    shard = ShardInput(weight.shape[0], hidden.dim(), dtype)
    wants_hidden_grad = torch.is_grad_enabled() and hidden.requires_grad
    extra = (
        weight.shape[1], bias is not None, chunk_size or 0, wants_hidden_grad, reduce_hidden_grad,
    )  # fmt: skip
    has_weight = class_weight is not None
    description = describe(shard, flat_target, target.shape, has_weight, options, extra)
    return _Checked(description, resolved, flat_target, dtype, autocast)


def _weight_totals(class_weight: Tensor, local_target: Tensor, counted: Tensor, group):
    """``(W, sum of w_y over counted rows)`` over the group, each rank adding its own classes and
    the targets it holds: one SUM of 2 values (skipped with no rows, on every rank alike)."""
    here = (local_target >= 0) & counted
    safe = torch.where(here, local_target, 0)
    picked = class_weight.gather(0, safe) if class_weight.numel() else safe.to(class_weight.dtype)
    totals = torch.stack([class_weight.sum(), torch.where(here, picked, 0.0).sum()])
    if local_target.numel():
        dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=group)
    return totals[0], totals[1]


def _apply(tensors, setup: _Setup, reduction: str, denominator, target_shape) -> Tensor:
    """The op on ``tensors`` (as :class:`_ShardedLinear` takes them), then the reduction."""
    flat_hidden = tensors[0]
    if torch.is_grad_enabled() and any(setup.needs) and reduction != "none":
        # As in lsr_fused.linear: gradients computed now for the upstream value loss.backward()
        # sends (1 for sum, 1 / denominator for mean), scaled in backward by the real one.
        acc = policy.accumulation_dtype(flat_hidden.dtype)
        grad_guess = torch.ones(1, dtype=acc, device=flat_hidden.device)
        if reduction == "mean":
            grad_guess = grad_guess / denominator
        loss_sum = _ShardedLinear.apply(*tensors, grad_guess, setup)
        return policy.reduce(loss_sum.reshape(1), target_shape, reduction, denominator)
    loss = _ShardedLinear.apply(*tensors, None, setup)
    return policy.reduce(loss, target_shape, reduction, denominator)


def sharded_linear_label_smoothing_cross_entropy(
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
    process_group=None,
    reduce_hidden_grad: bool = True,
) -> Tensor:
    """The fused classifier + loss with ``weight``/``bias``/``class_weight`` holding this rank's
    class slice; see the module docstring. Raises ``ValueError`` on every rank of the group when
    ranks disagree or one rank's arguments are invalid."""
    group = resolve_group(process_group)
    options = (label_smoothing, ignore_index, reduction, spread, z_loss)
    checked, local_error = run_checks(
        _check, hidden, weight, bias, target, class_weight, options, chunk_size, backend,
        reduce_hidden_grad,
    )  # fmt: skip
    description = None if checked is None else checked.description
    num_classes, offset, widths = agree(
        group, description, local_error, options, device_of=hidden, extra_fields=_EXTRA_FIELDS,
        renames=_RENAMES, caller=_CALLER,
    )  # fmt: skip
    resolved, flat_target, dtype = checked.backend, checked.flat_target, checked.dtype
    if checked.autocast:
        # As F.linear under autocast (see lsr_fused.linear): matmuls in the autocast dtype.
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    flat_hidden = hidden.reshape(-1, weight.shape[1])
    if chunk_size is None:
        # The same on every rank: the memory rule for the widest shard.
        chunk_size = policy.default_chunk_size(flat_hidden.shape[0], max(widths), dtype)
    acc = policy.accumulation_dtype(dtype)
    local_target = local_targets(flat_target, offset, weight.shape[0])
    counted = flat_target != ignore_index
    total_weight = denominator = None
    if class_weight is not None:
        class_weight = class_weight.to(acc).contiguous()
        total_weight, denominator = _weight_totals(class_weight, local_target, counted, group)
    if reduction == "mean" and class_weight is None:
        denominator = counted.sum(dtype=acc)
    masses = smoothing_masses(float(label_smoothing), num_classes, spread)
    needs = (
        flat_hidden.requires_grad,
        weight.requires_grad,
        bias is not None and bias.requires_grad,
    )
    setup = _Setup(group, resolved, num_classes, masses, float(z_loss), ignore_index,
                   int(chunk_size), reduce_hidden_grad, needs)  # fmt: skip
    tensors = (flat_hidden, weight, bias, flat_target, local_target, class_weight, total_weight)
    return _apply(tensors, setup, reduction, denominator, target.shape)
