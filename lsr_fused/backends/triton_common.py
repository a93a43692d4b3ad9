"""Triton building blocks shared by the local and the vocabulary-parallel kernels.

Every kernel reads a ``(B, S, C)`` row view: row ``r`` starts at ``(r // S) * stride_outer +
(r % S) * stride_inner`` and its class ``c`` sits ``c * stride_class`` further. The gradient has
its own row strides (a sliced logits view gets a dense gradient) and the same class stride.
Offsets are int64 so that ``N * C`` past ``2**31`` works; per-element index arithmetic stays int32
(a class index is below ``2**31``).

Every program handles one whole row (a 1-D grid over rows), so it can find the row's reference
``r`` (its first logit, or its max where that logit is an outlier, see :mod:`lsr_fused.backends`)
and read its target logit before writing anything, and a backward program with nothing to do
exits before any per-element work.

Rules the compiler holds us to (the interpreter does not, see ``tests/test_triton_compile.py``):
module globals read inside a kernel must be ``tl.constexpr``, and a Python float argument is bound
as fp32 unless its parameter is annotated; the per-call masses are therefore annotated
``tl.float64`` and rounded to the accumulation dtype once per program, so float64 logits get
float64 masses on a GPU exactly as in the interpreter.
"""

from __future__ import annotations

from fractions import Fraction
from math import comb, factorial

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._params import accumulation_dtype

# exp(x) = exp2(x * log2(e)): ex2 is the hardware's exponential.
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


def _tanh_series(terms: int) -> tuple[float, ...]:
    """The first Taylor coefficients of ``tanh(u) / u`` in powers of ``u**2``:
    ``2**(2n) (2**(2n) - 1) B_2n / (2n)!`` for ``n = 1, 2, ...`` (B: the Bernoulli numbers)."""
    bernoulli = [Fraction(1)]
    for m in range(1, 2 * terms + 1):
        bernoulli.append(-sum(comb(m + 1, k) * bernoulli[k] for k in range(m)) / (m + 1))
    return tuple(
        float(2 ** (2 * n) * (2 ** (2 * n) - 1) * bernoulli[2 * n] / factorial(2 * n))
        for n in range(1, terms + 1)
    )


# Below |u| = 1/4 the soft cap's tanh(u) comes from its Taylor series: there 1 - exp(-2|u|), the
# exponential form's numerator, has lost about log2(1 / (2|u|)) bits (2 ulp at 1/4). At 1/4 the
# first omitted term is 8e-9 (float32, 5 terms) and 2e-18 (float64, 11 terms) of tanh(u).
TANH_SERIES_BELOW: tl.constexpr = tl.constexpr(0.25)
TANH_TERMS_FP32: tl.constexpr = tl.constexpr(5)
TANH_TERMS_FP64: tl.constexpr = tl.constexpr(11)
TANH_SERIES_FP32: tl.constexpr = tl.constexpr(_tanh_series(5))
TANH_SERIES_FP64: tl.constexpr = tl.constexpr(_tanh_series(11))
# Keys of the first-maximum search (first_max_update): "no candidate" (above any class index),
# and the offset that puts a NaN lane's column below every other key (int32 both).
NO_COLUMN: tl.constexpr = tl.constexpr(2**31 - 1)
NAN_KEY: tl.constexpr = tl.constexpr(-(2**31))


@triton.jit
def runtime_scalar(value, ACC: tl.constexpr):
    """A ``tl.float64`` kernel argument in the accumulation dtype.

    Written as an addition rather than a cast because the interpreter binds Python floats as fp32
    (a cast would round float64 masses there) but keeps double precision when they meet a float64
    tensor; compiled, the fp64 add and the rounding to fp32 happen once per program.
    """
    return (tl.zeros([], ACC) + value).to(ACC)


# The second dimension of a CUDA grid holds at most this many programs, the first 2**31 - 1.
MAX_GRID_Y = 65535
MAX_ROWS = 2**31 - 1


