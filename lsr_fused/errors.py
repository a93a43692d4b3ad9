"""The exception types the package raises for a bad argument.

PyTorch raises ``RuntimeError`` for most misuse of ``F.cross_entropy`` (a weight of the wrong
length, a target of the wrong shape or dtype) and ``IndexError`` for a target out of range. Code
written against ``nn.CrossEntropyLoss`` catches those; code written against this package catches
the more precise ``ValueError`` / ``TypeError``. Each type here derives from both, so either
``except`` clause keeps working when one loss is swapped for the other.
"""

from __future__ import annotations

__all__ = ["ArgumentTypeError", "ArgumentValueError", "TargetIndexError"]


class ArgumentValueError(ValueError, RuntimeError):
    """An argument has a bad value or shape (catchable as ``ValueError`` or ``RuntimeError``)."""


class ArgumentTypeError(TypeError, RuntimeError):
    """An argument has a bad type or dtype (catchable as ``TypeError`` or ``RuntimeError``)."""


class TargetIndexError(ValueError, IndexError):
    """A target is neither ``ignore_index`` nor a class index (catchable as ``ValueError`` or, as
    PyTorch raises it, ``IndexError``)."""
