#!/usr/bin/env python
"""Per-call cost: a training step of the loss against eager ``F.cross_entropy`` at small shapes.

At the batch sizes of image classification (CIFAR: 10 classes; ImageNet: 1000, a few hundred rows
per device) a step costs tens of microseconds, and what decides is the work around the kernels
(argument checks, dispatch, autograd nodes), not the kernels. This scenario times one training
step (forward with grad, ``backward()``), label smoothing 0.1, mean, default backend, ours and
eager's interleaved in one process (so that both see the same machine load), best of 7 rounds,
and reports ``eager / ours`` (above 1.0: ours is cheaper). ``python benchmarks/bench_call.py``;
``bench_loss.py`` runs it too, after its tables.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import lsr_fused

SHAPES = ((8, 10), (256, 10), (256, 1000), (4096, 1000))


def _step_time(loss_fn, logits: torch.Tensor, target: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        leaf = logits.detach().requires_grad_()
        loss_fn(leaf, target).backward()
    return (time.perf_counter() - start) / calls


def per_call_rows(shapes=SHAPES, rounds: int = 7, budget_s: float = 0.05) -> list[dict]:
    """One row per shape: best-of-``rounds`` step times (seconds) of ours and eager, interleaved
    round by round; each round runs about ``budget_s`` of calls of each."""

    def ours(x, t):
        return lsr_fused.label_smoothing_cross_entropy(x, t, 0.1)

    def eager(x, t):
        return F.cross_entropy(x, t, label_smoothing=0.1)

    rows = []
    for num_rows, num_classes in shapes:
        generator = torch.Generator().manual_seed(0)
        logits = torch.randn(num_rows, num_classes, generator=generator)
        target = torch.randint(0, num_classes, (num_rows,), generator=generator)
        warm = _step_time(eager, logits, target, 3) + _step_time(ours, logits, target, 3)
        calls = max(3, int(budget_s / max(warm / 2, 1e-6)))
        best = {"ours": float("inf"), "eager": float("inf")}
        for _ in range(rounds):
            for name, fn in (("ours", ours), ("eager", eager)):
                best[name] = min(best[name], _step_time(fn, logits, target, calls))
        rows.append(dict(shape=f"{num_rows}x{num_classes}", **best))
    return rows


def format_rows(rows: list[dict], rounds: int = 7) -> str:
    lines = [
        "per-call cost, training step (fwd + backward), eps 0.1, mean, default backend, "
        f"best of {rounds}, interleaved, {torch.get_num_threads()} thread(s)",
        f"{'N x C':>12} {'ours us':>9} {'eager us':>9} {'eager/ours':>11}",
    ]
    for row in rows:
        ratio = row["eager"] / row["ours"]
        lines.append(
            f"{row['shape']:>12} {row['ours'] * 1e6:9.0f} {row['eager'] * 1e6:9.0f} {ratio:10.2f}x"
        )
    lines.append("eager/ours > 1: the fused loss costs less per call than eager F.cross_entropy")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch.set_num_threads (default 1: the per-call work is serial, and on a shared "
        "machine an oversubscribed thread pool turns microseconds into milliseconds)",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=7,
        help="interleaved rounds, the best of which is kept (more: steadier on a loaded machine)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(format_rows(per_call_rows(rounds=args.rounds), args.rounds))


if __name__ == "__main__":
    main()
