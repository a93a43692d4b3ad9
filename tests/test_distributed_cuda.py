"""The vocabulary-parallel paths on one GPU over NCCL (world 1): what a single card can check.

Skipped without CUDA (this file runs in ``benchmarks/gpu_check.sh``). With one rank every class is
local, so the sharded loss and the sharded fused head must equal their unsharded forms exactly as
computed on the same card, gradients included; the group is NCCL alone (device-side agreement
exchange) and the ``"cpu:gloo,cuda:nccl"`` pair (host-side exchange).
"""

from __future__ import annotations

import pytest
import torch

import lsr_fused

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module", params=["nccl", "cpu:gloo,cuda:nccl"])
def group(request):
    import torch.distributed as dist

    if not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    torch.cuda.set_device(0)
    dist.init_process_group(
        request.param,
        store=dist.HashStore(),
        rank=0,
        world_size=1,
        device_id=torch.device("cuda:0"),
    )
    yield dist.group.WORLD
    dist.destroy_process_group()


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("spread", ["all", "others"])
def test_sharded_loss_world_one_matches_unsharded(group, dtype, reduction, spread):
    torch.manual_seed(0)
    logits = torch.randn(64, 1000, device="cuda", dtype=dtype, requires_grad=True)
    target = torch.randint(0, 1000, (64,), device="cuda")
    target[5] = -100
    weight = torch.rand(1000, device="cuda") + 0.5
    options = dict(reduction=reduction, spread=spread, weight=weight, z_loss=1e-4)
    sharded = lsr_fused.label_smoothing_cross_entropy(
        logits, target, 0.1, process_group=group, **options
    )
    local = lsr_fused.label_smoothing_cross_entropy(logits, target, 0.1, **options)
    upstream = torch.rand_like(local)
    torch.testing.assert_close(sharded, local, rtol=1e-5, atol=1e-5)
    (grad_sharded,) = _grads((sharded * upstream).sum(), [logits])
    (grad_local,) = _grads((local * upstream).sum(), [logits])
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad_sharded.float(), grad_local.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("reduce_hidden_grad", [True, False])
def test_sharded_fused_head_world_one_matches_unsharded(
    group, dtype, reduction, reduce_hidden_grad
):
    torch.manual_seed(0)
    hidden = torch.randn(96, 64, device="cuda", dtype=dtype, requires_grad=True)
    weight = (0.1 * torch.randn(1000, 64, device="cuda", dtype=dtype)).requires_grad_()
    bias = torch.zeros(1000, device="cuda", dtype=dtype, requires_grad=True)
    target = torch.randint(0, 1000, (96,), device="cuda")
    options = dict(bias=bias, reduction=reduction, spread="others", chunk_size=40)
    sharded = lsr_fused.linear_label_smoothing_cross_entropy(
        hidden,
        weight,
        target,
        0.1,
        process_group=group,
        reduce_hidden_grad=reduce_hidden_grad,
        **options,
    )
    local = lsr_fused.linear_label_smoothing_cross_entropy(hidden, weight, target, 0.1, **options)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(sharded, local, rtol=tol, atol=tol)
    upstream = torch.rand_like(local)
    grads_sharded = _grads((sharded * upstream).sum(), [hidden, weight, bias])
    grads_local = _grads((local * upstream).sum(), [hidden, weight, bias])
    for got, expected in zip(grads_sharded, grads_local, strict=True):
        torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)


def test_no_host_sync_on_the_mixed_group(group):
    """With a host-side exchange (gloo next to NCCL) the sharded loss makes no device sync."""
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        pytest.skip("an NCCL-only group exchanges its agreement table through the device")
    logits = torch.randn(32, 500, device="cuda", requires_grad=True)
    target = torch.randint(0, 500, (32,), device="cuda")
    lsr_fused.label_smoothing_cross_entropy(logits, target, 0.1, process_group=group)  # warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = lsr_fused.label_smoothing_cross_entropy(logits, target, 0.1, process_group=group)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
