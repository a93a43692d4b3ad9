"""The pure-PyTorch backend: the fused row math written with ATen ops, processed in row chunks.

It is the fallback where no compiled kernel is available, not the test oracle (the tests carry their
own dense reference). Chunking bounds its temporaries to ``_CHUNK_ELEMENTS`` elements whatever the
size of the logits, so it never holds a one-hot or a log-prob tensor of the logits' size.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._params import RowParams, accumulation_dtype
from . import FIRST_LOGIT_MAX_GAP

_CHUNK_ELEMENTS = 1 << 22


def _row_chunks(logits: Tensor):
    """Yield ``(start_row, stop_row, outer_start, outer_stop, chunk)`` with ``chunk`` a
    ``(rows, C)`` view (or small copy) of whole outer slices ``logits[outer_start:outer_stop]``."""
    batch, inner, num_classes = logits.shape
    rows_per_outer = max(inner, 1)
    outer_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, rows_per_outer * num_classes))
    for outer_start in range(0, batch, outer_per_chunk):
        outer_stop = min(batch, outer_start + outer_per_chunk)
        chunk = logits[outer_start:outer_stop].reshape(-1, num_classes)
        yield outer_start * inner, outer_stop * inner, outer_start, outer_stop, chunk


def _row_terms(
    x: Tensor, target: Tensor, weight: Tensor | None, weight_total: Tensor | None, params: RowParams
):
    """Shared per-row quantities: clamped target, masks, w_y and the total target mass S."""
    num_classes = x.shape[-1]
    ignored = target == params.ignore_index
    invalid = ~ignored & ((target < 0) | (target >= num_classes))
    safe_target = torch.where(ignored | invalid, 0, target).unsqueeze(-1)
    if weight is None:
        target_weight = torch.ones_like(target, dtype=x.dtype)
        total_weight = float(num_classes)
    else:
        target_weight = weight.gather(0, safe_target.squeeze(-1))
        total_weight = weight_total
    total_mass = params.other_mass * total_weight + params.target_extra * target_weight
    return safe_target, ignored, invalid, target_weight, total_mass


def _first_logit(x: Tensor) -> Tensor:
    """``(rows, 1)``: each row's first logit (``-inf`` for rows without classes)."""
    if x.shape[-1] == 0:
        return x.new_full((x.shape[0], 1), float("-inf"))
    return x[:, :1]


def _reference(x: Tensor) -> tuple[Tensor, Tensor]:
    """Forward's reference ``r`` ``(rows, 1)`` and whether it is the first logit (see
    lsr_fused.backends): the first logit where finite and within FIRST_LOGIT_MAX_GAP of the row
    max, else the max where finite, else 0."""
    first = _first_logit(x)
    row_max = x.amax(dim=-1, keepdim=True) if x.shape[-1] else first
    from_first = torch.isfinite(first) & (row_max - first <= FIRST_LOGIT_MAX_GAP)
    reference = torch.where(from_first, first, torch.where(torch.isfinite(row_max), row_max, 0.0))
    return reference, from_first


def _decode(x: Tensor, saved: Tensor) -> tuple[Tensor, Tensor]:
    """Backward's ``(r, lse_r)`` ``(rows, 1)`` from forward's saved value (see lsr_fused.backends):
    a negative finite value ``-(1 + lse_r)`` says that r is the row max."""
    first = _first_logit(x)
    from_max = torch.isfinite(saved) & (saved < 0)
    row_max = x.amax(dim=-1, keepdim=True) if x.shape[-1] else first
    reference = torch.where(from_max, row_max, torch.where(torch.isfinite(first), first, 0.0))
    return reference, torch.where(from_max, -1.0 - saved, saved)


