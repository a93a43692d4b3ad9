"""Accuracy on logits that share a large offset (issue 19 item 5), and the extreme rows.

Logits ``randn * 2 + offset`` (C = 1000): ``F.cross_entropy`` in float32 keeps about 1e-6 error at
every offset because it works relative to the row maximum. The backends work relative to a per-row
reference (the row's first logit, see ``lsr_fused.backends``) and must stay within 8x of
``F.cross_entropy``'s float32 error on the same input, loss and gradient, on every path: the
forward that writes the gradient (mean/sum with ``loss.backward()``), the forward + backward that
recomputes it (``reduction="none"``, ``inplace_backward`` on a non-leaf) and the fused head. For
options ``F.cross_entropy`` lacks (``spread="others"``, ``z_loss``) the bounds are absolute: 1e-5
on each row's loss (relative beyond a loss of 1), 1e-5 on the gradient relative to its maximum.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from reference import IGNORE, dense_loss

from lsr_fused import (
    available_backends,
    label_smoothing_cross_entropy,
    linear_label_smoothing_cross_entropy,
)
from lsr_fused._params import smoothing_masses

BACKENDS = [b for b in ("torch", "cpp") if b in available_backends("cpu")]
OFFSETS = [0.0, 1e3, 1e4, 1e5]
ROWS, CLASSES = 64, 1000
# (label smoothing, spread, z_loss); the first two are what F.cross_entropy computes too.
OPTIONS = {
    "eps0.1": (0.1, "all", 0.0),
    "eps0": (0.0, "all", 0.0),
    "others": (0.1, "others", 0.0),
    "z": (0.1, "all", 1e-4),
}
# How the gradient is obtained: the forward writing it for loss.backward() (mean, sum), the
# backward recomputing it (reduction none with a random upstream; in place on a non-leaf).
PATHS = ["mean", "sum", "none", "mean-inplace", "sum-inplace"]


def _case(offset: float, dtype: torch.dtype, seed: int, rows: int = ROWS, classes: int = CLASSES):
    """Logits ``randn * 2 + offset`` in ``dtype``, targets (some ignored), float32-exact class
    weights and a per-row upstream gradient."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, classes, generator=gen, dtype=torch.float64) * 2 + offset).to(dtype)
    target = torch.randint(0, classes, (rows,), generator=gen)
    target[::9] = IGNORE
    weight = (torch.rand(classes, generator=gen, dtype=torch.float64) + 0.5).float().double()
    upstream = torch.rand(rows, generator=gen, dtype=torch.float64) + 0.5
    return logits, target, weight, upstream


def _loss_and_grad(loss_fn, logits, path, upstream):
    """The loss and d(loss)/d(logits) of ``loss_fn(x, reduction, inplace)`` along ``path``."""
    reduction, _, inplace = path.partition("-")
    leaf = logits.detach().clone().requires_grad_()
    x = leaf * 1.0 if inplace else leaf  # in place needs a non-leaf
    loss = loss_fn(x, reduction, bool(inplace))
    if reduction == "none":
        loss.backward(upstream.to(loss.dtype))
    else:
        loss.backward()
    return loss.detach(), leaf.grad


def _errors(loss, grad, ref_loss, ref_grad):
    """(max absolute loss error, max gradient error relative to the gradient's maximum)."""
    loss_error = (loss.double() - ref_loss).abs().max().item()
    grad_error = ((grad.double() - ref_grad).abs().max() / ref_grad.abs().max()).item()
    return loss_error, grad_error


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bounds(logits, target, path, upstream, ref, eps, spread, z_loss, weight):
    """(loss bound, gradient bound): 8x F.cross_entropy's float32 errors on the same (rounded)
    input where it computes this loss, else the absolute bounds of the module docstring."""
    unit = torch.finfo(_acc(logits.dtype)).eps
    ref_scale = max(1.0, ref[0].abs().max().item())
    if spread == "all" and z_loss == 0.0 and logits.dtype != torch.float64:
        w = None if weight is None else weight.float()

        def torch_fn(x, reduction, _inplace):
            return F.cross_entropy(x, target, weight=w, label_smoothing=eps, reduction=reduction)

        torch_errors = _errors(*_loss_and_grad(torch_fn, logits.float(), path, upstream), *ref)
        # Floors: a few units of rounding of the loss scale, below which no error is asked for.
        loss_bound = 8 * max(torch_errors[0], 4 * unit * ref_scale)
        grad_bound = 8 * max(torch_errors[1], 4 * unit)
    else:
        per_row = 1e-5 if logits.dtype != torch.float64 else 1e-10
        rows = target.numel() if path.startswith("sum") else 1  # a sum adds up its rows' errors
        loss_bound = per_row * rows * max(1.0, ref_scale / rows)
        grad_bound = per_row
    if logits.dtype == torch.bfloat16:
        grad_bound = max(grad_bound, 2.0**-8)  # the gradient is rounded to bfloat16
    return loss_bound, grad_bound


