#!/usr/bin/env python
"""The fused classifier + loss head against the unfused one and torch's own: time (as a multiple
of the three-matmul floor), peak extra memory, error.

Run ``python benchmarks/bench_linear.py`` (``--quick`` for a smoke run). For each shape
``N x H x C:dtype`` it times one training step of the loss head, forward + backward
(``loss = head(hidden, weight, target)``, then the gradients of ``hidden`` and ``weight``), for:

* ``three matmuls (floor)``: ``x = h W^T``, ``x @ W`` and ``x^T @ h`` and nothing else: the
  matmuls any head's training step must do; the ``x floor`` column divides by its time;
* ``lsr_fused linear``: :func:`lsr_fused.linear_label_smoothing_cross_entropy` (default chunk),
  at label smoothing 0.1 and 0;
* ``unfused eager``: ``F.cross_entropy(F.linear(hidden, weight), target, label_smoothing=0.1)``;
* ``unfused compiled``: the same under ``torch.compile``;
* ``lsr_fused unfused``: ``F.linear`` + :func:`lsr_fused.label_smoothing_cross_entropy`;
* torch's ``F.linear_cross_entropy`` (torch >= 2.13) with ``options=LinearCrossEntropyOptions()``:
  its chunked path at label smoothing 0, and at 0.1, where torch warns that the options are
  ignored and computes the full logits (the row's name says which path ran);
* Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` and Cut Cross-Entropy's
  ``linear_cross_entropy`` when importable (CCE has no label smoothing: it runs with 0).

Timing: after every contender's checked call and warm-up, ``--reps`` rounds time one call of
each contender in turn, so that load drifting during the run weighs on all rows alike.

Columns: median fwd+bwd time, that time over the floor's, speedup over unfused eager, peak
memory allocated during one call beyond what was allocated before it (including the returned
gradients; CPU: through the profiler's allocation records, see ``measure.run_measured``) in MiB
and in units of one float32 ``(N, C)`` logits tensor, and the loss / gradient errors against a
float64 reference at the row's label smoothing, computed in row chunks (max |g - ref| / max |ref|
over the gradients of hidden and weight).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Progress, dtype_name, load_average, machine_info, parse_dtype, short
from measure import median, run_measured, synchronize, time_calls
from report import format_table

LABEL_SMOOTHING = 0.1
SMOOTHINGS = (LABEL_SMOOTHING, 0.0)  # the float64 reference is computed for each
FLOOR = "three matmuls (floor)"
DEFAULT_SHAPES = {
    "cpu": "4096x1024x32000:float32",
    "cuda": "8192x4096x128256:bfloat16,4096x4096x32000:bfloat16",
}
QUICK_SHAPES = {"cpu": "256x64x1000:float32,128x32x512:bfloat16", "cuda": "1024x512x8192:bfloat16"}


@dataclass(frozen=True)
class HeadShape:
    rows: int
    features: int
    classes: int
    dtype: torch.dtype

    @property
    def label(self) -> str:
        return f"{self.rows}x{self.features}x{self.classes}:{dtype_name(self.dtype)}"

    @property
    def fp32_logits_bytes(self) -> int:
        return self.rows * self.classes * 4


def parse_head_shapes(text: str) -> list[HeadShape]:
    shapes = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        dims, _, dtype = item.partition(":")
        n, h, c = (int(v) for v in dims.lower().split("x"))
        shapes.append(HeadShape(n, h, c, parse_dtype(dtype or "float32")))
    return shapes


# ----------------------------------------------------------------------------------------------
# Contenders: (name, fn(hidden, weight, target) -> loss or None, status, label smoothing)


def unfused_eager(hidden, weight, target):
    return F.cross_entropy(F.linear(hidden, weight), target, label_smoothing=LABEL_SMOOTHING)


def three_matmuls(hidden, weight, target):
    """The floor: the logits matmul and the two gradient matmuls, with no loss in between (the
    logits stand in for their gradient). Returns a zero "loss" whose gradients are the matmuls'
    results, so that it is timed like the contenders."""
    return _ThreeMatmuls.apply(hidden, weight)


class _ThreeMatmuls(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight):
        logits = hidden @ weight.t()
        ctx.grads = (logits @ weight, logits.t() @ hidden)
        return logits.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        grads, ctx.grads = ctx.grads, None
        return grads


def _torch_native_rows() -> list[tuple]:
    """torch's F.linear_cross_entropy on its chunked path (options given) at eps 0, and at eps
    0.1, where it may fall back to the full logits: probed once on a tiny input, and named so."""
    if not hasattr(F, "linear_cross_entropy"):
        return [("torch linear_cross_entropy", None, "not in this torch (< 2.13)", 0.0)]
    options = torch.nn.LinearCrossEntropyOptions()

    def native(eps):
        def fn(hidden, weight, target):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # the "options ignored" warning
                return F.linear_cross_entropy(
                    hidden, weight, target, label_smoothing=eps, options=options
                )

        return fn

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probe = (torch.randn(4, 3), torch.randn(5, 3), torch.zeros(4, dtype=torch.long))
        F.linear_cross_entropy(*probe, label_smoothing=LABEL_SMOOTHING, options=options)
    falls_back = any("ignored" in str(w.message) for w in caught)
    smoothed_path = "full logits: options ignored" if falls_back else "chunked"
    return [
        ("torch linear_cross_entropy chunked", native(0.0), "ok", 0.0),
        (f"torch linear_cross_entropy ({smoothed_path})", native(LABEL_SMOOTHING), "ok",
         LABEL_SMOOTHING),
    ]  # fmt: skip


def contenders(device: torch.device, compile_unfused: bool) -> list[tuple]:
    """(name, fn or None, status, label smoothing)."""
    import lsr_fused

    def ours(eps):
        def fn(hidden, weight, target):
            return lsr_fused.linear_label_smoothing_cross_entropy(hidden, weight, target, eps)

        return fn

    def lsr_unfused(hidden, weight, target):
        return lsr_fused.label_smoothing_cross_entropy(
            F.linear(hidden, weight), target, LABEL_SMOOTHING
        )

    eps = LABEL_SMOOTHING
    rows = [
        (FLOOR, three_matmuls, "ok", None),
        ("lsr_fused linear", ours(eps), "ok", eps),
        ("lsr_fused linear (eps 0)", ours(0.0), "ok", 0.0),
        ("unfused eager", unfused_eager, "ok", eps),
        ("unfused compiled", torch.compile(unfused_eager) if compile_unfused else None,
         "ok" if compile_unfused else "skipped (--no-compile)", eps),
        ("lsr_fused unfused", lsr_unfused, "ok", eps),
        *_torch_native_rows(),
    ]  # fmt: skip
    cuda = device.type == "cuda"
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(label_smoothing=eps)
        rows.append(("liger fused linear CE", (lambda h, w, t: liger(w, h, t)) if cuda else None,
                     "ok" if cuda else "skipped (CUDA only)", eps))  # fmt: skip
    except ImportError:
        rows.append(("liger fused linear CE", None, "not installed", eps))
    try:
        from cut_cross_entropy import linear_cross_entropy

        rows.append(("CCE (no smoothing)", (lambda h, w, t: linear_cross_entropy(h, w, t))
                     if cuda else None, "ok" if cuda else "skipped (CUDA only)", 0.0))  # fmt: skip
    except ImportError:
        rows.append(("CCE (no smoothing)", None, "not installed", 0.0))
    return rows


# ----------------------------------------------------------------------------------------------
# Inputs and the float64 judge


class HeadWorkload:
    def __init__(self, shape: HeadShape, device: torch.device, seed: int = 0):
        self.shape, self.device = shape, device
        gen = torch.Generator(device=device).manual_seed(seed)
        n, h, c = shape.rows, shape.features, shape.classes
        self.hidden = torch.randn(n, h, generator=gen, device=device).to(shape.dtype)
        self.weight = (torch.randn(c, h, generator=gen, device=device) / h**0.5).to(shape.dtype)
        self.target = torch.randint(0, c, (n,), generator=gen, device=device)

    def reference(self) -> dict:
        """{label smoothing: (loss, grad of hidden, grad of weight)} in float64 for each of
        SMOOTHINGS, from one pass over row chunks of the logits."""
        h64, w64 = self.hidden.double(), self.weight.double()
        n, c = self.shape.rows, self.shape.classes
        refs = {eps: [0.0, torch.empty_like(h64), torch.zeros_like(w64)] for eps in SMOOTHINGS}
        chunk = max(1, (1 << 24) // c)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            logits = (h64[rows] @ w64.t()).requires_grad_()
            for eps, ref in refs.items():
                loss = F.cross_entropy(logits, self.target[rows], label_smoothing=eps,
                                       reduction="sum")  # fmt: skip
                (g,) = torch.autograd.grad(loss, logits)
                g /= n
                ref[1][rows] = g @ w64
                ref[2].addmm_(g.t(), h64[rows])
                ref[0] += loss.item() / n
        return {eps: tuple(ref) for eps, ref in refs.items()}

    def step(self, fn):
        def call(i: int = 0):
            hidden = self.hidden.detach().requires_grad_()
            weight = self.weight.detach().requires_grad_()
            loss = fn(hidden, weight, self.target)
            grads = torch.autograd.grad(loss, (hidden, weight))
            return loss.detach(), grads

        return call


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


def _check(w: HeadWorkload, fn, eps, refs, record: dict, args, progress):
    """One call under the memory measurement, judged against the reference; warm-up calls.
    Returns the step to time."""
    step = w.step(fn)
    label, name = w.shape.label, record["name"]
    progress(f"{label} | {name} | first call (check, memory)")
    if "compiled" in name:
        step()  # compile outside the memory measurement
    (loss, (gh, gw)), extra, _ = run_measured(step, device=w.device)
    record.update(extra_bytes=extra, loss_dtype=dtype_name(loss.dtype))
    if eps is not None:  # the floor computes no loss
        ref_loss, ref_gh, ref_gw = refs[eps]
        record.update(loss=float(loss), label_smoothing=eps)
        record["loss_err"] = abs(float(loss) - ref_loss) / abs(ref_loss)
        record["grad_err"] = max(rel_err(gh, ref_gh), rel_err(gw, ref_gw))
    del loss, gh, gw
    for i in range(args.warmup):
        step(i)
    return step


def _time_in_rounds(runs: list, device, args, progress, label: str) -> None:
    """``args.reps`` rounds, each timing one call of every contender in turn: load that drifts
    during the run (a shared machine) then weighs on every row alike, not on whichever ran
    while it peaked, so the ratios to the floor stay meaningful."""
    for record, _ in runs:
        record["times_s"] = []
    for rep in range(args.reps):
        progress(f"{label} | timing round {rep + 1}/{args.reps}")
        for record, step in runs:
            if record["status"] != "ok":
                continue
            try:
                synchronize(device)
                record["times_s"] += time_calls(step, device, 1)
            except Exception as err:  # one contender failing must not stop the others
                record["status"] = f"failed: {short(err)}"
    for record, _ in runs:
        if record["status"] == "ok" and record["times_s"]:
            record["time_s"] = median(record["times_s"])


def bench_shape(shape: HeadShape, device, args, progress) -> dict:
    w = HeadWorkload(shape, device)
    progress(f"{shape.label} | float64 reference")
    refs = w.reference()
    results, runs = [], []
    for name, fn, status, eps in contenders(device, not args.no_compile):
        record = {"name": name, "status": status}
        results.append(record)
        if fn is None:
            continue
        try:
            runs.append((record, _check(w, fn, eps, refs, record, args, progress)))
        except Exception as err:  # one contender failing must not stop the others
            record["status"] = f"failed: {short(err)}"
    _time_in_rounds(runs, device, args, progress, shape.label)
    by_name = {r["name"]: r.get("time_s") for r in results}
    eager, floor = by_name.get("unfused eager"), by_name.get(FLOOR)
    for r in results:
        if r.get("time_s") and eager:
            r["speedup_vs_eager"] = eager / r["time_s"]
        if r.get("time_s") and floor:
            r["x_floor"] = r["time_s"] / floor
    return {
        "shape": shape.label,
        "ref_loss": {str(eps): ref[0] for eps, ref in refs.items()},
        "fp32_logits_bytes": shape.fp32_logits_bytes,
        "results": results,
    }


def table(run: dict) -> str:
    headers = ["contender", "eps", "f+b ms", "x floor", "vs eager", "peak MiB", "x fp32 logits",
               "loss err", "grad err"]  # fmt: skip
    rows = []
    for r in run["results"]:
        if r["status"] != "ok" or "time_s" not in r:
            rows.append([r["name"], r["status"], *[""] * (len(headers) - 2)])
            continue
        extra = r.get("extra_bytes")
        eps = r.get("label_smoothing")
        rows.append(
            [
                r["name"],
                "" if eps is None else f"{eps:g}",
                f"{r['time_s'] * 1e3:.1f}",
                f"{r['x_floor']:.2f}x" if "x_floor" in r else "",
                f"{r['speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in r else "",
                f"{extra / 2**20:.0f}" if extra is not None else "?",
                f"{extra / run['fp32_logits_bytes']:.2f}" if extra is not None else "?",
                f"{r['loss_err']:.1e}" if "loss_err" in r else "n/a",
                f"{r['grad_err']:.1e}" if "grad_err" in r else "n/a",
            ]
        )
    return format_table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", help="comma-separated NxHxC:dtype (default: per device)")
    parser.add_argument("--quick", action="store_true", help="small shapes, one timed call")
    parser.add_argument("--reps", type=int, help="timed calls per contender (default 3; quick 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.reps is None:
        args.reps = 1 if args.quick else 3
    shapes_text = args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)[device.type]
    progress = Progress(not args.quiet)
    info = machine_info(device)
    started = time.perf_counter()
    runs = []
    for shape in parse_head_shapes(shapes_text):
        run = bench_shape(shape, device, args, progress)
        runs.append(run)
        progress.done()
        print(f"\n{shape.label} (N x H x C), fwd+bwd, eps = each row's label smoothing")
        print(table(run))
    info["load_average_end"] = load_average()
    info["seconds"] = round(time.perf_counter() - started, 1)
    print(
        f"\n{info['device_name']}, torch {info['torch']}, {info['torch_threads']} threads, "
        f"load {info['load_average_start']} -> {info['load_average_end']}, {info['seconds']} s"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
