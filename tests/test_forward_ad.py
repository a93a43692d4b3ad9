"""Forward-mode AD (``torch.autograd.forward_ad``): the loss and the fused head carry the tangent
of the float64 reference (through the composite path), on every CPU backend; before, their
outputs silently carried none."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from reference import dense_loss

import lsr_fused

BACKENDS = lsr_fused.available_backends("cpu")
OPTIONS = [
    dict(),
    dict(reduction="sum", z_loss=0.1, spread="others"),
    dict(reduction="none", softcap=2.0, ignore_index=2),
]


def _case(seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, 7, generator=generator, dtype=torch.float64)
    tangent = torch.randn(5, 7, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 7, (5,), generator=generator)
    target[1] = 2
    return logits, tangent, target


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", OPTIONS, ids=["mean", "sum-z-others", "none-softcap"])
def test_loss_tangent(backend, options):
    logits, tangent, target = _case()
    _, expected = torch.func.jvp(lambda x: dense_loss(x, target, 0.1, **options), (logits,),
                                 (tangent,))  # fmt: skip
    with fwAD.dual_level():
        loss = lsr_fused.label_smoothing_cross_entropy(
            fwAD.make_dual(logits, tangent), target, 0.1, backend=backend, **options
        )
        primal, got = fwAD.unpack_dual(loss)
    assert got is not None
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(primal, dense_loss(logits, target, 0.1, **options))


def test_module_and_fused_head_tangents():
    logits, tangent, target = _case(1)
    weight = torch.randn(7, 3, dtype=torch.float64)
    hidden, hidden_tangent = logits[:, :3].clone(), tangent[:, :3].clone()
    _, expected = torch.func.jvp(lambda h: dense_loss(h @ weight.T, target, 0.1), (hidden,),
                                 (hidden_tangent,))  # fmt: skip
    module = lsr_fused.LabelSmoothingCE(0.1)
    with fwAD.dual_level():
        head = lsr_fused.linear_label_smoothing_cross_entropy(
            fwAD.make_dual(hidden, hidden_tangent), weight, target, 0.1
        )
        loss = module(fwAD.make_dual(logits, tangent), target)
        head_tangent, loss_tangent = fwAD.unpack_dual(head)[1], fwAD.unpack_dual(loss)[1]
    torch.testing.assert_close(head_tangent, expected, rtol=1e-10, atol=1e-12)
    _, loss_expected = torch.func.jvp(lambda x: dense_loss(x, target, 0.1), (logits,), (tangent,))
    torch.testing.assert_close(loss_tangent, loss_expected, rtol=1e-10, atol=1e-12)
