"""The functional form of the fused loss: :func:`label_smoothing_cross_entropy`.

Its rules (checks, backend choice, row view, reduction) are in :mod:`lsr_fused.policy`, shared with
the vocabulary-parallel and fused-classifier entry points; the kernels in :mod:`lsr_fused.backends`
are reached through the custom ops of :mod:`lsr_fused.ops`.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor
from typing_extensions import Unpack

from . import composite, fast_step, ops, policy
from ._docs import extends_doc
from ._validation import check_mix_targets, check_targets
from .options import LossKeywords, LossOptions, loss_options, option_fields, shows_option_keywords
from .policy import available_backends
from .stats import LossStats, dense_row_stats, loss_stats

__all__ = ["available_backends", "label_smoothing_cross_entropy"]

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
        softcap: ``c > 0``: the loss of the capped logits ``c * tanh(x / c)`` (Gemma 2), every
            other option applied to them (z-loss included), gradients through the cap.
        mix_target: a second target of the target's shape (mixup / CutMix): the loss of the
            mixed smoothed target ``lam q(target) + (1 - lam) q(mix_target)``, i.e.
            ``lam * loss(target) + (1 - lam) * loss(mix_target)`` in one pass and without a dense
            target. An element whose ``target`` is ``ignore_index`` is ignored (its
            ``mix_target`` is not read). With ``weight``, ``"mean"`` divides by the sum of
            ``lam w[target] + (1 - lam) w[mix_target]`` over non-ignored elements.
        mix_lambda: ``lam``: a float in ``[0, 1]``, or a floating tensor of the target's shape
            (per-pair or per-element mixing; its values are not checked, and with
            ``requires_grad`` it gets a gradient).
        return_stats: return ``(loss, stats)``, ``stats`` a :class:`lsr_fused.LossStats` of
            ``lse`` (per element), ``accuracy`` and ``z_loss`` (the z-loss term, reduced as the
            loss), from the same pass, with no host synchronisation.
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

    Targets (and mixed targets) outside ``[0, C)`` that are not ``ignore_index`` raise
    ``ValueError`` on the CPU; on CUDA they give a NaN loss unless :func:`lsr_fused.set_validation`
    turns on the (syncing) check.
"""


@extends_doc(LOSS_DOC)
@shows_option_keywords()
def label_smoothing_cross_entropy(
    logits: Tensor, target: Tensor, label_smoothing: float = 0.1, *,
    weight: Optional[Tensor] = None, mix_target: Optional[Tensor] = None,
    mix_lambda: Union[float, Tensor] = 1.0, process_group: Optional[object] = None,
    **options: Unpack[LossKeywords],
) -> Union[Tensor, tuple[Tensor, LossStats]]:  # fmt: skip
    """Label-smoothed cross-entropy fused with log-softmax (a drop-in for
    ``F.cross_entropy(logits, target, label_smoothing=...)``); ``options`` are the keyword fields
    of :class:`lsr_fused.LossOptions`."""
    if process_group is not None:
        # The sharded path checks its options inside a collective exchange, so that one rank's
        # bad argument raises on every rank instead of leaving the others waiting.
        from .distributed import sharded_label_smoothing_cross_entropy

        return sharded_label_smoothing_cross_entropy(
            logits, target, label_smoothing, weight=weight, mix_target=mix_target,
            mix_lambda=mix_lambda, process_group=process_group, **options,
        )  # fmt: skip
    fields = option_fields(label_smoothing, options, "label_smoothing_cross_entropy")
    return loss_with_options(logits, target, loss_options(*fields), weight, mix_target, mix_lambda)


def loss_with_options(
    logits: Tensor, target: Tensor, options: LossOptions, weight: Optional[Tensor] = None,
    mix_target: Optional[Tensor] = None, mix_lambda: Union[float, Tensor] = 1.0,
) -> Union[Tensor, tuple[Tensor, LossStats]]:  # fmt: skip
    """:func:`label_smoothing_cross_entropy` with its options already made (the module's call)."""
    loss = fast_step.train_step(logits, target, options, weight, mix_target, mix_lambda)
    if loss is not None:
        return loss
    policy.check_tensors(logits, target, weight, options.spread)
    backend = policy.resolve_backend(options.backend, logits.device)
    rows = policy.row_view(logits)
    acc_dtype = policy.accumulation_dtype(logits.dtype)
    # Contiguous: the kernels read target[row] (a strided or expanded view would be misread).
    flat_target = policy.flat_targets(target)
    mix = policy.mix_inputs(mix_target, mix_lambda, target, acc_dtype)
    params = options.row_params(rows.shape[-1])
    composite_path = composite.wants_composite(
        logits, target, mix[1], weights=(weight, _tensor_or_none(mix_lambda))
    )
    weight, weight_total = policy.class_weights(weight, acc_dtype)
    denominator = None
    if options.reduction == "mean":
        denominator = policy.mean_denominator(
            flat_target, weight, options.ignore_index, rows.shape[-1], acc_dtype, mix
        )
    inputs = ops.RowInputs(rows, flat_target, weight, weight_total, *mix)
    if composite_path:
        loss, row_stats = _composite_loss(inputs, params, options)
    else:
        loss, row_stats = _fused_loss(inputs, params, backend, options, denominator, logits)
    if loss.dim() != 0:  # per-row losses (a training step's forward returns the reduced one)
        loss = policy.reduce(loss, target.shape, options.reduction, denominator)
    if not options.return_stats:
        return loss
    return loss, loss_stats(*row_stats, flat_target, options, target.shape, denominator)


def _tensor_or_none(value) -> Optional[Tensor]:
    return value if isinstance(value, Tensor) else None


def _fused_loss(inputs, params, backend, options, denominator, logits):
    """``(loss, (stats lse, stats arg-max))`` from the fused ops: the reduced loss of a training
    step whose forward writes the gradient, else the per-row losses."""
    inplace = options.inplace_backward and policy.may_overwrite(logits)
    training = torch.is_grad_enabled() and logits.requires_grad
    stats = options.return_stats
    if (
        training
        and not inplace
        and options.reduction != "none"
        and ops.writes_grad_in_forward(backend, logits.device.type)
    ):
        loss, *row_stats = ops.reduced_loss_with_grad(inputs, denominator, params, backend, stats)
        return loss, row_stats
    loss, _, *row_stats = ops.forward(
        inputs, params, backend, inplace_backward=inplace, stats=stats
    )
    return loss, row_stats


def _composite_loss(inputs, params, options):
    """The per-row loss through :mod:`lsr_fused.composite` (differentiable weights or ``lam``,
    torch.func), and its statistics from the logits it holds anyway."""
    rows, flat_target, weight, _, mix_target, mix_lambda = inputs
    if not torch._C._functorch.is_functorch_wrapped_tensor(flat_target):
        check_targets(flat_target, rows.shape[-1], params.ignore_index)
        if mix_target is not None:
            check_mix_targets(flat_target, mix_target, rows.shape[-1], params.ignore_index)
    extra = {} if mix_target is None else {"mix": (mix_target, mix_lambda)}
    loss = composite.row_losses(rows, flat_target, weight, params, **extra)
    row_stats = dense_row_stats(rows, options.softcap) if options.return_stats else None
    return loss, row_stats
