"""Vocabulary-parallel label-smoothed cross-entropy: the class dimension sharded over a group.

With tensor parallelism the output layer is often split along the classes: rank ``k`` of a
``torch.distributed`` group holds logits for its contiguous slice ``[offset_k, offset_k + C_k)`` of
the ``C = sum_k C_k`` classes (slices may be uneven, empty included; they are ordered by rank in
the group). :func:`sharded_label_smoothing_cross_entropy` (reached through
``label_smoothing_cross_entropy(..., process_group=pg)`` or ``LabelSmoothingCE(...,
process_group=pg)``) returns exactly the loss of the unsharded logits on every rank, and each rank
receives the gradient of its own slice. The smoothing masses use the *global* class count, so
``spread="all"`` and ``spread="others"`` both match the single-device result.

Per row, with the math of :mod:`lsr_fused.backends` (``b = other_mass``, ``a - b = target_extra``)
and ``r_k`` the row's first logit on rank ``k`` (0 where it is not finite, or the slice is empty)::

    rank k, one fused pass over its slice (Triton kernel or chunked torch):
        m_k   = max_c x_c           s_k = sum_c exp(x_c - m_k)      t_k = sum_c w_c (x_c - r_k)
        xy_k  = x_y - r_k if y is in the slice else 0    wy_k = w_y likewise (1 without weights)
    all_reduce(MAX):  M = max_k m_k                                   (N values)
    every rank:       s_k *= exp(m_k - M),  t_k += (r_k - M) W_k,  xy_k += r_k - M (y's slice)
    all_reduce(SUM):  sum_k s_k, sum_k t_k, sum_k xy_k, sum_k wy_k, and once
                      W = sum_k W_k  (W_k = sum(w_k), or C_k)         (4 N + 1 values)
    every rank:       lse - M = log(sum_k s_k), S = b W + (a - b) w_y,
                      loss = S (lse - M) - b t - (a - b) w_y (x_y - M) + z lse^2

Every sum is relative to a logit of the same row, so a large offset shared by all logits cancels
in ``r_k - M`` (two nearby numbers) rather than between sums of size ``C * offset``; an all-equal
row of 1e30 gives ``S log(C)``. Backward needs no communication: every rank holds the per-row
``lse - r_k``, ``S`` and ``w_y`` and writes its slice in one pass,
``g (softmax_i (S + 2 z lse) - b w_i - (a - b) w_y [i == y - offset])`` with
``softmax_i = exp((x_i - r_k) - (lse - r_k))``.
The logits are never gathered: the collectives carry O(N) statistics only.

Before any of that, each call all-gathers a small description of every rank's arguments (shard
width, target shape, dtype, options, and on the CPU the target range and a checksum of the
targets). Ranks that disagree, or a rank whose arguments are invalid, make *every* rank raise the
same ``ValueError`` instead of leaving the others blocked in a collective. On groups that carry CPU
tensors (gloo, or torch's default ``"cpu:gloo,cuda:nccl"`` pair) this exchange is host-only and
costs no device synchronisation; on an NCCL-only group it goes through the device and costs one
small device-to-host copy per call (initialise the group with both backends to avoid it).

The shard sizes (hence ``C`` and this rank's offset) come out of that same exchange, on every call,
so no cache can go stale when shapes change between calls.

Backends: ``"triton"`` runs the kernels of :mod:`lsr_fused.backends.triton_sharded` (CUDA, or CPU
tensors under ``TRITON_INTERPRET=1``); ``"torch"`` is a chunked composite whose temporaries are
bounded by a fixed number of elements, whatever the size of the logits. ``"auto"`` picks Triton on
CUDA and the torch composite elsewhere; ``"cpp"`` maps to the torch composite (the C++ extension
has no sharded kernels).
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import ops, policy
from ._params import smoothing_masses
from ._validation import validation_enabled

__all__ = ["sharded_label_smoothing_cross_entropy"]


def shard_kernels(backend: str):
    """``(stats, grad)`` functions of a resolved backend name (``"triton"`` or ``"torch"``)."""
    module = ops.backend_module("triton_sharded" if backend == "triton" else "torch")
    return module.shard_stats, module.shard_grad


# --------------------------------------------------------------------------------------------
# Agreement between ranks: one small all_gather, every call, before any O(N) collective.
# --------------------------------------------------------------------------------------------

_REDUCTION_CODES = {name: i for i, name in enumerate(policy.REDUCTIONS)}
_SPREAD_CODES = {name: i for i, name in enumerate(policy.SPREADS)}
_DTYPE_CODES = {dtype: i for i, dtype in enumerate(policy.FLOAT_DTYPES)}
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _float_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def _bits_float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


class Field(NamedTuple):
    """One thing every rank must agree on: ``width`` int64 columns of the description row.

    ``key`` identifies the field (callers rename fields by key, never by their words); ``name``
    says what it is in messages; ``show`` turns one rank's columns (a tuple) into what the
    message prints.
    """

    key: str
    name: str
    width: int = 1
    show: Callable[[tuple[int, ...]], object] = operator.itemgetter(0)


def shown_as(convert: Callable[[int], object]) -> Callable[[tuple[int, ...]], object]:
    """The ``show`` of a one-column field whose value prints as ``convert(value)``."""
    return lambda values: convert(values[0])


def _shown_as_shape(values: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(size for size in values if size >= 0)


# Header columns of a description row, then the fields every rank must agree on.
_ERROR, _WIDTH, _TARGET_MIN, _TARGET_MAX, _CHECKED, _CHECKSUM = range(6)
_AGREED_START = 6
# Target dimensions described individually in the exchange; any further ones are folded into a
# product (logits with more than 9 dimensions are still checked, slightly less precisely).
_SHAPE_SLOTS = 8
# The fields of every entry point, in the order of the row; a caller may rename them (its input
# is not called logits) and append fields of its own.
COMMON_FIELDS = (
    Field("ndim", "the number of logits dimensions"),
    Field("rows", "the number of rows (elements of target)"),
    Field("target_shape", "the target shape", _SHAPE_SLOTS, _shown_as_shape),
    Field("dtype", "the logits dtype", show=shown_as(lambda v: str(policy.FLOAT_DTYPES[v]))),
    Field("has_weight", "whether weight is given", show=shown_as(bool)),
    Field("reduction", "reduction", show=shown_as(lambda v: policy.REDUCTIONS[v])),
    Field("spread", "spread", show=shown_as(lambda v: policy.SPREADS[v])),
    Field("ignore_index", "ignore_index"),
    Field("label_smoothing", "label_smoothing", show=shown_as(_bits_float)),
    Field("z_loss", "z_loss", show=shown_as(_bits_float)),
)


class ShardInput(NamedTuple):
    """What the exchange describes of this rank's class-sharded input (logits, or a classifier
    weight): its number of classes, number of dimensions and dtype."""

    width: int
    ndim: int
    dtype: torch.dtype

    @staticmethod
    def of_logits(logits: Tensor) -> ShardInput:
        width = logits.shape[1] if logits.dim() > 1 else logits.shape[0]
        return ShardInput(width, logits.dim(), logits.dtype)


class Agreement(NamedTuple):
    """What every rank learns from the exchange: the global class count, this rank's first
    class, and every rank's number of classes (ordered by rank)."""

    num_classes: int
    offset: int
    widths: tuple[int, ...]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_exchange_values(label_smoothing, ignore_index, z_loss, chunk_size=None) -> None:
    """Reject, naming the argument, a value of the right type that the exchange's int64 row
    could not hold: an int outside int64 (``ignore_index``, ``chunk_size``), or an int too large
    for a float (``label_smoothing``, ``z_loss``). Wrong types are left to the policy checks."""
    for name, value in (("label_smoothing", label_smoothing), ("z_loss", z_loss)):
        if _is_int(value):
            try:
                float(value)
            except OverflowError:
                raise ValueError(
                    f"{name} must be a finite number, got an integer of {value.bit_length()} bits"
                ) from None
    for name, value in (("ignore_index", ignore_index), ("chunk_size", chunk_size)):
        if _is_int(value) and not _INT64_MIN <= value <= _INT64_MAX:
            raise ValueError(f"{name} must fit in int64 ([-2**63, 2**63 - 1]), got {value}")


