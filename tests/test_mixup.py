"""``lsr_fused.mixup.BatchMixer`` against the papers' definitions, computed here independently.

mixup: the image is ``lam x_i + (1 - lam) x_j`` with ``j = N - 1 - i``. CutMix: the pixels that
came from the partner form one rectangle per element (the same in every channel), every other
pixel is the element's own, and ``lam`` is the fraction of the image outside the rectangle. The
tests recover the rectangle from the output alone: images are built so that an element and its
partner differ at every pixel.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from reference import dense_loss, smoothed_targets

import lsr_fused
from lsr_fused.mixup import MODES, BatchMixer, sample_beta

HALF_AND_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
ALL_FLOAT = (*HALF_AND_FLOAT, torch.float64)


def make_batch(n=6, shape=(3, 5, 7), dtype=torch.float32, seed=0, num_classes=10):
    """Images whose element ``i`` lies in ``[i, i + 0.5)``: an element and any other differ by at
    least 0.5 at every pixel (exactly representable distinctions in every dtype used here)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.rand(n, *shape, generator=generator, dtype=torch.float64) * 0.5
    offset = torch.arange(n, dtype=torch.float64).view(n, *([1] * len(shape)))
    images = (base + offset).to(dtype)
    target = torch.randint(0, num_classes, (n,), generator=generator)
    return images, target


def seeded(seed=0, **options):
    return BatchMixer(generator=torch.Generator().manual_seed(seed), **options)


def blend_reference(images, lam):
    """``lam x_i + (1 - lam) x_{N-1-i}`` in float64; ``lam`` a float or an ``(N,)`` tensor."""
    x = images.double()
    if isinstance(lam, torch.Tensor):
        lam = lam.double().view(-1, *([1] * (x.dim() - 1)))
    return lam * x + (1 - lam) * x.flip(0)


def assert_blend(out, images, lam, rows=None):
    """Within one rounding to the output dtype (a few float32 roundings for float32/float64);
    ``rows``: only the elements a bool mask selects."""
    ref = blend_reference(images, lam)
    if rows is not None:
        out, ref = out[rows], ref[rows]
    eps = torch.finfo(images.dtype).eps
    tol = eps * (4 if images.dtype in (torch.float32, torch.float64) else 1)
    scale = max(ref.abs().max().item(), 1.0) if ref.numel() else 1.0
    torch.testing.assert_close(out.double(), ref, atol=tol * scale, rtol=0)


def recover_box(out_i, own_i, partner_i):
    """The rectangle of pixels ``out_i`` took from ``partner_i`` (bool ``(H, W)``), after checking
    that every other pixel is the element's own and that every channel agrees."""
    from_partner = out_i == partner_i
    assert torch.equal(from_partner | (out_i == own_i), torch.ones_like(from_partner))
    mask = from_partner[0]
    assert torch.equal(from_partner, mask.expand_as(from_partner)), "box differs across channels"
    rows, cols = mask.any(1), mask.any(0)
    assert torch.equal(mask, rows[:, None] & cols[None, :]), "partner pixels are not a rectangle"
    for line in (rows, cols):
        hits = line.nonzero().flatten()
        if hits.numel():
            assert hits[-1] - hits[0] + 1 == hits.numel(), "box rows/columns are not contiguous"
    return mask


def covered_fraction(mask):
    return mask.sum().item() / mask.numel()


def test_exports():
    assert lsr_fused.BatchMixer is BatchMixer and "BatchMixer" in lsr_fused.__all__
    assert "mixup" in lsr_fused.__all__ and lsr_fused.mixup.BatchMixer is BatchMixer
    assert "mode='elem'" in repr(BatchMixer(mode="elem"))


