"""lsr_fused: fused label-smoothed cross-entropy and learning-rate warmup for PyTorch.

Public API:

* :func:`label_smoothing_cross_entropy` and :class:`LabelSmoothingCE`: log-softmax fused with the
  label-smoothed cross-entropy (Triton on CUDA, a C++ extension or pure PyTorch on the CPU).
* :func:`linear_label_smoothing_cross_entropy` and :class:`LinearLabelSmoothingCE`: the classifier
  matmul fused with that loss, chunk by chunk, so that the ``(N, C)`` logits never exist.
* :func:`linear_cross_entropy`: the same with the signature of torch 2.13's
  ``F.linear_cross_entropy`` (a drop-in that keeps label smoothing on the fused path).
* :class:`LossOptions`: the loss's options as one checked, frozen object (``module.options``);
  :class:`LossStats`: what ``return_stats=True`` returns beside the loss.
* :func:`set_validation`: opt-in host-side target checks for CUDA tensors.
* :func:`set_gradient_pool`, :func:`trim_gradient_pool`, :func:`gradient_pool_stats`: the bounded
  pool of CPU gradient buffers the C++ backend reuses across training steps.
* :class:`WarmupScheduler`, :class:`GradualWarmupScheduler`, :func:`linear_scaled_lr`: warmup
  and the linear scaling rule.
* :class:`BatchMixer` (module :mod:`lsr_fused.mixup`): mixup and CutMix of a batch, returning the
  partner targets and ``lam`` the loss takes as ``mix_target=`` and ``mix_lambda=``.
"""

from ._validation import set_validation
from .backends.cpp_backend import gradient_pool_stats, set_gradient_pool, trim_gradient_pool
from .functional import available_backends, label_smoothing_cross_entropy
from .linear import linear_label_smoothing_cross_entropy
from .linear_compat import linear_cross_entropy
from .mixup import BatchMixer, MixedBatch
from .module import LabelSmoothingCE, LinearLabelSmoothingCE
from .options import LossOptions
from .scheduler import GradualWarmupScheduler, WarmupScheduler, linear_scaled_lr
from .stats import LossStats

__version__ = "0.1.0"

__all__ = [
    "BatchMixer",
    "GradualWarmupScheduler",
    "LabelSmoothingCE",
    "LinearLabelSmoothingCE",
    "LossOptions",
    "LossStats",
    "MixedBatch",
    "WarmupScheduler",
    "available_backends",
    "gradient_pool_stats",
    "label_smoothing_cross_entropy",
    "linear_cross_entropy",
    "linear_label_smoothing_cross_entropy",
    "linear_scaled_lr",
    "mixup",
    "set_gradient_pool",
    "set_validation",
    "trim_gradient_pool",
]
