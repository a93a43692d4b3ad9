"""The Triton backend: one online-softmax pass per row forward, one gradient write backward.

One program per row (a 1-D grid): the forward reads the row once for its statistics and, in a
training step, a second time (from L2) to write the gradient; a backward program whose row the
forward already wrote exits after a handful of instructions. The forward's one pass serves either
reference of the contract (its weighted sum follows the running max and moves to ``x_0`` at the
end); a backward row whose reference is the max (``x_0`` not finite, or more than 64 below the
max) costs one more read, to find that max again before any store.

Runs compiled on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it).
The math is documented once, in :mod:`lsr_fused.backends`, and the calling contract (with its
parameter types) in :class:`lsr_fused.backends.contract.RowBackend`.

Issue 22's options are constexpr switches (SOFTCAP: ``params.softcap``; MIXED: ``mix=``; STATS:
``stats=``), so that a call without them compiles to the unchanged kernels: their per-row pointers
are passed as ``None`` (a constexpr) then, and only the softcap value is an extra argument.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._params import accumulation_dtype
from . import FIRST_LOGIT_MAX_GAP
from .triton_common import (
    FP_FUSION,
    capped,
    check_gradient_layout,
    check_row_vector,
    finite_or_zero,
    gradient_block_limit,
    gradient_row,
    launch_config,
    online_max_sum_exp,
    online_row_stats_at_max,
    program_row,
    reference_logit,
    row_alignment,
    row_grid,
    row_start,
    runtime_scalar,
    shifted_lse,
    softcap_value,
    stats_block_limit,
    triton_accumulation,
)

# Training steps get their gradient from the forward pass (see _forward_kernel, WRITE_GRAD).
WRITES_GRAD_IN_FORWARD = frozenset({"cuda", "cpu"})

# The contract's gap, as the constexpr a kernel may read.
MAX_GAP: tl.constexpr = tl.constexpr(FIRST_LOGIT_MAX_GAP)


# fmt: off
@triton.jit
def _row_target(target_ptr, row, num_classes, ignore_index):
    """(target_col, ignored, in_range): an out-of-range target is read as class 0 (int32) and
    flagged, so nothing is ever loaded out of bounds."""
    target = tl.load(target_ptr + row)
    in_range = (target >= 0) & (target < num_classes)
    return tl.where(in_range, target, 0).to(tl.int32), target == ignore_index, in_range


@triton.jit
def _mix_target(mix_target_ptr, mix_lambda_ptr, mix_lambda_stride, row, ignored, num_classes,
                ACC: tl.constexpr):
    """(mix_col, lam, in_range) of a mixed target, like :func:`_row_target`; an ignored row reads
    neither (its y2 may be garbage)."""
    kept = ~ignored
    mix_target = tl.load(mix_target_ptr + row, mask=kept, other=0)
    lam = tl.load(mix_lambda_ptr + row.to(tl.int64) * mix_lambda_stride, mask=kept, other=0.0)
    in_range = (mix_target >= 0) & (mix_target < num_classes)
    return tl.where(in_range, mix_target, 0).to(tl.int32), lam.to(ACC), in_range


@triton.jit
def _class_weight(col, weight_ptr, HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr):
    if HAS_WEIGHT:
        return tl.load(weight_ptr + col).to(ACC)
    return tl.full([], 1.0, ACC)


@triton.jit
def _total_weight(weight_total_ptr, num_classes, HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr):
    """W = sum of the class weights, C without weights."""
    if HAS_WEIGHT:
        return tl.load(weight_total_ptr).to(ACC)
    # (An int argument equal to 1 arrives as a constexpr, which has no .to(): add instead.)
    return tl.zeros([], ACC) + num_classes


@triton.jit
def _row_masses(
    target_col, weight_ptr, weight_total_ptr, num_classes, target_extra, other_mass,
    HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr,
):
    """(w_y, S): the target's class weight and the total weighted target mass
    S = b * W + (a - b) * w_y (W = sum of weights, C without weights)."""
    target_weight = _class_weight(target_col, weight_ptr, HAS_WEIGHT, ACC)
    total_weight = _total_weight(weight_total_ptr, num_classes, HAS_WEIGHT, ACC)
    return target_weight, other_mass * total_weight + target_extra * target_weight


@triton.jit
def _target_coefs(
    target_col, mix_col, lam, weight_ptr, weight_total_ptr, num_classes, target_extra, other_mass,
    HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr, MIXED: tl.constexpr,
):
    """(S, t1, t2): the loss's target terms are ``t1 (z_y1 - r) + t2 (z_y2 - r)`` and its gradient
    spikes ``-g t1 [i == y1] - g t2 [i == y2]``. Unmixed, ``t1 = (a - b) w_y`` and t2 is 0. Mixed,
    the smoothed target ``lam q(y1) + (1 - lam) q(y2)`` puts ``b`` on every class plus
    ``(a - b) lam`` on y1 and ``(a - b) (1 - lam)`` on y2: ``t1 = (a - b) lam w_y1``,
    ``t2 = (a - b) (1 - lam) w_y2`` and ``S = sum_c q_c w_c = b W + t1 + t2``."""
    target_weight, total_mass = _row_masses(
        target_col, weight_ptr, weight_total_ptr, num_classes, target_extra, other_mass,
        HAS_WEIGHT, ACC,
    )
    target_coef = target_extra * target_weight
    mix_coef = tl.zeros([], ACC)
    if MIXED:
        # d loss / d z_i = p_i S - b w_i - t1 [i == y1] - t2 [i == y2] (+ z-loss): the loss's
        # target terms are linear in z_y1 and z_y2, and S lse_r gives the softmax with
        # S = sum_c q_c w_c, so only the totals move with lam.
        mix_weight = _class_weight(mix_col, weight_ptr, HAS_WEIGHT, ACC)
        target_coef = target_extra * (lam * target_weight)
        mix_coef = target_extra * ((1.0 - lam) * mix_weight)
        total_weight = _total_weight(weight_total_ptr, num_classes, HAS_WEIGHT, ACC)
        total_mass = other_mass * total_weight + (target_coef + mix_coef)
    return total_mass, target_coef, mix_coef


@triton.jit
def _row_upstream(upstream, ignored, in_range):
    # Ignored rows contribute nothing; a bad target poisons its own row (NaN), never others.
    return tl.where(ignored, 0.0, tl.where(in_range, upstream, float("nan")))


@triton.jit
def _forward_reference(first, running_max, weighted_sum_at_max, weight_sum):
    """(r, sum_c w_c (x_c - r), r is x_0, r is the max) from the online statistics: ``x_0`` where
    finite and at most MAX_GAP below the max, else the max where finite, else 0. The weighted sum
    moves from the max to ``x_0`` by ``(max - x_0) * W``, at most 64 W."""
    from_first = (tl.abs(first) < float("inf")) & (running_max - first <= MAX_GAP)
    from_max = (tl.abs(running_max) < float("inf")) & ~from_first
    reference = tl.where(from_first, first, finite_or_zero(running_max))
    shift = tl.where(running_max == float("-inf"), 0.0, running_max)
    moved = tl.where(from_first, (shift - reference) * weight_sum, 0.0)
    return reference, weighted_sum_at_max + moved, from_first, from_max


@triton.jit
def _saved_lse(lse_r, from_first, from_max):
    """What backward decodes (lsr_fused.backends): ``lse_r >= 0`` for ``r = x_0`` (the sum holds
    exp(0) = 1: clamped against rounding, a NaN kept), ``-(1 + lse_r)`` for ``r = max``."""
    clamped = tl.where(from_first & (lse_r < 0.0), 0.0, lse_r)
    return tl.where(from_max, -1.0 - lse_r, clamped)


@triton.jit
def _decode_saved(saved, row_ptr, stride_class, num_classes, cap, BLOCK: tl.constexpr,
                  ALIGN: tl.constexpr, ACC: tl.constexpr, SOFTCAP: tl.constexpr):  # fmt: skip
    """Backward's ``(r, lse_r)`` from forward's saved value: a finite negative one says that
    ``r`` is the row max, recomputed here (one more read, for those rows only) with its sum,
    whose log is more exact than the saved ``-(1 + lse_r)`` (rounded to the ulp of 1);
    otherwise ``r`` is ``x_0`` where finite, else 0, and ``lse_r`` the saved value (all of the
    capped logits under SOFTCAP)."""
    reference = reference_logit(row_ptr, cap, SOFTCAP, ACC)
    lse_r = saved
    # (C == 1: x_0 is the max, never a max reference; the branch folds away once C == 1 is
    # specialized, sparing a one-warp kernel the divergent-reduction fallback it would get.)
    if (saved < 0.0) & (saved > float("-inf")) & (num_classes > 1):
        reference, sum_exp = online_max_sum_exp(
            row_ptr, stride_class, num_classes, cap, BLOCK, ALIGN, ACC, SOFTCAP
        )
        lse_r = tl.log(sum_exp)
    return reference, lse_r


@triton.jit
def _target_logit(row_ptr, col, stride_class, reference, cap, ACC: tl.constexpr,
                  SOFTCAP: tl.constexpr):
    """``z_col - r``: one (capped) logit relative to the reference."""
    logit = tl.load(row_ptr + col.to(tl.int64) * stride_class).to(ACC)
    return capped(logit, cap, SOFTCAP) - reference


@triton.jit
def _row_loss(lse_r, lse, weighted_sum, target_logit, mix_logit, total_mass, target_coef,
              mix_coef, target_extra, other_mass, z_loss, MIXED: tl.constexpr):
    """loss = S lse_r - b sum_c w_c (z_c - r) - t1 (z_y1 - r) - t2 (z_y2 - r) + zl lse**2 (see
    :func:`_target_coefs`), every logit taken relative to r so that nothing of the size of the
    logits cancels. A term whose coefficient is 0 is dropped, not multiplied, so a masked (-inf)
    logit cannot make 0 * inf."""
    loss = total_mass * lse_r
    loss -= tl.where(other_mass != 0.0, other_mass * weighted_sum, 0.0)
    if MIXED:
        loss -= tl.where(target_coef != 0.0, target_coef * target_logit, 0.0)
        loss -= tl.where(mix_coef != 0.0, mix_coef * mix_logit, 0.0)
    else:
        loss -= tl.where(target_extra != 0.0, target_coef * target_logit, 0.0)
    loss += tl.where(z_loss != 0.0, z_loss * lse * lse, 0.0)
    return loss


@triton.jit
def _second_target(mix_target_ptr, mix_lambda_ptr, mix_lambda_stride, row, ignored, num_classes,
                   row_ptr, stride_class, reference, cap, target_col, target_logit, in_range,
                   ACC: tl.constexpr, SOFTCAP: tl.constexpr, MIXED: tl.constexpr):  # fmt: skip
    """The mixed target's ``(class, lam, shifted logit, in_range)``; without MIXED, the target's
    own with ``lam = 1`` (so that the mixed formulas reduce to the plain ones at no cost)."""
    mix_col, lam, mix_logit = target_col, 1.0, target_logit
    if MIXED:
        mix_col, lam, mix_in_range = _mix_target(
            mix_target_ptr, mix_lambda_ptr, mix_lambda_stride, row, ignored, num_classes, ACC
        )
        in_range = in_range & mix_in_range
        mix_logit = _target_logit(row_ptr, mix_col, stride_class, reference, cap, ACC, SOFTCAP)
    return mix_col, lam, mix_logit, in_range


@triton.jit
def _forward_kernel(
    logits_ptr, target_ptr, weight_ptr, weight_total_ptr, loss_ptr, lse_ptr, grad_ptr, guess_ptr,
    inner, stride_outer, stride_inner, stride_class, grad_stride_outer, grad_stride_inner,
    num_classes, target_extra: tl.float64, other_mass: tl.float64, z_loss: tl.float64,
    ignore_index, mix_target_ptr, mix_lambda_ptr, mix_lambda_stride, lse_out_ptr, argmax_out_ptr,
    softcap: tl.float64, HAS_WEIGHT: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
    GRAD_BLOCK: tl.constexpr, ALIGN: tl.constexpr, ACC: tl.constexpr, SOFTCAP: tl.constexpr,
    MIXED: tl.constexpr, STATS: tl.constexpr,
):
    target_extra = runtime_scalar(target_extra, ACC)
    other_mass = runtime_scalar(other_mass, ACC)
    z_loss = runtime_scalar(z_loss, ACC)
    cap = runtime_scalar(softcap, ACC)
    row = program_row(inner)
    row_ptr = logits_ptr + row_start(inner, stride_outer, stride_inner, ALIGN)
    running_max, running_sum_exp, weighted_sum, weight_sum, argmax = online_row_stats_at_max(
        row_ptr, stride_class, num_classes, weight_ptr, cap, HAS_WEIGHT, BLOCK, ALIGN, ACC,
        SOFTCAP, STATS,
    )
    # x_0 is read after the loop (from L1/L2), not before it: a value held across the loop took a
    # stack slot on sm_80/sm_90 for odd C (issue 20); it is still read before any store.
    first = capped(tl.load(row_ptr).to(ACC), cap, SOFTCAP)
    reference, weighted_sum, from_first, from_max = _forward_reference(
        first, running_max, weighted_sum, weight_sum
    )
    lse_r = shifted_lse(running_max, running_sum_exp, reference)
    saved_lse = _saved_lse(lse_r, from_first, from_max)

    target_col, ignored, in_range = _row_target(target_ptr, row, num_classes, ignore_index)
    target_logit = _target_logit(row_ptr, target_col, stride_class, reference, cap, ACC, SOFTCAP)
    mix_col, lam, mix_logit, in_range = _second_target(
        mix_target_ptr, mix_lambda_ptr, mix_lambda_stride, row, ignored, num_classes, row_ptr,
        stride_class, reference, cap, target_col, target_logit, in_range, ACC, SOFTCAP, MIXED,
    )
    total_mass, target_coef, mix_coef = _target_coefs(
        target_col, mix_col, lam, weight_ptr, weight_total_ptr, num_classes, target_extra,
        other_mass, HAS_WEIGHT, ACC, MIXED,
    )
    lse = reference + lse_r
    loss = _row_loss(lse_r, lse, weighted_sum, target_logit, mix_logit, total_mass, target_coef,
                     mix_coef, target_extra, other_mass, z_loss, MIXED)
    loss = tl.where(in_range, loss, float("nan"))
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))
    tl.store(lse_ptr + row, saved_lse)
    if STATS:
        tl.store(lse_out_ptr + row, lse)
        tl.store(argmax_out_ptr + row, argmax.to(tl.int64))

    if WRITE_GRAD:
        # Training step: write the gradient now, for the upstream value the caller expects
        # (`guess`). Backward redoes only rows whose real upstream differs, which makes the usual
        # loss.backward() cost no second pass over the logits.
        upstream = _row_upstream(tl.load(guess_ptr).to(ACC), ignored, in_range)
        grad_row_ptr = grad_ptr + row_start(inner, grad_stride_outer, grad_stride_inner, ALIGN)
        gradient_row(
            row_ptr, grad_row_ptr, stride_class, num_classes, reference, lse_r,
            upstream * (total_mass + 2.0 * z_loss * lse), upstream * other_mass, target_col,
            upstream * target_coef, mix_col, upstream * mix_coef, cap, weight_ptr, HAS_WEIGHT,
            GRAD_BLOCK, ALIGN, ACC, SOFTCAP, MIXED,
        )


@triton.jit
def _backward_kernel(
    grad_loss_ptr, grad_loss_stride, logits_ptr, target_ptr, weight_ptr, weight_total_ptr,
    lse_ptr, grad_ptr, guess_ptr,
    inner, stride_outer, stride_inner, stride_class, grad_stride_outer, grad_stride_inner,
    num_classes, target_extra: tl.float64, other_mass: tl.float64, z_loss: tl.float64,
    ignore_index, mix_target_ptr, mix_lambda_ptr, mix_lambda_stride, softcap: tl.float64,
    HAS_WEIGHT: tl.constexpr, SKIP_GUESSED: tl.constexpr, BLOCK: tl.constexpr,
    ALIGN: tl.constexpr, ACC: tl.constexpr, SOFTCAP: tl.constexpr, MIXED: tl.constexpr,
):
    row = program_row(inner)
    upstream = tl.load(grad_loss_ptr + row.to(tl.int64) * grad_loss_stride).to(ACC)
    if SKIP_GUESSED:  # noqa: SIM102 (a constexpr switch: Triton compiles no "and" with it)
        # The forward pass already wrote this row for upstream == guess: exit before anything
        # else (a device-side decision, no host sync). A NaN upstream differs and is redone.
        if upstream == tl.load(guess_ptr).to(ACC):
            return
    target_extra = runtime_scalar(target_extra, ACC)
    other_mass = runtime_scalar(other_mass, ACC)
    z_loss = runtime_scalar(z_loss, ACC)
    cap = runtime_scalar(softcap, ACC)
    row_ptr = logits_ptr + row_start(inner, stride_outer, stride_inner, ALIGN)
    reference, lse_r = _decode_saved(
        tl.load(lse_ptr + row).to(ACC), row_ptr, stride_class, num_classes, cap, BLOCK, ALIGN,
        ACC, SOFTCAP,
    )
    target_col, ignored, in_range = _row_target(target_ptr, row, num_classes, ignore_index)
    mix_col, lam = target_col, 1.0
    if MIXED:
        mix_col, lam, mix_in_range = _mix_target(
            mix_target_ptr, mix_lambda_ptr, mix_lambda_stride, row, ignored, num_classes, ACC
        )
        in_range = in_range & mix_in_range
    upstream = _row_upstream(upstream, ignored, in_range)
    total_mass, target_coef, mix_coef = _target_coefs(
        target_col, mix_col, lam, weight_ptr, weight_total_ptr, num_classes, target_extra,
        other_mass, HAS_WEIGHT, ACC, MIXED,
    )
    grad_row_ptr = grad_ptr + row_start(inner, grad_stride_outer, grad_stride_inner, ALIGN)
    gradient_row(
        row_ptr, grad_row_ptr, stride_class, num_classes, reference, lse_r,
        upstream * (total_mass + 2.0 * z_loss * (reference + lse_r)), upstream * other_mass,
        target_col, upstream * target_coef, mix_col, upstream * mix_coef, cap, weight_ptr,
        HAS_WEIGHT, BLOCK, ALIGN, ACC, SOFTCAP, MIXED,
    )
# fmt: on


def _weight_args(weight: Tensor | None, weight_total: Tensor | None, logits: Tensor):
    # Triton needs some pointer even when HAS_WEIGHT is off; the logits pointer is never read then.
    if weight is None:
        return logits, logits, False
    return weight, weight_total, True


def _mix_args(mix, rows: int, acc_dtype: torch.dtype):
    """``(mix_target, mix_lambda, its stride)`` kernel arguments; ``None``s (a constexpr each, so
    the unmixed kernel is compiled without them) when ``mix`` is None."""
    if mix is None:
        return None, None, None
    mix_target, mix_lambda = mix
    check_row_vector("mix_target", mix_target, rows, torch.int64, contiguous=True)
    check_row_vector("mix_lambda", mix_lambda, rows, acc_dtype, contiguous=False)
    return mix_target, mix_lambda, mix_lambda.stride(0) if rows > 1 else 0


def _stats_args(stats, rows: int, acc_dtype: torch.dtype):
    """``(lse_out, argmax_out)`` kernel arguments (``None``s when ``stats`` is None)."""
    if stats is None:
        return None, None
    lse_out, argmax_out = stats
    check_row_vector("lse_out", lse_out, rows, acc_dtype, contiguous=True)
    check_row_vector("argmax_out", argmax_out, rows, torch.int64, contiguous=True)
    return lse_out, argmax_out


def forward(logits, target, weight, weight_total, params, grad_logits=None, grad_guess=None, *,
            mix=None, stats=None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Per-row ``(loss, saved lse)`` (the contract of :mod:`lsr_fused.backends`), of the logits
    read as ``c tanh(x / c)`` where ``params.softcap = c > 0``.

    ``mix = (mix_target, mix_lambda)``: ``(rows,)`` int64 contiguous and ``(rows,)`` accumulation
    dtype, any stride: the target ``lam q(y) + (1 - lam) q(mix_target)``. ``stats = (lse_out,
    argmax_out)``: ``(rows,)`` accumulation dtype and int64, contiguous, filled for every row with
    the absolute log-sum-exp and ``torch.argmax`` of the (capped) logits, in the same pass.
    """
    batch, inner, num_classes = logits.shape
    rows = batch * inner
    acc_dtype = accumulation_dtype(logits.dtype)
    softcap = softcap_value(params.softcap)
    mix_target, mix_lambda, mix_lambda_stride = _mix_args(mix, rows, acc_dtype)
    lse_out, argmax_out = _stats_args(stats, rows, acc_dtype)
    loss = torch.empty(rows, dtype=acc_dtype, device=logits.device)
    lse = torch.empty(rows, dtype=acc_dtype, device=logits.device)
    if rows == 0:
        return loss, lse
    write_grad = grad_logits is not None
    grad_arg = grad_logits if write_grad else logits
    check_gradient_layout(logits, grad_arg)
    weight_arg, weight_total_arg, has_weight = _weight_args(weight, weight_total, logits)
    block, num_warps = launch_config(
        logits, stats_block_limit(logits, has_weight, softcap > 0, stats is not None)
    )
    # The gradient loop keeps to the backward's narrower block: half the registers of a
    # statistics-wide one (values, weights and results per element), so the occupancy floor holds.
    grad_block = min(block, launch_config(logits, gradient_block_limit(softcap > 0))[0])
    # fmt: off
    _forward_kernel[row_grid(logits)](
        logits, target, weight_arg, weight_total_arg, loss, lse, grad_arg,
        grad_guess if write_grad else lse,
        inner, *logits.stride(), grad_arg.stride(0), grad_arg.stride(1), num_classes,
        params.target_extra, params.other_mass, params.z_loss, params.ignore_index,
        mix_target, mix_lambda, mix_lambda_stride, lse_out, argmax_out, softcap,
        HAS_WEIGHT=has_weight, WRITE_GRAD=write_grad, BLOCK=block, GRAD_BLOCK=grad_block,
        ALIGN=row_alignment(logits, grad_arg), ACC=triton_accumulation(logits.dtype),
        SOFTCAP=softcap > 0, MIXED=mix is not None, STATS=stats is not None,
        num_warps=num_warps, enable_fp_fusion=FP_FUSION,
    )
    # fmt: on
    return loss, lse


