"""Validation of a saved :class:`~.warmup.WarmupScheduler` state, before anything is loaded.

``load_state_dict`` first turns the saved dict into a :class:`SavedState` here: every key is
checked (present, of the right type and length, consistent with the scheduler it is loaded into),
and a malformed state raises ``ValueError`` (``TypeError`` when it is not a dict) naming the key,
while the scheduler is still untouched. Keys added after the first release (``start_lr``,
``after_clock``, ``epoch``) are optional, so states saved before them still load.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .checks import is_int, is_real
from .factors import SHAPES, WarmupSetting

STATE_FORMAT = 1


@dataclass(frozen=True)
class SavedState:
    """A checked state: plain Python values, ready to be assigned."""

    last_epoch: int
    step_calls: int
    epoch: int
    settings: list[WarmupSetting]
    template: WarmupSetting | None
    base_lrs: list[float]
    after_start_lrs: list[float] | None
    after_lrs: list[float] | None
    lrs: list[float]
    after: dict[str, Any] | None


@dataclass(frozen=True)
class Expected:
    """What the scheduler being loaded into requires of the state."""

    num_groups: int
    compose: str
    after_clock: str
    has_after: bool


def parse_state(state: object, expected: Expected) -> SavedState:
    """Check ``state`` against ``expected``; raise naming the first bad key."""
    if not isinstance(state, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state).__name__}")
    if state.get("format") != STATE_FORMAT:
        raise ValueError(
            f"state_dict is not a WarmupScheduler state (format {state.get('format')!r})"
        )
    n = len(_list(state, "base_lrs"))
    if n != expected.num_groups:
        raise ValueError(
            f"state_dict['base_lrs'] has {n} param groups, the optimizer has {expected.num_groups}"
        )
    _check_same("compose", _get(state, "compose"), expected.compose)
    _check_same("after_clock", state.get("after_clock", "step"), expected.after_clock)
    after = _get(state, "after")
    if (after is None) == expected.has_after:
        raise ValueError(
            "state_dict and this scheduler disagree on having an after-scheduler: build it "
            "with the same after= as the saved one"
        )
    if after is not None and not isinstance(after, dict):
        raise ValueError(f"state_dict['after'] must be a dict, got {type(after).__name__}")
    start_lrs = state.get("start_lr", [None] * n)
    settings = [
        _setting("state_dict", w, s, sh, lr)
        for w, s, sh, lr in zip(
            _list(state, "warmup_steps", n),
            _list(state, "start_factor", n),
            _list(state, "shape", n),
            _sequence("start_lr", start_lrs, n),
            strict=True,
        )
    ]
    return SavedState(
        last_epoch=_count("last_epoch", _get(state, "last_epoch"), 0),
        step_calls=_count("step_count", _get(state, "step_count"), 1) - 1,
        epoch=_count("epoch", state.get("epoch", 0), 0),
        settings=settings,
        template=_template(_get(state, "template")),
        base_lrs=_lrs(state, "base_lrs", n),
        after_start_lrs=None if after is None else _lrs(state, "after_start_lrs", n),
        after_lrs=None if _get(state, "after_lrs") is None else _lrs(state, "after_lrs", n),
        lrs=_lrs(state, "lrs", n),
        after=after,
    )


def _get(state: dict[str, Any], key: str) -> Any:
    if key not in state:
        raise ValueError(f"state_dict is missing the key {key!r}")
    return state[key]


def _check_same(name: str, saved: Any, value: str) -> None:
    if saved != value:
        raise ValueError(
            f"state_dict was saved with {name}={saved!r}, this scheduler uses {name}={value!r}"
        )


def _sequence(key: str, value: Any, n: int | None) -> list[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"state_dict[{key!r}] must be a list, got {type(value).__name__}")
    if n is not None and len(value) != n:
        raise ValueError(f"state_dict[{key!r}] has {len(value)} entries, expected {n}")
    return list(value)


def _list(state: dict[str, Any], key: str, n: int | None = None) -> list[Any]:
    return _sequence(key, _get(state, key), n)


def _lrs(state: dict[str, Any], key: str, n: int) -> list[float]:
    values = _list(state, key, n)
    for value in values:
        if not is_real(value) or not math.isfinite(value):
            raise ValueError(f"state_dict[{key!r}] must hold finite numbers, got {value!r}")
    return [float(v) for v in values]


def _count(key: str, value: Any, minimum: int) -> int:
    if not is_int(value) or value < minimum:
        raise ValueError(f"state_dict[{key!r}] must be an int >= {minimum}, got {value!r}")
    return int(value)


def _optional_number(key: str, value: Any) -> float | None:
    if value is None:
        return None
    if not is_real(value) or not 0.0 <= float(value) < math.inf:
        raise ValueError(f"{key} must hold None or finite numbers >= 0, got {value!r}")
    return float(value)


def _setting(where: str, steps: Any, start: Any, shape: Any, start_lr: Any) -> WarmupSetting:
    if not is_int(steps) or steps < 0:
        raise ValueError(f"{where}['warmup_steps'] must hold ints >= 0, got {steps!r}")
    if shape not in SHAPES:
        raise ValueError(f"{where}['shape'] must hold one of {SHAPES}, got {shape!r}")
    return WarmupSetting(
        int(steps),
        _optional_number(f"{where}['start_factor']", start),
        str(shape),
        _optional_number(f"{where}['start_lr']", start_lr),
    )


def _template(value: Any) -> WarmupSetting | None:
    if value is None:
        return None
    where = "state_dict['template']"
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be None or a dict, got {type(value).__name__}")
    for key in ("warmup_steps", "start_factor", "shape"):
        if key not in value:
            raise ValueError(f"{where} is missing the key {key!r}")
    return _setting(
        where,
        value["warmup_steps"],
        value["start_factor"],
        value["shape"],
        value.get("start_lr"),
    )
