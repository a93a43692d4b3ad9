r"""Composition of the warmup with a torch scheduler (``after=``) of the same optimizer.

Let :math:`T = \max_g W_g` be the hand-off step (:attr:`WarmupScheduler.warmup_end`).

* **compose="sequential"**: for :math:`t < T` the lr is :math:`\text{base}_g f_g(t)`; at
  :math:`t = T` the optimizer gets the after-scheduler's own step-0 lrs (what it set when it was
  built, normally the base lrs: no dip, no jump); the call that makes :math:`t = T + k` steps the
  after-scheduler for the :math:`k`-th time, so its own step count (and milestones) start at the
  hand-off. Groups with a shorter warmup hold their base lr until :math:`T`. The after-scheduler is
  stepped once per call, in the same unit as the warmup: to pair a per-iteration warmup with a
  per-epoch schedule, express that schedule in iterations (e.g.
  ``StepLR(step_size=30 * iters_per_epoch)``) or give it a clock of its own (``after_clock``).
* **compose="multiply"**: the after-scheduler is stepped on every call from the start and the
  optimizer gets :math:`f_g(t)\,a_g(t)`, where :math:`a_g(t)` is the after-scheduler's own lr. The
  warmup factor is divided back out before each after-step (its unscaled lrs are written back), so
  chainable schedulers, which read ``group["lr"]``, see their own unscaled sequence.
* **Metric-driven after-schedulers** (those whose ``step`` takes ``metrics``, e.g.
  ``ReduceLROnPlateau``) are stepped only on calls that move past :math:`T`, in both modes: metrics
  seen during warmup are ignored, so no plateau reduction happens during warmup. ``metrics`` is
  passed as a keyword; a call that has to step such a scheduler without metrics, or metrics with
  nothing to receive them, raises ``TypeError``.
* **after_clock="epoch"**: the after-scheduler is not stepped by ``step()`` (which then only
  moves the warmup, e.g. per iteration) but by ``step_epoch()`` (e.g. per epoch), once per call,
  from the first call on: its own step count :math:`k` is the number of ``step_epoch()`` calls,
  counted from 0 like timm's schedulers with ``warmup_prefix=False``, whether or not the warmup is
  over. With ``compose="sequential"`` the optimizer gets :math:`\text{base}_g f_g(t)` for
  :math:`t < T` and the after-scheduler's current lrs :math:`a_g(k)` from :math:`t = T` on; with
  ``"multiply"`` it gets :math:`f_g(t)\,a_g(k)`. Both clocks are positions, so the lrs depend on
  :math:`t` and :math:`k` only, not on how the calls interleave. A metric-driven after-scheduler
  is stepped only by ``step_epoch()`` calls made once :math:`t \ge T`.
* **No ordering heuristic.** torch's ``LRScheduler.step()`` warns on a scheduler's first step
  after construction if ``optimizer.step()`` has not run yet (or was replaced). Here the call
  order is defined by the warmup (the after-scheduler may legitimately be stepped first, e.g. with
  ``compose="multiply"`` or a GradScaler that skips the first optimizer steps), so the one
  after-step that can trigger that check, the first one this scheduler makes, runs with
  ``UserWarning`` ignored. Nothing is read from the after-scheduler's private state, nor from the
  wording of torch's messages.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Literal, SupportsFloat

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

Compose = Literal["sequential", "multiply"]
AfterClock = Literal["step", "epoch"]


class Follower:
    """The after-scheduler as the warmup drives it: when it steps, how it is called, its lrs.

    The lr vectors are float64 and are replaced, never modified in place, by their users.
    """

    start_lrs: Tensor  # its step-0 lrs, handed over at t = T with compose="sequential"
    lrs: Tensor  # a, its own current (unscaled) lrs, while the optimizer holds something else

    def __init__(
        self,
        scheduler: LRScheduler | ReduceLROnPlateau,
        optimizer: Optimizer,
        compose: Compose,
        clock: AfterClock,
    ) -> None:
        # ReduceLROnPlateau only became an LRScheduler subclass in later torch releases.
        if not isinstance(scheduler, (LRScheduler, ReduceLROnPlateau)):
            raise ValueError(
                "after must be a torch.optim.lr_scheduler.LRScheduler (ReduceLROnPlateau "
                f"included), got {type(scheduler)}"
            )
        if getattr(scheduler, "optimizer", None) is not optimizer:
            raise ValueError("after must drive the same optimizer as the warmup scheduler")
        self.scheduler = scheduler
        self.multiply = compose == "multiply"
        self.by_epoch = clock == "epoch"
        metrics = inspect.signature(scheduler.step).parameters.get("metrics")
        self.takes_metrics = metrics is not None
        self.needs_metrics = metrics is not None and metrics.default is inspect.Parameter.empty
        # With the step clock: stepped from the first call on, or only past the hand-off step.
        self._from_start = self.multiply and not self.takes_metrics
        self._started = False

    def current_lrs(self) -> list[float | Tensor]:
        """What the after-scheduler last set (its step-0 lrs if it was never stepped)."""
        last = getattr(self.scheduler, "get_last_lr", None)
        return (
            list(last())
            if last is not None
            else [g["lr"] for g in self.scheduler.optimizer.param_groups]
        )

    def steps_at(self, t: int, warmup_end: int) -> bool:
        """Step clock: whether the call that reaches step ``t`` steps the after-scheduler."""
        return self._from_start or t > warmup_end

    def steps_on_epoch(self, t: int, warmup_end: int) -> bool:
        """Epoch clock: whether a ``step_epoch()`` call at warmup step ``t`` steps it."""
        return not self.takes_metrics or t >= warmup_end

    def step(self, metrics: SupportsFloat | None) -> None:
        """Step the after-scheduler once (``metrics`` by keyword)."""
        kwargs = {} if metrics is None else {"metrics": metrics}
        if self._started:
            self.scheduler.step(**kwargs)  # type: ignore[arg-type]
            return
        # The only step on which torch runs its ordering check (see "No ordering heuristic").
        self._started = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step(**kwargs)  # type: ignore[arg-type]
