"""The public signatures are derived from :class:`lsr_fused.LossOptions`, and the backends from the
contract of :mod:`lsr_fused.backends.contract`: what a caller sees (``inspect.signature``), what it
may pass (unknown keywords are a ``TypeError``), and that no backend drifts from its contract."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing

import pytest
import torch

import lsr_fused
from lsr_fused import LossOptions
from lsr_fused.backends import contract
from lsr_fused.distributed import sharded_label_smoothing_cross_entropy
from lsr_fused.linear_distributed import sharded_linear_label_smoothing_cross_entropy
from lsr_fused.options import HeadKeywords, LossKeywords

FIELDS = {f.name: f.default for f in dataclasses.fields(LossOptions)}
HEAD_FIELDS = {name: value for name, value in FIELDS.items() if name != "inplace_backward"}

LOSS_ENTRIES = [
    lsr_fused.label_smoothing_cross_entropy,
    sharded_label_smoothing_cross_entropy,
    lsr_fused.LabelSmoothingCE,
]
HEAD_ENTRIES = [
    lsr_fused.linear_label_smoothing_cross_entropy,
    sharded_linear_label_smoothing_cross_entropy,
    lsr_fused.LinearLabelSmoothingCE,
]


def _label(value) -> str:
    return getattr(value, "__name__", None) or ("head" if value is HEAD_FIELDS else "loss")


@pytest.mark.parametrize(
    "entry, fields",
    [(e, FIELDS) for e in LOSS_ENTRIES] + [(e, HEAD_FIELDS) for e in HEAD_ENTRIES],
    ids=_label,
)
def test_signature_shows_every_option_with_its_default(entry, fields):
    parameters = inspect.signature(entry).parameters
    assert not any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    for name, default in fields.items():
        assert name in parameters, name
        assert parameters[name].default == default, name
        kind = parameters[name].kind
        if name == "label_smoothing":
            assert kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        else:
            assert kind is inspect.Parameter.KEYWORD_ONLY, name
    if fields is HEAD_FIELDS:
        assert "inplace_backward" not in parameters


def test_keyword_types_are_the_fields_types():
    hints = LossOptions.__annotations__
    assert set(LossKeywords.__annotations__) == set(FIELDS) - {"label_smoothing"}
    assert set(HeadKeywords.__annotations__) == set(HEAD_FIELDS) - {"label_smoothing"}
    for name, hint in LossKeywords.__annotations__.items():
        shown = hint.__forward_arg__ if isinstance(hint, typing.ForwardRef) else hint
        assert shown == hints[name], name


def _call(entry, **keywords):
    logits, target = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    hidden, weight = torch.randn(4, 3), torch.randn(5, 3)
    if entry in (lsr_fused.LabelSmoothingCE, lsr_fused.LinearLabelSmoothingCE):
        return entry(**keywords)
    if entry in LOSS_ENTRIES:
        return entry(logits, target, **keywords)
    return entry(hidden, weight, target, **keywords)


@pytest.mark.parametrize("entry", LOSS_ENTRIES + HEAD_ENTRIES, ids=_label)
def test_unknown_keyword_is_a_type_error_naming_it(entry):
    # The sharded forms raise it before they look for a process group.
    with pytest.raises(TypeError, match="unexpected keyword argument 'zloss'"):
        _call(entry, zloss=1e-4)


@pytest.mark.parametrize("entry", HEAD_ENTRIES, ids=_label)
def test_fused_head_refuses_inplace_backward(entry):
    with pytest.raises(TypeError, match="unexpected keyword argument 'inplace_backward'"):
        _call(entry, inplace_backward=True)


def test_label_smoothing_twice_is_a_type_error():
    with pytest.raises(TypeError, match="label_smoothing"):
        lsr_fused.label_smoothing_cross_entropy(
            torch.randn(2, 3), torch.tensor([0, 1]), 0.1, label_smoothing=0.2
        )


def test_keywords_reach_the_options():
    logits, target = torch.randn(6, 7, dtype=torch.float64), torch.randint(0, 7, (6,))
    keywords = dict(reduction="sum", spread="others", z_loss=1e-3, softcap=5.0, ignore_index=2)
    got = lsr_fused.label_smoothing_cross_entropy(logits, target, 0.2, **keywords)
    module = lsr_fused.LabelSmoothingCE(0.2, **keywords)
    assert module.options == LossOptions(0.2, **keywords)
    assert torch.equal(module(logits, target), got)
    different = lsr_fused.label_smoothing_cross_entropy(logits, target, 0.2, reduction="sum")
    assert not torch.equal(different, got)


def test_a_user_subclass_keeps_its_own_signature_and_attributes():
    class Mine(lsr_fused.LabelSmoothingCE):
        backend = "mine"

        def __init__(self, scale: float) -> None:
            super().__init__(0.3, reduction="sum")
            self.scale = scale

    assert list(inspect.signature(Mine).parameters) == ["scale"]
    assert Mine.backend == "mine"
    assert Mine(2.0).options.reduction == "sum"
    # The library's own classes still have the generated attributes.
    module = lsr_fused.LabelSmoothingCE(0.1)
    module.z_loss = 1e-4
    assert module.options.z_loss == 1e-4
    with pytest.raises(ValueError, match="z_loss"):
        module.z_loss = -1.0


def test_options_round_trip_through_keywords():
    options = LossOptions(0.25, reduction="none", softcap=3.0, inplace_backward=True)
    assert LossOptions(**options.keywords()) == options
    head = options.keywords(lsr_fused.options.HEAD_KEYWORDS)
    assert "inplace_backward" not in head and head["softcap"] == 3.0


def _contract_parameters(protocol, name):
    parameters = list(inspect.signature(getattr(protocol, name)).parameters.values())[1:]
    return [(p.name, p.kind, p.default) for p in parameters]


def _backends(*names):
    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(f"lsr_fused.backends.{name}"))
        except ImportError as error:  # triton absent: nothing of it can drift unseen
            assert "triton" in name, error
    return modules


@pytest.mark.parametrize(
    "protocol, functions, modules",
    [
        (
            contract.RowBackend,
            ("forward", "backward"),
            _backends("torch_backend", "cpp_backend", "triton_backend"),
        ),
        (
            contract.ShardBackend,
            ("shard_stats", "shard_grad"),
            _backends("torch_backend", "triton_sharded"),
        ),
    ],
    ids=["row", "shard"],
)
def test_every_backend_takes_its_contracts_parameters(protocol, functions, modules):
    assert modules
    for module in modules:
        for name in functions:
            got = list(inspect.signature(getattr(module, name)).parameters.values())
            assert [(p.name, p.kind, p.default) for p in got] == _contract_parameters(
                protocol, name
            ), f"{module.__name__}.{name}"


@pytest.mark.parametrize("entry", LOSS_ENTRIES[:1] + HEAD_ENTRIES[:1], ids=_label)
def test_keywords_compile_without_graph_break(entry):
    torch._dynamo.reset()
    logits, target = torch.randn(4, 5, requires_grad=True), torch.tensor([0, 1, 2, 3])
    hidden, weight = torch.randn(4, 3, requires_grad=True), torch.randn(5, 3)

    def step(*tensors):
        return entry(*tensors, target, 0.1, reduction="sum", z_loss=1e-4, backend="torch")

    inputs = (logits,) if entry in LOSS_ENTRIES else (hidden, weight)
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(*inputs), step(*inputs))
