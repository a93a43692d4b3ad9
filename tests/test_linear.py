"""The fused classifier + loss against the unfused composition and a dense float64 reference.

``linear_label_smoothing_cross_entropy(hidden, weight, target, ...)`` must equal (up to rounding)
``label_smoothing_cross_entropy(F.linear(hidden, weight, bias), target, ...)``, gradients of
``hidden``, ``weight`` and ``bias`` included, for every option, chunk size and backend.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from reference import dense_loss

import lsr_fused
from lsr_fused import (
    LinearLabelSmoothingCE,
    available_backends,
    label_smoothing_cross_entropy,
    linear_label_smoothing_cross_entropy,
)
from lsr_fused import linear as linear_mod

ROOT = Path(__file__).resolve().parents[1]
CPU_BACKENDS = [b for b in ("torch", "cpp") if b in available_backends("cpu")]
HAS_TRITON = importlib.util.find_spec("triton") is not None and "triton" in available_backends(
    "cpu"
)


def make_inputs(
    shape=(7,),
    features=8,
    classes=11,
    dtype=torch.float64,
    *,
    bias=True,
    ignore=(),
    seed=0,
    scale=1.0,
):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*shape, features, generator=gen, dtype=torch.float64) * scale).to(dtype)
    weight = (torch.randn(classes, features, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
    b = (torch.randn(classes, generator=gen, dtype=torch.float64) * 0.1).to(dtype) if bias else None
    target = torch.randint(0, classes, shape, generator=gen)
    flat = target.view(-1)
    for i in ignore:
        flat[i] = -100
    for t in (hidden, weight, b):
        if t is not None:
            t.requires_grad_(True)
    return hidden, weight, b, target


def unfused(hidden, weight, bias, target, label_smoothing=0.1, class_weight=None, **kw):
    logits = F.linear(hidden, weight, bias)
    loss = label_smoothing_cross_entropy(
        logits.reshape(-1, weight.shape[0]),
        target.reshape(-1),
        label_smoothing,
        weight=class_weight,
        **kw,
    )
    return loss.reshape(target.shape) if kw.get("reduction") == "none" else loss


def dense(hidden, weight, bias, target, label_smoothing=0.1, class_weight=None, **kw):
    """The float64 one-hot reference on float64 copies of the inputs."""
    logits = F.linear(
        hidden.double(), weight.double(), None if bias is None else bias.double()
    ).reshape(-1, weight.shape[0])
    loss = dense_loss(logits, target.reshape(-1), label_smoothing, weight=class_weight, **kw)
    return loss.reshape(target.shape) if kw.get("reduction") == "none" else loss


def loss_and_grads(fn, hidden, weight, bias, target, upstream=None, **kw):
    """(loss, grads of hidden, weight, bias) of ``fn``, on fresh leaves of the same values."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in
              (hidden, weight, bias)]  # fmt: skip
    hidden, weight, bias = leaves
    loss = fn(hidden, weight, bias, target, **kw)
    if upstream is None:
        upstream = torch.ones_like(loss)
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, wanted, upstream.to(loss.dtype))
    grads = list(grads) + [None] * (3 - len(grads))
    return loss.detach(), grads


def fused(hidden, weight, bias, target, label_smoothing=0.1, class_weight=None, **kw):
    return linear_label_smoothing_cross_entropy(
        hidden, weight, target, label_smoothing, bias=bias, class_weight=class_weight, **kw
    )


def assert_matches(a, b, atol=1e-10, rtol=1e-8):
    loss_a, grads_a = a
    loss_b, grads_b = b
    torch.testing.assert_close(
        loss_a, loss_b.to(loss_a.dtype), atol=atol, rtol=rtol, equal_nan=True
    )
    for ga, gb in zip(grads_a, grads_b, strict=True):
        if ga is None:
            assert gb is None
            continue
        torch.testing.assert_close(ga, gb.to(ga.dtype), atol=atol, rtol=rtol)


