"""The pure-PyTorch backend: the fused row math written with ATen ops, processed in row chunks.
It implements both contracts of :mod:`lsr_fused.backends.contract` (their parameter types are
written there): ``RowBackend`` and, for the vocabulary-parallel loss, ``ShardBackend``.

It is the fallback where no compiled kernel is available, not the test oracle (the tests carry their
own dense reference). Chunking bounds its temporaries to ``_CHUNK_ELEMENTS`` elements whatever the
size of the logits, so it never holds a one-hot or a log-prob tensor of the logits' size.

The options of issue 22 (see lsr_fused.backends): ``params.softcap`` ``c > 0`` reads every logit as
``z = c tanh(x / c)`` (chain factor ``dz/dx = 1 / cosh(x / c)^2``), ``mix=(y2, lam)`` mixes a second
target in with weight ``1 - lam``, and ``stats=(lse_out, argmax_out)`` also writes each row's
absolute log-sum-exp and ``torch.argmax`` of ``z``. Off, each leaves the original path unchanged.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .._params import RowParams, accumulation_dtype
from .._row_math import gradient_coefs, smoothed_row_loss
from . import FIRST_LOGIT_MAX_GAP

_CHUNK_ELEMENTS = 1 << 22

# Rows of shard_stats' output and shard_grad's coefficients, without and with a mixed target.
_STATS_ROWS = (6, 8)
_COEF_ROWS = (5, 6)


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


def _capped(chunk: Tensor, dtype: torch.dtype, softcap: float) -> Tensor:
    """The chunk in ``dtype``, read as ``c tanh(x / c)`` when ``softcap`` ``c > 0`` (torch.tanh
    saturates to +-1 without overflow: an infinite logit becomes +-c, NaN stays NaN). Off, it may
    be a view of the logits: callers never write into it."""
    x = chunk.to(dtype)
    if softcap > 0.0:
        return torch.tanh(x / softcap).mul_(softcap)
    return x


def _softcap_slope(chunk: Tensor, dtype: torch.dtype, softcap: float) -> Tensor:
    """``dz/dx = 1 - tanh(x / c)^2``, written ``1 / cosh(x / c)^2`` so that it keeps its relative
    precision where tanh saturates (and is exactly 0 for an infinite logit, cosh overflowing)."""
    return torch.cosh(chunk.to(dtype) / softcap).square_().reciprocal_()


def _out_of_range(target: Tensor, num_classes: int) -> Tensor:
    return (target < 0) | (target >= num_classes)


def _class_weight_at(index: Tensor, weight: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``w[index]`` (ones without weights); ``index`` must be in range."""
    if weight is None:
        return torch.ones_like(index, dtype=dtype)
    return weight.gather(0, index)


class _Terms(NamedTuple):
    """Per-row quantities of a chunk shared by forward and backward.

    ``picks``: one ``(index (rows, 1), mass (rows,), share)`` per target, the loss taking
    ``(a - b) * mass * (z_index - r)``: ``(y, w_y, None)`` unmixed; ``(y1, lam w_y1, lam)`` and
    ``(y2, (1 - lam) w_y2, 1 - lam)`` mixed, whose logit is not read where its share is 0 (so that
    a masked logit never gives 0 * inf)."""

    ignored: Tensor
    invalid: Tensor
    total_mass: Tensor  # S = b W + (a - b) * sum of the picks' masses
    picks: tuple[tuple[Tensor, Tensor, Optional[Tensor]], ...]


def _row_terms(x: Tensor, target: Tensor, weight: Tensor | None, weight_total: Tensor | None,
               params: RowParams, mix=None) -> _Terms:  # fmt: skip
    """The chunk's :class:`_Terms`; ``mix`` is this chunk's ``(y2, lam)`` or None. A row is
    ignored by its first target alone (then y2 and lam do not matter); a y2 outside ``[0, C)``
    makes a kept row invalid, as y1 does."""
    num_classes = x.shape[-1]
    ignored = target == params.ignore_index
    invalid = ~ignored & _out_of_range(target, num_classes)
    if mix is not None:
        invalid = invalid | (~ignored & _out_of_range(mix[0], num_classes))
    safe_target = torch.where(ignored | invalid, 0, target)
    target_weight = _class_weight_at(safe_target, weight, x.dtype)
    total_weight = float(num_classes) if weight is None else weight_total
    if mix is None:
        picks = ((safe_target.unsqueeze(-1), target_weight, None),)
        target_mass = target_weight
    else:
        safe_mix = torch.where(ignored | invalid, 0, mix[0])
        share = torch.where(ignored, 1.0, mix[1].to(x.dtype))  # garbage lam must not leak
        rest = 1.0 - share
        first, second = share * target_weight, rest * _class_weight_at(safe_mix, weight, x.dtype)
        picks = ((safe_target.unsqueeze(-1), first, share), (safe_mix.unsqueeze(-1), second, rest))
        target_mass = first + second
    total_mass = params.other_mass * total_weight + params.target_extra * target_mass
    return _Terms(ignored, invalid, total_mass, picks)


