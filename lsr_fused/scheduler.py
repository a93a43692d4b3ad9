r"""Learning-rate warmup: constant (ResNet), gradual (Goyal et al.), and the linear scaling rule.

:class:`WarmupScheduler` multiplies every param group's base lr by a warmup factor
:math:`f_g(t)`, where :math:`t` counts the calls to :meth:`WarmupScheduler.step` (0 right after
construction, so the first optimizer step uses :math:`f(0)`). Whether a call means an iteration or
an epoch is up to the caller: the unit is the call.

Closed forms
------------
For a group with ``warmup_steps`` :math:`W`, shape and ``start_factor`` :math:`s`, the factor is
:math:`1` for :math:`t \ge W` and, for :math:`0 \le t < W`, with progress :math:`p`:

===============  ==========================================  ===================================
shape            :math:`f(t)`                                ``start_factor=None`` means
===============  ==========================================  ===================================
``constant``     :math:`s`                                   :math:`s = 0.1` (ResNet: 0.01, 0.1)
``linear``       :math:`s + (1 - s)\,p`                      :math:`s = 0`, :math:`p = (t+1)/W`
``cosine``       :math:`s + (1 - s)\,(1 - \cos \pi p) / 2`   :math:`s = 0`, :math:`p = (t+1)/W`
``exponential``  :math:`s^{1 - p}` (geometric; s > 0)        :math:`s = 0.01`, :math:`p = (t+1)/W`
===============  ==========================================  ===================================

With an explicit ``start_factor`` the progress is :math:`p = t / W`, so :math:`f(0) = s` exactly
and the ramp reaches 1 at :math:`t = W`, the first step after the warmup (the same convention as
``torch.optim.lr_scheduler.LinearLR(start_factor=s, total_iters=W)``). With ``start_factor=None``
the progress is :math:`p = (t + 1) / W`: this is the Bag-of-Tricks ramp
:math:`\eta_t = \eta\,(t + 1) / W` for ``linear``, where the first step runs at :math:`\eta / W`
(never at 0; ask for ``start_factor=0`` to start at 0) and the last warmup step, :math:`t = W - 1`,
already runs at the full lr. ``W = 1`` with ``start_factor=None`` is therefore no warmup at all.
``warmup_steps=0`` always means no warmup (the factor is 1 from the start).

The factor is exactly 1.0 wherever :math:`p \ge 1` (it is selected, not computed), and exactly
:math:`s` at :math:`p = 0`, so the lr at the end of the warmup is bit-for-bit the base lr. Each
step evaluates the closed form at the integer step count; nothing is accumulated, so a million
steps give the same value as the formula.

Decisions where the issue is silent
-----------------------------------
* **Vectorized state.** Base lrs, warmup lengths, start factors and progress offsets are float64
  tensors (on the CPU for float lrs, on the lrs' device for tensor lrs) and one tensor expression
  gives every group's lr. When all groups share one setting (the usual case) the factor is one
  number, computed by the same formula, and the expression is just ``base * f`` (for float lrs,
  multiplied in Python as each lr is stored, since a dict store per group is the floor anyway;
  one product for all when the base lrs are equal too). Float lrs are written with one
  ``tolist()`` and a dict store per group; tensor lrs are written in place (one copy into an
  lr-dtype staging vector, then ``torch._foreach_copy_`` from views of it made once) into the very
  tensors the optimizer holds (same object, same storage), with no ``.item()`` and no host-device
  synchronisation, so a CUDA-graph-captured ``capturable=True`` step follows the lr between
  replays. All groups must hold the same kind of lr (all floats, or all tensors on one
  device); groups that share one lr tensor must share their warmup settings.
* **get_last_lr()** reads the optimizer, so it always equals the lrs the next optimizer step uses
  (also after a manual change or a plateau reduction). Tensor lrs are returned as detached clones,
  as torch's schedulers do, so the result never aliases the optimizer's tensors.
* **Base lr** of a group: ``group["initial_lr"]`` if an earlier scheduler (typically the
  after-scheduler, built first) set it, else ``group["lr"]``; it is stored as ``initial_lr`` too.
* **after, compose="sequential"**: the hand-off step is :math:`T = \max_g W_g`. For :math:`t < T`
  the lr is :math:`\text{base}_g f_g(t)`; at :math:`t = T` the optimizer gets the after-scheduler's
  own step-0 lrs (what it set when it was built, normally the base lrs: no dip, no jump); the call
  that makes :math:`t = T + k` steps the after-scheduler for the :math:`k`-th time, so its own
  step count (and milestones) start at the hand-off. Groups with a shorter warmup hold their base
  lr until :math:`T`. The after-scheduler is stepped once per call, in the same unit as the
  warmup: to pair a per-iteration warmup with a per-epoch schedule, express that schedule in
  iterations (e.g. ``StepLR(step_size=30 * iters_per_epoch)``).
* **after, compose="multiply"**: the after-scheduler is stepped on every call from the start and
  the optimizer gets :math:`f_g(t)\,a_g(t)`, where :math:`a_g(t)` is the after-scheduler's own lr.
  The warmup factor is divided back out before each after-step, so chainable schedulers (which
  read ``group["lr"]``) see their own unscaled sequence.
* **Metric-driven after-schedulers** (those whose ``step`` takes ``metrics``, e.g.
  ``ReduceLROnPlateau``) are stepped only on calls that move past :math:`T`, in both compose
  modes: metrics seen during warmup are ignored, so no plateau reduction happens during warmup.
  ``step(metrics=...)`` forwards ``metrics`` as a keyword; a call that has to step such a scheduler
  without metrics, or metrics with nothing to receive them, raises ``TypeError``.
* **finish_warmup()** makes the current step the hand-off step: the lrs become the warmed-up lrs
  (or the after-scheduler's step-0 lrs) at once, and the next call steps the after-scheduler. It is
  recorded by shortening ``warmup_steps`` to the current step, so it survives ``state_dict()``.
* **No ordering heuristic.** ``LRScheduler.__init__`` is not called: it wraps ``optimizer.step``
  to warn when ``scheduler.step()`` comes first, a heuristic with false positives (a GradScaler
  that skips the first steps, steps replayed from a CUDA graph). Here the schedule is defined per
  call, the warning is never emitted (nor by the after-scheduler, whose first step is ours to
  order), and ``optimizer.step`` is left unwrapped by this class. Correct use emits no warnings at
  all; the deprecated ``epoch`` argument of ``step`` does not exist.
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

:class:`GradualWarmupScheduler` keeps the signature and meaning of the widely copied seed class:
``lr = base * ((multiplier - 1) * t / total_epoch + 1)`` for :math:`t \le` ``total_epoch``, then
the after-scheduler runs as if its base lrs were ``base * multiplier``. It is a
:class:`WarmupScheduler` with base lrs ``base * multiplier``, ``shape="linear"``, explicit
``start_factor = 1 / multiplier`` (``0`` for ``multiplier == 1``, which ramps from 0),
``warmup_steps = total_epoch`` and ``compose="sequential"``; the after-scheduler's ``base_lrs`` and
step-0 lrs are scaled by ``multiplier`` once, at construction. This fixes the seed's dip after the
hand-off, its wrong first value with a ``StepLR(step_size=1)`` follower, its ReduceLROnPlateau path,
its ``state_dict`` that pickles live objects, its deprecation warnings and its
``ZeroDivisionError`` at ``total_epoch=0``.
"""

