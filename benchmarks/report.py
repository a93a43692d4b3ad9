"""From measurements to what a reader gets: JSON records, one table per shape, a PNG plot, files.

Generic over the benchmark: a record is one (shape, contender, pass); the tight loop's numbers are
its top-level fields and the training loop's, when that scenario ran, sit under ``"train"``. Ratios
are to the floor (the time to copy the main input once) measured in the same scenario, and to a
baseline contender (torch eager) measured in the same scenario.
"""

from __future__ import annotations

import json
import math
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path

import torch
from _common import device_slug, dtype_name, short
from measure import PASSES, Contender, Outcome, ShapeRun, Timing

BASELINE = "torch eager"


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:{spec}}{suffix}"


def ms(value: float | None) -> str:
    return fmt(value, ".3f" if (value or 0) < 10 else ".1f")


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


# ----------------------------------------------------------------------------------------------
# Records


def _train_record(train: Timing | None, run: ShapeRun, base: Timing | None) -> dict | None:
    if train is None:
        return None
    t, floor = train.time_s, run.floor_s("train")
    base_t = base.time_s if base is not None else None
    return {
        "status": train.status,
        "time_ms": t * 1e3 if t is not None else None,
        "reps": train.reps,
        "times_ms": [round(x * 1e3, 4) for x in train.times_s],
        "copy_ms": floor * 1e3 if floor is not None else None,
        "copy_samples": len(run.floor_samples.get("train", [])),
        "ratio_to_copy": t / floor if t is not None and floor else None,
        "speedup_vs_eager": base_t / t if t is not None and base_t else None,
        "churn": run.churn,
    }


def records_for(run: ShapeRun, contenders: list[Contender], device: torch.device) -> list[dict]:
    """One record per (contender, pass) of one shape."""
    shape = run.shape
    base = run.outcomes.get(BASELINE, {})
    copy_s = run.floor_s("tight")
    copy_samples = run.floor_samples["tight"]
    records = []
    for c in contenders:
        for pass_name in PASSES:
            out = run.outcomes[c.name][pass_name]
            floor_bytes = shape.nbytes * (2 if pass_name == "fwd+bwd" else 1)
            t = out.time_s
            base_out = base.get(pass_name, Outcome())
            base_t = base_out.time_s
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
                    "copy_ms": copy_s * 1e3,
                    "copy_samples": len(copy_samples),
                    "copy_min_ms": min(copy_samples) * 1e3,
                    "ratio_to_copy": t / copy_s if t is not None else None,
                    "speedup_vs_eager": base_t / t if t is not None and base_t else None,
                    "gb_per_s": floor_bytes / t / 1e9 if t is not None else None,
                    "extra_mem_bytes": out.extra_bytes,
                    "extra_mem_x": (
                        out.extra_bytes / shape.nbytes if out.extra_bytes is not None else None
                    ),
                    "loss": out.loss,
                    "loss_dtype": out.loss_dtype,
                    **run.notes,
                    "loss_rel_err": out.loss_rel_err,
                    "grad_rel_err": out.grad_rel_err,
                    "logits_bytes": shape.nbytes,
                    "n_buffers": run.n_buffers,
                    "train": _train_record(out.train, run, base_out.train),
                }
            )
    return records


# ----------------------------------------------------------------------------------------------
# Tables

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
TRAIN_HEADERS = ["train f+b/copy", "train vs eager", "train f+b ms"]


def shape_table(run: ShapeRun, records: list[dict], device: torch.device) -> str:
    """The title line, one row per contender (training-loop columns last, when that scenario ran)
    and the run's target line."""
    shape = run.shape
    with_train = run.churn is not None
    headers = HEADERS + (TRAIN_HEADERS if with_train else [])
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
        row = [
            name,
            fmt(fb["ratio_to_copy"], ".2f", "x"),
            "= default" if twin else fmt(fw["ratio_to_copy"], ".2f", "x") if fw_ok else "-",
            fmt(fb["speedup_vs_eager"], ".1f", "x"),
            ms(fb["time_ms"]),
            ms(fw["time_ms"]),
            fmt(fb["gb_per_s"], ".1f"),
            fmt(fb["extra_mem_x"], ".2f", "x"),
            fmt(fw["extra_mem_x"], ".2f", "x"),
            fmt(max(errs) if errs else None, ".1e"),
            fmt(fb["grad_rel_err"], ".1e"),
        ]
        train = fb["train"]
        if with_train and train is not None and train["status"] == "ok":
            row += [
                fmt(train["ratio_to_copy"], ".2f", "x"),
                fmt(train["speedup_vs_eager"], ".1f", "x"),
                ms(train["time_ms"]),
            ]
        elif with_train:
            row += ["-", "-", train["status"] if train is not None else "-"]
        rows.append(row)
        if fw["status"] not in ("ok",) and not twin:
            rows.append(["", f"fwd: {fw['status']}"])
    copy_s = run.floor_s("tight")
    copy_gbps = 2 * shape.nbytes / copy_s / 1e9
    ref = f", float64 ref loss {run.notes['ref_loss']:.6f}" if "ref_loss" in run.notes else ""
    title = (
        f"== {shape.rows} x {shape.classes} {dtype_name(shape.dtype)} on {device.type}: "
        f"copy floor {copy_s * 1e3:.3f} ms ({copy_gbps:.1f} GB/s), logits "
        f"{shape.nbytes / 2**20:.1f} MiB{ref}, {run.n_buffers} input buffers =="
    )
    lines = [title]
    if with_train:
        train_floor = run.floor_s("train")
        lines.append(
            f"training loop (train columns, fwd+bwd): {run.churn}; "
            f"copy floor there {fmt(train_floor * 1e3 if train_floor else None, '.3f')} ms"
        )
    return "\n".join([*lines, format_table(headers, rows), run.target])


