"""``LabelSmoothingCE``: the ``nn.Module`` form of :func:`label_smoothing_cross_entropy`."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .functional import LOSS_DOC, check_options, label_smoothing_cross_entropy


class LabelSmoothingCE(nn.Module):
    def __init__(
        self,
        label_smoothing: float = 0.1,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        weight: Optional[Tensor] = None,
        spread: str = "all",
        z_loss: float = 0.0,
        inplace_backward: bool = False,
        backend: str = "auto",
        process_group: Optional[object] = None,
    ) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.spread = spread
        self.z_loss = z_loss
        self.inplace_backward = inplace_backward
        self.backend = backend
        self.process_group = process_group
        # A buffer, like nn.CrossEntropyLoss's, so .to(device) and state_dict carry the weights.
        self.register_buffer("weight", weight)
        check_options(label_smoothing, ignore_index, reduction, spread, z_loss, backend)
        if weight is not None and (not isinstance(weight, Tensor) or weight.dim() != 1):
            raise ValueError("weight must be a 1-D tensor with one entry per class, or None")

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return label_smoothing_cross_entropy(
            logits,
            target,
            self.label_smoothing,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            weight=self.weight,
            spread=self.spread,
            z_loss=self.z_loss,
            inplace_backward=self.inplace_backward,
            backend=self.backend,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        return (
            f"label_smoothing={self.label_smoothing}, reduction={self.reduction!r}, "
            f"spread={self.spread!r}, z_loss={self.z_loss}, ignore_index={self.ignore_index}, "
            f"inplace_backward={self.inplace_backward}, backend={self.backend!r}"
        )


LabelSmoothingCE.__doc__ = (
    "Label-smoothed cross-entropy loss module; ``forward(logits, target)``.\n" + LOSS_DOC
)