def _target_summary(flat_target: Tensor, ignore_index: int) -> tuple[int, int, int, int]:
    """``(checked, min, max, checksum)`` of the non-ignored targets, read on the host only where
    that costs no device sync (CPU) or the user asked for it (:func:`lsr_fused.set_validation`)."""
    if flat_target.device.type != "cpu" and not validation_enabled():
        return 0, 0, -1, 0
    kept = flat_target[flat_target != ignore_index]
    low, high = (int(kept.min()), int(kept.max())) if kept.numel() else (0, -1)
    # Order-sensitive; int64 overflow wraps identically on every rank.
    positions = torch.arange(flat_target.numel(), device=flat_target.device) % 65521 + 1
    checksum = int((flat_target * positions).sum()) if flat_target.numel() else 0
    return 1, low, high, checksum


def _shape_columns(target_shape) -> list[int]:
    shape = list(target_shape)
    if len(shape) > _SHAPE_SLOTS:
        folded = 1
        for size in shape[_SHAPE_SLOTS - 1 :]:
            folded *= size
        shape = [*shape[: _SHAPE_SLOTS - 1], folded]
    return shape + [-1] * (_SHAPE_SLOTS - len(shape))


def describe(
    shard: ShardInput, flat_target: Tensor, target_shape, has_weight: bool, options, extra=()
) -> Tensor:
    """This rank's description row (int64, on the CPU): header, :data:`COMMON_FIELDS`, then the
    caller's ``extra`` values (one int per extra field). Raises where a value cannot be packed,
    so call it where a failure still reaches the exchange (see :func:`agree`)."""
    label_smoothing, ignore_index, reduction, spread, z_loss = options
    checked, low, high, checksum = _target_summary(flat_target, ignore_index)
    row = [0, shard.width, low, high, checked, checksum]
    row += [shard.ndim, flat_target.numel(), *_shape_columns(target_shape)]
    row += [_DTYPE_CODES[shard.dtype], int(bool(has_weight))]
    row += [_REDUCTION_CODES[reduction], _SPREAD_CODES[spread], ignore_index]
    row += [_float_bits(label_smoothing), _float_bits(z_loss)]
    row += [int(value) for value in extra]
    return torch.tensor(row, dtype=torch.int64)


