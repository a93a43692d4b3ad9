"""Issue 22's backend features on the pure-torch backend, the composite and the sharded math:
softcap (``params.softcap``), mixed targets (``mix=``) and statistics (``stats=``).

Every comparison is against the float64 dense reference (``reference.dense_loss``): per-row loss
(``reduction="none"``), gradient (autograd with a random upstream), the absolute log-sum-exp and
``torch.argmax`` of the capped float64 logits. Backend-level: the functions are called directly
on a ``(B, S, C)`` row view.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
from gloo_groups import GroupResults
from reference import IGNORE, assert_close, dense_loss, row_params, tolerances

from lsr_fused import composite
from lsr_fused._params import accumulation_dtype
from lsr_fused.backends import torch_backend
from lsr_fused.distributed import shard_math

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


# ------------------------------------------------------------------------------------------------
# Cases and the reference
# ------------------------------------------------------------------------------------------------


def _case(rows, classes, dtype, seed, *, scale=3.0, offset=0.0, weighted=False):
    """Row-view logits ``(rows, 1, C)``, targets with every third row ignored, second targets
    (garbage on ignored rows), per-row lambdas (NaN on ignored rows), weights, upstream."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, 1, classes, generator=gen, dtype=torch.float64) * scale + offset
    target = torch.randint(0, classes, (rows,), generator=gen)
    mix_target = torch.randint(0, classes, (rows,), generator=gen)
    lam = torch.rand(rows, generator=gen, dtype=torch.float64)
    ignored = torch.arange(rows) % 3 == 1
    target[ignored] = IGNORE
    mix_target[ignored] = torch.tensor([10**9, -5, classes])[torch.arange(int(ignored.sum())) % 3]
    lam[ignored] = float("nan")
    acc = accumulation_dtype(dtype)
    weight = (torch.rand(classes, generator=gen, dtype=torch.float64) + 0.25).to(acc)
    upstream = torch.randn(rows, generator=gen, dtype=torch.float64).to(acc)
    return logits.to(dtype), target, mix_target, lam.to(acc), weight if weighted else None, upstream


def _lam_tensor(kind, lam, rows, acc):
    """The lambda argument of each kind: per-row, a stride-0 broadcast scalar, 0 or 1."""
    if kind == "per_row":
        return lam
    value = {"scalar": 0.37, "zero": 0.0, "one": 1.0}[kind]
    return torch.tensor([value], dtype=acc).expand(rows)


def _ref(logits, target, eps, spread, *, weight=None, z_loss=0.0, softcap=0.0, mix=None,
         upstream=None):  # fmt: skip
    """Float64 reference ``(loss per row, gradient, absolute lse, argmax)`` of row-view logits."""
    rows = logits.detach().reshape(-1, logits.shape[-1]).double().requires_grad_()
    options = dict(reduction="none", weight=weight, spread=spread, z_loss=z_loss)
    if softcap:
        options["softcap"] = softcap
    if mix is not None:
        # Ignored rows: the reference must not see their garbage lambda.
        lam = torch.where(target == IGNORE, 1.0, mix[1].double())
        options.update(mix_target=mix[0], mix_lambda=lam)
    loss = dense_loss(rows, target, eps, **options)
    (grad,) = torch.autograd.grad(loss, rows, upstream.double())
    capped = rows.detach()
    if softcap:
        capped = softcap * torch.tanh(capped / softcap)
    lse = torch.logsumexp(capped, dim=-1)
    argmax = capped.argmax(dim=-1) if capped.shape[-1] else torch.zeros_like(target)
    return loss.detach(), grad.view(logits.shape), lse, argmax


