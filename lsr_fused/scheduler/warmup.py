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
  is defined per call and the warning is never emitted. Correct use emits no warnings at all; the
  deprecated ``epoch`` argument of ``step`` does not exist.
* **state_dict()** holds plain data (lists of Python numbers and strings, plus the
  after-scheduler's own ``state_dict()``, deep-copied), loadable with
  ``torch.load(..., weights_only=True)``. It includes the lrs the optimizer holds, which
  ``load_state_dict()`` writes back, so a resume reproduces the uninterrupted sequence whether or
  not (and in whichever order) the optimizer's own state is loaded. ``state_dict()`` of tensor lrs
  synchronises once with the device; ``step()`` never does.
* **add_param_group** after construction: a step pre-hook on the optimizer picks the new group up
  before the optimizer's next step, so it never runs a step at an unscheduled lr. It follows the
  same clock (its lr is its base lr times :math:`f(t)` for the current :math:`t`). This needs
  scalar ``warmup_steps``/``start_factor``/``shape`` and no after-scheduler (torch schedulers fix
  their per-group lists when built); otherwise the hook raises a ``RuntimeError`` saying so.
* **last_step** is torch's ``last_epoch``: the index of the last step taken, -1 for a fresh start.
  Resuming with ``last_step >= 0`` needs ``initial_lr`` in every group and no after-scheduler
  (use ``load_state_dict`` for those).
* Bad arguments raise ``ValueError`` whose message starts with the argument's name.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Sequence
from dataclasses import astuple
from typing import Any, SupportsFloat

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from .after import Compose, Follower
from .checks import check_shape, check_start_factor, check_warmup_steps, is_int, per_group
from .factors import GroupFactors, WarmupSetting, WarmupShape
from .storage import LrStorage

_STATE_FORMAT = 1


class WarmupScheduler(LRScheduler):
    r"""Per-group learning-rate warmup, optionally followed by (or multiplied with) a scheduler.

    The lr of group :math:`g` at step :math:`t` is :math:`\text{base}_g\, f_g(t)` during warmup;
    see :mod:`lsr_fused.scheduler.factors` for :math:`f` of each shape and
    :mod:`lsr_fused.scheduler.after` for the hand-off rules.

    Args:
        optimizer: the optimizer whose ``param_groups[i]["lr"]`` are driven.
        warmup_steps: warmup length :math:`W` in calls to :meth:`step`, a non-negative int or one
            per param group; 0 means no warmup.
        start_factor: :math:`s`, the factor at :math:`t = 0`, in [0, 1] (> 0 for
            ``"exponential"``), or ``None`` for the shape's default, scalar or one per group.
        shape: ``"constant"``, ``"linear"``, ``"exponential"`` or ``"cosine"``, scalar or one per
            group.
        after: a torch scheduler of the same optimizer, ``ReduceLROnPlateau`` included, built
            before this one.
        compose: ``"sequential"`` (``after`` starts when warmup ends, from its step-0 lrs) or
            ``"multiply"`` (the warmup factor scales ``after``'s lrs from step 0).
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
        shape: WarmupShape | Sequence[WarmupShape] = "linear",
        after: LRScheduler | ReduceLROnPlateau | None = None,
        compose: Compose = "sequential",
        last_step: int = -1,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)}")
        self.optimizer = optimizer
        groups = optimizer.param_groups
        if compose not in ("sequential", "multiply"):
            raise ValueError(f"compose must be 'sequential' or 'multiply', got {compose!r}")
        if not is_int(last_step) or last_step < -1:
            raise ValueError(f"last_step must be an int >= -1, got {last_step!r}")
        self.compose: Compose = compose
        self.after = after
        self._follower = None if after is None else Follower(after, optimizer, compose)
        if after is not None and last_step != -1:
            raise ValueError(
                "last_step >= 0 cannot fast-forward an after-scheduler; resume with "
                "state_dict()/load_state_dict() instead"
            )

        self._settings, self._template = self._parse_settings(
            warmup_steps, start_factor, shape, len(groups)
        )
        self._storage = LrStorage(optimizer)
        self._storage.check_shared_tensors(self._settings)
        for i, group in enumerate(groups):
            if last_step == -1:
                lr = group["lr"]
                group.setdefault("initial_lr", lr.clone() if isinstance(lr, Tensor) else lr)
            elif "initial_lr" not in group:
                raise ValueError(
                    f"last_step={last_step} needs param_groups[{i}]['initial_lr'], which a "
                    "scheduler built with last_step=-1 sets (it is saved by optimizer.state_dict())"
                )
        self._base = self._storage.vector([self._base_lr(g["initial_lr"]) for g in groups])
        if self._follower is not None:
            # The after-scheduler's step-0 lrs: what the optimizer holds now, as it built them.
            self._follower.start_lrs = self._scale_after_start(self._storage.read())
            self._follower.lrs = self._follower.start_lrs.clone()

        self._num_groups = len(groups)
        self._factors = GroupFactors(self._settings, self._storage.device)
        self.last_epoch = last_step + 1
        self._step_calls = 0  # calls to step() since construction (or as loaded)
        self._apply_current()
        self._hook_handle = _pick_up_added_groups(optimizer, self)

    def __del__(self) -> None:
        handle = getattr(self, "_hook_handle", None)
        if handle is not None:
            handle.remove()

    @staticmethod
    def _parse_settings(
        warmup_steps: Any, start_factor: Any, shape: Any, num_groups: int
    ) -> tuple[list[WarmupSetting], WarmupSetting | None]:
        """Per-group settings, and the setting for groups added later (None if given per group)."""
        step_list, steps_scalar = per_group("warmup_steps", warmup_steps, num_groups)
        shape_list, shape_scalar = per_group("shape", shape, num_groups)
        factor_list, factor_scalar = per_group("start_factor", start_factor, num_groups)
        steps = [check_warmup_steps("warmup_steps", w) for w in step_list]
        shapes = [check_shape(s) for s in shape_list]
        factors = [check_start_factor(s, sh) for s, sh in zip(factor_list, shapes, strict=True)]
        settings = [WarmupSetting(*s) for s in zip(steps, factors, shapes, strict=True)]
        scalar = steps_scalar and shape_scalar and factor_scalar
        return settings, settings[0] if scalar and settings else None

    # -- hooks for GradualWarmupScheduler ------------------------------------------------------

    def _base_lr(self, initial_lr: float | Tensor) -> float | Tensor:
        """The base lr the warmup ramps to, from a group's ``initial_lr``."""
        return initial_lr

    def _scale_after_start(self, lrs: Tensor) -> Tensor:
        """The after-scheduler's step-0 lrs, from the lrs it set when it was built."""
        return lrs

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
        """Start factor of each group as given (``None``: the shape's default)."""
        return [s.start_factor for s in self._settings]

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

    def get_last_lr(self) -> list[float | Tensor]:
        """The lrs the optimizer holds now (tensor lrs as detached clones)."""
        return self._storage.current()

    def get_lr(self) -> list[float | Tensor]:
        """Same as :meth:`get_last_lr`: the lrs scheduled for the current step, as written."""
        return self.get_last_lr()

    def step(self, metrics: SupportsFloat | None = None) -> None:  # type: ignore[override]
        """Advance one step (one iteration or one epoch: the unit is the call).

        Args:
            metrics: passed on as ``after.step(metrics=metrics)`` to a metric-driven
                after-scheduler such as ``ReduceLROnPlateau``; ignored during warmup.
        """
        if len(self.optimizer.param_groups) != self._num_groups:
            self._adopt_added_groups()
        t = self.last_epoch + 1
        end = self._factors.end
        follower = self._follower
        steps_after = follower is not None and follower.steps_at(t, end)
        if metrics is not None and (follower is None or not follower.takes_metrics):
            raise TypeError(
                "step() got metrics, but there is no after-scheduler whose step() takes metrics "
                "(the deprecated epoch argument of torch schedulers is not supported)"
            )
        if steps_after and metrics is None and follower.needs_metrics:  # type: ignore[union-attr]
            raise TypeError(
                f"the after-scheduler {type(self.after).__name__} needs step(metrics=...) once "
                "the warmup is over"
            )
        self.last_epoch = t
        self._step_calls += 1

        if follower is None or not follower.multiply:
            if t < end:
                self._write_warm(t, self._base)
            elif t == end:
                self._storage.write(self._base if follower is None else follower.start_lrs)
            elif steps_after:
                follower.step(t, end, metrics)  # type: ignore[union-attr]
            return

        # compose="multiply": the optimizer holds f(t-1) * a(t-1) while t - 1 < end.
        scaled = t - 1 < end
        if steps_after:
            if scaled:  # let the after-scheduler see (and step from) its own a(t-1)
                self._storage.write(follower.lrs)
                scaled = False
            follower.step(t, end, metrics)
            if t < end:
                follower.lrs = self._storage.read()
        if t < end:
            self._write_warm(t, follower.lrs)
        elif scaled:
            self._storage.write(follower.lrs)

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
        multiplying = follower is not None and follower.multiply
        return {
            "format": _STATE_FORMAT,
            "last_epoch": self.last_epoch,
            "step_count": self._step_calls + 1,  # torch's convention: 1 right after construction
            "compose": self.compose,
            "warmup_steps": self.warmup_steps,
            "start_factor": self.start_factors,
            "shape": self.shapes,
            "template": None if template is None else _setting_to_state(template),
            "base_lrs": self._base.tolist(),
            "after_start_lrs": None if follower is None else follower.start_lrs.tolist(),
            "after_lrs": follower.lrs.tolist() if multiplying else None,  # type: ignore[union-attr]
            "lrs": self._storage.read().tolist(),
            "after": None if self.after is None else copy.deepcopy(self.after.state_dict()),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` and write the saved lrs into the optimizer."""
        if state_dict.get("format") != _STATE_FORMAT:
            raise ValueError(
                f"state_dict is not a WarmupScheduler state (format {state_dict.get('format')!r})"
            )
        num_groups = len(state_dict["base_lrs"])
        if num_groups != len(self.optimizer.param_groups):
            raise ValueError(
                f"state_dict has {num_groups} param groups, the optimizer has "
                f"{len(self.optimizer.param_groups)}"
            )
        if state_dict["compose"] != self.compose:
            raise ValueError(
                f"state_dict was saved with compose={state_dict['compose']!r}, this scheduler "
                f"uses compose={self.compose!r}"
            )
        if (state_dict["after"] is None) != (self.after is None):
            raise ValueError(
                "state_dict and this scheduler disagree on having an after-scheduler: build it "
                "with the same after= as the saved one"
            )
        self._settings = [
            WarmupSetting(int(w), None if s is None else float(s), str(sh))
            for w, s, sh in zip(
                state_dict["warmup_steps"],
                state_dict["start_factor"],
                state_dict["shape"],
                strict=True,
            )
        ]
        template = state_dict["template"]
        self._template = None if template is None else _setting_from_state(template)
        storage = self._storage
        self._base = storage.vector(state_dict["base_lrs"])
        follower = self._follower
        if follower is not None:
            follower.start_lrs = storage.vector(state_dict["after_start_lrs"])
            saved = state_dict["after_lrs"]
            follower.lrs = follower.start_lrs.clone() if saved is None else storage.vector(saved)
        self.last_epoch = int(state_dict["last_epoch"])
        self._step_calls = int(state_dict["step_count"]) - 1
        self._num_groups = num_groups
        self._factors = GroupFactors(self._settings, storage.device)
        if self.after is not None:
            self.after.load_state_dict(copy.deepcopy(state_dict["after"]))
        storage.write(storage.vector(state_dict["lrs"]))

    # -- internals -----------------------------------------------------------------------------

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
        if follower is not None and follower.multiply:
            if t < end:
                self._write_warm(t, follower.lrs)
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
                "a param group was added, but warmup_steps/start_factor/shape were given per "
                "group, so its settings are unknown; build the WarmupScheduler again"
            )
        storage = self._storage
        added = groups[self._num_groups :]
        for group in added:
            lr = group["lr"]
            storage.check_added(lr)
            group.setdefault("initial_lr", lr.clone() if isinstance(lr, Tensor) else lr)
        added_base = storage.vector([self._base_lr(g["initial_lr"]) for g in added])
        self._base = torch.cat([self._base, added_base])
        self._settings = self._settings + [self._template] * len(added)
        self._num_groups = len(groups)
        storage.check_shared_tensors(self._settings)
        self._factors = GroupFactors(self._settings, storage.device)
        if self.last_epoch < self._factors.end:
            self._write_warm(self.last_epoch, self._base)


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
    return WarmupSetting(min(setting.steps, steps), setting.start_factor, setting.shape)


def _setting_to_state(setting: WarmupSetting) -> dict[str, Any]:
    steps, start_factor, shape = astuple(setting)
    return {"warmup_steps": steps, "start_factor": start_factor, "shape": shape}


def _setting_from_state(state: dict[str, Any]) -> WarmupSetting:
    return WarmupSetting(state["warmup_steps"], state["start_factor"], state["shape"])