OPTIONS = [
    pytest.param({}, id="plain"),
    pytest.param({"spread": "others"}, id="others"),
    pytest.param({"class_weight": "rand"}, id="class_weight"),
    pytest.param({"ignore": (1, 4)}, id="ignore"),
    pytest.param({"z_loss": 1e-2}, id="z_loss"),
    pytest.param(
        {
            "spread": "others",
            "class_weight": "rand",
            "ignore": (0,),
            "z_loss": 1e-3,
            "label_smoothing": 0.3,
        },
        id="everything",
    ),
]


def split_options(options, classes):
    options = dict(options)
    ignore = options.pop("ignore", ())
    if options.get("class_weight") == "rand":
        gen = torch.Generator().manual_seed(5)
        options["class_weight"] = torch.rand(classes, generator=gen, dtype=torch.float64) + 0.5
    return options, ignore


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTIONS)
def test_parity_float64(backend, reduction, options):
    """Every option and reduction, chunk sizes 1, odd, N and > N: the unfused composition and the
    dense float64 reference agree to float64 rounding."""
    classes = 11
    kw, ignore = split_options(options, classes)
    hidden, weight, bias, target = make_inputs((7,), 8, classes, ignore=ignore)
    upstream = torch.randn(7, dtype=torch.float64) if reduction == "none" else None
    kw.update(reduction=reduction)
    ref = loss_and_grads(unfused, hidden, weight, bias, target, upstream, backend="torch", **kw)
    ref_dense = loss_and_grads(dense, hidden, weight, bias, target, upstream, **kw)
    assert_matches(ref, ref_dense)
    for chunk in (1, 3, 7, 50):
        ours = loss_and_grads(
            fused, hidden, weight, bias, target, upstream, chunk_size=chunk, backend=backend, **kw
        )
        assert_matches(ours, ref)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_ignored(backend, reduction):
    hidden, weight, bias, target = make_inputs((5,), 4, 6, ignore=range(5))
    kw = dict(reduction=reduction)
    ours = loss_and_grads(fused, hidden, weight, bias, target, chunk_size=2, backend=backend, **kw)
    ref = loss_and_grads(unfused, hidden, weight, bias, target, backend="torch", **kw)
    assert_matches(ours, ref)
    if reduction == "mean":
        assert torch.isnan(ours[0])
    assert all(bool((g == 0).all()) for g in ours[1])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_upstream_and_partial_grads(backend):
    """A non-unit upstream (scaled in backward), a frozen weight, no bias, a second backward."""
    hidden, weight, _, target = make_inputs((6,), 5, 9, bias=False)
    weight.requires_grad_(False)
    loss = linear_label_smoothing_cross_entropy(
        hidden, weight, target, chunk_size=4, backend=backend
    )
    (loss * 3.0).backward(retain_graph=True)
    first = hidden.grad.clone()
    hidden.grad = None
    (loss * 3.0).backward()  # the second backward recomputes
    torch.testing.assert_close(hidden.grad, first)
    ref_h = hidden.detach().clone().requires_grad_(True)
    ref = unfused(ref_h, weight, None, target, backend="torch")
    (ref * 3.0).backward()
    torch.testing.assert_close(first, ref_h.grad)
    assert weight.grad is None


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (interpreter)")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_interpreter(reduction):
    """The Triton row kernels (interpreted on the CPU), at a small size."""
    kw, ignore = split_options({"class_weight": "rand", "ignore": (2,), "z_loss": 1e-3}, 6)
    hidden, weight, bias, target = make_inputs((5,), 4, 6, dtype=torch.float32, ignore=ignore)
    kw = dict(kw, class_weight=kw["class_weight"].float(), reduction=reduction, spread="others")
    upstream = torch.randn(5) if reduction == "none" else None
    ours = loss_and_grads(
        fused, hidden, weight, bias, target, upstream, chunk_size=2, backend="triton", **kw
    )
    ref = loss_and_grads(unfused, hidden, weight, bias, target, upstream, backend="torch", **kw)
    assert_matches(ours, ref, atol=1e-5, rtol=1e-5)