def row_grid(rows_view: Tensor) -> tuple[int, int]:
    """The programs of a row kernel over a ``(B, S, C)`` row view: one per row, as a ``(B, 1)``
    grid when ``S == 1`` and an ``(S, B)`` one otherwise, so that a program reads its row's two
    indices from its program ids instead of dividing (a division's registers stay allocated for
    the whole kernel: 80 instead of 64 per thread in a bf16 training-step forward).
    ``lsr_fused.policy.row_view`` keeps ``B <= MAX_GRID_Y`` where ``S > 1``."""
    batch, inner = rows_view.shape[0], rows_view.shape[1]
    if inner == 1:
        return batch, 1
    if batch > MAX_GRID_Y:
        raise RuntimeError(
            f"lsr_fused: a (B, S, C) row view with S > 1 takes B <= {MAX_GRID_Y}, got B = {batch}"
        )
    if batch * inner > MAX_ROWS:  # a row index is 32-bit, as a one-dimensional grid's would be
        raise RuntimeError(f"lsr_fused: at most {MAX_ROWS} rows, got {batch * inner}")
    return inner, batch


# ``inner == 1`` is a compile-time test where it holds (Triton specializes an argument equal to 1),
# so the kernels of flat (N, C) logits keep the one-dimensional arithmetic.
@triton.jit
def program_row(inner):
    """This program's row ``b * S + s`` in the grid of :func:`row_grid` (``inner`` = ``S``)."""
    if inner == 1:
        return tl.program_id(0)
    return tl.program_id(1) * inner + tl.program_id(0)


