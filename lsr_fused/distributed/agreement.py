"""The agreement exchange of the vocabulary-parallel entry points: one small all-gather per call.

Before any O(N) collective, every rank packs a description of its arguments into one int64 row
(:func:`describe`: shard width, target shape and range, dtype, options, the caller's own fields) and
:func:`agree` all-gathers the rows. Ranks that disagree, or a rank whose arguments are invalid, make
*every* rank raise instead of leaving the others blocked in a collective; otherwise every rank
learns the global class count and its own offset from the same table.

What each field means, and how a message shows it, is declared once (:class:`Field`); callers
rename fields by key and append their own, so no behaviour depends on the words of a message.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable
from typing import NamedTuple, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from .. import policy
from .._validation import validation_enabled

_REDUCTION_CODES = {name: i for i, name in enumerate(policy.REDUCTIONS)}
_SPREAD_CODES = {name: i for i, name in enumerate(policy.SPREADS)}
_DTYPE_CODES = {dtype: i for i, dtype in enumerate(policy.FLOAT_DTYPES)}
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
T = TypeVar("T")


def _float_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def _bits_float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


class Field(NamedTuple):
    """One thing every rank must agree on: ``width`` int64 columns of the description row.

    ``key`` identifies the field (callers rename fields by key, never by their words); ``name``
    says what it is in messages; ``show`` turns one rank's columns (a tuple) into what the
    message prints.
    """

    key: str
    name: str
    width: int = 1
    show: Callable[[tuple[int, ...]], object] = operator.itemgetter(0)


def shown_as(convert: Callable[[int], object]) -> Callable[[tuple[int, ...]], object]:
    """The ``show`` of a one-column field whose value prints as ``convert(value)``."""
    return lambda values: convert(values[0])


def _shown_as_shape(values: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(size for size in values if size >= 0)


# Header columns of a description row, then the fields every rank must agree on.
_ERROR, _WIDTH, _TARGET_MIN, _TARGET_MAX, _CHECKED, _CHECKSUM = range(6)
_AGREED_START = 6
# Target dimensions described individually in the exchange; any further ones are folded into a
# product (logits with more than 9 dimensions are still checked, slightly less precisely).
_SHAPE_SLOTS = 8
# The fields of every entry point, in the order of the row; a caller may rename them (its input
# is not called logits) and append fields of its own.
COMMON_FIELDS = (
    Field("ndim", "the number of logits dimensions"),
    Field("rows", "the number of rows (elements of target)"),
    Field("target_shape", "the target shape", _SHAPE_SLOTS, _shown_as_shape),
    Field("dtype", "the logits dtype", show=shown_as(lambda v: str(policy.FLOAT_DTYPES[v]))),
    Field("has_weight", "whether weight is given", show=shown_as(bool)),
    Field("reduction", "reduction", show=shown_as(lambda v: policy.REDUCTIONS[v])),
    Field("spread", "spread", show=shown_as(lambda v: policy.SPREADS[v])),
    Field("ignore_index", "ignore_index"),
    Field("label_smoothing", "label_smoothing", show=shown_as(_bits_float)),
    Field("z_loss", "z_loss", show=shown_as(_bits_float)),
)


# The fields of the newer options (softcap, statistics, mixed targets), shared by every sharded
# entry point after its own, with their values from :func:`newer_option_values`.
NEWER_OPTION_FIELDS = (
    Field("softcap", "softcap (0: off)", show=shown_as(_bits_float)),
    Field("return_stats", "return_stats", show=shown_as(bool)),
    Field("has_mix", "whether mix_target is given", show=shown_as(bool)),
    Field("mix_lambda", "mix_lambda (a float; -1: a tensor)", show=shown_as(_bits_float)),
    Field("mix_checksum", "a checksum of mix_target (0 where it is not examined)"),
)


def newer_option_values(options, flat_mix: Optional[Tensor], mix_lambda) -> tuple[int, ...]:
    """This rank's values of :data:`NEWER_OPTION_FIELDS` (``options``: a ``LossOptions``)."""
    lam_shown = -1.0 if isinstance(mix_lambda, Tensor) else float(mix_lambda)
    checksum = 0 if flat_mix is None else _target_summary(flat_mix, options.ignore_index)[3]
    return (_float_bits(options.softcap or 0.0), int(options.return_stats),
            int(flat_mix is not None), _float_bits(lam_shown), checksum)  # fmt: skip


