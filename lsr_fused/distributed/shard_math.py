"""The statistics math of the vocabulary-parallel loss: combining every rank's shard statistics into
per-row losses, and the coefficients of each rank's gradient pass.

The per-shard passes themselves are the backends' ``shard_stats`` / ``shard_grad``
(:mod:`lsr_fused.backends.torch_backend`, :mod:`lsr_fused.backends.triton_sharded`); the formulas
are in :mod:`lsr_fused.distributed`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .. import ops
from .._row_math import gradient_coefs, smoothed_row_loss


def shard_kernels(backend: str):
    """``(stats, grad)`` functions of a resolved backend name (``"triton"`` or ``"torch"``)."""
    module = ops.backend_module("triton_sharded" if backend == "triton" else "torch")
    return module.shard_stats, module.shard_grad


class RowTerms(NamedTuple):
    """Per-row global quantities every rank holds after the statistics' all-reduce."""

    loss: Tensor  # per-row loss (0 where ignored, NaN for a target outside [0, C))
    lse: Tensor  # the global log-sum-exp (absolute: it is what z-loss squares)
    shard_lse: Tensor  # lse - r_k: the global log-sum-exp relative to this shard's reference
    reference: Tensor  # r_k, this shard's reference (row 5 of shard_stats), which shard_grad reads
    total_mass: Tensor  # S = b W + (a - b) w_y
    target_weight: Tensor  # w_y (1 without class weights, 0 where the target is nowhere)
    ignored: Tensor
    in_range: Tensor


class ReducedStats(NamedTuple):
    """The group's statistics of each row, from :func:`all_reduce_stats`."""

    shift: Tensor  # M, the global max (0 where it is not finite); the sums below are relative to it
    reference: Tensor  # r_k, this shard's reference (local: it is not reduced)
    sums: Tensor  # (4, N): sum-exp relative to M, sum w (x - M), x_y - M, w_y
    extras: Tensor  # the caller's extra values, summed over ranks


def local_targets(flat_target: Tensor, offset: int, width: int) -> Tensor:
    """Each target as a class index of this rank's slice ``[offset, offset + width)``, or -1 where
    the target lives on another rank (ignored and invalid targets included)."""
    local = flat_target - offset
    return torch.where((local >= 0) & (local < width), local, -1)


def _check_stats_rows(stats: Tensor, mixed: bool) -> None:
    expected = 8 if mixed else 6
    if stats.dim() != 2 or stats.shape[0] != expected:
        given = "given" if mixed else "not given"
        raise ValueError(
            f"stats must have {expected} rows when local_mix_target is {given}, got shape "
            f"{tuple(stats.shape)}"
        )


def all_reduce_stats(
    stats: Tensor, local_target: Tensor, shard_weight, extras: Optional[Tensor], group, *,
    local_mix_target: Optional[Tensor] = None,
) -> ReducedStats:  # fmt: skip
    """Combine every rank's ``(6, N)`` ``shard_stats`` into the group's, in two collectives.

    A MAX of the ``N`` local maxima gives ``M``; each rank then moves its sums from its own
    reference ``r_k`` to ``M`` (``t_k += (r_k - M) W_k``, ``x_y - r_k += r_k - M`` on the target's
    shard, ``s_k *= exp(m_k - M)``; ``W_k`` = ``shard_weight``, this shard's weight sum or width)
    and one SUM of ``4 N + len(extras)`` values adds them up. ``r_k - M`` is the difference of two
    nearby logits, so a large offset shared by every logit cancels exactly instead of in the sums.
    ``stats`` is modified in place.

    With ``local_mix_target`` (the second target, local as ``local_target``), ``stats`` is the
    ``(8, N)`` layout whose rows 6 and 7 (``x_y2 - r_k``, ``w_y2``) are moved and summed the same
    way: the SUM carries ``6 N + len(extras)`` values and ``sums`` gets two more rows.
    """
    _check_stats_rows(stats, local_mix_target is not None)
    local_max, sum_exp, weighted_sum, target_logit, _, reference = stats[:6]
    global_max = local_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    # A row that is -inf everywhere keeps its sums relative to 0 (exp(-inf) = 0, never NaN).
    shift = torch.where(torch.isfinite(global_max), global_max, 0.0)
    to_shift = reference - shift
    sum_exp.mul_(torch.exp(local_max - shift))  # <= 1; 0 for a shard whose max is -inf
    weighted_sum.add_(to_shift * shard_weight)
    target_logit.add_(torch.where(local_target >= 0, to_shift, 0.0))
    parts = [stats[1:5].reshape(-1)]
    if local_mix_target is not None:
        stats[6].add_(torch.where(local_mix_target >= 0, to_shift, 0.0))
        parts.append(stats[6:8].reshape(-1))
    parts += [] if extras is None else [extras.reshape(-1)]
    summed = torch.cat(parts)
    dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
    num_rows, num_sums = local_max.shape[0], 4 if local_mix_target is None else 6
    sums = summed[: num_sums * num_rows].view(num_sums, num_rows)
    return ReducedStats(shift, reference.clone(), sums, summed[num_sums * num_rows :])


