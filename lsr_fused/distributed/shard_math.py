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


def all_reduce_stats(
    stats: Tensor, local_target: Tensor, shard_weight, extras: Optional[Tensor], group
) -> ReducedStats:
    """Combine every rank's ``(6, N)`` ``shard_stats`` into the group's, in two collectives.

    A MAX of the ``N`` local maxima gives ``M``; each rank then moves its sums from its own
    reference ``r_k`` to ``M`` (``t_k += (r_k - M) W_k``, ``x_y - r_k += r_k - M`` on the target's
    shard, ``s_k *= exp(m_k - M)``; ``W_k`` = ``shard_weight``, this shard's weight sum or width)
    and one SUM of ``4 N + len(extras)`` values adds them up. ``r_k - M`` is the difference of two
    nearby logits, so a large offset shared by every logit cancels exactly instead of in the sums.
    ``stats`` is modified in place.
    """
    local_max, sum_exp, weighted_sum, target_logit, _, reference = stats
    global_max = local_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    # A row that is -inf everywhere keeps its sums relative to 0 (exp(-inf) = 0, never NaN).
    shift = torch.where(torch.isfinite(global_max), global_max, 0.0)
    to_shift = reference - shift
    sum_exp.mul_(torch.exp(local_max - shift))  # <= 1; 0 for a shard whose max is -inf
    weighted_sum.add_(to_shift * shard_weight)
    target_logit.add_(torch.where(local_target >= 0, to_shift, 0.0))
    parts = [stats[1:5].reshape(-1)] + ([] if extras is None else [extras.reshape(-1)])
    summed = torch.cat(parts)
    dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
    num_rows = local_max.shape[0]
    sums = summed[: 4 * num_rows].view(4, num_rows)
    return ReducedStats(shift, reference.clone(), sums, summed[4 * num_rows :])


def no_rows_stats(stats: Tensor, extras: Optional[Tensor]) -> ReducedStats:
    """The :class:`ReducedStats` of zero rows (every rank agrees on N, so all skip the
    collectives together)."""
    empty = stats[0]
    return ReducedStats(empty, empty, stats[1:5], stats.new_zeros(0 if extras is None else 1))


def row_terms(reduced: ReducedStats, total_weight, flat_target: Tensor, setup_scalars) -> RowTerms:
    """The per-row loss and what backward needs, from :func:`all_reduce_stats`'s result.

    ``loss = S (lse - M) - b sum w (x - M) - (a - b) w_y (x_y - M) + z lse^2``, equal to the
    formula without ``M`` since ``S = b W + (a - b) w_y``. ``total_weight`` is ``W`` (a float, or
    a 0-d tensor); ``setup_scalars`` is ``(num_classes, (target_extra, other_mass), z_loss,
    ignore_index)``.
    """
    num_classes, (target_extra, other_mass), z_loss, ignore_index = setup_scalars
    sum_exp, weighted_sum, target_logit, target_weight = reduced.sums
    shifted_lse = torch.log(sum_exp)
    lse = reduced.shift + shifted_lse
    total_mass = other_mass * total_weight + target_extra * target_weight
    loss = total_mass * shifted_lse
    # As on one device: a term whose coefficient is 0 is dropped, not multiplied by inf.
    if other_mass != 0.0:
        loss = loss - other_mass * weighted_sum
    if target_extra != 0.0:
        loss = loss - target_extra * target_weight * target_logit
    if z_loss != 0.0:
        loss = loss + z_loss * lse * lse
    ignored = flat_target == ignore_index
    in_range = (flat_target >= 0) & (flat_target < num_classes)
    loss = torch.where(in_range, loss, float("nan"))
    loss = torch.where(ignored, 0.0, loss)
    shard_lse = (reduced.shift - reduced.reference) + shifted_lse
    return RowTerms(
        loss, lse, shard_lse, reduced.reference, total_mass, target_weight.clone(), ignored,
        in_range,
    )  # fmt: skip


def grad_coefs(upstream: Tensor, lse, shard_lse, reference, total_mass, target_weight, ignored,
               in_range, masses, z_loss: float) -> Tensor:  # fmt: skip
    """The ``(5, rows)`` ``(lse - r_k, A, B, T, r_k)`` of ``shard_grad`` for per-row ``upstream``
    (``r_k``: this shard's reference, passed on rather than recomputed by the gradient pass):
    ``d loss / d x_i = softmax_i (S + 2 z lse) - b w_i - (a - b) w_y [i == y]``, times ``g``
    (0 on ignored rows, NaN where the target is outside ``[0, C)``)."""
    target_extra, other_mass = masses
    upstream = upstream.to(lse.dtype)
    upstream = torch.where(in_range, upstream, float("nan"))
    upstream = torch.where(ignored, 0.0, upstream)
    return torch.stack(
        [
            shard_lse,
            upstream * (total_mass + 2.0 * z_loss * lse),
            upstream * other_mass,
            upstream * (target_extra * target_weight),
            reference,
        ]
    )
