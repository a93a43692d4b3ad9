"""The C++ backend's CPU gradient pool (``csrc/grad_pool.h``, issue 14): a gradient still referenced
is never handed out again, a released one is reused by the next step, trimming or disabling the
pool gives the memory back to the system, the bound holds, and results do not depend on the pool.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch
from reference import IGNORE, random_case

import lsr_fused
from lsr_fused import label_smoothing_cross_entropy

MiB = 1 << 20
# Gradients below 1 MiB are plain torch.empty_like: every shape here is at least that large.
ROWS, CLASSES = 512, 1024  # 2 MiB of float32


@pytest.fixture(autouse=True)
def pool(cpp):
    """An empty pool with the default bound for each test, restored afterwards."""
    previous = lsr_fused.set_gradient_pool(None)
    lsr_fused.trim_gradient_pool()
    yield cpp
    lsr_fused.set_gradient_pool(previous)
    lsr_fused.trim_gradient_pool()


def stats() -> dict[str, int]:
    return lsr_fused.gradient_pool_stats()


def case(rows=ROWS, classes=CLASSES, dtype=torch.float32, seed=0):
    logits, target = random_case((rows, classes), dtype, seed=seed)
    return logits.requires_grad_(), target


def step(logits, target, **options):
    """One default-mode training step on a leaf: returns the loss; the gradient is logits.grad."""
    loss = label_smoothing_cross_entropy(logits, target, 0.1, backend="cpp", **options)
    loss.backward()
    return loss.detach()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_released_gradient_is_reused_by_the_next_step():
    logits, target = case()
    step(logits, target)
    first = logits.grad.data_ptr()
    assert stats()["outstanding_buffers"] == 1
    logits.grad = None  # what optimizer.zero_grad() does
    assert stats()["cached_buffers"] == 1
    before = stats()
    for _ in range(3):
        step(logits, target)
        assert logits.grad.data_ptr() == first
        logits.grad = None
    after = stats()
    assert after["hits"] == before["hits"] + 3
    assert after["misses"] == before["misses"]


def test_non_leaf_gradient_is_reused_too():
    source, target = case()
    ptrs = []
    for _ in range(3):
        logits = source * 1.0
        loss = label_smoothing_cross_entropy(logits, target, 0.1, backend="cpp")
        (grad,) = torch.autograd.grad(loss, logits)
        ptrs.append(grad.data_ptr())
        del grad, loss, logits
    assert ptrs[1] == ptrs[0] and ptrs[2] == ptrs[0]


@pytest.mark.parametrize("keep", ["grad", "view"])
def test_referenced_gradient_is_never_reused(keep):
    logits, target = case()
    step(logits, target)
    kept = logits.grad if keep == "grad" else logits.grad[3:7]
    snapshot = kept.clone()
    kept_ptr = logits.grad.data_ptr()
    logits.grad = None
    assert stats()["cached_buffers"] == 0  # still referenced: not in the pool
    for seed in range(1, 5):
        other, other_target = case(seed=seed)
        step(other, other_target)
        assert other.grad.data_ptr() != kept_ptr
        other.grad = None  # this one goes back to the pool and is reused by the next
    assert torch.equal(kept, snapshot)
    del kept
    assert stats()["cached_buffers"] == 2  # now both are released


def test_accumulated_gradient_keeps_its_buffer():
    # Gradient accumulation: the leaf's .grad is kept across steps; each new gradient is added to
    # it and released, and the next step reuses that one, never the accumulator.
    logits, target = case()
    step(logits, target)
    accumulator = logits.grad.data_ptr()
    for _ in range(3):
        step(logits, target)
        assert logits.grad.data_ptr() == accumulator
    single = case()[0]
    step(single, target)
    torch.testing.assert_close(logits.grad, single.grad * 4, rtol=1e-5, atol=1e-6)
    assert single.grad.data_ptr() != accumulator


def test_buffers_are_aligned():
    for rows, classes, dtype in [(512, 1024, torch.float32), (1000, 4099, torch.bfloat16)]:
        logits, target = case(rows, classes, dtype)
        step(logits, target)
        ptr = logits.grad.data_ptr()
        assert ptr % 64 == 0
        if logits.numel() * logits.element_size() >= 4 * MiB:
            assert ptr % (2 * MiB) == 0  # whole transparent huge pages


def test_layout_matches_empty_like(pool):
    base = torch.randn(4, 1024, 600)
    for logits in (base, base.transpose(1, 2), base[:, :, :512]):
        grad = pool.empty_grad(logits.reshape(1, *logits.shape) if logits.dim() == 2 else logits)
        like = torch.empty_like(logits)
        assert grad.shape == like.shape and grad.stride() == like.stride()
        assert grad.dtype == like.dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("upstream", ["backward", "scaled", "none"])
def test_results_equal_with_pool_on_and_off(dtype, upstream):
    """Bitwise equal losses and gradients, including from a reused buffer full of stale values
    (ignored rows, the rows rewritten in backward, and the plain backward path)."""
    logits, target = random_case((ROWS, CLASSES), dtype, seed=7)
    target[::5] = IGNORE
    weight = torch.rand(CLASSES) + 0.5

    def run():
        x = logits.clone().requires_grad_()
        reduction = "none" if upstream == "none" else "mean"
        loss = label_smoothing_cross_entropy(
            x, target, 0.1, weight=weight, z_loss=1e-4, reduction=reduction, backend="cpp"
        )
        if upstream == "scaled":  # differs from the forward's guess: every row rewritten
            (loss * 1.5).backward()
        elif upstream == "none":
            loss.backward(torch.linspace(0.5, 2.0, loss.numel()).reshape(loss.shape))
        else:
            loss.backward()
        return loss.detach(), x.grad

    lsr_fused.set_gradient_pool(0)
    ref_loss, ref_grad = run()
    lsr_fused.set_gradient_pool(None)
    # Poison the pool: the next step gets a buffer full of NaN.
    _, stale = run()
    stale.fill_(float("nan"))
    stale_ptr = stale.data_ptr()
    del stale
    loss, grad = run()
    assert grad.data_ptr() == stale_ptr
    assert torch.equal(loss, ref_loss)
    assert torch.equal(grad, ref_grad)


def test_bound_is_respected():
    lsr_fused.set_gradient_pool(5 * MiB)
    grads = [step_grad(seed=s) for s in range(3)]  # 3 x 2 MiB handed out
    assert stats()["outstanding_buffers"] == 3
    del grads
    assert stats()["cached_buffers"] == 2  # the third would exceed 5 MiB: unmapped
    assert stats()["cached_bytes"] <= 5 * MiB
    # A buffer larger than the bound is never kept.
    big = step_grad(rows=4 * ROWS)  # 8 MiB
    assert stats()["cached_bytes"] <= 5 * MiB
    del big
    assert stats()["cached_bytes"] <= 5 * MiB
    assert stats()["outstanding_buffers"] == 0
    # Lowering the bound unmaps what is beyond it at once.
    assert lsr_fused.set_gradient_pool(2 * MiB) == 5 * MiB
    assert stats()["cached_bytes"] <= 2 * MiB
    assert stats()["max_bytes"] == 2 * MiB


def step_grad(rows=ROWS, seed=0):
    logits, target = case(rows=rows, seed=seed)
    step(logits, target)
    return logits.grad


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc/self/statm")
@pytest.mark.parametrize("how", ["trim", "disable"])
def test_memory_returns_to_the_system(how):
    size = 64 * MiB
    grad = step_grad(rows=size // (CLASSES * 4))
    del grad
    assert stats()["cached_bytes"] >= size
    held = rss_bytes()
    if how == "trim":
        assert lsr_fused.trim_gradient_pool() >= size
        assert stats()["max_bytes"] > 0  # still on
    else:
        lsr_fused.set_gradient_pool(0)
        assert stats()["max_bytes"] == 0
    assert stats()["cached_bytes"] == 0 and stats()["cached_buffers"] == 0
    assert held - rss_bytes() >= size * 3 // 4
    if how == "disable":
        # Off: gradients are plain torch allocations, never pooled.
        before = stats()
        grad = step_grad()
        assert stats()["outstanding_buffers"] == 0
        del grad
        assert stats()["cached_buffers"] == 0 and stats()["misses"] == before["misses"]


def test_concurrent_steps_from_threads():
    errors = []

    def worker(seed):
        try:
            for i in range(10):
                logits, target = case(seed=seed * 100 + i)
                step(logits, target)
                ref = logits.grad.clone()
                if not torch.equal(logits.grad, ref):
                    errors.append("changed")
                logits.grad = None
        except Exception as exc:  # reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    s = stats()
    assert s["outstanding_buffers"] == 0 and s["outstanding_bytes"] == 0
    assert s["cached_bytes"] <= s["max_bytes"]


def test_profiler_sees_a_pooled_gradient_as_an_allocation():
    logits, target = case()
    step(logits, target)
    logits.grad = None  # now cached: the next step reuses it
    nbytes = logits.numel() * logits.element_size()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        step(logits, target)
    assert stats()["hits"] >= 1
    assert any(e.cpu_memory_usage >= nbytes for e in prof.key_averages())


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0", 0), ("64MiB", 64 * MiB), ("3g", 3 << 30), ("nonsense", 1 << 30)],
)
def test_environment_variable_sets_the_bound(value, expected):
    code = (
        "import torch, lsr_fused;"
        "from lsr_fused.backends import cpp_backend;"
        "assert cpp_backend.is_available();"
        "print(lsr_fused.gradient_pool_stats()['max_bytes'])"
    )
    env = {**os.environ, "LSR_FUSED_GRAD_POOL_BYTES": value}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert int(out.stdout.strip().splitlines()[-1]) == expected


@pytest.mark.parametrize("bad", [1.5, True, False, "1024", 2.0])
def test_bound_must_be_an_integer(bad):
    """A float or a bool is not a byte count (int(1.5) and int(True) would be a 1-byte bound)."""
    before = lsr_fused.gradient_pool_stats()["max_bytes"]
    with pytest.raises(TypeError, match="max_bytes"):
        lsr_fused.set_gradient_pool(bad)
    assert lsr_fused.gradient_pool_stats()["max_bytes"] == before
