"""The functional form of the fused loss: :func:`label_smoothing_cross_entropy`.

Its rules (checks, backend choice, row view, reduction) are in :mod:`lsr_fused.policy`, shared with
the vocabulary-parallel and fused-classifier entry points; the kernels in :mod:`lsr_fused.backends`
are reached through the custom ops of :mod:`lsr_fused.ops`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import composite, ops, policy
from ._docs import extends_doc
from ._params import RowParams, smoothing_masses
from ._validation import check_targets
from .policy import available_backends, check_options

__all__ = ["LOSS_DOC", "available_backends", "check_options", "label_smoothing_cross_entropy"]

LOSS_DOC = r"""
    Per element with logits ``x`` (``C`` classes), target ``y``, class weights ``w`` (ones by
    default) and smoothing ``eps``, the smoothed target distribution is
    ``q_i = b + (a - b) [i == y]`` with

    * ``spread="all"`` (PyTorch's convention): ``a = 1 - eps + eps / C``, ``b = eps / C``
    * ``spread="others"`` (Inception-v3): ``a = 1 - eps``, ``b = eps / (C - 1)``

    and the loss is ``sum_i q_i w_i (logsumexp(x) - x_i) + z_loss * logsumexp(x) ** 2``; with
    ``spread="all"`` and ``z_loss=0`` this equals ``F.cross_entropy(..., label_smoothing=eps)``.
    Elements whose target is ``ignore_index`` contribute 0. ``reduction="mean"`` divides the sum by
    ``sum(w[y])`` over non-ignored elements (their count without weights): NaN when all are ignored.

    Shapes: logits ``(N, C)``, ``(C,)`` or ``(N, C, d1, ..., dk)``; target ``(N,)``, ``()`` or
    ``(N, d1, ..., dk)`` of int64/int32 class indices. Logits may be float16, bfloat16, float32 or
    float64 and non-contiguous. The loss is float32 (float64 for float64 logits), accumulated in
    float32; the gradient has the logits' dtype. No one-hot, log-prob or probability tensor of the
    logits' size is ever created.

    Args:
        label_smoothing: ``eps`` in ``[0, 1]``.
        ignore_index: target value whose elements are skipped.
        reduction: ``"none"`` (shape of target), ``"sum"`` or ``"mean"``.
        weight: optional ``(C,)`` floating class weights.
        spread: ``"all"`` or ``"others"`` (see above).
        z_loss: coefficient of the auxiliary ``logsumexp(x) ** 2`` term (PaLM), ``>= 0``.
        inplace_backward: write the gradient into the logits' storage during backward: no
            logits-sized allocation at all. The logits then hold the gradient; autograd raises if
            anything that saved them runs its backward afterwards. Ignored (a normal gradient is
            returned) for leaf logits, whose storage belongs to the caller.
        backend: ``"auto"`` (CUDA: Triton; CPU: the C++ extension, else ``"torch"``),
            ``"triton"``, ``"cpp"`` or ``"torch"``.
        process_group: a ``torch.distributed`` group over which the class dimension is sharded
            (vocabulary parallelism): ``logits`` hold this rank's contiguous slice of the classes,
            ``weight`` the matching slice, ``target`` global class indices. See
            :mod:`lsr_fused.distributed`.

    Targets outside ``[0, C)`` that are not ``ignore_index`` raise ``ValueError`` on the CPU; on
    CUDA they give a NaN loss unless :func:`lsr_fused.set_validation` turns on the (syncing) check.
"""


@extends_doc(LOSS_DOC)
def label_smoothing_cross_entropy(
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
    process_group: Optional[object] = None,
) -> Tensor:
    """Label-smoothed cross-entropy fused with log-softmax (a drop-in for
    ``F.cross_entropy(logits, target, label_smoothing=...)``)."""
    if process_group is not None:
        # The sharded path checks its options inside a collective exchange, so that one rank's
        # bad argument raises on every rank instead of leaving the others waiting.
        from .distributed import sharded_label_smoothing_cross_entropy

        return sharded_label_smoothing_cross_entropy(
            logits,
            target,
            label_smoothing,
            ignore_index=ignore_index,
            reduction=reduction,
            weight=weight,
            spread=spread,
            z_loss=z_loss,
            inplace_backward=inplace_backward,
            backend=backend,
            process_group=process_group,
        )
    check_options(label_smoothing, ignore_index, reduction, spread, z_loss, backend)
    policy.check_tensors(logits, target, weight, spread)
    backend = policy.resolve_backend(backend, logits.device)
    rows = policy.row_view(logits)
    num_classes = rows.shape[-1]
    # Contiguous: the kernels read target[row] (a strided or expanded view would be misread).
    flat_target = policy.flat_targets(target)
    target_extra, other_mass = smoothing_masses(float(label_smoothing), num_classes, spread)
    acc_dtype = policy.accumulation_dtype(logits.dtype)
    composite_path = composite.wants_composite(logits, target, weights=(weight,))
    weight, weight_total = policy.class_weights(weight, acc_dtype)
    scalars = (target_extra, other_mass, float(z_loss), ignore_index, backend)
    denominator = None
    if reduction == "mean":
        denominator = policy.mean_denominator(
            flat_target, weight, ignore_index, num_classes, acc_dtype
        )
    tensors = (rows, flat_target, weight, weight_total)
    if composite_path:
        return _composite_loss(tensors, scalars, target.shape, reduction, denominator)
    inplace = bool(inplace_backward) and policy.may_overwrite(logits)
    training = torch.is_grad_enabled() and logits.requires_grad
    if (
        training
        and not inplace
        and reduction != "none"
        and ops.writes_grad_in_forward(backend, logits.device.type)
    ):
        return _loss_with_grad_in_forward(tensors, scalars, denominator)
    loss, _ = ops.forward(*tensors, *scalars, inplace_backward=inplace)
    return policy.reduce(loss, target.shape, reduction, denominator)


def _composite_loss(tensors, scalars, target_shape, reduction, denominator) -> Tensor:
    """The loss through :mod:`lsr_fused.composite` (differentiable weights, torch.func)."""
    rows, flat_target, weight, _ = tensors
    if not torch._C._functorch.is_functorch_wrapped_tensor(flat_target):
        check_targets(flat_target, rows.shape[-1], scalars[3])
    loss = composite.row_losses(rows, flat_target, weight, RowParams(*scalars[:4]))
    return policy.reduce(loss, target_shape, reduction, denominator)


def _loss_with_grad_in_forward(tensors, scalars, denominator: Optional[Tensor]) -> Tensor:
    """A training step's ``"sum"`` / ``"mean"`` loss whose forward pass already writes the
    gradient: the upstream of each row is 1 / denominator (mean) or 1 (sum) when the caller runs
    ``loss.backward()``, and backward only redoes rows whose real upstream differs."""
    rows = tensors[0]
    if ops.eager_call_allowed(rows):
        return ops.reduced_loss_with_grad(*tensors, denominator, scalars)
    # Computed as autograd's DivBackward will (ones / denominator): the two are bitwise equal.
    grad_guess = torch.ones(1, dtype=policy.accumulation_dtype(rows.dtype), device=rows.device)
    if denominator is not None:
        grad_guess = grad_guess / denominator
    loss, _, _ = ops.fused_forward_with_grad(*tensors, grad_guess, *scalars)
    return policy.reduce(loss, (), "sum" if denominator is None else "mean", denominator)