def _carries_cpu(group) -> bool:
    """Whether collectives on ``group`` accept CPU tensors (so the exchange needs no device)."""
    try:  # per-device mapping such as "cpu:gloo,cuda:nccl" (the default of init_process_group())
        name = str(dist.get_backend_config(group)).lower()
    except (AttributeError, RuntimeError, ValueError):  # pragma: no cover - older torch
        name = str(dist.get_backend(group)).lower()
    if ":" in name:
        return any(part.split(":")[0].strip() == "cpu" for part in name.split(","))
    return "cpu" in dist.Backend.backend_capability.get(name, ())


def _exchange_device(group, tensor) -> torch.device:
    """Where the exchange's tensors live: the CPU when the group carries CPU tensors, else the
    device of ``tensor`` (this rank's input), else the current CUDA device."""
    if _carries_cpu(group):
        return torch.device("cpu")
    if isinstance(tensor, Tensor) and tensor.device.type != "cpu":
        return tensor.device
    return torch.device("cuda", torch.cuda.current_device())


def _exchange(group, description: Tensor, device: torch.device) -> list[list[int]]:
    mine = description.to(device)
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(table, mine, group=group)
    return [row.tolist() for row in table]


def _disagreement(table: list[list[int]], fields) -> Optional[str]:
    start = _AGREED_START
    for field in fields:
        per_rank = [tuple(row[start : start + field.width]) for row in table]
        start += field.width
        if len(set(per_rank)) > 1:
            shown = ", ".join(f"rank {r}: {field.show(v)}" for r, v in enumerate(per_rank))
            return f"ranks disagree on {field.name} ({shown})"
    if all(row[_CHECKED] for row in table) and len({row[_CHECKSUM] for row in table}) > 1:
        return "ranks hold different targets (every rank must pass the same global class indices)"
    return None


def _global_problem(table: list[list[int]], spread: str, ignore_index: int) -> Optional[str]:
    """What is wrong with the group's arguments taken together (C, and the targets' range)."""
    num_classes = sum(row[_WIDTH] for row in table)
    if num_classes == 0:
        return "the shards hold no classes at all (C == 0)"
    if spread == "others" and num_classes == 1:
        return "spread='others' needs at least 2 classes (C == 1)"
    for row in table:
        if row[_CHECKED] and (row[_TARGET_MIN] < 0 or row[_TARGET_MAX] >= num_classes):
            value = row[_TARGET_MIN] if row[_TARGET_MIN] < 0 else row[_TARGET_MAX]
            return (
                f"target contains {value}, which is neither ignore_index ({ignore_index}) nor a "
                f"class index in [0, {num_classes})"
            )
    return None


