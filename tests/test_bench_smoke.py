"""Smoke test of ``benchmarks/bench_loss.py --quick``: it runs, reports, and lsr_fused agrees.

Marked ``bench`` (deselect with ``-m "not bench"``); it takes well under a minute on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_loss.py"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # Run it as a user would: conftest turns on Triton's CPU interpreter for the unit tests.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout


def test_table_json_and_png_are_written(quick_run):
    out, stdout = quick_run
    assert "f+b/copy" in stdout and "copy floor" in stdout
    assert "torch eager" in stdout and "target" in stdout
    data = json.loads((out / "cpu.json").read_text())
    assert data["machine"]["torch"] and data["machine"]["cpu_count"]
    shapes = {(r["shape"], r["dtype"]) for r in data["records"]}
    assert shapes == {("64x1000", "float32"), ("32x8192", "bfloat16")}
    eager = [r for r in data["records"] if r["contender"] == "torch eager"]
    assert len(eager) == 2 * len(shapes)
    assert all(r["status"] == "ok" and r["time_ms"] > 0 and r["copy_ms"] > 0 for r in eager)
    # The training-loop scenario (on by default) times fwd+bwd beside the tight loop.
    assert "train f+b/copy" in stdout and "training loop" in stdout
    for r in eager:
        train = r["train"]
        if r["pass"] == "fwd":
            assert train is None, r
        else:
            assert train["status"] == "ok" and train["time_ms"] > 0 and train["copy_ms"] > 0, r
            assert train["speedup_vs_eager"] == 1.0, r
    assert (out / "cpu.txt").read_text().strip()
    png = (out / "cpu.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_every_lsr_fused_row_agrees(quick_run):
    out, stdout = quick_run
    records = json.loads((out / "cpu.json").read_text())["records"]
    lsr = [r for r in records if r["kind"] == "lsr_fused"]
    assert lsr, "no lsr_fused rows"
    assert {r["backend"] for r in lsr} >= {"torch"}
    for r in lsr:
        if r["backend"] == "triton":  # on the CPU only Triton's interpreter could run it: too slow
            assert r["status"].startswith("skipped"), r
            continue
        if r["pass"] == "fwd" and r["inplace"]:
            assert r["status"].startswith("= "), r  # same call as the default row's forward
            continue
        assert r["status"] == "ok", r
        assert r["loss_rel_err"] < 1e-4, r
        assert r["time_ms"] > 0 and r["ratio_to_copy"] > 0, r
        if r["pass"] == "fwd+bwd":
            assert r["grad_rel_err"] < 5e-2, r
            assert r["train"]["status"] == "ok" and r["train"]["ratio_to_copy"] > 0, r
            assert r["extra_mem_x"] is not None, r
    assert "WRONG" not in stdout


def test_scenarios_per_call_and_option_cost_are_reported(quick_run):
    out, stdout = quick_run
    assert "per-call cost" in stdout and "eager/ours" in stdout
    assert "option cost" in stdout
    (path,) = out.glob("*.json")
    scenarios = json.loads(path.read_text())["scenarios"]
    assert {row["shape"] for row in scenarios["per_call"]} >= {"8x10", "256x1000"}
    variants = {row["variant"]: row for row in scenarios["options"]}
    assert set(variants) == {"plain", "return_stats", "mix (float lam)", "mix (tensor lam)",
                             "softcap"}  # fmt: skip
    assert variants["plain"]["ratio"] == 1.0
    assert all(row["median_s"] > 0 for row in variants.values())
