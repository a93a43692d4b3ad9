"""FSDP2: a classifier weight (and bias) sharded by ``fully_shard`` is a ``DTensor`` outside the
forward of the module that owns it, which is where LM training loops call the fused head
(``loss_fn(model(x), model.lm_head.weight, labels)``). The custom ops take plain tensors, so
such parameters are gathered here first.

``DTensor.full_tensor(grad_placements=[Partial("avg")] * mesh.ndim)`` all-gathers the shards
(differentiably) and declares the gradient that comes back to be a per-rank partial result to
be *averaged*: autograd's backward of the gather is then a reduce-scatter with averaging over
the mesh, which is what FSDP does with the gradients of the parameters it unshards itself
(each rank's loss is the mean over its own batch). Where every rank computes the same loss
(replicated data) the average is that common gradient, so the rule holds there too.
"""

from __future__ import annotations

import sys
from typing import Optional

from torch import Tensor


def _dtensor_module():
    # A DTensor cannot exist unless torch.distributed.tensor was imported, so the common case
    # (no DTensor anywhere) costs one dict lookup and never imports torch.distributed.
    return sys.modules.get("torch.distributed.tensor")


def _gathered(t: Optional[Tensor], module) -> Optional[Tensor]:
    if t is None or not isinstance(t, module.DTensor):
        return t
    partial_avg = [module.Partial("avg")] * t.device_mesh.ndim
    return t.full_tensor(grad_placements=partial_avg)


def gather_sharded_parameters(
    weight: Tensor, bias: Optional[Tensor], process_group: Optional[object]
) -> tuple[Tensor, Optional[Tensor]]:
    """``(weight, bias)`` as plain tensors: each ``DTensor`` is all-gathered (its gradient
    reduce-scattered with averaging in backward); plain tensors are returned as they are."""
    module = _dtensor_module()
    if module is None:
        return weight, bias
    if not any(isinstance(t, module.DTensor) for t in (weight, bias)):
        return weight, bias
    if process_group is not None:
        raise ValueError(
            "weight/bias are DTensors and process_group is given: pass either this rank's plain "
            "slice of the classes with process_group=, or the DTensor parameters without it"
        )
    return _gathered(weight, module), _gathered(bias, module)