@pytest.mark.parametrize("dtype", ALL_FLOAT)
def test_mixup_batch_is_the_convex_combination(dtype):
    images, target = make_batch(dtype=dtype)
    before = images.clone()
    out, same_target, mix_target, lam = seeded(3, mixup_alpha=0.4, cutmix_alpha=0.0)(images, target)
    assert type(lam) is float and 0.0 < lam < 1.0
    assert out.dtype == dtype and out.shape == images.shape
    assert out.data_ptr() != images.data_ptr() and torch.equal(images, before)
    assert same_target is target and torch.equal(mix_target, target.flip(0))
    assert_blend(out, images, lam)


@pytest.mark.parametrize("dtype", HALF_AND_FLOAT)
def test_cutmix_batch_box_comes_from_the_partner(dtype):
    images, target = make_batch(n=4, shape=(2, 9, 12), dtype=dtype)
    mixer = seeded(5, mixup_alpha=0.0, cutmix_alpha=1.0)
    seen_partial = False
    for _ in range(20):
        out, _, mix_target, lam = mixer(images, target)
        assert type(lam) is float and torch.equal(mix_target, target.flip(0))
        masks = [recover_box(out[i], images[i], images.flip(0)[i]) for i in range(len(out))]
        for mask in masks[1:]:
            assert torch.equal(mask, masks[0]), "batch mode: one box for every element"
        assert abs(lam - (1.0 - covered_fraction(masks[0]))) < 1e-12
        seen_partial |= 0.0 < lam < 1.0
    assert seen_partial


def test_cutmix_box_is_sized_by_the_drawn_lam():
    """correct_lam=False keeps the drawn lam: the box is round(sqrt(1 - lam) * side) per side,
    smaller only where clipped at the border."""
    images, target = make_batch(n=2, shape=(1, 16, 24))
    mixer = seeded(8, mixup_alpha=0.0, cutmix_alpha=1.0, correct_lam=False)
    inside_seen = 0
    for _ in range(40):
        out, _, _, lam = mixer(images, target)
        mask = recover_box(out[0], images[0], images[1])
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        want_h, want_w = round(16 * math.sqrt(1 - lam)), round(24 * math.sqrt(1 - lam))
        assert len(rows) <= want_h and len(cols) <= want_w
        if len(rows) and rows[0] > 0 and rows[-1] < 15 and cols[0] > 0 and cols[-1] < 23:
            assert (len(rows), len(cols)) == (want_h, want_w)
            inside_seen += 1
    assert inside_seen > 0


def test_pair_mode_shares_lam_and_box_within_each_pair():
    images, target = make_batch(n=8, shape=(2, 6, 6))
    out, _, mix_target, lam = seeded(1, mixup_alpha=1.0, cutmix_alpha=0.0, mode="pair")(
        images, target
    )
    assert lam.dtype == torch.float32 and lam.shape == (8,) and lam.device == target.device
    assert torch.equal(lam, lam.flip(0)) and len(set(lam.tolist())) == 4
    assert torch.equal(mix_target, target.flip(0))
    assert_blend(out, images, lam)

    out, _, _, lam = seeded(2, mixup_alpha=0.0, cutmix_alpha=1.0, mode="pair")(images, target)
    partner = images.flip(0)
    masks = [recover_box(out[i], images[i], partner[i]) for i in range(8)]
    for i in range(8):
        assert torch.equal(masks[i], masks[7 - i])
        assert lam[i].item() == pytest.approx(1.0 - covered_fraction(masks[i]), abs=1e-7)

    with pytest.raises(ValueError, match=r"mode='pair'.*N = 5"):
        BatchMixer(mode="pair")(*make_batch(n=5))


def test_elem_mode_gives_each_element_its_own_lam_and_box():
    images, target = make_batch(n=8, shape=(2, 10, 10))
    out, _, _, lam = seeded(4, mixup_alpha=1.0, cutmix_alpha=0.0, mode="elem")(images, target)
    assert lam.dtype == torch.float32 and lam.shape == (8,)
    assert len(set(lam.tolist())) == 8
    assert_blend(out, images, lam)

    out, _, _, lam = seeded(6, mixup_alpha=0.0, cutmix_alpha=1.0, mode="elem")(images, target)
    partner = images.flip(0)
    masks = [recover_box(out[i], images[i], partner[i]) for i in range(8)]
    for i in range(8):
        assert lam[i].item() == pytest.approx(1.0 - covered_fraction(masks[i]), abs=1e-7)
    assert len({tuple(m.flatten().tolist()) for m in masks}) > 4


