"""Typed parameter objects shared by the policy layer and every backend.

A smoothed target distribution over ``C`` classes puts mass ``a`` on the target class and ``b`` on
every other class. Written as ``q_i = b + (a - b) * [i == y]`` it covers both conventions:

* ``spread="all"`` (PyTorch): ``b = eps / C``, ``a - b = 1 - eps``
* ``spread="others"`` (Inception-v3): ``b = eps / (C - 1)``, ``a = 1 - eps``

Backends only ever see ``target_extra = a - b`` and ``other_mass = b``; they never learn which
convention produced them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every backend accumulates in, and of losses, log-sum-exps and class weights:
    float64 for float64 logits, float32 otherwise (half-precision logits included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class RowParams(NamedTuple):
    """Per-call scalars of the fused row kernels (runtime values: a new value never recompiles).

    Attributes:
        target_extra: ``a - b``, the mass the target class gets on top of ``other_mass``.
        other_mass: ``b``, the mass every class gets (the smoothing mass per class).
        z_loss: coefficient of the auxiliary ``logsumexp(x) ** 2`` term.
        ignore_index: rows whose target equals this give zero loss and zero gradient.
        softcap: ``c > 0``: every logit ``x`` is read as ``c * tanh(x / c)``; ``0.0``: off.
    """

    target_extra: float
    other_mass: float
    z_loss: float
    ignore_index: int
    softcap: float = 0.0

    def packed(self) -> tuple[list[float], int]:
        """The form a custom op's schema carries: every float field in order, and the index."""
        return [float(getattr(self, name)) for name in _FLOAT_FIELDS], int(self.ignore_index)

    @classmethod
    def unpacked(cls, floats: list[float], ignore_index: int) -> RowParams:
        """The inverse of :meth:`packed`."""
        return cls(ignore_index=ignore_index, **dict(zip(_FLOAT_FIELDS, floats, strict=True)))


_FLOAT_FIELDS = tuple(name for name in RowParams._fields if name != "ignore_index")


def smoothing_masses(label_smoothing: float, num_classes: int, spread: str) -> tuple[float, float]:
    """Return ``(target_extra, other_mass) = (a - b, b)`` for a smoothing convention."""
    if spread == "all":
        other_mass = label_smoothing / num_classes
        return 1.0 - label_smoothing, other_mass
    # spread == "others": target keeps 1 - eps, the rest share eps equally.
    other_mass = label_smoothing / (num_classes - 1)
    return (1.0 - label_smoothing) - other_mass, other_mass
