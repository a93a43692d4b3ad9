"""Argument checks shared by the schedulers; every message starts with the argument's name."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

from .factors import SHAPES


def is_int(value: object) -> bool:
    # bool is an Integral, but warmup_steps=True is a mistake, not a length of 1.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def per_group(name: str, value: Any, num_groups: int) -> tuple[list[Any], bool]:
    """Broadcast a scalar to every group, or check a sequence has one entry per group.

    Returns the per-group list and whether ``value`` was a scalar (groups added later can only be
    given a setting that was not per group). Strings are scalars here, so ``shape="linear"`` is not
    read as six shapes.
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


def check_warmup_steps(name: str, value: object) -> int:
    if not is_int(value) or int(value) < 0:  # type: ignore[call-overload]
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def check_shape(value: object) -> str:
    if value not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {value!r}")
    return str(value)


def check_start_lr(value: object, shape: str) -> float | None:
    if value is None:
        return None
    if not is_real(value) or not 0.0 <= float(value) < math.inf:  # type: ignore[arg-type]
        raise ValueError(f"start_lr must be None or a finite number >= 0, got {value!r}")
    if shape == "exponential" and float(value) == 0.0:  # type: ignore[arg-type]
        raise ValueError("start_lr must be > 0 for shape='exponential' (0 ** x never grows)")
    return float(value)  # type: ignore[arg-type]


def check_start_factor(value: object, shape: str) -> float | None:
    if value is None:
        return None
    # NaN fails both comparisons, so it is refused here too.
    if not is_real(value) or not 0.0 <= float(value) <= 1.0:  # type: ignore[arg-type]
        raise ValueError(f"start_factor must be None or a number in [0, 1], got {value!r}")
    if shape == "exponential" and float(value) == 0.0:  # type: ignore[arg-type]
        raise ValueError("start_factor must be > 0 for shape='exponential' (0 ** x never grows)")
    return float(value)  # type: ignore[arg-type]