def is_cutmix(out, images):
    """Per element: every pixel is its own or its partner's (a mixup blend is neither)."""
    own_or_partner = (out == images) | (out == images.flip(0))
    return own_or_partner.flatten(1).all(1)


@pytest.mark.parametrize("switch_prob", [0.0, 0.5, 1.0])
def test_switch_prob_chooses_cutmix(switch_prob):
    images, _ = make_batch(n=400, shape=(1, 4, 4))
    target = torch.zeros(400, dtype=torch.int64)
    mixer = seeded(9, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=switch_prob, mode="elem")
    out, _, _, lam = mixer(images, target)
    cut = is_cutmix(out, images)
    fraction = cut.double().mean().item()
    assert fraction == pytest.approx(switch_prob, abs=0.1)
    assert_blend(out, images, lam, rows=~cut)


@pytest.mark.parametrize("mode", MODES)
def test_prob_zero_is_the_identity(mode):
    images, target = make_batch(n=6)
    out, _, mix_target, lam = seeded(0, prob=0.0, mode=mode)(images, target)
    assert torch.equal(out, images) and out.data_ptr() != images.data_ptr()
    assert torch.equal(mix_target, target.flip(0))
    if mode == "batch":
        assert lam == 1.0 and type(lam) is float
    else:
        assert torch.equal(lam, torch.ones(6))


def test_prob_leaves_some_elements_and_batches_unmixed():
    images, target = make_batch(n=400, shape=(1, 3, 3))
    out, _, _, lam = seeded(2, prob=0.5, mode="elem")(images, target)
    unmixed = lam == 1.0
    assert unmixed.double().mean().item() == pytest.approx(0.5, abs=0.1)
    assert torch.equal(out[unmixed], images[unmixed])
    assert not torch.equal(out[~unmixed], images[~unmixed])

    mixer = seeded(3, prob=0.5)
    small, small_target = make_batch(n=2, shape=(1, 3, 3))
    lams = [mixer(small, small_target).lam for _ in range(200)]
    assert sum(v == 1.0 for v in lams) / 200 == pytest.approx(0.5, abs=0.12)


@pytest.mark.parametrize("mode", MODES)
def test_same_seed_same_output(mode):
    images, target = make_batch(n=6)
    first = seeded(11, mode=mode)(images, target)
    again = seeded(11, mode=mode)(images, target)
    other = seeded(12, mode=mode)(images, target)
    assert torch.equal(first.images, again.images)
    assert torch.equal(torch.as_tensor(first.lam), torch.as_tensor(again.lam))
    assert not torch.equal(first.images, other.images)

    torch.manual_seed(5)
    default_first = BatchMixer(mode=mode)(images, target)
    torch.manual_seed(5)
    default_again = BatchMixer(mode=mode)(images, target)
    assert torch.equal(default_first.images, default_again.images)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["transposed", "strided", "channels_last"])
def test_non_contiguous_images(mode, layout):
    images, target = make_batch(n=6, shape=(3, 8, 8))
    if layout == "transposed":
        view = images.transpose(2, 3)
    elif layout == "strided":
        view = torch.cat([images, images], dim=3)[..., ::2]
    else:
        view = images.to(memory_format=torch.channels_last)
    before = view.clone()
    assert not view.is_contiguous()
    out = seeded(7, mode=mode)(view, target)
    expected = seeded(7, mode=mode)(view.contiguous(), target)
    assert torch.equal(out.images, expected.images)
    assert torch.equal(torch.as_tensor(out.lam), torch.as_tensor(expected.lam))
    assert torch.equal(view, before)


