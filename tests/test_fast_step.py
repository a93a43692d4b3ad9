"""The C++ route of plain eager CPU calls (lsr_fused.fast_step, csrc/train_step.cpp) against the
Python route it replaces: the same bits for the loss and the gradient, in every case the route
takes; the Python route for everything it does not take; and the float64 reference besides."""

from __future__ import annotations

import pytest
import torch
from reference import dense_loss
from torch import Tensor
from torch.autograd import gradcheck, gradgradcheck

import lsr_fused
from lsr_fused import fast_step
from lsr_fused.errors import TargetIndexError

pytestmark = pytest.mark.skipif(
    fast_step._train_step_op() is None, reason="the C++ extension is not loaded"
)

loss_fn = lsr_fused.label_smoothing_cross_entropy


@pytest.fixture
def python_route(monkeypatch):
    """Calls made inside ``with python_route():`` take the Python route."""

    class Switch:
        def __enter__(self):
            monkeypatch.setattr(fast_step, "train_step", lambda *args: None)

        def __exit__(self, *exc):
            monkeypatch.undo()

    return Switch


def _inputs(rows, classes, dtype, seed=0, ignored=True):
    generator = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(rows, classes, generator=generator, dtype=torch.float64)).to(dtype)
    target = torch.randint(0, classes, (rows,), generator=generator)
    if ignored and rows > 2:
        target[1] = -100
    return logits, target


def _step(logits, target, upstream=None, **kwargs):
    leaf = logits.detach().clone().requires_grad_()
    loss = loss_fn(leaf, target, **kwargs)
    loss.backward(None if upstream is None else torch.tensor(upstream))
    return loss, leaf.grad, loss.grad_fn


def _dense(logits, target, label_smoothing=0.1, **options):
    return dense_loss(logits, target, label_smoothing, **options)


def _is_fast(grad_fn) -> bool:
    return grad_fn is not None and "TrainStep" in grad_fn.name()


def _same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.reshape(-1).view(_int(a)), b.reshape(-1).view(_int(b)))


def _int(t):
    """The integer dtype of ``t``'s width: its bits, compared exactly (NaN included)."""
    return {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]


def _same_bits_on_both_routes(run, python_route):
    """``run() -> (loss, grad, grad_fn)`` on the C++ route (which it must take) and on the Python
    route: the same bits for the loss and the gradient. Returns the C++ route's loss."""
    loss, grad, grad_fn = run()
    assert _is_fast(grad_fn)
    with python_route():
        ref_loss, ref_grad, ref_fn = run()
    assert not _is_fast(ref_fn)
    _same_bits(loss, ref_loss)
    _same_bits(grad, ref_grad)
    return loss


OPTIONS = [
    dict(label_smoothing=0.1),
    dict(label_smoothing=0.0, reduction="sum"),
    dict(label_smoothing=1.0, spread="others"),
    dict(label_smoothing=0.2, z_loss=1e-3, ignore_index=3),
    dict(label_smoothing=0.1, reduction="sum", spread="others", z_loss=0.5),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(8, 10), (256, 10), (5, 1000), (1, 2)])
@pytest.mark.parametrize(
    "options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items())
)
@pytest.mark.parametrize("upstream", [None, 2.5])
def test_same_bits_as_python_route(python_route, dtype, shape, options, upstream):
    logits, target = _inputs(*shape, dtype)
    if shape[0] > 2:
        target[1] = options.get("ignore_index", -100)
    loss, grad, grad_fn = _step(logits, target, upstream, **options)
    assert _is_fast(grad_fn)
    with python_route():
        ref_loss, ref_grad, ref_fn = _step(logits, target, upstream, **options)
    assert not _is_fast(ref_fn)
    _same_bits(loss, ref_loss)
    _same_bits(grad, ref_grad)
    # ... and both are the reference's answer.
    expected = _dense(logits.double(), target, **options)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(loss.double(), expected, rtol=tol, atol=tol)


