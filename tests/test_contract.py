"""The API contract: errors that name the argument, shapes, in-place semantics, the
gradient-in-forward bookkeeping, custom-op registration, torch.compile, memory, and the CUDA-only
guarantees (no host sync, graph capture, no recompilation)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from reference import IGNORE, assert_close, dense_loss, random_case, row_params, tolerances

import lsr_fused
from lsr_fused import LabelSmoothingCE, label_smoothing_cross_entropy
from lsr_fused._params import RowParams
from lsr_fused.ops import backend_module

BACKENDS = lsr_fused.available_backends("cpu")
ALL_BACKENDS = [*BACKENDS, "auto"]
MODES = ["plain", "grad_in_forward"]
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_triton = pytest.mark.skipif(
    "triton" not in BACKENDS, reason="needs triton (CUDA or TRITON_INTERPRET=1)"
)


# ------------------------------------------------------------------------------------------------
# Bad input: typed errors that name the argument
# ------------------------------------------------------------------------------------------------


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


def test_module_rejects_bad_options_at_construction():
    with pytest.raises(ValueError, match="reduction"):
        LabelSmoothingCE(reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        LabelSmoothingCE(label_smoothing=-0.1)


# The C++ ops, called directly (mode "grad_in_forward": forward(..., grad_logits, grad_guess)).


@pytest.mark.parametrize("mode", MODES)
def test_cpp_out_of_range_target_raises_value_error(cpp, mode):
    x = torch.randn(1, 4, 10)
    params = row_params(10, 0.1, "all")
    guess = torch.ones(1)
    for bad in (10, -5, 12345):
        target = torch.tensor([1, bad, 2, IGNORE])
        if mode == "plain":
            with pytest.raises(ValueError, match=f"target value {bad} is out of range"):
                cpp.forward(x, target, None, None, params)
            lse = torch.zeros(4)
            with pytest.raises(ValueError, match=f"target value {bad}"):
                cpp.backward(torch.ones(4), x, target, None, None, lse, params, x.clone())
            continue
        grad = torch.full_like(x, 7.0)
        with pytest.raises(ValueError, match=f"target value {bad} is out of range"):
            cpp.forward(x, target, None, None, params, grad, guess)
        assert torch.all(grad == 7.0)  # checked before any row is written
        with pytest.raises(ValueError, match=f"target value {bad}"):
            cpp.backward(
                torch.ones(4),
                x,
                target,
                None,
                None,
                torch.zeros(4),
                params,
                grad,
                torch.tensor([0.5]),
            )


def test_cpp_bad_arguments_raise(cpp):
    params = row_params(10, 0.1, "all")
    x = torch.randn(1, 4, 10)
    with pytest.raises(RuntimeError, match="logits must be"):
        cpp.forward(x.to(torch.int32), torch.zeros(4, dtype=torch.long), None, None, params)
    with pytest.raises(RuntimeError, match="rows"):
        cpp.forward(x, torch.zeros(5, dtype=torch.long), None, None, params)
    with pytest.raises(RuntimeError, match="int64"):
        cpp.forward(x, torch.zeros(4, dtype=torch.int32), None, None, params)
    with pytest.raises(RuntimeError, match="grad_logits"):
        loss, lse = cpp.forward(x, torch.zeros(4, dtype=torch.long), None, None, params)
        cpp.backward(loss, x, torch.zeros(4, dtype=torch.long), None, None, lse, params, x.double())
    # The gradient-in-forward arguments.
    target = torch.zeros(4, dtype=torch.long)
    grad = torch.empty_like(x)
    with pytest.raises(RuntimeError, match="grad_logits and grad_guess together"):
        cpp.forward(x, target, None, None, params, grad, None)
    with pytest.raises(RuntimeError, match="grad_logits and grad_guess together"):
        cpp.forward(x, target, None, None, params, None, torch.ones(1))
    with pytest.raises(RuntimeError, match="grad_guess must hold one value"):
        cpp.forward(x, target, None, None, params, grad, torch.ones(2))
    with pytest.raises(RuntimeError, match="grad_logits"):
        cpp.forward(x, target, None, None, params, grad.double(), torch.ones(1))
    with pytest.raises(RuntimeError, match="grad_logits has shape"):
        cpp.forward(x, target, None, None, params, grad[:, :2], torch.ones(1))
    _, lse = cpp.forward(x, target, None, None, params)
    with pytest.raises(RuntimeError, match="grad_guess must hold one value"):
        cpp.backward(torch.ones(4), x, target, None, None, lse, params, grad, torch.ones(3))


def test_set_cpu_capability_rejects_unknown(cpp):
    with pytest.raises(ValueError, match="not available"):
        cpp.set_cpu_capability("sse9")
    assert cpp.cpu_capability() in ("default", "avx2", "avx512")


# ------------------------------------------------------------------------------------------------
# Shapes: empty inputs and meta tensors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(0, 4, 10), (3, 0, 10), (0, 0, 0)])
def test_cpp_zero_rows(cpp, mode, shape):
    x = torch.randn(shape)
    target = torch.empty(shape[0] * shape[1], dtype=torch.long)
    params = row_params(max(shape[2], 2), 0.1, "all")
    grad = torch.empty_like(x)
    extra = () if mode == "plain" else (grad, torch.ones(1))
    loss, lse = cpp.forward(x, target, None, None, params, *extra)
    assert loss.shape == (0,) and lse.shape == (0,) and loss.dtype == torch.float32
    cpp.backward(loss, x, target, None, None, lse, params, grad, *extra[1:])


@pytest.mark.parametrize("mode", MODES)
def test_cpp_meta_tensors(cpp, mode):
    x = torch.empty(3, 5, 11, device="meta", dtype=torch.bfloat16)
    target = torch.empty(15, dtype=torch.long, device="meta")
    scalars = (0.9, 0.01, 0.0, IGNORE)
    if mode == "plain":
        grad, extra = x, ()
    else:
        grad = torch.empty_like(x)
        extra = (grad, torch.empty(1, device="meta"))
    loss, lse = torch.ops.lsr_fused_C.forward(x, target, None, None, *scalars, *extra)
    assert loss.shape == (15,) and loss.dtype == torch.float32 and loss.device.type == "meta"
    assert lse.dtype == torch.float32 and lse.device.type == "meta"
    torch.ops.lsr_fused_C.backward(loss, x, target, None, None, lse, *scalars, grad, *extra[1:])


# ------------------------------------------------------------------------------------------------
# In-place backward and the module
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# Gradient written in forward: which backends do it, and backward redoes only what it must
# ------------------------------------------------------------------------------------------------


def test_cpp_writes_grad_in_forward_on_cpu(cpp):
    assert "cpu" in cpp.WRITES_GRAD_IN_FORWARD


@needs_triton
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_plain_backward_needs_no_second_pass(monkeypatch, reduction, weighted):
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


@needs_triton
def test_triton_backward_touches_only_rows_whose_upstream_differs():
    # The C++ kernels' version of this promise: test_parity.py::test_backward_skips_rows_...
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


# ------------------------------------------------------------------------------------------------
# Custom ops and torch.compile
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ops_pass_opcheck(backend):
    logits = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 6, -100, 3, 2, 1])
    weight = torch.rand(7, dtype=torch.float64)
    # The schema's packed options: RowParams.packed() (target_extra, other_mass, z_loss, softcap).
    args = (
        logits,
        target,
        weight,
        weight.sum().reshape(1),
        None,
        None,
        False,
        False,
        [0.8, 0.2 / 7, 1e-3, 0.0],
        -100,
        backend,
    )
    torch.library.opcheck(torch.ops.lsr_fused.forward.default, args)


@pytest.mark.parametrize("backend", ["torch", "auto", pytest.param("triton", marks=needs_triton)])
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


# ------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# CUDA only: validation, no host sync, graph capture, no recompilation
# ------------------------------------------------------------------------------------------------


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
