"""The fused classifier + label-smoothed loss with the classes sharded over a process group: a
tensor-parallel (vocabulary-parallel) LM head whose logits never exist, on any rank.

Reached through ``linear_label_smoothing_cross_entropy(..., process_group=pg)`` or
``LinearLabelSmoothingCE(..., process_group=pg)``. Rank ``k`` of the group holds the classifier rows
of its contiguous slice ``[offset_k, offset_k + C_k)`` of the ``C = sum_k C_k`` classes (``weight``
``(C_k, H)``, ``bias`` and ``class_weight`` ``(C_k,)``; slices may be uneven, empty included, and
are ordered by rank, exactly as for the vocabulary-parallel loss of :mod:`lsr_fused.distributed`).
``hidden`` ``(..., H)`` is the same on every rank and ``target`` holds global class indices.

Per chunk of ``n`` rows (the chunk loop of :mod:`lsr_fused.linear_chunks`, whose row step here is
the statistics of :mod:`lsr_fused.distributed`)::

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

import functools
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from typing_extensions import Unpack

from . import linear_chunks, policy
from ._validation import check_mix_targets
from .distributed.agreement import (
    NEWER_OPTION_FIELDS,
    Field,
    ShardInput,
    agree,
    check_exchange_values,
    describe,
    newer_option_values,
    resolve_group,
    run_checks,
    shown_as,
)
from .distributed.shard_math import (
    RowTerms,
    all_reduce_stats,
    global_argmax,
    grad_coefs,
    local_targets,
    mix_masses,
    row_terms,
    shard_kernels,
)
from .options import HEAD_KEYWORDS, HeadKeywords, LossOptions, option_fields, shows_option_keywords
from .stats import loss_stats

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
    *NEWER_OPTION_FIELDS,
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
    needs: linear_chunks.Needs
    softcap: float  # 0.0: off
    stats: bool
    offset: int  # this rank's first class

    @property
    def row_scalars(self):
        return self.num_classes, self.masses, self.z_loss, self.ignore_index


class _Inputs(NamedTuple):
    """What the op reads besides hidden, weight and bias (none of it differentiated)."""

    flat_target: Tensor  # (N,) global class indices
    local_target: Tensor  # (N,) the class in this shard's slice, -1 where it lives elsewhere
    class_weight: Optional[Tensor]  # (C_k,) this shard's, in the accumulation dtype
    total_weight: Optional[Tensor]  # W, the class weights' sum over the group (None: C)
    grad_guess: Optional[Tensor]  # (1,): compute the gradients in forward for this upstream
    mix_target: Optional[Tensor] = None  # (N,) the mixed target's global classes
    local_mix: Optional[Tensor] = None  # (N,) ... in this shard's slice, -1 elsewhere
    mix_lambda: Optional[Tensor] = None  # (N,) lam, any stride


class _Rows(NamedTuple):
    """The per-row inputs of the sharded row step (``(N,)`` each; None where a pass has none)."""

    target: Optional[Tensor]  # forward: global class indices
    local_target: Tensor
    upstream: Optional[Tensor] = None  # backward: d loss / d loss_r
    terms: Optional[RowTerms] = None  # backward: the forward pass's per-row terms
    mix_target: Optional[Tensor] = None
    local_mix: Optional[Tensor] = None
    mix_lambda: Optional[Tensor] = None
    masses: Optional[_Masses] = None  # backward: the forward pass's (lam w_y1, (1 - lam) w_y2)


class _Masses(NamedTuple):
    """The two targets' per-row shares of the target weight (mixed targets)."""

    first: Tensor
    second: Tensor


class _Out(NamedTuple):
    """The forward row step's per-row outputs: the terms, the mixed masses and the arg-max (None
    where a call has none)."""

    terms: RowTerms
    masses: Optional[_Masses]
    argmax: Optional[Tensor]