class ShardInput(NamedTuple):
    """What the exchange describes of this rank's class-sharded input (logits, or a classifier
    weight): its number of classes, number of dimensions and dtype."""

    width: int
    ndim: int
    dtype: torch.dtype

    @staticmethod
    def of_logits(logits: Tensor) -> ShardInput:
        width = logits.shape[1] if logits.dim() > 1 else logits.shape[0]
        return ShardInput(width, logits.dim(), logits.dtype)


class Agreement(NamedTuple):
    """What every rank learns from the exchange: the global class count, this rank's first
    class, and every rank's number of classes (ordered by rank)."""

    num_classes: int
    offset: int
    widths: tuple[int, ...]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_exchange_values(label_smoothing, ignore_index, z_loss, chunk_size=None) -> None:
    """Reject, naming the argument, a value of the right type that the exchange's int64 row
    could not hold: an int outside int64 (``ignore_index``, ``chunk_size``), or an int too large
    for a float (``label_smoothing``, ``z_loss``). Wrong types are left to the policy checks."""
    for name, value in (("label_smoothing", label_smoothing), ("z_loss", z_loss)):
        if _is_int(value):
            try:
                float(value)
            except OverflowError:
                raise ValueError(
                    f"{name} must be a finite number, got an integer of {value.bit_length()} bits"
                ) from None
    for name, value in (("ignore_index", ignore_index), ("chunk_size", chunk_size)):
        if _is_int(value) and not _INT64_MIN <= value <= _INT64_MAX:
            raise ValueError(f"{name} must fit in int64 ([-2**63, 2**63 - 1]), got {value}")


def _target_summary(flat_target: Tensor, ignore_index: int) -> tuple[int, int, int, int]:
    """``(checked, min, max, checksum)`` of the non-ignored targets, read on the host only where
    that costs no device sync (CPU) or the user asked for it (:func:`lsr_fused.set_validation`)."""
    if flat_target.device.type != "cpu" and not validation_enabled():
        return 0, 0, -1, 0
    kept = flat_target[flat_target != ignore_index]
    low, high = (int(kept.min()), int(kept.max())) if kept.numel() else (0, -1)
    # Order-sensitive; int64 overflow wraps identically on every rank.
    positions = torch.arange(flat_target.numel(), device=flat_target.device) % 65521 + 1
    checksum = int((flat_target * positions).sum()) if flat_target.numel() else 0
    return 1, low, high, checksum


def _shape_columns(target_shape) -> list[int]:
    shape = list(target_shape)
    if len(shape) > _SHAPE_SLOTS:
        folded = 1
        for size in shape[_SHAPE_SLOTS - 1 :]:
            folded *= size
        shape = [*shape[: _SHAPE_SLOTS - 1], folded]
    return shape + [-1] * (_SHAPE_SLOTS - len(shape))


def describe(
    shard: ShardInput, flat_target: Tensor, target_shape, has_weight: bool, options, extra=()
) -> Tensor:
    """This rank's description row (int64, on the CPU): header, :data:`COMMON_FIELDS`, then the
    caller's ``extra`` values (one int per extra field). Raises where a value cannot be packed,
    so call it where a failure still reaches the exchange (see :func:`agree`)."""
    label_smoothing, ignore_index, reduction, spread, z_loss = options
    checked, low, high, checksum = _target_summary(flat_target, ignore_index)
    row = [0, shard.width, low, high, checked, checksum]
    row += [shard.ndim, flat_target.numel(), *_shape_columns(target_shape)]
    row += [_DTYPE_CODES[shard.dtype], int(bool(has_weight))]
    row += [_REDUCTION_CODES[reduction], _SPREAD_CODES[spread], ignore_index]
    row += [_float_bits(label_smoothing), _float_bits(z_loss)]
    row += [int(value) for value in extra]
    return torch.tensor(row, dtype=torch.int64)


def _carries_cpu(group) -> bool:
    """Whether collectives on ``group`` accept CPU tensors (so the exchange needs no device)."""
    try:  # per-device mapping such as "cpu:gloo,cuda:nccl" (the default of init_process_group())
        name = str(dist.get_backend_config(group)).lower()
    except (AttributeError, RuntimeError, ValueError):  # pragma: no cover - older torch
        name = str(dist.get_backend(group)).lower()
    if ":" in name:
        return any(part.split(":")[0].strip() == "cpu" for part in name.split(","))
    return "cpu" in dist.Backend.backend_capability.get(name, ())


def _exchange_device(group, tensor) -> torch.device:
    """Where the exchange's tensors live: the CPU when the group carries CPU tensors, else the
    device of ``tensor`` (this rank's input), else the current CUDA device."""
    if _carries_cpu(group):
        return torch.device("cpu")
    if isinstance(tensor, Tensor) and tensor.device.type != "cpu":
        return tensor.device
    return torch.device("cuda", torch.cuda.current_device())


