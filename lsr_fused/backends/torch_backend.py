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


def forward(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    weight_total: Tensor | None,
    params: RowParams,
) -> tuple[Tensor, Tensor]:
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
        row_max = x.amax(dim=-1)
        # A row whose logits are all -inf has max -inf; shifting by 0 keeps exp() at 0, not NaN.
        shift = torch.where(torch.isinf(row_max), 0.0, row_max).unsqueeze(-1)
        row_lse = (x - shift).exp().sum(dim=-1).log() + shift.squeeze(-1)
        row_loss = total_mass * row_lse
        if params.other_mass != 0.0:
            # Skipped when b == 0 so that a masked (-inf) logit does not turn 0 * inf into NaN.
            weighted_sum = x.sum(dim=-1) if weight is None else x @ weight
            row_loss = row_loss - params.other_mass * weighted_sum
        if params.target_extra != 0.0:
            target_logit = x.gather(-1, safe_target).squeeze(-1)
            row_loss = row_loss - params.target_extra * target_weight * target_logit
        if params.z_loss != 0.0:
            row_loss = row_loss + params.z_loss * row_lse * row_lse
        row_loss = torch.where(ignored, 0.0, row_loss)
        row_loss = torch.where(invalid, float("nan"), row_loss)
        loss[start:stop] = row_loss
        lse[start:stop] = row_lse
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
    acc = accumulation_dtype(logits.dtype)
    num_classes = logits.shape[-1]
    inner = logits.shape[1]
    for start, stop, _, _, chunk in _row_chunks(logits):
        x = chunk.to(acc)
        row_target = target[start:stop]
        safe_target, ignored, invalid, target_weight, total_mass = _row_terms(
            x, row_target, weight, weight_total, params
        )
        row_lse = lse[start:stop].unsqueeze(-1)
        # d loss / d x_i = softmax_i * (S + 2 z lse) - b * w_i - (a - b) * w_y * [i == y]
        softmax_scale = total_mass.unsqueeze(-1) + 2.0 * params.z_loss * row_lse
        grad = (x - row_lse).exp_().mul_(softmax_scale)
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


def _shard_reference(x: Tensor) -> Tensor:
    """``r_k`` per row: the shard row's first logit where it is finite, else 0 (``(rows,)``)."""
    first = x[:, 0]
    return torch.where(torch.isfinite(first), first, 0.0)


def shard_stats(
    logits: Tensor, local_target: Tensor, weight: Optional[Tensor], out: Tensor
) -> None:
    """Fill ``out`` ``(6, rows)`` (accumulation dtype) with this shard's per-row statistics.

    With ``r`` the row's first logit on this shard (0 where it is not finite, or for an empty
    shard) and ``m`` the row's max over the shard, the rows of ``out`` are::

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
        reference = _shard_reference(x)
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

    ``coefs`` is ``(4, rows)`` holding ``(lse_r, A, B, T)``, where ``lse_r`` is the row's global
    log-sum-exp minus this shard's reference ``r`` (recomputed here as in :func:`shard_stats`),
    so the softmax never subtracts two large, rounded numbers.
    """
    _, inner, num_classes = logits.shape
    if num_classes == 0:
        return
    for start, stop, outer_start, outer_stop, chunk in _row_chunks(logits):
        x = chunk.to(coefs.dtype)
        lse, scale, other, target_coef = (c[start:stop].unsqueeze(-1) for c in coefs)
        centred = x - _shard_reference(x).unsqueeze(-1)
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
