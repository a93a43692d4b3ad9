r""":class:`GradualWarmupScheduler`: the widely copied seed class's signature, without its bugs.

The seed computes ``lr = base * ((multiplier - 1) * t / total_epoch + 1)`` for
:math:`t \le` ``total_epoch``, then runs the after-scheduler as if its base lrs were
``base * multiplier``. Here that is a :class:`~.warmup.WarmupScheduler` with base lrs
``base * multiplier``, ``shape="linear"``, explicit ``start_factor = 1 / multiplier`` (``0`` for
``multiplier == 1``, which ramps from 0), ``warmup_steps = total_epoch`` and
``compose="sequential"``; the after-scheduler's ``base_lrs`` and step-0 lrs are scaled by
``multiplier`` once, at construction. This fixes the seed's dip after the hand-off, its wrong
first value with a ``StepLR(step_size=1)`` follower, its ReduceLROnPlateau path, its
``state_dict`` that pickles live objects, its deprecation warnings and its ``ZeroDivisionError`` at
``total_epoch=0``.
"""

from __future__ import annotations

import math

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from .checks import check_warmup_steps, is_real
from .warmup import WarmupScheduler


class GradualWarmupScheduler(WarmupScheduler):
    r"""Gradual warmup with the seed class's signature, without its bugs.

    ``lr(t) = base * ((multiplier - 1) * t / total_epoch + 1)`` for ``0 <= t <= total_epoch``
    (``base * t / total_epoch`` when ``multiplier == 1``); from ``t = total_epoch`` on, the
    after-scheduler runs as if its base lrs were ``base * multiplier``: its step-0 lr at
    ``t = total_epoch``, its k-th step at ``t = total_epoch + k``. Without an after-scheduler the lr
    stays at ``base * multiplier``.

    Args:
        optimizer: the wrapped optimizer.
        multiplier: target lr = base lr * multiplier; >= 1.
        total_epoch: warmup length in calls to :meth:`step`; 0 means no warmup.
        after_scheduler: optional scheduler of the same optimizer, ``ReduceLROnPlateau`` included.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        multiplier: float,
        total_epoch: int,
        after_scheduler: LRScheduler | None = None,
    ) -> None:
        if not is_real(multiplier) or not math.isfinite(multiplier) or multiplier < 1.0:
            raise ValueError(f"multiplier must be a finite number >= 1, got {multiplier!r}")
        total_epoch = check_warmup_steps("total_epoch", total_epoch)
        self.multiplier = float(multiplier)
        self.total_epoch = total_epoch
        super().__init__(
            optimizer,
            total_epoch,
            start_factor=1.0 / self.multiplier if self.multiplier > 1.0 else 0.0,
            shape="linear",
            after=after_scheduler,
            compose="sequential",
        )
        self.after_scheduler = after_scheduler
        # Closed-form after-schedulers (LambdaLR, CosineAnnealingWarmRestarts, ...) compute from
        # base_lrs, so they must see the multiplied ones to continue from base * multiplier.
        after_bases = getattr(after_scheduler, "base_lrs", None)
        if isinstance(after_bases, list):
            after_scheduler.base_lrs = [b * self.multiplier for b in after_bases]  # type: ignore[union-attr]

    def _base_lr(self, initial_lr: float | Tensor) -> float | Tensor:
        return initial_lr * self.multiplier

    def _scale_after_start(self, lrs: Tensor) -> Tensor:
        return lrs * self.multiplier

    @property
    def finished(self) -> bool:
        """Whether the warmup is over (the seed's attribute)."""
        return not self.in_warmup
