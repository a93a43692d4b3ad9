"""The loss options as one typed, frozen object: :class:`LossOptions`.

Every entry point (the functional forms, the modules, the fused head, the vocabulary-parallel forms)
describes a call's scalar options with one :class:`LossOptions`, checked once where it is made, and
hands the kernels its packed form, :meth:`LossOptions.row_params`. Adding an option is: its field
and check here, its math in each backend, its docstring line.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable
from typing import Optional, TypedDict, TypeVar

import torch

from ._params import RowParams, smoothing_masses
from .errors import ArgumentTypeError, ArgumentValueError

REDUCTIONS = ("none", "sum", "mean")
SPREADS = ("all", "others")
BACKENDS = ("auto", "triton", "cpp", "torch")


def _is_real(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def _check_real(name: str, value, low: float, high: float, what: str) -> None:
    if not _is_real(value):
        raise ArgumentTypeError(f"{name} must be a float, got {type(value).__name__}")
    if not low <= float(value) <= high:
        raise ArgumentValueError(f"{name} must be {what}, got {value}")


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ArgumentValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be a bool, got {type(value).__name__}")


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """The scalar options of the label-smoothed cross-entropy (see the loss's docstring).

    Attributes:
        label_smoothing: ``eps`` in ``[0, 1]``.
        ignore_index: target value whose elements are skipped.
        reduction: ``"none"``, ``"sum"`` or ``"mean"``.
        spread: ``"all"`` (PyTorch) or ``"others"`` (Inception-v3).
        z_loss: coefficient ``>= 0`` of the auxiliary ``logsumexp(x) ** 2`` term.
        softcap: ``c > 0``: the loss of ``c * tanh(x / c)``; ``None``: the logits as they are.
        return_stats: return ``(loss, LossStats)`` instead of the loss.
        inplace_backward: write the gradient into the logits' storage (non-leaf logits only).
        backend: ``"auto"``, ``"triton"``, ``"cpp"`` or ``"torch"``.

    Raises ``TypeError`` / ``ValueError`` (``lsr_fused.errors`` types) naming the field.
    """

    label_smoothing: float = 0.1
    ignore_index: int = -100
    reduction: str = "mean"
    spread: str = "all"
    z_loss: float = 0.0
    softcap: Optional[float] = None
    return_stats: bool = False
    inplace_backward: bool = False
    backend: str = "auto"

    def __post_init__(self) -> None:
        _check_real("label_smoothing", self.label_smoothing, 0.0, 1.0, "in [0, 1]")
        if not _is_real(self.z_loss):
            raise ArgumentTypeError(f"z_loss must be a float, got {type(self.z_loss).__name__}")
        if not 0.0 <= float(self.z_loss) < math.inf:
            raise ArgumentValueError(f"z_loss must be a finite number >= 0, got {self.z_loss}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise ArgumentTypeError(
                f"ignore_index must be an int, got {type(self.ignore_index).__name__}"
            )
        _check_choice("reduction", self.reduction, REDUCTIONS)
        _check_choice("spread", self.spread, SPREADS)
        _check_choice("backend", self.backend, BACKENDS)
        if self.softcap is not None:
            if not _is_real(self.softcap):
                raise ArgumentTypeError(
                    f"softcap must be a float or None, got {type(self.softcap).__name__}"
                )
            if not 0.0 < float(self.softcap) < math.inf:
                raise ArgumentValueError(
                    f"softcap must be a finite number > 0 or None, got {self.softcap}"
                )
        _check_flag("return_stats", self.return_stats)
        _check_flag("inplace_backward", self.inplace_backward)

    def row_params(self, num_classes: int) -> RowParams:
        """The packed per-call scalars the kernels read, for ``num_classes`` classes."""
        target_extra, other_mass = smoothing_masses(
            float(self.label_smoothing), num_classes, self.spread
        )
        softcap = 0.0 if self.softcap is None else float(self.softcap)
        return RowParams(target_extra, other_mass, float(self.z_loss), self.ignore_index, softcap)

    def replace(self, **changes) -> LossOptions:
        """A copy with ``changes`` applied (and checked)."""
        return dataclasses.replace(self, **changes)

    def keywords(self, names: Optional[frozenset[str]] = None) -> dict:
        """The fields as the keyword arguments of an entry point: ``label_smoothing`` and the
        fields in ``names`` (None: every field)."""
        return {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if names is None or field.name in names or field.name == "label_smoothing"
        }


class HeadKeywords(TypedDict, total=False):
    """The options every entry point takes as ``**options`` (the :class:`LossOptions` fields but
    ``label_smoothing``, which is positional, and ``inplace_backward``): for static checkers."""

    ignore_index: int
    reduction: str
    spread: str
    z_loss: float
    softcap: Optional[float]
    return_stats: bool
    backend: str


class LossKeywords(HeadKeywords, total=False):
    """:class:`HeadKeywords` and ``inplace_backward``: the options of the loss (not of the fused
    head, whose gradient never has a logits-sized buffer to overwrite)."""

    inplace_backward: bool


# (name, default) of every field after label_smoothing, in the dataclass's order.
_KEYWORD_DEFAULTS = tuple((f.name, f.default) for f in dataclasses.fields(LossOptions))[1:]
_DEFAULT_VALUES = tuple(default for _, default in _KEYWORD_DEFAULTS)
LOSS_KEYWORDS = frozenset(name for name, _ in _KEYWORD_DEFAULTS)
HEAD_KEYWORDS = LOSS_KEYWORDS - {"inplace_backward"}


def option_fields(
    label_smoothing, keywords: dict, caller: str, allowed: frozenset[str] = LOSS_KEYWORDS
) -> tuple:
    """The positional fields of :class:`LossOptions` from an entry point's ``label_smoothing`` and
    ``**options`` (defaults filled in, values not yet checked). A name outside ``allowed`` is a
    ``TypeError``, as Python raises for an unknown keyword."""
    if not keywords:
        return (label_smoothing, *_DEFAULT_VALUES)
    for name in keywords:
        if name not in allowed:
            raise TypeError(f"{caller}() got an unexpected keyword argument {name!r}")
    return (label_smoothing, *[keywords.get(name, default) for name, default in _KEYWORD_DEFAULTS])


_Function = TypeVar("_Function", bound=Callable)


def shows_option_keywords(allowed: frozenset[str] = LOSS_KEYWORDS) -> Callable:
    """Decorator: the signature of a function (or ``__init__``) taking ``**options`` shows them as
    the keyword-only parameters they stand for, with their :class:`LossOptions` defaults and
    types, for ``inspect.signature``, ``help()`` and IDEs that read it."""

    def attach(function: _Function) -> _Function:
        signature = inspect.signature(function)
        kept = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        hints = LossOptions.__annotations__
        shown = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                              annotation=hints[name])
            for name, default in _KEYWORD_DEFAULTS
            if name in allowed
        ]  # fmt: skip
        function.__signature__ = signature.replace(parameters=kept + shown)
        return function

    return attach


@functools.lru_cache(maxsize=512, typed=True)
def _cached_options(*fields) -> LossOptions:
    return LossOptions(*fields)


def loss_options(*fields) -> LossOptions:
    """``LossOptions(*fields)``, made once per distinct set of values (a functional call's options
    are checked the first time they are seen, a dictionary lookup afterwards)."""
    if torch.compiler.is_compiling():
        return LossOptions(*fields)  # traced once per graph; the compiler does not see caches
    try:
        return _cached_options(*fields)
    except TypeError as error:
        if isinstance(error, ArgumentTypeError):
            raise
        # An unhashable value (a list, say): built directly, so that the check names it.
        return LossOptions(*fields)


__all__ = ["HeadKeywords", "LossKeywords", "LossOptions"]
