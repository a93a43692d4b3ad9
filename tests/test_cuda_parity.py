"""The parity suite on a real GPU: every backend usable on CUDA against the dense reference.

Skipped without CUDA; on a GPU machine `benchmarks/gpu_check.sh` runs it before benchmarking.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from reference import dense_loss

import lsr_fused
from lsr_fused import label_smoothing_cross_entropy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
BACKENDS = lsr_fused.available_backends("cuda") if torch.cuda.is_available() else []
SHAPES = [(7, 37), (5, 32000), (3, 70001), (4, 6, 3, 5), (1, 1)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
OPTIONS = [
    dict(),
    dict(reduction="none"),
    dict(reduction="sum", spread="others"),
    dict(weight=True, z_loss=1e-3),
    dict(weight=True, spread="others", reduction="none"),
    dict(inplace_backward=True),
    dict(inplace_backward=True, weight=True, reduction="sum"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("shape", "dtype", "options"),
    list(itertools.product(SHAPES, DTYPES, OPTIONS)),
    ids=lambda value: str(value).replace(" ", ""),
)
def test_cuda_matches_dense_reference(backend, shape, dtype, options):
    options = dict(options)
    if shape[1] == 1 and options.get("spread") == "others":
        pytest.skip("spread='others' needs two classes")
    generator = torch.Generator(device="cuda").manual_seed(hash((shape, str(dtype))) % 2**31)
    num_classes = shape[1]
    logits = (torch.randn(shape, device="cuda", generator=generator) * 3).to(dtype)
    target = torch.randint(
        0, num_classes, shape[:1] + shape[2:], device="cuda", generator=generator
    )
    target.view(-1)[::3] = -100
    if options.pop("weight", False):
        options["weight"] = torch.rand(num_classes, device="cuda", generator=generator) + 0.1
    source = logits.clone().requires_grad_()
    ours_input = source * 1  # a non-leaf, so that inplace_backward really runs in place
    loss = label_smoothing_cross_entropy(ours_input, target, 0.1, backend=backend, **options)
    upstream = torch.rand_like(loss)
    (grad,) = torch.autograd.grad(loss, ours_input, upstream)
    ref_input = logits.double().requires_grad_()
    ref = dense_loss(ref_input, target, 0.1, **options)
    (ref_grad,) = torch.autograd.grad(ref, ref_input, upstream.double())
    loss_tol = 1e-10 if dtype == torch.float64 and backend != "triton" else 1e-5
    torch.testing.assert_close(
        loss.double(), ref, atol=loss_tol * max(1.0, ref.abs().max()), rtol=loss_tol, equal_nan=True
    )
    grad_scale = ref_grad.abs().max().item()
    grad_tol = {torch.float64: 1e-7, torch.float32: 1e-5}.get(dtype, 1e-2)
    torch.testing.assert_close(
        grad.double(), ref_grad, atol=grad_tol * max(grad_scale, 1e-30), rtol=grad_tol
    )


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_offsets_past_two_to_the_31(backend):
    # 16384 x 151936 bf16 holds 2.49e9 elements: rows at the end start past 2**31.
    rows, classes = 16384, 151936
    logits = torch.randn(rows, classes, device="cuda", dtype=torch.bfloat16)
    target = torch.randint(0, classes, (rows,), device="cuda")
    x = logits.requires_grad_()
    loss = label_smoothing_cross_entropy(x, target, 0.1, reduction="none", backend=backend)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    tail = slice(rows - 4, rows)
    assert (rows - 4) * classes > 2**31
    ref_input = logits[tail].detach().double().requires_grad_()
    ref = dense_loss(ref_input, target[tail], 0.1, reduction="none")
    (ref_grad,) = torch.autograd.grad(ref.sum(), ref_input)
    torch.testing.assert_close(loss[tail].double(), ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(
        grad[tail].double(), ref_grad, atol=1e-2 * ref_grad.abs().max().item(), rtol=1e-2
    )


# ---------------------------------------------------------------------------------------------
# The default training step as users run it: loss.backward() with the default backend. Forward
# writes the gradient for the upstream it expects (1 for sum, 1 / denominator for mean) and
# backward skips every row; a scaled loss (GradScaler) makes backward redo every row instead.

TRAINING_CASES = list(
    itertools.product([torch.bfloat16, torch.float32], [32000, 128256], ["mean", "sum"])
)


def _grad_tolerance(dtype: torch.dtype) -> float:
    # Half gradients are rounded once on output: 2**-8 of their scale.
    return 1e-5 if dtype == torch.float32 else 1e-2


@pytest.mark.parametrize("scale", [1.0, 1024.0], ids=["backward skips", "backward redoes"])
@pytest.mark.parametrize(("dtype", "num_classes", "reduction"), TRAINING_CASES, ids=str)
def test_cuda_default_training_step(dtype, num_classes, reduction, scale):
    generator = torch.Generator(device="cuda").manual_seed(num_classes + len(reduction))
    rows = 96
    logits = (torch.randn(rows, num_classes, device="cuda", generator=generator) * 3).to(dtype)
    target = torch.randint(0, num_classes, (rows,), device="cuda", generator=generator)
    target[::7] = -100
    x = logits.clone().requires_grad_()
    loss = label_smoothing_cross_entropy(x, target, 0.1, reduction=reduction)
    (loss * scale).backward()
    ref_input = logits.double().requires_grad_()
    ref = dense_loss(ref_input, target, 0.1, reduction=reduction)
    (ref * scale).backward()
    torch.testing.assert_close(loss.double(), ref, atol=1e-5 * ref.abs().item(), rtol=1e-5)
    grad_scale = ref_input.grad.abs().max().item()
    tol = _grad_tolerance(dtype)
    torch.testing.assert_close(x.grad.double(), ref_input.grad, atol=tol * grad_scale, rtol=tol)
    assert torch.all(x.grad[::7] == 0)  # ignored rows


@pytest.mark.parametrize(("dtype", "num_classes", "reduction"), TRAINING_CASES, ids=str)
def test_cuda_fused_head_default_training_step(dtype, num_classes, reduction):
    """The fused classifier + loss, loss.backward() with the default backend and chunking,
    against float64 autograd through the same rounded logits' inputs."""
    generator = torch.Generator(device="cuda").manual_seed(num_classes + 7)
    rows, features = 256, 256
    hidden = torch.randn(rows, features, device="cuda", generator=generator).to(dtype)
    weight = (
        torch.randn(num_classes, features, device="cuda", generator=generator) * features**-0.5
    ).to(dtype)
    target = torch.randint(0, num_classes, (rows,), device="cuda", generator=generator)
    target[::5] = -100
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = lsr_fused.linear_label_smoothing_cross_entropy(h, w, target, 0.1, reduction=reduction)
    loss.backward()
    ref_h, ref_w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = dense_loss(ref_h @ ref_w.t(), target, 0.1, reduction=reduction)
    ref.backward()
    # bfloat16 logits are rounded by the matmul (2**-9 relative) before the loss sees them.
    loss_tol = 1e-4 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(loss.double(), ref, atol=loss_tol * ref.abs().item(), rtol=loss_tol)
    grad_tol = 1e-4 if dtype == torch.float32 else 3e-2
    for ours, theirs in ((h.grad, ref_h.grad), (w.grad, ref_w.grad)):
        assert ours.dtype == dtype
        torch.testing.assert_close(
            ours.double(), theirs, atol=grad_tol * theirs.abs().max().item(), rtol=grad_tol
        )