LAYOUTS = {
    # name: (the leaf made from (N, C) logits, the (N, C) strided view of it the loss gets)
    "transposed": (lambda x: x.t().contiguous(), lambda leaf: leaf.t()),
    "padded-slice": (
        lambda x: torch.nn.functional.pad(x, (3, 3)),
        lambda leaf: leaf[:, 3:-3],
    ),
    "every-other-class": (lambda x: x.repeat_interleave(2, 1), lambda leaf: leaf[:, ::2]),
    "expanded-row": (lambda x: x[:1].clone(), lambda leaf: leaf.expand(6, -1)),
    "every-other-row": (lambda x: x.repeat_interleave(2, 0), lambda leaf: leaf[::2]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_strided_logits_same_bits(python_route, layout):
    logits, target = _inputs(6, 11, torch.float32)
    make_leaf, view_of = LAYOUTS[layout]

    def run():
        leaf = make_leaf(logits).requires_grad_()
        loss = loss_fn(view_of(leaf), target, label_smoothing=0.1)
        loss.backward()
        return loss, leaf.grad, loss.grad_fn

    loss = _same_bits_on_both_routes(run, python_route)
    expected = _dense(view_of(make_leaf(logits)).double(), target)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)


def test_non_leaf_and_parameter_logits(python_route):
    logits, target = _inputs(16, 10, torch.float32)
    weight = torch.nn.Parameter(torch.randn(10, 10))

    def run():
        weight.grad = None
        loss = loss_fn(logits @ weight, target)
        loss.backward()
        return loss, weight.grad.clone(), loss.grad_fn

    _same_bits_on_both_routes(run, python_route)
    parameter = torch.nn.Parameter(logits.clone())
    assert _is_fast(loss_fn(parameter, target).grad_fn)


def test_repeated_backward_agrees_bitwise():
    logits, target = _inputs(32, 10, torch.float32)
    leaf = logits.clone().requires_grad_()
    loss = loss_fn(leaf, target)
    first = torch.autograd.grad(loss, leaf, retain_graph=True)[0]
    second = torch.autograd.grad(loss, leaf, retain_graph=True)[0]
    third = torch.autograd.grad(loss, leaf, torch.tensor(3.0))[0]
    _same_bits(first, second)
    torch.testing.assert_close(third, 3 * first, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradcheck_and_double_backward(reduction):
    logits, target = _inputs(6, 5, torch.float64)
    leaf = logits.requires_grad_()
    assert _is_fast(loss_fn(leaf, target, reduction=reduction, z_loss=0.1).grad_fn)

    def fn(x):
        return loss_fn(x, target, 0.2, reduction=reduction, z_loss=0.1)

    assert gradcheck(fn, (leaf,))
    assert gradgradcheck(fn, (leaf,))


def test_double_backward_matches_python_route(python_route):
    logits, target = _inputs(8, 6, torch.float64)

    def penalty():
        leaf = logits.clone().requires_grad_()
        loss = loss_fn(leaf, target, 0.1, z_loss=0.01)
        (grad,) = torch.autograd.grad(loss, leaf, create_graph=True)
        (grad.square().sum() + loss).backward()
        return leaf.grad

    fast = penalty()
    with python_route():
        slow = penalty()
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-14)


def test_without_autograd_same_bits(python_route):
    logits, target = _inputs(32, 10, torch.float32)
    results = []
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            results.append(loss_fn(logits, target))
        with python_route(), mode():
            results.append(loss_fn(logits, target))
    results.append(loss_fn(logits, target))  # logits that do not require grad
    assert results[-1].grad_fn is None
    for result in results[1:]:
        _same_bits(result, results[0])


def test_bad_target_error_as_python_route(python_route):
    logits, target = _inputs(8, 10, torch.float32)
    target[5] = 10
    leaf = logits.requires_grad_()
    with pytest.raises(TargetIndexError) as fast_error:
        loss_fn(leaf, target)
    with python_route(), pytest.raises(TargetIndexError) as slow_error:
        loss_fn(leaf, target)
    assert str(fast_error.value) == str(slow_error.value)
    assert "10" in str(fast_error.value)


def test_all_ignored_and_empty():
    logits, target = _inputs(4, 10, torch.float32)
    target.fill_(-100)
    loss, grad, grad_fn = _step(logits, target)
    assert _is_fast(grad_fn) and torch.isnan(loss)
    assert torch.equal(grad, torch.zeros_like(grad))
    empty, empty_grad, _ = _step(torch.zeros(0, 5), torch.zeros(0, dtype=torch.int64), None,
                                 reduction="sum")  # fmt: skip
    assert empty.item() == 0 and empty_grad.shape == (0, 5)


def test_modified_logits_raise_in_backward():
    logits, target = _inputs(8, 10, torch.float32)
    x = logits.clone().requires_grad_() * 1.0
    loss = loss_fn(x, target)
    assert _is_fast(loss.grad_fn)
    with torch.no_grad():
        x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


CASES_NOT_TAKEN = {
    "weight": dict(weight=torch.ones(10)),
    "weight-requires-grad": dict(weight=torch.ones(10, requires_grad=True)),
    "weight-wrong-width": dict(weight=torch.ones(9)),
    "reduction-none": dict(reduction="none"),
    "softcap": dict(softcap=5.0),
    "stats": dict(return_stats=True),
    "inplace": dict(inplace_backward=True),
    "torch-backend": dict(backend="torch"),
    "mix": dict(mix_target=torch.zeros(8, dtype=torch.int64), mix_lambda=0.5),
}


@pytest.mark.parametrize("case", list(CASES_NOT_TAKEN))
def test_other_options_take_the_python_route(case):
    logits, target = _inputs(8, 10, torch.float32)
    if case == "weight-wrong-width":  # the Python route's error, not the C++ route's
        with pytest.raises(ValueError, match=r"weight must have shape \(10,\)"):
            loss_fn(logits.requires_grad_(), target, **CASES_NOT_TAKEN[case])
        return
    loss = loss_fn(logits.requires_grad_(), target, **CASES_NOT_TAKEN[case])
    loss = loss[0] if isinstance(loss, tuple) else loss
    assert not _is_fast(loss.sum().grad_fn.next_functions[0][0] if loss.dim() else loss.grad_fn)


@pytest.mark.parametrize(
    "make",
    [
        lambda x, t: (x.unsqueeze(-1), t.unsqueeze(-1)),  # (N, C, 1)
        lambda x, t: (x, t.int()),  # int32 targets
        lambda x, t: (x, torch.stack([t, t], 1)[:, 0]),  # strided targets
        lambda x, t: (x[:, :1], torch.zeros_like(t)),  # one class
    ],
    ids=["spatial", "int32-target", "strided-target", "one-class"],
)
def test_other_tensors_take_the_python_route(python_route, make):
    logits, target = _inputs(8, 10, torch.float32)
    x, t = make(logits.clone().requires_grad_(), target)
    loss = loss_fn(x, t)
    assert not _is_fast(loss.grad_fn)
    loss.backward()
    with python_route():
        ref = loss_fn(*make(logits, target))
    _same_bits(loss.detach(), ref)


@pytest.mark.parametrize(
    "logits",
    [torch.randn(10), torch.randn(4, 10, 3), [[0.0] * 10] * 4, torch.randn(4, 10).int()],
    ids=["1-D", "3-D", "list", "int"],
)
def test_weights_with_other_logits_fall_through(logits):
    """With class weights, logits the C++ route does not take reach the Python route's answer or
    its error (the weight's test must not read their shape first)."""
    weight = torch.rand(10) + 0.5
    target = torch.zeros(() if isinstance(logits, Tensor) and logits.dim() == 1 else 4).long()
    if isinstance(logits, Tensor) and logits.dim() == 3:
        target = torch.zeros(4, 3).long()
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        with pytest.raises(TypeError, match="logits must be"):
            loss_fn(logits, target, weight=weight)
        return
    expected = _dense(logits.double(), target, weight=weight.double())
    got = loss_fn(logits, target, weight=weight).double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_transforms_and_compile_take_the_op_route():
    logits, target = _inputs(4, 6, torch.float64)
    grad = torch.func.grad(lambda x: loss_fn(x, target))(logits)
    leaf = logits.clone().requires_grad_()
    loss_fn(leaf, target).backward()
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-12, atol=1e-14)
    compiled = torch.compile(lambda x: loss_fn(x, target), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(logits), loss_fn(logits, target), rtol=0, atol=0)


