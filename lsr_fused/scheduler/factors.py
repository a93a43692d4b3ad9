r"""Closed-form warmup factors: one class per shape, and the vector of every group's factor.

A param group with warmup length :math:`W` (in calls to ``step()``), a shape and a start factor
:math:`s` runs at :math:`\text{base} \cdot f(t)`, where :math:`t` counts the calls to ``step()``
(0 right after construction, so the first optimizer step uses :math:`f(0)`). The factor is
:math:`f(t) = 1` for :math:`t \ge W`; below that it is the shape's ramp (one :class:`Ramp` subclass
each, documented there) at the progress :math:`p`:

===============  ==========================================  ===================================
shape            :math:`f(t)` for :math:`t < W`              ``start_factor=None`` means
===============  ==========================================  ===================================
``constant``     :math:`s`                                   :math:`s = 0.1` (ResNet: 0.01, 0.1)
``linear``       :math:`s + (1 - s)\,p`                      :math:`s = 0`, :math:`p = (t+1)/W`
``cosine``       :math:`s + (1 - s)\,(1 - \cos \pi p) / 2`   :math:`s = 0`, :math:`p = (t+1)/W`
``exponential``  :math:`s^{1 - p}` (geometric; s > 0)        :math:`s = 0.01`, :math:`p = (t+1)/W`
``1-sqrt``       :math:`s + (1 - s)\,(1 - \sqrt{1 - p})`     :math:`s = 0`, :math:`p = (t+1)/W`
===============  ==========================================  ===================================

With an explicit ``start_factor`` the progress is :math:`p = t / W`, so :math:`f(0) = s` exactly
and the ramp reaches 1 at :math:`t = W`, the first step after the warmup (the same convention as
``torch.optim.lr_scheduler.LinearLR(start_factor=s, total_iters=W)``). With ``start_factor=None``
the progress is :math:`p = (t + 1) / W`: for ``linear`` this is the Bag-of-Tricks ramp
:math:`\eta_t = \eta\,(t + 1) / W`, whose first step runs at :math:`\eta / W` (never at 0; ask for
``start_factor=0`` to start at 0) and whose last warmup step, :math:`t = W - 1`, already runs at
the full lr. ``W = 1`` with ``start_factor=None`` is therefore no warmup at all, and
``warmup_steps=0`` always means no warmup (the factor is 1 from the start).

An **absolute start** (``start_lr``, timm's ``warmup_lr_init``: one lr for every group) is the
explicit start factor :math:`s_g = \text{start\_lr} / \text{base}_g` of each group, so the ramp
runs from ``start_lr`` (up to 1 ulp) to exactly the base lr; :math:`s_g > 1`, a start above a
group's base, ramps that group down.

The factor is exactly 1.0 wherever :math:`p \ge 1` (selected, not computed) and exactly :math:`s`
at :math:`p = 0`, so the lr at the end of the warmup is bit-for-bit the base lr. Each step
evaluates the closed form at the integer step count; nothing is accumulated, so a million steps
give the same value as the formula.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar, Literal, TypeVar

import torch
from torch import Tensor

WarmupShape = Literal["constant", "linear", "exponential", "cosine", "1-sqrt"]

_Number = TypeVar("_Number", float, Tensor)


class Ramp:
    """A warmup shape: its factor at progress ``p`` in [0, 1) from the start factor ``s``.

    :meth:`at` evaluates one setting in Python floats, :meth:`over` a float64 vector of groups.
    Both apply the same IEEE operations in the same order, so a group's lr does not depend on
    which of the two paths (that is, on which other groups) its optimizer has. At ``p = 0`` every
    shape gives exactly ``s``. ``p >= 1`` is left to the caller, which selects 1 there instead of
    trusting, say, ``cos(fl(pi))`` to round to -1 on every device.
    """

    name: ClassVar[str]
    default_start: ClassVar[float]  # the s that start_factor=None means
    shifted: ClassVar[bool] = True  # whether start_factor=None starts the progress at 1 / W

    def rise(self, start: _Number) -> _Number:
        """The coefficient of the progress term, computed once per setting, not per step."""
        return 1.0 - start

    def at(self, start: float, rise: float, progress: float) -> float:
        raise NotImplementedError

    def over(self, start: Tensor, rise: Tensor, progress: Tensor) -> Tensor:
        """The factor of every group, as a fresh tensor; ``progress`` is used as scratch."""
        raise NotImplementedError


class Constant(Ramp):
    r"""``"constant"`` (He et al. 2016): :math:`f(t) = s` for :math:`t < W`, then 1.

    ``start_factor=None`` means :math:`s = 0.1` (the ResNet recipe: 0.01 for a base lr of 0.1).
    The progress is never shifted, so every warmup step runs at :math:`s`.
    """

    name = "constant"
    default_start = 0.1
    shifted = False

    def at(self, start: float, rise: float, progress: float) -> float:
        return start

    def over(self, start: Tensor, rise: Tensor, progress: Tensor) -> Tensor:
        return start.clone()


class Linear(Ramp):
    r"""``"linear"`` (Goyal et al. 2017): :math:`f(t) = s + (1 - s)\,p`.

    ``start_factor=None`` means :math:`s = 0` with :math:`p = (t + 1) / W`, i.e.
    :math:`f(t) = (t + 1) / W`; an explicit :math:`s` gives ``LinearLR``'s
    :math:`s + (1 - s)\,t / W`.
    """

    name = "linear"
    default_start = 0.0

    def at(self, start: float, rise: float, progress: float) -> float:
        return start + rise * progress

    def over(self, start: Tensor, rise: Tensor, progress: Tensor) -> Tensor:
        return torch.addcmul(start, rise, progress)


class Exponential(Ramp):
    r"""``"exponential"``: :math:`f(t) = s^{1 - p}`, a geometric ramp (needs :math:`s > 0`).

    ``start_factor=None`` means :math:`s = 0.01` with :math:`p = (t + 1) / W`: the lr grows by the
    same ratio :math:`s^{-1/W}` every step.
    """

    name = "exponential"
    default_start = 0.01

    def at(self, start: float, rise: float, progress: float) -> float:
        return start ** (1.0 - progress)

    def over(self, start: Tensor, rise: Tensor, progress: Tensor) -> Tensor:
        return torch.pow(start, progress.neg_().add_(1.0))


class Cosine(Ramp):
    r"""``"cosine"``: :math:`f(t) = s + (1 - s)\,(1 - \cos \pi p) / 2`, a half cosine from s to 1.

    ``start_factor=None`` means :math:`s = 0` with :math:`p = (t + 1) / W`.
    """

    name = "cosine"
    default_start = 0.0

    def rise(self, start: _Number) -> _Number:
        return (1.0 - start) * 0.5

    def at(self, start: float, rise: float, progress: float) -> float:
        return start + rise * (1.0 - math.cos(math.pi * progress))

    def over(self, start: Tensor, rise: Tensor, progress: Tensor) -> Tensor:
        return torch.addcmul(start, rise, progress.mul_(math.pi).cos_().neg_().add_(1.0))


class OneMinusSqrt(Ramp):
    r"""``"1-sqrt"``: :math:`f(t) = s + (1 - s)\,(1 - \sqrt{1 - p})`, steep first, flat last.

    The warmup of the warmup-stable-decay schedule (Hugging Face's ``get_wsd_schedule`` with
    ``warmup_type="1-sqrt"``; with ``start_factor=0`` the factors are equal bit for bit, since both
    round one square root of the same ``1 - p``). ``start_factor=None`` means :math:`s = 0` with
    :math:`p = (t + 1) / W`.
    """

    name = "1-sqrt"
    default_start = 0.0

    def at(self, start: float, rise: float, progress: float) -> float:
        return start + rise * (1.0 - math.sqrt(1.0 - progress))

    def over(self, start: Tensor, rise: Tensor, progress: Tensor) -> Tensor:
        return torch.addcmul(start, rise, progress.neg_().add_(1.0).sqrt_().neg_().add_(1.0))


RAMPS: dict[str, Ramp] = {
    ramp.name: ramp for ramp in (Constant(), Linear(), Exponential(), Cosine(), OneMinusSqrt())
}
SHAPES: tuple[str, ...] = tuple(RAMPS)


@dataclass(frozen=True)
class WarmupSetting:
    """One param group's warmup as given (``start_factor=None``: the shape's default).

    With an absolute start (``start_lr``), ``start_factor`` is the group's
    ``start_lr / base`` once :meth:`resolved` has seen its base lr (None until then).
    """

    steps: int
    start_factor: float | None
    shape: str
    start_lr: float | None = None

    def resolved(self, base: float, group: int) -> WarmupSetting:
        """This setting for a group whose base lr is ``base``: ``s = start_lr / base``."""
        if self.start_lr is None:
            return self
        if not base > 0.0:
            raise ValueError(
                f"start_lr: param group {group} has base lr {base!r}; an absolute warmup start "
                "is a ratio of the base lr here, so it needs a positive base lr"
            )
        return replace(self, start_factor=self.start_lr / base)

    def factor(self) -> WarmupFactor:
        ramp = RAMPS[self.shape]
        shifted = self.start_factor is None and ramp.shifted
        return WarmupFactor(
            shape=self.shape,
            start=ramp.default_start if self.start_factor is None else self.start_factor,
            # W = 0 with offset 1 gives p = (t + 1) / 1 >= 1 at every t: a factor of 1 throughout.
            offset=1.0 if self.steps == 0 or shifted else 0.0,
            span=float(max(self.steps, 1)),
        )


@dataclass(frozen=True)
class WarmupFactor:
    """:math:`f(t)` of one setting, resolved: the ramp at ``p = (t + offset) / span``.

    Two settings with equal factors (compared on the four resolved fields) give equal lrs, which is
    what lets every group share one Python float.
    """

    shape: str
    start: float
    offset: float
    span: float
    # Looked up once here rather than on every step: the shared factor is the hot path.
    _rise: float = field(init=False, repr=False, compare=False)
    _ramp: Ramp = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ramp = RAMPS[self.shape]
        object.__setattr__(self, "_ramp", ramp)
        object.__setattr__(self, "_rise", ramp.rise(self.start))

    def __call__(self, t: int) -> float:
        progress = (t + self.offset) / self.span
        if progress >= 1.0:
            return 1.0
        return self._ramp.at(self.start, self._rise, progress)


class GroupFactors:
    """:math:`f_g(t)` of every param group: one float64 tensor expression on the lrs' device.

    When every group resolves to the same factor (the usual case), :attr:`shared` is that factor
    and callers multiply by one Python float instead; the per-group tensors are then never built,
    and :meth:`__call__` is not to be used.
    """

    def __init__(self, settings: Sequence[WarmupSetting], device: torch.device) -> None:
        factors = [setting.factor() for setting in settings]
        self.end = max((setting.steps for setting in settings), default=0)
        distinct = set(factors)
        self.shared: WarmupFactor | None = distinct.pop() if len(distinct) == 1 else None
        if self.shared is not None:
            return

        def vector(values: list[float]) -> Tensor:
            return torch.tensor(values, dtype=torch.float64, device=device)

        self._start = vector([f.start for f in factors])
        self._offset = vector([f.offset for f in factors])
        self._span = vector([f.span for f in factors])
        shapes = [f.shape for f in factors]
        self._by_shape = [
            (
                RAMPS[shape],
                RAMPS[shape].rise(self._start),
                torch.tensor([s == shape for s in shapes], device=device),
            )
            for shape in SHAPES
            if shape in shapes
        ]

    def __call__(self, t: int) -> Tensor:
        """The factors at step ``t``, as a fresh tensor the caller may modify."""
        progress = torch.add(self._offset, t).div_(self._span)
        done = progress >= 1.0
        if len(self._by_shape) == 1:
            ramp, rise, _ = self._by_shape[0]
            factors = ramp.over(self._start, rise, progress)
        else:
            factors = torch.ones_like(progress)
            for ramp, rise, mask in self._by_shape:
                factors = torch.where(mask, ramp.over(self._start, rise, progress.clone()), factors)
        # Exactly 1 once the ramp is complete, so the lr lands on the base lr bit for bit.
        return factors.masked_fill_(done, 1.0)
