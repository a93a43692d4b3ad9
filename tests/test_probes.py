"""Hostile inputs, probed systematically: every public entry point, every backend, one table.

Each probe takes a correct call and changes one thing about how an argument arrives (its memory
layout, whether it is a view of a leaf, whether it requires grad, its values), then checks the loss
and every gradient against the float64 dense reference of ``reference.py``, or checks that the call
raises a clear error. A new option or entry point is probed by adding a row to ``ENTRIES`` or
``LAYOUTS``, not by writing new tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from reference import IGNORE, assert_close, dense_loss, dense_stats, tolerances

import lsr_fused
from lsr_fused import label_smoothing_cross_entropy, linear_label_smoothing_cross_entropy

BACKENDS = lsr_fused.available_backends("cpu")
N, C, H = 6, 7, 5

# ------------------------------------------------------------------------------------------------
# Layouts: same values (or values the reference sees as given), hostile memory layouts.
# ------------------------------------------------------------------------------------------------


def _strided(t):
    """Every other row of a tensor twice as long (dim 0 stride doubled)."""
    big = t.new_zeros((2 * t.shape[0], *t.shape[1:]))
    big[::2] = t
    return big[::2]


def _offset(t):
    """A view that starts 3 elements into its storage."""
    big = t.new_zeros(t.numel() + 3)
    big[3:] = t.reshape(-1)
    return big[3:].view(t.shape)


def _transposed(t):
    """Column-major storage (every dimension's order reversed)."""
    dims = list(range(t.dim()))[::-1]
    return t.permute(dims).contiguous().permute(dims)


def _column(t):
    """The middle column of a (n, 3) tensor (stride 3)."""
    big = t.new_zeros((*t.shape, 3))
    big[..., 1] = t
    return big[..., 1]


def _expanded(t):
    """The first element along dim 0, broadcast with stride 0 (changes the values)."""
    return t[:1].expand_as(t)


LAYOUTS: dict[str, Callable] = {
    "strided": _strided,
    "offset": _offset,
    "transposed": _transposed,
    "column": _column,
    "expanded": _expanded,
}


# ------------------------------------------------------------------------------------------------
# Entry points: how to build arguments, call ours, and call the reference.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    build: Callable  # (dtype, generator) -> dict of tensors
    call: Callable  # (tensors, backend, options) -> loss
    reference: Callable  # (float64 tensors, options) -> loss
    floating: tuple[str, ...]  # floating arguments (may require grad)


def _targets(generator, shape=(N,)):
    target = torch.randint(0, C, shape, generator=generator)
    target.view(-1)[1] = IGNORE
    return target


def _loss_build(dtype, generator):
    return dict(
        logits=(torch.randn(N, C, generator=generator, dtype=torch.float64) * 3).to(dtype),
        target=_targets(generator),
        weight=torch.rand(C, generator=generator, dtype=torch.float64).to(dtype) + 0.5,
    )


def _spatial_build(dtype, generator):
    return dict(
        logits=(torch.randn(2, C, 3, generator=generator, dtype=torch.float64) * 3).to(dtype),
        target=_targets(generator, (2, 3)),
        weight=torch.rand(C, generator=generator, dtype=torch.float64).to(dtype) + 0.5,
    )


def _loss_call(t, backend, options):
    return label_smoothing_cross_entropy(
        t["logits"], t["target"], weight=t["weight"], backend=backend, **options
    )


def _loss_reference(t, options):
    options = {k: v for k, v in options.items() if k != "inplace_backward"}
    eps = options.pop("label_smoothing", 0.1)
    return dense_loss(t["logits"], t["target"], eps, weight=t["weight"], **options)


def _linear_build(dtype, generator):
    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    return dict(
        hidden=randn(N, H),
        weight=randn(C, H),
        bias=randn(C),
        target=_targets(generator),
        class_weight=torch.rand(C, generator=generator, dtype=torch.float64).to(dtype) + 0.5,
    )


def _linear_call(t, backend, options):
    options = {k: v for k, v in options.items() if k != "inplace_backward"}
    eps = options.pop("label_smoothing", 0.1)
    return linear_label_smoothing_cross_entropy(
        t["hidden"], t["weight"], t["target"], eps, bias=t["bias"],
        class_weight=t["class_weight"], backend=backend, chunk_size=4, **options,
    )  # fmt: skip


def _linear_reference(t, options):
    options = {k: v for k, v in options.items() if k != "inplace_backward"}
    eps = options.pop("label_smoothing", 0.1)
    logits = F.linear(t["hidden"], t["weight"], t["bias"])
    return dense_loss(logits, t["target"], eps, weight=t["class_weight"], **options)


def _module_call(t, backend, options):
    options = dict(options)
    eps = options.pop("label_smoothing", 0.1)
    module = lsr_fused.LabelSmoothingCE(eps, weight=t["weight"], backend=backend, **options)
    return module(t["logits"], t["target"])


def _one_rank_group():
    """A world-1 gloo group in this process: the sharded entry points with every class local."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return dist.group.WORLD


def _sharded_loss_call(t, backend, options):
    return _loss_call(t, backend, {**options, "process_group": _one_rank_group()})


def _sharded_linear_call(t, backend, options):
    return _linear_call(t, backend, {**options, "process_group": _one_rank_group()})


def _mixed(build):
    """``build`` plus a mixed target and a per-element ``lam``."""

    def build_mixed(dtype, generator):
        tensors = build(dtype, generator)
        target = tensors["target"]
        # Valid everywhere: a layout probe may turn an ignored element into a counted one (that
        # an ignored element's mix_target is never read is test_features.py's business).
        mix_target = torch.randint(0, C, target.shape, generator=generator)
        lam = torch.rand(target.shape, generator=generator, dtype=torch.float64).to(dtype)
        return {**tensors, "mix_target": mix_target, "mix_lambda": lam}

    return build_mixed


def _mixed_options(t, options):
    return {**options, "mix_target": t["mix_target"], "mix_lambda": t["mix_lambda"]}


def _mixed_loss_call(t, backend, options):
    return _loss_call(t, backend, _mixed_options(t, options))


def _mixed_loss_reference(t, options):
    return _loss_reference(t, _mixed_options(t, options))


def _mixed_linear_call(t, backend, options):
    return _linear_call(t, backend, _mixed_options(t, options))


def _mixed_linear_reference(t, options):
    return _linear_reference(t, _mixed_options(t, options))


def _stats_loss_call(t, backend, options):
    """The loss with ``return_stats=True``; the statistics are checked here, the loss and its
    gradients by the probe."""
    loss, stats = _loss_call(t, backend, {**options, "return_stats": True})
    if torch._C._functorch.is_functorch_wrapped_tensor(t["logits"]):
        return loss  # under torch.func: the statistics are data, checked outside transforms
    ref_options = {k: v for k, v in options.items() if k not in ("inplace_backward", "spread")}
    ref_options.pop("label_smoothing", None)
    values = {k: v.detach() for k, v in t.items()}
    lse, accuracy, z_term = dense_stats(values["logits"], values["target"],
                                        weight=values["weight"], **ref_options)  # fmt: skip
    assert_close(stats.lse, lse, 1e-5, "stats lse")
    assert_close(stats.z_loss, z_term, 1e-5, "stats z_loss")
    torch.testing.assert_close(stats.accuracy.double(), accuracy, rtol=0, atol=1e-6)
    return loss


def _sharded_mixed_loss_call(t, backend, options):
    return _mixed_loss_call(t, backend, {**options, "process_group": _one_rank_group()})


def _sharded_mixed_linear_call(t, backend, options):
    return _mixed_linear_call(t, backend, {**options, "process_group": _one_rank_group()})


ENTRIES = [
    Entry("loss", _loss_build, _loss_call, _loss_reference, ("logits", "weight")),
    Entry("module", _loss_build, _module_call, _loss_reference, ("logits", "weight")),
    Entry("spatial", _spatial_build, _loss_call, _loss_reference, ("logits", "weight")),
    Entry(
        "linear",
        _linear_build,
        _linear_call,
        _linear_reference,
        ("hidden", "weight", "bias", "class_weight"),
    ),
    Entry(
        "sharded-loss",
        _loss_build,
        _sharded_loss_call,
        _loss_reference,
        ("logits", "weight"),
    ),
    Entry(
        "sharded-linear",
        _linear_build,
        _sharded_linear_call,
        _linear_reference,
        ("hidden", "weight", "bias", "class_weight"),
    ),
    Entry(
        "mixed-loss",
        _mixed(_loss_build),
        _mixed_loss_call,
        _mixed_loss_reference,
        ("logits", "weight", "mix_lambda"),
    ),
    Entry(
        "mixed-spatial",
        _mixed(_spatial_build),
        _mixed_loss_call,
        _mixed_loss_reference,
        ("logits", "weight", "mix_lambda"),
    ),
    Entry(
        "mixed-linear",
        _mixed(_linear_build),
        _mixed_linear_call,
        _mixed_linear_reference,
        ("hidden", "weight", "bias", "class_weight", "mix_lambda"),
    ),
    Entry("stats-loss", _loss_build, _stats_loss_call, _loss_reference, ("logits", "weight")),
    Entry(
        "sharded-mixed-loss",
        _mixed(_loss_build),
        _sharded_mixed_loss_call,
        _mixed_loss_reference,
        ("logits", "weight", "mix_lambda"),
    ),
    Entry(
        "sharded-mixed-linear",
        _mixed(_linear_build),
        _sharded_mixed_linear_call,
        _mixed_linear_reference,
        ("hidden", "weight", "bias", "class_weight", "mix_lambda"),
    ),
]
# The vocabulary-parallel forms refuse, with a clear error on every rank, what they do not
# differentiate: class weights that require grad, and double backward.
SHARDED = ("sharded-loss", "sharded-linear", "sharded-mixed-loss", "sharded-mixed-linear")
ENTRY_IDS = [e.name for e in ENTRIES]
_CLASS_WEIGHTS = {
    "loss": "weight",
    "module": "weight",
    "spatial": "weight",
    "linear": "class_weight",
    "sharded-loss": "weight",
    "sharded-linear": "class_weight",
    "mixed-loss": "weight",
    "mixed-spatial": "weight",
    "mixed-linear": "class_weight",
    "stats-loss": "weight",
    "sharded-mixed-loss": "weight",
    "sharded-mixed-linear": "class_weight",
}


def _composite_only(entry) -> tuple[str, ...]:
    """The floating arguments that, requiring grad, take the composite path (the fused path
    treats them as data) and that the sharded forms refuse: class weights and ``mix_lambda``."""
    return (_CLASS_WEIGHTS[entry.name], "mix_lambda")


OPTIONS = {
    "mean": dict(label_smoothing=0.1),
    "sum-others-z": dict(label_smoothing=0.2, spread="others", reduction="sum", z_loss=1e-3),
    "none": dict(label_smoothing=0.3, reduction="none"),
    "capped-z": dict(label_smoothing=0.1, softcap=3.0, z_loss=1e-3),
}


# The entries of the newer options (mixed targets, statistics) are probed with two option sets,
# the plain mean and softcap + z-loss, which keeps the table's run time within CI's budget; the
# original entries with every set.
_NEWER_ENTRY_OPTIONS = ("mean", "capped-z")


def _option_names(entry) -> list[str]:
    newer = entry.name.startswith(("mixed", "sharded-mixed", "stats"))
    return list(_NEWER_ENTRY_OPTIONS) if newer else list(OPTIONS)


ENTRY_OPTIONS = [
    pytest.param(entry, OPTIONS[name], id=f"{name}-{entry.name}")
    for entry in ENTRIES
    for name in _option_names(entry)
]


def _reference_results(entry, tensors, options, grad_names):
    """Loss and gradients of the float64 reference on the values ``tensors`` hold."""
    ref_inputs = {
        k: (v.detach().double().clone().requires_grad_(k in grad_names) if v.is_floating_point()
            else v.clone())
        for k, v in tensors.items()
    }  # fmt: skip
    loss = entry.reference(ref_inputs, dict(options))
    grads = (
        torch.autograd.grad(loss.sum(), [ref_inputs[k] for k in grad_names]) if grad_names else ()
    )
    return loss.detach(), dict(zip(grad_names, grads, strict=True))


def _check(entry, tensors, backend, options, grad_names, dtype=torch.float32, what=""):
    """Ours against the reference: loss and the gradient of every name in ``grad_names``."""
    ref_loss, ref_grads = _reference_results(entry, tensors, options, grad_names)
    loss = entry.call(tensors, backend, dict(options))
    loss_tol, grad_tol = tolerances(dtype)
    assert_close(loss.detach(), ref_loss, loss_tol, f"{what} loss")
    if grad_names:
        grads = torch.autograd.grad(loss.sum(), [tensors[k] for k in grad_names])
        for name, grad in zip(grad_names, grads, strict=True):
            assert not grad.requires_grad, f"{what}: d loss / d {name} carries autograd history"
            assert_close(grad, ref_grads[name], grad_tol, f"{what} d loss / d {name}")
    return loss


# ------------------------------------------------------------------------------------------------
# Probes
# ------------------------------------------------------------------------------------------------


def _layout_cases():
    for entry in ENTRIES:
        sample = entry.build(torch.float32, torch.Generator().manual_seed(0))
        for arg, value in sample.items():
            for layout in LAYOUTS:
                if layout == "column" and value.dim() != 1:
                    continue
                if layout == "transposed" and value.dim() < 2:
                    continue
                for name in _option_names(entry):
                    case_id = f"{name}-{entry.name}-{arg}-{layout}"
                    yield pytest.param(entry, arg, layout, OPTIONS[name], id=case_id)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("entry", "arg", "layout", "options"), list(_layout_cases()))
def test_layouts_of_every_argument(entry, arg, layout, backend, options):
    tensors = entry.build(torch.float32, torch.Generator().manual_seed(1))
    tensors[arg] = LAYOUTS[layout](tensors[arg])
    # Gradients of every floating argument the fused path differentiates (class weights that
    # require grad take the composite path: test_requires_grad_on_each_floating_argument).
    grad_names = tuple(k for k in entry.floating if k not in _composite_only(entry))
    for name in grad_names:
        # The hostile view is taken of a leaf that requires grad (the usual way views arrive).
        leaf = tensors[name].detach().clone().requires_grad_()
        tensors[name] = LAYOUTS[layout](leaf) if name == arg else leaf * 1.0
    _check(entry, tensors, backend, options, grad_names, what=f"{arg} {layout}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("entry", "options"), ENTRY_OPTIONS)
def test_requires_grad_on_each_floating_argument(entry, backend, options):
    for name in entry.floating:
        tensors = entry.build(torch.float64, torch.Generator().manual_seed(2))
        tensors[name].requires_grad_()
        if entry.name in SHARDED and name in _composite_only(entry):
            with pytest.raises(ValueError, match=f"{name} requires grad"):
                entry.call(tensors, backend, dict(options))
            continue
        _check(entry, tensors, backend, options, (name,), torch.float64, f"only {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("entry", "options"), ENTRY_OPTIONS)
def test_double_backward_gradient_penalty(entry, backend, options):
    """``create_graph=True`` then a penalty on the gradient: second-order gradients as the
    reference's (never None, never silently first-order only)."""
    name = entry.floating[0]
    tensors = entry.build(torch.float64, torch.Generator().manual_seed(3))
    tensors[name].requires_grad_()
    ref = {k: v.clone().requires_grad_(k == name) for k, v in tensors.items()}
    ref_loss = entry.reference(ref, dict(options)).sum()
    (ref_grad,) = torch.autograd.grad(ref_loss, ref[name], create_graph=True)
    (ref_second,) = torch.autograd.grad((ref_grad**2).sum(), ref[name])

    loss = entry.call(tensors, backend, dict(options)).sum()
    if entry.name in SHARDED:
        with pytest.raises(RuntimeError, match="create_graph=True"):
            torch.autograd.grad(loss, tensors[name], create_graph=True)
        return
    (grad,) = torch.autograd.grad(loss, tensors[name], create_graph=True)
    assert grad.requires_grad, "create_graph=True returned a gradient without a graph"
    (second,) = torch.autograd.grad((grad**2).sum(), tensors[name])
    assert_close(grad.detach(), ref_grad.detach(), 1e-10, "first order")
    assert_close(second, ref_second, 1e-9, "second order")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("entry", "options"), ENTRY_OPTIONS)