from __future__ import annotations

import copy
import inspect
import math
import numbers
import warnings
import weakref
from collections.abc import Sequence
from typing import Any, Literal, SupportsFloat

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

__all__ = ["GradualWarmupScheduler", "WarmupScheduler", "linear_scaled_lr"]

WarmupShape = Literal["constant", "linear", "exponential", "cosine"]
Compose = Literal["sequential", "multiply"]

_SHAPES: tuple[str, ...] = ("constant", "linear", "exponential", "cosine")
# start_factor used when the caller passes None; the ramped shapes also shift progress by one step.
_DEFAULT_START_FACTOR = {"constant": 0.1, "linear": 0.0, "exponential": 0.01, "cosine": 0.0}
_STATE_FORMAT = 1
# The two messages of LRScheduler.step()'s check that optimizer.step() ran first.
_ORDER_WARNINGS = (
    r"(Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`"
    r"|Seems like `optimizer\.step\(\)` has been overridden)"
)


# ---------------------------------------------------------------------------------------------
# argument checking


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _per_group(name: str, value: Any, num_groups: int) -> tuple[list[Any], bool]:
    """Broadcast a scalar to every group, or check a sequence has one entry per group.

    Returns the per-group list and whether ``value`` was a scalar (needed to pick up groups added
    later). Strings are scalars here, so ``shape="linear"`` is not read as six shapes.
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return [value] * num_groups, True
    values = list(value)
    if len(values) != num_groups:
        raise ValueError(
            f"{name} has {len(values)} entries but the optimizer has {num_groups} param groups; "
            "pass a scalar or one entry per group"
        )
    return values, False


def _check_warmup_steps(name: str, value: object) -> int:
    if not _is_int(value) or int(value) < 0:  # type: ignore[call-overload]
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def _check_shape(value: object) -> str:
    if value not in _SHAPES:
        raise ValueError(f"shape must be one of {_SHAPES}, got {value!r}")
    return str(value)


def _check_start_factor(value: object, shape: str) -> float | None:
    if value is None:
        return None
    if not _is_real(value) or not 0.0 <= float(value) <= 1.0:  # type: ignore[arg-type]
        raise ValueError(f"start_factor must be None or a number in [0, 1], got {value!r}")
    if shape == "exponential" and float(value) == 0.0:  # type: ignore[arg-type]
        raise ValueError("start_factor must be > 0 for shape='exponential' (0 ** x never grows)")
    return float(value)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# the warmup factor: one expression over all groups


def _ramp(shape: str, start: Tensor, rise: Tensor, progress: Tensor) -> Tensor:
    """Factor of every group for one shape, valid for progress in [0, 1); consumes ``progress``.

    ``rise`` is ``1 - start`` (``(1 - start) / 2`` for cosine). At progress 0 every shape gives
    exactly ``start`` (cos 0 is 1, ``start ** 1`` is ``start``); progress >= 1 is the caller's,
    which selects 1 there instead of trusting ``cos(fl(pi))`` to round to -1 on every device.
    """
    if shape == "linear":
        return torch.addcmul(start, rise, progress)
    if shape == "constant":
        return start.clone()
    if shape == "cosine":
        return torch.addcmul(start, rise, progress.mul_(math.pi).cos_().neg_().add_(1.0))
    return torch.pow(start, progress.neg_().add_(1.0))  # exponential: start ** (1 - p)


def _scalar_ramp(shape: str, start: float, rise: float, progress: float) -> float:
    """:func:`_ramp` for one setting shared by every group, evaluated in the same order."""
    if progress >= 1.0:
        return 1.0
    if shape == "linear":
        return start + rise * progress
    if shape == "constant":
        return start
    if shape == "cosine":
        return start + rise * (1.0 - math.cos(math.pi * progress))
    return start ** (1.0 - progress)


class WarmupScheduler(LRScheduler):
    r"""Per-group learning-rate warmup, optionally followed by (or multiplied with) a scheduler.

    The lr of group :math:`g` at step :math:`t` is :math:`\text{base}_g\, f_g(t)` during warmup;
    see the module docstring for :math:`f` of each shape and for the hand-off rules.

    Args:
        optimizer: the optimizer whose ``param_groups[i]["lr"]`` are driven.
        warmup_steps: warmup length :math:`W` in calls to :meth:`step`, a non-negative int or one
            per param group; 0 means no warmup.
        start_factor: :math:`s`, the factor at :math:`t = 0`, in [0, 1] (> 0 for
            ``"exponential"``), or ``None`` for the shape's default (see the module docstring),
            scalar or one per group.
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
        num_groups = len(groups)

        if compose not in ("sequential", "multiply"):
            raise ValueError(f"compose must be 'sequential' or 'multiply', got {compose!r}")
        if not _is_int(last_step) or last_step < -1:
            raise ValueError(f"last_step must be an int >= -1, got {last_step!r}")
        if after is not None:
            # ReduceLROnPlateau only became an LRScheduler subclass in later torch releases.
            if not isinstance(after, (LRScheduler, ReduceLROnPlateau)):
                raise ValueError(
                    "after must be a torch.optim.lr_scheduler.LRScheduler (ReduceLROnPlateau "
                    f"included), got {type(after)}"
                )
            if getattr(after, "optimizer", None) is not optimizer:
                raise ValueError("after must drive the same optimizer as the warmup scheduler")
            if last_step != -1:
                raise ValueError(
                    "last_step >= 0 cannot fast-forward an after-scheduler; resume with "
                    "state_dict()/load_state_dict() instead"
                )

        step_list, steps_scalar = _per_group("warmup_steps", warmup_steps, num_groups)
        shape_list, shape_scalar = _per_group("shape", shape, num_groups)
        factor_list, factor_scalar = _per_group("start_factor", start_factor, num_groups)
        self._warmup_steps = [_check_warmup_steps("warmup_steps", w) for w in step_list]
        self._shapes = [_check_shape(s) for s in shape_list]
        self._start_factors = [
            _check_start_factor(s, sh) for s, sh in zip(factor_list, self._shapes, strict=True)
        ]
        # Settings for groups added later; only possible when nothing was given per group.
        self._template: dict[str, Any] | None = None
        if steps_scalar and shape_scalar and factor_scalar:
            self._template = {
                "warmup_steps": self._warmup_steps[0],
                "start_factor": self._start_factors[0],
                "shape": self._shapes[0],
            }

        self.compose: Compose = compose
        self.after = after
        self._after_takes_metrics = False
        self._after_needs_metrics = False
        if after is not None:
            metrics_param = inspect.signature(after.step).parameters.get("metrics")
            self._after_takes_metrics = metrics_param is not None
            self._after_needs_metrics = (
                metrics_param is not None and metrics_param.default is inspect.Parameter.empty
            )

        self._tensor_lrs, self._device = self._lr_kind(groups)
        self._stage: Tensor | None = None  # lr-dtype copy of the values written to tensor lrs
        self._stage_views: list[Tensor] = []
        self._check_shared_lr_tensors()
        for i, group in enumerate(groups):
            if last_step == -1:
                lr = group["lr"]
                group.setdefault("initial_lr", lr.clone() if isinstance(lr, Tensor) else lr)
            elif "initial_lr" not in group:
                raise ValueError(
                    f"last_step={last_step} needs param_groups[{i}]['initial_lr'], which a "
                    "scheduler built with last_step=-1 sets (it is saved by optimizer.state_dict())"
                )
        self._base = self._to_vector([self._base_lr(g["initial_lr"]) for g in groups])
        # The after-scheduler's step-0 lrs: what the optimizer holds now, as it built them.
        self._after_start: Tensor | None = None
        self._after_lrs: Tensor | None = None  # a(t) of compose="multiply", unscaled
        if after is not None:
            self._after_start = self._scale_after_start(self._read_lrs())
            if compose == "multiply":
                self._after_lrs = self._after_start.clone()

        self._num_groups = num_groups
        self._rebuild_tensors()
        self.last_epoch = last_step + 1
        self._step_count = 1
        self._apply_current()

        # Picks up groups added with optimizer.add_param_group before they take a step. A weak
        # reference, so the optimizer does not keep a dropped scheduler alive.
        self_ref = weakref.ref(self)

        def _pick_up_new_groups(opt: Optimizer, args: Any, kwargs: Any) -> None:
            scheduler = self_ref()
            if scheduler is not None and len(opt.param_groups) != scheduler._num_groups:
                scheduler._sync_param_groups()

        self._hook_handle = optimizer.register_step_pre_hook(_pick_up_new_groups)

    def __del__(self) -> None:
        handle = getattr(self, "_hook_handle", None)
        if handle is not None:
            handle.remove()

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
        if self._tensor_lrs:
            return list(self._base.unbind(0))
        return self._base.tolist()

    @property
    def warmup_steps(self) -> list[int]:
        """Warmup length of each group (shortened by :meth:`finish_warmup`)."""
        return list(self._warmup_steps)

    @property
    def start_factors(self) -> list[float | None]:
        """Start factor of each group as given (``None``: the shape's default)."""
        return list(self._start_factors)

    @property
    def shapes(self) -> list[str]:
        """Warmup shape of each group."""
        return list(self._shapes)

    @property
    def warmup_end(self) -> int:
        """The hand-off step :math:`T = \\max_g W_g`: the first step with no group warming up."""
        return self._warmup_end

    @property
    def in_warmup(self) -> bool:
        """Whether the current step is still before :attr:`warmup_end`."""
        return self.last_epoch < self._warmup_end

    def get_last_lr(self) -> list[float | Tensor]:
        """The lrs the optimizer holds now (tensor lrs as detached clones)."""
        return [
            g["lr"].detach().clone() if isinstance(g["lr"], Tensor) else g["lr"]
            for g in self.optimizer.param_groups
        ]

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
            self._sync_param_groups()
        t = self.last_epoch + 1
        steps_after = self._after_steps_at(t)
        if metrics is not None and not self._after_takes_metrics:
            raise TypeError(
                "step() got metrics, but there is no after-scheduler whose step() takes metrics "
                "(the deprecated epoch argument of torch schedulers is not supported)"
            )
        if steps_after and metrics is None and self._after_needs_metrics:
            raise TypeError(
                f"the after-scheduler {type(self.after).__name__} needs step(metrics=...) once "
                "the warmup is over"
            )
        self.last_epoch = t
        self._step_count += 1
        end = self._warmup_end
        after = self.after

        if after is None or self.compose == "sequential":
            if t < end:
                self._write_warmup(t)
            elif t == end:
                self._write(self._after_start if self._after_start is not None else self._base)
            elif steps_after:
                self._step_after(metrics)
            return

        # compose="multiply": the optimizer holds f(t-1) * a(t-1) while t - 1 < end.
        scaled = t - 1 < end
        if steps_after:
            if scaled:
                self._write(self._after_lrs)  # type: ignore[arg-type]
                scaled = False
            self._step_after(metrics)
            if t < end:
                self._after_lrs = self._read_lrs()
        if t < end:
            self._write(self._warm(t, self._after_lrs))  # type: ignore[arg-type]
        elif scaled:
            self._write(self._after_lrs)  # type: ignore[arg-type]

    def finish_warmup(self) -> None:
        """End the warmup at the current step (e.g. ResNet: once training error is below 80%).

        The optimizer gets the warmed-up lrs (the after-scheduler's step-0 lrs with
        ``compose="sequential"``, its current lrs with ``"multiply"``) right away, and the next
        :meth:`step` continues past the hand-off. A no-op once the warmup is over.
        """
        if len(self.optimizer.param_groups) != self._num_groups:
            self._sync_param_groups()
        t = self.last_epoch
        if t >= self._warmup_end:
            return
        self._warmup_steps = [min(w, t) for w in self._warmup_steps]
        if self._template is not None:
            self._template["warmup_steps"] = min(self._template["warmup_steps"], t)
        self._rebuild_tensors()
        self._apply_current()

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state (``torch.load(..., weights_only=True)`` loads it), after's included."""
        return {
            "format": _STATE_FORMAT,
            "last_epoch": self.last_epoch,
            "step_count": self._step_count,
            "compose": self.compose,
            "warmup_steps": list(self._warmup_steps),
            "start_factor": list(self._start_factors),
            "shape": list(self._shapes),
            "template": copy.deepcopy(self._template),
            "base_lrs": self._base.tolist(),
            "after_start_lrs": None if self._after_start is None else self._after_start.tolist(),
            "after_lrs": None if self._after_lrs is None else self._after_lrs.tolist(),
            "lrs": self._read_lrs().tolist(),
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
        self._warmup_steps = [int(w) for w in state_dict["warmup_steps"]]
        self._start_factors = [None if s is None else float(s) for s in state_dict["start_factor"]]
        self._shapes = [str(s) for s in state_dict["shape"]]
        self._template = copy.deepcopy(state_dict["template"])
        self._base = self._to_vector(state_dict["base_lrs"])
        start, current = state_dict["after_start_lrs"], state_dict["after_lrs"]
        self._after_start = None if start is None else self._to_vector(start)
        self._after_lrs = None if current is None else self._to_vector(current)
        self.last_epoch = int(state_dict["last_epoch"])
        self._step_count = int(state_dict["step_count"])
        self._num_groups = num_groups
        self._rebuild_tensors()
        if self.after is not None:
            self.after.load_state_dict(copy.deepcopy(state_dict["after"]))
        self._write(self._to_vector(state_dict["lrs"]))

    # -- internals -----------------------------------------------------------------------------

    @staticmethod
    def _lr_kind(groups: list[dict[str, Any]]) -> tuple[bool, torch.device]:
        """Whether the lrs are tensors, and the device the per-group state lives on."""
        lrs = [g["lr"] for g in groups]
        tensors = [lr for lr in lrs if isinstance(lr, Tensor)]
        if not tensors:
            return False, torch.device("cpu")
        devices = {lr.device for lr in tensors}
        if len(tensors) != len(lrs) or len(devices) != 1:
            raise ValueError(
                "lr of the param groups must be all Python numbers or all tensors on one device, "
                f"got {len(tensors)} tensors (devices {sorted(map(str, devices))}) among "
                f"{len(lrs)} groups"
            )
        return True, devices.pop()

    def _check_shared_lr_tensors(self) -> None:
        """Groups may share one lr tensor (optimizer defaults do) only with equal settings."""
        if not self._tensor_lrs:
            return
        first_user: dict[int, int] = {}
        for i, group in enumerate(self.optimizer.param_groups):
            j = first_user.setdefault(id(group["lr"]), i)
            settings_i = (self._warmup_steps[i], self._start_factors[i], self._shapes[i])
            settings_j = (self._warmup_steps[j], self._start_factors[j], self._shapes[j])
            if settings_i != settings_j:
                raise ValueError(
                    f"lr: param groups {j} and {i} share one lr tensor but have different warmup "
                    "settings; give each group its own lr tensor"
                )

    def _to_vector(self, values: Sequence[float | Tensor]) -> Tensor:
        """float64 vector on the state device (syncs only for mixed inputs, never in step())."""
        if all(isinstance(v, Tensor) for v in values) and len(values) > 0:
            return torch.stack(
                [v.detach().reshape(()).to(self._device, torch.float64) for v in values]  # type: ignore[union-attr]
            )
        return torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._device)

    def _read_lrs(self) -> Tensor:
        return self._to_vector([g["lr"] for g in self.optimizer.param_groups])

    def _write(self, lrs: Tensor) -> None:
        """Store one float64 lr per group into the optimizer; tensor lrs in place, no sync."""
        groups = self.optimizer.param_groups
        if self._tensor_lrs:
            targets = [g["lr"] for g in groups]
            stage = self._stage
            if stage is None or stage.numel() != len(targets) or stage.dtype != targets[0].dtype:
                # Views made once: unbind() per step would cost a Python object per group.
                stage = self._stage = torch.empty_like(lrs, dtype=targets[0].dtype)
                self._stage_views = list(stage.unbind(0))
            stage.copy_(lrs)
            torch._foreach_copy_(targets, self._stage_views)
        else:
            for group, lr in zip(groups, lrs.tolist(), strict=True):
                group["lr"] = lr

    def _rebuild_tensors(self) -> None:
        """Derive the tensors of the factor expression from the per-group settings."""
        starts, offsets, spans = [], [], []
        settings = zip(self._warmup_steps, self._start_factors, self._shapes, strict=True)
        for steps, start, shape in settings:
            starts.append(_DEFAULT_START_FACTOR[shape] if start is None else start)
            shifted = start is None and shape != "constant"
            # W = 0: progress (t + 1) / 1 >= 1 at every t, so the factor is 1 throughout.
            offsets.append(1.0 if steps == 0 or shifted else 0.0)
            spans.append(float(max(steps, 1)))
        device = self._device
        self._start = torch.tensor(starts, dtype=torch.float64, device=device)
        self._offset = torch.tensor(offsets, dtype=torch.float64, device=device)
        self._span = torch.tensor(spans, dtype=torch.float64, device=device)
        rise = 1.0 - self._start
        self._rise = rise
        self._half_rise = rise * 0.5
        # When every group has the same setting (the usual case) the factor is one number: the
        # step then costs one tensor op instead of five, which is most of the time for few groups.
        distinct = set(zip(self._shapes, starts, offsets, spans, strict=True))
        self._shared: tuple[str, float, float, float, float] | None = None
        if len(distinct) == 1:
            shape, start, offset, span = distinct.pop()
            rise_of_shape = (1.0 - start) * 0.5 if shape == "cosine" else 1.0 - start
            self._shared = (shape, start, rise_of_shape, offset, span)
        # Float lrs on top of that need no tensor op at all: each group's lr is its base times
        # one Python float, multiplied as it is stored (the dict store is the floor of any
        # per-group write). b * f rounds the same in Python as in a float64 tensor, so both
        # paths give identical values.
        self._shared_bases: list[float] | None = None
        self._shared_base: float | None = None  # all float base lrs equal: one product in all
        if self._shared is not None and not self._tensor_lrs:
            self._shared_bases = self._base.tolist()
            if all(b == self._shared_bases[0] for b in self._shared_bases):
                self._shared_base = self._shared_bases[0]
        present = sorted(set(self._shapes), key=_SHAPES.index)
        self._masks = [
            (shape, torch.tensor([s == shape for s in self._shapes], device=device))
            for shape in present
        ]
        self._warmup_end = max(self._warmup_steps, default=0)

    def _write_warmup(self, t: int) -> None:
        """Write ``base * f(t)`` into every group."""
        shared_bases = self._shared_bases
        if shared_bases is None:
            self._write(self._warm(t, self._base))
            return
        factor = self._shared_factor(t)
        groups = self.optimizer.param_groups
        if self._shared_base is not None:
            lr = self._shared_base * factor
            for group in groups:
                group["lr"] = lr
            return
        for group, base in zip(groups, shared_bases, strict=True):
            group["lr"] = base * factor

    def _shared_factor(self, t: int) -> float:
        shape, start, rise, offset, span = self._shared  # type: ignore[misc]
        return _scalar_ramp(shape, start, rise, (t + offset) / span)

    def _warm(self, t: int, lrs: Tensor) -> Tensor:
        """``lrs * f(t)`` for every group, as a fresh float64 tensor."""
        if self._shared is not None:
            return torch.mul(lrs, self._shared_factor(t))
        return self._factors(t).mul_(lrs)

    def _factors(self, t: int) -> Tensor:
        """f_g(t) of every group as one float64 tensor (a fresh tensor the caller may modify)."""
        progress = torch.add(self._offset, t).div_(self._span)
        done = progress >= 1.0
        if len(self._masks) == 1:
            shape = self._masks[0][0]
            rise = self._half_rise if shape == "cosine" else self._rise
            factors = _ramp(shape, self._start, rise, progress)
        else:
            factors = torch.ones_like(progress)
            for shape, mask in self._masks:
                rise = self._half_rise if shape == "cosine" else self._rise
                ramp = _ramp(shape, self._start, rise, progress.clone())
                factors = torch.where(mask, ramp, factors)
        # Exactly 1 once the ramp is complete, so the lr lands on the base lr bit for bit.
        return factors.masked_fill_(done, 1.0)

    def _after_steps_at(self, t: int) -> bool:
        """Whether the call that reaches step t steps the after-scheduler."""
        if self.after is None:
            return False
        if self.compose == "sequential" or self._after_takes_metrics:
            return t > self._warmup_end
        return True

    def _step_after(self, metrics: SupportsFloat | None) -> None:
        after = self.after
        kwargs = {} if metrics is None else {"metrics": metrics}
        if getattr(after, "_step_count", None) != 1:
            after.step(**kwargs)  # type: ignore[union-attr]
            return
        # torch's ordering heuristic runs on a scheduler's first step only. The call order is
        # ours to define (see "No ordering heuristic" above), so it is silenced there too.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_ORDER_WARNINGS, category=UserWarning)
            after.step(**kwargs)  # type: ignore[union-attr]

    def _apply_current(self) -> None:
        """Write the lrs of the current step after construction or a change of the warmup end."""
        t, end = self.last_epoch, self._warmup_end
        if self.after is not None and self.compose == "multiply":
            if t < end:
                self._write(self._warm(t, self._after_lrs))  # type: ignore[arg-type]
            else:
                self._write(self._after_lrs)  # type: ignore[arg-type]
        elif t < end:
            self._write_warmup(t)
        elif t == end and self._after_start is not None:
            self._write(self._after_start)
        elif self.after is None:
            self._write(self._base)

    def _sync_param_groups(self) -> None:
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
        new_groups = groups[self._num_groups :]
        for group in new_groups:
            lr = group["lr"]
            if isinstance(lr, Tensor) != self._tensor_lrs or (
                isinstance(lr, Tensor) and lr.device != self._device
            ):
                raise RuntimeError(
                    "a param group was added whose lr is not of the same kind (float, or tensor "
                    "on the same device) as the other groups'"
                )
            group.setdefault("initial_lr", lr.clone() if isinstance(lr, Tensor) else lr)
        added = self._to_vector([self._base_lr(g["initial_lr"]) for g in new_groups])
        self._base = torch.cat([self._base, added])
        count = len(new_groups)
        self._warmup_steps += [self._template["warmup_steps"]] * count
        self._start_factors += [self._template["start_factor"]] * count
        self._shapes += [self._template["shape"]] * count
        self._num_groups = len(groups)
        self._check_shared_lr_tensors()
        self._rebuild_tensors()
        if self.last_epoch < self._warmup_end:
            self._write_warmup(self.last_epoch)


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
        if not _is_real(multiplier) or not math.isfinite(multiplier) or multiplier < 1.0:
            raise ValueError(f"multiplier must be a finite number >= 1, got {multiplier!r}")
        total_epoch = _check_warmup_steps("total_epoch", total_epoch)
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
    if not _is_real(base_lr) or not math.isfinite(base_lr) or base_lr < 0:
        raise ValueError(f"base_lr must be a finite number >= 0, got {base_lr!r}")
    if not _is_int(batch_size) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not _is_int(base_batch_size) or base_batch_size <= 0:
        raise ValueError(f"base_batch_size must be a positive int, got {base_batch_size!r}")
    ratio = int(batch_size) / int(base_batch_size)
    if rule == "linear":
        return float(base_lr) * ratio
    if rule == "sqrt":
        return float(base_lr) * math.sqrt(ratio)
    raise ValueError(f"rule must be 'linear' or 'sqrt', got {rule!r}")
