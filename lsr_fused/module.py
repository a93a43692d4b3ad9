"""``LabelSmoothingCE`` and ``LinearLabelSmoothingCE``: the ``nn.Module`` forms of
:func:`label_smoothing_cross_entropy` and :func:`linear_label_smoothing_cross_entropy`."""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

from torch import Tensor, nn
from typing_extensions import Unpack

from ._docs import extends_doc
from .errors import ArgumentValueError
from .functional import LOSS_DOC, label_smoothing_cross_entropy, loss_with_options
from .linear import LINEAR_DOC, head_with_options, linear_label_smoothing_cross_entropy
from .options import (
    HEAD_KEYWORDS,
    LOSS_KEYWORDS,
    HeadKeywords,
    LossKeywords,
    LossOptions,
    option_fields,
    shows_option_keywords,
)
from .policy import check_chunk_size, check_reduce_hidden_grad
from .stats import LossStats


def _option_property(name: str) -> property:
    """A module attribute backed by its :class:`LossOptions` field: setting it re-checks."""

    def get(module):
        return getattr(module.options, name)

    def set_(module, value):
        module.options = module.options.replace(**{name: value})

    return property(get, set_, doc=f"The ``{name}`` option (see :class:`LossOptions`).")


class _WithLossOptions(nn.Module):
    """A module whose loss options are one :class:`LossOptions` (``self.options``): its
    constructor's ``**options`` (those in ``OPTION_KEYWORDS``), each also an attribute that
    re-checks on assignment."""

    OPTION_KEYWORDS: frozenset[str]
    options: LossOptions

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "OPTION_KEYWORDS" not in cls.__dict__:
            return  # a user's subclass: its attributes and signature are its own
        for name in ("label_smoothing", *sorted(cls.OPTION_KEYWORDS)):
            setattr(cls, name, _option_property(name))
        shows_option_keywords(cls.OPTION_KEYWORDS)(cls.__init__)

    def _set_options(self, label_smoothing, keywords: dict) -> None:
        fields = option_fields(label_smoothing, keywords, type(self).__name__, self.OPTION_KEYWORDS)
        self.options = LossOptions(*fields)


@extends_doc(LOSS_DOC)
class LabelSmoothingCE(_WithLossOptions):
    """Label-smoothed cross-entropy loss module;
    ``forward(logits, target, mix_target=None, mix_lambda=1.0)``. Its options are one
    :class:`lsr_fused.LossOptions` (``module.options``), checked here; each is also an attribute
    (``module.label_smoothing = 0.2`` re-checks)."""

    OPTION_KEYWORDS = LOSS_KEYWORDS

    def __init__(
        self, label_smoothing: float = 0.1, *, weight: Optional[Tensor] = None,
        process_group: Optional[object] = None, **options: Unpack[LossKeywords],
    ) -> None:  # fmt: skip
        super().__init__()
        self._set_options(label_smoothing, options)
        self.process_group = process_group
        # A buffer, like nn.CrossEntropyLoss's, so .to(device) and state_dict carry the weights.
        self.register_buffer("weight", weight)
        if weight is not None and (not isinstance(weight, Tensor) or weight.dim() != 1):
            raise ArgumentValueError(
                "weight must be a 1-D tensor with one entry per class, or None"
            )

    def forward(
        self,
        logits: Tensor,
        target: Tensor,
        mix_target: Optional[Tensor] = None,
        mix_lambda: Union[float, Tensor] = 1.0,
    ) -> Union[Tensor, tuple[Tensor, LossStats]]:
        if self.process_group is None:
            return loss_with_options(
                logits, target, self.options, self.weight, mix_target, mix_lambda
            )
        return label_smoothing_cross_entropy(
            logits, target, weight=self.weight, mix_target=mix_target, mix_lambda=mix_lambda,
            process_group=self.process_group, **self.options.keywords(),
        )  # fmt: skip

    def extra_repr(self) -> str:
        shown = ", ".join(
            f"{f.name}={getattr(self.options, f.name)!r}" for f in dataclasses.fields(LossOptions)
        )
        return shown + ("" if self.process_group is None else ", sharded")


@extends_doc(LINEAR_DOC)
class LinearLabelSmoothingCE(_WithLossOptions):
    """Fused classifier + label-smoothed cross-entropy module:
    ``forward(hidden, weight, target, bias=None, mix_target=None, mix_lambda=1.0)``, e.g. with an
    ``nn.Linear`` head ``lm_head``: ``criterion(hidden, lm_head.weight, target,
    bias=lm_head.bias)``.

    The constructor takes every keyword of :func:`linear_label_smoothing_cross_entropy` except
    ``bias``, ``mix_target`` and ``mix_lambda`` (``forward``'s optional arguments); its loss
    options are one :class:`lsr_fused.LossOptions` (``module.options``); ``class_weight`` is kept
    as a buffer (moved by ``.to()``, saved in ``state_dict``).
    With ``process_group=pg`` (a tensor-parallel head) ``weight``, ``bias`` and ``class_weight``
    are this rank's slice of the classes.
    """

    OPTION_KEYWORDS = HEAD_KEYWORDS

    def __init__(
        self, label_smoothing: float = 0.1, *, class_weight: Optional[Tensor] = None,
        chunk_size: Optional[int] = None, process_group: Optional[object] = None,
        reduce_hidden_grad: bool = True, **options: Unpack[HeadKeywords],
    ) -> None:  # fmt: skip
        super().__init__()
        self._set_options(label_smoothing, options)
        check_reduce_hidden_grad(reduce_hidden_grad)
        check_chunk_size(chunk_size)
        if class_weight is not None and (
            not isinstance(class_weight, Tensor) or class_weight.dim() != 1
        ):
            raise ArgumentValueError(
                "class_weight must be a 1-D tensor with one entry per class, or None"
            )
        self.chunk_size = chunk_size
        self.process_group = process_group
        self.reduce_hidden_grad = reduce_hidden_grad
        self.register_buffer("class_weight", class_weight)

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        target: Tensor,
        bias: Optional[Tensor] = None,
        mix_target: Optional[Tensor] = None,
        mix_lambda: Union[float, Tensor] = 1.0,
    ) -> Union[Tensor, tuple[Tensor, LossStats]]:
        if self.process_group is None:
            mix = (mix_target, mix_lambda)
            return head_with_options(hidden, weight, target, self.options, bias,
                                     self.class_weight, mix, self.chunk_size)  # fmt: skip
        return linear_label_smoothing_cross_entropy(
            hidden, weight, target, bias=bias, class_weight=self.class_weight,
            mix_target=mix_target, mix_lambda=mix_lambda, chunk_size=self.chunk_size,
            process_group=self.process_group, reduce_hidden_grad=self.reduce_hidden_grad,
            **self.options.keywords(HEAD_KEYWORDS),
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"label_smoothing={self.label_smoothing}, reduction={self.reduction!r}, "
            f"spread={self.spread!r}, z_loss={self.z_loss}, ignore_index={self.ignore_index}, "
            f"chunk_size={self.chunk_size}, backend={self.backend!r}"
            + ("" if self.process_group is None else
               f", sharded, reduce_hidden_grad={self.reduce_hidden_grad}")
        )  # fmt: skip
