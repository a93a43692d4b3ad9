"""Measuring contenders on one input size: first correct, then how much memory, then how fast.

Nothing here knows which function is computed. A script describes one input size as a
:class:`Workload` (its buffers, its reference check, how to call a contender on them and what the
floor copies) and its implementations as :class:`Contender` s; :class:`Bench` then runs, for each
contender, the check, the peak-memory measurement and the timings, in two scenarios:

* ``tight``: the contender called back to back, as most kernel benchmarks do;
* ``train``: every timed call separated, outside the clock, by a "churn" that stands for the rest
  of a training step (:class:`AllocChurn`: model-sized tensors allocated, written and freed;
  :class:`StepChurn`: any other step, such as a torch eager loss). A fresh output buffer costs
  what the memory system makes it cost after such churn, which a tight loop never shows.

The floor (the time to copy the main input once) is sampled in both scenarios all along the run, so
that each ratio divides two numbers taken under the same conditions.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from _common import Shape, short
from torch import Tensor

T = TypeVar("T")
Step = Callable[[int], object]  # one call on buffer i mod n; returns what the call produced
Hook = Callable[[int], object]  # runs after call i, outside the clock
LossFn = Callable[..., Tensor]

PASSES = ("fwd+bwd", "fwd")
SCENARIOS = ("tight", "train")
TRAIN_PASS = "fwd+bwd"  # the training loop times the pass a training step makes


@dataclass
class Settings:
    """How long and how hard to measure; see ``settings_for``."""

    budget_s: float  # time spent timing one (contender, pass, scenario), which sets the repetitions
    min_reps: int
    max_reps: int
    warmup: int  # untimed calls before timing (after the correctness check)
    max_call_s: float  # a contender whose warm fwd+bwd call takes longer is skipped
    dense_limit_bytes: float  # a contender with a dense estimate above this is skipped
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
    # A dense contender needing over 2 GiB is skipped: small CPU machines have little memory (the
    # one-hot row at 1024x128256 would take 2.6 GiB and a minute).
    return Settings(1.0, 3, 50, 1, 10.0, 2 << 30, 256 << 20, 16)


@dataclass
class Contender:
    """One implementation to time; ``make()`` is called once per shape and returns the function."""

    name: str
    make: Callable[[], LossFn] | None = None
    status: str = "ok"  # anything else: the row shows it and nothing runs
    kind: str = "baseline"  # "lsr_fused" or "baseline"
    backend: str | None = None
    inplace: bool = False  # may overwrite its input buffer (the gradient is written into it)
    fwd_twin: str | None = None  # fwd-only is the same call as this contender's: not timed again
    precise_loss: bool = False  # promises a float32 (or float64) loss whatever the input dtype
    compiles: bool = False  # its first call compiles: no memory measurement then
    dense_bytes_per_element: float = 0.0  # estimated peak bytes per element (0: not estimated)


def apply_only(contenders: list[Contender], only: str | None) -> None:
    """``--only a,b``: mark every runnable contender whose name contains none of them skipped."""
    wanted = [w.strip() for w in (only or "").split(",") if w.strip()]
    if not wanted:
        return
    for c in contenders:
        if c.status == "ok" and not any(w in c.name for w in wanted):
            c.status = "skipped (--only)"


@dataclass
class Timing:
    """The times of one (contender, pass) in one scenario."""

    status: str = "ok"
    time_s: float | None = None  # the median of times_s
    times_s: list[float] = field(default_factory=list)
    reps: int = 0


@dataclass
class Outcome(Timing):
    """One (contender, pass): the tight-loop timing, the check, the memory, and ``train``, the
    training-loop timing (fwd+bwd only, None when that scenario is off)."""

    extra_bytes: int | None = None
    loss: float | None = None
    loss_dtype: str | None = None
    loss_rel_err: float | None = None
    grad_rel_err: float | None = None
    call_s: float | None = None  # the time of the call that measured the memory
    train: Timing | None = None


# ----------------------------------------------------------------------------------------------
# Clocks and memory


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    step: Step,
    device: torch.device,
    reps: int,
    flush: Tensor | None = None,
    after: Hook | None = None,
) -> list[float]:
    """Seconds per call of ``step(i)`` for ``i in range(reps)``; the caller has warmed it up.

    CPU: ``time.perf_counter`` around each call. CUDA: a pair of CUDA events around each call, with
    ``flush`` (a large buffer) zeroed between calls, outside the events, so that L2 starts cold as
    in ``triton.testing.do_bench``. What ``step`` returns is released only after the clock stops.
    ``after(i)``, if given, runs after call ``i``, outside the clock.
    """
    times = []
    if device.type == "cuda":
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(reps)
        ]
        synchronize(device)
        for i, (start, end) in enumerate(events):
            if flush is not None:
                flush.zero_()
            start.record()
            out = step(i)
            end.record()
            del out
            if after is not None:
                after(i)
        synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    for i in range(reps):
        start = time.perf_counter()
        out = step(i)
        times.append(time.perf_counter() - start)
        del out
        if after is not None:
            after(i)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def run_measured(step: Callable[[], T], device: torch.device) -> tuple[T, int | None, float]:
    """Call ``step()`` once; return what it returned, the peak bytes it allocated beyond what was
    allocated before it, and the seconds it took (an upper bound of its usual time: on the CPU it
    runs under a profiler).

    What ``step`` returns (the loss, the gradient) is alive at its end, so it counts.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the bytes
    allocated before the call.

    CPU: PyTorch keeps no allocation statistics for the CPU, so the call runs under
    ``torch.profiler`` with ``profile_memory=True``, which records every allocation and free made
    through c10's CPU allocator (all tensors, including those of compiled extensions and of
    torch.compile's generated code) with a timestamp. The running sum of those records, in time
    order, is the bytes allocated since the call started; its maximum is the peak. Memory obtained
    with plain ``malloc`` outside tensors (small scratch, if any) is not seen. Returns None if the
    profiler's event tree is unavailable in this torch version.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        out = step()
        synchronize(device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device)
        return out, max(0, peak - base), seconds
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        start = time.perf_counter()
        out = step()
        seconds = time.perf_counter() - start
    try:
        from torch._C._profiler import _EventType

        roots = prof.profiler.kineto_results.experimental_event_tree()
    except (AttributeError, ImportError, RuntimeError):
        return out, None, seconds
    allocations = []
    stack = list(roots)
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.typed[0] == _EventType.Allocation:
            fields = node.typed[1]
            if fields.device.type == "cpu":
                allocations.append((node.start_time_ns, fields.alloc_size))
    allocations.sort(key=lambda item: item[0])
    running = peak = 0
    for _, size in allocations:
        running += size
        peak = max(peak, running)
    return out, peak, seconds


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2 (Kineto logs each profiler start and stop there, from C++)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# ----------------------------------------------------------------------------------------------
# The training-loop scenario: what runs between two timed calls