def forward(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    weight_total: Tensor | None,
    params: RowParams,
) -> tuple[Tensor, Tensor]:
    """Per-row loss and the saved (shifted) log-sum-exp of lsr_fused.backends."""
    acc = accumulation_dtype(logits.dtype)
    rows = target.numel()
    loss = torch.empty(rows, dtype=acc, device=logits.device)
    lse = torch.empty(rows, dtype=acc, device=logits.device)
    for start, stop, _, _, chunk in _row_chunks(logits):
        x = chunk.to(acc)
        row_target = target[start:stop]
        safe_target, ignored, invalid, target_weight, total_mass = _row_terms(
            x, row_target, weight, weight_total, params
        )
        # Every term relative to r: x - r is exact for logits near r, so that a large offset shared
        # by the row cancels before rounding instead of after. x - r <= FIRST_LOGIT_MAX_GAP: exp
        # cannot overflow. An all -inf row has r = 0 and exp(-inf) = 0; a +inf logit gives NaN.
        reference, from_first = _reference(x)
        shifted = x - reference
        row_lse = shifted.exp().sum(dim=-1).log()
        row_lse = torch.where(shifted.amax(dim=-1) == float("inf"), float("nan"), row_lse)
        row_loss = total_mass * row_lse
        if params.other_mass != 0.0:
            # Skipped when b == 0 so that a masked (-inf) logit does not turn 0 * inf into NaN.
            weighted_sum = shifted.sum(dim=-1) if weight is None else shifted @ weight
            row_loss = row_loss - params.other_mass * weighted_sum
        if params.target_extra != 0.0:
            target_logit = shifted.gather(-1, safe_target).squeeze(-1)
            row_loss = row_loss - params.target_extra * target_weight * target_logit
        if params.z_loss != 0.0:
            absolute_lse = row_lse + reference.squeeze(-1)
            row_loss = row_loss + params.z_loss * absolute_lse * absolute_lse
        row_loss = torch.where(ignored, 0.0, row_loss)
        row_loss = torch.where(invalid, float("nan"), row_loss)
        loss[start:stop] = row_loss
        # Saved: lse_r >= 0 where r is the first logit (the sum holds exp(0) = 1; clamped against
        # rounding), -(1 + lse_r) <= -1 where r is the row max, -inf or NaN for degenerate rows.
        from_first = from_first.squeeze(-1)
        from_max = ~from_first & torch.isfinite(row_lse)
        saved = torch.where(from_first, row_lse.clamp_min(0.0), row_lse)
        lse[start:stop] = torch.where(from_max, -1.0 - row_lse, saved)
    return loss, lse


def backward(
    grad_loss: Tensor,
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    weight_total: Tensor | None,
    lse: Tensor,
    params: RowParams,
    grad_logits: Tensor,
) -> None:
    """Write ``grad_loss * d loss / d logits`` into ``grad_logits``; ``lse`` is forward's saved
    value (``r`` is recomputed from the logits, before ``grad_logits`` may overwrite them)."""
    acc = accumulation_dtype(logits.dtype)
    num_classes = logits.shape[-1]
    inner = logits.shape[1]
    for start, stop, _, _, chunk in _row_chunks(logits):
        x = chunk.to(acc)
        row_target = target[start:stop]
        safe_target, ignored, invalid, target_weight, total_mass = _row_terms(
            x, row_target, weight, weight_total, params
        )
        reference, row_lse = _decode(x, lse[start:stop].unsqueeze(-1))
        # d loss / d x_i = softmax_i * (S + 2 z (r + lse_r)) - b * w_i - (a - b) * w_y * [i == y]
        softmax_scale = total_mass.unsqueeze(-1) + 2.0 * params.z_loss * (row_lse + reference)
        grad = (x - reference).sub_(row_lse).exp_().mul_(softmax_scale)
        if params.other_mass != 0.0:
            grad.sub_(params.other_mass if weight is None else params.other_mass * weight)
        grad.scatter_add_(-1, safe_target, (-params.target_extra * target_weight).unsqueeze(-1))
        row_scale = torch.where(ignored, 0.0, grad_loss[start:stop].to(acc))
        row_scale = torch.where(invalid, float("nan"), row_scale)
        grad.mul_(row_scale.unsqueeze(-1))
        outer_start, outer_stop = start // max(inner, 1), stop // max(inner, 1)
        grad_logits[outer_start:outer_stop].copy_(
            grad.view(outer_stop - outer_start, inner, num_classes)
        )


