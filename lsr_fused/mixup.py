"""Mixup and CutMix of a batch, in the form the loss takes: ``mix_target=`` and ``mix_lambda=``.

* mixup (Zhang et al., ICLR 2018): ``lam ~ Beta(alpha, alpha)`` and the image
  ``lam * x_i + (1 - lam) * x_j``.
* CutMix (Yun et al., ICCV 2019): ``lam ~ Beta(alpha, alpha)``; a box of area ``(1 - lam) * H * W``
  and the image's aspect ratio, centred on a uniformly drawn pixel and clipped to the image, is
  filled with the partner's pixels; ``lam`` is then the fraction of the image outside the box as
  clipped.

Either way the training target is ``lam * y_i + (1 - lam) * y_j``. No soft-target tensor is built:
the loss receives ``target = y_i``, ``mix_target = y_j`` and ``mix_lambda = lam``. Label smoothing
commutes with this mixing (both are affine in the one-hot target), so smoothing the mixed target
and mixing the smoothed targets give the same distribution.

Every random number is drawn on the host from a CPU ``torch.Generator``; the device only receives
the drawn numbers, so a call never waits for the device.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

__all__ = ["BatchMixer", "MixedBatch", "sample_beta"]

MODES = ("batch", "pair", "elem")
_TARGET_DTYPES = (torch.int64, torch.int32)


class MixedBatch(NamedTuple):
    """What :class:`BatchMixer` returns; unpacks as ``images, target, mix_target, lam``."""

    images: Tensor
    target: Tensor
    mix_target: Tensor
    lam: Union[float, Tensor]


class _Draws(NamedTuple):
    """Host samples for ``n`` units (the batch, its pairs, or its elements), all CPU tensors."""

    lam: Tensor  # float64 (n,): 1 where the unit is left unmixed
    mixup: Tensor  # bool (n,): mixed by mixup
    cutmix: Tensor  # bool (n,): mixed by CutMix
    boxes: Tensor  # int64 (n, 4): top, bottom, left, right (half-open); empty unless cutmix


def _is_real(value: object) -> bool:
    # bool is a Real, but prob=True is a mistake, not 1.0.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_alpha(name: str, value: object) -> float:
    if not _is_real(value) or not 0.0 <= float(value) < math.inf:  # type: ignore[arg-type]
        raise ValueError(f"{name} must be a finite number >= 0 (0 turns it off), got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _check_probability(name: str, value: object) -> float:
    if not _is_real(value) or not 0.0 <= float(value) <= 1.0:  # type: ignore[arg-type]
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _log_gamma(shape: float, count: int, generator: Optional[torch.Generator]) -> Tensor:
    """``log`` of ``count`` Gamma(shape, 1) samples, float64 on the CPU.

    Marsaglia and Tsang's (2000) squeeze-free rejection method draws Gamma(shape + 1), whose shape
    is >= 1 as the method needs; Gamma(shape) = Gamma(shape + 1) * U ** (1 / shape) then lowers
    the shape. Working in logs keeps small shapes (alpha = 0.01) from underflowing to 0.
    """
    d = shape + 1.0 - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    log_sample = torch.empty(count, dtype=torch.float64)
    pending = torch.arange(count)
    while pending.numel():  # each round accepts more than 95% of the candidates
        normal = torch.randn(pending.numel(), generator=generator, dtype=torch.float64)
        uniform = 1.0 - torch.rand(pending.numel(), generator=generator, dtype=torch.float64)
        v = (1.0 + c * normal) ** 3
        log_v = v.clamp_min(torch.finfo(torch.float64).tiny).log()
        accept = (v > 0) & (uniform.log() < 0.5 * normal**2 + d - d * v + d * log_v)
        log_sample[pending[accept]] = math.log(d) + log_v[accept]
        pending = pending[~accept]
    uniform = 1.0 - torch.rand(count, generator=generator, dtype=torch.float64)  # in (0, 1]
    return log_sample + uniform.log() / shape


def sample_beta(alpha: float, count: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """``count`` samples of Beta(alpha, alpha), float64 on the CPU, drawn from ``generator``.

    ``X / (X + Y)`` for independent ``X, Y ~ Gamma(alpha)``, computed as
    ``sigmoid(log X - log Y)`` so that it stays finite when both are tiny.
    """
    alpha = _check_alpha("alpha", alpha)
    if alpha == 0.0:
        raise ValueError("alpha must be > 0 for a Beta(alpha, alpha) sample")
    log_x = _log_gamma(alpha, count, generator)
    return torch.sigmoid(log_x - _log_gamma(alpha, count, generator))


def _cutmix_boxes(lam: Tensor, height: int, width: int, generator) -> tuple[Tensor, Tensor]:
    """Boxes (top, bottom, left, right; half-open, int64 ``(n, 4)``) of side ``sqrt(1 - lam)``
    times the image's, at uniformly drawn centre pixels, clipped; and the fraction of the image
    each box covers (float64 ``(n,)``)."""
    side = (1.0 - lam).clamp_min(0.0).sqrt()
    box_h = (side * height).round().long()
    box_w = (side * width).round().long()
    centre_y = torch.randint(0, height, lam.shape, generator=generator)
    centre_x = torch.randint(0, width, lam.shape, generator=generator)
    top = (centre_y - box_h // 2).clamp(0, height)
    bottom = (centre_y - box_h // 2 + box_h).clamp(0, height)
    left = (centre_x - box_w // 2).clamp(0, width)
    right = (centre_x - box_w // 2 + box_w).clamp(0, width)
    covered = ((bottom - top) * (right - left)).double() / (height * width)
    return torch.stack([top, bottom, left, right], dim=1), covered


def _blend(images: Tensor, partner: Tensor, weight: Union[float, Tensor]) -> Tensor:
    """``weight * images + (1 - weight) * partner`` computed in float32 (float64 for float64
    images) and rounded once to the images' dtype."""
    compute = torch.float64 if images.dtype == torch.float64 else torch.float32
    if isinstance(weight, Tensor):
        weight = weight.to(compute).view(-1, *([1] * (images.dim() - 1)))
    mixed = torch.lerp(partner.to(compute), images.to(compute), weight)
    return mixed.to(images.dtype)


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    """A CPU tensor copied to ``device`` without waiting for the device: from pinned memory,
    non-blocking (a plain ``.to("cuda")`` from pageable memory synchronizes the stream). The
    caching host allocator keeps the pinned buffer until the copy has run."""
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def _box_mask(boxes: Tensor, height: int, width: int) -> Tensor:
    """Bool ``(n, 1, height, width)`` on the boxes' device: True inside each element's box."""
    device = boxes.device
    top, bottom, left, right = boxes.unbind(1)
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    in_rows = (rows >= top[:, None]) & (rows < bottom[:, None])
    in_cols = (cols >= left[:, None]) & (cols < right[:, None])
    return (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)


