"""The fused classifier + loss with the classes sharded over real gloo process groups (CPU).

One spawned group per world size (2 and 3 ranks, uneven shards, a rank with 1 or 0 classes) runs a
batch of cases; each rank writes its losses, gradients and the sizes of every collective it issued
to a file, and the parent compares them with the single-process fused loss on the whole head and
with the dense float64 reference. Ranks that disagree must raise on every rank; joins and the
process group have timeouts, so a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from gloo_groups import GroupResults, record_collectives
from reference import dense_loss

from lsr_fused import LinearLabelSmoothingCE, linear_label_smoothing_cross_entropy

FEATURES = 5
# (world size) -> class split; C = 10 and 11; a rank with 2 and one with 1 class.
SPLITS = {2: (8, 2), 3: (6, 1, 4)}
# Triton's interpreter on CPU tensors (set by conftest.py when there is no GPU; inherited by the
# spawned ranks).
HAS_TRITON = importlib.util.find_spec("triton") is not None and os.environ.get(
    "TRITON_INTERPRET"
) in ("1", "true", "on", "yes")

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


# One spawned group per world size runs every task (process start-up dominates the cost).
GROUP_TASKS = {2: ("parity", "errors"), 3: ("parity",)}
group_results = GroupResults(__name__, GROUP_TASKS, "linear_world")


# ------------------------------------------------------------------------------------------------
# Cases: built identically by the workers and the parent.
# ------------------------------------------------------------------------------------------------


def _parity_cases(world_size: int) -> list[dict]:
    split = SPLITS[world_size]
    cases = []
    combos = itertools.product(("all", "others"), ("none", "sum", "mean"), (False, True))
    for index, (spread, reduction, weighted) in enumerate(combos):
        cases.append(
            dict(
                spread=spread,
                reduction=reduction,
                weighted=weighted,
                z_loss=(0.0, 1e-2)[index % 2],
                ignore_index=(-100, 3)[index % 3 == 0],
                chunk_size=(None, 1, 4, 3)[index % 4],
                bias=index % 5 != 1,
                eps=(0.1, 0.3)[index % 2],
                shape=((7,), (2, 3))[index % 2],
            )
        )
    base = dict(
        spread="others", reduction="mean", weighted=True, z_loss=1e-3, ignore_index=-100,
        chunk_size=3, bias=True, eps=0.2, shape=(6,),
    )  # fmt: skip
    extra = [
        dict(reduce_hidden_grad=False),
        dict(reduce_hidden_grad=False, reduction="none", spread="all"),
        dict(dtype=torch.float32, reduction="sum"),
        dict(dtype=torch.bfloat16, chunk_size=None),
        dict(dtype=torch.bfloat16, reduction="none", reduce_hidden_grad=False),
        dict(needs=(False, True, True)),  # hidden needs no gradient
        dict(needs=(True, False, False), reduction="none"),
        dict(needs=(False, False, False)),  # forward only
        dict(no_grad=True, reduction="none"),
        dict(module=True),
        dict(all_ignored=True, reduction="mean"),
        dict(all_ignored=True, reduction="sum", weighted=False),
        dict(shape=(0,), reduction="mean"),
        dict(retain_graph=True, reduction="sum"),
        dict(autocast=True, dtype=torch.float32, reduction="mean", weighted=False),
    ]
    if world_size == 3:
        extra += [
            dict(split=(2, 0, 1)),  # a rank with no class at all
            dict(split=(2, 0, 1), reduction="none", weighted=False),
        ]
    if HAS_TRITON:  # the interpreter is slow: two tiny cases
        extra += [dict(backend="triton", shape=(3,)), dict(backend="triton", reduction="none")]
    cases += [{**base, **case} for case in extra]
    for index, case in enumerate(cases):
        case.setdefault("split", split)
        case["seed"] = 100 * world_size + index
    return cases


def _case_tensors(case: dict):
    """Full hidden, weight, bias, class weights, target and upstream of a case (float64)."""
    generator = torch.Generator().manual_seed(case["seed"])
    num_classes = sum(case["split"])
    shape = case["shape"]
    hidden = torch.randn(*shape, FEATURES, generator=generator, dtype=torch.float64)
    weight = torch.randn(num_classes, FEATURES, generator=generator, dtype=torch.float64)
    bias = torch.randn(num_classes, generator=generator, dtype=torch.float64) * 0.3
    class_weight = torch.rand(num_classes, generator=generator, dtype=torch.float64) + 0.25
    target = torch.randint(0, num_classes, shape, generator=generator)
    if target.numel() > 2:
        target.view(-1)[1::3] = case["ignore_index"]
    if case.get("all_ignored"):
        target.fill_(case["ignore_index"])
    if case["reduction"] == "none":
        upstream = torch.randn(shape, generator=generator, dtype=torch.float64)
    else:
        upstream = torch.tensor(1.7, dtype=torch.float64)
    dtype = case.get("dtype", torch.float64)
    hidden, weight, bias = (t.to(dtype) for t in (hidden, weight, bias))
    return hidden, weight, bias if case["bias"] else None, class_weight, target, upstream


def _options(case: dict, class_weight) -> dict:
    return dict(
        ignore_index=case["ignore_index"],
        reduction=case["reduction"],
        class_weight=class_weight if case["weighted"] else None,
        spread=case["spread"],
        z_loss=case["z_loss"],
        chunk_size=case["chunk_size"],
    )


def _slice(tensor, split, rank):
    offset = sum(split[:rank])
    return None if tensor is None else tensor[offset : offset + split[rank]]


# ------------------------------------------------------------------------------------------------
# Tasks run on every rank.
# ------------------------------------------------------------------------------------------------


def _parity_task(rank: int, world_size: int) -> list:
    sizes = record_collectives()
    results = []
    for case in _parity_cases(world_size):
        hidden, weight, bias, class_weight, target, upstream = _case_tensors(case)
        split = case["split"]
        options = _options(case, _slice(class_weight, split, rank))
        leaves = [hidden.clone(), _slice(weight, split, rank).clone(), _slice(bias, split, rank)]
        leaves[2] = None if leaves[2] is None else leaves[2].clone()
        needs = case.get("needs", (True, True, True))
        for leaf, need in zip(leaves, needs, strict=True):
            if leaf is not None:
                leaf.requires_grad_(need)
        common = dict(backend=case.get("backend", "auto"), process_group=dist.group.WORLD)
        common["reduce_hidden_grad"] = case.get("reduce_hidden_grad", True)
        sizes.clear()
        autocast = bool(case.get("autocast"))
        with (
            torch.set_grad_enabled(not case.get("no_grad")),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
        ):
            if case.get("module"):
                criterion = LinearLabelSmoothingCE(case["eps"], **options, **common)
                loss = criterion(leaves[0], leaves[1], target, bias=leaves[2])
            else:
                loss = linear_label_smoothing_cross_entropy(
                    leaves[0], leaves[1], target, case["eps"], bias=leaves[2], **options, **common
                )
        forward_collectives = list(sizes)
        wanted = [leaf for leaf in leaves if leaf is not None and leaf.requires_grad]
        grads = {}
        if wanted and loss.requires_grad:
            keep = bool(case.get("retain_graph"))
            got = torch.autograd.grad(loss, wanted, upstream.to(loss.dtype), retain_graph=keep)
            if keep:  # a second backward recomputes the same gradients
                again = torch.autograd.grad(loss, wanted, upstream.to(loss.dtype))
                for first, second in zip(got, again, strict=True):
                    assert torch.allclose(first, second, rtol=1e-12, atol=1e-14)
            names = [n for n, leaf in zip(("hidden", "weight", "bias"), leaves, strict=True)
                     if leaf is not None and leaf.requires_grad]  # fmt: skip
            grads = {name: (g.detach(), g.dtype) for name, g in zip(names, got, strict=True)}
        results.append(
            dict(
                loss=loss.detach(),
                grads=grads,
                forward_collectives=forward_collectives,
                backward_collectives=sizes[len(forward_collectives) :],
            )
        )
    return results


def _errors_task(rank: int, world_size: int) -> dict:
    """Ranks that disagree, or one bad argument: every rank raises; the group stays usable."""
    group = dist.group.WORLD
    outcomes = {}
    split = SPLITS[2]
    num_classes = sum(split)

    def attempt(name, hidden, weight, target, **options):
        try:
            loss = linear_label_smoothing_cross_entropy(
                hidden, weight, target, 0.1, process_group=group, **options
            )
            if loss.requires_grad:
                loss.backward()
        except Exception as exc:
            # The built-in class it is (lsr_fused.errors' types derive from ValueError and
            # RuntimeError, so that either except clause catches them).
            builtin = next(c for c in type(exc).__mro__ if c.__module__ == "builtins")
            outcomes[name] = (builtin.__name__, str(exc))
        else:
            outcomes[name] = ("ok", float(loss))

    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, num_classes, (4,), generator=generator)
    hidden = torch.randn(4, FEATURES, generator=generator)
    weight = torch.randn(split[rank], FEATURES, generator=generator)  # last: differs by rank

    def fresh():
        return hidden.clone().requires_grad_(), weight.clone().requires_grad_()

    attempt("features", torch.randn(4, FEATURES + rank), torch.randn(split[rank], FEATURES + rank),
            target)  # fmt: skip
    attempt("rows", torch.randn(4 + rank, FEATURES), weight, torch.zeros(4 + rank).long())
    attempt("target_shape", hidden.view(2, 2, FEATURES) if rank else hidden, weight,
            target.view(2, 2) if rank else target)  # fmt: skip
    attempt("spread", *fresh(), target, spread=("all", "others")[rank])
    attempt("chunk_size", *fresh(), target, chunk_size=(2, None)[rank])
    attempt("reduce_hidden_grad", *fresh(), target, reduce_hidden_grad=bool(rank))
    attempt("hidden_grad", hidden.clone().requires_grad_(bool(rank)), weight, target)
    attempt("dtype", *(t.to((torch.float32, torch.float64)[rank]) for t in fresh()), target)
    attempt("bias_missing", *fresh(), target, bias=torch.zeros(split[rank]) if rank else None)
    attempt("class_weight_missing", *fresh(), target,
            class_weight=torch.ones(split[rank]) if rank else None)  # fmt: skip
    attempt("bias_shape", *fresh(), target, bias=torch.zeros(split[rank] + rank))
    attempt("options", *fresh(), target, reduction=("mean", "bogus")[rank])
    attempt("target_one_rank", *fresh(), torch.where(torch.arange(4) == rank, num_classes, target))
    attempt("target_range", *fresh(), torch.full((4,), num_classes))
    attempt("targets_differ", *fresh(), (target + rank) % num_classes)
    attempt("valid", *fresh(), target)  # the group still works after all of the above
    return outcomes


TASKS = {"parity": _parity_task, "errors": _errors_task}


# ------------------------------------------------------------------------------------------------
# Tests.
# ------------------------------------------------------------------------------------------------


def _single_process(case, hidden, weight, bias, class_weight, target, upstream):
    """(loss, grads) of the unsharded fused loss (in the case's dtype) and of the dense float64
    reference (hidden, weight, bias: the gradients asked for)."""
    needs = case.get("needs", (True, True, True))
    options = _options(case, class_weight)
    results = []
    for dense in (False, True):
        leaves = [t if t is None else t.detach().clone() for t in (hidden, weight, bias)]
        if dense:
            leaves = [t if t is None else t.double() for t in leaves]
        for leaf, need in zip(leaves, needs, strict=True):
            if leaf is not None:
                leaf.requires_grad_(need)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(case.get("autocast"))):
            if dense:
                # Under autocast the sharded loss multiplies bf16-rounded inputs: so does this.
                h, w, b = (
                    t if t is None else (t.to(torch.bfloat16).double() if case.get("autocast")
                                         else t)
                    for t in leaves
                )  # fmt: skip
                logits = F.linear(h, w, b).reshape(-1, w.shape[0])
                dense_options = dict(options, weight=options.pop("class_weight"))
                dense_options.pop("chunk_size")
                loss = dense_loss(logits, target.reshape(-1), case["eps"], **dense_options)
                if case["reduction"] == "none":
                    loss = loss.reshape(target.shape)
            else:
                loss = linear_label_smoothing_cross_entropy(
                    leaves[0], leaves[1], target, case["eps"], bias=leaves[2], **options
                )
        grads = {}
        wanted = [leaf for leaf in leaves if leaf is not None and leaf.requires_grad]
        if wanted and not case.get("no_grad"):
            got = torch.autograd.grad(loss, wanted, upstream.to(loss.dtype))
            names = [n for n, leaf in zip(("hidden", "weight", "bias"), leaves, strict=True)
                     if leaf is not None and leaf.requires_grad]  # fmt: skip
            grads = dict(zip(names, got, strict=True))
        results.append((loss.detach(), grads))
    return results


def _tolerance(case):
    dtype = case.get("dtype", torch.float64)
    if case.get("autocast") or dtype == torch.bfloat16:
        return 2e-2
    return 1e-10 if dtype == torch.float64 else 2e-5


def _close(ours, ref, tol, what):
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    scale = max(ref.abs().nan_to_num(0.0, 0.0, 0.0).max().item() if ref.numel() else 1.0, 1.0)
    torch.testing.assert_close(
        ours.double(), ref.double(), atol=tol * scale, rtol=tol, equal_nan=True,
        msg=lambda message: f"{what}: {message}",
    )  # fmt: skip


def _expected_collectives(case, rows):
    """(forward, backward) collectives of a call: the agreement all-gather, W and the mean's
    denominator with class weights, a MAX and a SUM of O(chunk) statistics per chunk, and the SUM
    of hidden's gradient where it is computed (forward for sum/mean, backward for none)."""
    chunk = case["chunk_size"] or rows
    forward = [("all_gather", None)]
    if case["weighted"] and rows:
        forward.append(("all_reduce", 2))
    for start in range(0, rows, chunk):
        n = min(rows, start + chunk) - start
        forward += [("all_reduce", n), ("all_reduce", 4 * n)]
    needs = case.get("needs", (True, True, True))
    present = (True, True, case["bias"])
    training = not case.get("no_grad") and any(n and p for n, p in zip(needs, present, strict=True))
    hidden_sum = [("all_reduce", rows * FEATURES)] if rows else []
    backward = []
    if needs[0] and training and case.get("reduce_hidden_grad", True):
        if case["reduction"] == "none":
            backward = hidden_sum * (2 if case.get("retain_graph") else 1)
        else:
            forward += hidden_sum
            if case.get("retain_graph"):
                backward = hidden_sum  # the second backward recomputes
    return forward, backward


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_head_matches_single_process(world_size, tmp_path_factory):
    cases = _parity_cases(world_size)
    per_rank = [results["parity"] for results in group_results(world_size, tmp_path_factory)]
    for index, case in enumerate(cases):
        what = f"case {index} {case}"
        hidden, weight, bias, class_weight, target, upstream = _case_tensors(case)
        (single, single_grads), (dense, dense_grads) = _single_process(
            case, hidden, weight, bias, class_weight, target, upstream
        )
        tol = _tolerance(case)
        rows = target.numel()
        for rank, results in enumerate(per_rank):
            result = results[index]
            assert result["loss"].dtype == single.dtype, what
            _close(result["loss"], single, tol, f"{what} rank {rank} loss vs single process")
            _close(result["loss"], dense, tol, f"{what} rank {rank} loss vs dense")
            assert set(result["grads"]) == set(single_grads), what
            for name, (_, dtype) in result["grads"].items():
                expected = {"hidden": hidden, "weight": weight, "bias": bias}[name].dtype
                assert dtype == expected, (what, name, dtype)
            # Only O(N) statistics cross the network: never a logits- or weight-sized tensor.
            forward, backward = _expected_collectives(case, rows)
            got = [(kind, None if kind == "all_gather" else n)
                   for kind, n in result["forward_collectives"]]  # fmt: skip
            assert got == forward, (what, rank, result["forward_collectives"])
            assert result["backward_collectives"] == backward, (what, rank)
        for name in single_grads:
            if name == "hidden":
                parts = [results[index]["grads"]["hidden"][0] for results in per_rank]
                if case.get("reduce_hidden_grad", True):
                    for part in parts[1:]:  # reduced inside the op: the same on every rank
                        assert torch.equal(part, parts[0]), what
                    grad = parts[0]
                else:  # each rank's contribution; their sum is the true gradient
                    grad = torch.stack([p.double() for p in parts]).sum(0)
            else:
                grad = torch.cat([results[index]["grads"][name][0] for results in per_rank])
            _close(grad, single_grads[name], tol, f"{what} {name} grad vs single process")
            _close(grad, dense_grads[name], tol, f"{what} {name} grad vs dense")
        if case.get("reduce_hidden_grad", True) is False and "hidden" in single_grads:
            # The contributions are genuinely partial: G_k W_k of each rank's classes.
            full = [results[index]["grads"]["hidden"][0] for results in per_rank]
            assert not torch.allclose(full[0].double(), single_grads["hidden"].double()), what


def test_disagreeing_ranks_raise_on_every_rank(tmp_path_factory):
    outcomes = [results["errors"] for results in group_results(2, tmp_path_factory)]
    expected = {
        "features": "number of features",
        "rows": "number of rows",
        "target_shape": "number of hidden dimensions",
        "spread": "spread",
        "chunk_size": "chunk_size",
        "reduce_hidden_grad": "reduce_hidden_grad",
        "hidden_grad": "hidden requires a gradient",
        "dtype": "dtype of hidden and weight",
        "bias_missing": "whether bias is given",
        "class_weight_missing": "whether class_weight is given",
        "target_one_rank": "different targets",
        "target_range": "target contains 10",
        "targets_differ": "different targets",
    }
    for name, fragment in expected.items():
        for rank, outcome in enumerate(outcomes):
            kind, message = outcome[name]
            assert kind == "ValueError", (name, rank, outcome[name])
            assert fragment in message, (name, rank, message)
            assert "sharded linear_label_smoothing_cross_entropy" in message, message
        assert outcomes[0][name] == outcomes[1][name], name  # the same message everywhere
    # One rank's bad argument: that rank says why, the other points at it.
    assert outcomes[1]["bias_shape"][0] == "ValueError"
    assert "bias must have shape (2,)" in outcomes[1]["bias_shape"][1]
    assert outcomes[0]["bias_shape"][0] == "ValueError"
    assert "rank(s) [1]" in outcomes[0]["bias_shape"][1]
    assert "reduction must be one of" in outcomes[1]["options"][1]
    assert "rank(s) [1]" in outcomes[0]["options"][1]
    assert outcomes[0]["valid"][0] == outcomes[1]["valid"][0] == "ok"
    assert outcomes[0]["valid"] == outcomes[1]["valid"]


def test_needs_initialised_distributed():
    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    with pytest.raises(RuntimeError, match="not initialised"):
        linear_label_smoothing_cross_entropy(
            torch.randn(2, 3), torch.randn(4, 3), torch.tensor([0, 1]), process_group=object()
        )


def test_reduce_hidden_grad_without_group_is_the_full_gradient():
    hidden = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 7, (5,))
    grads = []
    for flag in (True, False):
        loss = linear_label_smoothing_cross_entropy(hidden, weight, target, reduce_hidden_grad=flag)
        grads.append(torch.autograd.grad(loss, (hidden, weight)))
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(TypeError, match="reduce_hidden_grad must be a bool"):
        linear_label_smoothing_cross_entropy(hidden, weight, target, reduce_hidden_grad=1)
    with pytest.raises(TypeError, match="reduce_hidden_grad must be a bool"):
        LinearLabelSmoothingCE(reduce_hidden_grad="no")


def test_tp_lm_head_example_runs_with_torchrun():
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    env.pop("TRITON_INTERPRET", None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(repo / "examples" / "tp_lm_head.py"), "--tokens", "300", "--vocab", "1001",
        "--hidden", "16", "--chunk-size", "64",
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("the three agree") == 2, proc.stdout[-3000:]
    assert "classes [501, 1001) of 1001" in proc.stdout, proc.stdout[-3000:]
