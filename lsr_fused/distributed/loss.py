"""The vocabulary-parallel loss's entry point and its autograd function; the math and the protocol
are described in :mod:`lsr_fused.distributed`."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import policy
from .._params import smoothing_masses
from .agreement import (
    ShardInput,
    agree,
    check_exchange_values,
    describe,
    resolve_group,
    run_checks,
)
from .shard_math import (
    all_reduce_stats,
    grad_coefs,
    local_targets,
    no_rows_stats,
    row_terms,
    shard_kernels,
)

__all__ = ["sharded_label_smoothing_cross_entropy"]


class _ShardedRows(torch.autograd.Function):
    """Per-row sharded loss over a ``(B, S, C_local)`` row view; returns ``(loss, w_y)``."""

    @staticmethod
    def forward(ctx, rows, flat_target, local_target, weight, setup):
        group, backend, num_classes, masses, z_loss, ignore_index, _ = setup
        stats_fn, _ = shard_kernels(backend)
        acc = policy.accumulation_dtype(rows.dtype)
        stats = torch.empty(6, flat_target.numel(), dtype=acc, device=rows.device)
        # W_k, this shard's weight sum; summed with the statistics into W (weights only).
        shard_weight = float(rows.shape[-1]) if weight is None else weight.sum()
        extras = None if weight is None else shard_weight.reshape(1)
        if flat_target.numel():
            stats_fn(rows, local_target, weight, stats)
            reduced = all_reduce_stats(stats, local_target, shard_weight, extras, group)
        else:
            reduced = no_rows_stats(stats, extras)
        total_weight = float(num_classes) if weight is None else reduced.extras[0]
        scalars = (num_classes, masses, z_loss, ignore_index)
        terms = row_terms(reduced, total_weight, flat_target, scalars)
        ctx.mark_non_differentiable(terms.target_weight)
        ctx.save_for_backward(rows, local_target, weight, *terms[1:])
        ctx.setup = setup
        return terms.loss, terms.target_weight

    @staticmethod
    def backward(ctx, grad_loss, _grad_target_weight):
        policy.refuse_double_backward("the vocabulary-parallel loss (process_group=)")
        rows, local_target, weight, *terms = ctx.saved_tensors
        _, backend, _, masses, z_loss, _, inplace = ctx.setup
        _, grad_fn = shard_kernels(backend)
        coefs = grad_coefs(grad_loss, *terms, masses, z_loss)
        grad_rows = rows if inplace else torch.empty_like(rows)
        grad_fn(rows, local_target, weight, coefs, grad_rows)
        if inplace:
            # Anything else that saved these logits now fails loudly instead of reading a gradient.
            torch.autograd.graph.increment_version(rows)
        return grad_rows, None, None, None, None


def _check(logits, target, weight, options, backend, new) -> tuple[Tensor, str, Tensor]:
    """Every local check, then :func:`describe`: ``(description, resolved backend, flat
    target)``; raises what a check raises."""
    label_smoothing, ignore_index, _, spread, z_loss = options
    if new != (None, None, 1.0, False):
        raise policy.ArgumentValueError("softcap, mix_target and return_stats: not yet sharded")
    check_exchange_values(label_smoothing, ignore_index, z_loss)
    policy.check_options(*options, backend)
    policy.check_tensors(logits, target, weight, spread, shard=True)
    policy.check_sharded_autograd(weight, "weight")
    resolved = policy.resolve_backend(backend, logits.device, sharded=True)
    flat_target = policy.flat_targets(target)
    shard = ShardInput.of_logits(logits)
    description = describe(shard, flat_target, target.shape, weight is not None, options)
    return description, resolved, flat_target


def _mean_denominator(counted: Tensor, target_weight: Tensor, weight, acc: torch.dtype) -> Tensor:
    """The mean's ``sum of w_y`` over counted rows (their count without weights). The target's
    weight is only on the rank that holds it: the forward's SUM gave every rank each ``w_y``."""
    return counted.sum(dtype=acc) if weight is None else (target_weight * counted).sum()


def sharded_label_smoothing_cross_entropy(
    logits: Tensor,
    target: Tensor,
    label_smoothing: float = 0.1,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    weight: Optional[Tensor] = None,
    spread: str = "all",
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    mix_target: Optional[Tensor] = None,
    mix_lambda=1.0,
    return_stats: bool = False,
    inplace_backward: bool = False,
    backend: str = "auto",
    process_group=None,
) -> Tensor:
    """Label-smoothed cross-entropy of logits sharded along the classes over ``process_group``.

    Args:
        logits: this rank's contiguous slice of the classes, ``(N, C_local)``, ``(C_local,)`` or
            ``(N, C_local, d1, ..., dk)``; ``C_local`` may differ between ranks (0 included).
            Slices are ordered by rank in the group: rank 0 holds the first classes.
        target: global class indices in ``[0, C)`` (or ``ignore_index``), the same on every rank.
        weight: this rank's ``(C_local,)`` slice of the class weights, or None on every rank.
        process_group: the group over which the classes are split (``None``: the default group).
        label_smoothing, ignore_index, reduction, spread, z_loss, inplace_backward: as in
            :func:`lsr_fused.label_smoothing_cross_entropy`, with the smoothing masses of the
            global class count ``C``.
        backend: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"torch"`` (chunked
            composite); ``"auto"`` is Triton on CUDA, else ``"torch"``; ``"cpp"`` runs ``"torch"``.

    Returns:
        The loss of the unsharded computation, identical on every rank (``reduction="none"``: the
        shape of ``target``); backward gives each rank the gradient of its slice.

    Raises:
        ValueError on every rank of the group when ranks disagree on shapes, dtype or options,
        when any rank's arguments are invalid, or (CPU targets, or with
        :func:`lsr_fused.set_validation`) when a target is outside ``[0, C)``.
    """
    group = resolve_group(process_group)
    options = (label_smoothing, ignore_index, reduction, spread, z_loss)
    new = (softcap, mix_target, mix_lambda, return_stats)
    checked, local_error = run_checks(_check, logits, target, weight, options, backend, new)
    num_classes, offset, _ = agree(
        group, None if checked is None else checked[0], local_error, options, device_of=logits
    )
    _, resolved, flat_target = checked
    rows = policy.row_view(logits)
    acc = policy.accumulation_dtype(logits.dtype)
    if weight is not None:
        weight = weight.to(acc).contiguous()
    local_target = local_targets(flat_target, offset, rows.shape[-1])
    masses = smoothing_masses(float(label_smoothing), num_classes, spread)
    # In place needs storage we own: a leaf's, or a view of a leaf's, is the caller's.
    inplace = bool(inplace_backward) and policy.may_overwrite(logits)
    setup = (group, resolved, num_classes, masses, float(z_loss), ignore_index, inplace)
    loss, target_weight = _ShardedRows.apply(rows, flat_target, local_target, weight, setup)
    denominator = None
    if reduction == "mean":
        denominator = _mean_denominator(flat_target != ignore_index, target_weight, weight, acc)
    return policy.reduce(loss, target.shape, reduction, denominator)
