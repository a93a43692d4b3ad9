"""Triton kernels of the class-sharded (vocabulary-parallel) loss: see :mod:`lsr_fused.distributed`.

Two passes over this rank's ``(B, S, C_local)`` row view, one program per row, both free of host
synchronisation. Each row's shard reference ``r_k`` is its first logit here if finite, else 0:

* :func:`shard_stats`: one online-softmax read per row giving the row's local max, sum-exp (relative
  to that max, or to 0 while it is -inf), ``sum_c w_c (x_c - r_k)``, ``x_y - r_k`` and ``w_y`` when
  the target falls in this shard (0 otherwise), and ``r_k``.
* :func:`shard_grad`: one write per element,
  ``grad_i = exp((x_i - r_k) - lse_k) * A - B * w_i - T * [i == local target]`` with per-row
  ``(lse_k, A, B, T)`` prepared by the caller (``lse_k`` = global lse - ``r_k``; upstream
  gradient, masses and masks folded in).

Everything per call is a runtime value (no recompilation for a new N or mass); offsets are int64.
Runs compiled on CUDA tensors and on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

from .triton_common import (
    FP_FUSION,
    GRADIENT_BLOCK_LIMIT,
    check_gradient_layout,
    gradient_row,
    launch_config,
    online_row_stats,
    reference_logit,
    row_alignment,
    row_start,
    stats_block_limit,
    triton_accumulation,
)

# Rows of shard_stats' output.
STATS_ROWS = 6


# fmt: off
@triton.jit
def _stats_kernel(
    logits_ptr, local_target_ptr, weight_ptr, out_ptr, num_rows,
    inner, stride_outer, stride_inner, stride_class, num_classes,
    HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row_start(row, inner, stride_outer, stride_inner, ALIGN)
    reference = reference_logit(row_ptr, ACC)
    running_max, running_sum_exp, weighted_sum = online_row_stats(
        row_ptr, stride_class, num_classes, reference, weight_ptr, HAS_WEIGHT, BLOCK, ALIGN, ACC
    )

    local_target = tl.load(local_target_ptr + row)
    here = local_target >= 0
    safe_target = tl.where(here, local_target, 0)
    target_logit = tl.load(row_ptr + safe_target * stride_class, mask=here, other=0.0).to(ACC)
    if HAS_WEIGHT:
        target_weight = tl.load(weight_ptr + safe_target, mask=here, other=0.0).to(ACC)
    else:
        target_weight = tl.where(here, 1.0, 0.0).to(ACC)

    # out is (6, num_rows); stepping the pointer keeps every offset in 64-bit address arithmetic.
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


@triton.jit
def _grad_kernel(
    logits_ptr, grad_ptr, local_target_ptr, weight_ptr, coef_ptr, num_rows,
    inner, stride_outer, stride_inner, stride_class, grad_stride_outer, grad_stride_inner,
    num_classes, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr,
    ACC: tl.constexpr,
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row_start(row, inner, stride_outer, stride_inner, ALIGN)
    reference = reference_logit(row_ptr, ACC)
    coef = coef_ptr + row.to(tl.int64)
    shifted_lse = tl.load(coef).to(ACC)
    coef += num_rows
    softmax_scale = tl.load(coef).to(ACC)
    coef += num_rows
    other_scale = tl.load(coef).to(ACC)
    coef += num_rows
    target_scale = tl.load(coef).to(ACC)
    # -1 (the target is on another rank) matches no column.
    target_col = tl.load(local_target_ptr + row).to(tl.int32)
    grad_row_ptr = grad_ptr + row_start(row, inner, grad_stride_outer, grad_stride_inner, ALIGN)
    gradient_row(
        row_ptr, grad_row_ptr, stride_class, num_classes, reference, shifted_lse, softmax_scale,
        other_scale, target_col, target_scale, weight_ptr, HAS_WEIGHT, BLOCK, ALIGN, ACC,
    )
# fmt: on


def shard_stats(
    logits: Tensor, local_target: Tensor, weight: Optional[Tensor], out: Tensor
) -> None:
    """Fill ``out`` ``(6, rows)`` (accumulation dtype, contiguous) with the per-row shard
    statistics ``(m_k, s_k, sum_c w_c (x_c - r_k), x_y - r_k, w_y, r_k)``; ``local_target``
    ``(rows,)`` int64 holds ``y - offset`` or -1 (not here). An empty shard gives
    ``(-inf, 0, 0, 0, 0, 0)``."""
    batch, inner, num_classes = logits.shape
    num_rows = batch * inner
    if tuple(out.shape) != (STATS_ROWS, num_rows) or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous ({STATS_ROWS}, {num_rows}) tensor, got shape "
            f"{tuple(out.shape)}"
        )
    if num_rows == 0:
        return
    if num_classes == 0:  # an empty shard: nothing to read, and no pointer worth passing
        out.zero_()
        out[0].fill_(float("-inf"))
        return
    block, num_warps = launch_config(logits, stats_block_limit(logits, weight is not None))
    # fmt: off
    _stats_kernel[(num_rows,)](
        logits, local_target, logits if weight is None else weight,  # never read without weight
        out, num_rows, inner, *logits.stride(), num_classes,
        HAS_WEIGHT=weight is not None, BLOCK=block, ALIGN=row_alignment(logits),
        ACC=triton_accumulation(logits.dtype), num_warps=num_warps, enable_fp_fusion=FP_FUSION,
    )
    # fmt: on


def shard_grad(
    logits: Tensor,
    local_target: Tensor,
    weight: Optional[Tensor],
    coefs: Tensor,
    grad_logits: Tensor,
) -> None:
    """Write this shard's gradient into ``grad_logits`` (the logits' shape and class stride; may
    be ``logits``) from the per-row ``coefs`` ``(4, rows)`` = ``(lse_k, A, B, T)``, contiguous,
    ``lse_k`` relative to this shard's reference ``r_k`` (recomputed here from the first logit)."""
    batch, inner, num_classes = logits.shape
    num_rows = batch * inner
    if num_rows == 0 or num_classes == 0:
        return
    check_gradient_layout(logits, grad_logits)
    block, num_warps = launch_config(logits, GRADIENT_BLOCK_LIMIT)
    # fmt: off
    _grad_kernel[(num_rows,)](
        logits, grad_logits, local_target, logits if weight is None else weight, coefs, num_rows,
        inner, *logits.stride(), grad_logits.stride(0), grad_logits.stride(1), num_classes,
        HAS_WEIGHT=weight is not None, BLOCK=block, ALIGN=row_alignment(logits, grad_logits),
        ACC=triton_accumulation(logits.dtype), num_warps=num_warps, enable_fp_fusion=FP_FUSION,
    )
    # fmt: on