def max_rel_err(got, ref):
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_half_and_float32_against_float64(dtype, backend):
    """Errors against the float64 reference are no worse than the unfused path's (small margin
    for rounding luck), with several chunks so that the weight gradient is accumulated."""
    hidden, weight, bias, target = make_inputs((64,), 32, 96, dtype=dtype, ignore=(3,), scale=2.0)
    kw = dict(reduction="mean", z_loss=1e-3)
    ref = loss_and_grads(dense, hidden, weight, bias, target, **kw)
    base = loss_and_grads(unfused, hidden, weight, bias, target, backend=backend, **kw)
    ours = loss_and_grads(fused, hidden, weight, bias, target, chunk_size=9, backend=backend, **kw)
    assert ours[0].dtype == torch.float32
    for got, unf, r in zip(
        [ours[0], *ours[1]], [base[0], *base[1]], [ref[0], *ref[1]], strict=True
    ):
        assert got.dtype == unf.dtype
        err, base_err = max_rel_err(got, r), max_rel_err(unf, r)
        limit = 1.5 * base_err + (1e-6 if dtype == torch.float32 else 4e-3)
        assert err <= limit, (err, base_err)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_three_d_and_non_contiguous_hidden(backend):
    hidden, weight, bias, target = make_inputs((2, 5), 6, 10)
    # A non-contiguous view: every other feature of a wider tensor, transposed batch/time.
    wide = torch.randn(5, 2, 12, dtype=torch.float64)
    view = wide[..., ::2].transpose(0, 1)
    assert not view.is_contiguous()
    for h in (hidden, view):
        for reduction in ("mean", "none"):
            upstream = torch.randn(2, 5, dtype=torch.float64) if reduction == "none" else None
            kw = dict(reduction=reduction)
            ours = loss_and_grads(
                fused, h, weight, bias, target, upstream, chunk_size=3, backend=backend, **kw
            )
            ref = loss_and_grads(unfused, h, weight, bias, target, upstream, backend="torch", **kw)
            assert ours[0].shape == ref[0].shape
            assert_matches(ours, ref)


def test_tied_embedding_weight():
    """A weight shared with an embedding: gradients of both uses add up."""
    torch.manual_seed(0)
    weights = []
    for fn in (fused, unfused):
        emb = torch.nn.Embedding(13, 6).double()
        emb.weight.data.copy_(torch.randn(13, 6, generator=torch.Generator().manual_seed(1)))
        tokens = torch.tensor([[1, 4, 7], [2, 2, 12]])
        hidden = torch.tanh(emb(tokens))
        target = torch.tensor([[4, 7, 0], [2, 12, -100]])
        loss = (
            fn(hidden, emb.weight, None, target, chunk_size=4)
            if fn is fused
            else fn(hidden, emb.weight, None, target, backend="torch")
        )
        loss.backward()
        weights.append(emb.weight.grad)
    torch.testing.assert_close(weights[0], weights[1])


def test_no_grad_does_no_gradient_work(monkeypatch):
    hidden, weight, bias, target = make_inputs((6,), 4, 7)
    calls = []
    original = linear_mod._Problem.accumulate
    monkeypatch.setattr(
        linear_mod._Problem, "accumulate", lambda *a: (calls.append(1), original(*a))[1]
    )
    with torch.no_grad():
        loss = linear_label_smoothing_cross_entropy(hidden, weight, target, bias=bias)
    assert loss.grad_fn is None and not calls
    ref = unfused(hidden, weight, bias, target, backend="torch")
    torch.testing.assert_close(loss, ref.detach())
    linear_label_smoothing_cross_entropy(hidden, weight, target, bias=bias)
    assert calls  # a training step does accumulate in forward


