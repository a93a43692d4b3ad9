"""Triton building blocks shared by the local and the vocabulary-parallel kernels.

Every kernel reads a ``(B, S, C)`` row view: row ``r`` starts at ``(r // S) * stride_outer +
(r % S) * stride_inner`` and its class ``c`` sits ``c * stride_class`` further. Offsets are int64 so
that ``N * C`` past ``2**31`` works; per-element index arithmetic stays int32 (a class index is
below ``2**31``).

Rules the compiler holds us to (the interpreter does not, see ``tests/test_triton_compile.py``):
module globals read inside a kernel must be ``tl.constexpr``, and a Python float argument is bound
as fp32 unless its parameter is annotated; the per-call masses are therefore annotated
``tl.float64`` and rounded to the accumulation dtype once per program, so float64 logits get
float64 masses on a GPU exactly as in the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._params import accumulation_dtype

# exp(x) = exp2(x * log2(e)): ex2 is the hardware's exponential.
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


@triton.jit
def runtime_scalar(value, ACC: tl.constexpr):
    """A ``tl.float64`` kernel argument in the accumulation dtype.

    Written as an addition rather than a cast because the interpreter binds Python floats as fp32
    (a cast would round float64 masses there) but keeps double precision when they meet a float64
    tensor; compiled, the fp64 add and the rounding to fp32 happen once per program.
    """
    return (tl.zeros([], ACC) + value).to(ACC)


@triton.jit
def row_start(row, inner, stride_outer, stride_inner):
    """Element offset (int64) of the first class of ``row`` in a ``(B, S, C)`` view."""
    row = row.to(tl.int64)
    return (row // inner) * stride_outer + (row % inner) * stride_inner


@triton.jit
def load_block(row_ptr, start, stride_class, num_classes, other, BLOCK: tl.constexpr):
    """One block of a row, masked lanes filled with ``other``: ``(cols, in_row, values)``."""
    cols = start + tl.arange(0, BLOCK)
    in_row = cols < num_classes
    x = tl.load(row_ptr + cols.to(tl.int64) * stride_class, mask=in_row, other=other)
    return cols, in_row, x


@triton.jit
def online_row_stats(
    row_ptr,
    stride_class,
    num_classes,
    weight_ptr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    """One read of a row: ``(max, sum of exp(x - max), sum of w * x)``, -inf safe.

    The running (max, sum-exp) pair is a scalar per block, so each element costs one ex2. While
    every logit seen is -inf the shift is 0 instead of -inf, whose difference would be NaN; the
    returned sum-exp is then relative to 0.
    """
    running_max = tl.full([], float("-inf"), ACC)
    running_sum_exp = tl.zeros([], ACC)
    weighted_logit_sum = tl.zeros([], ACC)
    for start in range(0, num_classes, BLOCK):
        cols, in_row, x = load_block(
            row_ptr, start, stride_class, num_classes, float("-inf"), BLOCK
        )
        x = x.to(ACC)
        new_max = tl.maximum(running_max, tl.max(x, 0))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum_exp = running_sum_exp * tl.exp2((running_max - shift) * LOG2E) + tl.sum(
            tl.exp2((x - shift) * LOG2E), 0
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
def gradient_block(
    x,
    cols,
    in_row,
    lse,
    softmax_scale,
    other_scale,
    target_col,
    target_scale,
    weight_ptr,
    HAS_WEIGHT: tl.constexpr,
    ACC: tl.constexpr,
):
    """``softmax_i * softmax_scale - other_scale * w_i - target_scale * [i == target_col]``.

    The per-row scalars already carry the upstream gradient ``g``: with the math of
    :mod:`lsr_fused.backends`, ``softmax_scale = g (S + 2 z lse)``, ``other_scale = g b`` and
    ``target_scale = g (a - b) w_y``. ``target_col`` is int32, so the compare is one 32-bit
    instruction. The exponent is ``(x - lse) * log2(e)``, not the one-FMA
    ``x * log2(e) - lse * log2(e)``, which loses about ``|x| * 2**-24`` and shows for logits in
    the hundreds.
    """
    grad = tl.exp2((x - lse) * LOG2E) * softmax_scale
    if HAS_WEIGHT:
        grad -= other_scale * tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(ACC)
    else:
        grad -= other_scale
    return grad - tl.where(cols == target_col, target_scale, 0.0)


def triton_accumulation(dtype: torch.dtype) -> tl.dtype:
    """:func:`lsr_fused._params.accumulation_dtype` as the kernels' ``ACC`` constexpr."""
    return {torch.float64: tl.float64, torch.float32: tl.float32}[accumulation_dtype(dtype)]


def launch_config(logits: Tensor, max_block: int) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` for a ``(B, S, C)`` view.

    Short rows take one block so that the loop runs once; long rows use ``max_block`` wide blocks,
    enough bytes in flight per program for Hopper's memory system.
    """
    block = min(triton.next_power_of_2(max(logits.shape[-1], 16)), max_block)
    return block, (4 if block <= 2048 else 8)


def stats_block_limit(logits: Tensor) -> int:
    """Widest block of the one-pass statistics loops: 16 KB of logits per iteration."""
    return 16384 // logits.element_size()


# Multiply-adds fused (FFMA), stated explicitly: Triton 3.9 warns that its default will change.
FP_FUSION = True

# A gradient block is one program of a 2-D grid (row, block): narrower keeps more programs.
GRADIENT_BLOCK_LIMIT = 4096