class AllocChurn:
    """The memory traffic of the rest of a training step, between two timed calls.

    Each call allocates ``count`` tensors of ``nbytes`` each and writes every byte of them (a
    model's forward writes its activations), then frees all but the last, which lives until the
    next churn: the pages the allocator and the kernel hand out next are never those of a moment
    ago, and a fresh output buffer pays what the memory system charges after such traffic (page
    faults, huge-page compaction, cold caches). ``nbytes`` is the main input's size, so that the
    churn scales with the model as the logits do.
    """

    def __init__(self, nbytes: int, device: torch.device, count: int = 3):
        self.nbytes, self.device, self.count = nbytes, device, count
        self.held: Tensor | None = None

    def describe(self) -> str:
        return f"{self.count} input-sized tensors allocated, written and freed between calls"

    def __call__(self, i: int) -> None:
        made = []
        for k in range(self.count):
            made.append(torch.empty(self.nbytes, dtype=torch.uint8, device=self.device))
            made[-1].fill_(k + 1)
        self.held = made.pop()  # frees the previous survivor
        del made

    def release(self) -> None:
        self.held = None


class StepChurn:
    """Between two timed calls, run ``step()`` (for example one torch eager loss step on a buffer of
    its own) and drop what it returns."""

    def __init__(self, step: Callable[[], object], what: str):
        self.step, self.what = step, what

    def describe(self) -> str:
        return f"{self.what} between calls"

    def __call__(self, i: int) -> None:
        out = self.step()
        del out

    def release(self) -> None:
        pass


Churn = AllocChurn | StepChurn


# ----------------------------------------------------------------------------------------------
# One input size