def no_rows_stats(stats: Tensor, extras: Optional[Tensor]) -> ReducedStats:
    """The :class:`ReducedStats` of zero rows (every rank agrees on N, so all skip the
    collectives together); ``stats`` ``(6, 0)`` or ``(8, 0)`` (mixed targets)."""
    empty = stats[0]
    sums = stats[1:5] if stats.shape[0] == 6 else torch.cat([stats[1:5], stats[6:8]])
    return ReducedStats(empty, empty, sums, stats.new_zeros(0 if extras is None else 1))


def mix_masses(reduced: ReducedStats, flat_target: Tensor, ignore_index: int,
               mix_lambda: Tensor) -> Tensor:  # fmt: skip
    """``(2, N)``: the two targets' shares of the target weight, ``lam w_y1`` and
    ``(1 - lam) w_y2``, from :func:`all_reduce_stats`' mixed ``sums`` and ``mix_lambda``
    ``(N,)`` (any stride). On ignored rows ``lam`` is not read (taken as 1). Pass it to
    :func:`row_terms` and :func:`grad_coefs`; their sum is the mean's per-row weight."""
    if reduced.sums.shape[0] != 6:
        raise ValueError("mix_masses needs the statistics of mixed targets (local_mix_target=)")
    target_weight, mix_weight = reduced.sums[3], reduced.sums[5]
    share = torch.where(flat_target == ignore_index, 1.0, mix_lambda.to(target_weight.dtype))
    return torch.stack([share * target_weight, (1.0 - share) * mix_weight])


def row_terms(reduced: ReducedStats, total_weight, flat_target: Tensor, setup_scalars, *,
              mix: Optional[tuple[Tensor, Tensor]] = None) -> RowTerms:  # fmt: skip
    """The per-row loss and what backward needs, from :func:`all_reduce_stats`'s result.

    ``loss = S (lse - M) - b sum w (x - M) - (a - b) w_y (x_y - M) + z lse^2``, equal to the
    formula without ``M`` since ``S = b W + (a - b) w_y``. ``total_weight`` is ``W`` (a float, or
    a 0-d tensor); ``setup_scalars`` is ``(num_classes, (target_extra, other_mass), z_loss,
    ignore_index)``.

    ``mix``: ``(flat_mix_target (N,), masses)`` with ``masses`` from :func:`mix_masses`
    ``(m1, m2) = (lam w_y1, (1 - lam) w_y2)``: ``w_y`` above becomes ``m1 + m2`` (so is
    ``target_weight``, the mean's per-row weight) and the target term
    ``(a - b) [m1 (x_y1 - M) + m2 (x_y2 - M)]``, a zero mass not reading its logit (a masked
    second target with ``lam = 1``); a ``y2`` outside ``[0, C)`` on a kept row gives NaN.
    """
    num_classes, (target_extra, other_mass), z_loss, ignore_index = setup_scalars
    if (reduced.sums.shape[0] == 6) != (mix is not None):
        raise ValueError("row_terms takes mix= exactly when the statistics hold a mixed target")
    sum_exp, weighted_sum, _, target_weight = reduced.sums[:4]
    if mix is not None:
        target_weight = mix[1][0] + mix[1][1]
    shifted_lse = torch.log(sum_exp)
    lse = reduced.shift + shifted_lse
    total_mass = other_mass * total_weight + target_extra * target_weight
    ignored = flat_target == ignore_index
    in_range = _in_range(flat_target, num_classes)
    if mix is not None:
        in_range = in_range & _in_range(mix[0], num_classes)
    # As on one device (the same function): a term whose coefficient is 0 is dropped.
    loss = smoothed_row_loss(
        total_mass, shifted_lse, lse, (target_extra, other_mass), z_loss, lambda: weighted_sum,
        lambda: _target_term(target_extra, target_weight, reduced.sums, mix), ignored, ~in_range,
    )  # fmt: skip
    shard_lse = (reduced.shift - reduced.reference) + shifted_lse
    return RowTerms(
        loss, lse, shard_lse, reduced.reference, total_mass, target_weight.clone(), ignored,
        in_range,
    )  # fmt: skip