class _Loop(linear_chunks.ChunkLoop):
    """The chunk loop of one call on this rank's classes, with the sharded statistics, their
    all-reduce and the shard gradient as its row step; with ``grad_guess`` (the upstream gradient
    of every row), forward also writes the gradient."""

    def __init__(self, hidden, weight, bias, inputs: _Inputs, setup: _Setup):
        # hidden's gradient is summed over ranks in the accumulation dtype.
        summed = policy.accumulation_dtype(hidden.dtype) if setup.reduce_hidden_grad else None
        super().__init__(hidden, weight, bias, setup.chunk, hidden_grad_dtype=summed)
        self.inputs, self.class_weight, self.setup = inputs, inputs.class_weight, setup
        self.stats_fn, self.grad_fn = shard_kernels(setup.backend)
        self.stats = None  # the (6, chunk) statistics of a chunk, allocated on first use

    def row_outputs(self) -> tuple:
        """The flat per-row outputs of the forward pass: :class:`RowTerms`, then the masses and
        the arg-max (None slots where the call has none)."""
        dtypes = {"ignored": torch.bool, "in_range": torch.bool}
        new = self.hidden.new_empty
        terms = [
            new(self.rows, dtype=dtypes.get(name, self.acc_dtype)) for name in RowTerms._fields
        ]
        mixed = self.inputs.mix_target is not None
        masses = [new(self.rows, dtype=self.acc_dtype) if mixed else None for _ in range(2)]
        argmax = new(self.rows, dtype=torch.int64) if self.setup.stats else None
        return (*terms, *masses, argmax)

    @functools.cached_property
    def weight_sums(self) -> tuple:
        """``(W_k, W)``: this shard's class-weight sum and the group's (the number of classes
        without weights)."""
        if self.class_weight is None:
            return float(self.width), float(self.setup.num_classes)
        return self.class_weight.sum(), self.inputs.total_weight

    def forward_rows(self, logits: Tensor, rows: _Rows) -> tuple:
        """The chunk's per-row terms (and masses, arg-max): this shard's statistics, all-reduced
        over the group; with ``grad_guess``, the chunk's gradient over ``logits``."""
        n, setup = logits.shape[0], self.setup
        height = 6 if rows.local_mix is None else 8
        if self.stats is None:
            self.stats = torch.empty(
                height * self.chunk, dtype=self.acc_dtype, device=logits.device
            )
        stats = self.stats[: height * n].view(height, n)
        argmax = logits.new_empty(n, dtype=torch.int64) if setup.stats else None
        self.stats_fn(logits.unsqueeze(1), rows.local_target, self.class_weight, stats,
                      softcap=setup.softcap, local_mix_target=rows.local_mix,
                      argmax_out=argmax)  # fmt: skip
        reduced = all_reduce_stats(stats, rows.local_target, self.weight_sums[0], None,
                                   setup.group, local_mix_target=rows.local_mix)  # fmt: skip
        if argmax is not None:
            argmax = global_argmax(stats[0], argmax, setup.offset, setup.group)
        masses = mix = None
        if rows.local_mix is not None:
            masses = _Masses(*mix_masses(reduced, rows.target, setup.ignore_index, rows.mix_lambda))
            mix = (rows.mix_target, torch.stack(masses))
        terms = row_terms(reduced, self.weight_sums[1], rows.target, setup.row_scalars, mix=mix)
        if self.inputs.grad_guess is not None:
            upstream = self.inputs.grad_guess.expand(n)
            self.backward_rows(logits, rows._replace(upstream=upstream, terms=terms, masses=masses))
        return (*terms, *(masses or ()), *(() if argmax is None else (argmax,)))

    def backward_rows(self, logits: Tensor, rows: _Rows) -> tuple:
        """The chunk's gradient for per-row ``rows.upstream``, written over ``logits``."""
        mixed = None if rows.masses is None else torch.stack(tuple(rows.masses))
        coefs = grad_coefs(rows.upstream, *rows.terms[1:], self.setup.masses, self.setup.z_loss,
                           mix_masses=mixed)  # fmt: skip
        view = logits.unsqueeze(1)  # (n, 1, C_k): the row view of a contiguous buffer
        self.grad_fn(view, rows.local_target, self.class_weight, coefs, view,
                     softcap=self.setup.softcap, local_mix_target=rows.local_mix)  # fmt: skip
        return ()

    def finish_gradients(self, grads: linear_chunks.Grads) -> None:
        """Sum hidden's gradient over the group, when asked (the same decision on every rank)."""
        if self.setup.needs[0] and self.setup.reduce_hidden_grad and self.rows:
            dist.all_reduce(grads.hidden, op=dist.ReduceOp.SUM, group=self.setup.group)

    def outputs(self, grads: linear_chunks.Grads) -> tuple:
        """Autograd's outputs: the gradients in the inputs' dtypes, None for the rest."""
        grads = linear_chunks.final_dtypes(
            grads, self.setup.needs, self.hidden, self.weight, self.bias
        )
        return (*linear_chunks.grads_or_none(grads, self.setup.needs), None, None)  # inputs, setup


