"""The vocabulary-parallel loss's entry point and its autograd function; the math and the protocol
are described in :mod:`lsr_fused.distributed`."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor
from typing_extensions import Unpack

from .. import policy
from .._docs import extends_doc
from .._params import smoothing_masses
from .._validation import check_mix_targets
from ..options import LossKeywords, LossOptions, option_fields, shows_option_keywords
from ..stats import loss_stats
from . import agreement, shard_math

__all__ = ["sharded_label_smoothing_cross_entropy"]


class _Setup(NamedTuple):
    """A call's constants, as every rank agreed them."""

    group: object
    backend: str
    num_classes: int
    offset: int
    masses: tuple[float, float]  # (target_extra, other_mass) of the global C
    z_loss: float
    ignore_index: int
    softcap: float  # 0.0: off
    stats: bool
    inplace: bool


class _ShardedRows(torch.autograd.Function):
    """Per-row sharded loss over a ``(B, S, C_local)`` row view: ``(loss, mean weight per row,
    lse, argmax)``, the last three not differentiable (the last two empty unless statistics are
    asked for)."""

    @staticmethod
    def forward(ctx, rows, flat_target, local_target, weight, mix_target, local_mix, lam, setup):
        stats_fn, _ = shard_math.shard_kernels(setup.backend)
        acc = policy.accumulation_dtype(rows.dtype)
        num_rows = flat_target.numel()
        stats = torch.empty(6 if mix_target is None else 8, num_rows, dtype=acc, device=rows.device)
        argmax = torch.zeros(num_rows if setup.stats else 0, dtype=torch.int64, device=rows.device)
        # W_k, this shard's weight sum; summed with the statistics into W (weights only).
        shard_weight = float(rows.shape[-1]) if weight is None else weight.sum()
        extras = None if weight is None else shard_weight.reshape(1)
        if num_rows:
            argmax_out = argmax if setup.stats else None
            stats_fn(rows, local_target, weight, stats, softcap=setup.softcap,
                     local_mix_target=local_mix, argmax_out=argmax_out)  # fmt: skip
            reduced = shard_math.all_reduce_stats(
                stats, local_target, shard_weight, extras, setup.group, local_mix_target=local_mix
            )
            if setup.stats:
                argmax = shard_math.global_argmax(stats[0], argmax, setup.offset, setup.group)
        else:
            reduced = shard_math.no_rows_stats(stats, extras)
        total_weight = float(setup.num_classes) if weight is None else reduced.extras[0]
        masses = None
        if mix_target is not None:
            masses = shard_math.mix_masses(reduced, flat_target, setup.ignore_index, lam)
        scalars = (setup.num_classes, setup.masses, setup.z_loss, setup.ignore_index)
        mix = None if masses is None else (mix_target, masses)
        terms = shard_math.row_terms(reduced, total_weight, flat_target, scalars, mix=mix)
        lse = terms.lse if setup.stats else terms.lse.new_empty(0)
        ctx.mark_non_differentiable(terms.target_weight, lse, argmax)
        ctx.save_for_backward(rows, local_target, weight, local_mix, masses, *terms[1:])
        ctx.setup = setup
        return terms.loss, terms.target_weight, lse, argmax

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        policy.refuse_double_backward("the vocabulary-parallel loss (process_group=)")
        rows, local_target, weight, local_mix, masses, *terms = ctx.saved_tensors
        setup = ctx.setup
        _, grad_fn = shard_math.shard_kernels(setup.backend)
        coefs = shard_math.grad_coefs(
            grad_loss, *terms, setup.masses, setup.z_loss, mix_masses=masses
        )
        grad_rows = rows if setup.inplace else torch.empty_like(rows)
        grad_fn(rows, local_target, weight, coefs, grad_rows, softcap=setup.softcap,
                local_mix_target=local_mix)  # fmt: skip
        if setup.inplace:
            # Anything else that saved these logits now fails loudly instead of reading a gradient.
            torch.autograd.graph.increment_version(rows)
        return (grad_rows, *(None,) * 7)


class _Checked(NamedTuple):
    description: Tensor
    backend: str
    options: LossOptions
    flat_target: Tensor
    mix: tuple[Optional[Tensor], Optional[Tensor]]


def _check(logits, target, weight, fields, mix_target, mix_lambda) -> _Checked:
    """Every local check, then :func:`agreement.describe`; raises what a check raises."""
    label_smoothing, ignore_index, _, spread, z_loss = fields[:5]
    agreement.check_exchange_values(label_smoothing, ignore_index, z_loss)
    options = LossOptions(*fields)
    policy.check_tensors(logits, target, weight, spread, shard=True)
    policy.check_sharded_autograd(weight, "weight")
    policy.refuse_forward_ad()
    resolved = policy.resolve_backend(options.backend, logits.device, sharded=True)
    flat_target = policy.flat_targets(target)
    acc = policy.accumulation_dtype(logits.dtype)
    mix = policy.mix_inputs(mix_target, mix_lambda, target, acc)
    policy.check_sharded_autograd(mix_lambda if isinstance(mix_lambda, Tensor) else None,
                                  "mix_lambda")  # fmt: skip
    extra = agreement.newer_option_values(options, mix[0], mix_lambda)
    shard = agreement.ShardInput.of_logits(logits)
    description = agreement.describe(
        shard, flat_target, target.shape, weight is not None, fields[:5], extra
    )
    return _Checked(description, resolved, options, flat_target, mix)


