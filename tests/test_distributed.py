"""Vocabulary-parallel loss over real gloo process groups on the CPU.

Each test spawns one group of processes (world sizes 2 and 3, uneven class shards) that runs a
whole batch of cases; every rank writes its results to a file and the parent compares them with the
single-process result on the full logits and with the dense reference. Joins have timeouts, so a
hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from gloo_groups import GroupResults, record_collectives
from reference import assert_close, dense_loss, tolerances

import lsr_fused
from lsr_fused import label_smoothing_cross_entropy

REPO = Path(__file__).resolve().parent.parent
SPLITS = {2: (7, 4), 3: (5, 4, 2)}  # C = 11, uneven

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


# One spawned group per world size runs every task (process start-up dominates the cost).
GROUP_TASKS = {2: ("parity", "errors"), 3: ("parity",)}
group_results = GroupResults(__name__, GROUP_TASKS, "world")


# ------------------------------------------------------------------------------------------------
# Cases: built identically by the workers and the parent.
# ------------------------------------------------------------------------------------------------


def _parity_cases(world_size: int) -> list[dict]:
    split = SPLITS[world_size]
    cases = []
    combos = itertools.product(
        ("torch", "triton"),
        (torch.float32, torch.float64),
        ("all", "others"),
        (False, True),
        (0.0, 1e-2),
        ("none", "sum", "mean"),
    )
    for index, (backend, dtype, spread, weighted, z_loss, reduction) in enumerate(combos):
        if backend == "triton" and (index // 3 + index // 6) % 2:
            continue  # the interpreter is slow: Triton gets half, z_loss alternating
        cases.append(
            dict(
                backend=backend,
                dtype=dtype,
                spread=spread,
                weighted=weighted,
                z_loss=z_loss,
                reduction=reduction,
                split=split,
                layout=("rows", "spatial", "rows")[index % 3],
                ignore_index=3 if index % 5 == 0 else -100,
                eps=0.1 if index % 2 else 0.25,
            )
        )
    base = dict(
        dtype=torch.float32, spread="all", weighted=True, z_loss=1e-3, reduction="mean",
        split=split, layout="rows", ignore_index=-100, eps=0.1,
    )  # fmt: skip
    for backend in ("torch", "triton"):
        extra = [
            dict(layout="vector", reduction="none"),
            dict(layout="vector", reduction="mean", spread="others"),
            dict(layout="transposed"),
            dict(layout="spatial", inplace=True, reduction="none"),
            dict(layout="rows", inplace=True, weighted=False, spread="others"),
            dict(layout="rows", inplace=True, leaf_inplace=True),
            dict(dtype=torch.bfloat16, layout="spatial"),
            dict(dtype=torch.float16, reduction="sum"),
            # A row whose whole slice on some rank is -inf (masked classes), without smoothing.
            dict(layout="masked", eps=0.0, weighted=False, reduction="none"),
            dict(layout="masked", eps=0.0, z_loss=0.1, spread="others"),
        ]
        if world_size == 3:
            # C = 3 split 2/0/1: a rank holding no class at all.
            extra.append(dict(split=(2, 0, 1), spread="others"))
            extra.append(dict(split=(2, 0, 1), reduction="none", weighted=False))
        cases.extend({**base, "backend": backend, **case} for case in extra)
    for index, case in enumerate(cases):
        case["seed"] = 1000 * world_size + index
    return cases


def _case_tensors(case: dict):
    """Full logits, target, weight and upstream gradient of a case (same on every process)."""
    generator = torch.Generator().manual_seed(case["seed"])
    num_classes = sum(case["split"])
    layout = case["layout"]
    if layout == "vector":
        shape = (num_classes,)
    elif layout == "spatial":
        shape = (2, num_classes, 3)
    else:
        shape = (6, num_classes)
    logits = torch.randn(shape, generator=generator, dtype=torch.float64) * 3
    target_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    target = torch.randint(0, num_classes, target_shape, generator=generator)
    if target.numel() > 2:
        target.view(-1)[1::3] = case["ignore_index"]
    if layout == "masked":
        # Row 0: the classes of the last non-empty shard are all -inf; rows 2 and 4: a few -inf.
        first = sum(case["split"][:-1])
        logits[0, first:] = float("-inf")
        target[0] = 0
        logits[2, 1] = logits[4, num_classes - 2] = float("-inf")
        target[2], target[4] = 0, num_classes - 1
    logits = logits.to(case["dtype"])
    if layout == "transposed":
        logits = logits.t().contiguous().t()  # class dimension first in memory
    weight = None
    if case["weighted"]:
        weight = torch.rand(num_classes, generator=generator, dtype=torch.float64) + 0.25
        weight = weight.to(torch.float32)
    options = dict(
        ignore_index=case["ignore_index"],
        reduction=case["reduction"],
        weight=weight,
        spread=case["spread"],
        z_loss=case["z_loss"],
    )
    if case["reduction"] == "none":
        upstream = torch.randn(target_shape, generator=generator, dtype=torch.float64)
    else:
        upstream = torch.tensor(1.7, dtype=torch.float64)
    return logits, target, weight, options, upstream


def _shard(tensor: torch.Tensor, split, rank: int, dim: int) -> torch.Tensor:
    offset = sum(split[:rank])
    return tensor.narrow(dim, offset, split[rank])


# ------------------------------------------------------------------------------------------------
# Tasks run on every rank.
# ------------------------------------------------------------------------------------------------


def _parity_task(rank: int, world_size: int) -> list:
    sizes = record_collectives()
    results = []
    for case in _parity_cases(world_size):
        logits, target, weight, options, upstream = _case_tensors(case)
        class_dim = 0 if logits.dim() == 1 else 1
        if weight is not None:
            options["weight"] = _shard(weight, case["split"], rank, 0)
        shard = _shard(logits, case["split"], rank, class_dim)
        leaf = shard.detach().clone() if case["layout"] != "transposed" else shard.detach()
        leaf.requires_grad_()
        inputs = leaf if case.get("leaf_inplace") or not case.get("inplace") else leaf * 1
        seen = []
        if inputs is not leaf:
            inputs.register_hook(lambda g, seen=seen: seen.append(g.data_ptr()))
        sizes.clear()
        loss = label_smoothing_cross_entropy(
            inputs,
            target,
            case["eps"],
            backend=case["backend"],
            inplace_backward=bool(case.get("inplace")),
            process_group=dist.group.WORLD,
            **options,
        )
        forward_collectives = list(sizes)
        (grad,) = torch.autograd.grad(loss, leaf, upstream.to(loss.dtype))
        backward_collectives = len(sizes) - len(forward_collectives)
        if case.get("inplace") and not case.get("leaf_inplace"):
            assert seen == [inputs.data_ptr()], "inplace_backward did not reuse the storage"
        if case.get("leaf_inplace"):
            # Leaves get a fresh gradient; their values stay untouched.
            assert grad.data_ptr() != leaf.data_ptr() and torch.equal(leaf.detach(), shard)
        results.append(
            dict(
                loss=loss.detach(),
                grad=grad.detach(),
                grad_dtype=grad.dtype,
                forward_collectives=forward_collectives,
                backward_collectives=backward_collectives,
            )
        )
    return results


def _errors_task(rank: int, world_size: int) -> dict:
    """Bad sharding and bad arguments: every rank must raise, and the group must stay usable."""
    group = dist.group.WORLD
    outcomes = {}

    def attempt(name, logits, target, **options):
        try:
            loss = label_smoothing_cross_entropy(
                logits, target, 0.1, process_group=group, **options
            )
        except Exception as exc:
            # The built-in class it is (lsr_fused.errors' types derive from ValueError and
            # RuntimeError, so that either except clause catches them).
            builtin = next(c for c in type(exc).__mro__ if c.__module__ == "builtins")
            outcomes[name] = (builtin.__name__, str(exc))
        else:
            outcomes[name] = ("ok", float(loss))

    generator = torch.Generator().manual_seed(0)
    widths = (6, 5)
    target = torch.randint(0, 11, (4,), generator=generator)  # drawn first: same on every rank
    logits = torch.randn(4, widths[rank], generator=generator)
    attempt("rows", torch.randn(4 + rank, widths[rank]), torch.zeros(4 + rank, dtype=torch.long))
    shape = ((2, 3), (3, 2))[rank]  # same number of rows, different shapes
    attempt("shape", torch.randn(shape[0], widths[rank], shape[1]), torch.zeros(shape).long())
    attempt("spread", logits, target, spread=("all", "others")[rank])
    attempt("dtype", logits.to((torch.float32, torch.float64)[rank]), target)
    attempt("weight", logits, target, weight=torch.ones(widths[rank] + rank))
    attempt("weight_missing", logits, target, weight=torch.ones(widths[rank]) if rank else None)
    attempt("target_range", logits, torch.full((4,), 11))
    attempt("targets_differ", logits, (target + rank) % 11)
    attempt("target_shape", logits, target[: 4 - rank])
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(logits, torch.ones_like(logits))
        attempt("forward_ad", dual, target)
    attempt("valid", logits, target)  # the group still works after all of the above
    return outcomes


TASKS = {"parity": _parity_task, "errors": _errors_task}


# ------------------------------------------------------------------------------------------------
# Tests.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_matches_single_process(world_size, tmp_path_factory):
    cases = _parity_cases(world_size)
    per_rank = [results["parity"] for results in group_results(world_size, tmp_path_factory)]
    for index, case in enumerate(cases):
        what = f"case {index} {case}"
        logits, target, _, options, upstream = _case_tensors(case)
        class_dim = 0 if logits.dim() == 1 else 1
        full = logits.detach().clone().requires_grad_()
        # The single-device torch backend: the Triton one is checked against it elsewhere, and
        # the interpreter is slow.
        single = label_smoothing_cross_entropy(
            full, target, case["eps"], backend="torch", **options
        )
        (single_grad,) = torch.autograd.grad(single, full, upstream.to(single.dtype))
        dense_input = logits.detach().double().requires_grad_()
        dense = dense_loss(dense_input, target, case["eps"], **options)
        (dense_grad,) = torch.autograd.grad(dense, dense_input, upstream)

        loss_tol, grad_tol = tolerances(case["dtype"], "sharded")
        rows = max(1, target.numel())
        for rank, results in enumerate(per_rank):
            result = results[index]
            # Same loss on every rank, equal to the unsharded computation.
            assert result["loss"].dtype == single.dtype, what
            assert result["loss"].shape == single.shape, what
            assert_close(result["loss"], single.detach(), loss_tol, f"{what} rank {rank} loss")
            if case["layout"] != "masked":  # the dense reference makes 0 * -inf = NaN there
                assert_close(result["loss"], dense.detach(), loss_tol, f"{what} dense")
            assert result["grad_dtype"] == logits.dtype, what
            # O(N) statistics only: a description exchange, a MAX and a SUM; nothing backward.
            kinds = [kind for kind, _ in result["forward_collectives"]]
            assert kinds == ["all_gather", "all_reduce", "all_reduce"], (what, kinds)
            assert max(n for _, n in result["forward_collectives"]) <= max(4 * rows + 1, 32)
            assert result["backward_collectives"] == 0, what
        grad = torch.cat([results[index]["grad"] for results in per_rank], dim=class_dim)
        assert_close(grad, single_grad, grad_tol, f"{what} gradient vs single process")
        if case["layout"] != "masked":
            assert_close(grad, dense_grad, grad_tol, f"{what} gradient vs dense reference")


def test_bad_sharding_raises_on_every_rank(tmp_path_factory):
    outcomes = [results["errors"] for results in group_results(2, tmp_path_factory)]
    expected = {
        "rows": "number of rows",
        "shape": "target shape",
        "spread": "spread",
        "dtype": "dtype",
        "weight_missing": "whether weight is given",
        "target_range": "target contains 11",
        "targets_differ": "different targets",
        "target_shape": "rejected their arguments",
        "forward_ad": "forward-mode AD",
    }
    for name, fragment in expected.items():
        for rank, outcome in enumerate(outcomes):
            kind, message = outcome[name]
            if name == "target_shape" and rank == 1:
                fragment_here = "does not match"  # the rank with the bad argument says why
            else:
                fragment_here = fragment
            assert kind == "ValueError", (name, rank, outcome[name])
            assert fragment_here in message, (name, rank, message)
    # Rank 1 passed a weight of the wrong width: it explains, rank 0 points at rank 1.
    assert outcomes[1]["weight"][0] == "ValueError"
    assert "this rank's slice" in outcomes[1]["weight"][1]
    assert outcomes[0]["weight"] == ("ValueError", outcomes[0]["weight"][1])
    assert "rank(s) [1]" in outcomes[0]["weight"][1]
    # Messages raised through the exchange are the same on every rank.
    for name in ("rows", "spread", "dtype", "target_range", "targets_differ"):
        assert outcomes[0][name] == outcomes[1][name], name
    assert outcomes[0]["valid"][0] == outcomes[1]["valid"][0] == "ok"
    assert outcomes[0]["valid"] == outcomes[1]["valid"]


def test_needs_initialised_distributed():
    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    with pytest.raises(RuntimeError, match="not initialised"):
        label_smoothing_cross_entropy(
            torch.randn(2, 3), torch.tensor([0, 1]), process_group=object()
        )


@pytest.mark.skipif(
    not hasattr(lsr_fused, "WarmupScheduler"), reason="lsr_fused.scheduler not available"
)
def test_train_ddp_example_runs_with_torchrun():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    env.pop("TRITON_INTERPRET", None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(REPO / "examples" / "train_ddp.py"), "--steps", "30", "--loss-backend", "torch",
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "final accuracy" in proc.stdout, proc.stdout[-3000:]
