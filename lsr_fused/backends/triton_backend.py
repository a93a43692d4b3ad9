"""The Triton backend: one online-softmax pass per row forward, one gradient write backward.

Runs compiled on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it).
The math and the calling contract are documented once, in :mod:`lsr_fused.backends`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._params import RowParams

_LOG2E = 1.4426950408889634

# Training steps get their gradient from the forward pass (see _forward_kernel, WRITE_GRAD).
WRITES_GRAD_IN_FORWARD = frozenset({"cuda", "cpu"})


@triton.jit
def row_offset(row, inner, stride_outer, stride_inner):
    # Rows enumerate (outer, inner) pairs of a (B, S, C) view; int64 so that N * C past 2**31 works.
    row = row.to(tl.int64)
    return (row // inner) * stride_outer + (row % inner) * stride_inner


@triton.jit
def _target_mass(
    target,
    weight_ptr,
    weight_total_ptr,
    num_classes,
    target_extra,
    other_mass,
    HAS_WEIGHT: tl.constexpr,
    ACC: tl.constexpr,
):
    """(w_y, S) for one row: the target's class weight and the total weighted target mass
    S = b * W + (a - b) * w_y (W = sum of weights, C without weights)."""
    if HAS_WEIGHT:
        target_weight = tl.load(weight_ptr + target).to(ACC)
        total_weight = tl.load(weight_total_ptr).to(ACC)
    else:
        target_weight = tl.full([], 1.0, ACC)
        # (An int argument equal to 1 arrives as a constexpr, which has no .to(): add instead.)
        total_weight = tl.zeros([], ACC) + num_classes
    return target_weight, other_mass * total_weight + target_extra * target_weight


# fmt: off
@triton.jit
def _target_status(target_ptr, row, num_classes, ignore_index):
    """(safe_target, ignored, in_range): an out-of-range target is read as class 0 and flagged,
    so nothing is ever loaded out of bounds."""
    target = tl.load(target_ptr + row)
    in_range = (target >= 0) & (target < num_classes)
    return tl.where(in_range, target, 0), target == ignore_index, in_range


@triton.jit
def _row_upstream(upstream, ignored, in_range):
    # Ignored rows contribute nothing; a bad target poisons its own row (NaN), never others.
    return tl.where(ignored, 0.0, tl.where(in_range, upstream, float("nan")))


@triton.jit
def _gradient_block(
    x, cols, in_row, lse, softmax_scale, safe_target, target_term, other_mass, weight_ptr,
    HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr,
):
    # d loss / d x_i = softmax_i * (S + 2 z lse) - b * w_i - (a - b) * w_y * [i == y]
    # softmax_scale = S + 2 z lse and target_term = (a - b) * w_y are per-row scalars.
    grad = tl.exp2((x - lse) * _LOG2E) * softmax_scale
    if HAS_WEIGHT:
        grad -= other_mass * tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(ACC)
    else:
        grad -= other_mass
    return grad - tl.where(cols == safe_target, target_term, 0.0)


@triton.jit
def online_row_stats(
    row_ptr, stride_class, num_classes, weight_ptr,
    HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    """One read of a row: (max, sum of exp(x - max), sum of w * x), -inf safe.

    The running (max, sum-exp) pair is kept as scalars per block, so each element costs one exp2;
    while every logit seen is -inf the shift is 0 instead of -inf, whose difference would be NaN.
    The returned sum-exp is relative to the max, or to 0 when the whole row is -inf.
    """
    running_max = tl.full([], float("-inf"), ACC)
    running_sum_exp = tl.zeros([], ACC)
    weighted_logit_sum = tl.zeros([], ACC)
    for start in range(0, num_classes, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < num_classes
        x = tl.load(
            row_ptr + cols.to(tl.int64) * stride_class, mask=in_row, other=float("-inf")
        ).to(ACC)
        new_max = tl.maximum(running_max, tl.max(x, 0))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum_exp = running_sum_exp * tl.exp2((running_max - shift) * _LOG2E) + tl.sum(
            tl.exp2((x - shift) * _LOG2E), 0
        )
        running_max = new_max
        # Masked lanes hold -inf; zero them before any product so that 0 * inf never appears.
        x_or_zero = tl.where(in_row, x, 0.0)
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(ACC)
            weighted_logit_sum += tl.sum(w * x_or_zero, 0)
        else:
            weighted_logit_sum += tl.sum(x_or_zero, 0)
    return running_max, running_sum_exp, weighted_logit_sum


@triton.jit
def _forward_kernel(
    logits_ptr, target_ptr, weight_ptr, weight_total_ptr, loss_ptr, lse_ptr, grad_ptr, guess_ptr,
    inner, stride_outer, stride_inner, stride_class, num_classes,
    target_extra, other_mass, z_loss, ignore_index,
    HAS_WEIGHT: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0)
    row_start = row_offset(row, inner, stride_outer, stride_inner)
    row_ptr = logits_ptr + row_start
    running_max, running_sum_exp, weighted_logit_sum = online_row_stats(
        row_ptr, stride_class, num_classes, weight_ptr, HAS_WEIGHT, BLOCK, ACC
    )
    shift = tl.where(running_max == float("-inf"), 0.0, running_max)
    lse = shift + tl.log(running_sum_exp)

    safe_target, ignored, in_range = _target_status(target_ptr, row, num_classes, ignore_index)
    target_logit = tl.load(row_ptr + safe_target * stride_class).to(ACC)
    target_weight, total_mass = _target_mass(
        safe_target, weight_ptr, weight_total_ptr, num_classes, target_extra, other_mass,
        HAS_WEIGHT, ACC,
    )
    # loss = S * lse - b * sum_c w_c x_c - (a - b) * w_y * x_y + z * lse**2; a term whose
    # coefficient is 0 is dropped, not multiplied, so a masked (-inf) logit cannot make 0 * inf.
    loss = total_mass * lse
    loss -= tl.where(other_mass != 0.0, other_mass * weighted_logit_sum, 0.0)
    loss -= tl.where(target_extra != 0.0, target_extra * target_weight * target_logit, 0.0)
    loss += tl.where(z_loss != 0.0, z_loss * lse * lse, 0.0)
    loss = tl.where(in_range, loss, float("nan"))
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))
    tl.store(lse_ptr + row, lse)

    if WRITE_GRAD:
        # Training step: write the gradient now, for the upstream value the caller expects
        # (`guess`), while the row is likely still in L2. Backward redoes only rows whose real
        # upstream differs, which makes the usual loss.backward() cost no second pass.
        upstream = _row_upstream(tl.load(guess_ptr).to(ACC), ignored, in_range)
        softmax_scale = total_mass + 2.0 * z_loss * lse
        target_term = target_extra * target_weight
        for start in range(0, num_classes, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            in_row = cols < num_classes
            offsets = row_start + cols.to(tl.int64) * stride_class
            x = tl.load(logits_ptr + offsets, mask=in_row, other=0.0).to(ACC)
            grad = _gradient_block(
                x, cols, in_row, lse, softmax_scale, safe_target, target_term, other_mass,
                weight_ptr, HAS_WEIGHT, ACC,
            )
            tl.store(grad_ptr + offsets, (grad * upstream).to(grad_ptr.dtype.element_ty),
                     mask=in_row)


@triton.jit
def _backward_kernel(
    grad_loss_ptr, grad_loss_stride, logits_ptr, target_ptr, weight_ptr, weight_total_ptr,
    lse_ptr, grad_ptr, guess_ptr,
    inner, stride_outer, stride_inner, stride_class, num_classes,
    target_extra, other_mass, z_loss, ignore_index,
    HAS_WEIGHT: tl.constexpr, SKIP_GUESSED: tl.constexpr, BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < num_classes
    upstream = tl.load(grad_loss_ptr + row.to(tl.int64) * grad_loss_stride).to(ACC)
    if SKIP_GUESSED:
        # The forward pass already wrote this row for upstream == guess: then touch nothing
        # (masked-off lanes issue no memory traffic), a device-side decision with no host sync.
        row_end = tl.where(upstream != tl.load(guess_ptr).to(ACC), num_classes, 0)
        in_row = cols < row_end
    # grad_ptr shares the logits' strides (the caller guarantees it), so one offset serves both.
    offsets = row_offset(row, inner, stride_outer, stride_inner) + cols.to(tl.int64) * stride_class
    safe_target, ignored, in_range = _target_status(target_ptr, row, num_classes, ignore_index)
    upstream = _row_upstream(upstream, ignored, in_range)
    lse = tl.load(lse_ptr + row).to(ACC)
    target_weight, total_mass = _target_mass(
        safe_target, weight_ptr, weight_total_ptr, num_classes, target_extra, other_mass,
        HAS_WEIGHT, ACC,
    )
    x = tl.load(logits_ptr + offsets, mask=in_row, other=0.0).to(ACC)
    grad = _gradient_block(
        x, cols, in_row, lse, total_mass + 2.0 * z_loss * lse, safe_target,
        target_extra * target_weight, other_mass, weight_ptr, HAS_WEIGHT, ACC,
    )
    tl.store(grad_ptr + offsets, (grad * upstream).to(grad_ptr.dtype.element_ty), mask=in_row)
# fmt: on


def _launch_config(logits: Tensor) -> tuple[int, int, tl.dtype]:
    """Block size, warps and accumulation dtype for a (B, S, C) logits view."""
    num_classes = logits.shape[-1]
    # Long rows: 4096-8192 wide blocks kept enough loads in flight on Hopper; short rows take one
    # block per row so that the loop runs once.
    block = min(
        triton.next_power_of_2(max(num_classes, 16)), 8192 if logits.element_size() <= 2 else 4096
    )
    num_warps = 4 if block <= 2048 else 8
    acc = tl.float64 if logits.dtype == torch.float64 else tl.float32
    return block, num_warps, acc


def _weight_args(weight: Tensor | None, weight_total: Tensor | None, logits: Tensor):
    # Triton needs some pointer even when HAS_WEIGHT is off; the logits pointer is never read then.
    if weight is None:
        return logits, logits, False
    return weight, weight_total, True


def forward(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    weight_total: Tensor | None,
    params: RowParams,
    grad_logits: Tensor | None = None,
    grad_guess: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    batch, inner, num_classes = logits.shape
    rows = batch * inner
    acc_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = torch.empty(rows, dtype=acc_dtype, device=logits.device)
    lse = torch.empty(rows, dtype=acc_dtype, device=logits.device)
    if rows == 0:
        return loss, lse
    write_grad = grad_logits is not None
    if write_grad and grad_logits.stride() != logits.stride():
        raise ValueError("grad_logits must share the logits' strides")
    block, num_warps, acc = _launch_config(logits)
    weight_arg, weight_total_arg, has_weight = _weight_args(weight, weight_total, logits)
    # fmt: off
    _forward_kernel[(rows,)](
        logits, target, weight_arg, weight_total_arg, loss, lse,
        grad_logits if write_grad else logits, grad_guess if write_grad else lse,
        inner, logits.stride(0), logits.stride(1), logits.stride(2), num_classes,
        params.target_extra, params.other_mass, params.z_loss, params.ignore_index,
        HAS_WEIGHT=has_weight, WRITE_GRAD=write_grad, BLOCK=block, ACC=acc, num_warps=num_warps,
    )
    # fmt: on
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
    grad_guess: Tensor | None = None,
) -> None:
    batch, inner, num_classes = logits.shape
    rows = batch * inner
    if rows == 0:
        return
    if grad_logits.stride() != logits.stride():
        raise ValueError("grad_logits must share the logits' strides")
    block, num_warps, acc = _launch_config(logits)
    block = min(block, 4096)
    weight_arg, weight_total_arg, has_weight = _weight_args(weight, weight_total, logits)
    skip_guessed = grad_guess is not None
    grid = (rows, triton.cdiv(num_classes, block))
    # fmt: off
    _backward_kernel[grid](
        grad_loss, grad_loss.stride(0), logits, target, weight_arg, weight_total_arg, lse,
        grad_logits, grad_guess if skip_guessed else lse,
        inner, logits.stride(0), logits.stride(1), logits.stride(2), num_classes,
        params.target_extra, params.other_mass, params.z_loss, params.ignore_index,
        HAS_WEIGHT=has_weight, SKIP_GUESSED=skip_guessed, BLOCK=block, ACC=acc,
        num_warps=num_warps,
    )
    # fmt: on