# --------------------------------------------------------------------------------------------
# The vocabulary-parallel passes (see lsr_fused.distributed): the same row math over one shard.


def _empty_shard_stats(out: Tensor) -> None:
    """Statistics of a shard without classes: max -inf, every sum and the reference 0."""
    out.zero_()
    out[0].fill_(float("-inf"))


def shard_stats(
    logits: Tensor, local_target: Tensor, weight: Optional[Tensor], out: Tensor
) -> None:
    """Fill ``out`` ``(6, rows)`` (accumulation dtype) with this shard's per-row statistics.

    With ``m`` the row's max over the shard and ``r`` the shard's reference, chosen by the rule of
    :mod:`lsr_fused.backends` on the shard's row (its first logit where finite and at most
    ``FIRST_LOGIT_MAX_GAP`` below ``m``, else ``m`` where finite, else 0; 0 for an empty shard),
    the rows of ``out`` are::

        0: m                 1: sum_c exp(x_c - m)     (relative to 0 where m is -inf)
        2: sum_c w_c (x_c - r)                          3: x_y - r where y is here, else 0
        4: w_y where y is here, else 0 (1 without weights)                   5: r

    Sums relative to ``r`` keep their error at the scale of the logits' spread, not of a large
    offset they share. ``local_target`` is ``y - offset``, or -1 where the target is elsewhere.
    """
    if logits.shape[-1] == 0:
        _empty_shard_stats(out)
        return
    for start, stop, _, _, chunk in _row_chunks(logits):
        x = chunk.to(out.dtype)
        reference = _reference(x)[0].squeeze(-1)
        row_max = x.amax(dim=-1)
        shift = torch.where(row_max == float("-inf"), 0.0, row_max)
        out[0, start:stop] = row_max
        out[1, start:stop] = (x - shift.unsqueeze(-1)).exp().sum(dim=-1)
        centred = x - reference.unsqueeze(-1)
        out[2, start:stop] = centred.sum(dim=-1) if weight is None else centred @ weight
        here = local_target[start:stop] >= 0
        safe = torch.where(here, local_target[start:stop], 0).unsqueeze(-1)
        out[3, start:stop] = torch.where(here, centred.gather(-1, safe).squeeze(-1), 0.0)
        if weight is None:
            out[4, start:stop] = here.to(out.dtype)
        else:
            out[4, start:stop] = torch.where(here, weight.gather(0, safe.squeeze(-1)), 0.0)
        out[5, start:stop] = reference


def shard_grad(
    logits: Tensor,
    local_target: Tensor,
    weight: Optional[Tensor],
    coefs: Tensor,
    grad_logits: Tensor,
) -> None:
    """Write ``exp((x_i - r) - lse_r) A - B w_i - T [i == local_target]`` per row into
    ``grad_logits`` (same strides as ``logits``, possibly ``logits`` itself).

    ``coefs`` is ``(5, rows)`` holding ``(lse_r, A, B, T, r)``: ``r`` is this shard's reference
    (row 5 of :func:`shard_stats`) and ``lse_r`` the row's global log-sum-exp minus ``r``, so the
    softmax never subtracts two large, rounded numbers.
    """
    _, inner, num_classes = logits.shape
    if num_classes == 0:
        return
    for start, stop, outer_start, outer_stop, chunk in _row_chunks(logits):
        x = chunk.to(coefs.dtype)
        lse, scale, other, target_coef, reference = (c[start:stop].unsqueeze(-1) for c in coefs)
        centred = x - reference
        grad = (centred - lse).exp_().mul_(scale)
        if weight is None:
            grad.sub_(other)
        else:
            grad.addcmul_(other, weight, value=-1.0)
        here = local_target[start:stop] >= 0
        safe = torch.where(here, local_target[start:stop], 0).unsqueeze(-1)
        grad.scatter_add_(-1, safe, torch.where(here.unsqueeze(-1), -target_coef, 0.0))
        grad_logits[outer_start:outer_stop].copy_(
            grad.view(outer_stop - outer_start, inner, num_classes)
        )
