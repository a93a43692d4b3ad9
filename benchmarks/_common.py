"""Helpers shared by the benchmarks: shapes, timers, peak extra memory, machine info, tables.

Nothing here knows about label smoothing; ``bench_loss.py`` holds the contenders and the report.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(text: str) -> torch.dtype:
    try:
        return DTYPES[text.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {text!r}; use one of {', '.join(DTYPES)}") from None


@dataclass(frozen=True)
class Shape:
    """A 2-D logits shape (rows x classes) and its dtype."""

    rows: int
    classes: int
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return self.rows * self.classes

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def size_label(self) -> str:
        return f"{self.rows}x{self.classes}"

    @property
    def label(self) -> str:
        return f"{self.size_label} {dtype_name(self.dtype)}"


def parse_shapes(text: str, dtype: torch.dtype | None) -> list[Shape]:
    """Parse ``"NxC[:dtype],..."``; a shape's own ``:dtype`` wins over ``dtype`` (else float32)."""
    shapes = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        size, _, own_dtype = item.partition(":")
        try:
            rows, classes = (int(part) for part in size.lower().split("x"))
        except ValueError:
            raise ValueError(f"bad shape {item!r}; expected NxC or NxC:dtype") from None
        if rows <= 0 or classes <= 1:
            raise ValueError(f"bad shape {item!r}; need N >= 1 and C >= 2")
        chosen = parse_dtype(own_dtype) if own_dtype else (dtype or torch.float32)
        shapes.append(Shape(rows, classes, chosen))
    if not shapes:
        raise ValueError("no shapes given")
    return shapes


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    step: Callable[[int], object],
    device: torch.device,
    reps: int,
    flush: torch.Tensor | None = None,
    after: Callable[[int], object] | None = None,
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


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def device_slug(device: torch.device) -> str:
    """File stem for results: ``cpu``, or ``cuda-`` and the card's name (``cuda-nvidia-h100``)."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).lower()
    words = "".join(ch if ch.isalnum() else " " for ch in name).split()
    return "-".join(["cuda", *words])


def load_average() -> float | None:
    """The 1-minute load average: other work on the machine makes CPU timings unreliable."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def machine_info(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": device_name(device),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "load_average_start": load_average(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def format_table(headers: list[str], rows: list[list[str]], left: int = 1) -> str:
    """Align columns: the first ``left`` columns flush left, the others flush right.

    A row with fewer cells than headers has its last cell run on to the end of the line (used for
    status messages such as "not installed").
    """
    widths = [len(h) for h in headers]
    for row in rows:
        sized = row if len(row) == len(headers) else row[:-1]  # a run-on cell sizes nothing
        for i, cell in enumerate(sized):
            widths[i] = max(widths[i], len(cell))

    def line(cells: list[str]) -> str:
        parts = []
        for i, cell in enumerate(cells):
            if len(cells) < len(headers) and i == len(cells) - 1:
                parts.append(cell)
            elif i < left:
                parts.append(cell.ljust(widths[i]))
            else:
                parts.append(cell.rjust(widths[i]))
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:{spec}}{suffix}"


class Progress:
    """A progress line on stderr: rewritten in place on a terminal, one line per step otherwise."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.width = 0

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            text = message[:150]
            sys.stderr.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            sys.stderr.write(message + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self.tty and self.width:
            sys.stderr.write("\r" + " " * self.width + "\r")
            sys.stderr.flush()
            self.width = 0