class Workload:
    """One input size of one benchmark. A script subclasses it; ``Bench`` drives it.

    Attributes to set: ``shape``, ``device``, ``n`` (buffers rotated over), ``nbytes`` (the main
    input's size: what the floor copies), ``flush`` (a CUDA buffer zeroed between calls, or None),
    ``notes`` (facts for every record, such as the reference loss).
    """

    shape: Shape
    device: torch.device
    n: int
    nbytes: int
    flush: Tensor | None = None
    notes: dict

    def prepare(self, progress: Callable[[str], None]) -> None:
        """Compute the reference (once, before any contender)."""

    def floor_step(self) -> Step:
        """One copy of the main input (into a buffer that already exists): the floor."""
        raise NotImplementedError

    def step(self, fn: LossFn, pass_name: str) -> Step:
        raise NotImplementedError

    def restore(self, i: int) -> None:
        """Undo what an in-place contender did to buffer ``i mod n``."""

    def check(self, c: Contender, fn: LossFn, with_memory: bool) -> dict[str, Outcome]:
        """Run each pass once on fresh inputs and judge it against the reference; with
        ``with_memory``, under ``run_measured`` (filling ``extra_bytes`` and ``call_s``)."""
        raise NotImplementedError


@dataclass
class ShapeRun:
    """Everything measured for one input size."""

    shape: Shape
    n_buffers: int
    notes: dict
    floor_samples: dict[str, list[float]] = field(default_factory=dict)  # per scenario
    outcomes: dict[str, dict[str, Outcome]] = field(default_factory=dict)
    churn: str | None = None  # what the training loop ran between calls; None: scenario off
    target: str = ""

    def floor_s(self, scenario: str = "tight") -> float | None:
        samples = self.floor_samples.get(scenario)
        return median(samples) if samples else None


def _chain(*hooks: Hook | None) -> Hook | None:
    live = [h for h in hooks if h is not None]
    if not live:
        return None
    if len(live) == 1:
        return live[0]

    def run(i: int) -> None:
        for h in live:
            h(i)

    return run


