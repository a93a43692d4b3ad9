"""Issue 22's backend options in the C++ CPU kernels: softcap, mixed targets (``mix=``) and
statistics (``stats=``), called at the backend level on ``(B, S, C)`` row views and compared with
the float64 references of ``tests/reference.py`` (``dense_loss`` with autograd, ``dense_stats``).

Every test runs on each CPU kernel variant this machine supports (default, AVX2, AVX-512) and, where
a path is named, on both ways of getting the gradient: ``plain`` (forward, then a backward that
computes it) and ``train`` (the forward writes it for ``grad_guess``; the backward then redoes only
the rows whose upstream differs from the guess, half of them here).
"""

from __future__ import annotations

import types

import pytest
import torch
from reference import IGNORE, assert_close, dense_loss, dense_stats, row_params, tolerances

from lsr_fused.backends import cpp_backend

pytestmark = pytest.mark.skipif(
    not cpp_backend.is_available("cpu"), reason="C++ backend unavailable"
)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
PATHS = ["plain", "train"]
GUESS = 0.5


def _capabilities() -> list[str]:
    if not cpp_backend.is_available("cpu"):
        return ["default"]
    current = cpp_backend.cpu_capability()
    names = []
    for name in ("default", "avx2", "avx512"):
        try:
            cpp_backend.set_cpu_capability(name)
        except ValueError:
            continue
        names.append(name)
    cpp_backend.set_cpu_capability(current)
    return names


@pytest.fixture(params=_capabilities())
def capability(request):
    previous = cpp_backend.set_cpu_capability(request.param)
    yield request.param
    cpp_backend.set_cpu_capability(previous)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(shape, dtype, scale=3.0, seed=0, offset=0.0) -> torch.Tensor:
    return (torch.randn(shape, generator=_gen(seed), dtype=torch.float64) * scale + offset).to(
        dtype
    )


def _targets(rows: int, num_classes: int, seed: int = 1, ignore_every: int = 3) -> torch.Tensor:
    target = torch.randint(0, num_classes, (rows,), generator=_gen(seed))
    target[::ignore_every] = IGNORE
    return target


def _weights(num_classes: int, dtype: torch.dtype):
    weight = (torch.rand(num_classes, generator=_gen(7), dtype=torch.float64) + 0.5).to(_acc(dtype))
    return weight, weight.sum().reshape(1)


