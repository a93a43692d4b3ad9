"""What every test compares against, and how closely.

- ``dense_loss``: an independent dense reference, an explicit smoothed target distribution times
  log_softmax, deliberately naive (it builds the one-hot tensor the package avoids) and computed in
  float64; autograd gives the reference gradient.
- ``tolerances``: the one table of (loss, gradient) tolerances, per dtype and per kind of
  comparison; ``assert_close`` applies a tolerance relative to the reference's scale.
- ``random_case`` and ``row_params``: inputs for the public API and for the backends directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lsr_fused._params import RowParams, smoothing_masses

IGNORE = -100


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


# ------------------------------------------------------------------------------------------------
# Tolerances
# ------------------------------------------------------------------------------------------------


def tolerances(dtype: torch.dtype, kind: str = "reference"):
    """(loss tolerance, gradient tolerance) for one kind of comparison of ``dtype`` inputs.

    - ``"reference"``: one process on the CPU against ``dense_loss``; each tolerance is relative
      to the reference's scale (see ``assert_close``). Half inputs: the loss is exact on the
      rounded inputs; the gradient is rounded on output.
    - ``"sharded"``: the vocabulary-parallel loss (partial sums reduced across ranks) against the
      single-process loss and ``dense_loss``; relative to scale, like ``"reference"``.
    - ``"backends"``: two backends on identical inputs; each an ``(rtol, atol)`` pair (statistics,
      gradient). Half gradients: both round the same float32 value, at most one ulp apart.
    """
    half = dtype not in (torch.float32, torch.float64)
    if kind == "reference":
        if dtype == torch.float64:
            return 1e-10, 1e-10
        return (2e-6, 1e-2) if half else (2e-6, 2e-6)
    if kind == "sharded":
        if dtype == torch.float64:
            return 1e-10, 1e-10
        return (1e-5, 2e-2) if half else (1e-5, 1e-5)
    if kind == "backends":
        if dtype == torch.float64:
            return (1e-9, 1e-9), (1e-9, 1e-12)
        if dtype == torch.float32:
            return (2e-5, 2e-5), (2e-5, 1e-6)
        return (2e-5, 2e-5), (2 * torch.finfo(dtype).eps, 1e-5)
    raise ValueError(f"unknown kind of comparison {kind!r}")


def assert_close(ours, ref, tol, what=None):
    """``ours`` within ``tol`` of ``ref`` relative to the reference's (finite) scale, floored at
    1, in float64; NaN where the reference is NaN."""
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    scale = ref.abs().nan_to_num(0.0, 0.0, 0.0).max().item() if ref.numel() else 1.0
    torch.testing.assert_close(
        ours.double(), ref.double(), atol=tol * max(scale, 1.0), rtol=tol, equal_nan=True,
        msg=None if what is None else lambda message: f"{what}: {message}",
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------


def random_case(shape, dtype, *, ignore_some=True, num_classes_dim=1, seed=None):
    """Logits of ``shape`` (classes along dim 1) scaled by 3, and targets with some ignored."""
    generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    logits = (torch.randn(shape, generator=generator, dtype=torch.float64) * 3).to(dtype)
    num_classes = shape[num_classes_dim] if len(shape) > 1 else shape[0]
    target_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    target = torch.randint(0, num_classes, target_shape, generator=generator)
    if ignore_some and target.numel() > 2:
        target.view(-1)[:: max(2, target.numel() // 3)] = IGNORE
    return logits, target


def row_params(num_classes: int, eps: float, spread: str, z_loss: float = 0.0) -> RowParams:
    """The per-row constants the backends take, for these options and ignore_index=-100."""
    extra, other = smoothing_masses(eps, num_classes, spread)
    return RowParams(extra, other, z_loss, IGNORE)