def backward(grad_loss, logits, target, weight, weight_total, lse, params, grad_logits,
             grad_guess=None, *, mix=None) -> None:  # fmt: skip
    """Write the gradient of ``sum(grad_loss * loss)`` into ``grad_logits`` (the contract of
    :mod:`lsr_fused.backends`; softcap and ``mix`` as in :func:`forward`, which gave ``lse``)."""
    batch, inner, num_classes = logits.shape
    rows = batch * inner
    softcap = softcap_value(params.softcap)
    mix_target, mix_lambda, mix_lambda_stride = _mix_args(
        mix, rows, accumulation_dtype(logits.dtype)
    )
    if rows == 0:
        return
    check_gradient_layout(logits, grad_logits)
    block, num_warps = launch_config(logits, gradient_block_limit(softcap > 0))
    weight_arg, weight_total_arg, has_weight = _weight_args(weight, weight_total, logits)
    skip_guessed = grad_guess is not None
    # fmt: off
    _backward_kernel[row_grid(logits)](
        grad_loss, grad_loss.stride(0), logits, target, weight_arg, weight_total_arg, lse,
        grad_logits, grad_guess if skip_guessed else lse,
        inner, *logits.stride(), grad_logits.stride(0), grad_logits.stride(1), num_classes,
        params.target_extra, params.other_mass, params.z_loss, params.ignore_index,
        mix_target, mix_lambda, mix_lambda_stride, softcap,
        HAS_WEIGHT=has_weight, SKIP_GUESSED=skip_guessed, BLOCK=block,
        ALIGN=row_alignment(logits, grad_logits), ACC=triton_accumulation(logits.dtype),
        SOFTCAP=softcap > 0, MIXED=mix is not None,
        num_warps=num_warps, enable_fp_fusion=FP_FUSION,
    )
    # fmt: on
