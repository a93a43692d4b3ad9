#!/usr/bin/env python
"""How fast and how lean is lsr_fused against everything a user could pick instead, here and now.

Run ``python benchmarks/bench_loss.py`` (``--help`` explains every column). It times label-smoothed
cross-entropy (label_smoothing = 0.1, mean reduction) forward-only and forward+backward for every
contender and shape, against the time to copy the logits once, measures each contender's peak extra
memory, checks its loss and gradient against a float64 reference before timing it, prints one table
per shape, and writes ``<out>/<device>.json``, ``<out>/<device>.txt`` and ``<out>/<device>.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    Progress,
    Shape,
    device_slug,
    dtype_name,
    fmt,
    format_table,
    load_average,
    machine_info,
    median,
    parse_dtype,
    parse_shapes,
    run_measured,
    synchronize,
    time_calls,
)

LABEL_SMOOTHING = 0.1
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path(__file__).resolve().parent / "results"

DEFAULT_SHAPES = {
    "cuda": "256x1000:float32,4096x1000:float32,8192x32000:bfloat16,8192x128256:bfloat16,"
    "4096x256000:bfloat16",
    "cpu": "4096x1000:float32,2048x32000:float32,1024x128256:bfloat16",
}
QUICK_SHAPES = {
    "cuda": "256x1000:float32,1024x32000:bfloat16",
    "cpu": "64x1000:float32,32x8192:bfloat16",
}

# Per dtype: (loss rtol, gradient rtol, gradient atol as a fraction of max |reference gradient|).
# Half-precision contenders may return a loss in their own dtype (torch eager does), hence the loose
# loss tolerance; contenders that promise a float32 loss are held to PRECISE_LOSS_RTOL instead.
TOLERANCES = {
    torch.float64: (1e-9, 1e-6, 1e-9),
    torch.float32: (1e-4, 1e-3, 1e-5),
    torch.float16: (5e-3, 2e-2, 2e-3),
    torch.bfloat16: (2e-2, 5e-2, 1e-2),
}
PRECISE_LOSS_RTOL = 1e-4

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
A row shows a status instead of numbers when the contender did not run: "not installed" (an
optional package), "skipped (why)", "failed: reason" (it raised), or "WRONG (what)": every
contender's loss and gradient are checked against the reference (allclose with dtype-appropriate
tolerances) before it is timed, and one that disagrees is not timed. In-place rows show
"= default" for fwd: in-place only changes the backward pass.
Under each table a "target" line compares the best lsr_fused rows with the project's targets.

contenders: lsr_fused (default and inplace_backward=True, every backend available on the device),
torch eager F.cross_entropy(label_smoothing=0.1), the same under torch.compile, a dense one-hot
reference in the style of the seed's LSR module, and, if installed (CUDA only), Liger-Kernel's
LigerCrossEntropyLoss and flash-attention's Triton cross_entropy_loss (default and in-place).

timing: CUDA: CUDA events around each call, L2 flushed between calls (outside the events), several
warm-up calls. CPU: time.perf_counter around each call, one warm-up call. Both rotate over several
input buffers (total >= 256 MiB on CPU, 1 GiB on CUDA) so that caches do not flatter small shapes,
and report medians. The number of repetitions fits a time budget per measurement (--budget).
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


@dataclass
class Settings:
    """How long and how hard to measure; see ``settings_for``."""

    budget_s: float  # time spent timing one (contender, pass), which sets the repetitions
    min_reps: int
    max_reps: int
    warmup: int  # untimed calls before timing (after the correctness check)
    max_call_s: float  # a contender whose warm fwd+bwd call takes longer is skipped
    dense_limit_bytes: float  # the one-hot reference is skipped when it would need more
    buffer_bytes: int  # rotate over input buffers totalling at least this ...
    max_buffers: int  # ... but no more buffers than this


def settings_for(device: torch.device, quick: bool) -> Settings:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if quick:
            return Settings(0.05, 2, 5, 2, 5.0, 0.5 * free, 64 << 20, 4)
        return Settings(0.5, 10, 200, 5, 5.0, 0.5 * free, 1 << 30, 64)
    if quick:
        return Settings(0.02, 1, 2, 1, 10.0, 1 << 30, 1 << 20, 2)
    return Settings(1.0, 3, 50, 1, 10.0, 4 << 30, 256 << 20, 16)


LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class Contender:
    """One way to compute the loss; ``make()`` is called once per shape and returns ``fn(x, t)``."""

    name: str
    make: Callable[[], LossFn] | None = None
    status: str = "ok"  # anything else: the row shows it and nothing runs
    kind: str = "baseline"  # "lsr_fused" or "baseline"
    backend: str | None = None
    inplace: bool = False  # may overwrite the logits buffer (the gradient is written into it)
    fwd_twin: str | None = None  # fwd-only is the same call as this contender's: not timed again
    precise_loss: bool = False  # promises a float32 (or float64) loss whatever the input dtype
    compiles: bool = False  # its first call compiles: no memory measurement then
    dense_bytes_per_element: float = 0.0  # estimated peak bytes per logit (0: not estimated)


@dataclass
class Outcome:
    """One (shape, contender, pass) measurement."""

    status: str = "ok"
    time_s: float | None = None  # the median of times_s
    times_s: list[float] = field(default_factory=list)
    reps: int = 0
    extra_bytes: int | None = None
    loss: float | None = None
    loss_dtype: str | None = None
    loss_rel_err: float | None = None
    grad_rel_err: float | None = None
    call_s: float | None = None  # the time of the call that measured the memory


PASSES = ("fwd+bwd", "fwd")


# ----------------------------------------------------------------------------------------------
# Contenders


def torch_eager(x: Tensor, t: Tensor) -> Tensor:
    return F.cross_entropy(x, t, label_smoothing=LABEL_SMOOTHING)


def one_hot_reference(x: Tensor, t: Tensor) -> Tensor:
    """Dense label smoothing in the style of the seed's ``LSR`` module.

    Like the seed, it builds a float32 one-hot target of the logits' size with ``scatter_add_``,
    smooths it, and takes the sum of target x log-softmax. The seed spreads eps over the K - 1 other
    classes (Inception's convention); this one uses PyTorch's (target 1 - eps + eps/K, others
    eps/K) so that it computes the same loss as every other contender.
    """
    rows, classes = x.shape
    one_hot = torch.zeros(rows, classes, device=x.device)
    one_hot.scatter_add_(1, t.view(rows, 1), torch.ones(rows, 1, device=x.device))
    smoothed = one_hot * (1.0 - LABEL_SMOOTHING) + LABEL_SMOOTHING / classes
    log_prob = F.log_softmax(x, dim=1)
    return -(smoothed * log_prob).sum(dim=1).mean()


def make_compiled() -> LossFn:
    # A fresh compile per shape: dynamo caches per code object and would otherwise hit its
    # recompile limit across shapes and grad modes, then fall back to eager without a word.
    torch._dynamo.reset()
    return torch.compile(torch_eager, dynamic=False, fullgraph=True)


def import_lsr_fused():
    """Import lsr_fused: the installed one, else the one in this checkout."""
    try:
        import lsr_fused
    except ModuleNotFoundError as err:
        if err.name != "lsr_fused":
            raise
        sys.path.insert(1, str(REPO_ROOT))
        import lsr_fused
    return lsr_fused


def short(err: BaseException, limit: int = 90) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def build_contenders(device: torch.device, quick: bool) -> list[Contender]:
    contenders = []
    try:
        lsr_fused = import_lsr_fused()
        backends = list(lsr_fused.available_backends(device.type))
    except Exception as err:  # the package's own rows must say why they are missing
        contenders.append(
            Contender("lsr_fused", status=f"failed: import: {short(err)}", kind="lsr_fused")
        )
        backends = []
    for backend in backends:
        name = f"lsr_fused {backend}"
        if backend == "triton" and device.type != "cuda":
            contenders.append(
                Contender(
                    name,
                    status="skipped (Triton's CPU interpreter is too slow)",
                    kind="lsr_fused",
                    backend=backend,
                )
            )
            continue
        for inplace in (False, True):

            def make(backend=backend, inplace=inplace) -> LossFn:
                def fn(x: Tensor, t: Tensor) -> Tensor:
                    return lsr_fused.label_smoothing_cross_entropy(
                        x, t, LABEL_SMOOTHING, inplace_backward=inplace, backend=backend
                    )

                return fn

            contenders.append(
                Contender(
                    name + (" in-place" if inplace else ""),
                    make,
                    kind="lsr_fused",
                    backend=backend,
                    inplace=inplace,
                    fwd_twin=name if inplace else None,
                    precise_loss=True,
                )
            )

    contenders.append(Contender("torch eager", lambda: torch_eager))
    if quick:
        contenders.append(Contender("torch.compile", status="skipped (--quick: compiling is slow)"))
    else:
        contenders.append(Contender("torch.compile", make_compiled, compiles=True))
    # One-hot target (4 B), smoothed target (4 B), their product (4 B), its gradient (4 B), and
    # log-softmax and its gradient in the logits' dtype: about 16 B + 2 elements per logit.
    contenders.append(
        Contender("one-hot (seed-style)", lambda: one_hot_reference, dense_bytes_per_element=16.0)
    )
    contenders.extend(optional_contenders(device))
    return contenders


def optional_contenders(device: torch.device) -> list[Contender]:
    """Liger-Kernel and flash-attention's Triton cross-entropy, when importable (CUDA only)."""
    out = []
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError:
        out.append(Contender("Liger-Kernel", status="not installed"))
    except Exception as err:
        out.append(Contender("Liger-Kernel", status=f"failed: import: {short(err)}"))
    else:
        if device.type != "cuda":
            out.append(Contender("Liger-Kernel", status="skipped (needs CUDA)"))
        else:
            # Liger writes the gradient into the logits during the forward pass.
            out.append(
                Contender(
                    "Liger-Kernel",
                    lambda: LigerCrossEntropyLoss(label_smoothing=LABEL_SMOOTHING),
                    inplace=True,
                )
            )
    try:
        from flash_attn.ops.triton.cross_entropy import cross_entropy_loss
    except ImportError:
        out.append(Contender("flash-attn CE", status="not installed"))
    except Exception as err:
        out.append(Contender("flash-attn CE", status=f"failed: import: {short(err)}"))
    else:
        for inplace in (False, True):
            name = "flash-attn CE" + (" in-place" if inplace else "")
            if device.type != "cuda":
                out.append(Contender(name, status="skipped (needs CUDA)"))
                continue

            def make(inplace=inplace) -> LossFn:
                def fn(x: Tensor, t: Tensor) -> Tensor:
                    losses = cross_entropy_loss(
                        x, t, label_smoothing=LABEL_SMOOTHING, inplace_backward=inplace
                    )
                    if isinstance(losses, tuple):  # (losses, z_losses) since flash-attn 2.4
                        losses = losses[0]
                    return losses.mean()

                return fn

            out.append(
                Contender(
                    name,
                    make,
                    inplace=inplace,
                    precise_loss=True,
                    fwd_twin="flash-attn CE" if inplace else None,
                )
            )
    return out


# ----------------------------------------------------------------------------------------------
# Reference and checks


def float64_reference(x: Tensor, t: Tensor) -> tuple[float, Tensor]:
    """Loss and gradient of F.cross_entropy on ``x.double()``, in row chunks to bound memory.

    The gradient is returned in float32, which is ample to judge float32 and half gradients.
    """
    rows, classes = x.shape
    grad = torch.empty(rows, classes, dtype=torch.float32, device=x.device)
    chunk = max(1, (1 << 24) // classes)
    total = 0.0
    for start in range(0, rows, chunk):
        part = x[start : start + chunk].double().requires_grad_()
        loss = F.cross_entropy(
            part, t[start : start + chunk], label_smoothing=LABEL_SMOOTHING, reduction="sum"
        )
        (part_grad,) = torch.autograd.grad(loss, part)
        grad[start : start + chunk] = part_grad / rows
        total += loss.item()
    return total / rows, grad


def compare_grad(
    grad: Tensor, ref: Tensor, ref_scale: float, rtol: float, atol_frac: float
) -> tuple[float, bool]:
    """``(max |grad - ref| / max |ref|, allclose)``, in row chunks to bound memory."""
    if grad.shape != ref.shape:
        return math.inf, False
    atol = atol_frac * ref_scale
    chunk = max(1, (1 << 24) // ref.shape[1])
    worst, close = 0.0, True
    for start in range(0, ref.shape[0], chunk):
        g = grad[start : start + chunk].float()
        r = ref[start : start + chunk]
        if not bool(torch.isfinite(g).all()):
            return math.inf, False
        diff = (g - r).abs()
        worst = max(worst, diff.max().item())
        close = close and bool((diff <= atol + rtol * r.abs()).all())
    return worst / ref_scale, close


# ----------------------------------------------------------------------------------------------
# Measuring one shape


@dataclass
class ShapeRun:
    """Everything measured for one shape."""

    shape: Shape
    n_buffers: int = 0
    copy_s: float | None = None
    copy_samples: list[float] = field(default_factory=list)
    ref_loss: float | None = None
    outcomes: dict[str, dict[str, Outcome]] = field(default_factory=dict)
    target: str = ""


class ShapeBench:
    def __init__(
        self,
        shape: Shape,
        device: torch.device,
        settings: Settings,
        progress: Callable[[str], None],
        seed: int,
    ):
        self.shape, self.device, self.settings, self.progress = shape, device, settings, progress
        n = math.ceil(settings.buffer_bytes / shape.nbytes)
        self.n = max(2, min(settings.max_buffers, n))
        gen = torch.Generator(device=device).manual_seed(seed)
        self.xs, self.ts = [], []
        for _ in range(self.n):
            x = torch.randn(shape.rows, shape.classes, generator=gen, device=device)
            self.xs.append(x.mul_(2.0).to(shape.dtype).requires_grad_())
            self.ts.append(
                torch.randint(0, shape.classes, (shape.rows,), generator=gen, device=device)
            )
        self.xs_nograd = [x.detach() for x in self.xs]
        # In-place contenders overwrite their input with the gradient. Each buffer is restored
        # from its pristine copy after every call, outside the clock; it is next used n - 1 calls
        # later, after other buffers have gone through the caches, so the restore flatters nothing.
        self.sources = [x.clone() for x in self.xs_nograd]
        self.copy_dst = torch.empty_like(self.xs_nograd[0])
        self.copy_samples: list[float] = []
        self.flush = (
            torch.empty(256 << 20, dtype=torch.int8, device=device)
            if device.type == "cuda"
            else None
        )

    # -- steps: ``step(i)`` runs one call on buffer i mod n and returns what it produced

    def fwd_bwd_step(self, fn: LossFn) -> Callable[[int], object]:
        def step(i: int):
            x = self.xs[i % self.n]
            # A view is a non-leaf, as logits from a model are, so in-place backward may write the
            # gradient into its storage; the leaf behind it is never touched by autograd.
            xv = x.view_as(x)
            loss = fn(xv, self.ts[i % self.n])
            (grad,) = torch.autograd.grad(loss, xv)
            return loss, grad

        return step

    def fwd_step(self, fn: LossFn) -> Callable[[int], object]:
        def step(i: int):
            with torch.no_grad():
                return fn(self.xs_nograd[i % self.n], self.ts[i % self.n])

        return step

    def restore(self, i: int) -> None:
        self.xs_nograd[i % self.n].copy_(self.sources[i % self.n])

    def sample_copy_floor(self, first: bool) -> None:
        """Time copies of the logits: a full measurement first, then a few before each contender,
        so that the floor's median spans the same stretch of time as the contenders' medians."""

        def step(i: int):
            return self.copy_dst.copy_(self.xs_nograd[i % self.n])

        if first:
            self.copy_samples += self.timed(step)[0]
        else:
            self.copy_samples += time_calls(step, self.device, self.settings.min_reps, self.flush)

    def timed(
        self,
        step: Callable[[int], object],
        hint_s: float | None = None,
        after: Callable[[int], object] | None = None,
    ) -> tuple[list[float], int]:
        """Warm up, pick the repetitions from the warm-up time, time them; no times if too slow.

        ``hint_s``: the time of the call that measured the memory, made just before (on the CPU
        the correctness check, under the profiler). A CPU call so slow that the minimum
        repetitions fill the budget gets no further warm-up: that call has warmed it already.
        """
        s = self.settings
        if hint_s is not None and hint_s > s.max_call_s:
            return [], 0
        warm = []
        if not (self.device.type == "cpu" and hint_s and hint_s * s.min_reps >= s.budget_s):
            for i in range(s.warmup):
                synchronize(self.device)
                start = time.perf_counter()
                out = step(i)
                synchronize(self.device)
                warm.append(time.perf_counter() - start)
                del out
                if after is not None:
                    after(i)
        estimate = max(min(warm) if warm else hint_s, 1e-6)
        if estimate > s.max_call_s:
            return [], 0
        reps = max(s.min_reps, min(s.max_reps, math.ceil(s.budget_s / estimate)))
        return time_calls(step, self.device, reps, self.flush, after), reps

    # -- the contenders

    def check(
        self, c: Contender, fn: LossFn, ref_loss: float, ref_grad: Tensor, ref_scale: float
    ) -> dict[str, Outcome]:
        """Run fwd+bwd and fwd-only once on fresh copies of buffer 0 and judge them.

        An in-place variant's fwd-only call is its default twin's, so it is neither run nor timed.
        On the CPU these calls also measure the peak memory (saving two slow calls on big shapes),
        unless the contender compiles on its first call; on CUDA the first call may autotune.
        """
        loss_rtol, grad_rtol, grad_atol = TOLERANCES[self.shape.dtype]
        if c.precise_loss:
            loss_rtol = min(loss_rtol, PRECISE_LOSS_RTOL)
        with_memory = self.device.type == "cpu" and not c.compiles
        t = self.ts[0]
        x = self.sources[0].clone().requires_grad_()
        xv = x.view_as(x)  # a non-leaf, like a model's logits: in-place backward applies

        def fwd_bwd():
            loss = fn(xv, t)
            return loss, torch.autograd.grad(loss, xv)[0]

        calls = [("fwd+bwd", fwd_bwd)]
        if not c.fwd_twin:
            x_fwd = self.sources[0].clone()

            def fwd():
                with torch.no_grad():
                    return fn(x_fwd, t), None

            calls.append(("fwd", fwd))
        results = {"fwd": Outcome(f"= {c.fwd_twin}")}
        grad = None
        for pass_name, call in calls:
            if with_memory:
                (value, grad_out), extra, seconds = run_measured(call, self.device)
            else:
                (value, grad_out), extra, seconds = call(), None, None
            if grad_out is not None:
                grad = grad_out
            value = value.detach()
            loss_value = float(value.double())
            err = abs(loss_value - ref_loss) / abs(ref_loss)
            status = "ok"
            if value.numel() != 1 or not err <= loss_rtol:
                status = f"WRONG ({pass_name} loss err {err:.1e} > {loss_rtol:.0e})"
            results[pass_name] = Outcome(
                status,
                extra_bytes=extra,
                call_s=seconds,
                loss=loss_value,
                loss_dtype=dtype_name(value.dtype),
                loss_rel_err=err,
            )
        grad_err, close = compare_grad(grad, ref_grad, ref_scale, grad_rtol, grad_atol)
        results["fwd+bwd"].grad_rel_err = grad_err
        if not close:
            results["fwd+bwd"].status = f"WRONG (grad err {grad_err:.1e}, rtol {grad_rtol:.0e})"
        wrong = [r.status for r in results.values() if r.status.startswith("WRONG")]
        if wrong:  # a contender that disagrees anywhere is timed nowhere
            for r in results.values():
                r.status = wrong[0]
        return results

    def measure(
        self, c: Contender, ref_loss: float, ref_grad: Tensor, ref_scale: float, tag: str
    ) -> dict[str, Outcome]:
        if c.status != "ok":
            return {p: Outcome(c.status) for p in PASSES}
        need = c.dense_bytes_per_element * self.shape.numel + 2 * self.shape.nbytes
        if c.dense_bytes_per_element and need > self.settings.dense_limit_bytes:
            why = (
                f"skipped (needs ~{need / 2**30:.1f} GiB > "
                f"{self.settings.dense_limit_bytes / 2**30:.1f} GiB)"
            )
            return {p: Outcome(why) for p in PASSES}
        self.progress(f"{tag} | {c.name} | checking against float64")
        try:
            fn = c.make()
            results = self.check(c, fn, ref_loss, ref_grad, ref_scale)
        except Exception as err:
            return {p: Outcome(f"failed: {short(err)}") for p in PASSES}
        if results["fwd+bwd"].status != "ok":
            return results
        for pass_name in PASSES:
            out = results[pass_name]
            if out.status != "ok":  # the fwd-only pass of an in-place twin
                continue
            make_step = self.fwd_bwd_step if pass_name == "fwd+bwd" else self.fwd_step
            step = make_step(fn)
            after = self.restore if c.inplace else None
            try:
                if out.call_s is None:  # not measured by the check
                    self.progress(f"{tag} | {c.name} | {pass_name}: peak memory")
                    measured = run_measured(lambda s=step: s(0), self.device)
                    out.extra_bytes, out.call_s = measured[1:]
                    del measured  # not the outputs: they would stay alive while timing
                    if after is not None:
                        after(0)
                self.progress(f"{tag} | {c.name} | {pass_name}: timing")
                times, out.reps = self.timed(step, out.call_s, after)
                if not times:
                    out.status = f"skipped (one call takes over {self.settings.max_call_s:.0f} s)"
                    continue
                out.time_s, out.times_s = median(times), times
            except Exception as err:
                out.status = f"failed: {short(err)}"
        return results

    def run(self, contenders: list[Contender], tag: str) -> ShapeRun:
        result = ShapeRun(self.shape, n_buffers=self.n)
        self.progress(f"{tag} | float64 reference")
        ref_loss, ref_grad = float64_reference(self.sources[0], self.ts[0])
        ref_scale = ref_grad.abs().max().item()
        result.ref_loss = ref_loss
        self.progress(f"{tag} | copy floor")
        self.sample_copy_floor(first=True)
        for c in contenders:
            if c.status == "ok":
                self.sample_copy_floor(first=False)
            result.outcomes[c.name] = self.measure(c, ref_loss, ref_grad, ref_scale, tag)
            if c.inplace:  # in case a failure left a buffer overwritten
                for i in range(self.n):
                    self.restore(i)
        self.sample_copy_floor(first=False)
        result.copy_s, result.copy_samples = median(self.copy_samples), self.copy_samples
        return result


# ----------------------------------------------------------------------------------------------
# Report


def records_for(run: ShapeRun, contenders: list[Contender], device: torch.device) -> list[dict]:
    shape = run.shape
    eager = run.outcomes.get("torch eager", {})
    records = []
    for c in contenders:
        for pass_name in PASSES:
            out = run.outcomes[c.name][pass_name]
            floor_bytes = shape.nbytes * (2 if pass_name == "fwd+bwd" else 1)
            t = out.time_s
            eager_t = eager.get(pass_name, Outcome()).time_s
            records.append(
                {
                    "shape": shape.size_label,
                    "rows": shape.rows,
                    "classes": shape.classes,
                    "dtype": dtype_name(shape.dtype),
                    "device": device.type,
                    "contender": c.name,
                    "kind": c.kind,
                    "backend": c.backend,
                    "inplace": c.inplace,
                    "pass": pass_name,
                    "status": out.status,
                    "time_ms": t * 1e3 if t is not None else None,
                    "reps": out.reps,
                    "times_ms": [round(x * 1e3, 4) for x in out.times_s],
                    "copy_ms": run.copy_s * 1e3,
                    "copy_samples": len(run.copy_samples),
                    "copy_min_ms": min(run.copy_samples) * 1e3,
                    "ratio_to_copy": t / run.copy_s if t is not None else None,
                    "speedup_vs_eager": eager_t / t if t is not None and eager_t else None,
                    "gb_per_s": floor_bytes / t / 1e9 if t is not None else None,
                    "extra_mem_bytes": out.extra_bytes,
                    "extra_mem_x": (
                        out.extra_bytes / shape.nbytes if out.extra_bytes is not None else None
                    ),
                    "loss": out.loss,
                    "loss_dtype": out.loss_dtype,
                    "ref_loss": run.ref_loss,
                    "loss_rel_err": out.loss_rel_err,
                    "grad_rel_err": out.grad_rel_err,
                    "logits_bytes": shape.nbytes,
                    "n_buffers": run.n_buffers,
                }
            )
    return records


HEADERS = [
    "contender",
    "f+b/copy",
    "fwd/copy",
    "vs eager",
    "f+b ms",
    "fwd ms",
    "f+b GB/s",
    "mem f+b",
    "mem fwd",
    "loss err",
    "grad err",
]


def shape_table(run: ShapeRun, records: list[dict], device: torch.device) -> str:
    shape = run.shape
    by_name: dict[str, dict[str, dict]] = {}
    for r in records:
        by_name.setdefault(r["contender"], {})[r["pass"]] = r
    rows = []
    for name, passes in by_name.items():
        fb, fw = passes["fwd+bwd"], passes["fwd"]
        if fb["status"] != "ok":
            rows.append([name, fb["status"]])
            continue
        twin = fw["status"].startswith("= ")
        fw_ok = fw["status"] == "ok"
        errs = [e for e in (fb["loss_rel_err"], fw["loss_rel_err"]) if e is not None]
        rows.append(
            [
                name,
                fmt(fb["ratio_to_copy"], ".2f", "x"),
                "= default" if twin else fmt(fw["ratio_to_copy"], ".2f", "x") if fw_ok else "-",
                fmt(fb["speedup_vs_eager"], ".1f", "x"),
                fmt(fb["time_ms"], ".3f" if fb["time_ms"] < 10 else ".1f"),
                fmt(fw["time_ms"], ".3f" if (fw["time_ms"] or 0) < 10 else ".1f"),
                fmt(fb["gb_per_s"], ".1f"),
                fmt(fb["extra_mem_x"], ".2f", "x"),
                fmt(fw["extra_mem_x"], ".2f", "x"),
                fmt(max(errs) if errs else None, ".1e"),
                fmt(fb["grad_rel_err"], ".1e"),
            ]
        )
        if fw["status"] not in ("ok",) and not twin:
            rows.append(["", f"fwd: {fw['status']}"])
    copy_ms = run.copy_s * 1e3
    copy_gbps = 2 * shape.nbytes / run.copy_s / 1e9
    title = (
        f"== {shape.rows} x {shape.classes} {dtype_name(shape.dtype)} on {device.type}: "
        f"copy floor {copy_ms:.3f} ms ({copy_gbps:.1f} GB/s), logits "
        f"{shape.nbytes / 2**20:.1f} MiB, float64 ref loss {run.ref_loss:.6f}, "
        f"{run.n_buffers} input buffers =="
    )
    return "\n".join([title, format_table(HEADERS, rows), run.target])


CPU_TARGET_SHAPES = {(2048, 32000, torch.float32), (1024, 128256, torch.bfloat16)}


def best_lsr(records: list[dict], inplace: bool) -> dict | None:
    rows = [
        r
        for r in records
        if r["kind"] == "lsr_fused"
        and r["inplace"] == inplace
        and r["pass"] == "fwd+bwd"
        and r["time_ms"] is not None
    ]
    return min(rows, key=lambda r: r["time_ms"]) if rows else None


def target_line(run: ShapeRun, records: list[dict], device: torch.device) -> str:
    """One line comparing the best lsr_fused rows with the project's targets for this shape."""
    shape = run.shape
    default, inplace = best_lsr(records, False), best_lsr(records, True)
    fwd = {r["contender"]: r for r in records if r["pass"] == "fwd"}

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    if device.type == "cpu":
        where = (
            ""
            if (shape.rows, shape.classes, shape.dtype) in CPU_TARGET_SHAPES
            else ", informational: quoted at 2048x32000 float32 and 1024x128256 bfloat16"
        )
        head = f"target (CPU fwd+bwd: >= 5x faster than torch eager, <= 3x copy{where}):"
        parts = []
        for r in (default, inplace):
            if r is None:
                continue
            speed = r["speedup_vs_eager"]
            ok = speed is not None and speed >= 5 and r["ratio_to_copy"] <= 3
            parts.append(
                f"{r['contender']} {fmt(speed, '.1f', 'x')} faster, "
                f"{r['ratio_to_copy']:.2f}x copy: {verdict(ok)}"
            )
        return f"{head} {'; '.join(parts) if parts else 'no lsr_fused row was timed'}"
    if shape.dtype == torch.bfloat16 and shape.classes >= 32000:
        head = (
            "target (CUDA bf16: fwd+bwd <= 1.3x copy, fwd <= 0.55x copy, extra memory 0 "
            "in-place / <= 1x default):"
        )
        parts = []
        if default is not None:
            fw = fwd.get(default["contender"], {})
            fw_ratio = fw.get("ratio_to_copy")
            mem = default["extra_mem_x"]
            ok = (
                default["ratio_to_copy"] <= 1.3
                and fw_ratio is not None
                and fw_ratio <= 0.55
                and mem is not None
                and mem <= 1.01
            )
            parts.append(
                f"{default['contender']} {default['ratio_to_copy']:.2f}x / "
                f"fwd {fmt(fw_ratio, '.2f', 'x')} / mem {fmt(mem, '.2f', 'x')}: "
                f"{verdict(ok)}"
            )
        if inplace is not None:
            mem = inplace["extra_mem_x"]
            ok = inplace["ratio_to_copy"] <= 1.3 and mem is not None and mem <= 0.01
            parts.append(
                f"{inplace['contender']} {inplace['ratio_to_copy']:.2f}x / mem "
                f"{fmt(mem, '.2f', 'x')}: {verdict(ok)}"
            )
        return f"{head} {'; '.join(parts) if parts else 'no lsr_fused row was timed'}"
    if (shape.rows, shape.classes, shape.dtype) == (4096, 1000, torch.float32):
        head = "target (CUDA 4096x1000 float32: fwd+bwd < 0.1 ms):"
        parts = [
            f"{r['contender']} {r['time_ms']:.3f} ms: {verdict(r['time_ms'] < 0.1)}"
            for r in (default, inplace)
            if r is not None
        ]
        return f"{head} {'; '.join(parts) if parts else 'no lsr_fused row was timed'}"
    return "target: none quoted for this shape (launch-bound: absolute times matter)"


def plot(records: list[dict], path: Path, title: str) -> None:
    """Bars per shape and contender: fwd+bwd / copy, fwd / copy (log scale) and extra memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(f"{r['shape']}\n{r['dtype']}" for r in records))
    names = list(
        dict.fromkeys(
            r["contender"]
            for r in records
            if r["time_ms"] is not None or r["extra_mem_x"] is not None
        )
    )
    panels = [
        ("fwd+bwd", "ratio_to_copy", "fwd+bwd time / copy floor"),
        ("fwd", "ratio_to_copy", "forward time / copy floor"),
        ("fwd+bwd", "extra_mem_x", "fwd+bwd extra memory (x logits)"),
    ]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(max(9, 2.4 * len(shapes) + 3), 13), layout="constrained"
    )
    width = 0.8 / max(1, len(names))
    colors = plt.get_cmap("tab20").colors
    for ax, (pass_name, key, label) in zip(axes, panels, strict=True):
        for j, name in enumerate(names):
            xs, ys = [], []
            for i, shape in enumerate(shapes):
                for r in records:
                    if (
                        f"{r['shape']}\n{r['dtype']}" == shape
                        and r["contender"] == name
                        and r["pass"] == pass_name
                        and r[key] is not None
                    ):
                        xs.append(i - 0.4 + (j + 0.5) * width)
                        ys.append(r[key])
            bars = ax.bar(xs, ys, width, label=name, color=colors[j % len(colors)])
            ax.bar_label(bars, fmt="%.2g", fontsize=6, rotation=90, padding=2)
        ax.set_ylabel(label)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes)
        if key == "ratio_to_copy":
            ax.set_yscale("log")
            ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
            if pass_name == "fwd":
                ax.axhline(0.5, color="gray", linewidth=0.8, linestyle=":")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(names)), fontsize=8)
    fig.suptitle("\n".join(textwrap.wrap(title, 110)), fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=COLUMN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="where to run (default: cuda if available, else cpu)",
    )
    parser.add_argument(
        "--shapes",
        default=None,
        help="comma-separated NxC[:dtype] list (default on cuda: "
        f"{DEFAULT_SHAPES['cuda'].replace(',', ', ')}; on cpu: "
        f"{DEFAULT_SHAPES['cpu'].replace(',', ', ')})",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        help="dtype of every shape (float32, bfloat16, float16, float64): replaces the "
        "default shapes' dtypes; a --shapes entry's own :dtype wins over it",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny shapes, 1-2 repetitions, no torch.compile: a smoke test",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="directory for <device>.json, .txt and .png (default: %(default)s)",
    )
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated substrings: run only contenders whose name has one",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds of timing per (contender, pass) (default: 1.0 on cpu, 0.5 on cuda)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available here", file=sys.stderr)
        return 2
    table = QUICK_SHAPES if args.quick else DEFAULT_SHAPES
    try:
        dtype = parse_dtype(args.dtype) if args.dtype else None
        if args.shapes:
            shapes = parse_shapes(args.shapes, dtype)
        else:  # --dtype overrides the defaults' own dtypes
            shapes = [
                Shape(s.rows, s.classes, dtype or s.dtype)
                for s in parse_shapes(table[device.type], None)
            ]
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    settings = settings_for(device, args.quick)
    if args.budget is not None:
        settings.budget_s = args.budget
    progress = Progress(not args.no_progress)
    progress("importing contenders")
    contenders = build_contenders(device, args.quick)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        for c in contenders:
            if c.status == "ok" and not any(w in c.name for w in wanted):
                c.status = "skipped (--only)"

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
        bench = ShapeBench(shape, device, settings, progress, args.seed + i)
        run = bench.run(contenders, tag)
        del bench
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

    args.out.mkdir(parents=True, exist_ok=True)
    stem = device_slug(device)
    elapsed = time.perf_counter() - started
    info["elapsed_s"] = round(elapsed, 1)
    info["load_average_end"] = load_average()
    settings_record = dict(vars(settings))
    payload = {
        "machine": info,
        "label_smoothing": LABEL_SMOOTHING,
        "quick": args.quick,
        "settings": settings_record,
        "targets": targets,
        "records": records,
    }
    json_path, txt_path, png_path = (args.out / f"{stem}{ext}" for ext in (".json", ".txt", ".png"))
    json_path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    txt_path.write_text("\n\n".join(tables) + "\n")
    progress("plotting")
    try:
        plot(records, png_path, header)
    except Exception as err:  # a plot is not worth losing the numbers for
        print(f"plot failed: {short(err)}", file=sys.stderr)
    progress.done()
    print(f"\nwrote {json_path}, {txt_path}, {png_path} ({elapsed:.0f} s)")
    return 0


def lsr_fused_info() -> dict:
    try:
        lsr_fused = import_lsr_fused()
    except Exception as err:
        return {"error": short(err)}
    return {
        "version": getattr(lsr_fused, "__version__", None),
        "path": str(Path(lsr_fused.__file__).parent),
    }


if __name__ == "__main__":
    sys.exit(main())
