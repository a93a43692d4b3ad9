"""The eager route (lsr_fused.ops: an autograd.Function over the op bodies, skipping the op
dispatcher on plain tensors) is the op route with less per-call overhead, bit for bit.

Each case runs a training step twice, once as users call it (eager route) and once with the route
switched off (every call through the ``lsr_fused::*`` custom ops, as torch.compile sees them), and
asserts bitwise-equal losses and gradients, first and repeated backward passes included.
"""

from __future__ import annotations

import pytest
import torch

import lsr_fused
from lsr_fused import label_smoothing_cross_entropy, ops

BACKENDS = lsr_fused.available_backends("cpu")

CASES = {
    "mean": dict(reduction="mean"),
    "sum-z-others": dict(reduction="sum", z_loss=1e-3, spread="others"),
    "none": dict(reduction="none"),
    "mean-weighted": dict(reduction="mean", weighted=True),
}


def _step(backend, options, upstream_scale, seed=0):
    options = dict(options)
    generator = torch.Generator().manual_seed(seed)
    weight = torch.rand(9, generator=generator) + 0.5 if options.pop("weighted", False) else None
    producer = torch.randn(6, 9, generator=generator).requires_grad_()
    logits = producer * 1.0  # an intermediate, so that inplace_backward applies
    target = torch.randint(0, 9, (6,), generator=generator)
    target[2] = -100
    loss = label_smoothing_cross_entropy(
        logits, target, 0.1, weight=weight, backend=backend, **options
    )
    upstream = torch.full_like(loss, upstream_scale)
    (first,) = torch.autograd.grad(loss, producer, upstream, retain_graph=True)
    (second,) = torch.autograd.grad(loss, producer, upstream)
    return loss.detach(), first, second


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("upstream_scale", [1.0, 3.0])
def test_eager_route_equals_the_op_route_bitwise(backend, options, upstream_scale, monkeypatch):
    eager = _step(backend, options, upstream_scale)
    monkeypatch.setattr(ops, "eager_call_allowed", lambda logits: False)
    dispatched = _step(backend, options, upstream_scale)
    for ours, theirs in zip(eager, dispatched, strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_route_in_place_equals_the_op_route(backend, monkeypatch):
    def step():
        producer = torch.randn(5, 7, generator=torch.Generator().manual_seed(3)).requires_grad_()
        target = torch.tensor([0, 6, 2, -100, 4])
        loss = label_smoothing_cross_entropy(
            producer * 2.0, target, 0.2, backend=backend, inplace_backward=True
        )
        loss.backward()
        return loss.detach(), producer.grad

    eager = step()
    monkeypatch.setattr(ops, "eager_call_allowed", lambda logits: False)
    dispatched = step()
    for ours, theirs in zip(eager, dispatched, strict=True):
        assert torch.equal(ours, theirs)


def test_eager_route_is_taken_for_plain_tensors_only():
    plain = torch.randn(2, 3)
    assert ops.eager_call_allowed(plain)
    assert ops.eager_call_allowed(torch.nn.Parameter(plain))
    assert not ops.eager_call_allowed(torch.empty(2, 3, device="meta"))

    class Subclass(torch.Tensor):
        pass

    assert not ops.eager_call_allowed(plain.as_subclass(Subclass))


def test_in_place_eager_route_still_bumps_the_version_counter():
    producer = torch.randn(4, 5, requires_grad=True)
    logits = producer * 1.0
    squared = logits * logits  # saves logits: its backward must fail after the in-place write
    target = torch.tensor([0, 1, 2, 3])
    loss = label_smoothing_cross_entropy(logits, target, inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        squared.sum().backward()
