"""softcap, mixed targets and statistics through the public API (issue 22), every CPU backend,
against the float64 dense references of ``reference.py``; the probing table of hostile inputs
covers them too (test_probes.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import IGNORE, assert_close, dense_loss, dense_stats, tolerances

import lsr_fused
from lsr_fused import LabelSmoothingCE, LossOptions, LossStats, label_smoothing_cross_entropy
from lsr_fused import linear_label_smoothing_cross_entropy as linear_loss

BACKENDS = lsr_fused.available_backends("cpu")
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

CASES = {
    "softcap": dict(softcap=2.5),
    "softcap-z-others": dict(softcap=4.0, z_loss=1e-3, spread="others"),
    "mix-float": dict(mix="float"),
    "mix-per-element": dict(mix="tensor"),
    "mix-softcap-z": dict(mix="tensor", softcap=3.0, z_loss=2e-3),
}


def _case(shape, num_classes, case, generator, dtype=torch.float32, weighted=False):
    """Arguments for one call: logits, target (some ignored), mix arguments, class weights."""
    logits = (torch.randn(shape[0], num_classes, *shape[1:], generator=generator) * 4).to(dtype)
    target = torch.randint(0, num_classes, shape, generator=generator)
    target.view(-1)[::3] = IGNORE
    kwargs = {k: v for k, v in case.items() if k != "mix"}
    if case.get("mix"):
        mix_target = torch.randint(0, num_classes, shape, generator=generator)
        # Ignored elements' mix_target is not read: garbage there must not matter.
        mix_target.view(-1)[::3] = -12345
        lam = 0.3 if case["mix"] == "float" else torch.rand(shape, generator=generator)
        kwargs.update(mix_target=mix_target, mix_lambda=lam)
    if weighted:
        kwargs["weight"] = torch.rand(num_classes, generator=generator) + 0.5
    return logits, target, kwargs


def _reference(logits, target, eps, reduction, kwargs):
    return dense_loss(logits, target, eps, reduction=reduction, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_loss_and_gradient_match_the_dense_reference(backend, case, reduction, weighted):
    generator = torch.Generator().manual_seed(hash((str(case), reduction, weighted)) % 2**31)
    logits, target, kwargs = _case((7,), 37, case, generator, weighted=weighted)
    x = logits.clone().requires_grad_()
    loss = label_smoothing_cross_entropy(
        x, target, 0.1, reduction=reduction, backend=backend, **kwargs
    )
    ref_x = logits.double().requires_grad_()
    ref = _reference(ref_x, target, 0.1, reduction, kwargs)
    loss_tol, grad_tol = tolerances(torch.float32)
    assert_close(loss.detach(), ref.detach(), loss_tol, "loss")
    upstream = torch.rand(ref.shape, generator=generator, dtype=torch.float64) + 0.5
    (loss * upstream.float()).sum().backward()
    (ref * upstream).sum().backward()
    assert_close(x.grad, ref_x.grad, grad_tol, "gradient")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_with_every_feature(backend, dtype):
    generator = torch.Generator().manual_seed(5)
    case = dict(mix="tensor", softcap=3.0, z_loss=1e-3)
    logits, target, kwargs = _case((2, 3), 19, case, generator, dtype=dtype, weighted=True)
    x = logits.clone().requires_grad_()
    loss, stats = label_smoothing_cross_entropy(
        x, target, 0.2, backend=backend, return_stats=True, **kwargs
    )
    loss.backward()
    ref_x = logits.double().requires_grad_()
    ref = _reference(ref_x, target, 0.2, "mean", kwargs)
    ref.backward()
    loss_tol, grad_tol = tolerances(dtype)
    assert_close(loss.detach(), ref.detach(), loss_tol, "loss")
    assert_close(x.grad, ref_x.grad, grad_tol, "gradient")
    assert x.grad.dtype == dtype
    _check_stats(stats, logits, target, "mean", kwargs, 0.2)


def _check_stats(stats, logits, target, reduction, kwargs, eps):
    del eps
    ref_lse, ref_accuracy, ref_z = dense_stats(logits, target, reduction=reduction, **kwargs)
    assert isinstance(stats, LossStats)
    expected = torch.float64 if logits.dtype == torch.float64 else torch.float32
    for value in stats:
        assert value.dtype == expected and not value.requires_grad
    assert stats.lse.shape == target.shape
    assert_close(stats.lse, ref_lse, 2e-6, "lse")
    assert_close(stats.z_loss, ref_z, 2e-6, "z-loss term")
    torch.testing.assert_close(stats.accuracy.double(), ref_accuracy, rtol=0, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", [dict(), dict(softcap=2.0, z_loss=1e-2), dict(mix="tensor")])
def test_statistics_match_the_dense_reference(backend, reduction, case):
    generator = torch.Generator().manual_seed(9)
    logits, target, kwargs = _case((3, 4), 11, case, generator, weighted=True)
    kwargs.setdefault("z_loss", 1e-3)
    # Ties: a row whose maximum appears twice; torch.argmax takes the lowest index.
    logits[0, :, 0] = 0.0
    logits[0, 3, 0] = logits[0, 5, 0] = 50.0
    target[0, 0] = 5
    if "mix_target" in kwargs:
        kwargs["mix_target"][0, 0] = 2
    with torch.no_grad():
        plain = label_smoothing_cross_entropy(
            logits, target, 0.1, reduction=reduction, backend=backend, **kwargs
        )
    for grad in (False, True):
        x = logits.clone().requires_grad_(grad)
        loss, stats = label_smoothing_cross_entropy(
            x, target, 0.1, reduction=reduction, backend=backend, return_stats=True, **kwargs
        )
        # The statistics change nothing about the loss.
        torch.testing.assert_close(loss.detach(), plain, rtol=0, atol=0)
        _check_stats(stats, logits, target, reduction, kwargs, 0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_accuracy_counts_only_non_ignored_and_is_nan_when_all_are(backend):
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 9.0], [5.0, 1.0, 1.0]])
    target = torch.tensor([1, 1, IGNORE, 0])
    _, stats = label_smoothing_cross_entropy(logits, target, backend=backend, return_stats=True)
    assert stats.accuracy.item() == pytest.approx(2 / 3)
    _, stats = label_smoothing_cross_entropy(
        logits, torch.full((4,), IGNORE), backend=backend, return_stats=True
    )
    assert torch.isnan(stats.accuracy)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mix_lambda_one_or_equal_targets_is_the_plain_loss(backend):
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 13, generator=generator)
    target = torch.randint(0, 13, (6,), generator=generator)
    other = torch.randint(0, 13, (6,), generator=generator)
    weight = torch.rand(13, generator=generator) + 0.5
    plain = label_smoothing_cross_entropy(logits, target, weight=weight, backend=backend)
    for mix_target, lam in ((other, 1.0), (target, 0.37), (target, torch.rand(6))):
        mixed = label_smoothing_cross_entropy(
            logits, target, weight=weight, mix_target=mix_target, mix_lambda=lam, backend=backend
        )
        torch.testing.assert_close(mixed, plain, rtol=2e-6, atol=2e-6)
    # lam = 0 is the loss of the second target.
    swapped = label_smoothing_cross_entropy(
        logits, target, weight=weight, mix_target=other, mix_lambda=0.0, backend=backend
    )
    expected = dense_loss(logits, other, weight=weight)
    mean_with_other_weights = (
        dense_loss(logits, other, weight=weight, reduction="sum") / weight[other].sum()
    )
    torch.testing.assert_close(swapped.double(), expected, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(swapped.double(), mean_with_other_weights, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_caps_infinite_and_huge_logits(backend):
    logits = torch.tensor([[float("inf"), 0.0, 1.0], [1e30, -1e30, 3.0], [float("-inf"), 2, 1]])
    target = torch.tensor([1, 2, 0])
    x = logits.clone().requires_grad_()
    loss = label_smoothing_cross_entropy(x, target, 0.1, softcap=5.0, backend=backend)
    loss.backward()
    ref_x = logits.double().requires_grad_()
    ref = dense_loss(ref_x, target, 0.1, softcap=5.0)
    ref.backward()
    assert torch.isfinite(loss)
    assert_close(loss.detach(), ref.detach(), 2e-6, "loss")
    assert_close(x.grad, ref_x.grad, 2e-6, "gradient")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_module_takes_every_feature(backend, inplace):
    generator = torch.Generator().manual_seed(6)
    logits, target, kwargs = _case((5,), 9, dict(mix="tensor"), generator)
    module = LabelSmoothingCE(
        0.1, softcap=3.0, return_stats=True, backend=backend, inplace_backward=inplace
    )
    assert module.options == LossOptions(0.1, softcap=3.0, return_stats=True, backend=backend,
                                         inplace_backward=inplace)  # fmt: skip
    producer = logits.clone().requires_grad_()
    loss, stats = module(producer * 1.0, target, kwargs["mix_target"], kwargs["mix_lambda"])
    loss.backward()
    ref_x = logits.double().requires_grad_()
    ref = dense_loss(ref_x, target, 0.1, softcap=3.0, **kwargs)
    ref.backward()
    assert_close(loss.detach(), ref.detach(), 2e-6, "loss")
    assert_close(producer.grad, ref_x.grad, 2e-6, "gradient")
    _check_stats(stats, logits, target, "mean", dict(softcap=3.0, **kwargs), 0.1)
    module.softcap = None
    assert module.options.softcap is None
    with pytest.raises(ValueError, match="softcap"):
        module.softcap = -1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_differentiable_mix_lambda_and_weights_take_the_composite_path(backend):
    generator = torch.Generator().manual_seed(8)
    logits, target, kwargs = _case((6,), 7, dict(mix="tensor", softcap=2.0), generator)
    weight = (torch.rand(7, generator=generator) + 0.5).requires_grad_()
    lam = kwargs.pop("mix_lambda").requires_grad_()
    x = logits.clone().requires_grad_()
    loss = label_smoothing_cross_entropy(
        x, target, 0.1, weight=weight, mix_lambda=lam, backend=backend, **kwargs
    )
    grads = torch.autograd.grad(loss, (x, weight, lam))
    ref_inputs = [t.detach().double().requires_grad_() for t in (logits, weight, lam)]
    ref = dense_loss(
        ref_inputs[0], target, 0.1, weight=ref_inputs[1], mix_lambda=ref_inputs[2], **kwargs
    )
    ref_grads = torch.autograd.grad(ref, ref_inputs)
    assert_close(loss.detach(), ref.detach(), 2e-6, "loss")
    for name, ours, theirs in zip(("logits", "weight", "lam"), grads, ref_grads, strict=True):
        assert_close(ours, theirs, 2e-6, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_and_gradgradcheck_through_softcap_and_mix(backend):
    generator = torch.Generator().manual_seed(10)
    logits, target, kwargs = _case((4,), 5, dict(mix="tensor"), generator, dtype=torch.float64)
    x = logits.clone().requires_grad_()

    def loss_of(values):
        return label_smoothing_cross_entropy(
            values, target, 0.1, softcap=3.0, z_loss=1e-2, backend=backend, **kwargs
        )

    assert torch.autograd.gradcheck(loss_of, (x,))
    assert torch.autograd.gradgradcheck(loss_of, (x,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_head_takes_every_feature(backend):
    generator = torch.Generator().manual_seed(11)
    hidden = torch.randn(9, 6, generator=generator, requires_grad=True)
    weight = torch.randn(13, 6, generator=generator, requires_grad=True)
    bias = torch.randn(13, generator=generator, requires_grad=True)
    target = torch.randint(0, 13, (9,), generator=generator)
    target[::4] = IGNORE
    mix_target = torch.randint(0, 13, (9,), generator=generator)
    lam = torch.rand(9, generator=generator)
    options = dict(softcap=3.0, z_loss=1e-3, mix_target=mix_target, mix_lambda=lam)
    loss, stats = linear_loss(
        hidden, weight, target, 0.1, bias=bias, backend=backend, chunk_size=4,
        return_stats=True, **options,
    )  # fmt: skip
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    ref_inputs = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    logits = F.linear(*ref_inputs)
    ref = dense_loss(logits, target, 0.1, **options)
    ref_grads = torch.autograd.grad(ref, ref_inputs)
    assert_close(loss.detach(), ref.detach(), 2e-6, "loss")
    for name, ours, theirs in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=True):
        assert_close(ours, theirs, 2e-5, name)
    # float32 logits: the statistics' dtype is the accumulation dtype of the head's inputs.
    _check_stats(stats, F.linear(hidden, weight, bias).detach(), target, "mean", options, 0.1)


Y2 = torch.zeros(4, dtype=torch.long)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(softcap=0.0), ValueError, "softcap"),
        (dict(softcap=float("inf")), ValueError, "softcap"),
        (dict(softcap=True), TypeError, "softcap"),
        (dict(softcap="1"), TypeError, "softcap"),
        (dict(return_stats=1), TypeError, "return_stats"),
        (dict(mix_lambda=0.5), ValueError, "mix_lambda"),
        (dict(mix_target=Y2, mix_lambda=1.5), ValueError, "mix_lambda"),
        (dict(mix_target=Y2, mix_lambda="a"), TypeError, "mix_lambda"),
        (dict(mix_target=Y2, mix_lambda=torch.ones(3)), ValueError,
         "mix_lambda"),
        (dict(mix_target=Y2, mix_lambda=torch.ones(4, dtype=torch.long)),
         TypeError, "mix_lambda"),
        (dict(mix_target=torch.zeros(3, dtype=torch.long)), ValueError, "mix_target"),
        (dict(mix_target=torch.zeros(4)), TypeError, "mix_target"),
        (dict(mix_target=[0, 1, 2, 3]), TypeError, "mix_target"),
        (dict(mix_target=torch.tensor([0, 1, 5, 2])), IndexError, "mix_target contains 5"),
        (dict(mix_target=torch.tensor([0, 1, -100, 2])), IndexError, "mix_target contains -100"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_new_arguments_raise_errors_naming_them(kwargs, error, match, backend):
    logits = torch.randn(4, 5)
    target = torch.tensor([0, 1, 2, 3])
    with pytest.raises(error, match=match):
        label_smoothing_cross_entropy(logits, target, backend=backend, **kwargs)


def test_mix_target_of_an_ignored_element_is_not_read():
    logits = torch.randn(3, 5)
    target = torch.tensor([IGNORE, 1, 2])
    mixed = label_smoothing_cross_entropy(
        logits, target, mix_target=torch.tensor([999, 1, 2]), mix_lambda=0.5
    )
    torch.testing.assert_close(mixed, label_smoothing_cross_entropy(logits, target))


def test_torch_compile_fullgraph_with_every_feature():
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(12)
    logits, target, kwargs = _case((6,), 9, dict(mix="tensor"), generator)

    def step(x, t, y2, lam):
        loss, stats = label_smoothing_cross_entropy(
            x, t, 0.1, softcap=3.0, mix_target=y2, mix_lambda=lam, return_stats=True
        )
        return loss, stats.accuracy

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = logits.clone().requires_grad_()
    loss, accuracy = compiled(x, target, kwargs["mix_target"], kwargs["mix_lambda"])
    loss.backward()
    eager_x = logits.clone().requires_grad_()
    eager_loss, eager_accuracy = step(eager_x, target, kwargs["mix_target"], kwargs["mix_lambda"])
    eager_loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(accuracy, eager_accuracy)
    torch.testing.assert_close(x.grad, eager_x.grad)