def _split(outputs: tuple) -> _Out:
    """The forward pass's flat per-row outputs as :class:`_Out`."""
    width = len(RowTerms._fields)
    first, second, argmax = outputs[width:]
    masses = None if first is None else _Masses(first, second)
    return _Out(RowTerms._make(outputs[:width]), masses, argmax)


class _ShardedLinear(torch.autograd.Function):
    """Forward: per-row losses ``(N,)``, or, given ``inputs.grad_guess``, their sum with every
    gradient computed for that upstream value (scaled in backward by the real one); then the
    per-row absolute lse and arg-max (not differentiable; ``(0,)`` without statistics)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, inputs: _Inputs, setup: _Setup):
        loop = _Loop(hidden, weight, bias, inputs, setup)
        with_grad = inputs.grad_guess is not None
        grads = loop.gradients(setup.needs) if with_grad else None
        rows = _Rows(inputs.flat_target, inputs.local_target, mix_target=inputs.mix_target,
                     local_mix=inputs.local_mix, mix_lambda=inputs.mix_lambda)  # fmt: skip
        out = _split(loop.run(loop.forward_rows, rows, loop.row_outputs(), grads))
        terms = out.terms
        # Backward reads every input but the global targets and every term but the loss.
        kept_inputs, kept_terms = inputs._replace(flat_target=None), terms._replace(loss=None)
        masses = (None, None) if out.masses is None else tuple(out.masses)
        ctx.save_for_backward(hidden, weight, bias, *kept_inputs, *kept_terms, *masses)
        ctx.setup = setup
        ctx.set_materialize_grads(False)
        # Kept off save_for_backward on purpose: backward scales them in place. They are handed
        # out once; a second backward (retain_graph) recomputes them.
        ctx.grads = grads
        lse = terms.lse if setup.stats else terms.lse.new_empty(0)
        argmax = out.argmax if setup.stats else terms.lse.new_empty(0, dtype=torch.int64)
        ctx.mark_non_differentiable(lse, argmax)
        return (terms.loss.sum() if with_grad else terms.loss), lse, argmax

    @staticmethod
    def backward(ctx, grad_out, *unused):
        policy.refuse_double_backward("the vocabulary-parallel fused head (process_group=)")
        hidden, weight, bias, *rest = ctx.saved_tensors
        inputs = _Inputs._make(rest[: len(_Inputs._fields)])
        rest = rest[len(_Inputs._fields) :]
        terms = RowTerms._make(rest[: len(RowTerms._fields)])
        first, second = rest[len(RowTerms._fields) :]
        masses = None if first is None else _Masses(first, second)
        if grad_out is None:
            return (None, None, None, None, None)
        setup = ctx.setup
        loop = _Loop(hidden, weight, bias, inputs._replace(grad_guess=None), setup)
        upstream = grad_out.to(terms.lse.dtype)
        grads, ctx.grads = ctx.grads, None
        if grads is not None:
            linear_chunks.rescale(grads, setup.needs, upstream, inputs.grad_guess)
            return loop.outputs(grads)
        rows = _Rows(None, inputs.local_target, upstream.reshape(-1).expand(loop.rows), terms,
                     local_mix=inputs.local_mix, masses=masses)  # fmt: skip
        grads = loop.gradients(setup.needs)
        loop.run(loop.backward_rows, rows, (), grads)
        return loop.outputs(grads)


class _Checked(NamedTuple):
    """This rank's arguments, checked: its description row and what the call goes on with."""

    description: Tensor
    backend: str
    flat_target: Tensor
    dtype: torch.dtype  # of the matmuls (the autocast dtype under autocast)
    autocast: bool
    options: LossOptions
    mix: tuple[Optional[Tensor], Optional[Tensor]]  # flat mix_target, lam (or None, None)


