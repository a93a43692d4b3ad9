"""Triton kernels of the class-sharded (vocabulary-parallel) loss: see :mod:`lsr_fused.distributed`;
the calling contract is :class:`lsr_fused.backends.contract.ShardBackend`.

Two passes over this rank's ``(B, S, C_local)`` row view, one program per row, both free of host
synchronisation. Each row's shard reference ``r_k`` follows the rule of :mod:`lsr_fused.backends`
on this shard's row: its first logit ``x_0`` where finite and at most ``FIRST_LOGIT_MAX_GAP`` below
the shard's max ``m_k``, else ``m_k`` where finite, else 0.

* :func:`shard_stats`: one online-softmax read per row giving the row's local max, sum-exp (relative
  to that max, or to 0 while it is -inf), ``sum_c w_c (x_c - r_k)``, ``x_y - r_k`` and ``w_y`` when
  the target falls in this shard (0 otherwise), and ``r_k``. The weighted sum is kept relative to
  the running max and moved to ``r_k`` at the end, so that a row whose ``x_0`` fails the rule (a
  first class masked with -1e9, say) needs no second read.
* :func:`shard_grad`: one write per element,
  ``grad_i = exp((x_i - r_k) - lse_k) * A - B * w_i - T * [i == local target]`` with per-row
  ``(lse_k, A, B, T, r_k)`` prepared by the caller (``lse_k`` = global lse - ``r_k``; upstream
  gradient, masses and masks folded in; ``r_k`` as :func:`shard_stats` returned it).

Issue 22's options are constexpr switches, so that a call without them runs the unchanged kernels:
``softcap=`` (SOFTCAP: every logit read as ``c tanh(x / c)``, the gradient times
``1 - (z / c)**2``), ``local_mix_target=`` (MIXED: the statistics' rows 6 and 7 for a second
target, the gradient's second spike ``- T2 [i == local mix target]``) and ``argmax_out=`` (STATS:
the shard-local first argmax, from the same read).

Everything per call is a runtime value (no recompilation for a new N or mass); offsets are int64.
Runs compiled on CUDA tensors and on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import FIRST_LOGIT_MAX_GAP
from .triton_common import (
    FP_FUSION,
    LOG2E,
    capped,
    check_gradient_layout,
    check_row_vector,
    first_max_update,
    gradient_block_limit,
    gradient_row,
    launch_config,
    load_capped_block,
    program_row,
    row_alignment,
    row_grid,
    row_start,
    runtime_scalar,
    softcap_value,
    stats_block_limit,
    triton_accumulation,
)

# Rows of shard_stats' output and of shard_grad's coefficients (without, with a mixed target).
STATS_ROWS = 6
COEF_ROWS = 5
MIXED_STATS_ROWS = 8
MIXED_COEF_ROWS = 6

# Read inside the kernels, hence a constexpr.
_MAX_GAP: tl.constexpr = tl.constexpr(FIRST_LOGIT_MAX_GAP)


@triton.jit
def _shard_row_stats(row_ptr, stride_class, num_classes, weight_ptr, cap,
                     HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr,
                     ACC: tl.constexpr, SOFTCAP: tl.constexpr, STATS: tl.constexpr):  # fmt: skip
    """``(m_k, s_k, sum_c w_c (x_c - r_k), r_k, first argmax)`` of one row in one read, ``r_k`` by
    the rule of the module docstring, every logit soft-capped under ``SOFTCAP``; the argmax (the
    shard-local column, int32, see ``first_max_update``) only under ``STATS``, else 0.

    The weighted sum is taken relative to the running max ``shift`` and moved to each new max by
    ``(old - new) * (weight seen so far)``, the online softmax's rescale written for a sum; at the
    end it moves to ``r_k`` by ``(m_k - r_k) W_k``, exactly 0 where ``r_k = m_k`` and a difference
    of at most ``_MAX_GAP`` where ``r_k = x_0``. Every difference is of two logits of the row, so a
    large offset they share cancels, and a first logit far below the rest (-1e9) never enters any
    but its own term. One loop without branches keeps the kernel within the compile test's limits.
    """
    first = capped(tl.load(row_ptr).to(ACC), cap, SOFTCAP)
    running_max = tl.full([], float("-inf"), ACC)
    running_sum_exp = tl.zeros([], ACC)
    weighted_sum = tl.zeros([], ACC)  # sum w (x - shift)
    weight_seen = tl.zeros([], ACC)
    best = tl.full([], float("-inf"), ACC)
    best_col = tl.zeros([], tl.int32)
    for start in range(0, num_classes, BLOCK):
        cols, in_row, x, _ = load_capped_block(
            row_ptr, start, stride_class, num_classes, float("-inf"), cap, BLOCK, ALIGN, ACC,
            SOFTCAP,
        )  # fmt: skip
        block_max = tl.max(x, 0)
        if STATS:
            best, best_col = first_max_update(best, best_col, cols, x, block_max)
        new_max = tl.maximum(running_max, block_max)
        old_shift = tl.where(running_max == float("-inf"), 0.0, running_max)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        centred = x - shift
        running_sum_exp = running_sum_exp * tl.exp2((running_max - shift) * LOG2E) + tl.sum(
            tl.exp2(centred * LOG2E), 0
        )
        running_max = new_max
        # Masked lanes hold -inf; zero them before any product so that 0 * inf never appears.
        centred = tl.where(in_row, centred, 0.0)
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(ACC)
            block_sum, block_weight = tl.sum(w * centred, 0), tl.sum(w, 0)
        else:
            block_sum = tl.sum(centred, 0)
            block_weight = tl.minimum(num_classes - start, BLOCK).to(ACC)
        weighted_sum = weighted_sum + (old_shift - shift) * weight_seen + block_sum
        weight_seen += block_weight
    final_shift = tl.where(running_max == float("-inf"), 0.0, running_max)
    use_first = (tl.abs(first) < float("inf")) & (running_max - first <= _MAX_GAP)
    fallback = tl.where(tl.abs(running_max) < float("inf"), running_max, 0.0)
    reference = tl.where(use_first, first, fallback)
    # The move is 0 * W_k where r_k = m_k, and 0 - 0 for an all -inf row (never inf - inf).
    weighted_sum += (final_shift - reference) * weight_seen
    return running_max, running_sum_exp, weighted_sum, reference, best_col


@triton.jit
def _shard_target(row_ptr, local_target_ptr, row, stride_class, weight_ptr, cap,
                  HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr, SOFTCAP: tl.constexpr):  # fmt: skip
    """``(z_y, w_y, here)``: whether the target (a local column, or -1) is on this shard, its
    (capped) logit (0 where not here) and class weight (0 where not here, else 1 without
    weights)."""
    local_target = tl.load(local_target_ptr + row)
    here = local_target >= 0
    safe_target = tl.where(here, local_target, 0)
    target_logit = tl.load(row_ptr + safe_target * stride_class, mask=here, other=0.0).to(ACC)
    target_logit = capped(target_logit, cap, SOFTCAP)
    if HAS_WEIGHT:
        target_weight = tl.load(weight_ptr + safe_target, mask=here, other=0.0).to(ACC)
    else:
        target_weight = tl.where(here, 1.0, 0.0).to(ACC)
    return target_logit, target_weight, here


# fmt: off
@triton.jit
def _stats_kernel(
    logits_ptr, local_target_ptr, weight_ptr, out_ptr, num_rows,
    inner, stride_outer, stride_inner, stride_class, num_classes,
    local_mix_target_ptr, argmax_out_ptr, softcap: tl.float64,
    HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr, ACC: tl.constexpr,
    SOFTCAP: tl.constexpr, MIXED: tl.constexpr, STATS: tl.constexpr,
):
    row = program_row(inner)
    cap = runtime_scalar(softcap, ACC)
    row_ptr = logits_ptr + row_start(inner, stride_outer, stride_inner, ALIGN)
    running_max, running_sum_exp, weighted_sum, reference, argmax = _shard_row_stats(
        row_ptr, stride_class, num_classes, weight_ptr, cap, HAS_WEIGHT, BLOCK, ALIGN, ACC,
        SOFTCAP, STATS,
    )
    target_logit, target_weight, here = _shard_target(
        row_ptr, local_target_ptr, row, stride_class, weight_ptr, cap, HAS_WEIGHT, ACC, SOFTCAP
    )

    # out is (6, num_rows) ((8, num_rows) mixed); stepping the pointer keeps every offset in
    # 64-bit address arithmetic.
    out = out_ptr + row.to(tl.int64)
    tl.store(out, running_max)
    out += num_rows
    tl.store(out, running_sum_exp)
    out += num_rows
    tl.store(out, weighted_sum)
    out += num_rows
    tl.store(out, tl.where(here, target_logit - reference, 0.0))
    out += num_rows
    tl.store(out, target_weight)
    out += num_rows
    tl.store(out, reference)
    if MIXED:
        mix_logit, mix_weight, mix_here = _shard_target(
            row_ptr, local_mix_target_ptr, row, stride_class, weight_ptr, cap, HAS_WEIGHT, ACC,
            SOFTCAP,
        )
        out += num_rows
        tl.store(out, tl.where(mix_here, mix_logit - reference, 0.0))
        out += num_rows
        tl.store(out, mix_weight)
    if STATS:
        tl.store(argmax_out_ptr + row, argmax.to(tl.int64))


@triton.jit
def _grad_kernel(
    logits_ptr, grad_ptr, local_target_ptr, weight_ptr, coef_ptr, num_rows,
    inner, stride_outer, stride_inner, stride_class, grad_stride_outer, grad_stride_inner,
    num_classes, local_mix_target_ptr, softcap: tl.float64, HAS_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr, ALIGN: tl.constexpr, ACC: tl.constexpr, SOFTCAP: tl.constexpr,
    MIXED: tl.constexpr,
):
    row = program_row(inner)
    row_ptr = logits_ptr + row_start(inner, stride_outer, stride_inner, ALIGN)
    coef = coef_ptr + row.to(tl.int64)
    shifted_lse = tl.load(coef).to(ACC)
    coef += num_rows
    softmax_scale = tl.load(coef).to(ACC)
    coef += num_rows
    other_scale = tl.load(coef).to(ACC)
    coef += num_rows
    target_scale = tl.load(coef).to(ACC)
    coef += num_rows
    reference = tl.load(coef).to(ACC)
    # -1 (the target is on another rank) matches no column.
    target_col = tl.load(local_target_ptr + row).to(tl.int32)
    mix_col, mix_scale = target_col, 0.0
    if MIXED:
        coef += num_rows
        mix_scale = tl.load(coef).to(ACC)
        mix_col = tl.load(local_mix_target_ptr + row).to(tl.int32)
    grad_row_ptr = grad_ptr + row_start(inner, grad_stride_outer, grad_stride_inner, ALIGN)
    gradient_row(
        row_ptr, grad_row_ptr, stride_class, num_classes, reference, shifted_lse, softmax_scale,
        other_scale, target_col, target_scale, mix_col, mix_scale, runtime_scalar(softcap, ACC),
        weight_ptr, HAS_WEIGHT, BLOCK, ALIGN, ACC, SOFTCAP, MIXED,
    )
# fmt: on


def _local_mix_arg(local_mix_target: Optional[Tensor], num_rows: int) -> Optional[Tensor]:
    if local_mix_target is not None:
        check_row_vector("local_mix_target", local_mix_target, num_rows, torch.int64,
                         contiguous=True)  # fmt: skip
    return local_mix_target


def _check_table(name: str, table: Tensor, rows: int, num_rows: int, mixed: bool) -> None:
    if tuple(table.shape) != (rows, num_rows) or not table.is_contiguous():
        extra = " (local_mix_target given)" if mixed else ""
        raise ValueError(
            f"{name} must be a contiguous ({rows}, {num_rows}) tensor{extra}, got shape "
            f"{tuple(table.shape)}"
        )


def shard_stats(logits, local_target, weight, out, *, softcap=0.0, local_mix_target=None,
                argmax_out=None) -> None:  # fmt: skip
    """Fill ``out`` ``(6, rows)`` (accumulation dtype, contiguous) with the per-row shard
    statistics ``(m_k, s_k, sum_c w_c (x_c - r_k), x_y - r_k, w_y, r_k)``; ``local_target``
    ``(rows,)`` int64 holds ``y - offset`` or -1 (not here). An empty shard gives
    ``(-inf, 0, 0, 0, 0, 0)``.

    ``softcap = c > 0``: every logit is read as ``c tanh(x / c)``. ``local_mix_target`` (``(rows,)``
    int64, contiguous, a local column or -1): ``out`` is ``(8, rows)``, rows 6 and 7 the
    ``x_y2 - r_k`` and ``w_y2`` of the mixed target (0 where it is not here). ``argmax_out``
    (``(rows,)`` int64, contiguous): the shard-local ``torch.argmax`` of each row (0 when empty).
    """
    batch, inner, num_classes = logits.shape
    num_rows = batch * inner
    mixed = local_mix_target is not None
    _check_table("out", out, MIXED_STATS_ROWS if mixed else STATS_ROWS, num_rows, mixed)
    local_mix_target = _local_mix_arg(local_mix_target, num_rows)
    if argmax_out is not None:
        check_row_vector("argmax_out", argmax_out, num_rows, torch.int64, contiguous=True)
    softcap = softcap_value(softcap)
    if num_rows == 0:
        return
    if num_classes == 0:  # an empty shard: nothing to read, and no pointer worth passing
        out.zero_()
        out[0].fill_(float("-inf"))
        if argmax_out is not None:
            argmax_out.zero_()
        return
    block, num_warps = launch_config(
        logits, stats_block_limit(logits, weight is not None, softcap > 0, argmax_out is not None)
    )
    # fmt: off
    _stats_kernel[row_grid(logits)](
        logits, local_target, logits if weight is None else weight,  # never read without weight
        out, num_rows, inner, *logits.stride(), num_classes, local_mix_target, argmax_out, softcap,
        HAS_WEIGHT=weight is not None, BLOCK=block, ALIGN=row_alignment(logits),
        ACC=triton_accumulation(logits.dtype), SOFTCAP=softcap > 0, MIXED=mixed,
        STATS=argmax_out is not None, num_warps=num_warps, enable_fp_fusion=FP_FUSION,
    )
    # fmt: on


def shard_grad(logits, local_target, weight, coefs, grad_logits, *, softcap=0.0,
               local_mix_target=None) -> None:  # fmt: skip
    """Write this shard's gradient into ``grad_logits`` (the logits' shape and class stride; may
    be ``logits``) from the per-row ``coefs`` ``(5, rows)`` = ``(lse_k, A, B, T, r_k)``
    (accumulation dtype, contiguous): ``r_k`` is this shard's reference as :func:`shard_stats`
    returned it and ``lse_k`` the global lse minus ``r_k``.

    ``local_mix_target`` given: ``coefs`` is ``(6, rows)``, row 5 the ``T2`` of
    ``- T2 [i == local_mix_target]``. ``softcap = c > 0``: ``z = c tanh(x / c)`` replaces ``x``
    (``exp(z_i - r_k - lse_k)``) and the whole gradient is multiplied by ``1 - (z_i / c)**2``.
    """
    batch, inner, num_classes = logits.shape
    num_rows = batch * inner
    mixed = local_mix_target is not None
    _check_table("coefs", coefs, MIXED_COEF_ROWS if mixed else COEF_ROWS, num_rows, mixed)
    local_mix_target = _local_mix_arg(local_mix_target, num_rows)
    softcap = softcap_value(softcap)
    if num_rows == 0 or num_classes == 0:
        return
    check_gradient_layout(logits, grad_logits)
    block, num_warps = launch_config(logits, gradient_block_limit(softcap > 0))
    # fmt: off
    _grad_kernel[row_grid(logits)](
        logits, grad_logits, local_target, logits if weight is None else weight, coefs, num_rows,
        inner, *logits.stride(), grad_logits.stride(0), grad_logits.stride(1), num_classes,
        local_mix_target, softcap,
        HAS_WEIGHT=weight is not None, BLOCK=block, ALIGN=row_alignment(logits, grad_logits),
        ACC=triton_accumulation(logits.dtype), SOFTCAP=softcap > 0, MIXED=mixed,
        num_warps=num_warps, enable_fp_fusion=FP_FUSION,
    )
    # fmt: on
