"""The Triton kernels' large-offset accuracy contract, and the layouts they read in place.

Logits ``randn * 2 + offset`` make a kernel that computes ``S * lse - b * sum(w x) - ...`` on
absolute logits cancel terms of the size of ``offset``; the kernels take every logit relative to
the row's first one (the contract of :mod:`lsr_fused.backends`). Each loss and gradient path is
held to 8x the error of ``F.cross_entropy`` in float32 on the same inputs, against the float64
reference. The sharded kernels are checked against the contract's formulas in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from reference import dense_loss

import lsr_fused
from lsr_fused import policy

triton_backend = pytest.importorskip("lsr_fused.backends.triton_backend")
from lsr_fused.backends import FIRST_LOGIT_MAX_GAP, triton_sharded  # noqa: E402

pytestmark = pytest.mark.skipif(
    "triton" not in lsr_fused.available_backends("cpu"),
    reason="needs triton (CUDA or TRITON_INTERPRET=1)",
)
OFFSETS = (0.0, 1e3, 1e4, 1e5)
EPS = 0.1
# F.cross_entropy's own error can be 0 on a row: floor the yardstick at float32 rounding.
FLOAT32_FLOOR = 2.0**-23


def _offset_case(offset: float, seed: int, rows: int = 4, num_classes: int = 200):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, num_classes, generator=generator, dtype=torch.float64) * 2 + offset
    target = torch.randint(0, num_classes, (rows,), generator=generator)
    return logits.float(), target


def _reference(logits32: torch.Tensor, target: torch.Tensor, upstream: torch.Tensor):
    """float64 per-row losses and the gradient of ``sum(upstream * loss)``."""
    x = logits32.double().requires_grad_()
    loss = dense_loss(x, target, EPS, reduction="none")
    (grad,) = torch.autograd.grad(loss, x, upstream.double())
    return loss.detach(), grad


def _cross_entropy_errors(logits32, target, upstream, ref_loss, ref_grad):
    """(loss, relative gradient) error of F.cross_entropy in float32: the yardstick."""
    x = logits32.clone().requires_grad_()
    loss = F.cross_entropy(x, target, label_smoothing=EPS, reduction="none")
    (grad,) = torch.autograd.grad(loss, x, upstream)
    loss_error = (loss.double() - ref_loss).abs().max().item()
    grad_error = (grad.double() - ref_grad).abs().max().item() / ref_grad.abs().max().item()
    scale = ref_loss.abs().max().item()
    return max(loss_error, FLOAT32_FLOOR * scale), max(grad_error, FLOAT32_FLOOR)


def _ours(path: str, logits32: torch.Tensor, target: torch.Tensor, upstream: torch.Tensor):
    """Per-row losses and the gradient of ``sum(upstream * loss)`` through one kernel path."""
    lsce = lsr_fused.label_smoothing_cross_entropy
    leaf = logits32.clone().requires_grad_()
    per_row = lsce(leaf.detach(), target, EPS, reduction="none", backend="triton")
    if path == "grad in forward":  # loss.backward() of a sum: the forward writes the gradient
        lsce(leaf, target, EPS, reduction="sum", backend="triton").backward()
        return per_row, leaf.grad * upstream[:, None]
    if path == "redo":  # the real upstream differs from the guess: backward rewrites every row
        (2.0 * lsce(leaf, target, EPS, reduction="sum", backend="triton")).backward()
        return per_row, leaf.grad / 2.0 * upstream[:, None]
    inplace = path == "inplace backward"
    source = leaf * 1.0 if inplace else leaf
    loss = lsce(source, target, EPS, reduction="none", inplace_backward=inplace, backend="triton")
    loss.backward(upstream)
    return per_row, leaf.grad


@pytest.mark.parametrize("path", ["backward", "grad in forward", "redo", "inplace backward"])
@pytest.mark.parametrize("offset", OFFSETS)
def test_large_offsets_within_8x_of_cross_entropy(offset, path):
    logits32, target = _offset_case(offset, seed=int(offset) % 9973)
    upstream = torch.ones(logits32.shape[0])
    if path in ("backward", "inplace backward"):
        upstream = torch.rand(logits32.shape[0], generator=torch.Generator().manual_seed(3)) + 0.5
    ref_loss, ref_grad = _reference(logits32, target, upstream)
    loss_yardstick, grad_yardstick = _cross_entropy_errors(
        logits32, target, upstream, ref_loss, ref_grad
    )
    loss, grad = _ours(path, logits32, target, upstream)
    loss_error = (loss.double() - ref_loss).abs().max().item()
    grad_error = (grad.double() - ref_grad).abs().max().item() / ref_grad.abs().max().item()
    assert loss_error <= 8 * loss_yardstick, (loss_error, loss_yardstick)
    assert grad_error <= 8 * grad_yardstick, (grad_error, grad_yardstick)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_equal_huge_logits_give_log_c(dtype):
    """A row of equal logits 1e30: every logit relative to the first is 0, so the loss is
    ``S log C`` and the softmax uniform, not inf - inf."""
    num_classes = 37
    weight = torch.rand(num_classes, generator=torch.Generator().manual_seed(5)) + 0.5
    logits = torch.full((3, num_classes), 1e30, dtype=dtype)
    target = torch.tensor([0, 5, 36])
    leaf = logits.clone().requires_grad_()
    loss = lsr_fused.label_smoothing_cross_entropy(
        leaf, target, EPS, weight=weight, reduction="none", backend="triton"
    )
    loss.sum().backward()
    other = EPS / num_classes
    total_mass = other * weight.sum() + (1 - EPS) * weight[target]
    torch.testing.assert_close(loss, total_mass * math.log(num_classes))
    expected = total_mass[:, None] / num_classes - other * weight.expand(3, -1)
    expected[torch.arange(3), target] -= (1 - EPS) * weight[target]
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(leaf.grad.float(), expected, atol=tol, rtol=tol)


def test_positive_inf_logit_without_smoothing_is_nan_as_in_torch():
    """+inf on a non-target class with eps = 0: the softmax is inf / inf. F.cross_entropy says
    NaN; so does the kernel (no silent finite answer)."""
    logits = torch.randn(2, 16)
    logits[0, 3] = float("inf")
    target = torch.tensor([1, 2])
    torch_loss = F.cross_entropy(logits, target, reduction="none")
    ours = lsr_fused.label_smoothing_cross_entropy(
        logits, target, 0.0, reduction="none", backend="triton"
    )
    assert torch.isnan(torch_loss[0]) and torch.isnan(ours[0])
    torch.testing.assert_close(ours[1], torch_loss[1])


def test_padded_vocabulary_slice_is_read_in_place():
    """A slice of the classes (unit class stride, gaps between rows) is not copied by the row
    view, and the kernels read it (and write a dense gradient) correctly."""
    padded = torch.randn(5, 136, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    padded = (padded * 3).float().requires_grad_()
    logits = padded[:, :128]
    assert policy.row_view(logits).data_ptr() == logits.data_ptr()
    target = torch.randint(0, 128, (5,), generator=torch.Generator().manual_seed(8))
    for reduction in ("mean", "none"):
        padded.grad = None
        loss = lsr_fused.label_smoothing_cross_entropy(
            logits, target, EPS, reduction=reduction, backend="triton"
        )
        loss.sum().backward()
        ref_x = logits.detach().double().requires_grad_()
        ref = dense_loss(ref_x, target, EPS, reduction=reduction)
        ref.sum().backward()
        torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(padded.grad[:, :128].double(), ref_x.grad, atol=1e-6, rtol=1e-5)
        assert padded.grad[:, 128:].abs().max() == 0


ROW_LAYOUTS = {
    # name: (a leaf, its (B, C, S)-style view whose row view has S > 1 rows per batch entry)
    "S-sliced (B, S, C) as (B, C, S)": (
        (3, 5, 24),
        lambda leaf: leaf[:, :4].transpose(1, 2),
    ),
    "(N, C, d)": ((3, 24, 4), lambda leaf: leaf),
    "(N, C, h, w)": ((2, 24, 3, 5), lambda leaf: leaf),
}


@pytest.mark.parametrize("layout", list(ROW_LAYOUTS))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_two_dimensional_row_grid(layout, reduction):
    """Row views with S > 1 rows per batch entry run on an (S, B) grid of programs (each takes
    its row from its two program ids): every row is read and written where it lies."""
    shape, view_of = ROW_LAYOUTS[layout]
    generator = torch.Generator().manual_seed(11)
    leaf = (3 * torch.randn(shape, generator=generator, dtype=torch.float64)).float()
    leaf.requires_grad_()
    logits = view_of(leaf)
    assert policy.row_view(logits).shape[1] > 1  # the two-dimensional grid, not one row dimension
    target_shape = logits.shape[:1] + logits.shape[2:]
    target = torch.randint(0, logits.shape[1], target_shape, generator=generator)
    target.view(-1)[1] = -100
    loss = lsr_fused.label_smoothing_cross_entropy(
        logits, target, EPS, reduction=reduction, z_loss=1e-3, backend="triton"
    )
    upstream = torch.rand(loss.shape, generator=generator) + 0.5
    (loss * upstream).sum().backward()
    ref_leaf = leaf.detach().double().requires_grad_()
    ref = dense_loss(view_of(ref_leaf), target, EPS, reduction=reduction, z_loss=1e-3)
    (ref * upstream.double()).sum().backward()
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, atol=1e-6, rtol=1e-5)


def test_shard_kernels_on_a_two_dimensional_row_grid():
    """The sharded statistics and gradient kernels on an S > 1 row view agree with the same rows
    laid out flat (one row dimension, a one-dimensional grid)."""
    generator = torch.Generator().manual_seed(12)
    longer = (3 * torch.randn(3, 5, 40, generator=generator)).float()
    rows = longer[:, :4]  # (B, S, C) with rows not evenly spaced: S = 4 per batch entry
    flat = rows.reshape(12, 1, 40)
    local_target = torch.randint(-1, 40, (12,), generator=generator)
    stats, flat_stats = (torch.empty(6, 12) for _ in range(2))
    triton_sharded.shard_stats(rows, local_target, None, stats)
    triton_sharded.shard_stats(flat, local_target, None, flat_stats)
    torch.testing.assert_close(stats, flat_stats, rtol=0, atol=0)
    coefs = torch.rand(5, 12, generator=generator)
    coefs[4] = stats[5]
    grad, flat_grad = torch.full_like(rows, float("nan")), torch.empty_like(flat)
    triton_sharded.shard_grad(rows, local_target, None, coefs, grad)
    triton_sharded.shard_grad(flat, local_target, None, coefs, flat_grad)
    torch.testing.assert_close(grad.reshape(12, 1, 40), flat_grad, rtol=0, atol=0)


def test_row_grid_limits():
    """The grid of the row kernels: (B, 1) for S == 1, (S, B) otherwise; beyond what a CUDA grid
    or a 32-bit row index holds it raises instead of launching a wrong or failing grid."""
    from lsr_fused.backends.triton_common import MAX_GRID_Y, row_grid

    def view(*shape):  # no memory: an expanded scalar
        return torch.empty(()).expand(*shape)

    assert row_grid(view(5, 1, 8)) == (5, 1)
    assert row_grid(view(5, 3, 8)) == (3, 5)
    assert row_grid(view(MAX_GRID_Y, 7, 2)) == (7, MAX_GRID_Y)
    with pytest.raises(RuntimeError, match="B <= 65535"):
        row_grid(view(MAX_GRID_Y + 1, 2, 2))
    with pytest.raises(RuntimeError, match="rows"):
        row_grid(view(MAX_GRID_Y, 2**15 + 1, 2))


def test_row_view_of_evenly_spaced_rows_is_one_dimension():
    """A (B, S, C) tensor passed as (B, C, S) has evenly spaced rows: one row dimension, no copy;
    and beyond 65535 batch entries an uneven S > 1 view becomes one too (the grid's limit)."""
    sequence = torch.randn(2, 3, 16)
    rows = policy.row_view(sequence.transpose(1, 2))
    assert rows.shape == (6, 1, 16) and rows.data_ptr() == sequence.data_ptr()
    many = torch.empty(65536, 3, 2)[:, :2].transpose(1, 2)
    assert policy.row_view(many).shape == (65536 * 2, 1, 2)


# ---------------------------------------------------------------------------------------------
# The sharded kernels, against the contract's float64 math.


def _shard_case(offset: float, num_classes: int, weighted: bool, seed: int):
    generator = torch.Generator().manual_seed(seed)
    rows = 6
    logits = torch.randn(rows, num_classes, generator=generator, dtype=torch.float64) * 2 + offset
    logits[1, 0] = float("-inf")  # a masked first class: r_k falls back to the row max
    logits[3, 0] = -1e9  # masked with a large finite value: r_k falls back to the row max too
    local_target = torch.randint(0, num_classes, (rows,), generator=generator)
    local_target[::2] = -1  # the target is on another rank
    weight = torch.rand(num_classes, generator=generator, dtype=torch.float64) + 0.5
    return logits.float(), local_target, (weight.float() if weighted else None)


def _contract_reference(x32: torch.Tensor):
    """The float64 logits and each row's ``r_k``: the first logit where finite and at most
    ``FIRST_LOGIT_MAX_GAP`` below the row max, else the max where finite, else 0."""
    x = x32.double()
    first, row_max = x[:, 0], x.amax(1)
    from_first = torch.isfinite(first) & (row_max - first <= FIRST_LOGIT_MAX_GAP)
    fallback = torch.where(torch.isfinite(row_max), row_max, 0.0)
    return x, torch.where(from_first, first, fallback)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("offset", [0.0, 1e5])
def test_shard_stats_follow_the_contract(offset, weighted):
    logits, local_target, weight = _shard_case(offset, 96, weighted, seed=11)
    out = torch.empty(6, logits.shape[0])
    triton_sharded.shard_stats(logits.unsqueeze(1), local_target, weight, out)
    x, reference = _contract_reference(logits)
    w = torch.ones(x.shape[1], dtype=torch.float64) if weight is None else weight.double()
    here = local_target >= 0
    safe = torch.where(here, local_target, 0)
    row_max = x.amax(1)
    relative = torch.where(torch.isfinite(x), x - reference[:, None], 0.0)
    masked = torch.isinf(x).any(1)
    expected = torch.stack([
        row_max,
        (x - row_max[:, None]).exp().sum(1),
        torch.where(masked, float("-inf"), (w * relative).sum(1)),
        torch.where(here, x.gather(1, safe[:, None])[:, 0] - reference, 0.0),
        torch.where(here, w[safe], 0.0),
        reference,
    ])  # fmt: skip
    # Errors of float32 arithmetic on the shifted values, not on the offset.
    torch.testing.assert_close(out.double(), expected, atol=2e-4, rtol=2e-6)


def test_shard_stats_of_an_empty_shard():
    out = torch.full((6, 3), 7.0)
    triton_sharded.shard_stats(torch.empty(3, 1, 0), torch.full((3,), -1), None, out)
    expected = torch.zeros(6, 3)
    expected[0] = float("-inf")
    torch.testing.assert_close(out, expected)


def test_shard_stats_reject_the_old_layout():
    with pytest.raises(ValueError, match="out must be a contiguous"):
        triton_sharded.shard_stats(torch.randn(3, 1, 8), torch.zeros(3, dtype=torch.long), None,
                                   torch.empty(5, 3))  # fmt: skip


def test_shard_grad_rejects_the_old_coefficients():
    logits = torch.randn(3, 1, 8)
    with pytest.raises(ValueError, match="coefs must be a contiguous"):
        triton_sharded.shard_grad(logits, torch.zeros(3, dtype=torch.long), None,
                                  torch.zeros(4, 3), torch.empty_like(logits))  # fmt: skip


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("offset", [0.0, 1e5])
def test_shard_grad_follows_the_contract(offset, weighted, in_place):
    logits, local_target, weight = _shard_case(offset, 96, weighted, seed=13)
    logits[1, 0] = offset  # finite everywhere: the gradient of a -inf logit is exp(-inf) = 0
    x, reference = _contract_reference(logits)
    generator = torch.Generator().manual_seed(17)
    # lse_k = global lse - r_k, as the combine computes it (here: this shard is the whole row).
    shifted_lse = torch.logsumexp(x - reference[:, None], 1)
    coefs = torch.stack(
        [shifted_lse, *(torch.rand(3, 6, generator=generator, dtype=torch.float64)), reference]
    )
    coefs32 = coefs.float().contiguous()
    rows = logits.clone().unsqueeze(1)
    grad = rows if in_place else torch.empty_like(rows)
    triton_sharded.shard_grad(rows, local_target, weight, coefs32, grad)
    lse_k, scale, other, target_coef, _ = coefs32.double()
    w = torch.ones(x.shape[1], dtype=torch.float64) if weight is None else weight.double()
    expected = ((x - reference[:, None]) - lse_k[:, None]).exp() * scale[:, None]
    expected -= other[:, None] * w
    hit = torch.arange(x.shape[1])[None, :] == local_target[:, None]
    expected -= torch.where(hit, target_coef[:, None], 0.0)
    torch.testing.assert_close(grad[:, 0].double(), expected, atol=1e-6, rtol=1e-5)


def test_two_shards_combined_by_the_contract_match_the_reference():
    """shard_stats on two class slices, the combine written as the contract states it (float64,
    here in the test), and shard_grad: loss and gradient at offset 1e5 within 8x of
    F.cross_entropy's float32 error, like the local kernels."""
    logits32, target = _offset_case(1e5, seed=23)
    rows, num_classes = logits32.shape
    bounds = [(0, 120), (120, num_classes)]
    other, extra = EPS / num_classes, 1.0 - EPS
    stats = []
    for lo, hi in bounds:
        local = target - lo
        local = torch.where((local >= 0) & (local < hi - lo), local, -1)
        out = torch.empty(6, rows)
        triton_sharded.shard_stats(logits32[:, lo:hi].unsqueeze(1), local, None, out)
        stats.append((out.double(), local, hi - lo))
    global_max = torch.stack([s[0][0] for s in stats]).amax(0)
    sum_exp = sum(s[0][1] * (s[0][0] - global_max).exp() for s in stats)
    weighted = sum(s[2] + (s[5] - global_max) * width for s, _, width in stats)
    target_logit = sum(torch.where(local >= 0, s[3] + (s[5] - global_max), 0.0)
                       for s, local, _ in stats)  # fmt: skip
    total_mass = other * num_classes + extra
    loss = total_mass * sum_exp.log() - other * weighted - extra * target_logit
    upstream = torch.ones(rows)
    ref_loss, ref_grad = _reference(logits32, target, upstream)
    loss_yardstick, grad_yardstick = _cross_entropy_errors(
        logits32, target, upstream, ref_loss, ref_grad
    )
    assert (loss - ref_loss).abs().max().item() <= 8 * loss_yardstick
    grads = []
    for (s, local, _), (lo, hi) in zip(stats, bounds, strict=True):
        shifted_lse = (global_max - s[5]) + sum_exp.log()
        ones = torch.ones(rows, dtype=torch.float64)
        coefs = torch.stack(
            [shifted_lse, total_mass * ones, other * ones, extra * ones, s[5]]
        ).float()
        grad = torch.empty(rows, 1, hi - lo)
        triton_sharded.shard_grad(logits32[:, lo:hi].unsqueeze(1), local, None, coefs, grad)
        grads.append(grad[:, 0])
    grad_error = (torch.cat(grads, 1).double() - ref_grad).abs().max() / ref_grad.abs().max()
    assert grad_error.item() <= 8 * grad_yardstick