def agree(
    group,
    description: Optional[Tensor],
    local_error: Optional[BaseException],
    options,
    *,
    device_of=None,
    extra_fields: tuple[Field, ...] = (),
    renames: Optional[dict[str, str]] = None,
    caller: str = "label_smoothing_cross_entropy",
) -> Agreement:
    """Exchange descriptions; raise on every rank unless all ranks' arguments are valid and agree.

    Exactly one of ``description`` (from :func:`describe`) and ``local_error`` (whatever this
    rank's checks or :func:`describe` raised) is given. The exchange happens either way, so a
    rank with a bad argument re-raises its own error after it while every other rank raises a
    ``ValueError`` naming that rank, instead of waiting in a collective. ``extra_fields`` are the
    caller's fields after :data:`COMMON_FIELDS` (the same on every rank); ``renames`` maps field
    keys to the caller's words; ``device_of`` is a tensor whose device carries the exchange on
    groups without CPU support.
    """
    fields = [
        field._replace(name=(renames or {}).get(field.key, field.name))
        for field in (*COMMON_FIELDS, *extra_fields)
    ]
    if local_error is not None:
        length = _AGREED_START + sum(field.width for field in fields)
        description = torch.zeros(length, dtype=torch.int64)
        description[_ERROR] = 1
    table = _exchange(group, description, _exchange_device(group, device_of))
    if local_error is not None:
        raise local_error
    prefix = f"sharded {caller}: "
    failed = [rank for rank, row in enumerate(table) if row[_ERROR]]
    if failed:
        raise ValueError(
            f"{prefix}rank(s) {failed} of the process group rejected their arguments (see the "
            "error raised there)"
        )
    _, ignore_index, _, spread, _ = options
    problem = _disagreement(table, fields) or _global_problem(table, spread, ignore_index)
    if problem is not None:
        raise ValueError(prefix + problem)
    widths = tuple(row[_WIDTH] for row in table)
    return Agreement(sum(widths), sum(widths[: dist.get_rank(group)]), widths)


def resolve_group(process_group):
    """The group to shard over (``None``: the default group); raises where there is none."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "process_group was given but torch.distributed is not initialised "
            "(call torch.distributed.init_process_group first)"
        )
    group = dist.group.WORLD if process_group is None else process_group
    if dist.get_rank(group) < 0:
        raise ValueError("this process is not a member of process_group")
    return group


# --------------------------------------------------------------------------------------------
# Autograd.
# --------------------------------------------------------------------------------------------


class RowTerms(NamedTuple):
    """Per-row global quantities every rank holds after the statistics' all-reduce."""

    loss: Tensor  # per-row loss (0 where ignored, NaN for a target outside [0, C))
    lse: Tensor  # the global log-sum-exp (absolute: it is what z-loss squares)
    shard_lse: Tensor  # lse - r_k: the global log-sum-exp relative to this shard's reference
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
    return RowTerms(loss, lse, shard_lse, total_mass, target_weight.clone(), ignored, in_range)


def grad_coefs(upstream: Tensor, lse, shard_lse, total_mass, target_weight, ignored, in_range,
               masses, z_loss: float) -> Tensor:  # fmt: skip
    """The ``(4, rows)`` ``(lse - r_k, A, B, T)`` of ``shard_grad`` for per-row ``upstream``:
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
        ]
    )


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
    description = local_error = None
    try:
        check_exchange_values(label_smoothing, ignore_index, z_loss)
        policy.check_options(label_smoothing, ignore_index, reduction, spread, z_loss, backend)
        policy.check_tensors(logits, target, weight, spread, shard=True)
        resolved = policy.resolve_backend(backend, logits.device, sharded=True)
        flat_target = target.reshape(-1).to(torch.int64)
        shard = ShardInput.of_logits(logits)
        description = describe(shard, flat_target, target.shape, weight is not None, options)
    # Whatever fails here, on one rank only, must still reach the exchange: raising now would
    # leave every other rank waiting in it. agree() re-raises it after the exchange.
    except Exception as exc:
        local_error = exc
    num_classes, offset, _ = agree(group, description, local_error, options, device_of=logits)

    rows = policy.row_view(logits)
    acc = policy.accumulation_dtype(logits.dtype)
    if weight is not None:
        weight = weight.to(acc).contiguous()
    local_target = local_targets(flat_target, offset, rows.shape[-1])
    masses = smoothing_masses(float(label_smoothing), num_classes, spread)
    # In place needs storage we own: leaves always get a fresh gradient (as on one device).
    inplace = bool(inplace_backward) and not (logits.is_leaf and logits.requires_grad)
    setup = (group, resolved, num_classes, masses, float(z_loss), ignore_index, inplace)
    loss, target_weight = _ShardedRows.apply(rows, flat_target, local_target, weight, setup)
    denominator = None
    if reduction == "mean":
        # The target's weight is only on the rank that holds it: the forward summed it already.
        counted = flat_target != ignore_index
        denominator = counted.sum(dtype=acc) if weight is None else (target_weight * counted).sum()
    return policy.reduce(loss, target.shape, reduction, denominator)
