"""Backends: one module per way of running the fused row kernels.

Every backend implements the same two functions over a *row view* of the logits (typed once, as
:class:`lsr_fused.backends.contract.RowBackend`; the shard kernels as ``ShardBackend``):

``forward(logits, target, weight, weight_total, params) -> (loss, lse)``
    logits: ``(B, S, C)`` float16/bfloat16/float32/float64, any strides; row index ``b * S + s``.
    target: ``(B * S,)`` int64, contiguous.
    weight: ``(C,)`` in the accumulation dtype (float32, float64 for float64 logits) or None.
    weight_total: ``(1,)`` tensor holding ``weight.sum()`` (None without weight). It stays a
    tensor so that CUDA callers never read it on the host.
    params: :class:`lsr_fused._params.RowParams`.
    Returns the per-row loss and the per-row saved, *shifted* log-sum-exp ``lse`` (below), both
    ``(B * S,)`` in the accumulation dtype.

``backward(grad_loss, logits, target, weight, weight_total, lse, params, grad_logits) -> None``
    grad_loss: ``(B * S,)`` accumulation dtype, any stride (a broadcast stride of 0 is common).
    lse: what ``forward`` returned for these logits.
    grad_logits: ``(B, S, C)`` output written in place; it may be ``logits`` itself.

Optional extension, for the device types a backend lists in ``WRITES_GRAD_IN_FORWARD``:
``forward`` also takes ``grad_logits`` and ``grad_guess`` (a ``(1,)`` tensor) and then writes the
gradient for an upstream value of ``grad_guess`` in every row during the forward pass; ``backward``
takes ``grad_guess`` too and then rewrites only the rows whose ``grad_loss`` differs from it.
Correctness never depends on the guess; only the cost of the second pass does.

Per row, with ``x`` the logits, ``y`` the target, ``w`` the class weights (all ones without weight),
``W = sum(w)``, ``a - b = target_extra``, ``b = other_mass`` and ``z = z_loss``, every term is taken
relative to a reference ``r`` so that logits sharing a large offset cancel exactly in ``x - r``
instead of after rounding (``F.cross_entropy``'s accuracy at any offset), and a row of equal huge
logits gives ``S * log(C)``. ``r`` is the row's first logit ``x_0`` (in the accumulation dtype)
where it is finite and at most ``FIRST_LOGIT_MAX_GAP`` (64) below the row max ``m``, the common
case, which backward recomputes from that one load; otherwise (a first class masked with a large
finite value, or -inf) ``r = m`` where finite, else 0::

    lse_r = log(sum_c exp(x_c - r))          # the absolute lse is r + lse_r
    S     = b * W + (a - b) * w_y             # total weighted target mass
    loss  = S * lse_r - b * sum_c w_c (x_c - r) - (a - b) * w_y * (x_y - r) + z * (r + lse_r)**2
    softmax_i = exp((x_i - r) - lse_r)
    d loss / d x_i = softmax_i * (S + 2 z (r + lse_r)) - b * w_i - (a - b) * w_y * [i == y]

(``S = b W + (a - b) w_y``, so the ``r`` terms cancel: this equals the loss written with the
absolute lse.) The saved ``lse`` says which ``r`` was used: ``lse_r >= 0`` for ``r = x_0`` (the sum
holds ``exp(0) = 1``), ``-(1 + lse_r) <= -1`` for ``r = m`` (backward then recomputes the row max),
``-inf`` for an all -inf row (``r = 0``) and NaN for a row with a NaN or +inf logit. Backward:
a finite negative ``lse`` means ``r = m``; anything else means ``r = x_0`` where finite, else 0.

The ``b`` term is skipped when ``b == 0`` and the target term when ``a - b == 0``, so that a masked
(-inf) logit never makes ``0 * inf = NaN``. A +inf logit makes the row NaN, as in
``F.cross_entropy``. Ignored rows (``y == ignore_index``) give loss 0 and gradient 0. A target
outside ``[0, C)`` gives a NaN loss and never an out-of-bounds read (the policy layer raises before
that on the CPU).
"""

# How far below the row max the first logit may be and still serve as the reference r (above); the
# C++ kernels use the same value (csrc/cpu/kernel_impl.h, csrc/cuda/kernels.cu).
FIRST_LOGIT_MAX_GAP = 64.0
