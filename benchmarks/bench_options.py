#!/usr/bin/env python
"""What an option costs: a training step with statistics, mixed targets or softcap, against the
same step without them, interleaved in one process.

Statistics (``return_stats=True``: the log-sum-exp and arg-max of every row) and mixed targets
(``mix_target=``, ``mix_lambda=``: a second target logit and gradient spike per row) add no pass
over the logits, so they should cost at most 10% of the step; softcap adds a ``tanh`` per element
in each pass, at most 25%. One training step (forward with grad, ``backward()``), label smoothing
0.1, mean, the default backend; every variant is timed round-robin (each sees the same machine
load), ``rounds`` times, and the median of each is reported with its ratio to the plain step.
``python benchmarks/bench_options.py``; ``bench_loss.py`` runs it after its tables.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lsr_fused

# At most this ratio to the plain step, per variant (issue 22).
TARGETS = {"return_stats": 1.10, "mix (float lam)": 1.10, "mix (tensor lam)": 1.10,
           "softcap": 1.25}  # fmt: skip


def _variants(num_rows: int, num_classes: int, device: torch.device, generator):
    mix_target = torch.randint(0, num_classes, (num_rows,), generator=generator).to(device)
    lam = torch.rand(num_rows, generator=generator).to(device)
    return {
        "plain": {},
        "return_stats": {"return_stats": True},
        "mix (float lam)": {"mix_target": mix_target, "mix_lambda": 0.3},
        "mix (tensor lam)": {"mix_target": mix_target, "mix_lambda": lam},
        "softcap": {"softcap": 30.0},
    }


def _step(logits: torch.Tensor, target: torch.Tensor, options: dict) -> None:
    leaf = logits.detach().requires_grad_()
    out = lsr_fused.label_smoothing_cross_entropy(leaf, target, 0.1, **options)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()


def _time(fn, calls: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls


def option_rows(shape=(2048, 32000), dtype=torch.float32, device=None, rounds: int = 7,
                calls: int = 2) -> list[dict]:  # fmt: skip
    """One row per variant: the median step time (seconds) over ``rounds`` interleaved rounds
    of ``calls`` steps each, and its ratio to the plain step."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    generator = torch.Generator().manual_seed(0)
    num_rows, num_classes = shape
    logits = (torch.randn(num_rows, num_classes, generator=generator) * 3).to(device, dtype)
    target = torch.randint(0, num_classes, (num_rows,), generator=generator).to(device)
    variants = _variants(num_rows, num_classes, device, generator)
    times = {name: [] for name in variants}
    for options in variants.values():
        _step(logits, target, options)  # warm-up (and compilation on CUDA)
    for _ in range(rounds):
        for name, options in variants.items():
            times[name].append(_time(lambda o=options: _step(logits, target, o), calls, device))
    plain = statistics.median(times["plain"])
    rows = []
    for name, samples in times.items():
        median = statistics.median(samples)
        rows.append(dict(variant=name, median_s=median, ratio=median / plain,
                         target=TARGETS.get(name)))  # fmt: skip
    return rows


def format_rows(rows: list[dict], shape, dtype, rounds: int) -> str:
    lines = [
        f"option cost, training step (fwd + backward), {shape[0]}x{shape[1]} "
        f"{str(dtype).replace('torch.', '')}, eps 0.1, mean, default backend, median of "
        f"{rounds} interleaved rounds, {torch.get_num_threads()} thread(s)",
        f"{'variant':>18} {'ms':>9} {'/ plain':>8} {'target':>8}",
    ]
    for row in rows:
        target = row["target"]
        verdict = "" if target is None else ("  met" if row["ratio"] <= target else "  MISSED")
        shown = "" if target is None else f"<= {target:.2f}"
        lines.append(
            f"{row['variant']:>18} {row['median_s'] * 1e3:9.1f} {row['ratio']:7.2f}x "
            f"{shown:>8}{verdict}"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="2048x32000", help="N x C (default 2048x32000)")
    parser.add_argument("--dtype", default="float32", help="logits dtype (default float32)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.lower().split("x"))
    dtype = getattr(torch, args.dtype)
    rows = option_rows(shape, dtype, args.device, args.rounds)
    print(format_rows(rows, shape, dtype, args.rounds))


if __name__ == "__main__":
    main()
