"""An independent dense reference: an explicit smoothed target distribution times log_softmax.

Deliberately naive (it builds the one-hot tensor the package avoids) and computed in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def smoothed_targets(target: torch.Tensor, num_classes: int, eps: float, spread: str):
    one_hot = F.one_hot(target, num_classes).double()
    if spread == "all":
        return one_hot * (1.0 - eps) + eps / num_classes
    return one_hot * (1.0 - eps) + (1.0 - one_hot) * (eps / (num_classes - 1))


def dense_loss(
    logits,
    target,
    eps=0.1,
    *,
    ignore_index=-100,
    reduction="mean",
    weight=None,
    spread="all",
    z_loss=0.0,
):
    """The loss, in float64, from first principles (autograd gives the reference gradient)."""
    x = logits.double()
    if x.dim() == 1:
        x, flat_target = x.unsqueeze(0), target.reshape(1)
    else:
        x, flat_target = x.movedim(1, -1).reshape(-1, x.shape[1]), target.reshape(-1)
    num_classes = x.shape[-1]
    flat_target = flat_target.long()
    kept = flat_target != ignore_index
    safe_target = torch.where(kept, flat_target, 0)
    q = smoothed_targets(safe_target, num_classes, eps, spread)
    w = torch.ones(num_classes, dtype=torch.float64) if weight is None else weight.double()
    w = w.to(x.device)
    per_row = -(q * w * F.log_softmax(x, dim=-1)).sum(-1)
    if z_loss:
        per_row = per_row + z_loss * torch.logsumexp(x, dim=-1) ** 2
    per_row = torch.where(kept, per_row, torch.zeros_like(per_row))
    if reduction == "none":
        return per_row.reshape(target.shape)
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / (w[safe_target] * kept).sum()
