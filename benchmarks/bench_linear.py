#!/usr/bin/env python
"""The fused classifier + loss head against the unfused one: time, peak extra memory, error.

Run ``python benchmarks/bench_linear.py`` (``--quick`` for a smoke run). For each shape
``N x H x C:dtype`` it times one training step of the loss head, forward + backward
(``loss = head(hidden, weight, target)``, then the gradients of ``hidden`` and ``weight``), for:

* ``lsr_fused linear``: :func:`lsr_fused.linear_label_smoothing_cross_entropy` (default chunk);
* ``unfused eager``: ``F.cross_entropy(F.linear(hidden, weight), target, label_smoothing=0.1)``;
* ``unfused compiled``: the same under ``torch.compile``;
* ``lsr_fused unfused``: ``F.linear`` + :func:`lsr_fused.label_smoothing_cross_entropy`;
* Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` and Cut Cross-Entropy's
  ``linear_cross_entropy`` when importable (CCE has no label smoothing: it runs with 0, its time
  is shown, its errors are not judged).

Columns: median fwd+bwd time, speedup over unfused eager, peak memory allocated during one call
beyond what was allocated before it (including the returned gradients; CPU: through the
profiler's allocation records, see ``measure.run_measured``) in MiB and in units of one float32
``(N, C)`` logits tensor, and the loss / gradient errors against a float64 reference computed in
row chunks (max |g - ref| / max |ref| over the gradients of hidden and weight).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Progress, dtype_name, load_average, machine_info, parse_dtype, short
from measure import median, run_measured, synchronize, time_calls
from report import format_table

LABEL_SMOOTHING = 0.1
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
# Contenders: fn(hidden, weight, target) -> loss


def unfused_eager(hidden, weight, target):
    return F.cross_entropy(F.linear(hidden, weight), target, label_smoothing=LABEL_SMOOTHING)


def contenders(device: torch.device, compile_unfused: bool) -> list[tuple[str, object, str]]:
    """(name, fn or None, status)."""
    import lsr_fused

    def ours(hidden, weight, target):
        return lsr_fused.linear_label_smoothing_cross_entropy(
            hidden, weight, target, LABEL_SMOOTHING
        )

    def lsr_unfused(hidden, weight, target):
        return lsr_fused.label_smoothing_cross_entropy(
            F.linear(hidden, weight), target, LABEL_SMOOTHING
        )

    rows = [
        ("lsr_fused linear", ours, "ok"),
        ("unfused eager", unfused_eager, "ok"),
        (
            "unfused compiled",
            torch.compile(unfused_eager) if compile_unfused else None,
            "ok" if compile_unfused else "skipped (--no-compile)",
        ),
        ("lsr_fused unfused", lsr_unfused, "ok"),
    ]
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(label_smoothing=LABEL_SMOOTHING)
        ok = device.type == "cuda"
        rows.append(
            (
                "liger fused linear CE",
                (lambda h, w, t: liger(w, h, t)) if ok else None,
                "ok" if ok else "skipped (CUDA only)",
            )
        )
    except ImportError:
        rows.append(("liger fused linear CE", None, "not installed"))
    try:
        from cut_cross_entropy import linear_cross_entropy

        ok = device.type == "cuda"
        rows.append(
            (
                "CCE (no smoothing)",
                (lambda h, w, t: linear_cross_entropy(h, w, t)) if ok else None,
                "ok" if ok else "skipped (CUDA only)",
            )
        )
    except ImportError:
        rows.append(("CCE (no smoothing)", None, "not installed"))
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

    def reference(self) -> tuple[float, torch.Tensor, torch.Tensor]:
        """Loss and gradients of hidden and weight in float64, in row chunks."""
        h64, w64 = self.hidden.double(), self.weight.double()
        n, c = self.shape.rows, self.shape.classes
        grad_h = torch.empty_like(h64)
        grad_w = torch.zeros_like(w64)
        chunk = max(1, (1 << 24) // c)
        total = 0.0
        for start in range(0, n, chunk):
            logits = (h64[start : start + chunk] @ w64.t()).requires_grad_()
            loss = F.cross_entropy(
                logits,
                self.target[start : start + chunk],
                label_smoothing=LABEL_SMOOTHING,
                reduction="sum",
            )
            (g,) = torch.autograd.grad(loss, logits)
            g /= n
            grad_h[start : start + chunk] = g @ w64
            grad_w.addmm_(g.t(), h64[start : start + chunk])
            total += loss.item()
        return total / n, grad_h, grad_w

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


def bench_shape(shape: HeadShape, device, args, progress) -> dict:
    w = HeadWorkload(shape, device)
    progress(f"{shape.label} | float64 reference")
    ref_loss, ref_gh, ref_gw = w.reference()
    results = []
    for name, fn, status in contenders(device, not args.no_compile):
        record = {"name": name, "status": status}
        results.append(record)
        if fn is None:
            continue
        try:
            step = w.step(fn)
            progress(f"{shape.label} | {name} | first call (check, memory)")
            if "compiled" in name:
                step()  # compile outside the memory measurement
            (loss, (gh, gw)), extra, _ = run_measured(step, device)
            record.update(loss=float(loss), extra_bytes=extra, loss_dtype=dtype_name(loss.dtype))
            if "no smoothing" not in name:
                record["loss_err"] = abs(float(loss) - ref_loss) / abs(ref_loss)
                record["grad_err"] = max(rel_err(gh, ref_gh), rel_err(gw, ref_gw))
            del loss, gh, gw
            progress(f"{shape.label} | {name} | timing")
            for i in range(args.warmup):
                step(i)
            synchronize(device)
            times = time_calls(step, device, args.reps)
            record["time_s"] = median(times)
            record["times_s"] = times
        except Exception as err:  # one contender failing must not stop the others
            record["status"] = f"failed: {short(err)}"
    eager = next((r.get("time_s") for r in results if r["name"] == "unfused eager"), None)
    for r in results:
        if r.get("time_s") and eager:
            r["speedup_vs_eager"] = eager / r["time_s"]
    return {
        "shape": shape.label,
        "ref_loss": ref_loss,
        "fp32_logits_bytes": shape.fp32_logits_bytes,
        "results": results,
    }


def table(run: dict) -> str:
    headers = ["contender", "f+b ms", "vs eager", "peak MiB", "x fp32 logits", "loss err",
               "grad err"]  # fmt: skip
    rows = []
    for r in run["results"]:
        if r["status"] != "ok" or "time_s" not in r:
            rows.append([r["name"], r["status"], "", "", "", "", ""])
            continue
        extra = r.get("extra_bytes")
        rows.append(
            [
                r["name"],
                f"{r['time_s'] * 1e3:.1f}",
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
        print(f"\n{shape.label} (N x H x C), label_smoothing={LABEL_SMOOTHING}, fwd+bwd")
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
