"""Every param group's lr, read and written as one float64 vector.

The schedulers compute all lrs in one tensor expression (float64, on the CPU for float lrs, on the
lrs' device for tensor lrs) and hand the result to :class:`LrStorage`, which stores it in the form
the optimizer holds:

* **Float lrs**: one ``tolist()`` and a dict store per group (the floor of any per-group write).
  When the lrs are a vector times one Python float (every group shares one warmup setting),
  :meth:`LrStorage.write_scaled` multiplies as it stores, with no tensor op at all, and with one
  product in all when the vector's entries are equal too. ``b * f`` rounds the same in Python as
  in a float64 tensor, so both paths store identical values.
* **Tensor lrs** (fused and ``capturable=True`` optimizers): written in place into the very tensors
  the optimizer holds (same objects, same storage) with one copy into an lr-dtype staging vector
  and one multi-tensor copy from views of it, with no ``.item()`` and no host-device
  synchronisation. A CUDA-graph-captured optimizer step therefore follows the lr between replays.

All groups must hold the same kind of lr (all Python numbers, or all tensors on one device); groups
may share one lr tensor (optimizer defaults do) only if they are always given the same value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer


def lr_kind(groups: Sequence[dict[str, Any]]) -> tuple[bool, torch.device]:
    """Whether the lrs are tensors, and the device the per-group vectors live on."""
    lrs = [g["lr"] for g in groups]
    tensors = [lr for lr in lrs if isinstance(lr, Tensor)]
    if not tensors:
        return False, torch.device("cpu")
    devices = {lr.device for lr in tensors}
    if len(tensors) != len(lrs) or len(devices) != 1:
        raise ValueError(
            "lr of the param groups must be all Python numbers or all tensors on one device, "
            f"got {len(tensors)} tensors (devices {sorted(map(str, devices))}) among "
            f"{len(lrs)} groups"
        )
    return True, devices.pop()


class LrStorage:
    """Reads and writes the lrs of an optimizer's param groups as one float64 vector."""

    def __init__(self, optimizer: Optimizer) -> None:
        # The optimizer, not its param_groups list: Optimizer.load_state_dict replaces that list
        # (and tensor lrs with the loaded ones), so both are looked up on every access.
        self._optimizer = optimizer
        self.tensor_lrs, self.device = lr_kind(optimizer.param_groups)
        self._stage: Tensor | None = None  # lr-dtype copy of the values written to tensor lrs
        self._stage_views: list[Tensor] = []
        # write_scaled's Python floats of the last vector it was given. The schedulers replace
        # their vectors instead of modifying them in place, so the vector's identity is the key.
        self._scaled_vector: Tensor | None = None
        self._scaled_values: list[float] = []
        self._scaled_common: float | None = None

    def vector(self, values: Sequence[float | Tensor]) -> Tensor:
        """A float64 vector on the storage device (syncs only for mixed inputs, never in write)."""
        if values and all(isinstance(v, Tensor) for v in values):
            return torch.stack(
                [v.detach().reshape(()).to(self.device, torch.float64) for v in values]  # type: ignore[union-attr]
            )
        return torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)

    def read(self) -> Tensor:
        """The lrs the optimizer holds, as a float64 vector (no sync for tensor lrs)."""
        return self.vector([g["lr"] for g in self._optimizer.param_groups])

    def current(self) -> list[float | Tensor]:
        """The lrs the optimizer holds, tensor lrs as detached clones (never aliasing them)."""
        return [
            g["lr"].detach().clone() if isinstance(g["lr"], Tensor) else g["lr"]
            for g in self._optimizer.param_groups
        ]

    def write(self, lrs: Tensor) -> None:
        """Store one float64 lr per group into the optimizer; tensor lrs in place, no sync."""
        groups = self._optimizer.param_groups
        if not self.tensor_lrs:
            for group, lr in zip(groups, lrs.tolist(), strict=True):
                group["lr"] = lr
            return
        targets = [g["lr"] for g in groups]
        stage = self._stage
        if stage is None or stage.numel() != len(targets) or stage.dtype != targets[0].dtype:
            # Views made once: unbind() on every write would cost a Python object per group.
            stage = self._stage = torch.empty_like(lrs, dtype=targets[0].dtype)
            self._stage_views = list(stage.unbind(0))
        stage.copy_(lrs)
        # torch has no public multi-tensor copy; this is the op its own optimizers use, and one
        # launch for all groups instead of one copy_ per group.
        torch._foreach_copy_(targets, self._stage_views)

    def write_scaled(self, lrs: Tensor, factor: float) -> None:
        """Store ``lrs * factor``. ``lrs`` must not be modified in place after this call."""
        if self.tensor_lrs:
            self.write(torch.mul(lrs, factor))
            return
        if lrs is not self._scaled_vector:
            values = lrs.tolist()
            self._scaled_vector, self._scaled_values = lrs, values
            equal = bool(values) and all(v == values[0] for v in values)
            self._scaled_common = values[0] if equal else None
        groups = self._optimizer.param_groups
        common = self._scaled_common
        if common is not None:
            lr = common * factor
            for group in groups:
                group["lr"] = lr
            return
        for group, value in zip(groups, self._scaled_values, strict=True):
            group["lr"] = value * factor

    def check_added(self, lr: float | Tensor) -> None:
        """Refuse a group added later whose lr is not of the kind the other groups hold."""
        if isinstance(lr, Tensor) != self.tensor_lrs or (
            isinstance(lr, Tensor) and lr.device != self.device
        ):
            raise RuntimeError(
                "a param group was added whose lr is not of the same kind (float, or tensor "
                "on the same device) as the other groups'"
            )

    def check_shared_tensors(self, settings: Sequence[object]) -> None:
        """Groups that share one lr tensor must have equal ``settings`` (so get equal values)."""
        if not self.tensor_lrs:
            return
        first_user: dict[int, int] = {}
        for i, group in enumerate(self._optimizer.param_groups):
            j = first_user.setdefault(id(group["lr"]), i)
            if settings[i] != settings[j]:
                raise ValueError(
                    f"lr: param groups {j} and {i} share one lr tensor but have different warmup "
                    "settings; give each group its own lr tensor"
                )
