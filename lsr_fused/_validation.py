"""Target-range validation: always on for CPU tensors, opt-in for CUDA (it needs a host sync)."""

from __future__ import annotations

from torch import Tensor

from .errors import TargetIndexError

_validate_device_targets = False


def set_validation(enabled: bool) -> bool:
    """Check targets of CUDA tensors on the host too, raising ``ValueError`` for a bad class index.

    CPU targets are always checked. On CUDA the check needs a host-device synchronisation, so it is
    off by default and an out-of-range target gives a NaN loss (a NaN mean) instead. Returns the
    previous setting, so ``prev = set_validation(True) ... set_validation(prev)`` restores it.
    """
    global _validate_device_targets
    previous = _validate_device_targets
    _validate_device_targets = bool(enabled)
    return previous


def validation_enabled() -> bool:
    """Whether CUDA targets are checked on the host (see :func:`set_validation`)."""
    return _validate_device_targets


def check_targets(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise ``ValueError`` naming the first target that is neither ``ignore_index`` nor a class."""
    value = _first_out_of_range(target, target, num_classes, ignore_index)
    if value is not None:
        raise TargetIndexError(
            f"target contains {value}, which is neither ignore_index ({ignore_index}) nor a class "
            f"index in [0, {num_classes})"
        )


def check_mix_targets(
    target: Tensor, mix_target: Tensor, num_classes: int, ignore_index: int
) -> None:
    """Raise ``ValueError`` naming the first ``mix_target`` that is not a class index where the
    element is not ignored (``target`` is ``ignore_index``: ``mix_target`` is not read there)."""
    value = _first_out_of_range(mix_target, target, num_classes, ignore_index)
    if value is not None:
        raise TargetIndexError(
            f"mix_target contains {value} where target is not ignore_index, which is not a "
            f"class index in [0, {num_classes})"
        )


def _first_out_of_range(values: Tensor, target: Tensor, num_classes: int, ignore_index: int):
    """The first of ``values`` outside ``[0, num_classes)`` where ``target`` is not
    ``ignore_index``, or None (and None unexamined on a device unless validation is on: looking
    synchronizes)."""
    if values.device.type != "cpu" and not _validate_device_targets:
        return None
    bad = (target != ignore_index) & ((values < 0) | (values >= num_classes))
    return int(values[bad][0]) if bool(bad.any()) else None


def is_dense(tensor: Tensor, *, allow_gaps: bool = False) -> bool:
    """True when the tensor's elements fill its storage span exactly, in some dimension order.

    ``allow_gaps``: only ask that no two elements share memory (each stride, in increasing order,
    spans at least the dimensions below it), as in a slice of a wider tensor."""
    if tensor.is_contiguous():
        return True
    expected_stride = 1
    for dim in sorted(range(tensor.dim()), key=tensor.stride):
        size, stride = tensor.size(dim), tensor.stride(dim)
        if size != 1 and (stride < expected_stride if allow_gaps else stride != expected_stride):
            return False
        if size != 1:
            expected_stride = stride * size if allow_gaps else expected_stride * size
    return True


__all__ = ["check_mix_targets", "check_targets", "is_dense", "set_validation", "validation_enabled"]