def test_autocast_cpu_bfloat16():
    """Under autocast the matmuls run in bfloat16 and the loss is float32, as in unfused code;
    float32 parameters get float32 gradients."""
    hidden, weight, bias, target = make_inputs((16,), 8, 24, dtype=torch.float32)
    results = []
    for fn in (fused, unfused):
        h, w, b = (t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(h, w, b, target, chunk_size=5) if fn is fused else fn(h, w, b, target)
        assert loss.dtype == torch.float32
        loss.backward()
        assert w.grad.dtype == torch.float32 and h.grad.dtype == torch.float32
        results.append((loss.detach(), [h.grad, w.grad, b.grad]))
    assert_matches(results[0], results[1], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph(reduction):
    hidden, weight, bias, target = make_inputs((6,), 5, 9, dtype=torch.float32)
    upstream = torch.randn(6) if reduction == "none" else None
    kw = dict(reduction=reduction, chunk_size=4, z_loss=1e-3)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    ours = loss_and_grads(compiled, hidden, weight, bias, target, upstream, **kw)
    ref = loss_and_grads(fused, hidden, weight, bias, target, upstream, **kw)
    assert_matches(ours, ref, atol=1e-6, rtol=1e-6)


def test_opcheck():
    """The custom ops' fake implementations and schemas agree with the real ones."""
    hidden, weight, bias, target = make_inputs((5,), 4, 6, dtype=torch.float32)
    h, w, b = hidden.detach(), weight.detach(), bias.detach()
    # The schema's groups: head (hidden, weight, bias, target, class weights and their sum, mixed
    # target and lam), then chunk_size, the masses, z_loss, ignore_index, backend, softcap, stats.
    head = (h, w, b, target, None, None, None, None)
    scalars = (2, 0.9, 0.1 / 6, 0.0, -100, "torch", 0.0, False)
    guess = torch.ones(1)
    torch.library.opcheck(
        torch.ops.lsr_fused.linear_forward_with_grad.default,
        (*head, guess, *scalars, True, True, True),
        test_utils=("test_schema", "test_faketensor"),
    )
    torch.library.opcheck(
        torch.ops.lsr_fused.linear_forward.default,
        (*head, *scalars),
        test_utils=("test_schema", "test_faketensor"),
    )
    _, lse, *_ = torch.ops.lsr_fused.linear_forward(*head, *scalars)
    torch.library.opcheck(
        torch.ops.lsr_fused.linear_backward.default,
        (torch.ones(5), *head, lse, *scalars, True, False, True),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck(reduction):
    hidden, weight, bias, target = make_inputs((4,), 3, 5, ignore=(1,))
    cw = torch.rand(5, dtype=torch.float64) + 0.5

    def fn(h, w, b):
        return linear_label_smoothing_cross_entropy(
            h, w, target, 0.2, bias=b, class_weight=cw, reduction=reduction, z_loss=0.01,
            chunk_size=3, spread="others",
        )  # fmt: skip

    # A second backward recomputes what the first took from the forward pass: equal within
    # rounding, not bit for bit.
    assert torch.autograd.gradcheck(fn, (hidden, weight, bias), nondet_tol=1e-12)


def test_module_matches_functional():
    hidden, weight, bias, target = make_inputs((2, 3), 4, 6)
    cw = torch.rand(6, dtype=torch.float64)
    criterion = LinearLabelSmoothingCE(0.2, class_weight=cw, spread="others", chunk_size=2)
    assert "class_weight" in dict(criterion.named_buffers())
    loss = criterion(hidden, weight, target, bias=bias)
    ref = fused(hidden, weight, bias, target, 0.2, class_weight=cw, spread="others")
    torch.testing.assert_close(loss, ref)
    head = torch.nn.Linear(4, 6).double()
    loss = LinearLabelSmoothingCE(0.1)(hidden, head.weight, target, bias=head.bias)
    loss.backward()
    assert head.weight.grad is not None and head.bias.grad is not None


def test_default_chunk_size():
    # Small problems: one chunk, as much as the unfused logits.
    assert linear_mod.default_chunk_size(1000, 1000, torch.float32) == 1000
    # Past 256 MiB of float32 logits: at most 1/8 of them, at most 256 MiB.
    cases = [
        (4096, 32000, torch.float32),
        (8192, 128256, torch.bfloat16),
        (32768, 256000, torch.bfloat16),
        (3, 1 << 26, torch.float32),
    ]
    for rows, classes, dtype in cases:
        chunk = linear_mod.default_chunk_size(rows, classes, dtype)
        chunk_bytes = chunk * classes * dtype.itemsize
        assert 1 <= chunk <= rows
        assert chunk_bytes <= max(rows * classes * 4 // 8, classes * dtype.itemsize)
        assert chunk_bytes <= max(256 << 20, classes * dtype.itemsize)


def _bad(**overrides):
    hidden, weight, bias, target = make_inputs((4,), 3, 5, dtype=torch.float32)
    args = dict(hidden=hidden, weight=weight, target=target, bias=bias)
    args.update(overrides)
    h, w, t = args.pop("hidden"), args.pop("weight"), args.pop("target")
    return lambda: linear_label_smoothing_cross_entropy(h, w, t, **args)


BAD_INPUTS = [
    (dict(weight=torch.randn(5, 3, dtype=torch.float64)), TypeError, "hidden and weight"),
    (dict(bias=torch.randn(5, dtype=torch.float64)), TypeError, "bias"),
    (dict(hidden=[1.0]), TypeError, "hidden"),
    (dict(weight=torch.randn(5, 4)), ValueError, "input features"),
    (dict(weight=torch.randn(5)), ValueError, "weight must be 2-D"),
    (dict(bias=torch.randn(4)), ValueError, "bias must have shape"),
    (dict(target=torch.zeros(3, dtype=torch.long)), ValueError, "target shape"),
    (dict(target=torch.zeros(4)), TypeError, "target"),
    (dict(target=torch.tensor([0, 1, 7, 2])), ValueError, "target contains 7"),
    (dict(class_weight=torch.ones(4)), ValueError, "class_weight must have shape"),
    (dict(class_weight=torch.ones(5, dtype=torch.long)), TypeError, "class_weight"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(chunk_size=2.0), TypeError, "chunk_size"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(spread="some"), ValueError, "spread"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(z_loss=-1.0), ValueError, "z_loss"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(weight=torch.randn(0, 3), bias=None), ValueError, "at least one class"),
]


@pytest.mark.parametrize("overrides, error, match", BAD_INPUTS)
def test_bad_inputs_name_the_argument(overrides, error, match, monkeypatch):
    calls = []
    monkeypatch.setattr(linear_mod, "_chunks", lambda *a: calls.append(a) or iter(()))
    with pytest.raises(error, match=match):
        _bad(**overrides)()
    assert not calls  # raised before any work


def test_module_rejects_bad_options():
    with pytest.raises(ValueError, match="reduction"):
        LinearLabelSmoothingCE(reduction="avg")
    with pytest.raises(ValueError, match="chunk_size"):
        LinearLabelSmoothingCE(chunk_size=0)
    assert "LinearLabelSmoothingCE" in lsr_fused.__all__


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_bfloat16_parity(reduction):
    """On the card: the Triton rows kernel, cuBLAS matmuls, the float32 weight accumulator."""
    hidden, weight, bias, target = make_inputs((300,), 64, 1000, dtype=torch.bfloat16, ignore=(5,))
    hidden, weight, bias = (t.detach().cuda().requires_grad_(True) for t in (hidden, weight, bias))
    target = target.cuda()
    upstream = torch.randn(300, device="cuda") if reduction == "none" else None
    kw = dict(reduction=reduction, z_loss=1e-3)
    ref = loss_and_grads(dense, hidden, weight, bias, target, upstream, **kw)
    base = loss_and_grads(unfused, hidden, weight, bias, target, upstream, **kw)
    ours = loss_and_grads(fused, hidden, weight, bias, target, upstream, chunk_size=77, **kw)
    for got, unf, r in zip(
        [ours[0], *ours[1]], [base[0], *base[1]], [ref[0], *ref[1]], strict=True
    ):
        err, base_err = max_rel_err(got, r), max_rel_err(unf, r)
        assert err <= 1.5 * base_err + 4e-3, (err, base_err)


def test_bench_linear_quick(tmp_path):
    """Smoke test of ``benchmarks/bench_linear.py --quick``: it runs and our row is correct."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "linear.json"
    script = ROOT / "benchmarks" / "bench_linear.py"
    cmd = [sys.executable, str(script), "--quick", "--device", "cpu", "--no-compile", "--quiet"]
    proc = subprocess.run(
        [*cmd, "--shapes", "64x16x300:float32", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "lsr_fused linear" in proc.stdout and "unfused eager" in proc.stdout
    (run,) = json.loads(out.read_text())["runs"]
    ours = next(r for r in run["results"] if r["name"] == "lsr_fused linear")
    assert ours["status"] == "ok" and ours["loss_err"] < 1e-5 and ours["grad_err"] < 1e-4
    assert ours["extra_bytes"] is not None