# ----------------------------------------------------------------------------------------------
# Plot and files


FLOOR_LINE = dict(color="black", linewidth=0.8, linestyle="--",
                  label="1.0x: copy floor (read the logits, write their gradient)")  # fmt: skip
READ_LINE = dict(color="gray", linewidth=0.8, linestyle=":",
                 label="0.5x: forward floor (read the logits once)")  # fmt: skip


def _style(line: dict) -> dict:
    """A reference line's style without its label (the legend names it once)."""
    return {k: v for k, v in line.items() if k != "label"}


def _bar_text(value: float) -> str:
    if value >= 10:
        return f"{value:.0f}"
    return f"{value:.2g}" if value >= 0.01 else "~0"


def plot(records: list[dict], path: Path, title: str) -> None:
    """Bars per shape and contender: fwd+bwd / copy (tight loop, then training loop when run),
    fwd / copy (log scale) and extra memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    shapes = list(dict.fromkeys(f"{r['shape']}\n{r['dtype']}" for r in records))
    names = list(
        dict.fromkeys(
            r["contender"]
            for r in records
            if r["time_ms"] is not None or r["extra_mem_x"] is not None
        )
    )

    def tight(key: str):
        return lambda r: r[key]

    def train(r: dict) -> float | None:
        return r["train"]["ratio_to_copy"] if r.get("train") else None

    panels = [("fwd+bwd", tight("ratio_to_copy"), "fwd+bwd time / copy floor\n(tight loop)")]
    if any(train(r) is not None for r in records):
        panels.append(("fwd+bwd", train, "fwd+bwd time / copy floor\n(training loop)"))
    panels += [
        ("fwd", tight("ratio_to_copy"), "forward time / copy floor"),
        ("fwd+bwd", tight("extra_mem_x"), "fwd+bwd extra memory\n(x logits)"),
    ]
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(max(9, 2.4 * len(shapes) + 3), 4.3 * len(panels)),
        layout="constrained",
    )
    width = 0.8 / max(1, len(names))
    colors = plt.get_cmap("tab20").colors
    for ax, (pass_name, value, label) in zip(axes, panels, strict=True):
        for j, name in enumerate(names):
            xs, ys = [], []
            for i, shape in enumerate(shapes):
                for r in records:
                    if (
                        f"{r['shape']}\n{r['dtype']}" == shape
                        and r["contender"] == name
                        and r["pass"] == pass_name
                        and value(r) is not None
                    ):
                        xs.append(i - 0.4 + (j + 0.5) * width)
                        ys.append(value(r))
            bars = ax.bar(xs, ys, width, label=name, color=colors[j % len(colors)])
            # Horizontal, short labels fit the bars' width, so neighbours never overlap.
            ax.bar_label(bars, labels=[_bar_text(y) for y in ys], fontsize=6, padding=1)
        ax.set_ylabel(label + "\nlower is better")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes)
        ax.margins(y=0.08)
        if "memory" not in label:
            ax.set_yscale("log")
            ax.axhline(1.0, **_style(FLOOR_LINE))
            if pass_name == "fwd":
                ax.axhline(0.5, **_style(READ_LINE))
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    for line in (FLOOR_LINE, READ_LINE):  # the reference lines, named once in the legend
        handles.append(Line2D([], [], **line))
        labels.append(line["label"])
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=8)
    fig.suptitle("\n".join(textwrap.wrap(title, 110)), fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(
    out_dir: Path,
    device: torch.device,
    payload: dict,
    tables: Iterable[str],
    title: str,
    progress=None,
) -> tuple[Path, Path, Path]:
    """Write ``<device>.json`` (``payload``), ``<device>.txt`` (the tables) and ``<device>.png``
    (the plot of ``payload["records"]``) under ``out_dir``; a failed plot is reported, not
    raised."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = device_slug(device)
    json_path, txt_path, png_path = (out_dir / f"{stem}{ext}" for ext in (".json", ".txt", ".png"))
    json_path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    txt_path.write_text("\n\n".join(tables) + "\n")
    if progress is not None:
        progress("plotting")
    try:
        plot(payload["records"], png_path, title)
    except Exception as err:  # a plot is not worth losing the numbers for
        print(f"plot failed: {short(err)}", file=sys.stderr)
    if progress is not None:
        progress.done()
    return json_path, txt_path, png_path