def _check(hidden, weight, bias, target, class_weight, fields, mix, chunk_size,
           reduce_hidden_grad) -> _Checked:  # fmt: skip
    """Every local check, then :func:`describe`; raises what a check raises."""
    label_smoothing, ignore_index, _, _, z_loss = fields[:5]
    # First: the values the exchange could not pack (an int too large for a float would make the
    # option checks raise OverflowError instead of naming the argument).
    check_exchange_values(label_smoothing, ignore_index, z_loss, chunk_size)
    options = LossOptions(*fields)
    autocast = linear_chunks.check_head(
        hidden, weight, bias, target, class_weight, chunk_size, reduce_hidden_grad
    )
    policy.check_sharded_autograd(class_weight, "class_weight")
    policy.refuse_forward_ad()
    resolved = policy.resolve_backend(options.backend, hidden.device, sharded=True)
    dtype = torch.get_autocast_dtype(hidden.device.type) if autocast else hidden.dtype
    flat_target = policy.flat_targets(target)
    mix_target, mix_lambda = mix
    flat_mix = policy.mix_inputs(mix_target, mix_lambda, target, policy.accumulation_dtype(dtype))
    lam = mix_lambda if isinstance(mix_lambda, Tensor) else None
    policy.check_sharded_autograd(lam, "mix_lambda")
    shard = ShardInput(weight.shape[0], hidden.dim(), dtype)
    wants_hidden_grad = torch.is_grad_enabled() and hidden.requires_grad
    extra = (
        weight.shape[1], bias is not None, chunk_size or 0, wants_hidden_grad, reduce_hidden_grad,
        *newer_option_values(options, flat_mix[0], mix_lambda),
    )  # fmt: skip
    has_weight = class_weight is not None
    description = describe(shard, flat_target, target.shape, has_weight, fields[:5], extra)
    return _Checked(description, resolved, flat_target, dtype, autocast, options, flat_mix)


def _weight_totals(class_weight: Tensor, inputs: _Inputs, counted: Tensor, group):
    """``(W, the mean's denominator)`` over the group: the sum of ``w_y`` (or, mixed, of
    ``lam w_y1 + (1 - lam) w_y2``) over counted rows, each rank adding its own classes and the
    targets it holds: one SUM of 2 values (skipped with no rows, on every rank alike)."""

    def held(local: Tensor) -> Tensor:
        here = (local >= 0) & counted
        safe = torch.where(here, local, 0)
        picked = (
            class_weight.gather(0, safe) if class_weight.numel() else safe.to(class_weight.dtype)
        )
        return torch.where(here, picked, 0.0)

    per_row = held(inputs.local_target)
    if inputs.local_mix is not None:
        lam = torch.where(counted, inputs.mix_lambda, 1.0)
        per_row = lam * per_row + (1.0 - lam) * held(inputs.local_mix)
    totals = torch.stack([class_weight.sum(), per_row.sum()])
    if inputs.local_target.numel():
        dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=group)
    return totals[0], totals[1]


