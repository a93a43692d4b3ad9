"""The loss as a differentiable composite of ATen ops: the path for what the fused ops cannot do.

The fused ops (:mod:`lsr_fused.ops`, :mod:`lsr_fused.linear`) have hand-written, first-order
backward passes. Three requests need autograd to see the arithmetic instead:

* **double backward** (``create_graph=True``, e.g. a gradient penalty): the ops' backward recomputes
  the gradient from this composite under grad mode, so the result is differentiable again;
* **class weights that require grad**: the loss is differentiated with respect to ``weight`` too
  (including the ``mean`` denominator ``sum(w[y])``);
* **``torch.func`` transforms** (``grad``, ``vmap``, ``jacrev``), which trace through ATen ops but
  not through a custom op's autograd.

It holds ``(rows, C)`` temporaries, as eager ``F.cross_entropy`` does; the fused paths stay the
default whenever none of the three applies. The formula is the one in :mod:`lsr_fused.backends`,
with every term taken relative to the row's maximum ``m`` (a constant for autograd: the ``m``
terms cancel exactly since ``S = b W + (a - b) w_y``), so that logits sharing a large offset keep
full precision::

    loss = S (lse - m) - b sum_c w_c (x_c - m) - (a - b) w_y (x_y - m) + z lse^2

With a softcap ``c`` every ``x`` above is ``c tanh(x / c)`` (differentiated through ``tanh``); with
mixed targets the target term is split between ``y`` (share ``lam``) and ``y2`` (``1 - lam``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._params import RowParams, accumulation_dtype


def row_losses(rows: Tensor, target: Tensor, weight: Optional[Tensor], params: RowParams, *,
               mix: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:  # fmt: skip
    """Per-row loss ``(n,)`` in the accumulation dtype of ``rows`` ``(..., C)`` (``n`` rows in all)
    for ``target`` ``(n,)`` integer class indices and class weights ``weight`` ``(C,)`` or None;
    differentiable (to any order) in ``rows`` and ``weight``. Ignored rows give 0 with a zero
    gradient; a target out of range gives NaN.

    ``params.softcap`` ``c > 0`` reads every logit as ``c tanh(x / c)``. ``mix``: ``(y2, lam)``,
    ``(n,)`` second targets and their complement weights (``lam`` broadcastable to ``(n,)``, any
    stride): the target mass is split as ``lam`` on ``y`` and ``1 - lam`` on ``y2`` (see
    :mod:`lsr_fused.backends`); ``lam`` enters the arithmetic like the logits (no gradient is
    asked of it here, but one is correct if it requires grad). A ``y2`` out of range on a kept row
    gives NaN; on ignored rows ``y2`` and ``lam`` are not used."""
    num_classes = rows.shape[-1]
    x = rows.reshape(-1, num_classes).to(accumulation_dtype(rows.dtype))
    ignored = target == params.ignore_index
    invalid = ~ignored & _out_of_range(target, num_classes)
    if mix is not None:
        invalid = invalid | (~ignored & _out_of_range(mix[0], num_classes))
    skipped = ignored | invalid
    # Skipped rows get zero logits: their loss is replaced below, and whatever their logits hold
    # (-inf, NaN) must not leak into the gradient as 0 * inf.
    x = torch.where(skipped.unsqueeze(-1), 0.0, x)
    if params.softcap > 0.0:
        x = params.softcap * torch.tanh(x / params.softcap)
    row_max = x.detach().amax(dim=-1, keepdim=True)
    shift = torch.where(torch.isfinite(row_max), row_max, 0.0)
    shifted = x - shift
    shifted_lse = torch.logsumexp(shifted, dim=-1)
    picks = _target_picks(torch.where(skipped, 0, target), weight, mix, skipped, x.dtype)
    if weight is None:
        total_weight = float(num_classes)
    else:
        weight = weight.to(x.dtype)
        total_weight = weight.sum()
    target_mass = picks[0][1] if len(picks) == 1 else picks[0][1] + picks[1][1]
    total_mass = params.other_mass * total_weight + params.target_extra * target_mass
    loss = total_mass * shifted_lse
    # Each term is skipped when its mass is 0, so that a masked (-inf) logit gives 0, not 0 * inf.
    if params.other_mass != 0.0:
        weighted = shifted.sum(dim=-1) if weight is None else shifted @ weight
        loss = loss - params.other_mass * weighted
    if params.target_extra != 0.0:
        for index, mass, share in picks:
            target_logit = shifted.gather(-1, index.unsqueeze(-1)).squeeze(-1)
            if share is not None:  # a pick with no share does not read its logit
                target_logit = torch.where(share == 0.0, 0.0, target_logit)
            loss = loss - params.target_extra * mass * target_logit
    if params.z_loss != 0.0:
        lse = shifted_lse + shift.squeeze(-1)
        loss = loss + params.z_loss * lse * lse
    loss = torch.where(ignored, 0.0, loss)
    return torch.where(invalid, float("nan"), loss)


def _out_of_range(target: Tensor, num_classes: int) -> Tensor:
    return (target < 0) | (target >= num_classes)


def _target_picks(safe_target: Tensor, weight: Optional[Tensor], mix, skipped: Tensor,
                  dtype: torch.dtype) -> tuple:  # fmt: skip
    """``(index, mass, share)`` per target: ``((y, w_y, None),)`` unmixed, else
    ``((y, lam w_y, lam), (y2, (1 - lam) w_y2, 1 - lam))``, with ``lam = 1`` and ``y2 = 0`` on
    skipped rows (whatever they hold must not reach the gradient)."""
    weight = None if weight is None else weight.to(dtype)

    def weight_at(index: Tensor) -> Tensor:
        return torch.ones_like(index, dtype=dtype) if weight is None else weight.gather(0, index)

    if mix is None:
        return ((safe_target, weight_at(safe_target), None),)
    mix_target, mix_lambda = mix
    safe_mix = torch.where(skipped, 0, mix_target)
    share = torch.where(skipped, 1.0, mix_lambda.to(dtype).expand(safe_target.shape))
    rest = 1.0 - share
    return (
        (safe_target, share * weight_at(safe_target), share),
        (safe_mix, rest * weight_at(safe_mix), rest),
    )


def wants_composite(*tensors: Optional[Tensor], weights: tuple[Optional[Tensor], ...]) -> bool:
    """Whether a call must take the composite path: class weights that require grad while grad
    mode is on, any tensor seen through a ``torch.func`` transform, or forward-mode AD
    (``torch.autograd.forward_ad``: the fused ops have no tangent formula, and their outputs
    would silently carry none)."""
    if torch.is_grad_enabled() and any(w is not None and w.requires_grad for w in weights):
        return True
    if forward_ad_active():
        return True
    if torch.compiler.is_compiling():
        return False  # the compiler sees plain tensors (it handles transforms itself)
    if torch._C._functorch.peek_interpreter_stack() is None:
        return False  # no transform is active (one call, where a per-tensor test costs more)
    return any(
        t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t)
        for t in (*tensors, *weights)
    )


def forward_ad_active() -> bool:
    """Whether a ``torch.autograd.forward_ad.dual_level`` is open (dual tensors may be about)."""
    return torch.autograd.forward_ad._current_level >= 0


def input_gradients(losses_of, inputs: tuple[Tensor, ...], upstream: Tensor) -> tuple[Tensor, ...]:
    """Gradients of ``sum(upstream * losses_of(*inputs))`` with respect to ``inputs``, as a
    differentiable graph (the double-backward form of the fused ops' backward)."""
    with torch.enable_grad():
        losses = losses_of(*inputs)
        return torch.autograd.grad(losses, inputs, upstream.to(losses.dtype), create_graph=True)
