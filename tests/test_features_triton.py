"""Issue 22's backend features in the Triton kernels: soft-capped logits (``params.softcap``), mixed
targets (``mix=``) and statistics (``stats=`` / ``argmax_out=``), local and class-sharded.

Every case calls the backend functions directly on a ``(B, S, C)`` row view (in the interpreter,
small shapes) and compares with the float64 references of ``tests/reference.py``: per-row losses
and ``lse`` (``dense_loss(reduction="none")``, ``dense_stats``), the gradient of
``sum(upstream * loss)`` for a random upstream (autograd of ``dense_loss``), and the argmax of the
(capped) logits in float64 (``torch.argmax``). The sharded kernels' statistics are combined here,
in float64, as the distributed layer does.
"""

from __future__ import annotations

import pytest
import torch
from reference import IGNORE, assert_close, dense_loss, dense_stats, row_params, tolerances

import lsr_fused
from lsr_fused._params import accumulation_dtype

triton_backend = pytest.importorskip("lsr_fused.backends.triton_backend")
from lsr_fused.backends import triton_sharded  # noqa: E402

pytestmark = pytest.mark.skipif(
    "triton" not in lsr_fused.available_backends("cpu"),
    reason="needs triton (CUDA or TRITON_INTERPRET=1)",
)
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
EPS = 0.1


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _case(rows: int, num_classes: int, dtype, seed: int, scale: float = 3.0):
    """Logits ``(rows, C)`` (randn * scale) and targets with every third row ignored."""
    generator = _generator(seed)
    logits = (torch.randn(rows, num_classes, generator=generator, dtype=torch.float64) * scale).to(
        dtype
    )
    target = torch.randint(0, num_classes, (rows,), generator=generator)
    target[::3] = IGNORE
    return logits, target


def _weights(num_classes: int, dtype, seed: int):
    weight = torch.rand(num_classes, generator=_generator(seed), dtype=torch.float64) + 0.5
    weight = weight.to(accumulation_dtype(dtype))
    return weight, weight.sum().reshape(1)


def _mix(target: torch.Tensor, num_classes: int, lam_kind, acc_dtype, seed: int):
    """``(mix_target, mix_lambda)``: a second target per row (garbage on ignored rows) and lam as
    a broadcast scalar (stride 0), per row, or a constant 0 / 1."""
    generator = _generator(seed)
    rows = target.shape[0]
    mix_target = torch.randint(0, num_classes, (rows,), generator=generator)
    ignored = target == IGNORE
    mix_target[ignored] = torch.tensor([10**9, -7, 2**40]).repeat(rows)[: int(ignored.sum())]
    if lam_kind == "per-row":
        lam = torch.rand(rows, generator=generator, dtype=torch.float64).to(acc_dtype)
    elif lam_kind == "scalar":
        lam = torch.rand((), generator=generator, dtype=torch.float64).to(acc_dtype).expand(rows)
    else:
        lam = torch.full((rows,), float(lam_kind), dtype=acc_dtype)
    return mix_target, lam


def _reference(logits, target, upstream, *, weight=None, spread="all", z_loss=0.0, softcap=0.0,
               mix=None):  # fmt: skip
    """float64 per-row loss, gradient of ``sum(upstream * loss)``, lse and argmax (``logits``
    with classes along dim 1, rows in the backends' order)."""
    options = dict(weight=weight, spread=spread, z_loss=z_loss, softcap=softcap or None)
    if mix is not None:
        options.update(mix_target=mix[0], mix_lambda=mix[1].double())
    x = logits.detach().double().requires_grad_()
    loss = dense_loss(x, target, EPS, reduction="none", **options).reshape(-1)
    (grad,) = torch.autograd.grad(loss, x, upstream.double().reshape(loss.shape))
    lse, _, _ = dense_stats(logits, target, softcap=softcap or None)
    rows = x.detach().movedim(1, -1).reshape(-1, x.shape[1])
    capped = softcap * torch.tanh(rows / softcap) if softcap else rows
    grad_rows = grad.movedim(1, -1).reshape(rows.shape)
    return loss.detach(), grad_rows, lse.reshape(-1), capped.argmax(-1)


