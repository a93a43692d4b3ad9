"""Building blocks of the fused classifier + loss's chunk loop, shared by the local
(:mod:`lsr_fused.linear`) and the vocabulary-parallel (:mod:`lsr_fused.linear_distributed`) heads:
the logits of a chunk by one matmul into a reused buffer, and the float32 accumulation of the weight
gradient for half-precision weights.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["accumulate_weight_grad", "chunk_bounds", "logits_into"]


def chunk_bounds(rows: int, chunk: int):
    """``(start, stop)`` of each chunk of ``chunk`` rows out of ``rows``."""
    for start in range(0, rows, chunk):
        yield start, min(rows, start + chunk)


def logits_into(buffer: Tensor, h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``h @ weight^T (+ bias)`` written into the first ``len(h)`` rows of ``buffer``."""
    out = buffer[: h.shape[0]]
    if bias is None:
        torch.mm(h, weight.t(), out=out)
    else:
        torch.addmm(bias, h, weight.t(), out=out)
    return out


def accumulate_weight_grad(acc: Tensor, grad_logits: Tensor, h: Tensor) -> None:
    """``acc += grad_logits^T @ h``, accumulated in ``acc``'s dtype."""
    if acc.dtype == grad_logits.dtype:
        acc.addmm_(grad_logits.t(), h)
    elif acc.device.type == "cuda":
        # cuBLAS multiplies half operands into the float32 accumulator directly.
        torch.ops.aten.addmm.dtype_out(acc, grad_logits.t(), h, acc.dtype, out=acc)
    else:
        # The CPU has no mixed-dtype matmul: multiply in the accumulator's dtype.
        acc.addmm_(grad_logits.t().to(acc.dtype), h.to(acc.dtype))