def _apply(hidden, weight, bias, inputs: _Inputs, setup: _Setup, reduction: str, denominator,
           target_shape) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The op, then the reduction: ``(loss, per-row lse, per-row arg-max)``."""
    if torch.is_grad_enabled() and any(setup.needs) and reduction != "none":
        # As in lsr_fused.linear: gradients computed now for the upstream value loss.backward()
        # sends (1 for sum, 1 / denominator for mean), scaled in backward by the real one.
        acc = policy.accumulation_dtype(hidden.dtype)
        mean_of = denominator if reduction == "mean" else None
        grad_guess = linear_chunks.expected_upstream(acc, hidden.device, mean_of)
        inputs = inputs._replace(grad_guess=grad_guess)
        loss_sum, lse, argmax = _ShardedLinear.apply(hidden, weight, bias, inputs, setup)
        loss = policy.reduce(loss_sum.reshape(1), target_shape, reduction, denominator)
        return loss, lse, argmax
    loss, lse, argmax = _ShardedLinear.apply(hidden, weight, bias, inputs, setup)
    return policy.reduce(loss, target_shape, reduction, denominator), lse, argmax


@shows_option_keywords(HEAD_KEYWORDS)
def sharded_linear_label_smoothing_cross_entropy(
    hidden: Tensor, weight: Tensor, target: Tensor, label_smoothing: float = 0.1, *,
    bias: Optional[Tensor] = None, class_weight: Optional[Tensor] = None,
    mix_target: Optional[Tensor] = None, mix_lambda=1.0, chunk_size: Optional[int] = None,
    process_group=None, reduce_hidden_grad: bool = True, **options: Unpack[HeadKeywords],
):  # fmt: skip
    """The fused classifier + loss with ``weight``/``bias``/``class_weight`` holding this rank's
    class slice; see the module docstring. Raises ``ValueError`` on every rank of the group when
    ranks disagree or one rank's arguments are invalid."""
    fields = option_fields(label_smoothing, options, "sharded_linear_label_smoothing_cross_entropy",
                           HEAD_KEYWORDS)  # fmt: skip
    group = resolve_group(process_group)
    checked, local_error = run_checks(
        _check, hidden, weight, bias, target, class_weight, fields, (mix_target, mix_lambda),
        chunk_size, reduce_hidden_grad,
    )  # fmt: skip
    description = None if checked is None else checked.description
    num_classes, offset, widths = agree(
        group, description, local_error, fields[:5], device_of=hidden,
        extra_fields=_EXTRA_FIELDS, renames=_RENAMES, caller=_CALLER,
    )  # fmt: skip
    hidden, weight, bias = linear_chunks.matmul_inputs(hidden, weight, bias, checked.autocast)
    if chunk_size is None:
        # The same on every rank: the memory rule for the widest shard.
        rows = checked.flat_target.shape[0]
        chunk_size = policy.default_chunk_size(rows, max(widths), checked.dtype)
    shard = _Shard(group, num_classes, offset, checked.backend, int(chunk_size))
    loss, stats = _sharded(hidden, weight, bias, checked, class_weight, shard,
                              reduce_hidden_grad, target.shape)  # fmt: skip
    return loss if stats is None else (loss, stats)


class _Shard(NamedTuple):
    """What the agreement exchange settled: the group, the global class count, this rank's first
    class, the backend and the rows per chunk (the same on every rank)."""

    group: object
    num_classes: int
    offset: int
    backend: str
    chunk: int


def _sharded(hidden, weight, bias, checked: _Checked, class_weight, shard: _Shard,
             reduce_hidden_grad: bool, target_shape):  # fmt: skip
    """The agreed call: this rank's targets and class-weight totals, then the op; ``(loss,
    stats or None)``."""
    options, flat_target = checked.options, checked.flat_target
    flat_hidden = hidden.reshape(-1, weight.shape[1])
    acc = policy.accumulation_dtype(hidden.dtype)
    width = weight.shape[0]
    flat_mix, lam = checked.mix
    if flat_mix is not None:
        # The same mix_target on every rank (checksums agreed): every rank raises alike.
        check_mix_targets(flat_target, flat_mix, shard.num_classes, options.ignore_index)
    local_mix = None if flat_mix is None else local_targets(flat_mix, shard.offset, width)
    inputs = _Inputs(flat_target, local_targets(flat_target, shard.offset, width), None, None,
                     None, flat_mix, local_mix, lam)  # fmt: skip
    counted = flat_target != options.ignore_index
    total_weight = denominator = None
    if class_weight is not None:
        class_weight = class_weight.to(acc).contiguous()
        total_weight, denominator = _weight_totals(class_weight, inputs, counted, shard.group)
    if options.reduction == "mean" and class_weight is None:
        denominator = counted.sum(dtype=acc)
    inputs = inputs._replace(class_weight=class_weight, total_weight=total_weight)
    params = options.row_params(shard.num_classes)
    needs = linear_chunks.needs_of(flat_hidden, weight, bias)
    setup = _Setup(shard.group, shard.backend, shard.num_classes,
                   (params.target_extra, params.other_mass), params.z_loss, params.ignore_index,
                   shard.chunk, reduce_hidden_grad, needs,
                   params.softcap, options.return_stats, shard.offset)  # fmt: skip
    loss, lse, argmax = _apply(flat_hidden, weight, bias, inputs, setup, options.reduction,
                               denominator, target_shape)  # fmt: skip
    if not options.return_stats:
        return loss, None
    return loss, loss_stats(lse, argmax, flat_target, options, target_shape, denominator)
