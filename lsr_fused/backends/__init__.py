"""Backends: one module per way of running the fused row kernels.

Every backend implements the same two functions over a *row view* of the logits:

``forward(logits, target, weight, weight_total, params) -> (loss, lse)``
    logits: ``(B, S, C)`` float16/bfloat16/float32/float64, any strides; row ``r = b * S + s``.
    target: ``(B * S,)`` int64, contiguous.
    weight: ``(C,)`` in the accumulation dtype (float32, float64 for float64 logits) or None.
    weight_total: ``(1,)`` tensor holding ``weight.sum()`` (None without weight). It stays a
    tensor so that CUDA callers never read it on the host.
    params: :class:`lsr_fused._params.RowParams`.
    Returns the per-row loss and the per-row log-sum-exp, both ``(B * S,)`` in the accumulation
    dtype.

``backward(grad_loss, logits, target, weight, weight_total, lse, params, grad_logits) -> None``
    grad_loss: ``(B * S,)`` accumulation dtype, any stride (a broadcast stride of 0 is common).
    grad_logits: ``(B, S, C)`` output written in place; it may be ``logits`` itself.

Optional extension, for the device types a backend lists in ``WRITES_GRAD_IN_FORWARD``:
``forward`` also takes ``grad_logits`` and ``grad_guess`` (a ``(1,)`` tensor) and then writes the
gradient for an upstream value of ``grad_guess`` in every row during the forward pass; ``backward``
takes ``grad_guess`` too and then rewrites only the rows whose ``grad_loss`` differs from it.
Correctness never depends on the guess; only the cost of the second pass does.

Per row, with ``x`` the logits, ``y`` the target, ``w`` the class weights (all ones without weight),
``W = sum(w)``, ``a - b = target_extra``, ``b = other_mass`` and ``z = z_loss``::

    lse  = log(sum_c exp(x_c))
    S    = b * W + (a - b) * w_y                 # total weighted target mass
    loss = S * lse - b * sum_c w_c x_c - (a - b) * w_y * x_y + z * lse**2
    d loss / d x_i = softmax_i * (S + 2 z lse) - b * w_i - (a - b) * w_y * [i == y]

Ignored rows (``y == ignore_index``) give loss 0 and gradient 0. A target outside ``[0, C)`` gives a
NaN loss and never an out-of-bounds read (the policy layer raises before that on the CPU).
"""