@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_single_element_is_its_own_partner(mode):
    images, target = make_batch(n=1)
    out, _, mix_target, lam = seeded(0, mode=mode)(images, target)
    assert torch.equal(out, images) and torch.equal(mix_target, target)
    assert type(lam) is float if mode == "batch" else lam.shape == (1,)
    with pytest.raises(ValueError, match="mode='pair'"):
        BatchMixer(mode="pair")(images, target)


def test_mixup_works_on_any_shape():
    for shape in [(), (5,), (2, 3, 4, 5)]:
        images, target = make_batch(n=4, shape=shape)
        for mode in MODES:
            out, _, _, lam = seeded(1, cutmix_alpha=0.0, mode=mode)(images, target)
            assert_blend(out, images, lam)


def test_mixup_is_differentiable():
    images, target = make_batch(n=4)
    images.requires_grad_(True)
    out, _, _, lam = seeded(1, cutmix_alpha=0.0, mode="elem")(images, target)
    out.sum().backward()
    # d/dx_i of sum_k (lam_k x_k + (1 - lam_k) x_{N-1-k}) = lam_i + 1 - lam_{N-1-i}
    expected = (lam + 1 - lam.flip(0)).view(-1, 1, 1, 1).expand_as(images)
    torch.testing.assert_close(images.grad, expected)


@pytest.mark.parametrize("mode", MODES)
def test_never_reads_back_from_the_device(mode):
    """On the meta device any read-back (``.item()``, ``.tolist()``, ``bool(tensor)``) raises: the
    mixer only sends host samples to the device."""
    images = torch.empty(6, 3, 8, 8, device="meta", dtype=torch.bfloat16)
    target = torch.empty(6, dtype=torch.int64, device="meta")
    for prob in (0.0, 0.5, 1.0):
        for seed in range(4):
            out, _, mix_target, lam = seeded(seed, prob=prob, mode=mode)(images, target)
            assert out.device.type == "meta" and out.shape == images.shape
            assert out.dtype == torch.bfloat16 and mix_target.device.type == "meta"
            if mode != "batch":
                assert lam.device.type == "meta" and lam.dtype == torch.float32


BAD_OPTIONS = [
    ({"mixup_alpha": -0.1}, "mixup_alpha"),
    ({"mixup_alpha": float("inf")}, "mixup_alpha"),
    ({"cutmix_alpha": "1"}, "cutmix_alpha"),
    ({"mixup_alpha": 0.0, "cutmix_alpha": 0.0}, "mixup_alpha and cutmix_alpha"),
    ({"prob": 1.5}, "prob"),
    ({"prob": True}, "prob"),
    ({"switch_prob": -0.01}, "switch_prob"),
    ({"switch_prob": float("nan")}, "switch_prob"),
    ({"mode": "pairs"}, "mode"),
    ({"correct_lam": 1}, "correct_lam"),
    ({"generator": 0}, "generator"),
]


@pytest.mark.parametrize(("options", "name"), BAD_OPTIONS)
def test_bad_options_name_the_argument(options, name):
    with pytest.raises((ValueError, TypeError), match=name):
        BatchMixer(**options)


