r"""timm's scheduler protocol over a :class:`~lsr_fused.scheduler.WarmupScheduler`.

timm's ``train.py`` drives its schedulers with positions, not increments: after every optimizer
step ``step_update(num_updates, metric)`` (``num_updates`` counts the optimizer steps so far), and
after every epoch ``step(epoch + 1, metric)``; on a resume without scheduler state it calls
``step_update(start_epoch * updates_per_epoch)`` or ``step(start_epoch)`` once. Both are positions
of a :class:`WarmupScheduler` (``step(epoch=n)`` moves its clock to ``n``), so a jump makes the
missing steps exactly as the uninterrupted run did.

The warmup is always counted in updates (``step_update``):

* ``t_in_epochs=False`` (timm's ``sched_on_updates``): the after-scheduler too is stepped per
  update, so the scheduler must use ``after_clock="step"``; ``step(epoch)`` changes no lr.
* ``t_in_epochs=True``: the after-scheduler is stepped per epoch by ``step(epoch)``, so the
  scheduler must use ``after_clock="epoch"`` (its epoch 0 is the first epoch, as timm's
  ``warmup_prefix=False``). train.py's resume then calls only ``step(start_epoch)``, which cannot
  tell how many updates that is: pass ``updates_per_epoch`` and ``step(epoch)`` also moves the
  warmup to update ``epoch * updates_per_epoch`` if it is behind (a no-op in an uninterrupted
  loop, where ``step_update`` got there first).

``metric`` goes to a metric-driven after-scheduler (``ReduceLROnPlateau``) from the call that
steps it (``step_update`` or ``step``, as above) and is ignored otherwise, as timm's own
non-plateau schedulers ignore it. timm itself is not imported.
"""

from __future__ import annotations

from typing import Any, SupportsFloat

from ..scheduler import WarmupScheduler


class TimmScheduler:
    """timm's ``step(epoch, metric)`` / ``step_update(num_updates, metric)`` for a WarmupScheduler.

    Args:
        scheduler: the :class:`WarmupScheduler` to drive; its warmup is counted in updates.
        t_in_epochs: whether its after-scheduler is stepped per epoch (``after_clock="epoch"``)
            rather than per update (``after_clock="step"``).
        updates_per_epoch: optional; lets ``step(epoch)`` restore the warmup's position on a
            resume that calls only ``step(start_epoch)``.

    Example (timm's cosine with warmup, ``sched_on_updates``)::

        n = len(loader)
        cosine = LambdaLR(opt, lambda k: ...)  # per update, counted from the hand-off
        sched = TimmScheduler(WarmupScheduler(opt, 5 * n, start_lr=1e-6, after=cosine))
        for epoch in range(start_epoch, epochs):
            for batch in loader:
                ...
                opt.step()
                num_updates += 1
                sched.step_update(num_updates=num_updates, metric=loss)
            sched.step(epoch + 1, val_metric)
    """

    def __init__(
        self,
        scheduler: WarmupScheduler,
        t_in_epochs: bool = False,
        *,
        updates_per_epoch: int | None = None,
    ) -> None:
        if not isinstance(scheduler, WarmupScheduler):
            raise ValueError(
                f"scheduler must be an lsr_fused.WarmupScheduler, got {type(scheduler).__name__}"
            )
        if not isinstance(t_in_epochs, bool):
            raise ValueError(f"t_in_epochs must be a bool, got {t_in_epochs!r}")
        clock = "epoch" if t_in_epochs else "step"
        if scheduler.after is not None and scheduler.after_clock != clock:
            raise ValueError(
                f"t_in_epochs={t_in_epochs} steps the after-scheduler per "
                f"{'epoch' if t_in_epochs else 'update'}: build the WarmupScheduler with "
                f"after_clock={clock!r} (it has {scheduler.after_clock!r})"
            )
        if updates_per_epoch is not None and (
            not isinstance(updates_per_epoch, int)
            or isinstance(updates_per_epoch, bool)
            or updates_per_epoch <= 0
        ):
            raise ValueError(
                f"updates_per_epoch must be None or an int > 0, got {updates_per_epoch!r}"
            )
        self.updates_per_epoch = updates_per_epoch
        self.scheduler = scheduler
        self.optimizer = scheduler.optimizer
        self.t_in_epochs = t_in_epochs
        self._by_epoch = t_in_epochs and scheduler.after is not None

    def step(self, epoch: int, metric: SupportsFloat | None = None) -> None:
        """End of an epoch: ``epoch`` is the next epoch's index (timm passes ``epoch + 1``)."""
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        if self._by_epoch:
            self.scheduler.step_epoch(epoch, self._metric(metric))
        if self.updates_per_epoch is not None:
            first_update = epoch * self.updates_per_epoch
            if first_update > self.scheduler.last_epoch:
                self.scheduler.step(first_update)

    def step_update(self, num_updates: int, metric: SupportsFloat | None = None) -> None:
        """After an optimizer step: ``num_updates`` optimizer steps have been made so far."""
        if not isinstance(num_updates, int) or isinstance(num_updates, bool):
            raise TypeError(f"num_updates must be an int, got {num_updates!r}")
        self.scheduler.step(num_updates, None if self._by_epoch else self._metric(metric))

    def state_dict(self) -> dict[str, Any]:
        """The WarmupScheduler's plain-data state, with ``t_in_epochs``."""
        return {"t_in_epochs": self.t_in_epochs, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (checked first; see WarmupScheduler.load_state_dict)."""
        if not isinstance(state_dict, dict) or "scheduler" not in state_dict:
            raise ValueError("state_dict is not a TimmScheduler state (no 'scheduler' key)")
        if state_dict.get("t_in_epochs") != self.t_in_epochs:
            raise ValueError(
                f"state_dict was saved with t_in_epochs={state_dict.get('t_in_epochs')!r}, this "
                f"TimmScheduler has t_in_epochs={self.t_in_epochs}"
            )
        self.scheduler.load_state_dict(state_dict["scheduler"])

    def _metric(self, metric: SupportsFloat | None) -> SupportsFloat | None:
        # timm passes a metric to every call; only a metric-driven after-scheduler takes one.
        return metric if self.scheduler.takes_metrics else None