@pytest.mark.parametrize("wrt", ["fused", "all"])
def test_gradcheck_and_gradgradcheck(entry, backend, options, wrt):
    """``wrt="fused"``: every floating argument but the class weights (fixed, on the fused path);
    ``"all"``: the class weights too (the composite path)."""
    tensors = entry.build(torch.float64, torch.Generator().manual_seed(4))
    names = entry.floating
    if wrt == "fused":
        names = tuple(k for k in names if k not in _composite_only(entry))

    def loss_of(*values):
        return entry.call({**tensors, **dict(zip(names, values, strict=True))}, backend, options)

    inputs = tuple(tensors[k].clone().requires_grad_() for k in names)
    if entry.name in SHARDED:
        if wrt == "all":
            pytest.skip("refused by the sharded forms (test_requires_grad_on_each_...)")
        assert torch.autograd.gradcheck(loss_of, inputs, nondet_tol=1e-12)
        return
    assert torch.autograd.gradcheck(loss_of, inputs)
    assert torch.autograd.gradgradcheck(loss_of, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("entry", "options"), ENTRY_OPTIONS)
def test_repeated_backward_is_bitwise_identical(entry, backend, options):
    tensors = entry.build(torch.float32, torch.Generator().manual_seed(5))
    # Class weights that require grad take the composite path; the fused path is the one probed.
    names = [k for k in entry.floating if k not in _composite_only(entry)]
    for k in names:
        tensors[k].requires_grad_()
    loss = entry.call(tensors, backend, dict(options)).sum()
    first = torch.autograd.grad(loss, [tensors[k] for k in names], retain_graph=True)
    second = torch.autograd.grad(loss, [tensors[k] for k in names], retain_graph=True)
    third = torch.autograd.grad(loss, [tensors[k] for k in names])
    for a, b, c in zip(first, second, third, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


LEAF_VIEWS = {
    "full slice": lambda p: p[:, :],
    "view": lambda p: p.view(N, C),
    "narrow": lambda p: p.narrow(0, 1, N - 1),
    "rows": lambda p: p[1:5],
    "reshape": lambda p: p.reshape(N, C),
    "unsqueeze-index": lambda p: p.unsqueeze(0)[0],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("view", LEAF_VIEWS.values(), ids=LEAF_VIEWS.keys())
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_inplace_backward_never_overwrites_a_leaf_through_a_view(view, backend, options):
    generator = torch.Generator().manual_seed(6)
    param = torch.nn.Parameter(torch.randn(N, C, generator=generator))
    before = param.detach().clone()
    logits = view(param)
    target = _targets(generator, (logits.shape[0],))
    loss = label_smoothing_cross_entropy(
        logits, target, backend=backend, inplace_backward=True, **options
    )
    loss.sum().backward()
    assert torch.equal(param.detach(), before), "the parameter now holds its own gradient"
    ref_logits = view(before.clone().requires_grad_())
    ref_opts = {k: v for k, v in options.items() if k != "label_smoothing"}
    ref = dense_loss(ref_logits, target, options["label_smoothing"], **ref_opts)
    (ref_grad,) = torch.autograd.grad(ref.sum(), ref_logits)
    full = torch.zeros(N, C, dtype=torch.float64)
    view(full).copy_(ref_grad)
    assert_close(param.grad, full, 2e-6, "parameter gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_on_an_intermediate_still_writes_in_place(backend):
    """The leaf rule is about whose storage it is: an intermediate result is still overwritten
    (that is the option's point), and its producer receives the right gradient."""
    param = torch.nn.Parameter(torch.randn(N, C))
    logits = param * 2.0
    target = torch.randint(0, C, (N,))
    label_smoothing_cross_entropy(logits, target, backend=backend, inplace_backward=True).backward()
    ref = param.detach().clone().requires_grad_()
    dense_loss(ref * 2.0, target).backward()
    assert_close(param.grad, ref.grad, 2e-6)
    assert not torch.equal(logits.detach(), param.detach() * 2.0), "gradient was not in place"


# ------------------------------------------------------------------------------------------------
# Values: large shared offsets and extreme rows.
# ------------------------------------------------------------------------------------------------

OFFSETS = [0.0, 1e3, 1e4, 1e5]


def _errors(loss, grad, ref_loss, ref_grad):
    return (loss.double() - ref_loss).abs().max().item(), (
        (grad.double() - ref_grad).abs().max() / ref_grad.abs().max()
    ).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_large_offset_within_8x_of_torch(backend, offset, reduction):
    """Logits sharing a large offset: our fp32 error within 8x of ``F.cross_entropy``'s."""
    generator = torch.Generator().manual_seed(7)
    # The float32 values themselves are the input: the reference sees them exactly.
    base = (torch.randn(16, 1000, generator=generator, dtype=torch.float64) * 2 + offset).float()
    target = torch.randint(0, 1000, (16,), generator=generator)
    x64 = base.double().requires_grad_()
    ref = F.cross_entropy(x64, target, label_smoothing=0.1, reduction=reduction)
    (ref_grad,) = torch.autograd.grad(ref.sum(), x64)
    errors = []
    for fn in (F.cross_entropy, None):
        x = base.clone().requires_grad_()
        if fn is None:
            loss = label_smoothing_cross_entropy(
                x, target, 0.1, reduction=reduction, backend=backend
            )
        else:
            loss = fn(x, target, label_smoothing=0.1, reduction=reduction)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        errors.append(_errors(loss.detach(), grad, ref.detach(), ref_grad))
    (torch_loss_err, torch_grad_err), (loss_err, grad_err) = errors
    assert loss_err <= 8 * max(torch_loss_err, 1e-7), (loss_err, torch_loss_err)
    assert grad_err <= 8 * max(torch_grad_err, 1e-7), (grad_err, torch_grad_err)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", OFFSETS)
def test_large_offset_fused_head(backend, offset):
    generator = torch.Generator().manual_seed(8)
    hidden = torch.randn(16, 8, generator=generator, dtype=torch.float64)
    weight = torch.randn(300, 8, generator=generator, dtype=torch.float64) / 4
    bias = torch.randn(300, generator=generator, dtype=torch.float64) + offset
    target = torch.randint(0, 300, (16,), generator=generator)
    ref = dense_loss(F.linear(hidden, weight, bias), target, 0.1, reduction="none")
    loss = linear_label_smoothing_cross_entropy(
        hidden.float(), weight.float(), target, 0.1, bias=bias.float(), reduction="none",
        backend=backend, chunk_size=5,
    )  # fmt: skip
    # The fp32 logits themselves are rounded to ulp(offset); the loss must not lose more.
    rounded = F.linear(hidden.float(), weight.float(), bias.float()).double()
    ref_rounded = dense_loss(rounded, target, 0.1, reduction="none")
    assert (loss.double() - ref_rounded).abs().max().item() < 1e-4
    assert (loss.double() - ref).abs().max().item() < 1e-4 + (ref - ref_rounded).abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_all_equal_huge_row_gives_log_c(backend, eps):
    logits = torch.full((3, 1000), 1e30, requires_grad=True)
    target = torch.tensor([0, 5, 999])
    loss = label_smoothing_cross_entropy(logits, target, eps, reduction="none", backend=backend)
    torch.testing.assert_close(loss.detach(), torch.full((3,), torch.tensor(1000.0).log().item()))
    loss.sum().backward()
    expected = torch.full((3, 1000), 1e-3 - eps / 1000)
    expected[torch.arange(3), target] -= 1.0 - eps
    torch.testing.assert_close(logits.grad, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inf_logit_on_another_class_is_nan_as_torch(backend):
    logits = torch.randn(2, 5)
    logits[0, 3] = float("inf")
    target = torch.tensor([1, 2])
    ours = label_smoothing_cross_entropy(logits, target, 0.0, reduction="none", backend=backend)
    theirs = F.cross_entropy(logits, target, reduction="none")
    assert torch.isnan(theirs[0]) and torch.isnan(ours[0]), (ours, theirs)
    torch.testing.assert_close(ours[1], theirs[1])


# ------------------------------------------------------------------------------------------------
# Misuse: the errors torch raises as RuntimeError are catchable as RuntimeError here too.
# ------------------------------------------------------------------------------------------------

TORCH_RUNTIME_ERRORS = {
    "weight length": lambda f: f(
        torch.randn(4, 5), torch.zeros(4, dtype=torch.long), weight=torch.ones(3)
    ),
    "spatial target shape": lambda f: f(torch.randn(2, 5, 3), torch.zeros(2, 4, dtype=torch.long)),
    "float target": lambda f: f(torch.randn(4, 5), torch.zeros(4)),
    "integer weight": lambda f: f(
        torch.randn(4, 5), torch.zeros(4, dtype=torch.long), weight=torch.ones(5, dtype=torch.long)
    ),
    "label_smoothing above 1": lambda f: f(
        torch.randn(4, 5), torch.zeros(4, dtype=torch.long), label_smoothing=1.5
    ),
}


@pytest.mark.parametrize("misuse", TORCH_RUNTIME_ERRORS.values(), ids=TORCH_RUNTIME_ERRORS.keys())
def test_errors_are_catchable_as_torch_raises_them(misuse):
    with pytest.raises(RuntimeError):
        misuse(F.cross_entropy)
    with pytest.raises(RuntimeError):
        misuse(label_smoothing_cross_entropy)


def test_out_of_range_target_is_catchable_as_index_error():
    target = torch.tensor([0, 7, 1, 2])
    with pytest.raises(IndexError):
        F.cross_entropy(torch.randn(4, 5), target)
    with pytest.raises(IndexError):
        label_smoothing_cross_entropy(torch.randn(4, 5), target)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_integer_targets_of_any_width(dtype):
    logits, target = torch.randn(4, 5), torch.tensor([0, 4, 1, 2])
    expected = label_smoothing_cross_entropy(logits, target)
    torch.testing.assert_close(label_smoothing_cross_entropy(logits, target.to(dtype)), expected)


def test_language_model_layout_error_names_the_fix():
    with pytest.raises(ValueError, match=r"flatten\(0, -2\)"):
        label_smoothing_cross_entropy(torch.randn(2, 3, 8), torch.zeros(2, 3, dtype=torch.long))


def test_available_backends_never_lists_triton_for_cuda_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert "triton" not in lsr_fused.available_backends("cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_head_without_features_is_the_bias_loss(backend):
    bias = torch.randn(C, requires_grad=True)
    target = torch.randint(0, C, (N,))
    loss = linear_label_smoothing_cross_entropy(
        torch.randn(N, 0), torch.randn(C, 0), target, bias=bias, backend=backend
    )
    torch.testing.assert_close(
        loss, F.cross_entropy(bias.expand(N, C), target, label_smoothing=0.1)
    )


@pytest.mark.parametrize("chunk_size", [2**62, 2**70])
def test_fused_head_huge_chunk_size_is_one_chunk(chunk_size):
    tensors = _linear_build(torch.float32, torch.Generator().manual_seed(9))
    args = (tensors["hidden"], tensors["weight"], tensors["target"])
    loss = linear_label_smoothing_cross_entropy(*args, chunk_size=chunk_size)
    torch.testing.assert_close(loss, linear_label_smoothing_cross_entropy(*args))


@pytest.mark.parametrize("entry", ENTRIES, ids=ENTRY_IDS)
def test_torch_func_grad_and_vmap(entry):
    """torch.func transforms run the composite path: gradients equal the reference's (the
    sharded forms, whose collectives no transform can batch, raise torch's clear error)."""
    tensors = entry.build(torch.float64, torch.Generator().manual_seed(10))
    name = entry.floating[0]

    def loss_of(value):
        return entry.call({**tensors, name: value}, "auto", dict(label_smoothing=0.1))

    if entry.name in SHARDED:
        with pytest.raises(RuntimeError, match=r"functorch|torch\.func|setup_context"):
            torch.func.grad(loss_of)(tensors[name])
        return

    grad = torch.func.grad(loss_of)(tensors[name])
    ref = tensors[name].clone().requires_grad_()
    (ref_grad,) = torch.autograd.grad(
        entry.reference({**tensors, name: ref}, dict(label_smoothing=0.1)), ref
    )
    assert_close(grad, ref_grad, 1e-10)
    batched = torch.func.vmap(torch.func.grad(loss_of))(torch.stack([tensors[name]] * 2))
    assert_close(batched[1], ref_grad, 1e-10)