def _check(backend, logits, target, path, upstream, eps, spread, z_loss, weight):
    acc_weight = None if weight is None else weight.to(_acc(logits.dtype))

    def ours_fn(x, reduction, inplace):
        return label_smoothing_cross_entropy(
            x, target, eps, spread=spread, z_loss=z_loss, weight=acc_weight,
            reduction=reduction, inplace_backward=inplace, backend=backend,
        )  # fmt: skip

    def ref_fn(x, reduction, _inplace):
        return dense_loss(
            x, target, eps, spread=spread, z_loss=z_loss, weight=weight, reduction=reduction
        )

    ours = _loss_and_grad(ours_fn, logits, path, upstream)
    ref = _loss_and_grad(ref_fn, logits.double(), path, upstream)
    loss_error, grad_error = _errors(*ours, *ref)
    loss_bound, grad_bound = _bounds(
        logits, target, path, upstream, ref, eps, spread, z_loss, weight
    )
    assert loss_error <= loss_bound, f"loss error {loss_error:.3g} > {loss_bound:.3g}"
    assert grad_error <= grad_bound, f"gradient error {grad_error:.3g} > {grad_bound:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("path", PATHS)
def test_float32_offsets(backend, offset, options, weighted, path):
    logits, target, weight, upstream = _case(offset, torch.float32, seed=int(offset) % 97)
    _check(backend, logits, target, path, upstream, *options, weight if weighted else None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [0.0, 1e5])
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("path", ["mean", "none", "sum-inplace"])
def test_float64_offsets(backend, offset, options, weighted, path):
    logits, target, weight, upstream = _case(offset, torch.float64, seed=3)
    _check(backend, logits, target, path, upstream, *options, weight if weighted else None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("path", ["mean", "none"])
def test_bfloat16_moderate_offset(backend, options, weighted, path):
    # bfloat16 holds 1e3 + randn * 2 to 4 units; the loss (float32) still shows the offset.
    logits, target, weight, upstream = _case(1e3, torch.bfloat16, seed=5)
    _check(backend, logits, target, path, upstream, *options, weight if weighted else None)


OUTLYING_FIRST = [-1e4, -1e9, torch.finfo(torch.float32).min, 200.0]


def _check_outlying_first(backend, first, offset, options, path, rows=ROWS, classes=CLASSES):
    logits, target, weight, upstream = _case(offset, torch.float32, 29, rows, classes)
    logits[:, 0] = first if first < 0 else offset + first
    target[target == 0] = 1
    # Weights below 1: w * finfo.min would overflow float32 (F.cross_entropy gives inf there too).
    _check(backend, logits, target, path, upstream, *options, weight / 1.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("first", OUTLYING_FIRST, ids=str)
@pytest.mark.parametrize("offset", [0.0, 1e5])
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("path", ["mean", "none", "sum-inplace"])
def test_outlying_first_logit(backend, first, offset, options, path):
    """A first class masked with a large finite value (a padding or blank class), or far above
    the rest: the first logit is then no reference, and the row max is used instead."""
    _check_outlying_first(backend, first, offset, options, path)


@pytest.mark.skipif("triton" not in available_backends("cpu"), reason="needs triton")
@pytest.mark.parametrize("first", OUTLYING_FIRST, ids=str)
@pytest.mark.parametrize("offset", [0.0, 1e5])
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("path", ["mean", "none", "sum-inplace"])
def test_outlying_first_logit_triton(first, offset, options, path):
    """The same rows through the Triton kernels, interpreter-sized (4 x 200)."""
    _check_outlying_first("triton", first, offset, options, path, rows=4, classes=200)


@pytest.mark.skipif("triton" not in available_backends("cpu"), reason="needs triton")
@pytest.mark.parametrize("first", OUTLYING_FIRST, ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_outlying_first_logit_triton_redo(first, weighted):
    """The backward that rewrites rows the forward wrote for another upstream (2 * loss): it
    decodes the saved value, as the plain backward does."""
    logits, target, weight, upstream = _case(1e5, torch.float32, 29, rows=4, classes=200)
    logits[:, 0] = first if first < 0 else 1e5 + first
    target[target == 0] = 1
    weight = weight / 1.5 if weighted else None

    def ours_fn(x, reduction, _inplace):
        acc_weight = None if weight is None else weight.float()
        loss = label_smoothing_cross_entropy(
            x, target, 0.1, weight=acc_weight, reduction=reduction, backend="triton"
        )
        return 2.0 * loss

    def ref_fn(x, reduction, _inplace):
        return dense_loss(x, target, 0.1, weight=weight, reduction=reduction)

    _, grad = _loss_and_grad(ours_fn, logits, "sum", upstream)
    ref = _loss_and_grad(ref_fn, logits.double(), "sum", upstream)
    _, grad_error = _errors(ref[0], grad / 2.0, *ref)
    _, grad_bound = _bounds(logits, target, "sum", upstream, ref, 0.1, "all", 0.0, weight)
    assert grad_error <= grad_bound, f"gradient error {grad_error:.3g} > {grad_bound:.3g}"


@pytest.mark.parametrize(
    "backend", [b for b in ("torch", "cpp", "triton") if b in available_backends("cpu")]
)
@pytest.mark.parametrize("offset", [0.0, 1e5])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_masked_first_logit_at_an_offset(backend, offset, eps):
    """A -inf first logit: the row max is the reference, so an offset costs no accuracy. The
    yardstick is F.cross_entropy (the dense reference makes 0 * -inf there): float64 for the
    error, 8x its float32 error as the bound; with smoothing the loss is +inf, as torch's."""
    logits, target, _, _ = _case(offset, torch.float32, seed=31, rows=4, classes=200)
    logits[:, 0] = float("-inf")
    target[target == 0] = 1
    (loss, grad), (loss32, grad32) = _torch_and_ours(backend, logits, target, eps)
    _, (ref_loss, ref_grad) = _torch_and_ours("torch", logits.double(), target, eps)
    unit = torch.finfo(torch.float32).eps
    if eps:
        assert torch.equal(loss, loss32) and (loss[target != IGNORE] == float("inf")).all()
    else:
        scale = max(1.0, ref_loss.abs().max().item())
        assert _error(loss, ref_loss) <= 8 * max(_error(loss32, ref_loss), 4 * unit * scale)
    scale = ref_grad.abs().max().item()
    assert _error(grad, ref_grad) <= 8 * max(_error(grad32, ref_grad), 4 * unit * scale)


def _error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return (ours.double() - ref).abs().max().item()


@pytest.fixture(params=["default", "avx2", "avx512"])
def capability(request, cpp):
    previous = cpp.cpu_capability()
    try:
        cpp.set_cpu_capability(request.param)
    except ValueError:
        pytest.skip(f"CPU kernels for {request.param} not available on this machine/build")
    yield request.param
    cpp.set_cpu_capability(previous)


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("path", ["mean", "none"])
def test_every_cpu_kernel_variant(capability, options, weighted, path):
    """The C++ kernels of every instruction set, both paths (written in forward; recomputed)."""
    logits, target, weight, upstream = _case(1e5, torch.float32, seed=19)
    _check("cpp", logits, target, path, upstream, *options, weight if weighted else None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("path", ["mean", "none"])
def test_strided_classes(backend, options, path):
    """(N, C, d) logits: the class dimension is strided (the kernels' gather path)."""
    logits, target, weight, upstream = _case(1e5, torch.float32, seed=23)
    logits = logits.view(4, 16, CLASSES).transpose(1, 2)
    target, upstream = target.view(4, 16), upstream.view(4, 16)
    _check(backend, logits, target, path, upstream, *options, weight)


# ------------------------------------------------------------------------------------------------
# Extreme rows
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spread", ["all", "others"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("path", ["none", "mean"])
def test_all_equal_huge_row_gives_mass_times_log_classes(backend, spread, weighted, path):
    logits, target, weight, upstream = _case(0.0, torch.float32, seed=7, rows=4)
    target[:] = torch.tensor([3, 5, IGNORE, 999])
    logits[0] = 1e30
    logits[3] = -1e30
    weight = weight if weighted else None
    eps = 0.1

    def ours_fn(x, reduction, inplace):
        return label_smoothing_cross_entropy(
            x, target, eps, spread=spread, weight=None if weight is None else weight.float(),
            reduction=reduction, backend=backend,
        )  # fmt: skip

    def ref_fn(x, reduction, _inplace):
        return dense_loss(x, target, eps, spread=spread, weight=weight, reduction=reduction)

    loss, grad = _loss_and_grad(ours_fn, logits, path, upstream)
    ref_loss, ref_grad = _loss_and_grad(ref_fn, logits.double(), path, upstream)
    if path == "none":
        # S * log(C), with S = b W + (a - b) w_y the row's total target mass.
        extra, other = smoothing_masses(eps, CLASSES, spread)
        w = torch.ones(CLASSES, dtype=torch.float64) if weight is None else weight
        for row in (0, 3):
            mass = other * w.sum() + extra * w[target[row]]
            expected = (mass * math.log(CLASSES)).item()
            assert loss[row].item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


def _torch_and_ours(backend, logits, target, eps):
    """(ours, F.cross_entropy's) per-row float32 loss and gradient for upstream 1."""
    results = []
    for fn in (
        lambda x: label_smoothing_cross_entropy(x, target, eps, reduction="none", backend=backend),
        lambda x: F.cross_entropy(x, target, label_smoothing=eps, reduction="none"),
    ):
        x = logits.clone().requires_grad_()
        loss = fn(x)
        loss.sum().backward()
        results.append((loss.detach(), x.grad))
    return results


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_masked_rows_at_an_offset_match_torch(backend, eps):
    """An all -inf row (NaN, as torch), -inf logits inside a row at offset 1e4 (accurate; +inf
    loss with smoothing, as torch) and a masked first logit (the reference falls back to 0)."""
    logits, target, _, _ = _case(1e4, torch.float32, seed=11, rows=5)
    target[:] = torch.tensor([3, 4, 5, 100, 7])
    logits[1] = float("-inf")
    logits[2, 10:20] = float("-inf")
    logits[3, :8] = float("-inf")
    logits[3, 8:] -= 1e4  # without the offset: the first logit is no reference here
    (loss, grad), (ref_loss, ref_grad) = _torch_and_ours(backend, logits, target, eps)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert torch.isnan(loss[1]) and torch.isnan(grad[1]).all()
    assert torch.isfinite(loss[[0, 2, 3, 4]]).all() == (eps == 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("where", ["other", "target", "first"])
def test_pos_inf_logit_gives_nan_as_torch(backend, eps, where):
    logits, target, _, _ = _case(0.0, torch.float32, seed=13, rows=4)
    target[:] = torch.tensor([3, 4, 5, 6])
    logits[1, {"other": 7, "target": 4, "first": 0}[where]] = float("inf")
    (loss, grad), (ref_loss, ref_grad) = _torch_and_ours(backend, logits, target, eps)
    assert torch.isnan(ref_loss[1]) and torch.isnan(loss[1]) and torch.isnan(grad[1]).all()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6, equal_nan=True)


# ------------------------------------------------------------------------------------------------
# The fused head at a large offset (through its bias)
# ------------------------------------------------------------------------------------------------


def _head_case(offset: float, seed: int = 17, features: int = 32):
    """hidden, weight and bias of dyadic values whose float32 logits are exact at these offsets,
    so that every implementation sees the same logits."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randint(-4, 5, (ROWS, features), generator=gen) / 4.0
    weight = torch.randint(-4, 5, (CLASSES, features), generator=gen) / 8.0
    bias = offset + torch.randint(-32, 33, (CLASSES,), generator=gen) / 32.0
    target = torch.randint(0, CLASSES, (ROWS,), generator=gen)
    target[::9] = IGNORE
    exact = F.linear(hidden.double(), weight.double(), bias.double())
    assert torch.equal(F.linear(hidden, weight, bias).double(), exact)
    return hidden, weight, bias, target


def _head_loss_and_grads(loss_fn, inputs, reduction, upstream):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    loss = loss_fn(*leaves, reduction)
    loss.backward(upstream.to(loss.dtype) if reduction == "none" else None)
    return loss.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [0.0, 1e4, 1e5])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_head_large_bias(backend, offset, reduction):
    hidden, weight, bias, target = _head_case(offset)
    upstream = torch.rand(ROWS, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eps = 0.1

    def ours_fn(h, w, b, reduction):
        return linear_label_smoothing_cross_entropy(
            h, w, target, eps, bias=b, reduction=reduction, backend=backend
        )

    def torch_fn(h, w, b, reduction):
        return F.cross_entropy(F.linear(h, w, b), target, label_smoothing=eps, reduction=reduction)

    def ref_fn(h, w, b, reduction):
        return dense_loss(F.linear(h, w, b), target, eps, reduction=reduction)

    inputs = (hidden, weight, bias)
    ref_loss, ref_grads = _head_loss_and_grads(
        ref_fn, [t.double() for t in inputs], reduction, upstream
    )
    errors = {}
    for name, fn in (("ours", ours_fn), ("torch", torch_fn)):
        loss, grads = _head_loss_and_grads(fn, inputs, reduction, upstream)
        errors[name] = [(loss.double() - ref_loss).abs().max().item()] + [
            ((g.double() - r).abs().max() / r.abs().max()).item()
            for g, r in zip(grads, ref_grads, strict=True)
        ]
    unit = torch.finfo(torch.float32).eps
    floors = [4 * unit * max(1.0, ref_loss.abs().max().item())] + [4 * unit] * 3
    for what, ours, theirs, floor in zip(
        ("loss", "hidden", "weight", "bias"), errors["ours"], errors["torch"], floors, strict=True
    ):
        assert ours <= 8 * max(theirs, floor), f"{what}: {ours:.3g} vs torch {theirs:.3g}"
