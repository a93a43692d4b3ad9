"""What every benchmark script shares that is neither measuring nor reporting: dtypes and shapes,
the machine's description, the progress line, short error texts.

``measure.py`` times and weighs contenders, ``report.py`` turns the measurements into tables, JSON
and a plot; a script such as ``bench_loss.py`` names its contenders and inputs and drives the three.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
from dataclasses import dataclass

import torch

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


def pick_shapes(shapes: str | None, dtype: str | None, defaults: str) -> list[Shape]:
    """The shapes to run: ``shapes`` if given (``dtype`` fills in those without their own), else
    ``defaults`` with every dtype replaced by ``dtype`` when given. Raises ValueError."""
    chosen = parse_dtype(dtype) if dtype else None
    if shapes:
        return parse_shapes(shapes, chosen)
    return [Shape(s.rows, s.classes, chosen or s.dtype) for s in parse_shapes(defaults, None)]


def short(err: BaseException, limit: int = 90) -> str:
    """The first line of an exception, type included, cut to ``limit`` characters."""
    text = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
