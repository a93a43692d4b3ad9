"""Statistics for logging, computed in the loss's own pass: :class:`LossStats`.

With ``return_stats=True`` the kernels also write, per element, the absolute log-sum-exp of the
(capped) logits and their arg-max class, in the statistics pass they make anyway; everything else is
arithmetic on per-element values. No host synchronisation, no logits-sized tensor.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._params import accumulation_dtype


class LossStats(NamedTuple):
    """What ``return_stats=True`` returns beside the loss (tensors on the logits' device, not
    differentiable).

    Attributes:
        lse: ``logsumexp(x)`` per element of the logits the loss sees (after ``softcap``), the
            target's shape, float32 (float64 for float64 logits); ignored elements included.
        accuracy: scalar, the fraction of non-ignored elements whose arg-max class (ties to the
            lowest index, NaN counting as the maximum, as ``torch.argmax``) is ``target``; NaN when
            every element is ignored.
        z_loss: the z-loss term ``z_loss * lse ** 2`` over non-ignored elements, with the loss's
            reduction (its share of the loss).
    """

    lse: Tensor
    accuracy: Tensor
    z_loss: Tensor


def loss_stats(
    lse: Tensor,
    argmax: Tensor,
    flat_target: Tensor,
    options,
    target_shape,
    denominator: Optional[Tensor],
) -> LossStats:
    """Assemble :class:`LossStats` from the per-row ``lse`` and ``argmax`` of the kernels."""
    lse = lse.detach()  # an op's extra output may carry a node; statistics never do
    counted = flat_target != options.ignore_index
    correct = (argmax == flat_target) & counted
    accuracy = correct.sum(dtype=lse.dtype) / counted.sum(dtype=lse.dtype)
    z_term = torch.where(counted, float(options.z_loss) * lse * lse, 0.0)
    if options.reduction == "none":
        z_term = z_term.view(target_shape)
    elif options.reduction == "sum":
        z_term = z_term.sum()
    else:
        z_term = z_term.sum() / denominator
    return LossStats(lse.view(target_shape), accuracy, z_term)


def dense_row_stats(rows: Tensor, softcap: Optional[float]) -> tuple[Tensor, Tensor]:
    """Per-row ``(lse, argmax)`` of a ``(..., C)`` row view with ATen ops, for the paths that hold
    the logits anyway (the differentiable composite, torch.func)."""
    x = rows.detach().reshape(-1, rows.shape[-1]).to(accumulation_dtype(rows.dtype))
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    return torch.logsumexp(x, dim=-1), x.argmax(dim=-1)


__all__ = ["LossStats"]
