#!/usr/bin/env python
"""How fast and how lean is lsr_fused against everything a user could pick instead, here and now.

Run ``python benchmarks/bench_loss.py`` (``--help`` explains every column). It times label-smoothed
cross-entropy (label_smoothing = 0.1, mean reduction) forward-only and forward+backward for every
contender and shape, against the time to copy the logits once, in a tight loop and in a training
loop, measures each contender's peak extra memory, checks its loss and gradient against a float64
reference before timing it, prints one table per shape, and writes ``<out>/<device>.json``,
``<out>/<device>.txt`` and ``<out>/<device>.png``.

The work is split by concern: ``contenders.py`` (what is timed), ``loss_workload.py`` (inputs and
the float64 judge), ``measure.py`` (timing, floor, memory, training-loop churn), ``report.py``
(records, tables, JSON, plot), ``targets.py`` (the project's targets); this file is the CLI.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_call
import bench_options
from _common import Progress, dtype_name, load_average, machine_info, pick_shapes
from contenders import LABEL_SMOOTHING, build_contenders, lsr_fused_info, torch_eager
from loss_workload import LossWorkload
from measure import AllocChurn, Bench, StepChurn, apply_only, settings_for
from report import records_for, shape_table, write_outputs
from targets import target_line

DEFAULT_OUT = Path(__file__).resolve().parent / "results"

DEFAULT_SHAPES = {
    "cuda": "256x1000:float32,4096x1000:float32,8192x32000:bfloat16,8192x128256:bfloat16,"
    "4096x256000:bfloat16",
    # The two shapes the CPU target is quoted at; 4096x1000 (a 2 ms call) is a --shapes away.
    # Fewer shapes keep `make bench` within 8 minutes from a fresh clone on 2 busy cores.
    "cpu": "2048x32000:float32,1024x128256:bfloat16",
}
QUICK_SHAPES = {
    "cuda": "256x1000:float32,1024x32000:bfloat16",
    "cpu": "64x1000:float32,32x8192:bfloat16",
}
TRAIN_LOOPS = ("eager", "alloc", "off")

COLUMN_HELP = """\
one table per shape, one row per contender, the ratios first:
  f+b/copy    forward+backward median time / the copy floor. The floor is this run's median time to
              copy the logits once (one read + one write of N x C elements), the least a training
              step can do: read the logits, write their gradient. 1.00x is the floor.
  fwd/copy    forward-only median time (under torch.no_grad) / the same floor. A forward pass only
              has to read the logits, so its floor is 0.50x.
  vs eager    fwd+bwd speedup over torch eager F.cross_entropy (eager time / this time).
  f+b ms      forward+backward median, milliseconds.
  fwd ms      forward-only median, milliseconds.
  f+b GB/s    effective bandwidth of fwd+bwd: 2 x logits bytes (read logits, write gradient) / time.
  mem f+b     peak memory allocated during one fwd+bwd call beyond what was allocated before it, in
              units of the logits' size. The returned gradient counts: 1.00x is a fresh gradient,
              0.00x a gradient written into the logits (in-place).
  mem fwd     the same for one forward-only call.
  loss err    |loss - ref| / |ref|, ref = F.cross_entropy(logits.double(), label_smoothing=0.1)
              (the larger of the two passes' errors).
  grad err    max |grad - ref grad| / max |ref grad|, ref grad from the same float64 reference.
  train ...   the same fwd+bwd columns in the training loop (see --train-loop): each timed call is
              preceded, outside the clock, by what the rest of a training step does to memory.
              Ratios are to the copy floor and to torch eager measured in that same loop (the
              floor under the churn is on the line above the table). Absent with --train-loop off.
A row shows a status instead of numbers when the contender did not run: "not installed" (an
optional package), "skipped (why)", "failed: reason" (it raised), or "WRONG (what)": every
contender's loss and gradient are checked against the reference (allclose with dtype-appropriate
tolerances) before it is timed, and one that disagrees is not timed. In-place rows show
"= default" for fwd: in-place only changes the backward pass.
Under each table a "target" line compares the best lsr_fused rows with the project's targets, in
the tight loop and (after "|") in the training loop.

