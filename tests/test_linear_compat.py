"""``lsr_fused.linear_cross_entropy`` against torch's ``F.linear_cross_entropy`` (torch 2.13+):
same arguments, same loss and gradients, on both of torch's paths (``options=None``, the full
logits, and ``options=LinearCrossEntropyOptions()``, chunked where torch supports it)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import lsr_fused
from lsr_fused import linear_cross_entropy

HAS_TORCH_LCE = hasattr(F, "linear_cross_entropy") and hasattr(
    torch.nn, "LinearCrossEntropyOptions"
)
needs_torch_lce = pytest.mark.skipif(
    not HAS_TORCH_LCE, reason="torch.nn.functional.linear_cross_entropy needs torch >= 2.13"
)


def make_inputs(rows=13, features=8, classes=17, *, bias=True, ignore=(), seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, features, generator=gen, dtype=torch.float64)
    weight = torch.randn(classes, features, generator=gen, dtype=torch.float64) * 0.5
    b = torch.randn(classes, generator=gen, dtype=torch.float64) * 0.1 if bias else None
    target = torch.randint(0, classes, (rows,), generator=gen)
    target[list(ignore)] = -100
    return hidden, weight, b, target


def loss_and_grads(fn, hidden, linear_weight, bias, target, **kw):
    tensors = (hidden, linear_weight, bias)
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors if t is not None]
    h, w, *rest = leaves
    with warnings.catch_warnings():
        # torch warns that its chunked path ignores `options` when label_smoothing != 0.
        warnings.simplefilter("ignore", UserWarning)
        loss = fn(h, w, target, linear_bias=rest[0] if rest else None, **kw)
    loss.sum().backward()
    return loss.detach(), [t.grad for t in leaves]


def assert_same(ours, theirs):
    (loss_a, grads_a), (loss_b, grads_b) = ours, theirs
    torch.testing.assert_close(loss_a, loss_b.to(loss_a.dtype), rtol=1e-10, atol=1e-12)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@needs_torch_lce
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunked", [False, True])
def test_matches_torch(label_smoothing, reduction, chunked):
    hidden, weight, bias, target = make_inputs(ignore=(2, 5))
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=4) if chunked else None
    kw = dict(reduction=reduction, label_smoothing=label_smoothing, options=options)
    assert_same(
        loss_and_grads(linear_cross_entropy, hidden, weight, bias, target, **kw),
        loss_and_grads(F.linear_cross_entropy, hidden, weight, bias, target, **kw),
    )


@needs_torch_lce
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_class_weights_ignore_index_no_bias(label_smoothing):
    hidden, weight, _, target = make_inputs(bias=False, seed=1)
    target[3] = 4
    class_weight = torch.rand(weight.shape[0], dtype=torch.float64) + 0.5
    kw = dict(weight=class_weight, ignore_index=4, label_smoothing=label_smoothing)
    for options in (None, torch.nn.LinearCrossEntropyOptions()):
        assert_same(
            loss_and_grads(
                linear_cross_entropy, hidden, weight, None, target, options=options, **kw
            ),
            loss_and_grads(
                F.linear_cross_entropy, hidden, weight, None, target, options=options, **kw
            ),
        )


@needs_torch_lce
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_unbatched_input(reduction):
    hidden, weight, bias, target = make_inputs(rows=1, seed=2)
    kw = dict(reduction=reduction, label_smoothing=0.1)
    ours = loss_and_grads(linear_cross_entropy, hidden[0], weight, bias, target[0], **kw)
    theirs = loss_and_grads(F.linear_cross_entropy, hidden[0], weight, bias, target[0], **kw)
    assert ours[0].shape == theirs[0].shape == ()
    assert_same(ours, theirs)


@needs_torch_lce
def test_probability_targets_fall_back_with_a_warning():
    hidden, weight, bias, _ = make_inputs(seed=3)
    probs = torch.softmax(torch.randn(hidden.shape[0], weight.shape[0], dtype=torch.float64), -1)
    with pytest.warns(UserWarning, match="class-probability targets are not fused"):
        linear_cross_entropy(hidden, weight, probs, label_smoothing=0.1)
    ours = loss_and_grads(linear_cross_entropy, hidden, weight, bias, probs, label_smoothing=0.1)
    theirs = loss_and_grads(
        F.linear_cross_entropy, hidden, weight, bias, probs, label_smoothing=0.1
    )
    assert_same(ours, theirs)
    with pytest.raises(ValueError, match="ignore_index"):
        linear_cross_entropy(hidden, weight, probs, ignore_index=-100)


def test_token_shaped_input_matches_flattened():
    hidden, weight, bias, target = make_inputs(rows=12, seed=4)
    flat = linear_cross_entropy(hidden, weight, target, linear_bias=bias, label_smoothing=0.1)
    tokens = linear_cross_entropy(
        hidden.view(3, 4, -1), weight, target.view(3, 4), linear_bias=bias, label_smoothing=0.1
    )
    torch.testing.assert_close(tokens, flat, rtol=1e-12, atol=0)


def test_dense_reference_without_torch_function():
    """Against the plain composition, so the drop-in is checked on torch versions without it."""
    hidden, weight, bias, target = make_inputs(ignore=(0,), seed=5)
    composed = lambda h, w, t, linear_bias, **kw: F.cross_entropy(
        F.linear(h, w, linear_bias), t, **kw
    )
    for eps in (0.0, 0.1):
        assert_same(
            loss_and_grads(linear_cross_entropy, hidden, weight, bias, target, label_smoothing=eps),
            loss_and_grads(composed, hidden, weight, bias, target, label_smoothing=eps),
        )


def test_bad_arguments_raise_naming_them():
    hidden, weight, _, target = make_inputs()
    with pytest.raises(ValueError, match="linear_weight must be 2-D"):
        linear_cross_entropy(hidden, weight.view(17, 1, 8), target)
    with pytest.raises(TypeError, match="options"):
        linear_cross_entropy(hidden, weight, target, options=3)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(
            hidden, weight, target, options=type("O", (), {"batch_chunk_size": 0})()
        )
    with pytest.raises(ValueError, match="label_smoothing"):
        linear_cross_entropy(hidden, weight, target, label_smoothing=1.5)


def test_exported():
    assert lsr_fused.linear_cross_entropy is linear_cross_entropy
    assert "linear_cross_entropy" in lsr_fused.__all__


@needs_torch_lce
def test_bench_linear_times_torch_native_and_the_floor(tmp_path):
    """benchmarks/bench_linear.py --quick: torch's rows (eps 0 chunked, eps 0.1) and the floor
    ran, torch's rows agree with the float64 reference at their own smoothing."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_linear.py"
    out = tmp_path / "linear.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(script), "--quick", "--no-compile", "--quiet"]
    proc = subprocess.run([*cmd, "--shapes", "64x16x300:float32", "--json", str(out)],
                          capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run,) = json.loads(out.read_text())["runs"]
    rows = {r["name"]: r for r in run["results"]}
    assert rows["three matmuls (floor)"]["x_floor"] == 1.0
    native = [r for name, r in rows.items() if name.startswith("torch linear_cross_entropy")]
    assert sorted(r["label_smoothing"] for r in native) == [0.0, 0.1]
    for r in native + [rows["lsr_fused linear"], rows["lsr_fused linear (eps 0)"]]:
        assert r["status"] == "ok" and r["loss_err"] < 1e-5 and r["grad_err"] < 1e-4, r
        assert r["x_floor"] > 0 and r["extra_bytes"] is not None
