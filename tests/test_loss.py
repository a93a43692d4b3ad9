"""Parity of every backend against the dense reference and F.cross_entropy, forward and backward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from reference import dense_loss

import lsr_fused
from lsr_fused import LabelSmoothingCE, label_smoothing_cross_entropy
from lsr_fused._params import RowParams

BACKENDS = lsr_fused.available_backends("cpu")
# "auto" is the user's default; it must agree too, whatever it picks.
ALL_BACKENDS = [*BACKENDS, "auto"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def tolerances(dtype):
    """(loss tolerance, gradient tolerance) relative to the reference's scale."""
    if dtype == torch.float64:
        return 1e-10, 1e-10
    if dtype == torch.float32:
        return 2e-6, 2e-6
    # Half inputs: the loss is exact on the rounded inputs; the gradient is rounded on output.
    return 2e-6, 1e-2


def random_case(shape, dtype, *, ignore_some=True, num_classes_dim=1, seed=None):
    generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    logits = (torch.randn(shape, generator=generator, dtype=torch.float64) * 3).to(dtype)
    num_classes = shape[num_classes_dim] if len(shape) > 1 else shape[0]
    target_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    target = torch.randint(0, num_classes, target_shape, generator=generator)
    if ignore_some and target.numel() > 2:
        target.view(-1)[:: max(2, target.numel() // 3)] = -100
    return logits, target


def run_both(logits, target, *, backend, eps=0.1, **options):
    """Our loss and gradient next to the dense reference's, for comparison."""
    ours_input = logits.detach().clone().requires_grad_()
    loss = label_smoothing_cross_entropy(ours_input, target, eps, backend=backend, **options)
    upstream = torch.randn_like(loss, dtype=loss.dtype) if loss.dim() else torch.tensor(1.7)
    (grad,) = torch.autograd.grad(loss, ours_input, upstream.to(loss.dtype))
    ref_input = logits.detach().double().requires_grad_()
    ref = dense_loss(ref_input, target, eps, **options)
    (ref_grad,) = torch.autograd.grad(ref, ref_input, upstream.double())
    return loss, grad, ref, ref_grad


def assert_close(ours, ref, rel_tol):
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    scale = ref.abs().max().item() if ref.numel() else 1.0
    torch.testing.assert_close(
        ours.double(), ref, atol=rel_tol * max(scale, 1.0), rtol=rel_tol, equal_nan=True
    )


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_dtypes_and_reductions(backend, dtype, reduction):
    logits, target = random_case((9, 37), dtype)
    loss, grad, ref, ref_grad = run_both(logits, target, backend=backend, reduction=reduction)
    loss_tol, grad_tol = tolerances(dtype)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype
    assert_close(loss, ref, loss_tol)
    assert_close(grad, ref_grad, grad_tol)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("spread", ["all", "others"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_options(backend, spread, weighted, z_loss, reduction):
    logits, target = random_case((11, 23), torch.float32)
    weight = torch.rand(23) + 0.1 if weighted else None
    eps = float(torch.rand(()).item()) * 0.5
    loss, grad, ref, ref_grad = run_both(
        logits,
        target,
        backend=backend,
        eps=eps,
        spread=spread,
        weight=weight,
        z_loss=z_loss,
        reduction=reduction,
        ignore_index=-100,
    )
    assert_close(loss, ref, 2e-6)
    assert_close(grad, ref_grad, 2e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
def test_matches_torch_cross_entropy(backend, weighted, reduction, eps):
    logits, target = random_case((8, 5, 3), torch.float32)
    weight = torch.rand(5) + 0.5 if weighted else None
    x = logits.clone().requires_grad_()
    ours = label_smoothing_cross_entropy(
        x, target, eps, weight=weight, reduction=reduction, backend=backend
    )
    x_ref = logits.clone().requires_grad_()
    ref = F.cross_entropy(x_ref, target, weight=weight, reduction=reduction, label_smoothing=eps)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad(ours.sum(), x)
    (ref_grad,) = torch.autograd.grad(ref.sum(), x_ref)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    "shape", [(13,), (4, 6), (3, 7, 5), (2, 4, 3, 5), (1, 1), (5, 1), (6, 2)], ids=str
)
def test_layouts(backend, shape):
    logits, target = random_case(shape, torch.float32, ignore_some=len(shape) > 1)
    for reduction in ("none", "mean"):
        loss, grad, ref, ref_grad = run_both(logits, target, backend=backend, reduction=reduction)
        assert_close(loss, ref, 2e-6)
        assert_close(grad, ref_grad, 2e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("view", ["transposed", "strided", "channels_last", "sliced_classes"])
def test_non_contiguous_logits(backend, view):
    if view == "transposed":
        logits = torch.randn(17, 6).t()
    elif view == "strided":
        logits = torch.randn(12, 40)[::2, 3:30]
    elif view == "channels_last":
        logits = torch.randn(2, 5, 3, 4).to(memory_format=torch.channels_last)
    else:
        logits = torch.randn(6, 30)[:, ::3]
    assert not logits.is_contiguous()
    target = torch.randint(0, logits.shape[1], logits.shape[:1] + logits.shape[2:])
    loss, grad, ref, ref_grad = run_both(logits, target, backend=backend, reduction="none")
    assert_close(loss, ref, 2e-6)
    assert_close(grad, ref_grad, 2e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_int32_targets(backend):
    logits, target = random_case((7, 9), torch.float32)
    loss, grad, ref, ref_grad = run_both(logits, target.int(), backend=backend)
    assert_close(loss, ref, 2e-6)
    assert_close(grad, ref_grad, 2e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_longer_than_one_block(backend, dtype):
    # 9000 is not a power of two and exceeds every block size the kernels use for these dtypes.
    logits, target = random_case((3, 9000), dtype)
    loss, grad, ref, ref_grad = run_both(logits, target, backend=backend, reduction="none")
    loss_tol, grad_tol = tolerances(dtype)
    assert_close(loss, ref, loss_tol)
    assert_close(grad, ref_grad, grad_tol)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_empty_batch(backend, reduction):
    logits = torch.randn(0, 10, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long)
    ours = label_smoothing_cross_entropy(logits, target, reduction=reduction, backend=backend)
    ref = F.cross_entropy(logits, target, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(ours, ref, equal_nan=True)
    if reduction != "mean":
        (grad,) = torch.autograd.grad(ours.sum(), logits)
        assert grad.shape == (0, 10)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("weighted", [False, True])
def test_all_targets_ignored(backend, weighted):
    logits = torch.randn(4, 7, requires_grad=True)
    target = torch.full((4,), -100)
    weight = torch.rand(7) if weighted else None
    mean = label_smoothing_cross_entropy(logits, target, weight=weight, backend=backend)
    assert math.isnan(mean.item())
    total = label_smoothing_cross_entropy(
        logits, target, weight=weight, reduction="sum", backend=backend
    )
    per_row = label_smoothing_cross_entropy(
        logits, target, weight=weight, reduction="none", backend=backend
    )
    assert total.item() == 0.0
    assert torch.equal(per_row, torch.zeros(4))
    (grad,) = torch.autograd.grad(total, logits)
    assert torch.equal(grad, torch.zeros(4, 7))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("ignore_index", [0, 3, -1])
def test_ignore_index_inside_class_range(backend, ignore_index):
    logits, target = random_case((10, 5), torch.float32, ignore_some=False)
    target[::2] = ignore_index
    loss, grad, ref, ref_grad = run_both(logits, target, backend=backend, ignore_index=ignore_index)
    assert_close(loss, ref, 2e-6)
    assert_close(grad, ref_grad, 2e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("width", [5000, 9000])
def test_masked_leading_block_is_not_nan(backend, width):
    # A whole leading block of -inf (masked vocabulary): without smoothing, PyTorch is finite here.
    logits = torch.randn(3, width)
    logits[:, : width - 700] = float("-inf")
    target = torch.randint(width - 700, width, (3,))
    x = logits.clone().requires_grad_()
    ours = label_smoothing_cross_entropy(x, target, 0.0, z_loss=1e-4, backend=backend)
    x_ref = logits.clone().requires_grad_()
    ref = F.cross_entropy(x_ref, target) + 1e-4 * (torch.logsumexp(x_ref, -1) ** 2).mean()
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours, ref)
    (grad,) = torch.autograd.grad(ours, x)
    (ref_grad,) = torch.autograd.grad(ref, x_ref)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_masked_logits_with_smoothing_match_torch(backend):
    # With smoothing, a -inf logit carries smoothing mass: PyTorch says +inf; so must we (not NaN).
    logits = torch.randn(2, 50)
    logits[:, :10] = float("-inf")
    target = torch.tensor([20, 30])
    ours = label_smoothing_cross_entropy(logits, target, 0.1, reduction="none", backend=backend)
    ref = F.cross_entropy(logits, target, label_smoothing=0.1, reduction="none")
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_magnitude_half_logits(backend, dtype):
    logits = (torch.randn(6, 300) * 1e4).clamp(-6e4, 6e4).to(dtype)
    target = torch.randint(0, 300, (6,))
    loss, grad, ref, ref_grad = run_both(logits, target, backend=backend, reduction="none")
    assert torch.isfinite(loss).all()
    assert_close(loss, ref, 2e-6)
    assert_close(grad, ref_grad, 1e-2)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bf16_loss_is_float32_not_rounded(backend):
    logits = (torch.randn(64, 1000) * 4).bfloat16()
    target = torch.randint(0, 1000, (64,))
    ours = label_smoothing_cross_entropy(logits, target, backend=backend)
    ref = dense_loss(logits, target)
    assert ours.dtype == torch.float32
    assert abs(ours.item() - ref.item()) < 1e-5 * abs(ref.item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spread", ["all", "others"])
def test_gradcheck_float64(backend, spread):
    logits = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1, -100, 5, 0])
    weight = torch.rand(6, dtype=torch.float64) + 0.2

    def loss_fn(x):
        return label_smoothing_cross_entropy(
            x,
            target,
            0.2,
            spread=spread,
            weight=weight,
            z_loss=0.01,
            reduction="none",
            backend=backend,
        )

    assert torch.autograd.gradcheck(loss_fn, (logits,))


class TestInplaceBackward:
    @pytest.mark.parametrize("backend", ALL_BACKENDS)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_same_gradient_written_into_logits(self, backend, dtype):
        source = torch.randn(6, 50, dtype=torch.float64).to(dtype).requires_grad_()
        target = torch.randint(0, 50, (6,))
        logits = source * 1  # a non-leaf, like the output of a linear layer
        storage = logits.data_ptr()
        loss = label_smoothing_cross_entropy(logits, target, inplace_backward=True, backend=backend)
        (grad,) = torch.autograd.grad(loss, logits)
        assert grad.data_ptr() == storage
        ref_input = source.detach().double().requires_grad_()
        (ref_grad,) = torch.autograd.grad(dense_loss(ref_input, target), ref_input)
        assert_close(grad, ref_grad, tolerances(dtype)[1])

    @pytest.mark.parametrize("backend", ALL_BACKENDS)
    def test_gradient_reaches_the_producer(self, backend):
        linear = torch.nn.Linear(8, 12)
        features = torch.randn(5, 8)
        target = torch.randint(0, 12, (5,))
        label_smoothing_cross_entropy(
            linear(features), target, inplace_backward=True, backend=backend
        ).backward()
        inplace_grad = linear.weight.grad.clone()
        linear.weight.grad = None
        F.cross_entropy(linear(features), target, label_smoothing=0.1).backward()
        torch.testing.assert_close(inplace_grad, linear.weight.grad)

    @pytest.mark.parametrize("backend", ALL_BACKENDS)
    def test_other_use_of_the_logits_is_caught(self, backend):
        source = torch.randn(4, 10, requires_grad=True)
        logits = source * 2
        other = (logits * logits).sum()  # saves `logits` for its own backward
        loss = label_smoothing_cross_entropy(
            logits, torch.randint(0, 10, (4,)), inplace_backward=True, backend=backend
        )
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            (loss + other).backward()

    @pytest.mark.parametrize("backend", ALL_BACKENDS)
    def test_leaf_logits_are_left_intact(self, backend):
        logits = torch.randn(4, 10, requires_grad=True)
        before = logits.detach().clone()
        target = torch.randint(0, 10, (4,))
        label_smoothing_cross_entropy(
            logits, target, inplace_backward=True, backend=backend
        ).backward()
        assert torch.equal(logits.detach(), before)
        ref = before.clone().requires_grad_()
        F.cross_entropy(ref, target, label_smoothing=0.1).backward()
        torch.testing.assert_close(logits.grad, ref.grad)


def test_module_matches_functional_and_carries_weight():
    weight = torch.rand(7) + 0.5
    module = LabelSmoothingCE(0.2, weight=weight, reduction="sum", spread="others")
    assert "weight" in module.state_dict()
    logits, target = random_case((5, 7), torch.float32)
    torch.testing.assert_close(
        module(logits, target),
        dense_loss(logits, target, 0.2, weight=weight, reduction="sum", spread="others").float(),
    )


def test_module_rejects_bad_options_at_construction():
    with pytest.raises(ValueError, match="reduction"):
        LabelSmoothingCE(reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        LabelSmoothingCE(label_smoothing=-0.1)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton (CUDA or TRITON_INTERPRET=1)")
class TestGradientInForward:
    """The Triton training path writes the gradient in forward for the expected upstream value."""

    @pytest.mark.parametrize("reduction", ["mean", "sum"])
    @pytest.mark.parametrize("upstream", [1.0, 3.0, 0.0])
    def test_any_upstream_gives_the_exact_gradient(self, monkeypatch, reduction, upstream):
        calls = []
        original = lsr_fused.functional.ops.fused_forward_with_grad
        monkeypatch.setattr(
            lsr_fused.functional.ops,
            "fused_forward_with_grad",
            lambda *args: calls.append(1) or original(*args),
        )
        logits, target = random_case((6, 300), torch.float32)
        weight = torch.rand(300) + 0.5
        x = logits.clone().requires_grad_()
        loss = label_smoothing_cross_entropy(
            x, target, 0.1, weight=weight, reduction=reduction, backend="triton"
        )
        (loss * upstream).backward()
        assert calls, "the training path was not taken"
        ref_input = logits.double().requires_grad_()
        ref = dense_loss(ref_input, target, 0.1, weight=weight, reduction=reduction)
        (ref * upstream).backward()
        assert_close(x.grad, ref_input.grad, 2e-6)

    @pytest.mark.parametrize("reduction", ["mean", "sum"])
    @pytest.mark.parametrize("weighted", [False, True])
    def test_plain_backward_needs_no_second_pass(self, monkeypatch, reduction, weighted):
        # loss.backward() must hit the guess exactly in every row, or the GPU pays a second pass.
        from lsr_fused.backends import triton_backend

        seen = []
        original = triton_backend.backward

        def spy(grad_loss, *args):
            seen.append((grad_loss.clone(), args[-1]))
            return original(grad_loss, *args)

        monkeypatch.setattr(triton_backend, "backward", spy)
        logits, target = random_case((9, 50), torch.float32)
        weight = torch.rand(50) + 0.3 if weighted else None
        x = logits.clone().requires_grad_()
        label_smoothing_cross_entropy(
            x, target, weight=weight, reduction=reduction, backend="triton"
        ).backward()
        ((grad_loss, guess),) = seen
        assert guess is not None
        assert torch.equal(grad_loss, guess.expand_as(grad_loss))

    def test_second_backward_does_not_corrupt_the_first_gradient(self):
        logits, target = random_case((5, 40), torch.float32)
        x = logits.clone().requires_grad_()
        loss = label_smoothing_cross_entropy(x, target, 0.1, backend="triton")
        (first,) = torch.autograd.grad(loss, x, retain_graph=True)
        kept = first.clone()
        (second,) = torch.autograd.grad(loss * 2.0, x)
        ref_input = logits.double().requires_grad_()
        (ref,) = torch.autograd.grad(dense_loss(ref_input, target), ref_input)
        assert torch.equal(first, kept)
        assert_close(first, ref, 2e-6)
        assert_close(second, 2.0 * ref, 2e-6)

    def test_backward_touches_only_rows_whose_upstream_differs(self):
        from lsr_fused.backends import triton_backend

        logits = torch.randn(4, 1, 30)
        target = torch.tensor([1, 2, 3, 4])
        params = RowParams(0.9, 0.1 / 30, 0.0, -100)
        _, lse = triton_backend.forward(logits, target, None, None, params)
        guess = torch.tensor([0.25])
        grad_loss = torch.tensor([0.25, 0.5, 0.25, 1.0])
        sentinel = torch.full_like(logits, 7.0)
        triton_backend.backward(grad_loss, logits, target, None, None, lse, params, sentinel, guess)
        assert torch.equal(sentinel[[0, 2]], torch.full((2, 1, 30), 7.0))
        fresh = torch.empty_like(logits)
        triton_backend.backward(grad_loss, logits, target, None, None, lse, params, fresh)
        torch.testing.assert_close(sentinel[[1, 3]], fresh[[1, 3]])

    def test_compiled_training_step(self):
        torch._dynamo.reset()
        model = torch.nn.Linear(6, 20)
        features, target = torch.randn(7, 6), torch.randint(0, 20, (7,))

        @torch.compile(fullgraph=True, backend="aot_eager")
        def step(inputs, labels):
            return label_smoothing_cross_entropy(model(inputs), labels, 0.1, backend="triton")

        step(features, target).backward()
        compiled_grad = model.weight.grad.clone()
        model.zero_grad()
        F.cross_entropy(model(features), target, label_smoothing=0.1).backward()
        torch.testing.assert_close(compiled_grad, model.weight.grad)