contenders: lsr_fused (default and inplace_backward=True, every backend available on the device),
torch eager F.cross_entropy(label_smoothing=0.1), the same under torch.compile, a dense one-hot
reference in the style of the seed's LSR module, and, if installed (CUDA only), Liger-Kernel's
LigerCrossEntropyLoss and flash-attention's Triton cross_entropy_loss (default and in-place).

timing: CUDA: CUDA events around each call, L2 flushed between calls (outside the events), several
warm-up calls. CPU: time.perf_counter around each call, one warm-up call. Both rotate over several
input buffers (total >= 256 MiB on CPU, 1 GiB on CUDA) so that caches do not flatter small shapes,
and report medians. The number of repetitions fits a time budget per measurement (--budget).
The training loop times fwd+bwd only, with the churn after every warm-up and timed call.
In-place contenders overwrite their input with the gradient: each buffer is restored from a pristine
copy after every call, outside the clock. The copy floor is sampled before every contender too and
its median taken over the whole shape, so that load drifting over the run shows in both. Correctness
is checked once per contender on a fresh copy of the first buffer.

memory: CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus the memory
allocated before the call. CPU: one call under torch.profiler(profile_memory=True), which records
every allocation and free of c10's CPU allocator (all tensors, those of C++ extensions and of
torch.compile's code included); the peak of their running sum in time order is the extra memory.

outputs: the tables on stdout (also in <out>/<device>.txt), <out>/<device>.json (one record per
shape, contender and pass, with every column, each repetition's time, the fastest copy, and the
machine's description, load average included) and <out>/<device>.png (time / copy floor per shape
and contender for both passes, and the extra memory). <device> is "cpu" or "cuda-" and the card's
name. Progress goes to stderr. On a CPU shared with other work the times swing by several x from
run to run: compare ratios within one run, and rerun on an idle machine before quoting them.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=COLUMN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="where to run (default: cuda if available, else cpu)",
    )
    add(
        "--shapes",
        default=None,
        help="comma-separated NxC[:dtype] list (default on cuda: "
        f"{DEFAULT_SHAPES['cuda'].replace(',', ', ')}; on cpu: "
        f"{DEFAULT_SHAPES['cpu'].replace(',', ', ')})",
    )
    add(
        "--dtype",
        default=None,
        help="dtype of every shape (float32, bfloat16, float16, float64): replaces the "
        "default shapes' dtypes; a --shapes entry's own :dtype wins over it",
    )
    add(
        "--quick",
        action="store_true",
        help="tiny shapes, 1-2 repetitions, no torch.compile: a smoke test",
    )
    add(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="directory for <device>.json, .txt and .png (default: %(default)s)",
    )
    add(
        "--only",
        default=None,
        help="comma-separated substrings: run only contenders whose name has one",
    )
    add(
        "--budget",
        type=float,
        default=None,
        help="seconds of timing per (contender, pass, loop) (default: 1.0 on cpu, 0.5 on cuda)",
    )
    add(
        "--train-loop",
        choices=TRAIN_LOOPS,
        default="eager",
        help="what separates two timed fwd+bwd calls in the training-loop scenario: 'eager' "
        "(default): one torch eager fwd+bwd on a logits buffer of its own, a stand-in for the "
        "rest of a training step; 'alloc': 3 logits-sized tensors allocated, written and freed, "
        "one kept until the next call (cheaper); 'off': tight loop only",
    )
    add(
        "--no-scenarios",
        action="store_true",
        help="skip the two scenarios after the tables: the per-call cost at small shapes "
        "against eager (bench_call.py) and the cost of each option (bench_options.py)",
    )
    add("--seed", type=int, default=0)
    add("--no-progress", action="store_true", help="no progress line on stderr")
    return parser.parse_args(argv)