def _in_range(target: Tensor, num_classes: int) -> Tensor:
    return (target >= 0) & (target < num_classes)


def _target_term(target_extra: float, target_weight: Tensor, sums: Tensor, mix) -> Tensor:
    """``(a - b) w_y (x_y - M)``, or its mixed form (see :func:`row_terms`)."""
    if mix is None:
        return target_extra * target_weight * sums[2]
    first, second = mix[1]
    mix_logit = torch.where(second == 0.0, 0.0, sums[4])
    target_logit = torch.where(first == 0.0, 0.0, sums[2])
    return target_extra * (first * target_logit + second * mix_logit)


def grad_coefs(upstream: Tensor, lse, shard_lse, reference, total_mass, target_weight, ignored,
               in_range, masses, z_loss: float, *,
               mix_masses: Optional[Tensor] = None) -> Tensor:  # fmt: skip
    """The ``(5, rows)`` ``(lse - r_k, A, B, T, r_k)`` of ``shard_grad`` for per-row ``upstream``
    (``r_k``: this shard's reference, passed on rather than recomputed by the gradient pass):
    ``d loss / d x_i = softmax_i (S + 2 z lse) - b w_i - (a - b) w_y [i == y]``, times ``g``
    (0 on ignored rows, NaN where the target is outside ``[0, C)``).

    ``mix_masses``: the ``(2, rows)`` ``(lam w_y1, (1 - lam) w_y2)`` of :func:`mix_masses` (then
    ``target_weight`` is not read): ``(6, rows)``, ``T = g (a - b) lam w_y1`` and row 5
    ``T2 = g (a - b) (1 - lam) w_y2``, the coefficient of ``[i == y2]``."""
    first_mass = target_weight if mix_masses is None else mix_masses[0]
    pick_masses = (first_mass,) if mix_masses is None else (first_mass, mix_masses[1])
    scale, other, target_coefs = gradient_coefs(
        upstream, total_mass, lse, masses, z_loss, pick_masses, ignored, ~in_range
    )
    return torch.stack([shard_lse, scale, other, target_coefs[0], reference, *target_coefs[1:]])


def global_argmax(shard_max: Tensor, local_argmax: Tensor, offset: int, group) -> Tensor:
    """``(N,)`` int64: each row's ``torch.argmax`` over the whole (sharded) row, from every rank's
    shard max ``shard_max`` (row 0 of ``shard_stats``) and shard-local ``local_argmax``
    (``shard_stats(..., argmax_out=)``); ``offset`` is this rank's first class.

    The first maximum is the lowest global index among the shards holding the global maximum:
    one MAX (of ``2 N`` values: whether any shard's max is NaN, and the largest non-NaN max, as
    ``torch.argmax`` ranks a NaN above everything), then one MIN of the candidates' indices; no
    host synchronisation. An empty shard (max -inf, local index 0) can only tie on an all -inf
    row, whose answer 0 is never above its candidate.
    """
    is_nan = torch.isnan(shard_max)
    keys = torch.cat([is_nan.to(shard_max.dtype), torch.where(is_nan, float("-inf"), shard_max)])
    dist.all_reduce(keys, op=dist.ReduceOp.MAX, group=group)
    any_nan, top = keys.view(2, -1)
    holds = torch.where(any_nan > 0, is_nan, shard_max == top)
    never = torch.iinfo(torch.int64).max
    candidate = torch.where(holds, local_argmax.to(torch.int64) + offset, never)
    dist.all_reduce(candidate, op=dist.ReduceOp.MIN, group=group)
    return candidate