def test_module_takes_the_route(python_route):
    logits, target = _inputs(8, 10, torch.float32)
    module = lsr_fused.LabelSmoothingCE(0.1)
    leaf = logits.clone().requires_grad_()
    loss = module(leaf, target)
    assert _is_fast(loss.grad_fn)
    with python_route():
        _same_bits(loss.detach(), module(logits, target))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_op_with_class_weights_same_bits_as_python_route(dtype, reduction):
    # The route sends no weighted call to the op (test_parity watches those reach the Python
    # route's kernels), but the op's schema takes weights: they must give the Python route's bits.
    logits, target = _inputs(64, 12, dtype, seed=3)
    weight = (
        torch.rand(12, dtype=torch.float64).to(dtype if dtype != torch.bfloat16 else torch.float32)
        + 0.1
    )
    options = lsr_fused.LossOptions(0.2, reduction=reduction, z_loss=1e-3)
    params = options.row_params(12)
    leaf = logits.detach().clone().requires_grad_()
    loss = fast_step._train_step_op()(
        leaf, target, weight, params.target_extra, params.other_mass, params.z_loss,
        params.ignore_index, reduction == "mean",
    )  # fmt: skip
    loss.backward()
    assert _is_fast(loss.grad_fn)
    ref_loss, ref_grad, ref_fn = _step(logits, target, weight=weight, **options.keywords())
    assert not _is_fast(ref_fn)
    _same_bits(loss, ref_loss)
    _same_bits(leaf.grad, ref_grad)
    expected = _dense(logits.double(), target, 0.2, weight=weight.double(), reduction=reduction,
                      z_loss=1e-3)  # fmt: skip
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_op_refuses_class_weights_that_need_a_gradient():
    logits, target = _inputs(4, 5, torch.float32)
    weight = torch.ones(5, requires_grad=True)
    with pytest.raises(ValueError, match="class weights that need no gradient"):
        fast_step._train_step_op()(logits, target, weight, 0.9, 0.02, 0.0, -100, True)