def run_scenarios(device: torch.device, quick: bool, progress, tables: list[str]) -> dict:
    """The per-call cost against eager (small shapes; CPU, one thread) and the cost of each
    option (2048 x 32000 float32 on the CPU), printed and appended to ``tables``."""
    results = {}
    if device.type == "cpu":
        progress("per-call cost at small shapes")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        rounds = 3 if quick else 9
        try:
            rows = bench_call.per_call_rows(rounds=rounds, budget_s=0.02 if quick else 0.05)
            text = bench_call.format_rows(rows, rounds)  # names the thread count it ran with
        finally:
            torch.set_num_threads(threads)
        results["per_call"] = rows
        progress.done()
        print("\n" + text, flush=True)
        tables.append(text)
    progress("option cost")
    shape = (256, 8192) if quick else (2048, 32000)
    rounds = 3 if quick else 7
    rows = bench_options.option_rows(shape, torch.float32, device, rounds)
    results["options"] = rows
    text = bench_options.format_rows(rows, shape, torch.float32, rounds)
    progress.done()
    print("\n" + text, flush=True)
    tables.append(text)
    return results


def make_churn(kind: str, workload: LossWorkload):
    if kind == "alloc":
        return AllocChurn(workload.nbytes, workload.device, count=3)
    if kind == "eager":
        return StepChurn(workload.spare_step(torch_eager), "one torch eager fwd+bwd")
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available here", file=sys.stderr)
        return 2
    defaults = (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)[device.type]
    try:
        shapes = pick_shapes(args.shapes, args.dtype, defaults)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    settings = settings_for(device, args.quick)
    if args.budget is not None:
        settings.budget_s = args.budget
    progress = Progress(not args.no_progress)
    progress("importing contenders")
    contenders = build_contenders(device, args.quick)
    apply_only(contenders, args.only)

    info = machine_info(device)
    info["lsr_fused"] = lsr_fused_info()
    header = (
        f"lsr_fused benchmark: label_smoothing={LABEL_SMOOTHING}, reduction=mean | "
        f"{info['device_name']} | torch {info['torch']}, {info['torch_threads']} threads, "
        f"{info['cpu_count']} cpus | {info['date']}"
    )
    load = info["load_average_start"]
    if device.type == "cpu" and load is not None and load > 0.5 * (info["cpu_count"] or 1):
        header += (
            f"\nwarning: the load average is {load:.1f} on {info['cpu_count']} cpus before the "
            "start: other work competes for the cores and the CPU timings will be noisy"
        )
    progress.done()
    print(header, flush=True)
    records, tables, targets = [], [header], []
    for i, shape in enumerate(shapes):
        tag = f"[{i + 1}/{len(shapes)}] {shape.label}"
        progress(f"{tag} | allocating inputs")
        workload = LossWorkload(shape, device, settings, args.seed + i)
        bench = Bench(workload, settings, progress, make_churn(args.train_loop, workload))
        run = bench.run(contenders, tag)
        del bench, workload
        shape_records = records_for(run, contenders, device)
        run.target = target_line(run, shape_records, device)
        targets.append(
            {"shape": shape.size_label, "dtype": dtype_name(shape.dtype), "line": run.target}
        )
        records.extend(shape_records)
        progress.done()
        text = shape_table(run, shape_records, device)
        print("\n" + text, flush=True)
        tables.append(text)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    scenarios = {} if args.no_scenarios else run_scenarios(device, args.quick, progress, tables)
    elapsed = time.perf_counter() - started
    info["elapsed_s"] = round(elapsed, 1)
    info["load_average_end"] = load_average()
    payload = {
        "machine": info,
        "label_smoothing": LABEL_SMOOTHING,
        "quick": args.quick,
        "settings": dict(vars(settings)),
        "train_loop": args.train_loop,
        "targets": targets,
        "records": records,
        "scenarios": scenarios,
    }
    paths = write_outputs(args.out, device, payload, tables, header, progress)
    print(f"\nwrote {', '.join(map(str, paths))} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