def _run(rows_view, target, params, *, weight=None, mix=None, upstream, grad_out=None):
    """Our forward (with stats) and backward on a row view: ``(loss, lse_out, argmax, grad)``."""
    acc_dtype = accumulation_dtype(rows_view.dtype)
    num_rows = target.numel()
    weight_total = None if weight is None else weight.sum().reshape(1)
    lse_out = torch.full((num_rows,), 7.0, dtype=acc_dtype)
    argmax_out = torch.full((num_rows,), -3, dtype=torch.long)
    loss, saved = triton_backend.forward(
        rows_view, target, weight, weight_total, params, mix=mix, stats=(lse_out, argmax_out)
    )
    grad = torch.empty_like(rows_view) if grad_out is None else grad_out
    triton_backend.backward(
        upstream.to(acc_dtype), rows_view, target, weight, weight_total, saved, params, grad,
        mix=mix,
    )  # fmt: skip
    return loss, lse_out, argmax_out, grad


def _check(ours, ref, dtype, what=""):
    loss_tol, grad_tol = tolerances(dtype)
    loss, lse_out, argmax_out, grad = ours
    ref_loss, ref_grad, ref_lse, ref_argmax = ref
    assert_close(loss, ref_loss, loss_tol, f"loss {what}")
    assert_close(lse_out, ref_lse, loss_tol, f"lse {what}")
    assert torch.equal(argmax_out, ref_argmax), (what, argmax_out, ref_argmax)
    assert_close(grad.reshape(ref_grad.shape), ref_grad, grad_tol, f"grad {what}")


# ------------------------------------------------------------------------------------------------
# The local kernels
# ------------------------------------------------------------------------------------------------

OPTION_SETS = [
    dict(spread="all", weighted=False, z_loss=0.0),
    dict(spread="others", weighted=True, z_loss=1e-3),
    dict(spread="all", weighted=True, z_loss=0.0),
]