@triton.jit
def row_start(inner, stride_outer, stride_inner, ALIGN: tl.constexpr):
    """Element offset (int64) of the first class of this program's row (see :func:`row_grid`).

    The caller checked (:func:`row_alignment`) that the strides of dimensions longer than 1 are
    multiples of ``ALIGN``: counting in units of ``ALIGN`` and multiplying back by the constexpr
    lets Triton prove the offset 16-byte aligned when a stride is a multiple of 8 but not of 16
    (without it, it falls back to 16-bit accesses).
    """
    if inner == 1:
        return tl.program_id(0).to(tl.int64) * (stride_outer // ALIGN) * ALIGN
    within = tl.program_id(0).to(tl.int64) * (stride_inner // ALIGN)
    return (tl.program_id(1).to(tl.int64) * (stride_outer // ALIGN) + within) * ALIGN


@triton.jit
def finite_or_zero(value):
    return tl.where(tl.abs(value) < float("inf"), value, 0.0)


@triton.jit
def _horner(coefficients, TERMS: tl.constexpr, u2):
    """``sum_k coefficients[k] u2**k`` over the first ``TERMS`` coefficients."""
    value = tl.zeros_like(u2) + coefficients[TERMS - 1]
    for k in tl.static_range(TERMS - 2, -1, -1):
        value = value * u2 + coefficients[k]
    return value


@triton.jit
def soft_cap(x, cap):
    """``(z, dz/dx) = (cap tanh(u), 1 - tanh(u)**2)``, ``u = x / cap``, for ``x`` in the
    accumulation dtype: +-inf gives +-cap with slope 0, NaN stays NaN.

    With ``e = exp(-2|u|)`` in ``[0, 1]`` (no overflow at any ``x``):
    ``tanh|u| = (1 - e) / (1 + e)`` and ``1 - tanh(u)**2 = (1 - tanh|u|)(1 + tanh|u|) =
    4 e / (1 + e)**2``, products and quotients of positive terms, exact to a few ulp, except
    ``1 - e``, which cancels as ``|u| -> 0``: there the odd Taylor series ``u (1 + c1 u**2 + ...)``
    takes over. (The slope is what the chain rule multiplies the gradient by:
    ``d/dx [c tanh(x / c)] = 1 - tanh(x / c)**2 = 1 - (z / c)**2``.)
    """
    inv_cap = 1.0 / cap
    u = x * inv_cap
    e = tl.exp2(tl.abs(x) * (inv_cap * (-2.0 * LOG2E)))
    reciprocal = 1.0 / (1.0 + e)
    magnitude = (1.0 - e) * reciprocal
    u2 = u * u
    if u2.dtype == tl.float64:
        series = _horner(TANH_SERIES_FP64, TANH_TERMS_FP64, u2)
    else:
        series = _horner(TANH_SERIES_FP32, TANH_TERMS_FP32, u2)
    signed = tl.where(u < 0.0, -magnitude, magnitude)
    tanh = tl.where(tl.abs(u) < TANH_SERIES_BELOW, u * series, signed)
    return cap * tanh, 4.0 * e * reciprocal * reciprocal


@triton.jit
def capped(x, cap, SOFTCAP: tl.constexpr):
    """A logit as every formula reads it: ``cap tanh(x / cap)`` under ``SOFTCAP``, else ``x``."""
    if SOFTCAP:
        x, _ = soft_cap(x, cap)
    return x


@triton.jit
def reference_logit(row_ptr, cap, SOFTCAP: tl.constexpr, ACC: tl.constexpr):
    """The row's reference ``r``: its first (capped) logit in the accumulation dtype if finite,
    else 0."""
    return finite_or_zero(capped(tl.load(row_ptr).to(ACC), cap, SOFTCAP))


@triton.jit
def load_block(row_ptr, start, stride_class, num_classes, other, BLOCK: tl.constexpr,
               ALIGN: tl.constexpr):  # fmt: skip
    """One block of a row, masked lanes filled with ``other``: ``(cols, in_row, values)``.

    With ``ALIGN > 1`` the caller checked that ``C`` is a multiple of ``ALIGN``, so the mask is
    constant over each aligned group of ``ALIGN`` lanes (one predicate per 128-bit access)."""
    cols = start + tl.arange(0, BLOCK)
    in_row = cols < num_classes
    if ALIGN > 1:
        in_row = tl.max_constancy(in_row, ALIGN)
    x = tl.load(row_ptr + cols.to(tl.int64) * stride_class, mask=in_row, other=other)
    return cols, in_row, x


@triton.jit
def load_capped_block(row_ptr, start, stride_class, num_classes, other, cap, BLOCK: tl.constexpr,
                      ALIGN: tl.constexpr, ACC: tl.constexpr, SOFTCAP: tl.constexpr):  # fmt: skip
    """:func:`load_block` in the accumulation dtype, soft-capped under ``SOFTCAP`` (masked lanes
    still ``other``): ``(cols, in_row, z, dz/dx)``, the slope 1 without the cap."""
    cols, in_row, x = load_block(row_ptr, start, stride_class, num_classes, other, BLOCK, ALIGN)
    x = x.to(ACC)
    slope = 1.0
    if SOFTCAP:
        x, slope = soft_cap(x, cap)
        x = tl.where(in_row, x, other)
    return cols, in_row, x, slope


@triton.jit
def first_max_update(best, best_col, cols, x, block_max):
    """The running ``(value, column)`` of the row's first maximum after one more block ``x``
    (``block_max = tl.max(x)``, which skips NaN lanes), as ``torch.argmax``: a NaN counts as above
    everything and the first NaN wins; ties go to the lowest column.

    One integer min per block finds both candidates: a NaN lane's key is its column plus
    ``NAN_KEY`` (negative, so below every max lane's), a lane equal to the max keeps its column,
    others get ``NO_COLUMN``. Masked lanes hold -inf and are never taken: a NaN-free block enters
    only if its max is above the best so far (-inf at the start: an all -inf row reports 0), and
    nothing enters once the best is NaN."""
    key = tl.where(x != x, cols + NAN_KEY, tl.where(x == block_max, cols, NO_COLUMN))
    block_key = tl.min(key, 0)
    block_nan = block_key < 0
    take = (best == best) & (block_nan | (block_max > best))
    block_best = tl.where(block_nan, float("nan"), block_max)
    block_col = tl.where(block_nan, block_key - NAN_KEY, block_key)
    return tl.where(take, block_best, best), tl.where(take, block_col, best_col)


@triton.jit
def online_row_stats(
    row_ptr,
    stride_class,
    num_classes,
    reference,
    weight_ptr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGN: tl.constexpr,
    ACC: tl.constexpr,
):
    """One read of a row: ``(max, sum of exp(x - max), sum of w * (x - reference))``, -inf safe.

    The running (max, sum-exp) pair is a scalar per block, so each element costs one ex2. While
    every logit seen is -inf the shift is 0 instead of -inf, whose difference would be NaN; the
    returned sum-exp is then relative to 0. The weighted sum is taken relative to the reference so
    that logits far from 0 do not cancel (``x - r`` is exact for logits within a factor 2 of ``r``).
    """
    running_max = tl.full([], float("-inf"), ACC)
    running_sum_exp = tl.zeros([], ACC)
    weighted_logit_sum = tl.zeros([], ACC)
    for start in range(0, num_classes, BLOCK):
        cols, in_row, x = load_block(
            row_ptr, start, stride_class, num_classes, float("-inf"), BLOCK, ALIGN
        )
        x = x.to(ACC)
        running_max, running_sum_exp = _online_update(running_max, running_sum_exp, x, tl.max(x, 0))
        weighted_logit_sum += _weighted_block_sum(
            cols, in_row, x, reference, weight_ptr, HAS_WEIGHT, ACC
        )
    return running_max, running_sum_exp, weighted_logit_sum


@triton.jit
def _online_update(running_max, running_sum_exp, x, block_max):
    """The running ``(max, sum of exp(x - max))`` after one more block ``x`` whose max is
    ``block_max`` (``tl.max(x)``, shared with the argmax search)."""
    new_max = tl.maximum(running_max, block_max)
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    running_sum_exp = running_sum_exp * tl.exp2((running_max - shift) * LOG2E) + tl.sum(
        tl.exp2((x - shift) * LOG2E), 0
    )
    return new_max, running_sum_exp


@triton.jit
def _weighted_block_sum(cols, in_row, x, reference, weight_ptr, HAS_WEIGHT: tl.constexpr,
                        ACC: tl.constexpr):  # fmt: skip
    """``sum w_c (x_c - reference)`` over one block (``x`` in the accumulation dtype)."""
    # Masked lanes hold -inf; zero them before any product so that 0 * inf never appears.
    relative = tl.where(in_row, x - reference, 0.0)
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(ACC)
        return tl.sum(w * relative, 0)
    return tl.sum(relative, 0)


@triton.jit
def online_max_sum_exp(row_ptr, stride_class, num_classes, cap, BLOCK: tl.constexpr,
                       ALIGN: tl.constexpr, ACC: tl.constexpr, SOFTCAP: tl.constexpr):  # fmt: skip
    """:func:`online_row_stats` without the weighted sum: ``(max, sum of exp(x - max))`` of the
    (capped) logits."""
    running_max = tl.full([], float("-inf"), ACC)
    running_sum_exp = tl.zeros([], ACC)
    for start in range(0, num_classes, BLOCK):
        _, _, x, _ = load_capped_block(
            row_ptr, start, stride_class, num_classes, float("-inf"), cap, BLOCK, ALIGN, ACC,
            SOFTCAP,
        )  # fmt: skip
        running_max, running_sum_exp = _online_update(running_max, running_sum_exp, x, tl.max(x, 0))
    return running_max, running_sum_exp


@triton.jit
def online_row_stats_at_max(
    row_ptr,
    stride_class,
    num_classes,
    weight_ptr,
    cap,
    HAS_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGN: tl.constexpr,
    ACC: tl.constexpr,
    SOFTCAP: tl.constexpr,
    STATS: tl.constexpr,
):
    """:func:`online_row_stats` with the weighted sum relative to the running max:
    ``(max, sum of exp(x - max), sum of w * (x - max), sum of w, first argmax)``, the shift 0
    while the max is -inf; the logits soft-capped under ``SOFTCAP``; the argmax (int32, see
    :func:`first_max_update`) only under ``STATS``, else 0.

    For a reference chosen only once the max is known: each block is summed relative to the max so
    far and the running sum moved to a new max by ``(old - new) * (weights seen)``, a product
    rather than a cancellation, so a class masked with a large finite value costs no accuracy.
    """
    running_max = tl.full([], float("-inf"), ACC)
    running_sum_exp = tl.zeros([], ACC)
    weighted_logit_sum = tl.zeros([], ACC)
    weight_seen = tl.zeros([], ACC)
    best = tl.full([], float("-inf"), ACC)
    best_col = tl.zeros([], tl.int32)
    for start in range(0, num_classes, BLOCK):
        cols, in_row, x, _ = load_capped_block(
            row_ptr, start, stride_class, num_classes, float("-inf"), cap, BLOCK, ALIGN, ACC,
            SOFTCAP,
        )  # fmt: skip
        old_shift = tl.where(running_max == float("-inf"), 0.0, running_max)
        block_max = tl.max(x, 0)
        if STATS:
            best, best_col = first_max_update(best, best_col, cols, x, block_max)
        running_max, running_sum_exp = _online_update(running_max, running_sum_exp, x, block_max)
        shift = tl.where(running_max == float("-inf"), 0.0, running_max)
        # Both shifts are finite (or the row has a +inf logit, hence NaN): 0 weight seen moves 0.
        if HAS_WEIGHT:
            weighted_logit_sum += (old_shift - shift) * weight_seen
            weight_seen += tl.sum(tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(ACC), 0)
        else:
            weighted_logit_sum += (old_shift - shift) * start  # one weight per class before
        weighted_logit_sum += _weighted_block_sum(
            cols, in_row, x, shift, weight_ptr, HAS_WEIGHT, ACC
        )
    if not HAS_WEIGHT:
        weight_seen += num_classes
    return running_max, running_sum_exp, weighted_logit_sum, weight_seen, best_col


@triton.jit
def shifted_lse(running_max, running_sum_exp, reference):
    """``log(sum_c exp(x_c - r))`` from the online statistics (-inf for an all -inf row)."""
    shift = tl.where(running_max == float("-inf"), 0.0, running_max)
    return (shift - reference) + tl.log(running_sum_exp)


@triton.jit
def gradient_row(
    row_ptr,
    grad_row_ptr,
    stride_class,
    num_classes,
    reference,
    shifted_lse,
    softmax_scale,
    other_scale,
    target_col,
    target_scale,
    mix_col,
    mix_scale,
    cap,
    weight_ptr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGN: tl.constexpr,
    ACC: tl.constexpr,
    SOFTCAP: tl.constexpr,
    MIXED: tl.constexpr,
):
    """Write ``softmax_i * softmax_scale - other_scale * w_i - target_scale * [i == target_col]``
    (``- mix_scale * [i == mix_col]`` as well under ``MIXED``) over one row,
    ``softmax_i = exp((z_i - r) - lse_r)``, times ``dz_i / dx_i = 1 - (z_i / cap)**2`` under
    ``SOFTCAP`` (``z = cap tanh(x / cap)``: the chain rule through the cap), else ``z = x``.

    The per-row scalars already carry the upstream gradient ``g``: with the math of
    :mod:`lsr_fused.backends`, ``softmax_scale = g (S + 2 z lse)``, ``other_scale = g b`` and
    ``target_scale = g (a - b) w_y``. ``target_col`` is int32, so the compare is one 32-bit
    instruction. The exponent subtracts ``r`` and then ``lse_r``, each exact or nearly so for
    logits near ``r``; folding them into one absolute ``lse`` would round it to the logits' ulp.
    """
    # The gradient may overwrite the logits (in place, the fused head): every thread of the program
    # must have read the row's reference and target logits before any thread stores.
    tl.debug_barrier()
    for start in range(0, num_classes, BLOCK):
        cols, in_row, z, slope = load_capped_block(
            row_ptr, start, stride_class, num_classes, 0.0, cap, BLOCK, ALIGN, ACC, SOFTCAP
        )
        grad = tl.exp2(((z - reference) - shifted_lse) * LOG2E) * softmax_scale
        if HAS_WEIGHT:
            grad -= other_scale * tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(ACC)
        else:
            grad -= other_scale
        grad -= tl.where(cols == target_col, target_scale, 0.0)
        if MIXED:
            grad -= tl.where(cols == mix_col, mix_scale, 0.0)
        if SOFTCAP:
            grad *= slope
        tl.store(grad_row_ptr + cols.to(tl.int64) * stride_class,
                 grad.to(grad_row_ptr.dtype.element_ty), mask=in_row)  # fmt: skip


def triton_accumulation(dtype: torch.dtype) -> tl.dtype:
    """:func:`lsr_fused._params.accumulation_dtype` as the kernels' ``ACC`` constexpr."""
    return {torch.float64: tl.float64, torch.float32: tl.float32}[accumulation_dtype(dtype)]


def row_alignment(logits: Tensor, *others: Tensor) -> int:
    """The ``ALIGN`` constexpr: ``16 // element_size`` when the class stride is 1, ``C`` is a
    multiple of it and every row of ``logits`` and ``others`` (same shape) starts on a multiple of
    it, so each 16-byte group of a row is one aligned access; 1 otherwise."""
    vector = 16 // logits.element_size()
    batch, inner, num_classes = logits.shape
    if num_classes % vector or (logits.stride(2) != 1 and num_classes > 1):
        return 1
    for tensor in (logits, *others):
        if (batch > 1 and tensor.stride(0) % vector) or (inner > 1 and tensor.stride(1) % vector):
            return 1
    return vector


def launch_config(logits: Tensor, max_block: int) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` for a ``(B, S, C)`` view.

    Short rows take one block so that the loop runs once; long rows use ``max_block`` wide blocks,
    enough bytes in flight per program for Hopper's memory system. A strided class dimension and
    float64 get at most ``NARROW_BLOCK_LIMIT``: 64-bit per-element addresses (strided) or values
    (float64) would otherwise cost registers, hence occupancy, for accesses that do not coalesce
    (strided) or a dtype that is not a performance target (float64).
    """
    strided = logits.stride(-1) != 1 and logits.shape[-1] > 1
    if strided or logits.dtype == torch.float64:
        max_block = min(max_block, NARROW_BLOCK_LIMIT)
    block = min(triton.next_power_of_2(max(logits.shape[-1], 16)), max_block)
    # At least 8 elements per thread up to 8 warps: a 16-byte access for half precision.
    return block, max(1, min(8, block // 256))


def stats_block_limit(logits: Tensor, weighted: bool, softcap: bool = False,
                      stats: bool = False) -> int:  # fmt: skip
    """Widest block of the one-pass statistics loops: 16 KB of logits per iteration, halved for
    each of class weights (their float32 values take the registers and bytes in flight instead),
    the soft cap (its temporaries per element) and the argmax search (its int32 keys), so that
    the registers per thread stay within the occupancy floor."""
    return (16384 >> (int(weighted) + int(softcap) + int(stats))) // logits.element_size()


def gradient_block_limit(softcap: bool) -> int:
    """Widest block of a gradient pass: ``GRADIENT_BLOCK_LIMIT``, halved under the soft cap (its
    temporaries per element would otherwise push the registers past the occupancy floor)."""
    return GRADIENT_BLOCK_LIMIT >> int(softcap)


def check_gradient_layout(logits: Tensor, grad_logits: Tensor) -> None:
    """The kernels index the gradient with its own row strides and the logits' class stride."""
    if grad_logits.shape != logits.shape:
        raise ValueError(
            f"grad_logits must have the logits' shape {tuple(logits.shape)}, got "
            f"{tuple(grad_logits.shape)}"
        )
    if logits.shape[-1] > 1 and grad_logits.stride(-1) != logits.stride(-1):
        raise ValueError("grad_logits must have the logits' class stride")


# Multiply-adds fused (FFMA), stated explicitly: Triton 3.9 warns that its default will change.
FP_FUSION = True

# A gradient pass reads and writes one block per iteration: 16 elements per thread at 8 warps.
GRADIENT_BLOCK_LIMIT = 4096

# Widest block for a class stride other than 1, and for float64.
NARROW_BLOCK_LIMIT = 1024


def check_row_vector(
    name: str, tensor: Tensor, rows: int, dtype: torch.dtype, *, contiguous: bool
) -> None:
    """A per-row argument must be ``(rows,)`` of ``dtype`` (contiguous where asked)."""
    if tuple(tensor.shape) != (rows,) or tensor.dtype != dtype:
        raise ValueError(
            f"{name} must be a ({rows},) {dtype} tensor, got {tuple(tensor.shape)} {tensor.dtype}"
        )
    if contiguous and rows > 1 and tensor.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous")


def softcap_value(softcap: float) -> float:
    """``softcap`` checked: ``c > 0`` caps the logits, ``0.0`` is off; a negative, infinite or NaN
    value raises (NaN would otherwise read as off)."""
    if not (softcap == 0.0 or 0.0 < softcap < float("inf")):
        raise ValueError(f"softcap must be 0 (off) or a finite positive number, got {softcap}")
    return float(softcap)