def _ours(logits, target, weight, params, upstream, *, mix=None, in_place=False):
    """The torch backend's ``(loss, gradient, lse_out, argmax_out)``."""
    acc = accumulation_dtype(logits.dtype)
    rows = target.numel()
    lse_out = torch.full((rows,), float("nan"), dtype=acc)
    argmax_out = torch.full((rows,), -7, dtype=torch.int64)
    total = None if weight is None else weight.sum().reshape(1)
    logits = logits.clone()
    loss, saved = torch_backend.forward(
        logits, target, weight, total, params, mix=mix, stats=(lse_out, argmax_out)
    )
    grad = logits if in_place else torch.full_like(logits, float("nan"))
    torch_backend.backward(upstream, logits, target, weight, total, saved, params, grad, mix=mix)
    return loss, grad, lse_out, argmax_out


def _check(ours, ref, dtype, what=""):
    loss_tol, grad_tol = tolerances(dtype)
    loss, grad, lse, argmax = ours
    ref_loss, ref_grad, ref_lse, ref_argmax = ref
    assert loss.dtype == accumulation_dtype(dtype) and grad.dtype == dtype
    assert_close(loss, ref_loss, loss_tol, f"loss {what}")
    assert_close(grad, ref_grad, grad_tol, f"gradient {what}")
    assert_close(lse, ref_lse, loss_tol, f"lse {what}")
    assert torch.equal(argmax, ref_argmax), (what, argmax, ref_argmax)


