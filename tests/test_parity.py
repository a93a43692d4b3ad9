"""Numerical parity, forward and backward: every backend against the dense float64 reference
(``reference.dense_loss``) and ``F.cross_entropy`` through the public API, and the compiled C++
kernels against the torch backend on identical inputs, on both of their paths (``mode``): the plain
forward then backward, and the forward that writes the gradient for an expected upstream value.

The same comparisons on a GPU live in ``test_cuda_parity.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from reference import IGNORE, assert_close, dense_loss, random_case, row_params, tolerances

import lsr_fused
from lsr_fused import label_smoothing_cross_entropy
from lsr_fused.backends import cpp_backend, torch_backend

BACKENDS = lsr_fused.available_backends("cpu")
# "auto" is the user's default; it must agree too, whatever it picks.
ALL_BACKENDS = [*BACKENDS, "auto"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
needs_triton = pytest.mark.skipif(
    "triton" not in BACKENDS, reason="needs triton (CUDA or TRITON_INTERPRET=1)"
)


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


# ------------------------------------------------------------------------------------------------
# The public API against the dense reference and F.cross_entropy
# ------------------------------------------------------------------------------------------------


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


# The training path: a backend that writes the gradient in forward (the C++ kernels on the CPU,
# "auto" choosing them, Triton) gives the exact gradient whatever upstream value reaches it.
GRAD_IN_FORWARD_BACKENDS = ["cpp", "auto", pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("upstream", [1.0, 3.0, 0.0])
@pytest.mark.parametrize("backend", GRAD_IN_FORWARD_BACKENDS)
def test_gradient_in_forward_is_exact_for_any_upstream(
    request, monkeypatch, backend, reduction, upstream
):
    taken = "triton" if backend == "triton" else "cpp"
    if taken == "cpp":
        request.getfixturevalue("cpp")  # skips when the C++ backend is unavailable
    calls = []
    # The op body, which both routes run: the eager one (taken here) and the op dispatcher's.
    original = lsr_fused.ops._forward_with_grad_impl
    monkeypatch.setattr(
        lsr_fused.ops,
        "_forward_with_grad_impl",
        lambda *args: calls.append(args[-1]) or original(*args),
    )
    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(6, 300, generator=gen) * 3
    target = torch.randint(0, 300, (6,), generator=gen)
    target[::4] = IGNORE
    weight = torch.rand(300, generator=gen) + 0.5
    x = logits.clone().requires_grad_()
    loss = label_smoothing_cross_entropy(
        x, target, 0.1, weight=weight, reduction=reduction, backend=backend
    )
    (loss * upstream).backward()
    assert calls == [taken], "the gradient-in-forward path was not taken"
    ref_input = logits.double().requires_grad_()
    ref = dense_loss(ref_input, target, 0.1, weight=weight, reduction=reduction)
    (ref * upstream).backward()
    torch.testing.assert_close(x.grad.double(), ref_input.grad, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=needs_triton)])
def test_second_backward_does_not_corrupt_the_first_gradient(request, backend):
    if backend == "cpp":
        request.getfixturevalue("cpp")
    logits, target = random_case((5, 40), torch.float32)
    x = logits.clone().requires_grad_()
    loss = label_smoothing_cross_entropy(x, target, 0.1, backend=backend)
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    kept = first.clone()
    (second,) = torch.autograd.grad(loss * 2.0, x)
    ref_input = logits.double().requires_grad_()
    (ref,) = torch.autograd.grad(dense_loss(ref_input, target), ref_input)
    assert torch.equal(first, kept)
    torch.testing.assert_close(first.double(), ref, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(second.double(), 2.0 * ref, rtol=2e-6, atol=2e-6)


# ------------------------------------------------------------------------------------------------
# The C++ kernels (csrc/) against the torch backend, called through lsr_fused.backends
# ------------------------------------------------------------------------------------------------
# mode "plain": forward, then backward for a random upstream per row.
# mode "grad_in_forward": forward(..., grad_logits, grad_guess) writes the gradient for upstream
# `guess` in every row (WRITES_GRAD_IN_FORWARD); backward(..., grad_guess) rewrites only the rows
# whose upstream differs from the guess. Contiguous rows of up to 512 KiB of exp values take the
# pipelined single-exp path (softmax as exp(x - max) / sum: within rounding of, not bit for bit,
# what backward writes), other layouts and longer rows the general one, and rows with non-finite
# statistics fall back to it.

MODES = ["plain", "grad_in_forward"]


@pytest.fixture(params=["default", "avx2", "avx512"])
def capability(request, cpp):
    previous = cpp.cpu_capability()
    try:
        cpp.set_cpu_capability(request.param)
    except ValueError:
        pytest.skip(f"CPU kernels for {request.param} not available on this machine/build")
    yield request.param
    cpp.set_cpu_capability(previous)


def _supported_capabilities() -> list[str]:
    if not cpp_backend.is_available():
        return ["default"]
    names = []
    current = cpp_backend.cpu_capability()
    for name in ("default", "avx2", "avx512"):
        try:
            cpp_backend.set_cpu_capability(name)
        except ValueError:
            continue
        names.append(name)
    cpp_backend.set_cpu_capability(current)
    return names


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _targets(rows: int, num_classes: int, ignore_every: int = 4, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    target = torch.randint(0, max(num_classes, 1), (rows,), generator=gen)
    target[::ignore_every] = IGNORE
    return target


def _weights(num_classes: int, dtype: torch.dtype, weighted: bool):
    if not weighted:
        return None, None
    gen = torch.Generator().manual_seed(1)
    weight = (torch.rand(num_classes, generator=gen, dtype=torch.float64) + 0.5).to(_acc(dtype))
    return weight, weight.sum().reshape(1)


def _run_both(x, target, weight, weight_total, params, grad_loss=None, grad_out=None):
    """Forward + backward with both backends; returns ((loss, lse, grad) cpp, (…) torch)."""
    rows = target.numel()
    if grad_loss is None:
        gen = torch.Generator().manual_seed(2)
        grad_loss = torch.rand(rows, generator=gen, dtype=torch.float64).to(_acc(x.dtype))
    ref_loss, ref_lse = torch_backend.forward(x, target, weight, weight_total, params)
    ref_grad = torch.empty(x.shape, dtype=x.dtype)
    torch_backend.backward(grad_loss, x, target, weight, weight_total, ref_lse, params, ref_grad)

    loss, lse = cpp_backend.forward(x, target, weight, weight_total, params)
    grad = torch.empty_like(x) if grad_out is None else grad_out
    cpp_backend.backward(grad_loss, x, target, weight, weight_total, lse, params, grad)
    return (loss, lse, grad), (ref_loss, ref_lse, ref_grad)


def _with_grad_both(x, target, weight, weight_total, params, guess=0.25, grad_out=None):
    """Forward writing the gradient for upstream ``guess``, next to the torch backend's forward +
    backward for a ``grad_loss`` of ``guess`` in every row. Returns (ours, ref) like _run_both."""
    acc = _acc(x.dtype)
    grad_guess = torch.tensor([guess], dtype=acc)
    grad = torch.empty_like(x) if grad_out is None else grad_out
    loss, lse = cpp_backend.forward(x, target, weight, weight_total, params, grad, grad_guess)
    ref_loss, ref_lse = torch_backend.forward(x, target, weight, weight_total, params)
    ref_grad = torch.empty(x.shape, dtype=x.dtype)
    grad_loss = torch.full((target.numel(),), guess, dtype=acc)
    torch_backend.backward(grad_loss, x, target, weight, weight_total, ref_lse, params, ref_grad)
    return (loss, lse, grad), (ref_loss, ref_lse, ref_grad)


def _run(mode, x, target, weight, weight_total, params, *, guess=0.25, grad_out=None):
    """``_run_both`` or ``_with_grad_both`` (for upstream ``guess``), as ``mode`` says."""
    if mode == "plain":
        return _run_both(x, target, weight, weight_total, params, grad_out=grad_out)
    return _with_grad_both(x, target, weight, weight_total, params, guess, grad_out)


def _check(ours, ref, dtype, equal_nan=False):
    (srtol, satol), (grtol, gatol) = tolerances(dtype, "backends")
    loss, lse, grad = ours
    ref_loss, ref_lse, ref_grad = ref
    assert loss.dtype == _acc(dtype) and lse.dtype == _acc(dtype) and grad.dtype == dtype
    torch.testing.assert_close(lse, ref_lse, rtol=srtol, atol=satol, equal_nan=equal_nan)
    torch.testing.assert_close(loss, ref_loss, rtol=srtol, atol=satol, equal_nan=equal_nan)
    torch.testing.assert_close(
        grad.to(torch.float64),
        ref_grad.to(torch.float64),
        rtol=grtol,
        atol=gatol,
        equal_nan=equal_nan,
    )


def _cpp_backward(x, target, weight, weight_total, lse, params, grad_loss):
    grad = torch.empty_like(x)
    cpp_backend.backward(grad_loss, x, target, weight, weight_total, lse, params, grad)
    return grad


def _assert_same_bits(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _assert_close_to_cpp(ours, x, target, weight, weight_total, params, grad_loss):
    """ours = (loss, lse, grad) from the forward-with-gradient path: close to the C++ backend's
    plain forward and backward on the same inputs (NaN where they are NaN)."""
    (srtol, satol), (grtol, gatol) = tolerances(x.dtype, "backends")
    loss, lse, grad = ours
    plain_loss, plain_lse = cpp_backend.forward(x, target, weight, weight_total, params)
    torch.testing.assert_close(lse, plain_lse, rtol=srtol, atol=satol, equal_nan=True)
    torch.testing.assert_close(loss, plain_loss, rtol=srtol, atol=satol, equal_nan=True)
    expected = _cpp_backward(x, target, weight, weight_total, lse, params, grad_loss)
    torch.testing.assert_close(
        grad.double(), expected.double(), rtol=grtol, atol=gatol, equal_nan=True
    )


def _valid_cases(mode, class_counts, options):
    """(mode, num_classes, eps, spread, z_loss); spread="others" is undefined for one class."""
    return [
        pytest.param(mode, count, *values, id=f"{mode}-C{count}-{name}")
        for count in class_counts
        for name, values in options.items()
        if not (values[1] == "others" and count == 1)
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize(
    "mode,num_classes,eps,spread,z_loss",
    _valid_cases(
        "plain",
        [1, 2, 7, 33, 1000, 4099],
        {
            "all": (0.1, "all", 0.0),
            "others-z": (0.1, "others", 1e-3),
            "no-smoothing": (0.0, "all", 0.0),
            "all-z": (0.3, "all", 1e-2),
        },
    )
    + _valid_cases(
        "grad_in_forward",
        [1, 33, 4099],
        {
            "all": (0.1, "all", 0.0),
            "others-z": (0.1, "others", 1e-3),
            "no-smoothing-z": (0.0, "all", 1e-2),
        },
    ),
)
def test_parity_random(capability, mode, dtype, num_classes, weighted, eps, spread, z_loss):
    gen = torch.Generator().manual_seed(num_classes + (0 if mode == "plain" else 11))
    x = (torch.randn(3, 5, num_classes, generator=gen, dtype=torch.float64) * 3).to(dtype)
    target = _targets(15, num_classes)
    weight, weight_total = _weights(num_classes, dtype, weighted)
    params = row_params(num_classes, eps, spread, z_loss)
    ours, ref = _run(mode, x, target, weight, weight_total, params, guess=0.3)
    _check(ours, ref, dtype)
    if mode == "grad_in_forward":
        grad_loss = torch.full((15,), 0.3, dtype=_acc(dtype))
        _assert_close_to_cpp(ours, x, target, weight, weight_total, params, grad_loss)
    ignored = target == IGNORE
    assert torch.all(ours[0][ignored] == 0)
    assert torch.all(ours[2].reshape(-1, num_classes)[ignored] == 0)


def _neg_inf_rows(dtype):
    """Rows with -inf leading elements, whole -inf blocks (> 2048 elements) and masked targets."""
    num_classes = 5000
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 8, num_classes, generator=gen, dtype=torch.float64).to(dtype)
    x[0, 0, :3] = float("-inf")  # leading elements
    x[0, 1, :4500] = float("-inf")  # two whole blocks and part of a third
    x[0, 2, 100:4200] = float("-inf")  # a whole block in the middle
    x[0, 3, 2048:] = float("-inf")  # everything after the first block
    x[0, 4, ::2] = float("-inf")  # every other element
    x[0, 5, :-1] = float("-inf")  # a single finite element (the last)
    target = torch.tensor([5, 4999, 50, 10, 1, num_classes - 1, 7, IGNORE])
    x[0, 6, 7] = float("-inf")  # the target itself is masked
    return x, target


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_neg_inf_blocks(capability, mode, dtype, eps):
    """Rows with -inf leading elements, whole -inf blocks (> 2048 elements) and masked targets."""
    x, target = _neg_inf_rows(dtype)
    num_classes = x.shape[-1]
    weight, weight_total = _weights(num_classes, dtype, True)
    for w, wt in ((None, None), (weight, weight_total)):
        params = row_params(num_classes, eps, "all", 1e-3)
        ours, ref = _run(mode, x, target, w, wt, params, guess=1.0)
        _check(ours, ref, dtype, equal_nan=True)
        loss, lse, grad = ours
        assert torch.isfinite(lse).all()
        if eps == 0.0:
            # Without smoothing the masked logits never enter the loss: finite except row 6.
            assert torch.isfinite(loss[:6]).all()
        grad_rows = grad.reshape(8, num_classes).to(torch.float64)
        assert torch.isfinite(grad_rows[:6]).all()
        assert torch.all(grad_rows[7] == 0)  # the ignored row


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_neg_inf_row_matches_torch(capability, mode, dtype):
    """A fully masked row gives lse = -inf; loss/grad follow the torch backend (NaN), no crash."""
    x = torch.randn(1, 3, 40, dtype=torch.float64).to(dtype)
    x[0, 1] = float("-inf")
    target = torch.tensor([3, 5, IGNORE])
    ours, ref = _run(mode, x, target, None, None, row_params(40, 0.1, "all"))
    _check(ours, ref, dtype, equal_nan=True)
    assert ours[1][1] == float("-inf")
    assert torch.all(ours[2][0, 2] == 0)  # ignored row: exactly zero


def _strided_logits(layout, dtype, batch, inner, num_classes):
    gen = torch.Generator().manual_seed(4)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    if layout == "transposed":  # (S, B, C) storage viewed as (B, S, C)
        return randn(inner, batch, num_classes).transpose(0, 1)
    if layout == "class-stride-2":
        return randn(batch, inner, 2 * num_classes)[..., ::2]
    if layout == "class-major":  # class stride is the largest
        return randn(num_classes, inner, batch).permute(2, 1, 0)
    if layout == "expanded":  # one row broadcast over the batch (stride 0)
        return randn(1, inner, num_classes).expand(batch, inner, num_classes)
    # rows separated by padding
    return randn(batch, inner, num_classes + 17)[..., 5 : 5 + num_classes]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "layout", ["transposed", "class-stride-2", "class-major", "expanded", "row-gaps"]
)
def test_strided_layouts(capability, mode, dtype, layout):
    num_classes, batch, inner = 300, 4, 6
    x = _strided_logits(layout, dtype, batch, inner, num_classes)
    target = _targets(batch * inner, num_classes)
    weight, weight_total = _weights(num_classes, dtype, True)
    params = row_params(num_classes, 0.1, "all", 1e-3)
    ours, ref = _run(mode, x, target, weight, weight_total, params)
    _check(ours, ref, dtype)
    # A non-contiguous gradient output as well.
    grad_out = torch.empty(inner, batch, num_classes, dtype=dtype).transpose(0, 1)
    ours, ref = _run(mode, x, target, weight, weight_total, params, grad_out=grad_out)
    _check(ours, ref, dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_streaming_stores(capability, mode, dtype, offset, monkeypatch):
    """Non-temporal gradient stores (forced for small outputs), with misaligned output rows."""
    monkeypatch.setenv("LSR_FUSED_STREAM_MIN_BYTES", "0")
    num_classes, rows = 1000 + offset, 6
    gen = torch.Generator().manual_seed(6)
    x = (torch.randn(2, 3, num_classes, generator=gen, dtype=torch.float64) * 3).to(dtype)
    target = _targets(rows, num_classes)
    weight, weight_total = _weights(num_classes, dtype, True)
    params = row_params(num_classes, 0.1, "all", 1e-3)
    storage = torch.empty(rows * num_classes + offset, dtype=dtype)
    grad_out = storage[offset:].view(2, 3, num_classes)
    for w, wt in ((None, None), (weight, weight_total)):
        ours, ref = _run(mode, x, target, w, wt, params, guess=2.0, grad_out=grad_out)
        _check(ours, ref, dtype)


@pytest.mark.parametrize("mode", MODES)
def test_large_fresh_output(cpp, mode):
    """An output above the streaming / huge-page thresholds (34 MB float32), odd row length."""
    num_classes, rows = 32771, 260
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, rows, num_classes, generator=gen) * 2
    target = _targets(rows, num_classes)
    params = row_params(num_classes, 0.1, "all")
    ours, ref = _run(mode, x, target, None, None, params, guess=1.0 / rows)
    _check(ours, ref, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wide_range_logits(capability, dtype):
    """exp arguments spanning the float range: underflow below ln(FLT_MIN), huge gaps, ties."""
    num_classes = 3000
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(1, 6, num_classes, generator=gen, dtype=torch.float64) * 40
    x[0, 1] = torch.linspace(-120, 0, num_classes)  # every exp argument down to -120
    x[0, 2] = 5.0  # all equal
    x[0, 3, ::7] = -1e30  # finite but enormous gaps
    x[0, 4] = torch.linspace(0, 3000, num_classes)  # increasing: the max grows every chunk
    x[0, 5] = torch.linspace(3000, 0, num_classes)
    x = x.to(dtype)
    target = torch.tensor([1, 0, 2, 7, num_classes - 1, 0])
    params = row_params(num_classes, 0.1, "others", 1e-4)
    ours, ref = _run_both(x, target, None, None, params)
    _check(ours, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("contiguous", [True, False])
def test_backward_in_place(capability, dtype, contiguous):
    num_classes = 2500
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(3, 4, num_classes, generator=gen, dtype=torch.float64).to(dtype)
    x = base if contiguous else base.transpose(0, 1).contiguous().transpose(0, 1)
    target = _targets(12, num_classes)
    params = row_params(num_classes, 0.1, "others", 1e-3)
    ref_loss, ref_lse = torch_backend.forward(x, target, None, None, params)
    grad_loss = torch.full((12,), 0.25, dtype=_acc(dtype))
    ref_grad = torch.empty(x.shape, dtype=dtype)
    torch_backend.backward(grad_loss, x, target, None, None, ref_lse, params, ref_grad)
    loss, lse = cpp_backend.forward(x, target, None, None, params)
    cpp_backend.backward(grad_loss, x, target, None, None, lse, params, x)  # in place
    _check((loss, lse, x), (ref_loss, ref_lse, ref_grad), dtype)


def test_grad_loss_broadcast_and_lse_strides(cpp):
    num_classes = 100
    x = torch.randn(2, 3, num_classes)
    target = _targets(6, num_classes)
    params = row_params(num_classes, 0.1, "all")
    grad_loss = torch.tensor(0.5).expand(6)  # stride 0, as from loss.mean().backward()
    ours, ref = _run_both(x, target, None, None, params, grad_loss=grad_loss)
    _check(ours, ref, torch.float32)
    # lse passed as a strided view, grad_loss in float64 (converted by the op).
    _, lse = cpp_backend.forward(x, target, None, None, params)
    lse_strided = torch.stack([lse, lse], dim=1)[:, 0]
    grad = torch.empty_like(x)
    cpp_backend.backward(grad_loss.double(), x, target, None, None, lse_strided, params, grad)
    torch.testing.assert_close(grad, ours[2])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grad_in_forward_rows_past_the_exp_buffer(capability, dtype):
    """Contiguous rows longer than the pipelined path's buffer take the general path."""
    num_classes = 131075 if dtype != torch.float64 else 65541
    gen = torch.Generator().manual_seed(13)
    x = (torch.randn(1, 3, num_classes, generator=gen, dtype=torch.float64) * 3).to(dtype)
    target = torch.tensor([5, IGNORE, num_classes - 1])
    weight, weight_total = _weights(num_classes, dtype, True)
    params = row_params(num_classes, 0.1, "all", 1e-3)
    ours, ref = _with_grad_both(x, target, weight, weight_total, params, guess=0.5)
    _check(ours, ref, dtype)
    grad_loss = torch.full((3,), 0.5, dtype=_acc(dtype))
    # The general path writes what backward writes, bit for bit.
    _assert_same_bits(
        ours[2], _cpp_backward(x, target, weight, weight_total, ours[1], params, grad_loss)
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_grad_in_forward_non_finite_rows_between_finite_ones(capability, dtype, weighted):
    """NaN, +inf and all -inf rows leave the pipelined path for the general one and back; the
    gradient of the row before each, still pending in the pipeline then, is written all the same."""
    num_classes = 1000
    gen = torch.Generator().manual_seed(14)
    x = (torch.randn(1, 10, num_classes, generator=gen, dtype=torch.float64) * 3).to(dtype)
    x[0, 1, 17] = float("nan")
    x[0, 3, 400] = float("inf")
    x[0, 5] = float("-inf")
    x[0, 7, 999] = float("nan")  # in the scalar tail of some vector widths
    target = torch.tensor([1, 2, 3, 4, 5, 6, IGNORE, 8, 9, 10])
    weight, weight_total = _weights(num_classes, dtype, weighted)
    params = row_params(num_classes, 0.1, "all", 1e-3)
    grad = torch.full_like(x, 7.0)
    guess = torch.tensor([0.5], dtype=_acc(dtype))
    loss, lse = cpp_backend.forward(x, target, weight, weight_total, params, grad, guess)
    grad_loss = torch.full((10,), 0.5, dtype=_acc(dtype))
    _assert_close_to_cpp((loss, lse, grad), x, target, weight, weight_total, params, grad_loss)
    rows = grad.reshape(10, num_classes).double()
    finite = [0, 2, 4, 8, 9]
    assert torch.isfinite(rows[finite]).all()
    assert torch.all(rows[6] == 0)
    assert not (rows == 7.0).all(dim=1).any()  # every row written


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("contiguous", [True, False])
def test_backward_skips_rows_equal_to_the_guess(capability, dtype, contiguous):
    """Rows whose upstream equals the guess are neither read nor written; the others are exactly
    what a plain backward writes."""
    num_classes, rows = 2500, 8
    gen = torch.Generator().manual_seed(9)
    base = torch.randn(2, 4, num_classes, generator=gen, dtype=torch.float64).to(dtype)
    x = base if contiguous else base.transpose(0, 1).contiguous().transpose(0, 1)
    target = _targets(rows, num_classes)
    weight, weight_total = _weights(num_classes, dtype, True)
    params = row_params(num_classes, 0.1, "all", 1e-3)
    acc = _acc(dtype)
    _, lse = cpp_backend.forward(x, target, weight, weight_total, params)
    guess = torch.tensor([0.125], dtype=acc)
    # Equal, different, different only in the last bit, zero, equal (ignored row), ...
    grad_loss = torch.tensor([0.125, 0.5, 0.125, 0.0, 0.125, 3.0, 0.125, -0.125], dtype=acc)
    grad_loss[2] = torch.nextafter(grad_loss[2], torch.tensor(1.0, dtype=acc))
    skipped = grad_loss == guess
    sentinel = torch.full_like(x, 7.0)
    cpp_backend.backward(grad_loss, x, target, weight, weight_total, lse, params, sentinel, guess)
    rows_view = sentinel.reshape(rows, num_classes)
    assert torch.all(rows_view[skipped] == 7.0)
    fresh = _cpp_backward(x, target, weight, weight_total, lse, params, grad_loss)
    _assert_same_bits(rows_view[~skipped], fresh.reshape(rows, num_classes)[~skipped])

    # A broadcast grad_loss (stride 0) equal to the guess, as from loss.sum() / n: nothing at all.
    untouched = torch.full_like(x, 7.0)
    cpp_backend.backward(
        guess.expand(rows), x, target, weight, weight_total, lse, params, untouched, guess
    )
    assert torch.all(untouched == 7.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("upstream", ["guess", "scaled", "per-row"])
def test_forward_then_backward_with_guess_is_exact(capability, dtype, upstream):
    """The training step: forward writes for the guess, backward fixes what differs."""
    num_classes, rows = 777, 12
    gen = torch.Generator().manual_seed(10)
    x = (torch.randn(3, 4, num_classes, generator=gen, dtype=torch.float64) * 3).to(dtype)
    target = _targets(rows, num_classes)
    weight, weight_total = _weights(num_classes, dtype, True)
    params = row_params(num_classes, 0.1, "others", 1e-3)
    acc = _acc(dtype)
    guess = torch.tensor([1.0 / 9.0], dtype=acc)
    if upstream == "guess":
        grad_loss = guess.expand(rows)
    elif upstream == "scaled":
        grad_loss = (guess * 3.0).expand(rows)
    else:
        grad_loss = torch.rand(rows, generator=gen, dtype=torch.float64).to(acc)
        grad_loss[::3] = guess
    grad = torch.empty_like(x)
    loss, lse = cpp_backend.forward(x, target, weight, weight_total, params, grad, guess)
    cpp_backend.backward(grad_loss, x, target, weight, weight_total, lse, params, grad, guess)
    _assert_close_to_cpp((loss, lse, grad), x, target, weight, weight_total, params, grad_loss)
    # The rows whose upstream differs were rewritten by backward: exactly a plain backward's rows.
    redone = (grad_loss != guess).expand(rows)
    fresh = _cpp_backward(x, target, weight, weight_total, lse, params, grad_loss)
    _assert_same_bits(
        grad.reshape(rows, num_classes)[redone], fresh.reshape(rows, num_classes)[redone]
    )


def test_int64_offsets(cpp):
    """Rows beyond 2**31 elements from the storage start (untouched pages are never committed)."""
    num_classes = 40
    row_step = 1 << 30  # rows at element offsets 0, 2**30, 2**31, 3 * 2**30
    try:
        storage = torch.empty(3 * row_step + num_classes, dtype=torch.float16)
    except RuntimeError as exc:  # pragma: no cover - depends on the machine's overcommit policy
        pytest.skip(f"cannot reserve 6 GiB of address space: {exc}")
    x = storage.as_strided((4, 1, num_classes), (row_step, row_step, 1))
    x.copy_(torch.randn(4, 1, num_classes).to(torch.float16))
    dense = x.clone()
    target = torch.tensor([3, 39, 0, 17])
    params = row_params(num_classes, 0.1, "all", 1e-3)
    weight, weight_total = _weights(num_classes, torch.float16, True)
    ours_loss, ours_lse = cpp_backend.forward(x, target, weight, weight_total, params)
    ref_loss, ref_lse = torch_backend.forward(dense, target, weight, weight_total, params)
    torch.testing.assert_close(ours_loss, ref_loss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(ours_lse, ref_lse, rtol=2e-5, atol=2e-5)
    grad_loss = torch.ones(4)
    ref_grad = torch.empty_like(dense)
    torch_backend.backward(
        grad_loss, dense, target, weight, weight_total, ref_lse, params, ref_grad
    )
    cpp_backend.backward(grad_loss, x, target, weight, weight_total, ours_lse, params, x)
    torch.testing.assert_close(x.float(), ref_grad.float(), rtol=2e-3, atol=1e-5)
    del x, storage


def test_capabilities_agree(cpp):
    """Every compiled CPU variant gives (nearly) the same numbers on a large-ish problem."""
    names = _supported_capabilities()
    num_classes = 32000 + 5
    x = torch.randn(2, 4, num_classes) * 4
    target = _targets(8, num_classes)
    weight, weight_total = _weights(num_classes, torch.float32, True)
    params = row_params(num_classes, 0.1, "all", 1e-4)
    results = {}
    previous = cpp.cpu_capability()
    try:
        for name in names:
            cpp.set_cpu_capability(name)
            loss, lse = cpp.forward(x, target, weight, weight_total, params)
            grad = torch.empty_like(x)
            cpp.backward(torch.ones(8), x, target, weight, weight_total, lse, params, grad)
            results[name] = (loss, lse, grad)
    finally:
        cpp.set_cpu_capability(previous)
    first = results[names[0]]
    for name in names[1:]:
        for a, b in zip(first, results[name], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