@pytest.mark.parametrize("options", OPTION_SETS, ids=["plain", "others-weight-z", "weight"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_softcap_matches_the_reference(dtype, options):
    num_classes = 77
    logits, target = _case(6, num_classes, dtype, seed=1, scale=12.0)
    weight = _weights(num_classes, dtype, 2)[0] if options["weighted"] else None
    softcap = 15.0
    params = row_params(num_classes, EPS, options["spread"], options["z_loss"], softcap)
    upstream = torch.rand(6, generator=_generator(3), dtype=torch.float64) + 0.5
    ours = _run(logits.unsqueeze(1), target, params, weight=weight, upstream=upstream)
    ref = _reference(logits, target, upstream, weight=weight, spread=options["spread"],
                     z_loss=options["z_loss"], softcap=softcap)  # fmt: skip
    _check(ours, ref, dtype)


@pytest.mark.parametrize("lam_kind", ["scalar", "per-row", 0.0, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_targets_match_the_reference(dtype, lam_kind):
    num_classes = 45
    logits, target = _case(7, num_classes, dtype, seed=4)
    acc_dtype = accumulation_dtype(dtype)
    mix = _mix(target, num_classes, lam_kind, acc_dtype, seed=5)
    mix[0][1] = target[1]  # y2 == y1 on one row
    weight = _weights(num_classes, dtype, 6)[0]
    params = row_params(num_classes, EPS, "others", 1e-4)
    upstream = torch.rand(7, generator=_generator(7), dtype=torch.float64)
    ours = _run(logits.unsqueeze(1), target, params, weight=weight, mix=mix, upstream=upstream)
    ref = _reference(logits, target, upstream, weight=weight, spread="others", z_loss=1e-4, mix=mix)
    _check(ours, ref, dtype)


def test_mixed_with_lam_one_and_y2_equal_y1_is_the_unmixed_loss():
    logits, target = _case(5, 64, torch.float32, seed=8)
    params = row_params(64, EPS, "all", 1e-3, 9.0)
    unmixed = triton_backend.forward(logits.unsqueeze(1), target, None, None, params)
    same = (target.clone(), torch.ones(5))
    mixed = triton_backend.forward(logits.unsqueeze(1), target, None, None, params, mix=same)
    torch.testing.assert_close(mixed[0], unmixed[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mixed[1], unmixed[1], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_feature_on_3d_views_in_place_and_from_the_forward(dtype):
    """Softcap, mix and stats together on a (B, S, C) tensor and on a (B, C, S) one read through
    its (B, S, C) view (class stride S); the gradient written over the logits (in place); and the
    training step's path: forward writes the gradient for upstream = guess, backward with
    grad_guess rewrites only the rows whose upstream differs."""
    batch, inner, num_classes = 2, 3, 40
    acc_dtype = accumulation_dtype(dtype)
    generator = _generator(9)
    sequence = (torch.randn(batch, inner, num_classes, generator=generator) * 8).to(dtype)
    channels = (torch.randn(batch, num_classes, inner, generator=generator) * 8).to(dtype)
    target = torch.randint(0, num_classes, (batch, inner), generator=generator)
    target[0, 1] = IGNORE
    mix = _mix(target.reshape(-1), num_classes, "per-row", acc_dtype, seed=10)
    weight = _weights(num_classes, dtype, 11)[0]
    params = row_params(num_classes, EPS, "all", 1e-3, 6.0)
    upstream = torch.rand(batch * inner, generator=generator, dtype=torch.float64)
    guess = torch.tensor([0.75], dtype=acc_dtype)
    partly_guessed = upstream.clone()
    partly_guessed[::2] = 0.75
    # (the reference takes the classes along dim 1)
    for name, logits, rows_view in (
        ("(B, S, C)", sequence.transpose(1, 2), sequence),
        ("(B, C, S)", channels, channels.transpose(1, 2)),
    ):
        options = dict(weight=weight, z_loss=1e-3, softcap=6.0, mix=mix)
        ref = _reference(logits, target, upstream, **options)
        flat_target = target.reshape(-1)
        ours = _run(rows_view, flat_target, params, weight=weight, mix=mix, upstream=upstream)
        _check(ours, ref, dtype, name)
        # in place: the gradient overwrites the logits it is computed from
        overwritten = rows_view.clone()
        in_place = _run(overwritten, flat_target, params, weight=weight, mix=mix,
                        upstream=upstream, grad_out=overwritten)  # fmt: skip
        _check(in_place, ref, dtype, f"{name} in place")
        guessed_ref = _reference(logits, target, partly_guessed, **options)
        _check_forward_gradient(rows_view, flat_target, params, weight, mix,
                                (guess, partly_guessed), guessed_ref)  # fmt: skip


def _check_forward_gradient(rows_view, target, params, weight, mix, upstreams, ref):
    """forward(grad_logits=, grad_guess=) then backward(grad_guess=) with an upstream equal to
    the guess on some rows only (those keep the forward's gradient)."""
    dtype = rows_view.dtype
    acc_dtype = accumulation_dtype(dtype)
    weight_total = weight.sum().reshape(1)
    guess, upstream = upstreams
    grad = torch.full_like(rows_view, 5.0)
    stats = (torch.empty(target.numel(), dtype=acc_dtype), torch.empty_like(target))
    loss, saved = triton_backend.forward(
        rows_view, target, weight, weight_total, params, grad, guess, mix=mix, stats=stats
    )
    triton_backend.backward(upstream.to(acc_dtype), rows_view, target, weight, weight_total,
                            saved, params, grad, guess, mix=mix)  # fmt: skip
    loss_tol, grad_tol = tolerances(dtype)
    assert_close(loss, ref[0], loss_tol, "forward-with-grad loss")
    assert_close(stats[0], ref[2], loss_tol, "forward-with-grad lse")
    assert torch.equal(stats[1], ref[3])
    assert_close(grad.reshape(ref[1].shape), ref[1], grad_tol, "forward-with-grad gradient")


@pytest.mark.parametrize("dtype", DTYPES)
def test_softcap_with_huge_and_infinite_logits(dtype):
    """±1e4 and ±inf are capped to about ±c: finite losses, zero gradient at the infinities,
    the argmax the first of the tied capped maxima."""
    num_classes = 33
    finfo_max = torch.finfo(dtype).max
    logits, target = _case(6, num_classes, dtype, seed=12)
    logits[0, 3], logits[0, 9] = float("inf"), 1e4  # tied at +c; the first wins
    logits[1, 0] = float("-inf")  # a masked first class
    logits[2, 0] = -finfo_max  # masked with a large finite value
    logits[3, :] = float("-inf")
    logits[3, 5] = float("inf")
    logits[4, 7], logits[4, 2] = -1e4, 1e4
    target[:5] = torch.tensor([3, 1, 4, 5, 2])
    params = row_params(num_classes, EPS, "all", 1e-3, 20.0)
    upstream = torch.rand(6, generator=_generator(13), dtype=torch.float64) + 0.5
    ours = _run(logits.unsqueeze(1), target, params, upstream=upstream)
    ref = _reference(logits, target, upstream, z_loss=1e-3, softcap=20.0)
    assert torch.isfinite(ours[0]).all() and torch.isfinite(ours[3]).all()
    _check(ours, ref, dtype)
    assert ours[2][0] == 3 and ours[2][3] == 5
    assert (ours[3][torch.isinf(logits).unsqueeze(1)] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_capped_logit_is_exact_to_a_few_ulp(dtype):
    """``c tanh(x / c)`` itself, read back as the sharded statistics' reference (row 5 is the
    row's capped first logit): within 4 ulp of float64's ``torch.tanh`` from |x / c| = 1e-8 (the
    Taylor branch) through the switch at 1/4 to saturation, both signs."""
    softcap = 7.0
    magnitudes = torch.logspace(-8, 2.5, 97, dtype=torch.float64) * softcap
    first = torch.cat([magnitudes, -magnitudes, torch.tensor([0.25 * softcap, 0.0])]).to(dtype)
    logits = torch.stack([first, first], 1).unsqueeze(1)  # x_1 = x_0: the first is the reference
    out = torch.empty(6, first.shape[0], dtype=dtype)
    local_target = torch.full((first.shape[0],), -1)
    triton_sharded.shard_stats(logits, local_target, None, out, softcap=softcap)
    expected = softcap * torch.tanh(first.double() / softcap)
    ulp = torch.finfo(dtype).eps * expected.abs()
    error = (out[5].double() - expected).abs()
    assert (error <= 4 * ulp).all(), (error / ulp.clamp_min(1e-300)).max()


@pytest.mark.parametrize("softcap", [0.0, 10.0])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # log(0) of an all -inf row
def test_statistics_nan_rows_ties_masks_and_offsets(dtype, softcap):
    """lse_out and argmax_out on every row, ignored ones included: NaN rows (the first NaN is
    the argmax, as torch.argmax), exact ties (the lowest index), an all -inf row (-inf, 0),
    masked first classes, a large offset (softcap off)."""
    num_classes = 50
    logits, target = _case(9, num_classes, dtype, seed=14)
    logits[0, 7], logits[0, 3], logits[0, 20] = float("nan"), 50.0, float("nan")
    logits[1, 4], logits[1, 30] = float("nan"), float("inf")
    logits[2, 11], logits[2, 12], logits[2, 40] = 30.0, 30.0, 30.0
    logits[3, :] = float("-inf")
    logits[4, 0] = float("-inf")
    logits[5, 0] = torch.finfo(dtype).min
    logits[6] = logits[6] * 0.0 + 2.0  # all equal: argmax 0
    if softcap == 0.0 and dtype in (torch.float32, torch.float64):
        logits[7] += 1e4
    params = row_params(num_classes, EPS, "all", 0.0, softcap)
    acc_dtype = accumulation_dtype(dtype)
    lse_out = torch.empty(9, dtype=acc_dtype)
    argmax_out = torch.empty(9, dtype=torch.long)
    triton_backend.forward(logits.unsqueeze(1), target, None, None, params,
                           stats=(lse_out, argmax_out))  # fmt: skip
    ref_lse, ref_accuracy, _ = dense_stats(logits, target, softcap=softcap or None)
    x = logits.double()
    ref_argmax = (softcap * torch.tanh(x / softcap) if softcap else x).argmax(-1)
    assert torch.equal(argmax_out, ref_argmax), (argmax_out, ref_argmax)
    assert argmax_out[0] == 7 and argmax_out[1] == 4 and argmax_out[2] == 11
    assert argmax_out[3] == 0 and argmax_out[6] == 0
    assert_close(lse_out, ref_lse, tolerances(dtype)[0])
    kept = target != IGNORE
    accuracy = ((argmax_out == target) & kept).double().sum() / kept.sum()
    torch.testing.assert_close(accuracy, ref_accuracy)


def test_statistics_across_blocks_and_strided_classes():
    """A float64 row of 2500 classes takes three 1024-wide blocks: the running argmax merges
    them (a tie in a later block loses, a NaN in a later block wins, a max in the last block
    wins); the same rows through a strided class dimension."""
    num_classes = 2500
    logits, target = _case(4, num_classes, torch.float64, seed=15)
    logits[0, 100], logits[0, 2100] = 40.0, 40.0
    logits[1, 5], logits[1, 1500], logits[1, 2200] = 40.0, float("nan"), float("nan")
    logits[2, 2499] = 40.0
    params = row_params(num_classes, EPS, "all", 1e-4, 30.0)
    upstream = torch.rand(4, generator=_generator(16), dtype=torch.float64)
    ref = _reference(logits, target, upstream, z_loss=1e-4, softcap=30.0)
    assert ref[3][:3].tolist() == [100, 1500, 2499]
    _check(_run(logits.unsqueeze(1), target, params, upstream=upstream), ref, torch.float64)
    strided = logits.t().contiguous().t()  # (rows, C) with class stride = rows
    _check(_run(strided.unsqueeze(1), target, params, upstream=upstream), ref, torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_class(dtype):
    logits, target = _case(4, 1, dtype, seed=17)
    target[:] = torch.tensor([0, IGNORE, 0, 0])
    mix = (torch.tensor([0, 99, 0, 0]), torch.full((4,), 0.4, dtype=accumulation_dtype(dtype)))
    params = row_params(1, EPS, "all", 1e-3, 4.0)
    upstream = torch.rand(4, generator=_generator(18), dtype=torch.float64)
    ours = _run(logits.unsqueeze(1), target, params, mix=mix, upstream=upstream)
    _check(ours, _reference(logits, target, upstream, z_loss=1e-3, softcap=4.0, mix=mix), dtype)


def test_mix_target_out_of_range_poisons_only_its_row():
    logits, target = _case(4, 20, torch.float32, seed=19)
    target[:] = torch.tensor([1, 2, IGNORE, 4])
    mix = (torch.tensor([3, 20, 10**12, -1]), torch.full((4,), 0.5))
    params = row_params(20, EPS, "all")
    loss, saved = triton_backend.forward(logits.unsqueeze(1), target, None, None, params, mix=mix)
    grad = torch.empty(4, 1, 20)
    triton_backend.backward(torch.ones(4), logits.unsqueeze(1), target, None, None, saved, params,
                            grad, mix=mix)  # fmt: skip
    assert torch.isfinite(loss[0]) and loss[2] == 0
    assert torch.isnan(loss[1]) and torch.isnan(loss[3])
    assert torch.isfinite(grad[0]).all() and (grad[2] == 0).all()
    assert torch.isnan(grad[1]).all() and torch.isnan(grad[3]).all()


def test_bad_feature_arguments_raise():
    logits = torch.randn(3, 1, 8)
    target = torch.zeros(3, dtype=torch.long)
    params = row_params(8, EPS, "all")
    forward = triton_backend.forward
    with pytest.raises(ValueError, match="mix_target"):
        forward(logits, target, None, None, params, mix=(torch.zeros(2, dtype=torch.long),
                                                         torch.ones(3)))  # fmt: skip
    with pytest.raises(ValueError, match="mix_lambda"):
        forward(
            logits, target, None, None, params, mix=(target, torch.ones(3, dtype=torch.float64))
        )
    with pytest.raises(ValueError, match="argmax_out"):
        forward(logits, target, None, None, params, stats=(torch.empty(3), torch.empty(3)))
    with pytest.raises(ValueError, match="lse_out"):
        forward(logits, target, None, None, params, stats=(torch.empty(6)[::2], target.clone()))
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="softcap"):
            forward(logits, target, None, None, params._replace(softcap=bad))
    with pytest.raises(ValueError, match=r"out must be a contiguous \(8, 3\)"):
        triton_sharded.shard_stats(logits, target, None, torch.empty(6, 3), local_mix_target=target)
    with pytest.raises(ValueError, match=r"coefs must be a contiguous \(6, 3\)"):
        triton_sharded.shard_grad(logits, target, None, torch.empty(5, 3), torch.empty_like(logits),
                                  local_mix_target=target)  # fmt: skip


# ------------------------------------------------------------------------------------------------
# The sharded kernels, combined here as the distributed layer combines them
# ------------------------------------------------------------------------------------------------


def _local(target: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    local = target - lo
    return torch.where((local >= 0) & (local < hi - lo), local, -1)


def _shard_pass(logits, target, mix_target, bounds, weight, softcap):
    """Each shard's ``(8, rows)`` statistics (float64), argmax and local targets."""
    shards = []
    for lo, hi in bounds:
        rows = logits[:, lo:hi].unsqueeze(1)
        out = torch.full((8, logits.shape[0]), 3.0, dtype=accumulation_dtype(logits.dtype))
        argmax = torch.full((logits.shape[0],), -5, dtype=torch.long)
        local, local_mix = _local(target, lo, hi), _local(mix_target, lo, hi)
        shard_weight = None if weight is None else weight[lo:hi]
        triton_sharded.shard_stats(rows, local, shard_weight, out, softcap=softcap,
                                   local_mix_target=local_mix, argmax_out=argmax)  # fmt: skip
        width = float(hi - lo) if weight is None else weight[lo:hi].double().sum()
        shards.append(dict(stats=out.double(), argmax=argmax, local=local, local_mix=local_mix,
                           width=width, bounds=(lo, hi), weight=shard_weight))  # fmt: skip
    return shards


def _combine(shards, target, lam, params, total_weight):
    """Per-row loss, lse and the pieces of the gradient coefficients, from the shards' stats:
    every sum moved from its shard's reference r_k to the global max M."""
    maxima = torch.stack([s["stats"][0] for s in shards])
    global_max = maxima.amax(0)
    shift = torch.where(torch.isfinite(global_max), global_max, 0.0)
    sum_exp, weighted, target_logit, target_w, mix_logit, mix_w = (0.0,) * 6
    for s in shards:
        m, s_k, t_k, z1, w1, r_k, z2, w2 = s["stats"]
        sum_exp = sum_exp + s_k * torch.exp(m - shift)
        weighted = weighted + t_k + (r_k - shift) * s["width"]
        target_logit = target_logit + torch.where(s["local"] >= 0, z1 + (r_k - shift), 0.0)
        mix_logit = mix_logit + torch.where(s["local_mix"] >= 0, z2 + (r_k - shift), 0.0)
        target_w, mix_w = target_w + w1, mix_w + w2
    lam = lam.double()
    extra, other = params.target_extra, params.other_mass
    shifted_lse = torch.log(sum_exp)
    lse = shift + shifted_lse
    t1, t2 = extra * lam * target_w, extra * (1.0 - lam) * mix_w
    total_mass = other * total_weight + t1 + t2
    loss = total_mass * shifted_lse - other * weighted - t1 * target_logit - t2 * mix_logit
    loss = loss + params.z_loss * lse * lse
    loss = torch.where(target == IGNORE, 0.0, loss)
    return loss, lse, total_mass, t1, t2


def _global_argmax(shards):
    """The first shard holding the global max (ties: the lower shard), plus its offset."""
    maxima = torch.stack([s["stats"][0] for s in shards])
    first = (maxima == maxima.amax(0)).double().argmax(0)
    local = torch.stack([s["argmax"] + s["bounds"][0] for s in shards])
    return local.gather(0, first[None])[0]


@pytest.mark.parametrize("softcap", [0.0, 8.0])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sharded_features_combine_to_the_reference(dtype, weighted, softcap):
    num_classes = 70
    bounds = [(0, 25), (25, 26), (26, num_classes)]  # a one-class shard among them
    logits, target = _case(7, num_classes, dtype, seed=20, scale=5.0)
    logits[1, 0] = float("-inf")  # a masked first class: r_k falls back to the shard max
    acc_dtype = accumulation_dtype(dtype)
    mix_target, lam = _mix(target, num_classes, "per-row", acc_dtype, seed=21)
    mix_target[2] = target[2]
    weight = _weights(num_classes, dtype, 22)[0] if weighted else None
    z_loss = 1e-3
    params = row_params(num_classes, EPS, "others", z_loss, softcap)
    shards = _shard_pass(logits, target, mix_target, bounds, weight, softcap)
    total_weight = num_classes if weight is None else weight.double().sum()
    loss, lse, total_mass, t1, t2 = _combine(shards, target, lam, params, total_weight)
    upstream = torch.rand(7, generator=_generator(23), dtype=torch.float64)
    ref = _reference(logits, target, upstream, weight=weight, spread="others", z_loss=z_loss,
                     softcap=softcap, mix=(mix_target, lam))  # fmt: skip
    loss_tol, grad_tol = tolerances(dtype, "sharded")
    assert_close(loss, ref[0], loss_tol, "loss")
    assert_close(lse, ref[2], loss_tol, "lse")
    assert torch.equal(_global_argmax(shards), ref[3])
    g = torch.where(target == IGNORE, 0.0, upstream)
    grads = []
    for s in shards:
        lo, hi = s["bounds"]
        r_k = s["stats"][5]
        coefs = torch.stack([lse - r_k, g * (total_mass + 2 * z_loss * lse), g * params.other_mass,
                             g * t1, r_k, g * t2]).to(acc_dtype)  # fmt: skip
        grad = torch.full((7, 1, hi - lo), 9.0, dtype=dtype)
        shard = logits[:, lo:hi].unsqueeze(1)
        triton_sharded.shard_grad(shard, s["local"], s["weight"], coefs, grad, softcap=softcap,
                                  local_mix_target=s["local_mix"])  # fmt: skip
        grads.append(grad[:, 0])
    assert_close(torch.cat(grads, 1), ref[1], grad_tol, "grad")


@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_shard_argmax_nan_ties_and_empty_shard(softcap):
    """The shard-local argmax follows torch.argmax on the shard's own (capped) columns; an empty
    shard reports 0. Without a mixed target the 6-row layout is untouched by the argmax."""
    logits, target = _case(4, 30, torch.float32, seed=24)
    logits[0, 12], logits[0, 20] = float("nan"), float("nan")
    logits[1, 3], logits[1, 17] = 60.0, 60.0
    logits[2, :] = float("-inf")
    rows = logits[:, 10:].unsqueeze(1)
    local = _local(target, 10, 30)
    out, argmax = torch.empty(6, 4), torch.full((4,), -1)
    plain = torch.empty(6, 4)
    triton_sharded.shard_stats(rows, local, None, out, softcap=softcap, argmax_out=argmax)
    triton_sharded.shard_stats(rows, local, None, plain, softcap=softcap)
    x = logits[:, 10:].double()
    expected = (softcap * torch.tanh(x / softcap) if softcap else x).argmax(-1)
    assert torch.equal(argmax, expected) and argmax[0] == 2 and argmax[1] == 7 and argmax[2] == 0
    torch.testing.assert_close(out, plain, equal_nan=True, rtol=0, atol=0)
    empty_out, empty_argmax = torch.empty(6, 4), torch.full((4,), 8)
    triton_sharded.shard_stats(
        torch.empty(4, 1, 0), local, None, empty_out, argmax_out=empty_argmax
    )
    assert (empty_argmax == 0).all() and (empty_out[0] == float("-inf")).all()