# ------------------------------------------------------------------------------------------------
# torch_backend.forward / backward
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spread", ["all", "others"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_softcap_matches_reference(dtype, spread, weighted, z_loss):
    # Logits up to ~20 against a cap of 4: most of them well into tanh's saturation.
    logits, target, _, _, weight, upstream = _case(12, 29, dtype, 1, scale=8.0, weighted=weighted)
    params = row_params(29, 0.2, spread, z_loss, softcap=4.0)
    ref = _ref(logits, target, 0.2, spread, weight=weight, z_loss=z_loss, softcap=4.0,
               upstream=upstream)  # fmt: skip
    _check(_ours(logits, target, weight, params, upstream), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lam_kind", ["per_row", "scalar", "zero", "one"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("softcap", [0.0, 6.0])
def test_mix_matches_reference(dtype, lam_kind, weighted, softcap):
    logits, target, mix_target, lam, weight, upstream = _case(15, 23, dtype, 2, weighted=weighted)
    lam = _lam_tensor(lam_kind, lam, 15, accumulation_dtype(dtype))
    params = row_params(23, 0.1, "others", 1e-3, softcap=softcap)
    mix = (mix_target, lam)
    ref = _ref(logits, target, 0.1, "others", weight=weight, z_loss=1e-3, softcap=softcap,
               mix=mix, upstream=upstream)  # fmt: skip
    _check(_ours(logits, target, weight, params, upstream, mix=mix), ref, dtype, lam_kind)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("how", ["same_target", "lambda_one"])
def test_mix_that_changes_nothing_equals_the_unmixed_loss(dtype, how):
    logits, target, mix_target, lam, weight, upstream = _case(9, 17, dtype, 3, weighted=True)
    if how == "same_target":
        mix = (target.clone(), lam)
    else:
        mix = (mix_target, torch.ones(9, dtype=lam.dtype))
    params = row_params(17, 0.1, "all", 1e-3, softcap=5.0)
    mixed = _ours(logits, target, weight, params, upstream, mix=mix)
    plain = _ours(logits, target, weight, params, upstream)
    unit = torch.finfo(dtype).eps
    for ours, base in zip(mixed, plain, strict=True):
        torch.testing.assert_close(ours, base, rtol=8 * unit, atol=8 * unit)


def test_mix_target_out_of_range_gives_nan_rows_only():
    logits, target, mix_target, lam, _, upstream = _case(6, 7, torch.float32, 4)
    mix_target[0], mix_target[2] = 7, -1  # kept rows (rows 1 and 4 are ignored)
    params = row_params(7, 0.1, "all")
    loss, grad, _, _ = _ours(logits, target, None, params, upstream, mix=(mix_target, lam))
    bad = torch.tensor([True, False, True, False, False, False])
    assert loss[bad].isnan().all() and grad[bad].isnan().all()
    assert torch.isfinite(loss[~bad]).all() and torch.isfinite(grad[~bad]).all()
    assert (loss[1] == 0) and (loss[4] == 0) and (grad[[1, 4]] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_softcap_of_huge_and_infinite_logits(dtype):
    """tanh saturates: +-inf and huge logits are capped to +-c, the loss stays finite and their
    gradient is 0; the first maximum among equal capped values wins."""
    logits, target, mix_target, lam, weight, upstream = _case(8, 13, dtype, 5, weighted=True)
    huge = 6e4 if dtype == torch.float16 else 1e30
    logits[0, 0, 3] = logits[0, 0, 9] = float("inf")
    logits[2, 0, 0], logits[2, 0, 5] = float("-inf"), -huge
    logits[3, 0, :4] = huge
    logits[5, 0, 2], logits[5, 0, 7] = huge, float("inf")  # tie after capping: index 2 wins
    params = row_params(13, 0.1, "all", 1e-3, softcap=3.0)
    mix = (mix_target, lam)
    ours = _ours(logits, target, weight, params, upstream, mix=mix)
    ref = _ref(logits, target, 0.1, "all", weight=weight, z_loss=1e-3, softcap=3.0, mix=mix,
               upstream=upstream)  # fmt: skip
    _check(ours, ref, dtype)
    assert torch.isfinite(ours[0]).all()
    assert (ours[1][0, 0, [3, 9]] == 0).all() and (ours[1][2, 0, 0] == 0)
    assert ours[3][0] == 3 and ours[3][3] == 0 and ours[3][5] == 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask", ["-inf", "finfo.min"])
@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_masked_first_logit(dtype, mask, softcap):
    """A masked first class: the reference r falls back to the row max. Without smoothing (b = 0)
    the -inf class is never read (the reference sees -1e300 instead: 0 * -inf would be NaN),
    including as a second target with lambda 1."""
    logits, target, mix_target, lam, weight, upstream = _case(9, 11, dtype, 6, weighted=True)
    value = float("-inf") if mask == "-inf" else torch.finfo(dtype).min
    logits[:, 0, 0] = value
    target[target == 0] = 1
    mix_target[mix_target == 0] = 2
    lam[0], mix_target[0] = 1.0, 0  # a second target on the masked class, with no share
    params = row_params(11, 0.0, "all", 1e-3, softcap=softcap)
    mix = (mix_target, lam)
    ref_logits = logits.double().masked_fill(logits.double() == float("-inf"), -1e300)
    ref = _ref(ref_logits, target, 0.0, "all", weight=weight, z_loss=1e-3, softcap=softcap,
               mix=mix, upstream=upstream)  # fmt: skip
    _check(_ours(logits, target, weight, params, upstream, mix=mix), ref, dtype, mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("offset", [1e4, -1e4])
def test_large_offsets_with_mix_and_statistics(dtype, offset):
    logits, target, mix_target, lam, weight, upstream = _case(
        10, 300, dtype, 7, scale=2.0, offset=offset, weighted=True
    )
    params = row_params(300, 0.1, "all", 1e-4)
    mix = (mix_target, lam)
    ref = _ref(logits, target, 0.1, "all", weight=weight, z_loss=1e-4, mix=mix, upstream=upstream)
    _check(_ours(logits, target, weight, params, upstream, mix=mix), ref, dtype)


@pytest.mark.parametrize("softcap", [0.0, 2.0])
def test_argmax_of_nan_rows_and_ties(softcap):
    """torch.argmax's rule: the first NaN wins even after a +inf; else the first maximum."""
    logits = torch.tensor(
        [
            [1.0, 5.0, 5.0, 2.0, 0.0],
            [float("inf"), 1.0, float("nan"), float("nan"), 0.0],
            [0.0, 1.0, 2.0, 3.0, float("nan")],
            [float("-inf")] * 5,
            [-3.0, -3.0, -3.0, -3.0, -3.0],
        ]
    ).unsqueeze(1)
    target = torch.tensor([1, IGNORE, 0, IGNORE, 4])
    params = row_params(5, 0.1, "all", softcap=softcap)
    _, _, lse, argmax = _ours(logits, target, None, params, torch.ones(5))
    assert argmax.tolist() == [1, 2, 4, 0, 0]
    assert lse[1:3].isnan().all()
    if not softcap:
        assert lse[3] == float("-inf")


@pytest.mark.parametrize("softcap", [0.0, 3.0])
def test_single_class(softcap):
    logits, target, mix_target, lam, weight, upstream = _case(6, 1, torch.float32, 8,
                                                              weighted=True)  # fmt: skip
    mix_target[target != IGNORE] = 0
    params = row_params(1, 0.0, "all", 1e-2, softcap=softcap)
    mix = (mix_target, lam)
    ref = _ref(logits, target, 0.0, "all", weight=weight, z_loss=1e-2, softcap=softcap, mix=mix,
               upstream=upstream)  # fmt: skip
    _check(_ours(logits, target, weight, params, upstream, mix=mix), ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_spatial_row_view_and_in_place_gradient(dtype):
    """(B, C, S) logits seen as a (B, S, C) row view (classes strided), gradient written over the
    logits themselves: the same as out of place, and as the reference (rows b * S + s)."""
    gen = torch.Generator().manual_seed(9)
    spatial = (torch.randn(3, 19, 4, generator=gen, dtype=torch.float64) * 4).to(dtype)
    target = torch.randint(0, 19, (12,), generator=gen)
    target[::5] = IGNORE
    mix = (torch.randint(0, 19, (12,), generator=gen), torch.rand(12, generator=gen))
    upstream = torch.randn(12, generator=gen)
    params = row_params(19, 0.1, "others", 1e-3, softcap=7.0)
    view = spatial.transpose(1, 2)
    assert not view.is_contiguous()
    out_of_place = _ours(view, target, None, params, upstream, mix=mix)
    in_place = _ours(view, target, None, params, upstream, mix=mix, in_place=True)
    for a, b in zip(out_of_place, in_place, strict=True):
        assert torch.equal(a, b)
    ref = _ref(view, target, 0.1, "others", z_loss=1e-3, softcap=7.0, mix=mix, upstream=upstream)
    _check(in_place, ref, dtype)


@pytest.mark.parametrize("softcap", [0.0, 4.0])
def test_chunk_boundaries(monkeypatch, softcap):
    """Chunks of 2 outer slices (10 rows of 13 classes, then a remainder): every chunk's rows of
    the loss, the gradient and both statistics are written."""
    gen = torch.Generator().manual_seed(10)
    logits = torch.randn(5, 2, 13, generator=gen) * 3
    target = torch.randint(0, 13, (10,), generator=gen)
    target[3] = IGNORE
    mix = (torch.randint(0, 13, (10,), generator=gen), torch.rand(10, generator=gen))
    weight = torch.rand(13, generator=gen) + 0.5
    upstream = torch.randn(10, generator=gen)
    params = row_params(13, 0.1, "all", 1e-3, softcap=softcap)
    whole = _ours(logits, target, weight, params, upstream, mix=mix)
    monkeypatch.setattr(torch_backend, "_CHUNK_ELEMENTS", 2 * 2 * 13 + 5)
    chunked = _ours(logits, target, weight, params, upstream, mix=mix)
    for a, b in zip(chunked, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    ref = _ref(logits, target, 0.1, "all", weight=weight, z_loss=1e-3, softcap=softcap, mix=mix,
               upstream=upstream)  # fmt: skip
    _check(chunked, ref, torch.float32)


@pytest.mark.parametrize("in_place", [False, True])
def test_forward_with_grad_matches_backward(monkeypatch, in_place):
    """forward(grad_logits=, grad_guess=) writes the gradient for upstream grad_guess, chunk by
    chunk, bitwise what backward writes."""
    monkeypatch.setattr(torch_backend, "_CHUNK_ELEMENTS", 40)
    logits, target, mix_target, lam, weight, _ = _case(11, 9, torch.float32, 11, weighted=True)
    params = row_params(9, 0.1, "all", 1e-3, softcap=3.0)
    mix = (mix_target, lam)
    guess = torch.tensor([0.25])
    _, expected, _, _ = _ours(logits, target, weight, params, guess.expand(11), mix=mix)
    work = logits.clone()
    grad = work if in_place else torch.empty_like(work)
    total = weight.sum().reshape(1)
    torch_backend.forward(work, target, weight, total, params, grad, guess, mix=mix)
    assert torch.equal(grad, expected)


def test_statistics_do_not_change_the_loss():
    logits, target, _, _, weight, _ = _case(7, 31, torch.float32, 12, weighted=True)
    params = row_params(31, 0.1, "all", 1e-3, softcap=9.0)
    total = weight.sum().reshape(1)
    plain = torch_backend.forward(logits, target, weight, total, params)
    stats = (torch.empty(7), torch.empty(7, dtype=torch.int64))
    with_stats = torch_backend.forward(logits, target, weight, total, params, stats=stats)
    assert all(torch.equal(a, b) for a, b in zip(plain, with_stats, strict=True))


# ------------------------------------------------------------------------------------------------
# shard_stats / shard_grad, combined by hand (the formulas of lsr_fused.distributed)
# ------------------------------------------------------------------------------------------------


def _shards_by_hand(logits, target, mix, weight, params, upstream, splits, dtype):
    """Each shard's statistics, combined in float64 as the contract states, then each shard's
    gradient: ``(loss, gradient, lse, argmax)`` of the whole row."""
    acc = accumulation_dtype(dtype)
    num_classes = logits.shape[-1]
    bounds = [0, *torch.tensor(splits).cumsum(0).tolist()]
    parts = []
    for lo, hi in itertools.pairwise(bounds):
        local = [shard_math.local_targets(t, lo, hi - lo) for t in (target, mix[0])]
        out = torch.full((8, target.numel()), float("nan"), dtype=acc)
        argmax = torch.full((target.numel(),), -3, dtype=torch.int64)
        shard_weight = None if weight is None else weight[lo:hi]
        torch_backend.shard_stats(logits[..., lo:hi], local[0], shard_weight, out,
                                  softcap=params.softcap, local_mix_target=local[1],
                                  argmax_out=argmax)  # fmt: skip
        parts.append((lo, hi, local, out.double(), argmax))
    top = torch.stack([p[3][0] for p in parts]).amax(0)
    shift = torch.where(torch.isfinite(top), top, 0.0)
    sums = torch.zeros(6, target.numel(), dtype=torch.float64)
    for lo, hi, local, stats, _ in parts:
        to_shift = stats[5] - shift
        width = float(hi - lo) if weight is None else weight[lo:hi].double().sum()
        sums[0] += stats[1] * torch.exp(stats[0] - shift)
        sums[1] += stats[2] + to_shift * width
        sums[2] += torch.where(local[0] >= 0, stats[3] + to_shift, 0.0)
        sums[3] += stats[4]
        sums[4] += torch.where(local[1] >= 0, stats[6] + to_shift, 0.0)
        sums[5] += stats[7]
    ignored = target == IGNORE
    lam = torch.where(ignored, 1.0, mix[1].double())
    first, second = lam * sums[3], (1 - lam) * sums[5]
    total = float(num_classes) if weight is None else weight.double().sum()
    mass = params.other_mass * total + params.target_extra * (first + second)
    shifted_lse = sums[0].log()
    loss = mass * shifted_lse - params.other_mass * sums[1]
    loss -= params.target_extra * (first * sums[2] + second * sums[4])
    loss += params.z_loss * (shift + shifted_lse) ** 2
    loss = torch.where(ignored, 0.0, loss)
    g = torch.where(ignored, 0.0, upstream.double())
    grad = torch.empty_like(logits)
    for lo, hi, local, stats, _ in parts:
        coefs = torch.stack([
            shift + shifted_lse - stats[5], g * (mass + 2 * params.z_loss * (shift + shifted_lse)),
            g * params.other_mass, g * params.target_extra * first, stats[5],
            g * params.target_extra * second,
        ]).to(acc)  # fmt: skip
        shard_weight = None if weight is None else weight[lo:hi]
        torch_backend.shard_grad(logits[..., lo:hi], local[0], shard_weight, coefs,
                                 grad[..., lo:hi], softcap=params.softcap,
                                 local_mix_target=local[1])  # fmt: skip
    best = torch.stack([p[3][0] for p in parts])
    index = torch.stack([p[4] + p[0] for p in parts])
    holds = torch.where(best.isnan().any(0), best.isnan(), best == top)
    argmax = torch.where(holds, index, num_classes).amin(0)
    return loss.to(acc), grad, (shift + shifted_lse).to(acc), argmax


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [(9, 0, 14), (5, 18), (23,)])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_shard_kernels_combined_match_the_reference(dtype, splits, weighted, softcap):
    logits, target, mix_target, lam, weight, upstream = _case(9, 23, dtype, 13, scale=4.0,
                                                              weighted=weighted)  # fmt: skip
    params = row_params(23, 0.1, "all", 1e-3, softcap=softcap)
    mix = (mix_target, lam)
    ours = _shards_by_hand(logits, target, mix, weight, params, upstream, splits, dtype)
    ref = _ref(logits, target, 0.1, "all", weight=weight, z_loss=1e-3, softcap=softcap, mix=mix,
               upstream=upstream)  # fmt: skip
    _check(ours, ref, dtype, str(splits))


def test_shard_stats_of_an_empty_shard_with_every_option():
    out = torch.full((8, 3), 5.0)
    argmax = torch.full((3,), 9, dtype=torch.int64)
    torch_backend.shard_stats(torch.empty(3, 1, 0), torch.full((3,), -1), None, out, softcap=2.0,
                              local_mix_target=torch.full((3,), -1), argmax_out=argmax)  # fmt: skip
    assert (out[0] == float("-inf")).all() and (out[1:] == 0).all() and (argmax == 0).all()


def test_shard_kernels_refuse_a_layout_that_does_not_match_the_mix():
    logits, target = torch.randn(3, 1, 4), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="out must have 8 rows"):
        torch_backend.shard_stats(logits, target, None, torch.empty(6, 3), local_mix_target=target)
    with pytest.raises(ValueError, match="out must have 6 rows"):
        torch_backend.shard_stats(logits, target, None, torch.empty(8, 3))
    with pytest.raises(ValueError, match="coefs must have 6 rows"):
        torch_backend.shard_grad(logits, target, None, torch.zeros(5, 3), logits.clone(),
                                 local_mix_target=target)  # fmt: skip


# ------------------------------------------------------------------------------------------------
# shard_math in a real gloo group (3 ranks, classes 9 / 0 / 14)
# ------------------------------------------------------------------------------------------------

GROUP_SPLITS = (9, 0, 14)
group_results = GroupResults(__name__, {3: ("shard_math",)}, "features")


def _group_cases():
    return [(torch.float32, False, 0.0, 1e-3), (torch.float64, True, 5.0, 0.0)]


def _group_case_tensors(index, dtype, weighted):
    logits, target, mix_target, lam, weight, upstream = _case(
        10, sum(GROUP_SPLITS), dtype, 100 + index, scale=4.0, weighted=weighted
    )
    logits[0, 0, 5] = logits[0, 0, 20] = 50.0  # a tie across shards: the lower index wins
    logits[3, 0, 15] = float("nan")  # NaN rows (kept ones): the first NaN wins, even after +inf
    logits[6, 0, 2] = float("inf")
    logits[6, 0, 16] = float("nan")
    return logits, target, mix_target, lam, weight, upstream


def _shard_math_task(rank: int, world_size: int) -> list:
    group = dist.group.WORLD
    lo = sum(GROUP_SPLITS[:rank])
    hi = lo + GROUP_SPLITS[rank]
    results = []
    for index, (dtype, weighted, softcap, z_loss) in enumerate(_group_cases()):
        case = _group_case_tensors(index, dtype, weighted)
        logits, target, mix_target, lam, weight, upstream = case
        acc = accumulation_dtype(dtype)
        rows = logits[..., lo:hi].contiguous()
        shard_weight = None if weight is None else weight[lo:hi].contiguous()
        local, local_mix = (shard_math.local_targets(t, lo, hi - lo) for t in (target, mix_target))
        stats = torch.empty(8, 10, dtype=acc)
        local_argmax = torch.empty(10, dtype=torch.int64)
        torch_backend.shard_stats(rows, local, shard_weight, stats, softcap=softcap,
                                  local_mix_target=local_mix, argmax_out=local_argmax)  # fmt: skip
        shard_max = stats[0].clone()
        width = float(hi - lo) if weight is None else shard_weight.sum()
        extras = None if weight is None else width.reshape(1)
        reduced = shard_math.all_reduce_stats(stats, local, width, extras, group,
                                              local_mix_target=local_mix)  # fmt: skip
        total = float(sum(GROUP_SPLITS)) if weight is None else reduced.extras[0]
        masses = shard_math.mix_masses(reduced, target, IGNORE, lam)
        masses_ab = row_params(sum(GROUP_SPLITS), 0.1, "others")[:2]
        scalars = (sum(GROUP_SPLITS), masses_ab, z_loss, IGNORE)
        terms = shard_math.row_terms(reduced, total, target, scalars, mix=(mix_target, masses))
        coefs = shard_math.grad_coefs(upstream, *terms[1:], scalars[1], z_loss, mix_masses=masses)
        grad = torch.empty_like(rows)
        torch_backend.shard_grad(rows, local, shard_weight, coefs, grad, softcap=softcap,
                                 local_mix_target=local_mix)  # fmt: skip
        argmax = shard_math.global_argmax(shard_max, local_argmax, lo, group)
        results.append(dict(loss=terms.loss, lse=terms.lse, grad=grad, argmax=argmax,
                            target_weight=terms.target_weight))  # fmt: skip
    return results


TASKS = {"shard_math": _shard_math_task}


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_shard_math_in_a_group_matches_the_reference(tmp_path_factory):
    per_rank = group_results(3, tmp_path_factory)
    for index, (dtype, weighted, softcap, z_loss) in enumerate(_group_cases()):
        case = _group_case_tensors(index, dtype, weighted)
        logits, target, mix_target, lam, weight, upstream = case
        ref = _ref(logits, target, 0.1, "others", weight=weight, z_loss=z_loss, softcap=softcap,
                   mix=(mix_target, lam), upstream=upstream)  # fmt: skip
        results = [r["shard_math"][index] for r in per_rank]
        grad = torch.cat([r["grad"] for r in results], dim=-1)
        for r in results[1:]:  # every rank holds the same loss, lse and argmax
            for key in ("loss", "lse", "argmax"):
                assert torch.equal(r[key].nan_to_num(7.0), results[0][key].nan_to_num(7.0))
        loss_tol, grad_tol = tolerances(dtype, "sharded")
        kept = torch.ones(10, dtype=torch.bool)
        kept[[3, 6]] = False  # NaN rows: the loss is NaN (the reference's too)
        assert_close(results[0]["loss"][kept], ref[0][kept], loss_tol, "loss")
        assert results[0]["loss"][~kept].isnan().all()
        assert_close(grad[kept], ref[1][kept], grad_tol, "gradient")
        assert_close(results[0]["lse"][kept], ref[2][kept], loss_tol, "lse")
        assert results[0]["argmax"].tolist() == ref[3].tolist()
        w = torch.ones(23, dtype=torch.float64) if weight is None else weight.double()
        lam64 = torch.where(target == IGNORE, 1.0, lam.double())
        safe = torch.where(target == IGNORE, 0, target)
        safe_mix = torch.where(target == IGNORE, 0, mix_target)
        # Ignored rows: no rank holds their target, whose weight is 0.
        expected_weight = torch.where(
            target == IGNORE, 0.0, lam64 * w[safe] + (1 - lam64) * w[safe_mix]
        )
        assert_close(results[0]["target_weight"], expected_weight, 1e-6, "target weight")


# ------------------------------------------------------------------------------------------------
# composite.row_losses
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("softcap", [0.0, 3.0])
@pytest.mark.parametrize("lam_kind", ["per_row", "scalar", "none"])
def test_composite_matches_the_reference(softcap, lam_kind):
    logits, target, mix_target, lam, weight, upstream = _case(10, 15, torch.float64, 14,
                                                              scale=5.0, weighted=True)  # fmt: skip
    mix = None if lam_kind == "none" else (mix_target, _lam_tensor(lam_kind, lam, 10, lam.dtype))
    params = row_params(15, 0.1, "all", 1e-2, softcap=softcap)
    rows = logits.squeeze(1).clone().requires_grad_()
    class_weight = weight.clone().requires_grad_()
    loss = composite.row_losses(rows, target, class_weight, params, mix=mix)
    grad, grad_weight = torch.autograd.grad(loss, (rows, class_weight), upstream)
    ref_rows = rows.detach().clone().requires_grad_()
    ref_weight = weight.clone().requires_grad_()
    options = dict(reduction="none", weight=ref_weight, z_loss=1e-2)
    if softcap:
        options["softcap"] = softcap
    if mix is not None:
        options.update(mix_target=mix_target,
                       mix_lambda=torch.where(target == IGNORE, 1.0, mix[1]))  # fmt: skip
    ref = dense_loss(ref_rows, target, 0.1, **options)
    ref_grad, ref_grad_weight = torch.autograd.grad(ref, (ref_rows, ref_weight), upstream)
    assert_close(loss, ref, 1e-12, "loss")
    assert_close(grad, ref_grad, 1e-12, "gradient")
    assert_close(grad_weight, ref_grad_weight, 1e-12, "class-weight gradient")


def test_composite_gradcheck_and_gradgradcheck_with_softcap_and_mix():
    logits, target, mix_target, lam, weight, _ = _case(5, 4, torch.float64, 15, scale=4.0,
                                                       weighted=True)  # fmt: skip
    params = row_params(4, 0.2, "others", 1e-2, softcap=2.5)
    mix = (mix_target, lam)

    def losses(rows, class_weight):
        return composite.row_losses(rows, target, class_weight, params, mix=mix)

    inputs = (logits.squeeze(1).clone().requires_grad_(), weight.clone().requires_grad_())
    assert torch.autograd.gradcheck(losses, inputs)
    assert torch.autograd.gradgradcheck(losses, inputs)


def test_composite_masked_logits_and_mix_with_no_share():
    """A masked (-inf) second target with lambda 1 and no smoothing is never read: finite loss,
    finite gradients (logits and class weights)."""
    rows = torch.tensor([[float("-inf"), 1.0, 2.0], [0.5, float("-inf"), 1.5]], dtype=torch.float64)
    rows.requires_grad_()
    class_weight = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64, requires_grad=True)
    target, mix_target = torch.tensor([1, 2]), torch.tensor([0, 1])
    lam = torch.tensor([1.0]).double().expand(2)
    params = row_params(3, 0.0, "all")
    loss = composite.row_losses(rows, target, class_weight, params, mix=(mix_target, lam))
    grads = torch.autograd.grad(loss.sum(), (rows, class_weight))
    plain = composite.row_losses(rows, target, class_weight, params)
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(loss, plain)
