"""The label-smoothed row loss and its gradient coefficients, in PyTorch, written once for the two
pure-torch implementations: the local torch backend (a row held whole on one device) and the
vocabulary-parallel shard math (a row whose statistics are all-reduced over a group). Each hands
in the same per-row statistics; only how it gathered them differs.

Per row, with ``a - b = target_extra``, ``b = other_mass``, ``z = z_loss``, every logit taken
relative to a reference ``r`` (so that an offset shared by the row cancels before rounding), the
picks ``k`` the target(s) with masses ``m_k`` (``w_y``; mixed: ``lam w_y1`` and
``(1 - lam) w_y2``) and ``S = b W + (a - b) sum_k m_k``::

    loss     = S lse_r - b sum_c w_c (x_c - r) - (a - b) sum_k m_k (x_k - r) + z (r + lse_r)^2
    d loss / d x_i = softmax_i A - B w_i - sum_k T_k [i == k],
             A = g (S + 2 z (r + lse_r)),  B = g b,  T_k = g (a - b) m_k

for an upstream ``g`` (0 on ignored rows, NaN where a target is outside ``[0, C)``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def smoothed_row_loss(
    total_mass: Tensor, shifted_lse: Tensor, absolute_lse: Tensor, masses: tuple[float, float],
    z_loss: float, weighted_sum: Callable[[], Tensor], target_term: Callable[[], Tensor],
    ignored: Tensor, invalid: Tensor,
) -> Tensor:  # fmt: skip
    """The per-row loss above from ``S``, ``lse_r`` and ``r + lse_r``; ``masses`` =
    ``(a - b, b)``. ``weighted_sum()`` (``sum_c w_c (x_c - r)``) and ``target_term()``
    (``(a - b) sum_k m_k (x_k - r)``) are called only where their coefficient is not 0, so that a
    masked (-inf) logit never meets a zero coefficient (``0 * inf`` would be NaN) and a vanishing
    term costs nothing. Ignored rows give 0, ``invalid`` ones NaN."""
    target_extra, other_mass = masses
    loss = total_mass * shifted_lse
    if other_mass != 0.0:
        loss = loss - other_mass * weighted_sum()
    if target_extra != 0.0:
        loss = loss - target_term()
    if z_loss != 0.0:
        loss = loss + z_loss * absolute_lse * absolute_lse
    loss = torch.where(invalid, float("nan"), loss)
    return torch.where(ignored, 0.0, loss)


def gradient_coefs(
    upstream: Tensor, total_mass: Tensor, absolute_lse: Tensor, masses: tuple[float, float],
    z_loss: float, pick_masses: tuple[Tensor, ...], ignored: Tensor, invalid: Tensor,
) -> tuple[Tensor, Tensor, list[Tensor]]:  # fmt: skip
    """``(A, B, [T_k])`` per row, as above, for per-row ``upstream`` ``g`` and the picks' masses
    ``m_k``, each of the shape of ``total_mass``."""
    target_extra, other_mass = masses
    upstream = upstream.to(absolute_lse.dtype)
    upstream = torch.where(invalid, float("nan"), upstream)
    upstream = torch.where(ignored, 0.0, upstream)
    softmax_scale = upstream * (total_mass + 2.0 * z_loss * absolute_lse)
    return (
        softmax_scale,
        upstream * other_mass,
        [upstream * (target_extra * m) for m in pick_masses],
    )