class BatchMixer:
    """Mixup / CutMix of a batch: ``images, target, mix_target, lam = mixer(images, target)``.

    Each element ``i`` is mixed with its partner ``j = N - 1 - i`` (``images.flip(0)``): the
    loader already shuffles, so the mirror pairing needs no random permutation, and pairs
    ``(i, N - 1 - i)`` mix with each other both ways. The middle element of an odd batch is its own
    partner, so its image is unchanged and its loss is that of its own target whatever ``lam``.
    With probability ``prob`` a unit (see ``mode``) is mixed, otherwise it keeps ``lam = 1``. A
    mixed unit uses CutMix with probability ``switch_prob`` when both alphas are > 0, else the one
    method whose alpha is > 0.

    Pass the result to the loss as
    ``label_smoothing_cross_entropy(logits, target, eps, mix_target=mix_target, mix_lambda=lam)``,
    which is ``lam * LS(logits, target) + (1 - lam) * LS(logits, mix_target)`` per element.

    Args:
        mixup_alpha: ``alpha`` of mixup's Beta(alpha, alpha), ``>= 0``; 0 turns mixup off.
        cutmix_alpha: ``alpha`` of CutMix's Beta(alpha, alpha), ``>= 0``; 0 turns CutMix off.
            At least one alpha must be > 0 (``prob=0`` turns mixing off).
        prob: probability that a unit is mixed, in ``[0, 1]``.
        switch_prob: probability of CutMix rather than mixup when both alphas are > 0.
        mode: the unit that shares one ``lam`` (and one box): ``"batch"`` (the whole batch),
            ``"pair"`` (each pair ``(i, N - 1 - i)``; needs an even ``N``) or ``"elem"`` (each
            element on its own).
        generator: a CPU ``torch.Generator`` every sample is drawn from (None: torch's default
            CPU generator, seeded by ``torch.manual_seed``). The same seed gives the same output.
        correct_lam: CutMix's ``lam`` is the fraction of the image outside the box as clipped and
            rounded to whole pixels (the paper's definition). False keeps the drawn ``lam``, which
            then overstates the image's own share whenever the box was clipped.

    Call with ``images`` of shape ``(N, ...)`` (``(N, C, H, W)`` when ``cutmix_alpha > 0``), any
    floating dtype and device, any strides, and ``target`` of shape ``(N,)``, int64 or int32, on
    the same device. Returns a :class:`MixedBatch`:

    * ``images``: a new tensor of the input's shape and dtype (``images`` itself is not modified).
      mixup is computed in float32 (float64 for float64 images) and rounded once; CutMix copies
      pixels exactly; unmixed elements are exact copies.
    * ``target``: the ``target`` passed in (the same tensor).
    * ``mix_target``: ``target.flip(0)``, each element's partner's target.
    * ``lam``: mode ``"batch"``: a Python float; ``"pair"`` / ``"elem"``: float32 ``(N,)`` on the
      target's device (the mixup weights are this float32 value).

    Targets equal to the loss's ``ignore_index`` are not meaningful partners: drop those elements
    before mixing.
    """

    def __init__(
        self,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        mode: str = "batch",
        generator: Optional[torch.Generator] = None,
        correct_lam: bool = True,
    ) -> None:
        self.mixup_alpha = _check_alpha("mixup_alpha", mixup_alpha)
        self.cutmix_alpha = _check_alpha("cutmix_alpha", cutmix_alpha)
        if self.mixup_alpha == 0.0 and self.cutmix_alpha == 0.0:
            raise ValueError(
                "mixup_alpha and cutmix_alpha are both 0: at least one must be > 0 "
                "(to turn mixing off, pass prob=0)"
            )
        self.prob = _check_probability("prob", prob)
        self.switch_prob = _check_probability("switch_prob", switch_prob)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        if generator is not None and (
            not isinstance(generator, torch.Generator) or generator.device.type != "cpu"
        ):
            raise TypeError(f"generator must be None or a CPU torch.Generator, got {generator!r}")
        self.generator = generator
        if not isinstance(correct_lam, bool):
            raise TypeError(f"correct_lam must be a bool, got {correct_lam!r}")
        self.correct_lam = correct_lam

    def __repr__(self) -> str:
        return (
            f"BatchMixer(mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}, "
            f"prob={self.prob}, switch_prob={self.switch_prob}, mode={self.mode!r}, "
            f"correct_lam={self.correct_lam})"
        )

    def __call__(self, images: Tensor, target: Tensor) -> MixedBatch:
        """Mix ``images`` (``(N, ...)``) with their mirror partners; see the class docstring."""
        self._check_batch(images, target)
        size = tuple(images.shape[-2:]) if self.cutmix_alpha > 0 else (1, 1)
        mix_target = target.flip(0)
        if self.mode == "batch":
            draws = self._sample(1, size)
            return MixedBatch(
                self._mix_batch(images, draws), target, mix_target, float(draws.lam[0])
            )
        num = images.shape[0]
        if self.mode == "pair":
            half = self._sample(num // 2, size)
            draws = _Draws(*(torch.cat([t, t.flip(0)]) for t in half))
        else:
            draws = self._sample(num, size)
        # float32: what the loss receives is also what weights the images
        lam = _to_device(draws.lam.float(), target.device)
        return MixedBatch(self._mix_elements(images, draws, lam), target, mix_target, lam)

    def _sample(self, count: int, size: tuple[int, int] = (1, 1)) -> _Draws:
        """Draw ``count`` units' mixing on the host: whether each is mixed, by which method, its
        ``lam`` and its CutMix box in an image of ``size = (H, W)``."""
        generator = self.generator
        mixed = torch.rand(count, generator=generator, dtype=torch.float64) < self.prob
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            draw = torch.rand(count, generator=generator, dtype=torch.float64)
            cutmix = mixed & (draw < self.switch_prob)
        else:
            cutmix = mixed & (self.cutmix_alpha > 0)
        mixup = mixed & ~cutmix
        ones = torch.ones(count, dtype=torch.float64)
        lam_mixup = sample_beta(self.mixup_alpha, count, generator) if self.mixup_alpha else ones
        lam_cutmix = ones
        boxes = torch.zeros(count, 4, dtype=torch.int64)
        if self.cutmix_alpha > 0:
            lam_cutmix = sample_beta(self.cutmix_alpha, count, generator)
            drawn_boxes, covered = _cutmix_boxes(lam_cutmix, *size, generator)
            boxes = torch.where(cutmix[:, None], drawn_boxes, boxes)
            if self.correct_lam:
                lam_cutmix = 1.0 - covered
        lam = torch.where(cutmix, lam_cutmix, torch.where(mixup, lam_mixup, ones))
        return _Draws(lam, mixup, cutmix, boxes)

    def _check_batch(self, images: Tensor, target: Tensor) -> None:
        if not isinstance(images, Tensor) or not images.is_floating_point():
            what = images.dtype if isinstance(images, Tensor) else type(images).__name__
            raise TypeError(f"images must be a floating-point tensor, got {what}")
        if images.dim() == 0:
            raise ValueError("images must have a batch dimension, got a 0-d tensor")
        if self.cutmix_alpha > 0 and (images.dim() != 4 or 0 in images.shape[-2:]):
            raise ValueError(
                "images must be (N, C, H, W) with H, W >= 1 for CutMix (cutmix_alpha > 0), "
                f"got shape {tuple(images.shape)}"
            )
        if not isinstance(target, Tensor) or target.dtype not in _TARGET_DTYPES:
            what = target.dtype if isinstance(target, Tensor) else type(target).__name__
            raise TypeError(f"target must be an int64 or int32 tensor of class indices, got {what}")
        if target.shape != images.shape[:1]:
            raise ValueError(
                f"target must have shape (N,) = ({images.shape[0]},) to match images, "
                f"got {tuple(target.shape)}"
            )
        if target.device != images.device:
            raise ValueError(
                f"target is on {target.device} but images on {images.device}: use one device"
            )
        if self.mode == "pair" and images.shape[0] % 2:
            raise ValueError(
                "mode='pair' mixes element i with N - 1 - i and needs an even batch size; "
                f"images has N = {images.shape[0]}"
            )

    @staticmethod
    def _mix_batch(images: Tensor, draws: _Draws) -> Tensor:
        """One ``lam`` (and one box) for the whole batch; only the box's pixels are flipped."""
        if bool(draws.cutmix[0]):
            top, bottom, left, right = draws.boxes[0].tolist()
            mixed = images.clone()
            mixed[..., top:bottom, left:right] = images[..., top:bottom, left:right].flip(0)
            return mixed
        if bool(draws.mixup[0]):
            return _blend(images, images.flip(0), float(draws.lam[0]))
        return images.clone()

    @staticmethod
    def _mix_elements(images: Tensor, draws: _Draws, lam: Tensor) -> Tensor:
        """Each element with its own ``lam`` (float32 ``(N,)``, on the images' device) and box."""
        num = images.shape[0]
        mixup_rows = draws.mixup.nonzero().flatten()  # host tensors: no device sync
        count = mixup_rows.numel()
        # One copy to the device for every index: the mixup rows, their partners and the boxes.
        indices = torch.cat([mixup_rows, num - 1 - mixup_rows, draws.boxes.flatten()])
        rows, partners, boxes = _to_device(indices, images.device).split([count, count, 4 * num])
        mixed = images.clone()
        if count:
            own, other = images.index_select(0, rows), images.index_select(0, partners)
            mixed.index_copy_(0, rows, _blend(own, other, lam.index_select(0, rows)))
        if bool(draws.cutmix.any()):
            inside = _box_mask(boxes.view(num, 4), *images.shape[-2:])
            mixed = torch.where(inside, images.flip(0), mixed)
        return mixed