def _mean_denominator(counted: Tensor, target_weight: Tensor, weight, acc: torch.dtype) -> Tensor:
    """The mean's ``sum of w_y`` over counted rows (their count without weights). The target's
    weight is only on the rank that holds it: the forward's SUM gave every rank each ``w_y``
    (with a mixed target, ``lam w_y1 + (1 - lam) w_y2``)."""
    return counted.sum(dtype=acc) if weight is None else (target_weight * counted).sum()


def _setup(group, checked: _Checked, agreed, inplace: bool) -> _Setup:
    options = checked.options
    num_classes = agreed.num_classes
    masses = smoothing_masses(float(options.label_smoothing), num_classes, options.spread)
    softcap = 0.0 if options.softcap is None else float(options.softcap)
    return _Setup(group, checked.backend, num_classes, agreed.offset, masses,
                  float(options.z_loss), options.ignore_index, softcap, options.return_stats,
                  inplace)  # fmt: skip


SHARDED_DOC = r"""
    Args:
        logits: this rank's contiguous slice of the classes, ``(N, C_local)``, ``(C_local,)`` or
            ``(N, C_local, d1, ..., dk)``; ``C_local`` may differ between ranks (0 included).
            Slices are ordered by rank in the group: rank 0 holds the first classes.
        target: global class indices in ``[0, C)`` (or ``ignore_index``), the same on every rank.
        weight: this rank's ``(C_local,)`` slice of the class weights, or None on every rank.
        mix_target, mix_lambda: a mixed target (global class indices, the same on every rank) and
            its weight, as in :func:`lsr_fused.label_smoothing_cross_entropy`; a ``mix_lambda``
            that requires grad is refused (on every rank).
        process_group: the group over which the classes are split (``None``: the default group).
        label_smoothing, ignore_index, reduction, spread, z_loss, softcap, return_stats,
            inplace_backward: as in :func:`lsr_fused.label_smoothing_cross_entropy`, with the
            smoothing masses of the global class count ``C``; the statistics are those of the
            whole row (the arg-max is the lowest global index of the row's maximum).
        backend: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"torch"`` (chunked
            composite); ``"auto"`` is Triton on CUDA, else ``"torch"``; ``"cpp"`` runs ``"torch"``.

    Returns:
        The loss of the unsharded computation, identical on every rank (``reduction="none"``: the
        shape of ``target``), or ``(loss, LossStats)`` with ``return_stats``; backward gives each
        rank the gradient of its slice.

    Raises:
        ValueError on every rank of the group when ranks disagree on shapes, dtype or options,
        when any rank's arguments are invalid, or (CPU targets, or with
        :func:`lsr_fused.set_validation`) when a target is outside ``[0, C)``.
"""


@extends_doc(SHARDED_DOC)
@shows_option_keywords()
def sharded_label_smoothing_cross_entropy(
    logits: Tensor, target: Tensor, label_smoothing: float = 0.1, *,
    weight: Optional[Tensor] = None, mix_target: Optional[Tensor] = None, mix_lambda=1.0,
    process_group=None, **options: Unpack[LossKeywords],
):  # fmt: skip
    """Label-smoothed cross-entropy of logits sharded along the classes over ``process_group``."""
    fields = option_fields(label_smoothing, options, "sharded_label_smoothing_cross_entropy")
    group = agreement.resolve_group(process_group)
    checked, local_error = agreement.run_checks(
        _check, logits, target, weight, fields, mix_target, mix_lambda
    )
    agreed = agreement.agree(
        group, None if checked is None else checked.description, local_error, fields[:5],
        device_of=logits, extra_fields=agreement.NEWER_OPTION_FIELDS,
    )  # fmt: skip
    options, flat_target, (flat_mix, lam) = checked.options, checked.flat_target, checked.mix
    rows = policy.row_view(logits)
    if flat_mix is not None:
        # The same mix_target on every rank (checksums agreed): every rank raises alike.
        check_mix_targets(flat_target, flat_mix, agreed.num_classes, options.ignore_index)
    acc = policy.accumulation_dtype(logits.dtype)
    if weight is not None:
        weight = weight.to(acc).contiguous()
    local_target = shard_math.local_targets(flat_target, agreed.offset, rows.shape[-1])
    local_mix = None
    if flat_mix is not None:
        local_mix = shard_math.local_targets(flat_mix, agreed.offset, rows.shape[-1])
    # In place needs storage we own: a leaf's, or a view of a leaf's, is the caller's.
    inplace = options.inplace_backward and policy.may_overwrite(logits)
    setup = _setup(group, checked, agreed, inplace)
    loss, target_weight, lse, argmax = _ShardedRows.apply(
        rows, flat_target, local_target, weight, flat_mix, local_mix, lam, setup
    )
    denominator = None
    if options.reduction == "mean":
        counted = flat_target != options.ignore_index
        denominator = _mean_denominator(counted, target_weight, weight, acc)
    loss = policy.reduce(loss, target.shape, options.reduction, denominator)
    if not options.return_stats:
        return loss
    return loss, loss_stats(lse, argmax, flat_target, options, target.shape, denominator)
