"""The C++ route of a plain eager CPU loss call: ``lsr_fused_C::train_step`` (csrc/train_step.cpp).

At the shapes of image classification (10 or 1000 classes, a few hundred rows) a training step
costs tens of microseconds, and what decides is the Python around the kernels: the checks, the row
view, the mean denominator, an ``autograd.Function`` and its Python backward. ``train_step`` does
all of it in C++ (its autograd node included), with the same kernels and the same ATen reductions
in the same order as the Python route, so the two give the same bits (``tests/test_fast_step.py``
compares them). A call takes it only when that equivalence is plain:

* options: ``reduction`` ``"mean"`` or ``"sum"``, no softcap, no statistics, not in place, backend
  ``"auto"`` or ``"cpp"`` (with the C++ extension loaded);
* tensors: plain CPU ``(N, C)`` logits with ``C >= 2`` of a supported dtype, a contiguous ``(N,)``
  int64 target, no class weights, no mixed target. (The op takes class weights that need no
  gradient, and ``test_fast_step.py`` holds them to the Python route's bits by calling it
  directly; calls keep them on the Python route, whose own tests watch weighted calls reach its
  kernels.)
* context: eager (not compiling), no ``torch.func`` transform, no ``TorchDispatchMode`` and no
  forward-mode AD level active (they see the op route's ops, or the composite, as before).

Everything else, and every error, goes through the Python route. A double backward
(``create_graph=True``) is the composite gradient of :mod:`lsr_fused.composite`, which the C++ node
calls through ``lsr_fused::composite_logits_grad`` (registered in :mod:`lsr_fused.ops`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import composite, policy
from ._validation import check_targets
from .options import LossOptions

_PLAIN_LOGITS = (Tensor, torch.nn.Parameter)
_LOGITS_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_REDUCTIONS = ("mean", "sum")
_BACKENDS = ("auto", "cpp")
_state: dict = {}


def _train_step_op():
    """``lsr_fused_C::train_step`` when the C++ extension is loaded and has it, else None (looked
    up once: this is on every call's path)."""
    if "op" not in _state:
        op = None
        if policy.resolve_backend("auto", torch.device("cpu")) == "cpp":
            packet = getattr(torch.ops.lsr_fused_C, "train_step", None)
            op = None if packet is None else packet.default
        _state["op"] = op
    return _state["op"]


def _plain_options(options: LossOptions) -> bool:
    return (
        options.reduction in _REDUCTIONS
        and options.softcap is None
        and not options.return_stats
        and not options.inplace_backward
        and options.backend in _BACKENDS
    )


def _plain_tensors(logits: Tensor, target: Tensor) -> bool:
    return (
        type(logits) in _PLAIN_LOGITS
        and type(target) is Tensor
        and logits.layout == torch.strided
        and target.layout == torch.strided
        and logits.is_cpu
        and target.is_cpu
        and logits.ndim == 2
        and target.ndim == 1
        and target.dtype == torch.int64
        and logits.dtype in _LOGITS_DTYPES
        and logits.shape[1] >= 2
        and logits.shape[0] == target.shape[0]
        and target.is_contiguous()
    )


def _eager_context() -> bool:
    return (
        not torch.compiler.is_compiling()
        and torch._C._functorch.peek_interpreter_stack() is None
        and torch._C._len_torch_dispatch_stack() == 0
        and not composite.forward_ad_active()
    )


def train_step(
    logits: Tensor, target: Tensor, options: LossOptions, weight, mix_target, mix_lambda
) -> Optional[Tensor]:
    """The reduced loss through ``lsr_fused_C::train_step`` when this call may take it (see the
    module docstring), else None (the caller takes the Python route)."""
    if not (
        _plain_options(options)
        and _plain_tensors(logits, target)
        and weight is None
        and mix_target is None
        and type(mix_lambda) in (float, int)
        and mix_lambda == 1
        and _eager_context()
    ):
        return None
    op = _train_step_op()
    if op is None:
        return None
    params = options.row_params(logits.shape[1])
    try:
        return op(
            logits, target, weight, params.target_extra, params.other_mass, params.z_loss,
            params.ignore_index, options.reduction == "mean",
        )  # fmt: skip
    except ValueError:
        # The kernel reads the targets anyway and refuses a bad one; the error that names it (a
        # TargetIndexError, as on the Python route) comes from the same check as there.
        check_targets(target, logits.shape[1], params.ignore_index)
        raise
