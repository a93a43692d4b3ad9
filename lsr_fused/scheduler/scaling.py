"""The learning-rate scaling rules for a batch size other than the recipe's."""

from __future__ import annotations

import math
from typing import Literal

from .checks import is_int, is_real


def linear_scaled_lr(
    base_lr: float,
    batch_size: int,
    base_batch_size: int = 256,
    rule: Literal["linear", "sqrt"] = "linear",
) -> float:
    r"""Scale a learning rate with the batch size.

    ``"linear"`` (Goyal et al. 2017): :math:`\eta = \eta_0 \cdot b / b_0`, e.g. the ResNet recipe
    0.1 per 256 images gives ``linear_scaled_lr(0.1, 1024) == 0.4``.
    ``"sqrt"``: :math:`\eta = \eta_0 \sqrt{b / b_0}`.
    """
    if not is_real(base_lr) or not math.isfinite(base_lr) or base_lr < 0:
        raise ValueError(f"base_lr must be a finite number >= 0, got {base_lr!r}")
    if not is_int(batch_size) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not is_int(base_batch_size) or base_batch_size <= 0:
        raise ValueError(f"base_batch_size must be a positive int, got {base_batch_size!r}")
    ratio = int(batch_size) / int(base_batch_size)
    if rule == "linear":
        return float(base_lr) * ratio
    if rule == "sqrt":
        return float(base_lr) * math.sqrt(ratio)
    raise ValueError(f"rule must be 'linear' or 'sqrt', got {rule!r}")
