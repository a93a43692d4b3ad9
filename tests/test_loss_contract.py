"""Bad input, custom-op registration, torch.compile and the CUDA-only guarantees."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from reference import dense_loss

import lsr_fused
from lsr_fused import label_smoothing_cross_entropy
from lsr_fused._params import RowParams
from lsr_fused.ops import backend_module

BACKENDS = lsr_fused.available_backends("cpu")
ALL_BACKENDS = [*BACKENDS, "auto"]
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("bad_value", [5, 17, -1, -7])
def test_out_of_range_target_raises_naming_the_value(backend, bad_value):
    logits = torch.randn(4, 5)
    target = torch.tensor([0, bad_value, 2, -100])
    with pytest.raises(ValueError, match=rf"target contains {bad_value}\b"):
        label_smoothing_cross_entropy(logits, target, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_turn_out_of_range_targets_into_nan_without_reading_out_of_bounds(backend):
    # What CUDA callers get without validation: the row's loss and gradient are NaN, others intact.
    module = backend_module(backend)
    logits = torch.randn(3, 1, 6)
    target = torch.tensor([1, 6, -5])
    params = RowParams(0.9, 0.1 / 6, 0.0, -100)
    if backend == "cpp":
        # The compiled CPU kernel checks targets itself (a free check on the CPU) and raises.
        with pytest.raises(ValueError, match="target value 6"):
            module.forward(logits, target, None, None, params)
        return
    loss, lse = module.forward(logits, target, None, None, params)
    assert not math.isnan(loss[0].item())
    assert math.isnan(loss[1].item()) and math.isnan(loss[2].item())
    grad = torch.empty_like(logits)
    module.backward(torch.ones(3), logits, target, None, None, lse, params, grad)
    assert torch.isfinite(grad[0]).all() and torch.isnan(grad[1:]).all()


BAD_ARGUMENTS = [
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(label_smoothing=-0.01), ValueError, "label_smoothing"),
    (dict(label_smoothing="0.1"), TypeError, "label_smoothing"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(spread="target"), ValueError, "spread"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(z_loss=-1.0), ValueError, "z_loss"),
    (dict(z_loss=float("nan")), ValueError, "z_loss"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
    (dict(weight=torch.ones(4)), ValueError, "weight"),
    (dict(weight=torch.ones(5, dtype=torch.long)), TypeError, "weight"),
    (dict(weight=[1.0] * 5), TypeError, "weight"),
]


@pytest.mark.parametrize(("options", "error", "name"), BAD_ARGUMENTS, ids=lambda v: str(v)[:30])
def test_bad_options_name_the_argument(options, error, name):
    logits, target = torch.randn(3, 5), torch.tensor([0, 1, 2])
    label_smoothing = options.pop("label_smoothing", 0.1)
    with pytest.raises(error, match=name):
        label_smoothing_cross_entropy(logits, target, label_smoothing, **options)


@pytest.mark.parametrize(
    ("logits", "target", "error", "name"),
    [
        (torch.randn(3, 5), torch.tensor([0.0, 1.0, 2.0]), TypeError, "target"),
        (torch.randn(3, 5), torch.tensor([0, 1]), ValueError, "target shape"),
        (torch.randn(3, 5, 2), torch.tensor([0, 1, 2]), ValueError, "target shape"),
        (torch.randn(5), torch.tensor([1]), ValueError, "target shape"),
        (torch.randint(0, 3, (3, 5)), torch.tensor([0, 1, 2]), TypeError, "logits"),
        (torch.tensor(1.0), torch.tensor(0), ValueError, "logits"),
        (torch.randn(3, 0), torch.tensor([0, 1, 2]), ValueError, "class"),
        ([[0.0, 1.0]], torch.tensor([0]), TypeError, "logits"),
    ],
    ids=[
        "float target",
        "short target",
        "spatial target",
        "vector logits",
        "int logits",
        "scalar logits",
        "no classes",
        "list logits",
    ],
)
def test_bad_tensors_name_the_argument(logits, target, error, name):
    with pytest.raises(error, match=name):
        label_smoothing_cross_entropy(logits, target)


def test_single_class_with_spread_others_is_rejected():
    with pytest.raises(ValueError, match="spread='others'"):
        label_smoothing_cross_entropy(
            torch.randn(3, 1), torch.zeros(3, dtype=torch.long), spread="others"
        )


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton'"):
        label_smoothing_cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ops_pass_opcheck(backend):
    logits = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 6, -100, 3, 2, 1])
    weight = torch.rand(7, dtype=torch.float64)
    args = (
        logits,
        target,
        weight,
        weight.sum().reshape(1),
        0.8,
        0.2 / 7,
        1e-3,
        -100,
        backend,
        False,
    )
    torch.library.opcheck(torch.ops.lsr_fused.forward.default, args)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("inplace", [False, True])
def test_torch_compile_fullgraph_has_no_graph_break(backend, inplace):
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 9))
    loss_fn = lsr_fused.LabelSmoothingCE(0.1, backend=backend, inplace_backward=inplace)

    def step(features, target):
        return loss_fn(model(features), target)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    features, target = torch.randn(5, 6), torch.randint(0, 9, (5,))
    target[1] = -100
    loss = compiled(features, target)
    loss.backward()
    compiled_grad = model[0].weight.grad.clone()
    model.zero_grad()
    ref = F.cross_entropy(model(features), target, label_smoothing=0.1)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(compiled_grad, model[0].weight.grad)


def test_torch_compile_inductor_matches():
    torch._dynamo.reset()
    logits = torch.randn(4, 11, requires_grad=True)
    target = torch.tensor([3, 10, 0, -100])

    @torch.compile(fullgraph=True)
    def loss_fn(x, y):
        return label_smoothing_cross_entropy(x * 2.0, y, 0.2, spread="others", z_loss=1e-3)

    loss = loss_fn(logits, target)
    (grad,) = torch.autograd.grad(loss, logits)
    ref_input = logits.detach().double().requires_grad_()
    ref = dense_loss(ref_input * 2.0, target, 0.2, spread="others", z_loss=1e-3)
    (ref_grad,) = torch.autograd.grad(ref, ref_input)
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=1e-6)


@cuda_only
def test_cuda_out_of_range_target_is_nan_then_validation_raises():
    logits = torch.randn(4, 5, device="cuda")
    target = torch.tensor([0, 9, 2, 1], device="cuda")
    assert math.isnan(label_smoothing_cross_entropy(logits, target).item())
    previous = lsr_fused.set_validation(True)
    try:
        with pytest.raises(ValueError, match="target contains 9"):
            label_smoothing_cross_entropy(logits, target)
    finally:
        lsr_fused.set_validation(previous)


@cuda_only
@pytest.mark.parametrize("inplace", [False, True])
def test_cuda_no_host_sync_and_graph_capture(inplace):
    logits_source = torch.randn(64, 1000, device="cuda", requires_grad=True)
    target = torch.randint(0, 1000, (64,), device="cuda")
    target[::7] = -100
    weight = torch.rand(1000, device="cuda")

    def step():
        logits = logits_source * 1.0
        loss = label_smoothing_cross_entropy(
            logits, target, 0.1, weight=weight, z_loss=1e-4, inplace_backward=inplace
        )
        (grad,) = torch.autograd.grad(loss, logits)
        return loss, grad

    expected_loss, expected_grad = step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_loss, graph_grad = step()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(graph_loss, expected_loss)
    torch.testing.assert_close(graph_grad, expected_grad)


def _compiled_variants(kernel) -> int:
    """How many binaries Triton holds for a kernel (its cache layout differs between releases)."""
    caches = getattr(kernel, "device_caches", None)
    if caches is None:
        pytest.skip("this Triton release keeps its kernel cache elsewhere")
    return sum(len(entry[0]) for entry in caches.values())


@cuda_only
def test_cuda_new_smoothing_value_does_not_recompile():
    from lsr_fused.backends import triton_backend

    logits = torch.randn(8, 300, device="cuda", requires_grad=True)
    target = torch.randint(0, 300, (8,), device="cuda")
    label_smoothing_cross_entropy(logits, target, 0.1, backend="triton").backward()
    before = _compiled_variants(triton_backend._forward_kernel)
    before_backward = _compiled_variants(triton_backend._backward_kernel)
    for eps in (0.05, 0.2, 0.3):
        loss = label_smoothing_cross_entropy(logits, target, eps, z_loss=eps / 10)
        loss.backward()
    assert _compiled_variants(triton_backend._forward_kernel) == before
    assert _compiled_variants(triton_backend._backward_kernel) == before_backward


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_parity_with_cpu_reference(dtype):
    logits = (torch.randn(33, 70000, device="cuda") * 3).to(dtype)
    target = torch.randint(0, 70000, (33,), device="cuda")
    target[::5] = -100
    x = logits.clone().requires_grad_()
    loss = label_smoothing_cross_entropy(x, target, 0.1, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), x)
    ref_input = logits.double().requires_grad_()
    ref = dense_loss(ref_input, target, 0.1, reduction="none")
    (ref_grad,) = torch.autograd.grad(ref.sum(), ref_input)
    torch.testing.assert_close(loss.double(), ref, atol=1e-4, rtol=1e-5)
    tol = 1e-6 if dtype == torch.float32 else 1e-2 * ref_grad.abs().max().item()
    torch.testing.assert_close(grad.double(), ref_grad, atol=tol, rtol=1e-2)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_training_step_allocates_one_gradient_and_no_zero_fill(backend, reduction):
    # Autograd would zero-fill a logits-sized gradient for each unused output (lse, the gradient
    # buffer) unless the ops opt out: a silent extra allocation and memset per step.
    source = torch.randn(64, 2000, requires_grad=True)
    logits = source * 1.0
    target = torch.randint(0, 2000, (64,))
    logits_bytes = logits.numel() * logits.element_size()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        loss = label_smoothing_cross_entropy(logits, target, reduction=reduction, backend=backend)
        torch.autograd.grad(loss.sum(), logits)
    zero_fills = [
        e.key
        for e in prof.key_averages()
        if e.key in ("aten::zeros", "aten::zero_", "aten::zeros_like")
        and e.cpu_memory_usage >= logits_bytes
    ]
    assert not zero_fills
    big_allocations = [
        e
        for e in prof.events()
        # The allocating leaves (empty_like and friends call one of these).
        if e.key in ("aten::empty", "aten::empty_strided") and e.cpu_memory_usage >= logits_bytes
    ]
    assert len(big_allocations) <= 1, [e.key for e in big_allocations]
