"""The Triton kernels compile for real GPUs, not only run in the interpreter.

``tests/triton_targets.py`` drives the public API with Triton's driver pointed at sm_80, sm_90 and
sm_100 and launching switched off, so every specialization the API can launch is compiled by
Triton's real compiler (and ``ptxas``, which ships in the Triton wheel). No GPU or CUDA toolkit
is needed. The assertions below read what it recorded: resources from ``cuobjdump -res-usage`` and
hot-loop facts from ``cuobjdump -sass``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HARNESS = Path(__file__).with_name("triton_targets.py")
ARCH_GROUPS = ([90], [80, 100])  # two processes: the machines CI runs on have two cores


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("triton_targets")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out / "cache")  # compile for real, not from an earlier run
    procs = []
    for arches in ARCH_GROUPS:
        path = out / f"sm{'_'.join(map(str, arches))}.json"
        cmd = [sys.executable, str(HARNESS), "--arch", *map(str, arches), "--json", str(path)]
        procs.append(
            (
                path,
                subprocess.Popen(
                    cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
                ),
            )
        )
    result = []
    for path, proc in procs:
        output, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"compiling for a GPU target failed:\n{output[-6000:]}"
        result += json.loads(path.read_text())
    return result


def _kernels(records, **match):
    return [r for r in records if all(r[k] == v for k, v in match.items())]


def test_every_kernel_compiles_for_each_target(records):
    names = {"_forward_kernel", "_backward_kernel", "_stats_kernel", "_grad_kernel"}
    for arch in (80, 90, 100):
        compiled = _kernels(records, arch=arch)
        assert {r["kernel"] for r in compiled} == names, f"sm_{arch}"
        # every logits dtype reaches every kernel
        for name in names:
            dtypes = {r["logits"] for r in compiled if r["kernel"] == name}
            assert dtypes == {"*fp16", "*bf16", "*fp32", "*fp64"}, (arch, name, dtypes)
        switches = {
            (
                r["kernel"],
                r["constexprs"].get("HAS_WEIGHT"),
                r["constexprs"].get("WRITE_GRAD"),
                r["constexprs"].get("SKIP_GUESSED"),
            )
            for r in compiled
        }
        for weighted in ("True", "False"):
            assert ("_forward_kernel", weighted, "True", None) in switches
            assert ("_forward_kernel", weighted, "False", None) in switches
            assert ("_backward_kernel", weighted, None, "True") in switches
            assert ("_backward_kernel", weighted, None, "False") in switches
        # 3-D layouts: a class stride that is not 1
        assert any(r["constexprs"].get("stride_class") != "1" for r in compiled)


def test_no_register_spills(records):
    for r in records:
        res = r["resources"]
        assert res["LOCAL"] == 0 and res["STACK"] == 0, (r["kernel"], r["arch"], r["logits"], res)


def test_float64_kernels_get_float64_scalars(records):
    """A Python float is bound as fp32 unless annotated: float64 logits must not see rounded
    smoothing masses or z-loss."""
    float64 = [r for r in records if r["logits"] == "*fp64" or r["acc"] == "fp64"]
    assert float64
    for r in float64:
        assert "fp32" not in r["scalar_types"].values(), (r["kernel"], r["scalar_types"])
    masses = [r for r in records if "target_extra" in r["scalar_types"]]
    assert masses and all(r["scalar_types"]["target_extra"] == "fp64" for r in masses)


@pytest.mark.parametrize("logits", ["*bf16", "*fp16"])
def test_half_precision_hot_loops(records, logits):
    """128-bit global accesses, one ex2 per element, no 64-bit compare or call per element."""
    checked = _kernels(records, logits=logits, aligned=True)
    assert {r["kernel"] for r in checked} >= {"_forward_kernel", "_backward_kernel"}
    for r in checked:
        passes = 2 if r["constexprs"].get("WRITE_GRAD") == "True" else 1
        for loop in r["hot_loops"]:
            where = (r["kernel"], r["arch"], r["constexprs"], loop)
            per_thread = loop["elements_per_thread"]
            accesses = loop["global_accesses"]
            narrow = sum(n for op, n in accesses.items() if op.endswith((".U16", ".16")))
            assert "LDG.E.128" in accesses, where
            assert loop["calls"] == 0, where
            if loop["is_loop"]:
                # one ex2 per element, plus at most one per block for the running-sum rescale
                assert per_thread <= loop["ex2"] <= per_thread + 1, where
                assert loop["compares_64bit"] == 0, where
                assert all(op.endswith(".128") for op in accesses), where
            else:
                # a loop-free kernel (one block per program) or one whose loop the compiler
                # unrolled: scalar per-row work only (the target's logit is one 16-bit load)
                assert per_thread <= loop["ex2"] <= passes * per_thread + 1, where
                assert narrow < per_thread // 2, where
                assert loop["compares_64bit"] < per_thread // 2, where
        if passes == 2 or r["kernel"] in ("_backward_kernel", "_grad_kernel"):
            assert any("STG.E.128" in loop["global_accesses"] for loop in r["hot_loops"]), r
