"""The fused head under data parallelism, on 2 spawned gloo ranks: FSDP2 (``fully_shard``, the
head's weight a sharded DTensor outside its module's forward) and DDP. Each rank trains on its
half of a batch; the loss averaged over ranks and every parameter's gradient must equal a
one-process run over the whole batch (``F.cross_entropy(F.linear(...), label_smoothing=0.1)``).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from gloo_groups import GroupResults
from torch import nn

from lsr_fused import LinearLabelSmoothingCE, linear_label_smoothing_cross_entropy

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6
    fully_shard = None

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

ROWS_PER_RANK, FEATURES, CLASSES, EPS = 6, 8, 21, 0.1  # 21 classes: uneven shards (11 / 10)


class TinyLM(nn.Module):
    """A body whose forward returns hidden states; the head is applied by the loss."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(FEATURES, FEATURES, dtype=torch.float64)
        self.head = nn.Linear(FEATURES, CLASSES, dtype=torch.float64)

    def forward(self, x):
        return torch.tanh(self.body(x))


def _model_and_batch():
    torch.manual_seed(0)
    model = TinyLM()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2 * ROWS_PER_RANK, FEATURES, generator=gen, dtype=torch.float64)
    target = torch.randint(0, CLASSES, (2 * ROWS_PER_RANK,), generator=gen)
    return model, x, target


def _fused_loss(form: str, hidden, head_weight, target, head_bias):
    if form == "module":
        return LinearLabelSmoothingCE(EPS)(hidden, head_weight, target, bias=head_bias)
    return linear_label_smoothing_cross_entropy(hidden, head_weight, target, EPS, bias=head_bias)


def _plain(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _train_step(wrap: str, form: str, rank: int, world_size: int) -> dict:
    model, x, target = _model_and_batch()
    rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    if wrap == "ddp":
        runner = nn.parallel.DistributedDataParallel(model)
    else:
        if wrap == "fsdp":  # the head its own unit: a DTensor outside its forward
            fully_shard(model.head)
        fully_shard(model)
        runner = model
    hidden = runner(x[rows])
    weight_type = type(model.head.weight).__name__
    loss = _fused_loss(form, hidden, model.head.weight, target[rows], model.head.bias)
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    grads = {name: _plain(p.grad).detach().clone() for name, p in model.named_parameters()}
    return {"loss": mean_loss / world_size, "grads": grads, "weight_type": weight_type}


def _rejects_dtensor_with_process_group(rank: int, world_size: int) -> str:
    model, x, target = _model_and_batch()
    fully_shard(model.head)
    fully_shard(model)
    try:
        linear_label_smoothing_cross_entropy(
            model(x), model.head.weight, target, EPS, process_group=dist.group.WORLD
        )
    except ValueError as error:
        return str(error)
    return "no error"


CASES = [
    (wrap, form) for wrap in ("fsdp", "fsdp_root_only", "ddp") for form in ("function", "module")
]
TASKS = {
    f"{wrap}-{form}": (lambda r, w, a=wrap, b=form: _train_step(a, b, r, w)) for wrap, form in CASES
}
TASKS["dtensor_with_group"] = _rejects_dtensor_with_process_group
group_results = GroupResults(__name__, {2: tuple(TASKS)}, "data_parallel")


def _one_process() -> dict:
    model, x, target = _model_and_batch()
    logits = F.linear(model(x), model.head.weight, model.head.bias)
    loss = F.cross_entropy(logits, target, label_smoothing=EPS)
    loss.backward()
    return {"loss": loss.detach(), "grads": {n: p.grad for n, p in model.named_parameters()}}


@pytest.mark.skipif(
    fully_shard is None, reason="torch.distributed.fsdp.fully_shard needs torch >= 2.6"
)
@pytest.mark.parametrize(("wrap", "form"), CASES)
def test_matches_one_process(wrap, form, tmp_path_factory):
    expected = _one_process()
    for rank, result in enumerate(group_results(2, tmp_path_factory)):
        got = result[f"{wrap}-{form}"]
        if wrap == "fsdp":  # the case this file is about: the weight is a shard here
            assert got["weight_type"] == "DTensor"
        torch.testing.assert_close(got["loss"], expected["loss"], rtol=1e-12, atol=1e-12)
        assert got["grads"].keys() == expected["grads"].keys()
        for name, grad in expected["grads"].items():
            torch.testing.assert_close(
                got["grads"][name], grad, rtol=1e-10, atol=1e-12, msg=f"rank {rank}: {name}"
            )


@pytest.mark.skipif(
    fully_shard is None, reason="torch.distributed.fsdp.fully_shard needs torch >= 2.6"
)
def test_dtensor_weight_with_process_group_raises(tmp_path_factory):
    for result in group_results(2, tmp_path_factory):
        assert "DTensors and process_group" in result["dtensor_with_group"]
