"""The two contracts a backend module implements, written once as :class:`typing.Protocol`\\ s.

:class:`RowBackend` is what the torch, C++ and Triton backends provide for the local loss,
:class:`ShardBackend` what the torch and Triton shard kernels provide for the vocabulary-parallel
loss (the math of both is in :mod:`lsr_fused.backends`). A backend module spells these parameter
lists on one or two lines each and refers here for their meaning; ``tests/test_signatures.py``
checks that every backend's functions take exactly these parameters (names, kinds and defaults),
so a backend cannot drift from the contract without a failing test.
"""

from __future__ import annotations

from typing import Optional, Protocol

from torch import Tensor

from .._params import RowParams


class RowBackend(Protocol):
    """The local row kernels over a ``(B, S, C)`` row view of the logits (row ``b * S + s``)."""

    def forward(
        self,
        logits: Tensor,
        target: Tensor,
        weight: Optional[Tensor],
        weight_total: Optional[Tensor],
        params: RowParams,
        grad_logits: Optional[Tensor] = None,
        grad_guess: Optional[Tensor] = None,
        *,
        mix: Optional[tuple[Tensor, Tensor]] = None,
        stats: Optional[tuple[Tensor, Tensor]] = None,
    ) -> tuple[Tensor, Tensor]:
        """``(loss, lse)``, both ``(B * S,)`` in the accumulation dtype: the per-row loss and the
        saved, shifted log-sum-exp that :meth:`backward` decodes.

        ``target`` ``(B * S,)`` int64 contiguous; ``weight`` ``(C,)`` and ``weight_total`` ``(1,)``
        (``weight.sum()``, kept on the device) in the accumulation dtype, or both None.
        ``grad_logits`` with ``grad_guess`` ``(1,)``: also write the gradient for that upstream
        value into ``grad_logits`` (the device types in ``WRITES_GRAD_IN_FORWARD``). ``mix`` =
        ``(mix_target, mix_lambda)``, both ``(B * S,)``: the target mass is split ``lam`` /
        ``1 - lam``. ``stats`` = ``(lse_out, argmax_out)``: written with the absolute log-sum-exp
        and the arg-max of every row. ``params.softcap > 0`` reads ``c tanh(x / c)``."""
        ...

    def backward(
        self,
        grad_loss: Tensor,
        logits: Tensor,
        target: Tensor,
        weight: Optional[Tensor],
        weight_total: Optional[Tensor],
        lse: Tensor,
        params: RowParams,
        grad_logits: Tensor,
        grad_guess: Optional[Tensor] = None,
        *,
        mix: Optional[tuple[Tensor, Tensor]] = None,
    ) -> None:
        """Write ``grad_loss * d loss / d logits`` into ``grad_logits`` (which may be
        ``logits``). ``grad_loss`` ``(B * S,)``, any stride (0 included); ``lse`` what
        :meth:`forward` returned. With ``grad_guess`` a backend may leave the rows whose
        ``grad_loss`` equals it as its forward wrote them."""
        ...


class ShardBackend(Protocol):
    """The shard kernels of the vocabulary-parallel loss over this rank's ``(B, S, C_local)``
    row view; ``local_target`` ``(rows,)`` int64 holds ``y - offset`` or -1 (not here)."""

    def shard_stats(
        self,
        logits: Tensor,
        local_target: Tensor,
        weight: Optional[Tensor],
        out: Tensor,
        *,
        softcap: float = 0.0,
        local_mix_target: Optional[Tensor] = None,
        argmax_out: Optional[Tensor] = None,
    ) -> None:
        """Fill ``out`` (``(6, rows)``, or ``(8, rows)`` with ``local_mix_target``) with this
        shard's per-row statistics, and ``argmax_out`` with its local arg-max."""
        ...

    def shard_grad(
        self,
        logits: Tensor,
        local_target: Tensor,
        weight: Optional[Tensor],
        coefs: Tensor,
        grad_logits: Tensor,
        *,
        softcap: float = 0.0,
        local_mix_target: Optional[Tensor] = None,
    ) -> None:
        """Write this shard's gradient from the all-reduced per-row ``coefs`` into
        ``grad_logits``."""
        ...
