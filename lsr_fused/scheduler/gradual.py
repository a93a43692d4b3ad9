r""":class:`GradualWarmupScheduler`: the widely copied seed class's signature, without its bugs.

The seed computes ``lr = base * ((multiplier - 1) * t / total_epoch + 1)`` for
:math:`t \le` ``total_epoch``, then runs the after-scheduler as if its base lrs were
``base * multiplier``. Here that is a :class:`~.warmup.WarmupScheduler` with base lrs
``base * multiplier``, ``shape="linear"``, explicit ``start_factor = 1 / multiplier`` (``0`` for
``multiplier == 1``, which ramps from 0), ``warmup_steps = total_epoch`` and
``compose="sequential"``. This fixes the seed's dip after the hand-off, its wrong first value with
a ``StepLR(step_size=1)`` follower, its ReduceLROnPlateau path, its ``state_dict`` that pickles live
objects, its deprecation warnings and its ``ZeroDivisionError`` at ``total_epoch=0``.

**The after-scheduler at base * multiplier.** It must give, step for step and for every group,
the lrs of the same scheduler built on an optimizer whose lrs are ``base * multiplier``. torch's
schedulers derive everything they know of the optimizer's lrs from ``base_lrs`` and their last
lrs (``_last_lr``, also their step-0 lrs), so those are scaled, once, at construction, in the
after-scheduler and in every scheduler it holds (``SequentialLR``, ``ChainedScheduler`` and any
scheduler that keeps its children in ``_schedulers``, recursively). Absolute-lr arguments are not
scaled (``eta_min``, ``ReduceLROnPlateau``'s ``min_lr``: the reference has them as given), and
``OneCycleLR`` and ``CyclicLR``, which take their lrs as arguments and ignore the optimizer's, are
left alone. The unscaled values are remembered per scheduler object, so building a second
``GradualWarmupScheduler`` over the same after-scheduler (a notebook cell run twice, a rebuild on
resume) scales from them again instead of compounding. Load a saved after-scheduler state through
this scheduler's ``load_state_dict`` (it holds the scaled values), not into the after-scheduler
before building this one.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, SupportsFloat

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CyclicLR, LRScheduler, OneCycleLR, ReduceLROnPlateau

from .checks import check_warmup_steps, is_real
from .warmup import WarmupScheduler

# Schedulers whose lrs are arguments of their own, independent of the optimizer's lrs.
_ABSOLUTE = (OneCycleLR, CyclicLR)
# The attributes through which a torch scheduler sees the optimizer's lrs.
_SCALED = ("base_lrs", "_last_lr")
# Each scaled scheduler's unscaled values, so that a second build scales the same values again.
_UNSCALED: weakref.WeakKeyDictionary[Any, dict[str, list[Any]]] = weakref.WeakKeyDictionary()


def scale_follower(scheduler: Any, multiplier: float) -> None:
    """Make ``scheduler`` and those it holds run as if built on lrs ``base * multiplier``."""
    for child in getattr(scheduler, "_schedulers", ()):
        scale_follower(child, multiplier)
    if isinstance(scheduler, _ABSOLUTE):
        return
    unscaled = _UNSCALED.get(scheduler)
    if unscaled is None:
        unscaled = {
            name: list(getattr(scheduler, name))
            for name in _SCALED
            if isinstance(getattr(scheduler, name, None), list)
        }
        _UNSCALED[scheduler] = unscaled
    for name, values in unscaled.items():
        setattr(scheduler, name, [value * multiplier for value in values])


class GradualWarmupScheduler(WarmupScheduler):
    r"""Gradual warmup with the seed class's signature, without its bugs.

    ``lr(t) = base * ((multiplier - 1) * t / total_epoch + 1)`` for ``0 <= t < total_epoch``
    (``base * t / total_epoch`` when ``multiplier == 1``). From ``t = total_epoch`` on, the
    after-scheduler runs as if built on lrs ``base * multiplier`` (see the module docstring): at
    ``t = total_epoch`` the optimizer holds its step-0 lrs (``base * multiplier``, the formula's
    value, unless its step 0 is not its base, e.g. ``LinearLR(start_factor=0.5)`` gives
    ``0.5 * base * multiplier``), and its k-th step at ``t = total_epoch + k``. Without an
    after-scheduler the lr stays at ``base * multiplier`` from ``t = total_epoch``.

    The seed's calls are accepted with its meaning: ``step()``, ``step(epoch)`` and
    ``step(epoch, metrics)``, where ``epoch`` is the position :math:`t` to move to (see
    :meth:`WarmupScheduler.step`), and ``step(metrics=...)``. One seed quirk is not kept: its
    plateau path read ``step(0, metrics)`` as a move to 1; here 0 right after construction is the
    current position, where a metric has no step to go to, so that call raises ``ValueError``.

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
        after_scheduler: LRScheduler | ReduceLROnPlateau | None = None,
    ) -> None:
        if not is_real(multiplier) or not math.isfinite(multiplier) or multiplier < 1.0:
            raise ValueError(f"multiplier must be a finite number >= 1, got {multiplier!r}")
        total_epoch = check_warmup_steps("total_epoch", total_epoch)
        self.multiplier = float(multiplier)
        self.total_epoch = total_epoch
        self.after_scheduler = after_scheduler
        super().__init__(
            optimizer,
            total_epoch,
            start_factor=1.0 / self.multiplier if self.multiplier > 1.0 else 0.0,
            shape="linear",
            after=after_scheduler,
            compose="sequential",
        )

    def _base_lr(self, initial_lr: float | Tensor) -> float | Tensor:
        return initial_lr * self.multiplier

    def _prepare_after(self, after: LRScheduler | ReduceLROnPlateau) -> None:
        scale_follower(after, self.multiplier)

    def step(  # type: ignore[override]
        self, epoch: int | None = None, metrics: SupportsFloat | None = None
    ) -> None:
        """The seed's ``step(epoch=None, metrics=None)``; see :meth:`WarmupScheduler.step`."""
        super().step(epoch, metrics)

    @property
    def finished(self) -> bool:
        """Whether the warmup is over (the seed's attribute)."""
        return not self.in_warmup
