r""":class:`WarmupScheduler`: warmup factors, lr storage and an after-scheduler, on one clock.

The factors are in :mod:`.factors`, the reading and writing of lrs in :mod:`.storage`, the rules of
``after=`` in :mod:`.after`. What this class adds:

* **get_last_lr()** reads the optimizer, so it always equals the lrs the next optimizer step uses
  (also after a manual change or a plateau reduction). Tensor lrs are returned as detached clones,
  as torch's schedulers do, so the result never aliases the optimizer's tensors.
* **Base lr** of a group: ``group["initial_lr"]`` if an earlier scheduler (typically the
  after-scheduler, built first) set it, else ``group["lr"]``; it is stored as ``initial_lr`` too.
* **finish_warmup()** makes the current step the hand-off step: the lrs become the warmed-up lrs
  (or the after-scheduler's step-0 lrs) at once, and the next call steps the after-scheduler. It is
  recorded by shortening ``warmup_steps`` to the current step, so it survives ``state_dict()``.
* **optimizer.step is left alone.** ``LRScheduler.__init__`` is not called: it wraps
  ``optimizer.step`` to warn when ``scheduler.step()`` comes first, a heuristic with false positives
  (a GradScaler that skips the first steps, steps replayed from a CUDA graph). Here the schedule
  is defined per call and the warning is never emitted. Correct use emits no warnings at all.
* **step(epoch)** is a position, as in the seed class and torch's deprecated ``step(epoch)``:
  ``step(n)`` moves the clock to :math:`t = n` (``step()`` is ``step(t + 1)``). ``n = t`` changes
  nothing; ``n > t + 1`` makes the missing steps one by one, exactly as the uninterrupted calls
  would (a resume by fast-forwarding; torch's ordering ``UserWarning`` is ignored over those
  steps, as no optimizer step comes between them); ``n < t`` raises (torch schedulers cannot step
  back). A
  positional number is always the epoch, never a metric: a non-int raises ``TypeError`` pointing
  to ``metrics=``. Calls that could mean two things raise: metrics at the current position (a
  metric is consumed by a step) and jumps over steps that a metric-driven after-scheduler would
  need metrics for.
* **state_dict()** holds plain data (lists of Python numbers and strings, plus the
  after-scheduler's own ``state_dict()``, deep-copied), loadable with
  ``torch.load(..., weights_only=True)``. It includes the lrs the optimizer holds, which
  ``load_state_dict()`` writes back, so a resume reproduces the uninterrupted sequence whether or
  not (and in whichever order) the optimizer's own state is loaded. ``state_dict()`` of tensor lrs
  synchronises once with the device; ``step()`` never does. ``load_state_dict()`` checks the whole
  state first (:mod:`.state`): a malformed one raises naming the key and changes nothing.
* **The after-scheduler's step-0 lrs** are read from its ``get_last_lr()``, not from the
  optimizer, so a second scheduler built over the same after-scheduler sees the same values.
* **add_param_group** after construction: a step pre-hook on the optimizer picks the new group up
  before the optimizer's next step, so it never runs a step at an unscheduled lr. It follows the
  same clock (its lr is its base lr times :math:`f(t)` for the current :math:`t`). This needs
  scalar ``warmup_steps``/``start_factor``/``start_lr``/``shape`` (an optimizer with no groups
  yet included) and no after-scheduler (torch schedulers fix
  their per-group lists when built); otherwise the hook raises a ``RuntimeError`` saying so.
* **last_step** is torch's ``last_epoch``: the index of the last step taken, -1 for a fresh start.
  Resuming with ``last_step >= 0`` needs ``initial_lr`` in every group and no after-scheduler
  (use ``load_state_dict`` for those).
* Bad arguments raise ``ValueError`` whose message starts with the argument's name.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import astuple
from typing import Any, SupportsFloat

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from .after import AfterClock, Compose, Follower
from .checks import (
    check_shape,
    check_start_factor,
    check_start_lr,
    check_warmup_steps,
    is_int,
    per_group,
)
from .factors import GroupFactors, WarmupSetting, WarmupShape
from .state import STATE_FORMAT, Expected, SavedState, parse_state
from .storage import LrStorage


class WarmupScheduler(LRScheduler):
    r"""Per-group learning-rate warmup, optionally followed by (or multiplied with) a scheduler.

    The lr of group :math:`g` at step :math:`t` is :math:`\text{base}_g\, f_g(t)` during warmup;
    see :mod:`lsr_fused.scheduler.factors` for :math:`f` of each shape and
    :mod:`lsr_fused.scheduler.after` for the hand-off rules. The lr at the hand-off step
    :math:`t = T` (:attr:`warmup_end`) is stated once, there: the base lr without an
    after-scheduler, the after-scheduler's step-0 lr with ``compose="sequential"`` (not the
    warmup formula, where the two differ, e.g. a ``LinearLR(start_factor=0.5)`` follower).

    Args:
        optimizer: the optimizer whose ``param_groups[i]["lr"]`` are driven.
        warmup_steps: warmup length :math:`W` in calls to :meth:`step`, a non-negative int or one
            per param group; 0 means no warmup.
        start_factor: :math:`s`, the factor at :math:`t = 0`, in [0, 1] (> 0 for
            ``"exponential"``), or ``None`` for the shape's default, scalar or one per group.
        start_lr: an absolute lr at :math:`t = 0` instead (timm's ``warmup_lr_init``), scalar or
            one per group (``None`` entries: ``start_factor``'s default); may exceed a group's base
            lr, which then ramps down. Exclusive with ``start_factor``.
        shape: ``"constant"``, ``"linear"``, ``"exponential"``, ``"cosine"`` or ``"1-sqrt"``,
            scalar or one per group.
        after: a torch scheduler of the same optimizer, ``ReduceLROnPlateau`` included, built
            before this one.
        compose: ``"sequential"`` (``after`` starts when warmup ends, from its step-0 lrs) or
            ``"multiply"`` (the warmup factor scales ``after``'s lrs from step 0).
        after_clock: ``"step"`` (``after`` is stepped by :meth:`step`) or ``"epoch"`` (by
            :meth:`step_epoch`, e.g. a per-iteration warmup with a per-epoch schedule).
        last_step: index of the last step already taken (torch's ``last_epoch``); -1 starts fresh.

    Example (Goyal et al.: batch 8192, 5 epochs of gradual warmup, decay at epochs 30, 60, 80)::

        n = len(loader)  # iterations per epoch; the scheduler steps per iteration
        lr = linear_scaled_lr(0.1, 8192)  # 3.2
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        # With compose="sequential" the follower counts from the hand-off, here epoch 5.
        decay = torch.optim.lr_scheduler.MultiStepLR(opt, [25 * n, 55 * n, 75 * n], 0.1)
        sched = WarmupScheduler(opt, 5 * n, after=decay)
        for batch in loader:
            ...
            opt.step()
            sched.step()
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int | Sequence[int],
        *,
        start_factor: float | Sequence[float | None] | None = None,
        start_lr: float | Sequence[float | None] | None = None,
        shape: WarmupShape | Sequence[WarmupShape] = "linear",
        after: LRScheduler | ReduceLROnPlateau | None = None,
        compose: Compose = "sequential",
        after_clock: AfterClock = "step",
        last_step: int = -1,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)}")
        self.optimizer = optimizer
        groups = optimizer.param_groups
        if compose not in ("sequential", "multiply"):
            raise ValueError(f"compose must be 'sequential' or 'multiply', got {compose!r}")
        if after_clock not in ("step", "epoch"):
            raise ValueError(f"after_clock must be 'step' or 'epoch', got {after_clock!r}")
        if not is_int(last_step) or last_step < -1:
            raise ValueError(f"last_step must be an int >= -1, got {last_step!r}")
        self.compose: Compose = compose
        self.after_clock: AfterClock = after_clock
        self.after = after
        follower = None if after is None else Follower(after, optimizer, compose, after_clock)
        if after is not None and last_step != -1:
            raise ValueError(
                "last_step >= 0 cannot fast-forward an after-scheduler; resume with "
                "state_dict()/load_state_dict() instead"
            )
        settings, self._template = _parse_settings(
            warmup_steps, start_factor, start_lr, shape, len(groups)
        )
        self._storage = LrStorage(optimizer)
        _set_initial_lrs(groups, last_step)
        self._base = self._storage.vector([self._base_lr(g["initial_lr"]) for g in groups])
        self._settings = _resolved(settings, self._base)
        self._storage.check_shared_tensors(self._settings)
        self._follower = follower
        if follower is not None:
            self._prepare_after(follower.scheduler)
            follower.start_lrs = self._storage.vector(follower.current_lrs())
            follower.lrs = follower.start_lrs

        self._num_groups = len(groups)
        self._factors = GroupFactors(self._settings, self._storage.device)
        self.last_epoch = last_step + 1
        self.after_epoch = 0  # position of step_epoch() (after_clock="epoch")
        self._step_calls = 0  # calls to step() since construction (or as loaded)
        self._apply_current()
        self._hook_handle = _pick_up_added_groups(optimizer, self)

    def __del__(self) -> None:
        handle = getattr(self, "_hook_handle", None)
        if handle is not None:
            handle.remove()

    # -- hooks for GradualWarmupScheduler ------------------------------------------------------

    def _base_lr(self, initial_lr: float | Tensor) -> float | Tensor:
        """The base lr the warmup ramps to, from a group's ``initial_lr``."""
        return initial_lr

    def _prepare_after(self, after: LRScheduler | ReduceLROnPlateau) -> None:
        """Adjust the (validated) after-scheduler before its step-0 lrs are read."""

    # -- public API ----------------------------------------------------------------------------

    @property
    def base_lrs(self) -> list[float | Tensor]:  # type: ignore[override]
        """The lrs the warmup ramps to, one per group (float, or 0-dim float64 tensors)."""
        if self._storage.tensor_lrs:
            return list(self._base.unbind(0))
        return self._base.tolist()

    @property
    def warmup_steps(self) -> list[int]:
        """Warmup length of each group (shortened by :meth:`finish_warmup`)."""
        return [s.steps for s in self._settings]

    @property
    def start_factors(self) -> list[float | None]:
        """Start factor of each group (``None``: the shape's default; ``start_lr / base``)."""
        return [s.start_factor for s in self._settings]

    @property
    def start_lrs(self) -> list[float | None]:
        """Absolute start lr of each group as given (``None``: a start factor)."""
        return [s.start_lr for s in self._settings]

    @property
    def shapes(self) -> list[str]:
        """Warmup shape of each group."""
        return [s.shape for s in self._settings]

    @property
    def warmup_end(self) -> int:
        """The hand-off step :math:`T = \\max_g W_g`: the first step with no group warming up."""
        return self._factors.end

    @property
    def in_warmup(self) -> bool:
        """Whether the current step is still before :attr:`warmup_end`."""
        return self.last_epoch < self._factors.end

    @property
    def takes_metrics(self) -> bool:
        """Whether the after-scheduler is metric-driven (its ``step`` takes ``metrics``)."""
        return self._follower is not None and self._follower.takes_metrics

    def get_last_lr(self) -> list[float | Tensor]:
        """The lrs the optimizer holds now (tensor lrs as detached clones)."""
        return self._storage.current()

    def get_lr(self) -> list[float | Tensor]:
        """Same as :meth:`get_last_lr`: the lrs scheduled for the current step, as written."""
        return self.get_last_lr()

    def step(  # type: ignore[override]
        self, epoch: int | None = None, metrics: SupportsFloat | None = None
    ) -> None:
        """Advance one step (one iteration or one epoch: the unit is the call), or to ``epoch``.

        Args:
            epoch: the position :math:`t` to move to (default: the next one); see the module
                docstring for positions other than the next.
            metrics: passed on as ``after.step(metrics=metrics)`` to a metric-driven
                after-scheduler such as ``ReduceLROnPlateau``; ignored during warmup.
        """
        if len(self.optimizer.param_groups) != self._num_groups:
            self._adopt_added_groups()
        target = _position("epoch", epoch, self.last_epoch)
        self._check_step(target, metrics)
        if target - self.last_epoch > 1:
            with _no_ordering_warning():
                while self.last_epoch < target - 1:
                    self._advance(None)
        if self.last_epoch < target:
            self._advance(metrics)

    def step_epoch(self, epoch: int | None = None, metrics: SupportsFloat | None = None) -> None:
        """With ``after_clock="epoch"``: step the after-scheduler once, or to position ``epoch``.

        ``epoch`` counts the calls (0 right after construction), with :meth:`step`'s rules for
        positions; ``metrics`` goes to a metric-driven after-scheduler once the warmup is over.
        """
        if self.after_clock != "epoch":
            raise RuntimeError(
                "step_epoch() drives the after-scheduler only with after_clock='epoch'"
            )
        target = _position("epoch", epoch, self.after_epoch)
        follower = self._follower
        steps = follower is not None and follower.steps_on_epoch(self.last_epoch, self._factors.end)
        distance = target - self.after_epoch
        _check_metrics(
            follower, metrics, distance, steps, "epoch", self.after_epoch, steps and distance > 1
        )
        with _no_ordering_warning() if distance > 1 else contextlib.nullcontext():
            while self.after_epoch < target:
                self.after_epoch += 1
                if steps:
                    self._step_after_epoch(metrics if self.after_epoch == target else None)

    def finish_warmup(self) -> None:
        """End the warmup at the current step (e.g. ResNet: once training error is below 80%).

        The optimizer gets the warmed-up lrs (the after-scheduler's step-0 lrs with
        ``compose="sequential"``, its current lrs with ``"multiply"``) right away, and the next
        :meth:`step` continues past the hand-off. A no-op once the warmup is over.
        """
        if len(self.optimizer.param_groups) != self._num_groups:
            self._adopt_added_groups()
        t = self.last_epoch
        if t >= self._factors.end:
            return
        self._settings = [_shortened(s, t) for s in self._settings]
        if self._template is not None:
            self._template = _shortened(self._template, t)
        self._factors = GroupFactors(self._settings, self._storage.device)
        self._apply_current()

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state (``torch.load(..., weights_only=True)`` loads it), after's included."""
        follower = self._follower
        template = self._template
        keeps_lrs = follower is not None and (follower.multiply or follower.by_epoch)
        return {
            "format": STATE_FORMAT,
            "last_epoch": self.last_epoch,
            "step_count": self._step_calls + 1,  # torch's convention: 1 right after construction
            "epoch": self.after_epoch,
            "compose": self.compose,
            "after_clock": self.after_clock,
            "warmup_steps": self.warmup_steps,
            "start_factor": self.start_factors,
            "start_lr": self.start_lrs,
            "shape": self.shapes,
            "template": None if template is None else _setting_to_state(template),
            "base_lrs": self._base.tolist(),
            "after_start_lrs": None if follower is None else follower.start_lrs.tolist(),
            "after_lrs": follower.lrs.tolist() if keeps_lrs else None,  # type: ignore[union-attr]
            "lrs": self._storage.read().tolist(),
            "after": None if self.after is None else copy.deepcopy(self.after.state_dict()),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` and write the saved lrs into the optimizer.

        The whole state is checked first: a malformed one raises ``ValueError`` (``TypeError``
        if it is not a dict) naming the key, and leaves this scheduler, its after-scheduler and
        the optimizer unchanged.
        """
        expected = Expected(
            num_groups=len(self.optimizer.param_groups),
            compose=self.compose,
            after_clock=self.after_clock,
            has_after=self.after is not None,
        )
        saved = parse_state(state_dict, expected)
        if self.after is not None:
            _load_after(self.after, saved.after)  # type: ignore[arg-type]
        self._assign(saved)

    # -- internals -----------------------------------------------------------------------------

    def _assign(self, saved: SavedState) -> None:
        storage = self._storage
        self._settings = saved.settings
        self._template = saved.template
        self._base = storage.vector(saved.base_lrs)
        follower = self._follower
        if follower is not None:
            follower.start_lrs = storage.vector(saved.after_start_lrs)  # type: ignore[arg-type]
            lrs = saved.after_lrs
            follower.lrs = follower.start_lrs if lrs is None else storage.vector(lrs)
        self.last_epoch = saved.last_epoch
        self.after_epoch = saved.epoch
        self._step_calls = saved.step_calls
        self._num_groups = len(saved.base_lrs)
        self._factors = GroupFactors(self._settings, storage.device)
        storage.write(storage.vector(saved.lrs))

    def _check_step(self, target: int, metrics: SupportsFloat | None) -> None:
        """Refuse a move to ``target`` before anything changes (see the module docstring)."""
        follower = self._follower
        t, end = self.last_epoch, self._factors.end
        if follower is not None and follower.by_epoch:
            if metrics is not None:
                raise TypeError(
                    "step() got metrics, but with after_clock='epoch' the after-scheduler is "
                    "stepped by step_epoch(metrics=...)"
                )
            return
        steps_last = follower is not None and follower.steps_at(target, end)
        steps_between = (
            follower is not None and target - 1 > t and follower.steps_at(target - 1, end)
        )
        _check_metrics(follower, metrics, target - t, steps_last, "epoch", t, steps_between)

    def _advance(self, metrics: SupportsFloat | None) -> None:
        """One step of the warmup clock, :math:`t \\to t + 1` (arguments already checked)."""
        t = self.last_epoch + 1
        end = self._factors.end
        follower = self._follower
        self.last_epoch = t
        self._step_calls += 1
        if follower is not None and follower.by_epoch:
            if t < end:
                self._write_warm(t, follower.lrs if follower.multiply else self._base)
            elif t == end:
                self._storage.write(follower.lrs)
            return
        steps_after = follower is not None and follower.steps_at(t, end)
        if follower is None or not follower.multiply:
            if t < end:
                self._write_warm(t, self._base)
            elif t == end:
                self._storage.write(self._base if follower is None else follower.start_lrs)
            elif steps_after:
                follower.step(metrics)  # type: ignore[union-attr]
            return
        # compose="multiply": the optimizer holds f(t-1) * a(t-1) while t - 1 < end.
        scaled = t - 1 < end
        if steps_after:
            if scaled:  # let the after-scheduler see (and step from) its own a(t-1)
                self._storage.write(follower.lrs)
                scaled = False
            follower.step(metrics)
            if t < end:
                follower.lrs = self._storage.read()
        if t < end:
            self._write_warm(t, follower.lrs)
        elif scaled:
            self._storage.write(follower.lrs)

    def _step_after_epoch(self, metrics: SupportsFloat | None) -> None:
        """after_clock="epoch": step the after-scheduler from its own lrs, then rewrite warmup."""
        follower = self._follower
        t = self.last_epoch
        warming = t < self._factors.end
        if warming:  # the optimizer holds warmup lrs: let the after-scheduler see its own
            self._storage.write(follower.lrs)  # type: ignore[union-attr]
        follower.step(metrics)  # type: ignore[union-attr]
        follower.lrs = self._storage.read()  # type: ignore[union-attr]
        if warming:
            self._write_warm(t, follower.lrs if follower.multiply else self._base)  # type: ignore[union-attr]

    def _write_warm(self, t: int, lrs: Tensor) -> None:
        """Write ``lrs * f(t)`` into every group (``lrs``: the base lrs, or a(t) if multiplying)."""
        shared = self._factors.shared
        if shared is not None:
            self._storage.write_scaled(lrs, shared(t))
        else:
            self._storage.write(self._factors(t).mul_(lrs))

    def _apply_current(self) -> None:
        """Write the lrs of the current step after construction or a change of the warmup end."""
        t, end, follower = self.last_epoch, self._factors.end, self._follower
        if follower is not None and (follower.multiply or follower.by_epoch):
            if t < end:
                self._write_warm(t, follower.lrs if follower.multiply else self._base)
            else:
                self._storage.write(follower.lrs)
        elif t < end:
            self._write_warm(t, self._base)
        elif follower is not None:
            if t == end:
                self._storage.write(follower.start_lrs)
        else:
            self._storage.write(self._base)

    def _adopt_added_groups(self) -> None:
        """Adopt groups added by ``optimizer.add_param_group`` since the last call."""
        groups = self.optimizer.param_groups
        if len(groups) < self._num_groups:
            raise RuntimeError(
                f"the optimizer has {len(groups)} param groups, fewer than the {self._num_groups} "
                "this WarmupScheduler was built for"
            )
        if self.after is not None:
            raise RuntimeError(
                "a param group was added after the WarmupScheduler was built with an "
                "after-scheduler; torch schedulers fix their per-group state when built, so build "
                "both schedulers again after add_param_group"
            )
        if self._template is None:
            raise RuntimeError(
                "a param group was added, but warmup_steps/start_factor/start_lr/shape were given "
                "per group, so its settings are unknown; build the WarmupScheduler again"
            )
        storage = self._storage
        added = groups[self._num_groups :]
        for group in added:
            lr = group["lr"]
            storage.check_added(lr)
            group.setdefault("initial_lr", lr.clone() if isinstance(lr, Tensor) else lr)
        added_base = storage.vector([self._base_lr(g["initial_lr"]) for g in added])
        added_settings = _resolved([self._template] * len(added), added_base, self._num_groups)
        self._base = torch.cat([self._base, added_base])
        self._settings = self._settings + added_settings
        self._num_groups = len(groups)
        storage.check_shared_tensors(self._settings)
        self._factors = GroupFactors(self._settings, storage.device)
        if self.last_epoch < self._factors.end:
            self._write_warm(self.last_epoch, self._base)


def _parse_settings(
    warmup_steps: Any, start_factor: Any, start_lr: Any, shape: Any, num_groups: int
) -> tuple[list[WarmupSetting], WarmupSetting | None]:
    """Per-group settings, and the setting for groups added later (None if given per group).

    A ``start_lr`` is not resolved to a start factor yet: that needs each group's base lr.
    """
    if start_factor is not None and start_lr is not None:
        raise ValueError("start_factor and start_lr are exclusive: give one of the two")
    step_list, steps_scalar = per_group("warmup_steps", warmup_steps, num_groups)
    shape_list, shape_scalar = per_group("shape", shape, num_groups)
    factor_list, factor_scalar = per_group("start_factor", start_factor, num_groups)
    lr_list, lr_scalar = per_group("start_lr", start_lr, num_groups)
    settings = [
        _setting(*values)
        for values in zip(step_list, factor_list, shape_list, lr_list, strict=True)
    ]
    if not (steps_scalar and shape_scalar and factor_scalar and lr_scalar):
        return settings, None
    # Checked here too, so that an optimizer with no groups yet gets a template all the same.
    return settings, _setting(warmup_steps, start_factor, shape, start_lr)


def _setting(steps: Any, start_factor: Any, shape: Any, start_lr: Any) -> WarmupSetting:
    shape = check_shape(shape)
    return WarmupSetting(
        check_warmup_steps("warmup_steps", steps),
        check_start_factor(start_factor, shape),
        shape,
        check_start_lr(start_lr, shape),
    )


def _resolved(settings: list[WarmupSetting], base: Tensor, first: int = 0) -> list[WarmupSetting]:
    """Each group's setting with its absolute start (if any) turned into a start factor.

    ``first`` is the index of the first of these groups in the optimizer (for messages).
    """
    if all(s.start_lr is None for s in settings):
        return settings
    bases = base.tolist()  # one sync, when built or a group is added, for tensor lrs on a device
    return [s.resolved(b, first + i) for i, (s, b) in enumerate(zip(settings, bases, strict=True))]


def _set_initial_lrs(groups: Sequence[dict[str, Any]], last_step: int) -> None:
    """Record each group's base lr as ``initial_lr`` (torch's key), or check it is there."""
    for i, group in enumerate(groups):
        if last_step == -1:
            lr = group["lr"]
            group.setdefault("initial_lr", lr.clone() if isinstance(lr, Tensor) else lr)
        elif "initial_lr" not in group:
            raise ValueError(
                f"last_step={last_step} needs param_groups[{i}]['initial_lr'], which a "
                "scheduler built with last_step=-1 sets (it is saved by optimizer.state_dict())"
            )


def _position(name: str, value: object, current: int) -> int:
    """The position a call moves to: ``current + 1`` by default, else ``value`` (>= current)."""
    if value is None:
        return current + 1
    if not is_int(value):
        raise TypeError(
            f"{name} must be an int, the position to move to, got {value!r}; a metric for the "
            "after-scheduler is passed as metrics=..."
        )
    if int(value) < current:  # type: ignore[call-overload]
        raise ValueError(
            f"{name}={value} is behind the current position {current}: torch schedulers cannot "
            "step back; restore a state_dict() instead"
        )
    return int(value)  # type: ignore[call-overload]


def _check_metrics(
    follower: Follower | None,
    metrics: SupportsFloat | None,
    distance: int,
    steps_last: bool,
    name: str,
    current: int,
    steps_between: bool = False,
) -> None:
    """Refuse metrics nobody receives, missing metrics, and moves whose meaning is unclear."""
    if metrics is not None and (follower is None or not follower.takes_metrics):
        raise TypeError("got metrics, but there is no after-scheduler whose step() takes metrics")
    if metrics is not None and distance == 0:
        raise ValueError(
            f"{name}={current} is the current position, but metrics are consumed by a step: pass "
            f"the next position ({name}={current + 1}) or leave {name} out"
        )
    if steps_between and follower.takes_metrics:  # type: ignore[union-attr]
        raise ValueError(
            f"{name}: a jump of {distance} positions would step the metric-driven "
            f"after-scheduler {type(follower.scheduler).__name__} without metrics; move one "  # type: ignore[union-attr]
            "position per call"
        )
    if steps_last and metrics is None and follower.needs_metrics:  # type: ignore[union-attr]
        raise TypeError(
            f"the after-scheduler {type(follower.scheduler).__name__} needs metrics=... once "  # type: ignore[union-attr]
            "the warmup is over"
        )


@contextlib.contextmanager
def _no_ordering_warning() -> Iterator[None]:
    """Ignore ``UserWarning`` over the steps of a jump.

    torch's schedulers warn when stepped with no optimizer step in between (the ordering heuristic
    of :mod:`.after`), and a fast-forward is made of exactly such steps.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _load_after(after: LRScheduler | ReduceLROnPlateau, saved: dict[str, Any]) -> None:
    """Load the after-scheduler's state; if torch's loader raises, put its old state back."""
    previous = copy.deepcopy(after.state_dict())
    try:
        after.load_state_dict(copy.deepcopy(saved))
    except Exception:
        after.load_state_dict(previous)
        raise


def _pick_up_added_groups(optimizer: Optimizer, scheduler: WarmupScheduler) -> Any:
    """Register the optimizer step pre-hook that adopts added groups before they take a step.

    It holds the scheduler by weak reference, so the optimizer does not keep a dropped scheduler
    alive (and the scheduler removes the hook when it goes).
    """
    scheduler_ref = weakref.ref(scheduler)

    def adopt(opt: Optimizer, args: Any, kwargs: Any) -> None:
        live = scheduler_ref()
        if live is not None and len(opt.param_groups) != live._num_groups:
            live._adopt_added_groups()

    return optimizer.register_step_pre_hook(adopt)


def _shortened(setting: WarmupSetting, steps: int) -> WarmupSetting:
    return WarmupSetting(
        min(setting.steps, steps), setting.start_factor, setting.shape, setting.start_lr
    )


def _setting_to_state(setting: WarmupSetting) -> dict[str, Any]:
    steps, start_factor, shape, start_lr = astuple(setting)
    return {
        "warmup_steps": steps,
        "start_factor": start_factor,
        "shape": shape,
        "start_lr": start_lr,
    }
