r"""Learning-rate warmup: constant (ResNet), gradual (Goyal et al.), and the linear scaling rule.

Five shapes (``constant``, ``linear``, ``cosine``, ``exponential``, ``1-sqrt``), a start given as a
factor of each group's base lr or as one absolute lr (timm's ``warmup_lr_init``), and any torch
scheduler to follow it, stepped with the warmup or on a clock of its own (``after_clock="epoch"``).

:class:`WarmupScheduler` multiplies every param group's base lr by a warmup factor
:math:`f_g(t)`, where :math:`t` counts the calls to :meth:`WarmupScheduler.step` (0 right after
construction, so the first optimizer step uses :math:`f(0)`). Whether a call means an iteration or
an epoch is up to the caller: the unit is the call.

One module per concern, each documenting its decisions:

* :mod:`.factors`: the closed form of each shape (a table of all four), and every group's
  factor as one expression.
* :mod:`.storage`: reading and writing all groups' lrs, tensor lrs in place without host syncs.
* :mod:`.after`: composition with an after-scheduler (sequential or multiplied, metrics, clock).
* :mod:`.state`: validation of a saved state before it is loaded.
* :mod:`.warmup`: :class:`WarmupScheduler`, the clock, state and added param groups.
* :mod:`.gradual`: :class:`GradualWarmupScheduler`, the seed-compatible class, and the scaling of
  its after-scheduler (composite ones included) to ``base * multiplier``.
* :mod:`.scaling`: :func:`linear_scaled_lr`.
"""

# The type aliases of the arguments, importable from here as before the split.
from .after import AfterClock as AfterClock
from .after import Compose as Compose
from .factors import WarmupShape as WarmupShape
from .gradual import GradualWarmupScheduler
from .scaling import linear_scaled_lr
from .warmup import WarmupScheduler

__all__ = ["GradualWarmupScheduler", "WarmupScheduler", "linear_scaled_lr"]
