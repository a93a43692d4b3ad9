"""``linear_cross_entropy``: a drop-in for ``torch.nn.functional.linear_cross_entropy`` (torch
2.13) on the fused classifier + loss of :mod:`lsr_fused.linear`.

Torch's function computes ``cross_entropy(linear(input, linear_weight, linear_bias), target,
...)``; its chunked path (``options=LinearCrossEntropyOptions(...)``) avoids the ``(N, C)``
logits only with ``label_smoothing == 0`` and falls back to the full logits otherwise. This one
takes the same arguments and keeps every smoothing value on the fused path.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch.nn.functional as F
from torch import Tensor

from .linear import linear_label_smoothing_cross_entropy

__all__ = ["linear_cross_entropy"]


def _chunk_size(options: Any) -> Optional[int]:
    """Rows per chunk asked for by a ``LinearCrossEntropyOptions`` (its ``batch_chunk_size``)."""
    if options is None:
        return None
    if not hasattr(options, "batch_chunk_size"):
        raise TypeError(
            "options must be a torch.nn.LinearCrossEntropyOptions (or any object with a "
            f"batch_chunk_size attribute) or None, got {type(options).__name__}"
        )
    return options.batch_chunk_size


def _probability_targets(input, linear_weight, target, linear_bias, weight, reduction,
                         ignore_index, label_smoothing) -> Tensor:  # fmt: skip
    """Class-probability targets: not fused; torch's reference composition, with a warning."""
    if ignore_index is not None:
        raise ValueError("ignore_index cannot be specified when target holds class probabilities")
    warnings.warn(
        "lsr_fused.linear_cross_entropy: class-probability targets are not fused; computing "
        "cross_entropy(linear(input, linear_weight)) with the full logits",
        stacklevel=3,
    )
    logits = F.linear(input, linear_weight, linear_bias)
    return F.cross_entropy(
        logits, target, weight=weight, reduction=reduction, label_smoothing=label_smoothing
    )


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    options: Any = None,
) -> Tensor:
    """``F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, weight=weight,
    reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing)`` without
    the ``(N, C)`` logits, for every ``label_smoothing``: torch 2.13's
    ``F.linear_cross_entropy`` signature on :func:`linear_label_smoothing_cross_entropy`.

    Shapes: ``input`` ``(H,)`` or ``(N, H)`` (and, beyond torch, ``(..., H)`` with ``target``
    ``(...)``: per-token LM hidden states need no flattening); ``linear_weight`` ``(C, H)``;
    ``linear_bias`` and ``weight`` (class weights) ``(C,)``; ``target`` class indices (int64 or
    int32) of ``input``'s shape without ``H``. ``ignore_index=None`` means -100, as in torch.

    Differences from torch, by design: the loss is float32 for float16/bfloat16 inputs (torch
    returns the input dtype), as everywhere in this package. ``options`` is accepted for
    compatibility; only its ``batch_chunk_size`` (rows per chunk) is used, the fused path being
    taken with or without it. Class-probability targets (``target`` of the logits' shape, float)
    fall back to the full-logits composition with a warning; a K-dimensional ``linear_weight``
    raises ``ValueError`` (use torch's function).
    """
    if isinstance(linear_weight, Tensor) and linear_weight.dim() > 2:
        raise ValueError(
            f"linear_weight must be 2-D (C, H), got shape {tuple(linear_weight.shape)}: the "
            "K-dimensional loss is not fused; use torch.nn.functional.linear_cross_entropy"
        )
    if isinstance(target, Tensor) and target.is_floating_point():
        return _probability_targets(input, linear_weight, target, linear_bias, weight,
                                    reduction, ignore_index, label_smoothing)  # fmt: skip
    return linear_label_smoothing_cross_entropy(
        input,
        linear_weight,
        target,
        label_smoothing,
        bias=linear_bias,
        ignore_index=-100 if ignore_index is None else ignore_index,
        reduction=reduction,
        class_weight=weight,
        chunk_size=_chunk_size(options),
    )