def test_bad_batches_name_the_argument():
    images, target = make_batch(n=4)
    mixer = BatchMixer()
    cases = [
        ((images.long(), target), TypeError, "images"),
        ((images.numpy(), target), TypeError, "images"),
        ((images[0, 0], target), ValueError, "images must be"),
        ((images.flatten(2), target), ValueError, "CutMix"),
        ((images, target.float()), TypeError, "target"),
        ((images, target[:3]), ValueError, "target"),
        ((images, target.view(4, 1)), ValueError, "target"),
        ((images, target.to("meta")), ValueError, "target is on meta"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            mixer(*args)
    with pytest.raises(ValueError, match="images must have a batch"):
        BatchMixer(cutmix_alpha=0.0)(torch.tensor(1.0), target)


@pytest.mark.parametrize("alpha", [0.05, 0.2, 1.0, 4.0])
def test_beta_samples_follow_beta(alpha):
    samples = sample_beta(alpha, 20000, torch.Generator().manual_seed(0))
    assert samples.dtype == torch.float64 and samples.isfinite().all()
    assert samples.min() >= 0 and samples.max() <= 1
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)); the standard error of each is < 0.003.
    assert samples.mean().item() == pytest.approx(0.5, abs=0.012)
    assert samples.var().item() == pytest.approx(1 / (4 * (2 * alpha + 1)), abs=0.012)
    stats = pytest.importorskip("scipy.stats")
    # Kolmogorov-Smirnov distance; 0.02 is far beyond its 1e-6 quantile (about 0.0135). Taken
    # below 0.999 only: for small alpha, much of the mass lies within 1e-16 of 1 and rounds to 1.0
    # in float64 (8% of it for alpha = 0.05), a step in the sample CDF the true CDF never has.
    ordered = samples.sort().values
    ecdf = torch.arange(1, 20001, dtype=torch.float64) / 20000
    cdf = torch.from_numpy(stats.beta.cdf(ordered.numpy(), alpha, alpha))
    below = ordered < 0.999
    assert (ecdf - cdf)[below].abs().max().item() < 0.02
    with pytest.raises(ValueError, match="alpha"):
        sample_beta(0.0, 3)


def ls_per_element(logits, target, eps):
    return F.cross_entropy(logits.double(), target, label_smoothing=eps, reduction="none")


@pytest.mark.parametrize("mode", MODES)
def test_output_feeds_the_dense_mixed_loss(mode):
    """The mixer's (target, mix_target, lam) in the reference's mix_target= / mix_lambda= give
    lam * LS(y1) + (1 - lam) * LS(y2) per element (mean: divided by N, unweighted)."""
    images, target = make_batch(n=8, num_classes=5)
    _, y1, y2, lam = seeded(2, mode=mode)(images, target)
    logits = torch.randn(8, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lam_t = torch.as_tensor(lam, dtype=torch.float64)
    per_element = lam_t * ls_per_element(logits, y1, 0.1) + (1 - lam_t) * ls_per_element(
        logits, y2, 0.1
    )
    none = dense_loss(logits, y1, 0.1, reduction="none", mix_target=y2, mix_lambda=lam)
    mean = dense_loss(logits, y1, 0.1, mix_target=y2, mix_lambda=lam)
    torch.testing.assert_close(none, per_element, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(mean, per_element.mean(), atol=1e-12, rtol=1e-12)


def test_smoothing_commutes_with_mixing():
    """lam q(y1) + (1 - lam) q(y2) (smooth, then mix) equals smoothing the mixed one-hot target
    (mix, then smooth), spread "all"; the loss of that target is the reference's mixed loss."""
    num_classes, eps = 7, 0.2
    images, target = make_batch(n=10, num_classes=num_classes)
    _, y1, y2, lam = seeded(4, mode="elem")(images, target)
    lam64 = lam.double().unsqueeze(1)
    smooth_then_mix = lam64 * smoothed_targets(y1, num_classes, eps, "all") + (
        1 - lam64
    ) * smoothed_targets(y2, num_classes, eps, "all")
    mixed_one_hot = (
        lam64 * F.one_hot(y1, num_classes).double()
        + (1 - lam64) * F.one_hot(y2, num_classes).double()
    )
    mix_then_smooth = (1 - eps) * mixed_one_hot + eps / num_classes
    torch.testing.assert_close(smooth_then_mix, mix_then_smooth, atol=1e-15, rtol=0)
    torch.testing.assert_close(mix_then_smooth.sum(1), torch.ones(10, dtype=torch.float64))

    logits = torch.randn(10, num_classes, generator=torch.Generator().manual_seed(3))
    per_element = -(mix_then_smooth * F.log_softmax(logits.double(), dim=1)).sum(1)
    reference = dense_loss(logits, y1, eps, reduction="none", mix_target=y2, mix_lambda=lam)
    torch.testing.assert_close(reference, per_element, atol=1e-12, rtol=1e-12)
