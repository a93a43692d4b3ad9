"""One rank's bad argument, with ``process_group=``: every rank raises a clear error, at once
(issue 19 item 7).

A value that passes a type check but cannot be packed into the agreement exchange
(``ignore_index=2**70``, an integer ``label_smoothing`` too large for a float,
``chunk_size=2**70``), or any other bad argument, on one rank only, must not make that rank raise
before the exchange while the others wait in it for the group's timeout. Each attempt runs on a
fresh group whose timeout is ``SHORT_TIMEOUT_S``: a regression shows up as a gloo timeout error (a
RuntimeError) within seconds, which fails the test, instead of a hang.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from gloo_groups import GroupResults

from lsr_fused import label_smoothing_cross_entropy, linear_label_smoothing_cross_entropy

SHORT_TIMEOUT_S = 10
FEATURES = 4
ROWS = 4

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

# (name, entry point, the rank that passes the bad value per world size, the bad options, the
# argument its error must name). Every other rank passes valid arguments.
HUGE_INT = 2**1100  # an int: passes the type check, but float() overflows
ATTEMPTS = [
    ("ignore_index_2**70", "loss", {2: 1, 3: 1}, dict(ignore_index=2**70), "ignore_index"),
    ("ignore_index_below_int64", "loss", {2: 0, 3: 2}, dict(ignore_index=-(2**63) - 1),
     "ignore_index"),
    ("label_smoothing_nan", "loss", {2: 1, 3: 0}, dict(label_smoothing=float("nan")),
     "label_smoothing"),
    ("label_smoothing_inf", "loss", {2: 0, 3: 1}, dict(label_smoothing=float("inf")),
     "label_smoothing"),
    ("label_smoothing_huge_int", "loss", {2: 0, 3: 1}, dict(label_smoothing=HUGE_INT),
     "label_smoothing"),
    ("z_loss_huge_int", "loss", {2: 1, 3: 2}, dict(z_loss=HUGE_INT), "z_loss"),
    ("weight_not_float", "loss", {2: 1, 3: 1}, dict(weight="int"), "weight"),
    ("head_chunk_size_2**70", "head", {2: 1, 3: 2}, dict(chunk_size=2**70), "chunk_size"),
    ("head_chunk_size_float", "head", {2: 0, 3: 1}, dict(chunk_size=2.5), "chunk_size"),
    ("head_ignore_index_2**70", "head", {2: 0, 3: 1}, dict(ignore_index=2**70), "ignore_index"),
    ("head_label_smoothing_nan", "head", {2: 1, 3: 0}, dict(label_smoothing=float("nan")),
     "label_smoothing"),
    ("head_z_loss_huge_int", "head", {2: 1, 3: 1}, dict(z_loss=HUGE_INT), "z_loss"),
    ("head_reduce_hidden_grad", "head", {2: 1, 3: 2}, dict(reduce_hidden_grad="yes"),
     "reduce_hidden_grad"),
]  # fmt: skip


def _widths(world_size: int) -> tuple[int, ...]:
    return (3, 2) if world_size == 2 else (3, 0, 2)


def _call(kind: str, rank: int, world_size: int, group, options: dict):
    """One call of ``kind`` (the loss, or the fused head) on this rank's shard."""
    generator = torch.Generator().manual_seed(0)
    widths = _widths(world_size)
    target = torch.randint(0, sum(widths), (ROWS,), generator=generator)
    options = dict(options)
    label_smoothing = options.pop("label_smoothing", 0.1)
    if kind == "loss":
        logits = torch.randn(ROWS, widths[rank], generator=generator, requires_grad=True)
        if options.get("weight") == "int":
            options["weight"] = torch.ones(widths[rank], dtype=torch.int64)
        loss = label_smoothing_cross_entropy(
            logits, target, label_smoothing, process_group=group, **options
        )
    else:
        hidden = torch.randn(ROWS, FEATURES, generator=generator, requires_grad=True)
        weight = torch.randn(widths[rank], FEATURES, generator=generator, requires_grad=True)
        loss = linear_label_smoothing_cross_entropy(
            hidden, weight, target, label_smoothing, process_group=group, **options
        )
    loss.backward()
    return float(loss)


def _arguments_task(rank: int, world_size: int) -> dict:
    """Every attempt on a fresh short-timeout group; then a valid call on each entry point."""
    # Made up front, while the ranks are in step: a hang in one attempt then costs that attempt's
    # timeout, and shows as that attempt's error, instead of breaking the next group's set-up.
    groups = [
        dist.new_group(list(range(world_size)), timeout=timedelta(seconds=SHORT_TIMEOUT_S))
        for _ in range(len(ATTEMPTS) + 1)
    ]
    outcomes = {}
    for group, (name, kind, bad_rank, bad_options, _) in zip(groups, ATTEMPTS, strict=False):
        options = bad_options if rank == bad_rank[world_size] else {}
        started = time.monotonic()
        try:
            outcome = ("ok", _call(kind, rank, world_size, group, options))
        except Exception as exc:
            # The built-in class (lsr_fused.errors' types also derive from RuntimeError).
            builtin = next(c for c in type(exc).__mro__ if c.__module__ == "builtins")
            outcome = (builtin.__name__, str(exc))
        outcomes[name] = (*outcome, time.monotonic() - started)
    for kind in ("loss", "head"):
        outcomes[f"valid_{kind}"] = ("ok", _call(kind, rank, world_size, groups[-1], {}), 0.0)
    return outcomes


TASKS = {"arguments": _arguments_task}
group_results = GroupResults(__name__, {2: ("arguments",), 3: ("arguments",)}, "arguments")


@pytest.mark.parametrize("world_size", [2, 3])
def test_one_rank_bad_argument_raises_on_every_rank(world_size, tmp_path_factory):
    per_rank = [results["arguments"] for results in group_results(world_size, tmp_path_factory)]
    problems = []
    for name, _, bad_rank, _, argument in ATTEMPTS:
        bad = bad_rank[world_size]
        for rank, outcomes in enumerate(per_rank):
            kind, message, elapsed = outcomes[name]
            where = f"{name}, rank {rank} (bad rank {bad}): {kind}: {message[:300]}"
            if rank == bad:
                # The rank with the bad value says which argument and why.
                if kind not in ("ValueError", "TypeError") or argument not in message:
                    problems.append(where)
            elif kind != "ValueError" or f"rank(s) [{bad}]" not in message:
                problems.append(where)  # every other rank points at it, instead of hanging
            if elapsed >= SHORT_TIMEOUT_S:
                problems.append(f"{where} (took {elapsed:.1f}s: waited for the timeout)")
    assert not problems, "\n".join(problems)
    values = {(outcomes["valid_loss"][1], outcomes["valid_head"][1]) for outcomes in per_rank}
    assert len(values) == 1, values  # the group still works, the same loss on every rank
