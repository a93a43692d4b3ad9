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


def _flat(values, target) -> torch.Tensor:
    """A per-element argument (tensor of the target's shape, or a scalar) as ``(N,)``."""
    if isinstance(values, torch.Tensor):
        return values.reshape(-1).to(target.device)
    full = (max(target.numel(), 1),)
    return torch.full(full, float(values), dtype=torch.float64, device=target.device)


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
    softcap=None,
    mix_target=None,
    mix_lambda=1.0,
):
    """The loss, in float64, from first principles (autograd gives the reference gradient).

    ``softcap``: the loss of ``softcap * tanh(x / softcap)``. ``mix_target``: the smoothed target
    ``lam q(target) + (1 - lam) q(mix_target)`` (``lam`` = ``mix_lambda``, a float or a tensor of
    the target's shape); ``mean`` then divides by ``sum(lam w[y1] + (1 - lam) w[y2])``.
    """
    x = logits.double()
    x = x.unsqueeze(0) if x.dim() == 1 else x.movedim(1, -1).reshape(-1, x.shape[1])
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    flat_target = target.reshape(-1).long()
    num_classes = x.shape[-1]
    kept = flat_target != ignore_index
    safe_target = torch.where(kept, flat_target, 0)
    w = torch.ones(num_classes, dtype=torch.float64) if weight is None else weight.double()
    w = w.to(x.device)
    q = smoothed_targets(safe_target, num_classes, eps, spread)
    target_weight = w[safe_target]
    if mix_target is not None:
        lam = _flat(mix_lambda, flat_target).double()
        safe_mix = torch.where(kept, mix_target.reshape(-1).long(), 0)
        q_mix = smoothed_targets(safe_mix, num_classes, eps, spread)
        q = lam.unsqueeze(-1) * q + (1.0 - lam).unsqueeze(-1) * q_mix
        target_weight = lam * target_weight + (1.0 - lam) * w[safe_mix]
    per_row = -(q * w * F.log_softmax(x, dim=-1)).sum(-1)
    if z_loss:
        per_row = per_row + z_loss * torch.logsumexp(x, dim=-1) ** 2
    per_row = torch.where(kept, per_row, torch.zeros_like(per_row))
    if reduction == "none":
        return per_row.reshape(target.shape)
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / (target_weight * kept).sum()


def dense_stats(logits, target, *, ignore_index=-100, reduction="mean", weight=None, z_loss=0.0,
                softcap=None, mix_target=None, mix_lambda=1.0):  # fmt: skip
    """``(lse, accuracy, z_loss_term)`` in float64 from first principles: ``lse`` of the (capped)
    logits per element (target's shape), the fraction of non-ignored elements whose
    ``torch.argmax`` class is the target, and the z-loss term with the loss's reduction."""
    x = logits.double()
    x = x.unsqueeze(0) if x.dim() == 1 else x.movedim(1, -1).reshape(-1, x.shape[1])
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    flat_target = target.reshape(-1).long()
    kept = flat_target != ignore_index
    lse = torch.logsumexp(x, dim=-1)
    correct = (x.argmax(dim=-1) == flat_target) & kept
    accuracy = correct.double().sum() / kept.double().sum()
    z_term = torch.where(kept, z_loss * lse * lse, torch.zeros_like(lse))
    if reduction == "none":
        z_term = z_term.reshape(target.shape)
    elif reduction == "sum":
        z_term = z_term.sum()
    else:
        num_classes = x.shape[-1]
        w = torch.ones(num_classes, dtype=torch.float64) if weight is None else weight.double()
        safe_target = torch.where(kept, flat_target, 0)
        target_weight = w.to(x.device)[safe_target]
        if mix_target is not None:
            lam = _flat(mix_lambda, flat_target).double()
            safe_mix = torch.where(kept, mix_target.reshape(-1).long(), 0)
            target_weight = lam * target_weight + (1.0 - lam) * w.to(x.device)[safe_mix]
        z_term = z_term.sum() / (target_weight * kept).sum()
    return lse.reshape(target.shape), accuracy, z_term


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


def row_params(
    num_classes: int, eps: float, spread: str, z_loss: float = 0.0, softcap: float = 0.0
) -> RowParams:
    """The per-row constants the backends take, for these options and ignore_index=-100."""
    extra, other = smoothing_masses(eps, num_classes, spread)
    return RowParams(extra, other, z_loss, IGNORE, softcap)