class Bench:
    """Check, weigh and time contenders on one ``Workload``, in the tight loop and, given a churn,
    in the training loop."""

    def __init__(
        self,
        workload: Workload,
        settings: Settings,
        progress: Callable[[str], None],
        churn: Churn | None = None,
    ):
        self.w, self.settings, self.progress, self.churn = workload, settings, progress, churn
        self.device = workload.device
        self.floor: dict[str, list[float]] = {s: [] for s in self.scenarios}

    @property
    def scenarios(self) -> tuple[str, ...]:
        return SCENARIOS if self.churn is not None else SCENARIOS[:1]

    def sample_floor(self, scenario: str, first: bool) -> None:
        """Time copies of the main input: a full measurement first, then a few before each
        contender, so that the floor's median spans the same stretch of time as the contenders'."""
        step = self.w.floor_step()
        after = self.churn if scenario == "train" else None
        if after is not None:  # the first call, too, follows a churn
            after(-1)
        if first and after is None:
            times = self.timed(step)[0]
        elif first:  # the churn may cost far more than the copy: a fixed, small count
            times = time_calls(step, self.device, 3 * self.settings.min_reps, self.w.flush, after)
        else:
            times = time_calls(step, self.device, self.settings.min_reps, self.w.flush, after)
        self.floor[scenario] += times

    def timed(
        self, step: Step, hint_s: float | None = None, after: Hook | None = None
    ) -> tuple[list[float], int]:
        """Warm up, pick the repetitions from the warm-up time, time them; no times if too slow.

        ``hint_s``: a time the call is known to take at most: in the tight loop that of the call
        that measured the memory, made just before (on the CPU under the profiler); in the
        training loop the tight loop's median, so that a slow first call after a churn does not
        cut the repetitions. A CPU call so slow that the minimum repetitions fill the budget gets
        no further warm-up: that call has warmed it already. The budget counts the timed calls
        and what runs between them (``after``: restores, the training loop's churn, timed in the
        warm-up), so that a fast call between slow churn steps is not repeated for minutes.
        """
        s = self.settings
        if hint_s is not None and hint_s > s.max_call_s:
            return [], 0
        warm, between = [], []
        if not (self.device.type == "cpu" and hint_s and hint_s * s.min_reps >= s.budget_s):
            for i in range(s.warmup):
                synchronize(self.device)
                start = time.perf_counter()
                out = step(i)
                synchronize(self.device)
                warm.append(time.perf_counter() - start)
                del out
                if after is not None:
                    start = time.perf_counter()
                    after(i)
                    synchronize(self.device)
                    between.append(time.perf_counter() - start)
        estimate = max(min(warm + ([hint_s] if hint_s else [])), 1e-6)
        if estimate > s.max_call_s:
            return [], 0
        per_rep = estimate + (min(between) if between else 0.0)
        reps = max(s.min_reps, min(s.max_reps, math.ceil(s.budget_s / per_rep)))
        return time_calls(step, self.device, reps, self.w.flush, after), reps

    def _time_into(self, out: Timing, step: Step, hint_s: float | None, after: Hook | None):
        times, out.reps = self.timed(step, hint_s, after)
        if not times:
            out.status = f"skipped (one call takes over {self.settings.max_call_s:.0f} s)"
        else:
            out.time_s, out.times_s = median(times), times

    def measure(self, c: Contender, tag: str) -> dict[str, Outcome]:
        if c.status != "ok":
            return {p: Outcome(c.status) for p in PASSES}
        shape = self.w.shape
        need = c.dense_bytes_per_element * shape.numel + 2 * shape.nbytes
        if c.dense_bytes_per_element and need > self.settings.dense_limit_bytes:
            why = (
                f"skipped (needs ~{need / 2**30:.1f} GiB > "
                f"{self.settings.dense_limit_bytes / 2**30:.1f} GiB)"
            )
            return {p: Outcome(why) for p in PASSES}
        self.progress(f"{tag} | {c.name} | checking against float64")
        try:
            fn = c.make()
            with_memory = self.device.type == "cpu" and not c.compiles
            results = self.w.check(c, fn, with_memory)
        except Exception as err:
            return {p: Outcome(f"failed: {short(err)}") for p in PASSES}
        if results["fwd+bwd"].status != "ok":
            return results
        restore = self.w.restore if c.inplace else None
        for pass_name in PASSES:
            out = results[pass_name]
            if out.status != "ok":  # the fwd-only pass of an in-place twin
                continue
            step = self.w.step(fn, pass_name)
            try:
                if out.call_s is None:  # not measured by the check
                    self.progress(f"{tag} | {c.name} | {pass_name}: peak memory")
                    measured = run_measured(lambda s=step: s(0), self.device)
                    out.extra_bytes, out.call_s = measured[1:]
                    del measured  # not the outputs: they would stay alive while timing
                    if restore is not None:
                        restore(0)
                self.progress(f"{tag} | {c.name} | {pass_name}: timing")
                self._time_into(out, step, out.call_s, restore)
            except Exception as err:
                out.status = f"failed: {short(err)}"
        fb = results[TRAIN_PASS]
        if self.churn is not None and fb.status == "ok":
            fb.train = Timing()
            self.sample_floor("train", first=False)
            self.progress(f"{tag} | {c.name} | {TRAIN_PASS}: timing in the training loop")
            try:
                step = self.w.step(fn, TRAIN_PASS)
                self.churn(-1)  # the first call, too, follows a churn
                self._time_into(fb.train, step, fb.time_s, _chain(restore, self.churn))
            except Exception as err:
                fb.train.status = f"failed: {short(err)}"
            finally:
                self.churn.release()
        return results

    def run(self, contenders: list[Contender], tag: str) -> ShapeRun:
        self.progress(f"{tag} | float64 reference")
        self.w.prepare(self.progress)
        self.progress(f"{tag} | copy floor")
        for scenario in self.scenarios:
            self.sample_floor(scenario, first=True)
        if self.churn is not None:
            self.churn.release()
        result = ShapeRun(self.w.shape, self.w.n, self.w.notes)
        for c in contenders:
            if c.status == "ok":
                self.sample_floor("tight", first=False)
            result.outcomes[c.name] = self.measure(c, tag)
            if c.inplace:  # in case a failure left a buffer overwritten
                for i in range(self.w.n):
                    self.w.restore(i)
        self.sample_floor("tight", first=False)
        result.floor_samples = self.floor
        result.churn = self.churn.describe() if self.churn is not None else None
        return result