def _chunk_mix(mix, start: int, stop: int):
    """This chunk's rows of ``mix``."""
    return None if mix is None else (mix[0][start:stop], mix[1][start:stop])


def _first_logit(x: Tensor) -> Tensor:
    """``(rows, 1)``: each row's first logit (``-inf`` for rows without classes)."""
    if x.shape[-1] == 0:
        return x.new_full((x.shape[0], 1), float("-inf"))
    return x[:, :1]


def _row_max(x: Tensor) -> Tensor:
    """``(rows, 1)``: each row's max (``-inf`` for rows without classes)."""
    return x.amax(dim=-1, keepdim=True) if x.shape[-1] else _first_logit(x)


def _max_and_argmax(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(rows, 1)`` max and ``(rows,)`` torch.argmax (first maximum, first NaN) in one pass; 0
    for rows without classes."""
    if x.shape[-1] == 0:
        return _first_logit(x), torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    row_max, argmax = x.max(dim=-1, keepdim=True)
    return row_max, argmax.squeeze(-1)


def _reference(x: Tensor, row_max: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Forward's reference ``r`` ``(rows, 1)`` and whether it is the first logit (see
    lsr_fused.backends): the first logit where finite and within FIRST_LOGIT_MAX_GAP of the row
    max, else the max where finite, else 0. ``row_max``: ``(rows, 1)`` if already known."""
    first = _first_logit(x)
    row_max = _row_max(x) if row_max is None else row_max
    from_first = torch.isfinite(first) & (row_max - first <= FIRST_LOGIT_MAX_GAP)
    reference = torch.where(from_first, first, torch.where(torch.isfinite(row_max), row_max, 0.0))
    return reference, from_first


def _decode(x: Tensor, saved: Tensor) -> tuple[Tensor, Tensor]:
    """Backward's ``(r, lse_r)`` ``(rows, 1)`` from forward's saved value (see lsr_fused.backends):
    a negative finite value ``-(1 + lse_r)`` says that r is the row max."""
    first = _first_logit(x)
    from_max = torch.isfinite(saved) & (saved < 0)
    reference = torch.where(from_max, _row_max(x), torch.where(torch.isfinite(first), first, 0.0))
    return reference, torch.where(from_max, -1.0 - saved, saved)


def _picked_logit(shifted: Tensor, index: Tensor, share: Optional[Tensor]) -> Tensor:
    """``z_index - r`` per row; 0 where the pick's ``share`` is 0 (its logit is not read)."""
    logit = shifted.gather(-1, index).squeeze(-1)
    return logit if share is None else torch.where(share == 0.0, 0.0, logit)


def _chunk_loss(z: Tensor, terms: _Terms, weight: Tensor | None, params: RowParams,
                row_max: Tensor | None = None):  # fmt: skip
    """``(loss, lse_r, r + lse_r, from_first)`` per row of a chunk of (capped) logits ``z``."""
    # Every term relative to r: z - r is exact for logits near r, so that a large offset shared
    # by the row cancels before rounding instead of after. z - r <= FIRST_LOGIT_MAX_GAP: exp
    # cannot overflow. An all -inf row has r = 0 and exp(-inf) = 0; a +inf logit gives NaN.
    reference, from_first = _reference(z, row_max)
    shifted = z - reference
    row_lse = shifted.exp().sum(dim=-1).log()
    row_lse = torch.where(shifted.amax(dim=-1) == float("inf"), float("nan"), row_lse)
    absolute_lse = row_lse + reference.squeeze(-1)

    def weighted_sum() -> Tensor:
        return shifted.sum(dim=-1) if weight is None else shifted @ weight

    def target_term() -> Tensor:
        parts = [mass * _picked_logit(shifted, index, share) for index, mass, share in terms.picks]
        return params.target_extra * sum(parts[1:], parts[0])

    row_loss = smoothed_row_loss(
        terms.total_mass, row_lse, absolute_lse, (params.target_extra, params.other_mass),
        params.z_loss, weighted_sum, target_term, terms.ignored, terms.invalid,
    )  # fmt: skip
    return row_loss, row_lse, absolute_lse, from_first.squeeze(-1)


def _saved_lse(row_lse: Tensor, from_first: Tensor) -> Tensor:
    """The saved encoding: lse_r >= 0 where r is the first logit (the sum holds exp(0) = 1;
    clamped against rounding), -(1 + lse_r) <= -1 where r is the row max, -inf or NaN for
    degenerate rows."""
    from_max = ~from_first & torch.isfinite(row_lse)
    saved = torch.where(from_first, row_lse.clamp_min(0.0), row_lse)
    return torch.where(from_max, -1.0 - row_lse, saved)


def _chunk_grad(chunk: Tensor, z: Tensor, terms: _Terms, reference: Tensor, row_lse: Tensor,
                upstream: Tensor, weight: Tensor | None, params: RowParams) -> Tensor:  # fmt: skip
    """``upstream * d loss / d x`` ``(rows, C)`` of a chunk, from ``(r, lse_r)`` ``(rows, 1)``:
    the coefficients of :func:`lsr_fused._row_math.gradient_coefs` for the chunk's picks, applied
    by :func:`_gradient_rows`. Reads ``chunk`` (the logits) before returning, never after."""
    absolute_lse = (row_lse + reference).squeeze(-1)
    masses = (params.target_extra, params.other_mass)
    scale, other, target_coefs = gradient_coefs(
        upstream, terms.total_mass, absolute_lse, masses, params.z_loss,
        tuple(mass for _, mass, _ in terms.picks), terms.ignored, terms.invalid,
    )  # fmt: skip
    picks = [(index.squeeze(-1), coef.unsqueeze(-1))
             for (index, _, _), coef in zip(terms.picks, target_coefs, strict=True)]  # fmt: skip
    other = None if params.other_mass == 0.0 else other.unsqueeze(-1)
    return _gradient_rows(chunk, z, reference, row_lse, scale.unsqueeze(-1), other, weight, picks,
                          params.softcap)  # fmt: skip


def _gradient_rows(chunk: Tensor, z: Tensor, reference: Tensor, shifted_lse: Tensor,
                   scale: Tensor, other: Tensor | None, weight: Tensor | None, picks,
                   softcap: float) -> Tensor:  # fmt: skip
    """``exp((z_i - r) - lse_r) A - B w_i - sum_k T_k [i == t_k]`` ``(rows, C)`` for a chunk of
    (capped) logits ``z``, times ``dz/dx`` under a softcap: the one dense gradient of the local
    and the shard passes. ``r``, ``lse_r``, ``A`` = ``scale`` and ``B`` = ``other`` (None: 0) are
    ``(rows, 1)``; ``picks`` holds ``(t_k (rows,), T_k (rows, 1))``, ``t_k`` -1 on rows whose
    target is not among these classes."""
    grad = (z - reference).sub_(shifted_lse).exp_().mul_(scale)
    if other is not None:
        if weight is None:
            grad.sub_(other)
        else:
            grad.addcmul_(other, weight, value=-1.0)
    for index, coef in picks:
        _scatter_local(grad, index, coef)
    if softcap > 0.0:
        grad.mul_(_softcap_slope(chunk, z.dtype, softcap))
    return grad


def _write_rows(grad_logits: Tensor, grad: Tensor, outer_start: int, outer_stop: int) -> None:
    """Copy a chunk's ``(rows, C)`` gradient into ``grad_logits[outer_start:outer_stop]``."""
    _, inner, num_classes = grad_logits.shape
    grad_logits[outer_start:outer_stop].copy_(
        grad.view(outer_stop - outer_start, inner, num_classes)
    )


def forward(logits, target, weight, weight_total, params, grad_logits=None, grad_guess=None, *,
            mix=None, stats=None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Per-row loss and the saved (shifted) log-sum-exp of lsr_fused.backends.

    ``mix``: ``(y2 (rows,) int64, lam (rows,) accumulation dtype, any stride)``. ``stats``:
    ``(lse_out, argmax_out)`` ``(rows,)`` filled for every row with ``r + lse_r`` and the
    ``torch.argmax`` of the (capped) logits. ``grad_logits`` (with ``grad_guess`` ``(1,)``): also
    write the gradient for upstream ``grad_guess`` there (it may be ``logits``: each chunk is read
    in full before its gradient is written)."""
    acc = accumulation_dtype(logits.dtype)
    rows = target.numel()
    loss = torch.empty(rows, dtype=acc, device=logits.device)
    lse = torch.empty(rows, dtype=acc, device=logits.device)
    for start, stop, outer_start, outer_stop, chunk in _row_chunks(logits):
        z = _capped(chunk, acc, params.softcap)
        chunk_mix = _chunk_mix(mix, start, stop)
        terms = _row_terms(z, target[start:stop], weight, weight_total, params, chunk_mix)
        row_max = None
        if stats is not None:
            row_max, stats[1][start:stop] = _max_and_argmax(z)
        row_loss, row_lse, absolute_lse, from_first = _chunk_loss(z, terms, weight, params, row_max)
        loss[start:stop] = row_loss
        lse[start:stop] = _saved_lse(row_lse, from_first)
        if stats is not None:
            stats[0][start:stop] = absolute_lse
        if grad_logits is not None:
            # From the saved value, exactly as backward would recompute it.
            reference, shifted_lse = _decode(z, lse[start:stop].unsqueeze(-1))
            upstream = grad_guess.expand(stop - start)
            grad = _chunk_grad(chunk, z, terms, reference, shifted_lse, upstream, weight, params)
            _write_rows(grad_logits, grad, outer_start, outer_stop)
    return loss, lse


def backward(grad_loss, logits, target, weight, weight_total, lse, params, grad_logits,
             grad_guess=None, *, mix=None) -> None:  # fmt: skip
    """Write ``grad_loss * d loss / d logits`` into ``grad_logits``; ``lse`` is forward's saved
    value (``r`` is recomputed from the logits, before ``grad_logits`` may overwrite them).
    ``mix`` as for :func:`forward`. ``grad_guess`` is accepted for the common signature and not
    used: every row is written, which is correct whatever forward wrote."""
    del grad_guess
    acc = accumulation_dtype(logits.dtype)
    for start, stop, outer_start, outer_stop, chunk in _row_chunks(logits):
        z = _capped(chunk, acc, params.softcap)
        chunk_mix = _chunk_mix(mix, start, stop)
        terms = _row_terms(z, target[start:stop], weight, weight_total, params, chunk_mix)
        reference, row_lse = _decode(z, lse[start:stop].unsqueeze(-1))
        upstream = grad_loss[start:stop]
        grad = _chunk_grad(chunk, z, terms, reference, row_lse, upstream, weight, params)
        _write_rows(grad_logits, grad, outer_start, outer_stop)


# --------------------------------------------------------------------------------------------
# The vocabulary-parallel passes (see lsr_fused.distributed): the same row math over one shard.


def _check_rows(name: str, tensor: Tensor, counts: tuple[int, int], mixed: bool) -> None:
    """Raise unless ``tensor`` has the row count of the layout (``counts[mixed]``)."""
    expected = counts[1] if mixed else counts[0]
    if tensor.dim() != 2 or tensor.shape[0] != expected:
        given = "given" if mixed else "not given"
        raise ValueError(
            f"{name} must have {expected} rows when local_mix_target is {given}, got shape "
            f"{tuple(tensor.shape)}"
        )


def _empty_shard_stats(out: Tensor) -> None:
    """Statistics of a shard without classes: max -inf, every sum and the reference 0."""
    out.zero_()
    out[0].fill_(float("-inf"))


def _local_pick(centred: Tensor, local_target: Tensor, weight: Optional[Tensor]):
    """``(z_t - r, w_t)`` per row where the local target ``t`` is on this shard, else ``(0, 0)``
    (``w_t`` = 1 without weights)."""
    here = local_target >= 0
    safe = torch.where(here, local_target, 0).unsqueeze(-1)
    logit = torch.where(here, centred.gather(-1, safe).squeeze(-1), 0.0)
    if weight is None:
        return logit, here.to(centred.dtype)
    return logit, torch.where(here, weight.gather(0, safe.squeeze(-1)), 0.0)


def shard_stats(logits, local_target, weight, out, *, softcap=0.0, local_mix_target=None,
                argmax_out=None) -> None:  # fmt: skip
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

    ``softcap`` ``c > 0``: every ``x`` above is ``c tanh(x / c)``. ``local_mix_target`` (the
    second target, local like ``local_target``): ``out`` is ``(8, rows)``, rows 6 and 7 being
    rows 3 and 4 for it. ``argmax_out`` ``(rows,)`` int64: the shard-local ``torch.argmax`` of
    each row (first maximum, first NaN), 0 for an empty shard.
    """
    _check_rows("out", out, _STATS_ROWS, local_mix_target is not None)
    if logits.shape[-1] == 0:
        _empty_shard_stats(out)
        if argmax_out is not None:
            argmax_out.zero_()
        return
    for start, stop, _, _, chunk in _row_chunks(logits):
        z = _capped(chunk, out.dtype, softcap)
        if argmax_out is None:
            row_max = _row_max(z)
        else:
            row_max, argmax_out[start:stop] = _max_and_argmax(z)
        reference = _reference(z, row_max)[0].squeeze(-1)
        row_max = row_max.squeeze(-1)
        shift = torch.where(row_max == float("-inf"), 0.0, row_max)
        out[0, start:stop] = row_max
        out[1, start:stop] = (z - shift.unsqueeze(-1)).exp().sum(dim=-1)
        centred = z - reference.unsqueeze(-1)
        out[2, start:stop] = centred.sum(dim=-1) if weight is None else centred @ weight
        out[3, start:stop], out[4, start:stop] = _local_pick(
            centred, local_target[start:stop], weight
        )
        if local_mix_target is not None:
            out[6, start:stop], out[7, start:stop] = _local_pick(
                centred, local_mix_target[start:stop], weight
            )
        out[5, start:stop] = reference


def _scatter_local(grad: Tensor, local_target: Tensor, coef: Tensor) -> None:
    """``grad[i, t_i] -= coef_i`` (``coef`` ``(rows, 1)``) where ``t_i`` is on this shard."""
    here = local_target >= 0
    safe = torch.where(here, local_target, 0).unsqueeze(-1)
    grad.scatter_add_(-1, safe, torch.where(here.unsqueeze(-1), -coef, 0.0))


def shard_grad(logits, local_target, weight, coefs, grad_logits, *, softcap=0.0,
               local_mix_target=None) -> None:  # fmt: skip
    """Write ``exp((x_i - r) - lse_r) A - B w_i - T [i == local_target]`` per row into
    ``grad_logits`` (same strides as ``logits``, possibly ``logits`` itself).

    ``coefs`` is ``(5, rows)`` holding ``(lse_r, A, B, T, r)``: ``r`` is this shard's reference
    (row 5 of :func:`shard_stats`) and ``lse_r`` the row's global log-sum-exp minus ``r``, so the
    softmax never subtracts two large, rounded numbers. With ``local_mix_target``, ``coefs`` is
    ``(6, rows)`` and the gradient also gets ``- T2 [i == local_mix_target]`` (row 5: ``T2``).
    ``softcap`` ``c > 0``: ``x`` above is ``c tanh(x / c)`` and the whole gradient is multiplied
    by ``1 - tanh(x / c)^2``.
    """
    _check_rows("coefs", coefs, _COEF_ROWS, local_mix_target is not None)
    if logits.shape[-1] == 0:
        return
    for start, stop, outer_start, outer_stop, chunk in _row_chunks(logits):
        z = _capped(chunk, coefs.dtype, softcap)
        lse, scale, other, target_coef, reference = (c[start:stop].unsqueeze(-1) for c in coefs[:5])
        picks = [(local_target[start:stop], target_coef)]
        if local_mix_target is not None:
            picks.append((local_mix_target[start:stop], coefs[5, start:stop].unsqueeze(-1)))
        grad = _gradient_rows(chunk, z, reference, lse, scale, other, weight, picks, softcap)
        _write_rows(grad_logits, grad, outer_start, outer_stop)