def _exchange(group, description: Tensor, device: torch.device) -> list[list[int]]:
    mine = description.to(device)
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(table, mine, group=group)
    return [row.tolist() for row in table]


def _disagreement(table: list[list[int]], fields) -> Optional[str]:
    start = _AGREED_START
    for field in fields:
        per_rank = [tuple(row[start : start + field.width]) for row in table]
        start += field.width
        if len(set(per_rank)) > 1:
            shown = ", ".join(f"rank {r}: {field.show(v)}" for r, v in enumerate(per_rank))
            return f"ranks disagree on {field.name} ({shown})"
    if all(row[_CHECKED] for row in table) and len({row[_CHECKSUM] for row in table}) > 1:
        return "ranks hold different targets (every rank must pass the same global class indices)"
    return None


def _global_problem(table: list[list[int]], spread: str, ignore_index: int) -> Optional[str]:
    """What is wrong with the group's arguments taken together (C, and the targets' range)."""
    num_classes = sum(row[_WIDTH] for row in table)
    if num_classes == 0:
        return "the shards hold no classes at all (C == 0)"
    if spread == "others" and num_classes == 1:
        return "spread='others' needs at least 2 classes (C == 1)"
    for row in table:
        if row[_CHECKED] and (row[_TARGET_MIN] < 0 or row[_TARGET_MAX] >= num_classes):
            value = row[_TARGET_MIN] if row[_TARGET_MIN] < 0 else row[_TARGET_MAX]
            return (
                f"target contains {value}, which is neither ignore_index ({ignore_index}) nor a "
                f"class index in [0, {num_classes})"
            )
    return None


def agree(
    group,
    description: Optional[Tensor],
    local_error: Optional[BaseException],
    options,
    *,
    device_of=None,
    extra_fields: tuple[Field, ...] = (),
    renames: Optional[dict[str, str]] = None,
    caller: str = "label_smoothing_cross_entropy",
) -> Agreement:
    """Exchange descriptions; raise on every rank unless all ranks' arguments are valid and agree.

    Exactly one of ``description`` (from :func:`describe`) and ``local_error`` (whatever this
    rank's checks or :func:`describe` raised) is given. The exchange happens either way, so a
    rank with a bad argument re-raises its own error after it while every other rank raises a
    ``ValueError`` naming that rank, instead of waiting in a collective. ``extra_fields`` are the
    caller's fields after :data:`COMMON_FIELDS` (the same on every rank); ``renames`` maps field
    keys to the caller's words; ``device_of`` is a tensor whose device carries the exchange on
    groups without CPU support.
    """
    fields = [
        field._replace(name=(renames or {}).get(field.key, field.name))
        for field in (*COMMON_FIELDS, *extra_fields)
    ]
    if local_error is not None:
        length = _AGREED_START + sum(field.width for field in fields)
        description = torch.zeros(length, dtype=torch.int64)
        description[_ERROR] = 1
    table = _exchange(group, description, _exchange_device(group, device_of))
    if local_error is not None:
        raise local_error
    prefix = f"sharded {caller}: "
    failed = [rank for rank, row in enumerate(table) if row[_ERROR]]
    if failed:
        raise ValueError(
            f"{prefix}rank(s) {failed} of the process group rejected their arguments (see the "
            "error raised there)"
        )
    _, ignore_index, _, spread, _ = options
    problem = _disagreement(table, fields) or _global_problem(table, spread, ignore_index)
    if problem is not None:
        raise ValueError(prefix + problem)
    widths = tuple(row[_WIDTH] for row in table)
    return Agreement(sum(widths), sum(widths[: dist.get_rank(group)]), widths)


def run_checks(check: Callable[..., T], *args) -> tuple[Optional[T], Optional[Exception]]:
    """``(check(*args), None)``, or ``(None, what it raised)``, whatever its type.

    An entry point runs its local checks and :func:`describe` through this before :func:`agree`:
    a failure on one rank only must still reach the exchange (raising at once would leave every
    other rank waiting in it), and :func:`agree` re-raises it after the exchange.
    """
    try:
        return check(*args), None
    except Exception as exc:
        return None, exc


def resolve_group(process_group):
    """The group to shard over (``None``: the default group); raises where there is none."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "process_group was given but torch.distributed is not initialised "
            "(call torch.distributed.init_process_group first)"
        )
    group = dist.group.WORLD if process_group is None else process_group
    if dist.get_rank(group) < 0:
        raise ValueError("this process is not a member of process_group")
    return group
