"""The fused head's one chunk loop (:mod:`lsr_fused.linear_chunks`), shared by the local and the
sharded head: its arithmetic against a float64 reference with a row step of known gradient, and
the two heads' answers to the same bad ``chunk_size`` (the sharded one on a spawned gloo group).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import pytest
import torch
import torch.distributed as dist
from gloo_groups import GroupResults
from torch import Tensor

from lsr_fused import linear as linear_mod
from lsr_fused import linear_chunks, linear_label_smoothing_cross_entropy
from lsr_fused import linear_distributed as distributed_mod
from lsr_fused.errors import ArgumentTypeError, ArgumentValueError

ROWS, FEATURES, CLASSES = 7, 5, 6


class _Rows(NamedTuple):
    scale: Tensor  # (N,)
    nested: Optional[_Inner] = None


class _Inner(NamedTuple):
    shift: Tensor  # (N,)


class _SquareLoop(linear_chunks.ChunkLoop):
    """Row step of ``loss_r = s_r / 2 * sum_i (x_ri + t_r)^2``: writes ``G = s_r (x_r + t_r)``
    over the logits and returns ``(loss_r, argmax_r)``, a float and an int output per row."""

    def step(self, logits: Tensor, rows: _Rows):
        shifted = logits + rows.nested.shift[:, None]
        loss = 0.5 * rows.scale.to(torch.float64) * (shifted.double() ** 2).sum(1)
        argmax = logits.argmax(1)
        logits.copy_(rows.scale[:, None] * shifted)
        return loss, argmax


def _reference(hidden, weight, bias, scale, shift):
    h, w, b = (t.detach().double().requires_grad_(True) for t in (hidden, weight, bias))
    logits = h @ w.T + b
    loss = 0.5 * scale.double() * ((logits + shift.double()[:, None]) ** 2).sum(1)
    loss.sum().backward()
    return loss.detach(), logits.argmax(1), (h.grad, w.grad, b.grad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 3, ROWS, 100])
def test_loop_matches_float64_reference(dtype, chunk):
    generator = torch.Generator().manual_seed(chunk)
    hidden, weight, bias = (
        torch.randn(shape, generator=generator).to(dtype)
        for shape in ((ROWS, FEATURES), (CLASSES, FEATURES), (CLASSES,))
    )
    scale, shift = (
        torch.rand(ROWS, generator=generator) + 0.5,
        torch.randn(ROWS, generator=generator),
    )
    loop = _SquareLoop(hidden, weight, bias, chunk)
    grads = loop.gradients((True, True, True))
    # Weight and bias accumulate in float32 for half weights; hidden's gradient is hidden's dtype.
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert (grads.hidden.dtype, grads.weight.dtype, grads.bias.dtype) == (dtype, acc, acc)
    outputs = (torch.empty(ROWS, dtype=torch.float64), torch.empty(ROWS, dtype=torch.int64))
    rows = _Rows(scale.to(dtype), _Inner(shift.to(dtype)))
    loss, argmax = loop.run(loop.step, rows, outputs, grads)
    grads = linear_chunks.final_dtypes(grads, (True, True, True), hidden, weight, bias)
    assert all(g.dtype == dtype for g in grads)
    ref_loss, ref_argmax, ref_grads = _reference(hidden, weight, bias, rows.scale, shift.to(dtype))
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=0.1, rtol=0.05)
    if dtype == torch.float32:
        tol = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss, ref_loss, **tol)
    if dtype != torch.bfloat16:  # bfloat16 logits may tie or swap nearby maxima
        torch.testing.assert_close(argmax, ref_argmax)
    for grad, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad.double(), ref, **tol)


def test_loop_skips_gradients_not_asked_for():
    hidden, weight, bias = torch.randn(4, 3), torch.randn(5, 3), torch.randn(5)
    loop = _SquareLoop(hidden, weight, bias, 2)
    grads = loop.gradients((False, True, False))
    assert grads.hidden.shape == (0,) and grads.bias.shape == (0,)
    outputs = (torch.empty(4, dtype=torch.float64), torch.empty(4, dtype=torch.int64))
    loop.run(loop.step, _Rows(torch.ones(4), _Inner(torch.zeros(4))), outputs, grads)
    logits = hidden @ weight.T + bias
    torch.testing.assert_close(grads.weight, logits.T @ hidden)
    assert linear_chunks.grads_or_none(grads, (False, True, False))[::2] == (None, None)


def test_both_heads_run_the_one_loop():
    """The buffer, the chunk logits, the accumulation and the casts are not written again."""
    for loop in (linear_mod._Problem, distributed_mod._Loop):
        assert issubclass(loop, linear_chunks.ChunkLoop)
        for shared in ("run", "gradients", "accumulate"):
            assert shared not in vars(loop), (loop, shared)


# ------------------------------------------------------------------------------------------------
# The same bad chunk_size, local and sharded.

BAD_CHUNK_SIZES = {
    "float": 2.5,
    "integral float": 4.0,
    "bool": True,
    "str": "4",
    "tensor": torch.tensor(4),
    "zero": 0,
    "negative": -3,
}


def _head_inputs():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(ROWS, FEATURES, generator=generator, requires_grad=True)
    weight = torch.randn(CLASSES, FEATURES, generator=generator, requires_grad=True)
    target = torch.randint(0, CLASSES, (ROWS,), generator=generator)
    return hidden, weight, target


def _errors(process_group) -> dict[str, tuple[str, str]]:
    """``{case: (error class, message)}`` of each bad chunk_size (the class's qualified name)."""
    raised = {}
    for name, chunk_size in BAD_CHUNK_SIZES.items():
        hidden, weight, target = _head_inputs()
        try:
            linear_label_smoothing_cross_entropy(
                hidden, weight, target, chunk_size=chunk_size, process_group=process_group
            )
            raised[name] = ("nothing", "")
        except Exception as exc:
            raised[name] = (f"{type(exc).__module__}.{type(exc).__qualname__}", str(exc))
    return raised


def _sharded_task(rank: int, world_size: int):
    return _errors(dist.group.WORLD)


TASKS = {"chunk_size": _sharded_task}
group_results = GroupResults(__name__, {1: ("chunk_size",)}, "chunk_size")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_bad_chunk_size_raises_the_same_error_local_and_sharded(tmp_path_factory):
    local = _errors(None)
    (per_rank,) = group_results(1, tmp_path_factory)
    sharded = per_rank["chunk_size"]
    for name, chunk_size in BAD_CHUNK_SIZES.items():
        expected = ArgumentValueError if isinstance(chunk_size, int) and chunk_size < 1 else None
        expected = expected or ArgumentTypeError
        qualified = f"{expected.__module__}.{expected.__qualname__}"
        for form, (kind, message) in (("local", local[name]), ("sharded", sharded[name])):
            assert kind == qualified and "chunk_size" in message, (name, form, kind, message)
    # The type errors are catchable as TypeError and as RuntimeError (torch's own type).
    assert issubclass(ArgumentTypeError, TypeError) and issubclass(ArgumentTypeError, RuntimeError)