def _upstream(rows: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-row upstream gradient, GUESS on every other row (the train path skips those)."""
    upstream = torch.rand(rows, generator=_gen(3), dtype=torch.float64) + 0.25
    upstream[::2] = GUESS
    return upstream.to(_acc(dtype))


def _stats_out(rows: int, dtype: torch.dtype):
    lse = torch.full((rows,), 12345.0, dtype=_acc(dtype))
    argmax = torch.full((rows,), -7, dtype=torch.long)
    return lse, argmax


def _ours(x, target, params, upstream, *, weight=None, mix=None, stats=True, path="plain",
          grad_out=None):  # fmt: skip
    """(loss, grad, stats) of the C++ backend along ``path``; stats = (lse, argmax) or None."""
    weight, weight_total = weight if weight is not None else (None, None)
    grad = torch.empty_like(x) if grad_out is None else grad_out
    outputs = _stats_out(target.numel(), x.dtype) if stats else None
    if path == "plain":
        loss, lse = cpp_backend.forward(
            x, target, weight, weight_total, params, mix=mix, stats=outputs
        )
        cpp_backend.backward(upstream, x, target, weight, weight_total, lse, params, grad, mix=mix)
    else:
        guess = torch.tensor([GUESS], dtype=_acc(x.dtype))
        loss, lse = cpp_backend.forward(
            x, target, weight, weight_total, params, grad, guess, mix=mix, stats=outputs
        )
        cpp_backend.backward(
            upstream, x, target, weight, weight_total, lse, params, grad, guess, mix=mix
        )
    return loss, grad, outputs


def _capped(x: torch.Tensor, softcap: float) -> torch.Tensor:
    return softcap * torch.tanh(x / softcap) if softcap else x


def _reference(x, target, eps, spread, upstream, *, z_loss=0.0, softcap=0.0, weight=None,
               mix_target=None, mix_lambda=1.0):  # fmt: skip
    """float64 (loss, grad, lse, z) of the rows of x (B, S, C): dense_loss, its autograd gradient
    for ``upstream``, dense_stats' lse, and the capped logits (for argmax checks)."""
    num_classes = x.shape[-1]
    rows = x.detach().double().reshape(-1, num_classes).requires_grad_()
    loss = dense_loss(
        rows, target, eps, reduction="none", spread=spread, z_loss=z_loss,
        weight=None if weight is None else weight[0], softcap=softcap or None,
        mix_target=mix_target, mix_lambda=mix_lambda,
    )  # fmt: skip
    loss.backward(upstream.double())
    lse, _, _ = dense_stats(rows.detach(), target, softcap=softcap or None)
    return loss.detach(), rows.grad.reshape(x.shape), lse, _capped(rows.detach(), softcap)


def _check(ours, ref, dtype, *, exact_argmax=True):
    loss, grad, stats = ours
    ref_loss, ref_grad, ref_lse, z = ref
    loss_tol, grad_tol = tolerances(dtype)
    assert loss.dtype == _acc(dtype) and grad.dtype == dtype
    assert_close(loss, ref_loss, loss_tol, "loss")
    assert_close(grad, ref_grad, grad_tol, "grad")
    if stats is None:
        return
    lse, argmax = stats
    assert_close(lse, ref_lse, loss_tol, "lse")
    if exact_argmax:
        torch.testing.assert_close(argmax, z.argmax(dim=-1), rtol=0, atol=0)
    else:  # where float32 rounds distinct float64 maxima together: the index attains the maximum
        assert ((argmax >= 0) & (argmax < z.shape[-1])).all()
        picked = z.gather(1, argmax.unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(picked, z.max(dim=-1).values, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------------
# Softcap
# ------------------------------------------------------------------------------------------------

# (label smoothing, spread, z_loss, weighted)
OPTIONS = {
    "all": (0.1, "all", 0.0, False),
    "others-weighted": (0.1, "others", 0.0, True),
    "zloss-weighted": (0.2, "all", 1e-3, True),
    "eps0": (0.0, "all", 0.0, False),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_softcap(capability, dtype, option, path):
    eps, spread, z_loss, weighted = OPTIONS[option]
    B, S, C, cap = 2, 3, 300, 10.0
    x = _logits((B, S, C), dtype, scale=8.0)  # |x / c| on both sides of the tanh branch point
    target = _targets(B * S, C)
    weight = _weights(C, dtype) if weighted else None
    upstream = _upstream(B * S, dtype)
    params = row_params(C, eps, spread, z_loss, cap)
    ours = _ours(x, target, params, upstream, weight=weight, path=path)
    ref = _reference(x, target, eps, spread, upstream, z_loss=z_loss, softcap=cap, weight=weight)
    _check(ours, ref, dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softcap_value_is_accurate(capability, dtype, path):
    """With one class the absolute lse is the capped logit itself: c tanh(x / c) within a few
    rounding errors of the dtype, on both sides of the kernel's tanh branch point and far out."""
    cap = 3.0
    x = torch.cat([torch.linspace(-40.0, 40.0, 4001, dtype=torch.float64),
                   torch.linspace(-1e-3, 1e-3, 101, dtype=torch.float64)]).to(dtype)  # fmt: skip
    x = x.reshape(1, -1, 1)
    target = torch.zeros(x.shape[1], dtype=torch.long)
    params = row_params(1, 0.0, "all", 0.0, cap)
    _, _, (lse, _) = _ours(x, target, params, torch.ones(x.shape[1], dtype=_acc(dtype)), path=path)
    expected = _capped(x.reshape(-1).double(), cap)
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(lse.double(), expected, rtol=4 * ulp, atol=1e-30)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_softcap_large_and_infinite_logits(capability, dtype, path):
    """Logits far beyond the cap and +-inf: capped to +-c, finite loss, zero gradient at +-inf."""
    B, S, C, cap = 2, 2, 2100, 5.0  # two blocks and a tail
    x = _logits((B, S, C), dtype, scale=1000.0, seed=4)
    x[0, 0, 3] = float("inf")
    x[0, 1, 0] = float("-inf")
    x[1, 0, C - 1] = float("inf")
    x[1, 1, 7] = float("-inf")
    target = torch.tensor([3, 0, C - 1, 5])
    upstream = _upstream(B * S, dtype)
    params = row_params(C, 0.1, "all", 1e-3, cap)
    ours = _ours(x, target, params, upstream, path=path)
    ref = _reference(x, target, 0.1, "all", upstream, z_loss=1e-3, softcap=cap)
    assert torch.isfinite(ours[0]).all()
    _check(ours, ref, dtype, exact_argmax=False)
    grad = ours[1]
    assert grad[0, 0, 3] == 0 and grad[0, 1, 0] == 0 and grad[1, 0, C - 1] == 0


@pytest.mark.parametrize("path", PATHS)
def test_softcap_masked_first_logit(capability, path):
    """A -inf first logit is capped to -c; with a cap above 32 the reference becomes the row max."""
    B, S, C = 1, 4, 300
    target = _targets(B * S, C, ignore_every=5)
    upstream = _upstream(B * S, torch.float32)
    for cap in (5.0, 60.0):
        x = _logits((B, S, C), torch.float32, scale=cap / 2)  # far from saturation: exact argmax
        x[0, :, 0] = torch.tensor([float("-inf"), torch.finfo(torch.float32).min, -1e30, 50.0])
        params = row_params(C, 0.1, "all", 1e-4, cap)
        ours = _ours(x, target, params, upstream, path=path)
        ref = _reference(x, target, 0.1, "all", upstream, z_loss=1e-4, softcap=cap)
        _check(ours, ref, torch.float32)


# ------------------------------------------------------------------------------------------------
# Mixed targets
# ------------------------------------------------------------------------------------------------


def _mix(rows, num_classes, dtype, lam_kind, target, seed=5):
    """(ours, reference mix_lambda, y2): y2 random, equal to the target on some rows, and garbage
    y2 and lam on ignored rows (the kernels must not read them)."""
    y2 = torch.randint(0, num_classes, (rows,), generator=_gen(seed))
    y2[1::4] = target[1::4]
    acc = _acc(dtype)
    if lam_kind == "scalar":
        ref_lam = 0.375  # (exact in float32, as dense_loss builds a scalar lam)
        lam = torch.full((1,), ref_lam, dtype=acc).expand(rows)  # stride 0
    else:
        value = {"zero": 0.0, "one": 1.0}.get(lam_kind)
        lam = (
            torch.rand(rows, generator=_gen(seed + 1), dtype=torch.float64).to(acc)
            if value is None
            else torch.full((rows,), value, dtype=acc)
        )
        ref_lam = lam.double().clone()
    ignored = target == IGNORE
    y2_ours = torch.where(ignored, torch.full_like(y2, 10**9), y2)
    if lam_kind != "scalar":
        lam = torch.where(ignored, torch.full_like(lam, float("nan")), lam)
    return (y2_ours, lam), ref_lam, y2


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cap", [0.0, 10.0])
@pytest.mark.parametrize("lam_kind", ["row", "scalar", "zero", "one"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mix(capability, dtype, lam_kind, cap, path):
    B, S, C = 2, 4, 300
    x = _logits((B, S, C), dtype, scale=6.0, seed=11)
    target = _targets(B * S, C)
    weight = _weights(C, dtype)
    upstream = _upstream(B * S, dtype)
    mix, ref_lam, y2 = _mix(B * S, C, dtype, lam_kind, target)
    params = row_params(C, 0.1, "others", 1e-3, cap)
    ours = _ours(x, target, params, upstream, weight=weight, mix=mix, path=path)
    ref = _reference(
        x, target, 0.1, "others", upstream, z_loss=1e-3, softcap=cap, weight=weight,
        mix_target=y2, mix_lambda=ref_lam,
    )  # fmt: skip
    _check(ours, ref, dtype)


@pytest.mark.parametrize("path", PATHS)
def test_mix_lambda_one_same_target_equals_unmixed(capability, path):
    B, S, C = 2, 3, 500
    x = _logits((B, S, C), torch.float32, seed=12)
    target = _targets(B * S, C)
    upstream = _upstream(B * S, torch.float32)
    params = row_params(C, 0.1, "all", 1e-3, 0.0)
    mix = (target.clone(), torch.ones(B * S))
    mixed = _ours(x, target, params, upstream, mix=mix, path=path)
    plain = _ours(x, target, params, upstream, path=path)
    for ours, expected in zip(mixed[:2], plain[:2], strict=True):
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-7)


def test_mix_out_of_range_second_target_gives_nan(capability):
    B, S, C = 1, 3, 50
    x = _logits((B, S, C), torch.float32)
    target = torch.tensor([1, 2, 3])
    y2 = torch.tensor([4, C, -1])  # rows 1 and 2 invalid
    loss, grad, _ = _ours(x, target, row_params(C, 0.1, "all"), torch.ones(3),
                          mix=(y2, torch.full((3,), 0.5)), stats=False)  # fmt: skip
    assert torch.isfinite(loss[0]) and torch.isfinite(grad[0, 0]).all()
    assert loss[1:].isnan().all() and grad[0, 1:].isnan().all()


# ------------------------------------------------------------------------------------------------
# Statistics, extreme rows, layouts
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_offset_without_softcap(capability, dtype, path):
    """Logits sharing an offset of 1e4: the mixed loss, the gradient and the absolute lse."""
    B, S, C = 2, 3, 1000
    x = _logits((B, S, C), dtype, scale=2.0, seed=13, offset=1e4)
    target = _targets(B * S, C)
    upstream = _upstream(B * S, dtype)
    mix, ref_lam, y2 = _mix(B * S, C, dtype, "row", target)
    params = row_params(C, 0.1, "all", 1e-4)
    ours = _ours(x, target, params, upstream, mix=mix, path=path)
    ref = _reference(x, target, 0.1, "all", upstream, z_loss=1e-4, mix_target=y2,
                     mix_lambda=ref_lam)  # fmt: skip
    _check(ours, ref, dtype)


@pytest.mark.parametrize("path", PATHS)
def test_masked_first_logit_without_softcap(capability, path):
    """First logit at finfo.min (the reference r becomes the row max), with mixed targets."""
    B, S, C = 1, 4, 300
    x = _logits((B, S, C), torch.float32, seed=14)
    x[0, :2, 0] = torch.finfo(torch.float32).min
    target = _targets(B * S, C, ignore_every=5)
    upstream = _upstream(B * S, torch.float32)
    mix, ref_lam, y2 = _mix(B * S, C, torch.float32, "row", target)
    params = row_params(C, 0.0, "all", 1e-4)
    ours = _ours(x, target, params, upstream, mix=mix, path=path)
    ref = _reference(x, target, 0.0, "all", upstream, z_loss=1e-4, mix_target=y2,
                     mix_lambda=ref_lam)  # fmt: skip
    _check(ours, ref, torch.float32)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cap", [0.0, 10.0])
def test_stats_of_nan_infinite_and_masked_rows(capability, cap, path):
    """torch.argmax's rule (the first NaN, else the first maximum) and torch.logsumexp's value on
    rows with NaN, +inf and only -inf; NaN rows give NaN loss and gradient."""
    B, S, C = 1, 6, 100
    x = _logits((B, S, C), torch.float32, seed=15)
    x[0, 0, 40] = float("nan")
    x[0, 1, [70, 9]] = float("nan")
    x[0, 2, [60, 30]] = float("inf")
    x[0, 3, :] = float("-inf")
    x[0, 4, 99] = float("nan")
    x[0, 4, 5] = float("inf")
    target = torch.tensor([1, 2, 3, 4, 5, 6])
    _, _, (lse, argmax) = _ours(x, target, row_params(C, 0.1, "all", 0.0, cap),
                                torch.ones(6), path=path)  # fmt: skip
    z = _capped(x[0].double(), cap)
    torch.testing.assert_close(argmax, z.argmax(dim=-1), rtol=0, atol=0)
    torch.testing.assert_close(lse.double(), torch.logsumexp(z, dim=-1), rtol=2e-6, atol=2e-6,
                               equal_nan=True)  # fmt: skip
    loss, grad, _ = _ours(x, target, row_params(C, 0.1, "all", 0.0, cap), torch.ones(6), path=path)
    nan_rows = [0, 1, 4]
    assert loss[nan_rows].isnan().all() and grad[0, nan_rows].isnan().all()
    assert torch.isfinite(loss[5]) and torch.isfinite(grad[0, 5]).all()


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_argmax_ties_take_the_lowest_index(capability, dtype, path, layout):
    C = 2100  # positions in the first chunk, later lanes and chunks, the second block and the tail
    positions = [[0, 17], [5, 300, 37], [2090, 2099], [1, 33, 2070], [2049, 2050], [99, 4]]
    rows = len(positions)
    x = _logits((1, rows, C), torch.float64, seed=16).clamp(-8, 8).to(dtype)
    for row, where in enumerate(positions):
        x[0, row, where] = 10.0
    if layout == "strided":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    target = torch.arange(rows) * 3
    for cap in (0.0, 10.0):
        _, _, (_, argmax) = _ours(x, target, row_params(C, 0.1, "all", 0.0, cap),
                                  torch.ones(rows), path=path)  # fmt: skip
        assert argmax.tolist() == [min(where) for where in positions]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_class(capability, dtype, path):
    B, S, C = 2, 3, 1
    x = _logits((B, S, C), dtype)
    target = torch.tensor([0, IGNORE, 0, 0, IGNORE, 0])
    upstream = _upstream(B * S, dtype)
    mix = (torch.zeros(B * S, dtype=torch.long), torch.full((B * S,), 0.4, dtype=_acc(dtype)))
    params = row_params(C, 0.1, "all", 1e-3, 4.0)
    ours = _ours(x, target, params, upstream, mix=mix, path=path)
    ref = _reference(x, target, 0.1, "all", upstream, z_loss=1e-3, softcap=4.0,
                     mix_target=mix[0], mix_lambda=mix[1].double())  # fmt: skip
    _check(ours, ref, dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_class_dimension(capability, dtype, path):
    """A (B, C, S) tensor viewed as (B, S, C) (class stride S), every option on."""
    B, S, C = 2, 3, 300
    x = _logits((B, C, S), dtype, scale=8.0, seed=17).permute(0, 2, 1)
    target = _targets(B * S, C)
    weight = _weights(C, dtype)
    upstream = _upstream(B * S, dtype)
    mix, ref_lam, y2 = _mix(B * S, C, dtype, "row", target)
    params = row_params(C, 0.1, "all", 1e-3, 10.0)
    grad = torch.empty(B, C, S, dtype=dtype).permute(0, 2, 1)  # a strided gradient too
    ours = _ours(x, target, params, upstream, weight=weight, mix=mix, path=path, grad_out=grad)
    ref = _reference(x, target, 0.1, "all", upstream, z_loss=1e-3, softcap=10.0, weight=weight,
                     mix_target=y2, mix_lambda=ref_lam)  # fmt: skip
    _check(ours, ref, dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place_gradient(capability, dtype, path):
    """grad_logits is logits: the targets' logits and r are read before the row is overwritten."""
    B, S, C = 2, 3, 300
    x = _logits((B, S, C), dtype, scale=8.0, seed=18)
    target = _targets(B * S, C)
    upstream = _upstream(B * S, dtype)
    mix, ref_lam, y2 = _mix(B * S, C, dtype, "row", target)
    params = row_params(C, 0.1, "all", 1e-3, 10.0)
    ref = _reference(x, target, 0.1, "all", upstream, z_loss=1e-3, softcap=10.0, mix_target=y2,
                     mix_lambda=ref_lam)  # fmt: skip
    buffer = x.clone()
    if path == "plain":
        loss, lse = cpp_backend.forward(buffer, target, None, None, params, mix=mix)
        cpp_backend.backward(upstream, buffer, target, None, None, lse, params, buffer, mix=mix)
        loss_tol, grad_tol = tolerances(dtype)
        assert_close(loss, ref[0], loss_tol, "loss")
        assert_close(buffer, ref[1], grad_tol, "grad")
    else:  # the forward writes the gradient over its own input; no redo is possible after that
        guess = torch.tensor([GUESS], dtype=_acc(dtype))
        loss, _ = cpp_backend.forward(buffer, target, None, None, params, buffer, guess, mix=mix)
        ref = _reference(x, target, 0.1, "all", torch.full_like(upstream, GUESS), z_loss=1e-3,
                         softcap=10.0, mix_target=y2, mix_lambda=ref_lam)  # fmt: skip
        loss_tol, grad_tol = tolerances(dtype)
        assert_close(loss, ref[0], loss_tol, "loss")
        assert_close(buffer, ref[1], grad_tol, "grad")


# ------------------------------------------------------------------------------------------------
# Options off, statistics leave the rest alone, errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_options_off_match_reference_and_stats_change_nothing(capability, dtype, path):
    """Without options: the reference; with statistics: the same loss, lse and gradient bits."""
    B, S, C = 2, 3, 2100
    x = _logits((B, S, C), dtype, seed=19)
    target = _targets(B * S, C)
    weight = _weights(C, dtype)
    upstream = _upstream(B * S, dtype)
    for cap in (0.0, 10.0):
        params = row_params(C, 0.1, "all", 1e-3, cap)
        off = _ours(x, target, params, upstream, weight=weight, stats=False, path=path)
        with_stats = _ours(x, target, params, upstream, weight=weight, stats=True, path=path)
        for a, b in zip(off[:2], with_stats[:2], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        ref = _reference(x, target, 0.1, "all", upstream, z_loss=1e-3, softcap=cap, weight=weight)
        _check(with_stats, ref, dtype)


def test_cuda_tensors_decline_each_option():
    logits = types.SimpleNamespace(device=torch.device("cuda"))  # only its device is looked at
    target = torch.zeros(1, dtype=torch.long)
    cases = {
        "softcap": dict(params=row_params(5, 0.1, "all", 0.0, 3.0)),
        "mix": dict(mix=(target, torch.ones(1))),
        "stats": dict(stats=(torch.empty(1), target)),
    }
    for name, kwargs in cases.items():
        params = kwargs.pop("params", row_params(5, 0.1, "all"))
        with pytest.raises(NotImplementedError, match=f"{name} is not supported by the CUDA C"):
            cpp_backend.forward(logits, target, None, None, params, **kwargs)
        if name != "stats":
            with pytest.raises(NotImplementedError, match=f"{name} is not supported"):
                cpp_backend.backward(target, logits, target, None, None, target, params, logits,
                                     **kwargs)  # fmt: skip


def test_argument_errors_name_the_argument():
    x = _logits((1, 3, 10), torch.float32)
    target = torch.tensor([1, 2, 3])
    params = row_params(10, 0.1, "all")
    bad = {
        "softcap": dict(params=row_params(10, 0.1, "all", 0.0, -1.0)),
        "mix_target": dict(mix=(target.int(), torch.ones(3))),
        "mix_lambda": dict(mix=(target, torch.ones(2))),
        "stats_lse": dict(stats=(torch.empty(3, dtype=torch.float64), target.clone())),
        "stats_argmax": dict(stats=(torch.empty(3), torch.empty(3, dtype=torch.int32))),
    }
    for name, kwargs in bad.items():
        call_params = kwargs.pop("params", params)
        with pytest.raises((ValueError, RuntimeError), match=name):
            cpp_backend.forward(x, target, None, None, call_params, **kwargs)


def test_meta_tensors_accept_the_options():
    x = torch.empty(2, 3, 7, device="meta")
    target = torch.empty(6, dtype=torch.long, device="meta")
    mix = (torch.empty(6, dtype=torch.long, device="meta"), torch.empty(6, device="meta"))
    stats = (torch.empty(6, device="meta"), torch.empty(6, dtype=torch.long, device="meta"))
    params = row_params(7, 0.1, "all", 0.0, 2.0)
    loss, lse = cpp_backend.forward(x, target, None, None, params, mix=mix, stats=stats)
    assert loss.shape == (6,) and loss.device.type == "meta"
    cpp_backend.backward(loss, x, target, None, None, lse, params, torch.empty_like(x), mix=mix)
