"""Compile every Triton kernel the public API launches for real GPU targets, without a GPU.

Run as a script (``tests/test_triton_compile.py`` does, in a subprocess)::

    python tests/triton_targets.py --arch 80 90 100 --json out.json [--table]

How it works, so that no specialization can slip past it:

* The package is imported with ``TRITON_INTERPRET`` unset, so its kernels are real ``JITFunction``s.
  Afterwards the variable is set, which only tells the policy layer that Triton may take CPU
  tensors; the kernels stay compiled functions.
* Triton's active driver is replaced by one that reports the chosen ``GPUTarget`` and no device,
  and ``JITFunction.run`` is wrapped to pass ``warmup=True``: every launch binds its arguments
  exactly as on a GPU (types, alignment, ``== 1`` specialization), compiles, and launches nothing.
* The scenarios drive the public API (``label_smoothing_cross_entropy`` forward and backward, every
  dtype, option and autograd path, and the vocabulary-parallel loss on a one-rank gloo group), so a
  new kernel or argument is compiled as soon as the API reaches it.

For each compiled kernel the script records its signature, resource usage (``cuobjdump
-res-usage``: registers, spills) and facts read off the SASS of its hot loops (``cuobjdump -sass``:
load/store widths, ``MUFU.EX2`` and instructions per element, 64-bit compares, calls). The test
asserts on those facts; ``--table`` prints them for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

import lsr_fused
import lsr_fused.backends

# Import every Triton module of the package now, before the interpreter flag is set below.
for _module in pkgutil.iter_modules(lsr_fused.backends.__path__):
    if _module.name.startswith("triton"):
        importlib.import_module(f"lsr_fused.backends.{_module.name}")
os.environ["TRITON_INTERPRET"] = "1"

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


class TargetOnlyDriver:
    """The part of a Triton driver that compilation consults: a target, and no device."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_device(self) -> int:
        # One device id per target keeps Triton's per-device kernel caches apart.
        return self.arch

    def get_current_stream(self, device) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.arch, 32)


_compiled: dict[tuple, dict] = {}
_scenario = {"name": "", "aligned": False}
_original_run = JITFunction.run


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _original_run(self, *args, grid=grid, warmup=True, **kwargs)
    key = (self.fn.__name__, kernel.hash)
    entry = _compiled.setdefault(key, {"kernel": kernel, "scenarios": [], "aligned": False})
    entry["scenarios"].append(_scenario["name"])
    entry["aligned"] = entry["aligned"] or _scenario["aligned"]
    return kernel


JITFunction.run = _compile_only


# --------------------------------------------------------------------------------------------
# Scenarios: the public API, forward and backward, every path that launches a kernel.


@contextlib.contextmanager
def scenario(name: str, aligned: bool):
    """``aligned``: classes contiguous and a multiple of 16, so 128-bit accesses are expected."""
    _scenario.update(name=name, aligned=aligned)
    yield


def _local_scenarios() -> None:
    lsce = lsr_fused.label_smoothing_cross_entropy
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for num_classes in (32000, 1000):
            aligned = num_classes % 16 == 0
            target = torch.randint(0, num_classes, (4,))
            weight = torch.rand(num_classes) + 0.5
            for class_weight in (None, weight):
                tag = f"{dtype} C={num_classes} weight={class_weight is not None}"
                leaf = torch.randn(4, num_classes, dtype=dtype, requires_grad=True)
                with scenario(f"grad-in-forward mean/sum {tag}", aligned):
                    for reduction in ("mean", "sum"):
                        lsce(
                            leaf,
                            target,
                            0.1,
                            weight=class_weight,
                            reduction=reduction,
                            backend="triton",
                        ).backward()
                with scenario(f"recompute (upstream != guess) {tag}", aligned):
                    loss = lsce(
                        leaf,
                        target,
                        0.1,
                        weight=class_weight,
                        spread="others",
                        z_loss=1e-4,
                        backend="triton",
                    )
                    (3.0 * loss).backward()
                with scenario(f"reduction none {tag}", aligned):
                    lsce(
                        leaf, target, 0.1, weight=class_weight, reduction="none", backend="triton"
                    ).sum().backward()
                with scenario(f"inplace_backward {tag}", aligned):
                    lsce(
                        leaf * 1.0,
                        target,
                        0.1,
                        weight=class_weight,
                        inplace_backward=True,
                        backend="triton",
                    ).backward()
                with scenario(f"forward only (no_grad) {tag}", aligned), torch.no_grad():
                    lsce(leaf, target, 0.1, weight=class_weight, backend="triton")
        with scenario(f"3-D (N, C, d) {dtype}", False):
            logits = torch.randn(2, 96, 3, dtype=dtype, requires_grad=True)
            lsce(logits, torch.randint(0, 96, (2, 3)), 0.1, backend="triton").backward()
        with scenario(f"1-D (C,) {dtype}", True):
            logits = torch.randn(4096, dtype=dtype, requires_grad=True)
            lsce(logits, torch.tensor(7), 0.1, z_loss=1e-4, backend="triton").backward()


def _sharded_scenarios() -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            for num_classes in (32000, 1000):
                for class_weight in (None, torch.rand(num_classes) + 0.5):
                    name = f"sharded {dtype} C={num_classes} weight={class_weight is not None}"
                    with scenario(name, num_classes % 16 == 0):
                        logits = torch.randn(4, num_classes, dtype=dtype, requires_grad=True)
                        lsr_fused.label_smoothing_cross_entropy(
                            logits,
                            torch.randint(0, num_classes, (4,)),
                            0.1,
                            weight=class_weight,
                            backend="triton",
                            process_group=dist.group.WORLD,
                        ).backward()
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Reading the compiled code.

_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def _tool(name: str, *args: str) -> str:
    proc = subprocess.run([str(BIN / name), *args], capture_output=True, text=True, check=True)
    return proc.stdout


def _resources(cubin: Path) -> dict[str, int]:
    line = _tool("cuobjdump", "-res-usage", str(cubin)).strip().splitlines()[-1]
    return {key: int(value) for key, value in re.findall(r"(\w+)(?:\[\d+\])?:(\d+)", line)}


def _branch_target(operands: str) -> int:
    found = re.search(r"0x([0-9a-f]+)", operands)
    return int(found.group(1), 16) if found else -1


def _hot_regions(sass: str) -> list[list[tuple[int, str, str]]]:
    """Instruction lists of each loop body (a backward branch closes one); a kernel without a loop
    (one block per program) is its own hot region."""
    instructions = [
        (int(addr, 16), opcode, operands) for addr, opcode, operands in _SASS_LINE.findall(sass)
    ]
    regions = []
    for addr, opcode, operands in instructions:
        if opcode == "BRA" and 0 <= _branch_target(operands) < addr:
            start = _branch_target(operands)
            regions.append([ins for ins in instructions if start <= ins[0] <= addr])
    return regions or [instructions]


def _region_facts(region, elements_per_thread: int) -> dict:
    opcodes = [opcode for _, opcode, _ in region]
    closing = region[-1]
    memory = [op for op in opcodes if op.startswith(("LDG", "STG"))]
    return {
        "is_loop": closing[1] == "BRA"
        and int(re.search(r"0x([0-9a-f]+)", closing[2]).group(1), 16) < closing[0],
        "instructions": len(opcodes),
        "instructions_per_element": round(len(opcodes) / elements_per_thread, 2),
        "ex2": opcodes.count("MUFU.EX2"),
        "elements_per_thread": elements_per_thread,
        "global_accesses": {op: memory.count(op) for op in sorted(set(memory))},
        # An .EX compare is the high half of a 64-bit integer compare.
        "compares_64bit": sum(op.startswith("ISETP") and ".EX" in op for op in opcodes),
        # sm_80 leaves a loop with a CALL to the instruction after it; only real calls count.
        "calls": sum(
            op.startswith("CALL") and _branch_target(operands) != closing[0] + 16
            for _, op, operands in region
        ),
    }


def _describe(name: str, entry: dict, arch: int, workdir: Path) -> dict:
    kernel = entry["kernel"]
    cubin = workdir / f"{name}-{kernel.hash}.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    signature = dict(kernel.src.signature)
    constants = {
        key[0] if isinstance(key, tuple) else key: value
        for key, value in kernel.src.constants.items()
    }
    arg_names = list(signature)
    named_constants = {arg_names[k] if isinstance(k, int) else k: v for k, v in constants.items()}
    block = int(named_constants.get("BLOCK", 1))
    num_warps = kernel.metadata.num_warps
    elements_per_thread = max(1, block // (32 * num_warps))
    acc = str(named_constants.get("ACC", ""))
    logits_type = signature.get("logits_ptr", "")
    return {
        "kernel": name,
        "arch": arch,
        "logits": logits_type,
        "acc": acc,
        "block": block,
        "num_warps": num_warps,
        "constexprs": {k: str(v) for k, v in named_constants.items()},
        "scalar_types": {
            k: v for k, v in signature.items() if not v.startswith("*") and v != "constexpr"
        },
        "aligned": entry["aligned"],
        "scenarios": entry["scenarios"][:3],
        "resources": _resources(cubin),
        "hot_loops": [
            _region_facts(region, elements_per_thread)
            for region in _hot_regions(_tool("cuobjdump", "-sass", str(cubin)))
        ],
    }


def compile_all(arches: list[int]) -> list[dict]:
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in arches:
            _compiled.clear()
            driver.set_active(TargetOnlyDriver(arch))
            torch.manual_seed(0)
            _local_scenarios()
            _sharded_scenarios()
            for (name, _), entry in sorted(_compiled.items(), key=lambda item: item[0]):
                records.append(_describe(name, entry, arch, Path(tmp)))
    return records


def _table(records: list[dict]) -> str:
    lines = [
        "| target | kernel | logits | BLOCK/warps | REG "
        "| hot loop: instr/elem, ex2/elem, accesses |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        if not r["aligned"] or r["logits"] not in ("*bf16", "*fp16", "*fp32"):
            continue
        loops = "; ".join(
            f"{h['instructions_per_element']}, {h['ex2'] / h['elements_per_thread']:.2f}, "
            f"{'/'.join(h['global_accesses'])}"
            for h in r["hot_loops"]
        )
        switches = ",".join(
            f"{k}"
            for k, v in r["constexprs"].items()
            if k.isupper() and k not in ("BLOCK", "ACC") and v == "True"
        )
        lines.append(
            f"| sm_{r['arch']} | {r['kernel']}({switches}) | {r['logits'][1:]} | "
            f"{r['block']}/{r['num_warps']} | {r['resources'].get('REG')} | {loops} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90, 100])
    parser.add_argument("--json", type=Path, help="write the records here")
    parser.add_argument("--table", action="store_true", help="print a markdown table")
    args = parser.parse_args()
    records = compile_all(args.arch)
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    if args.table:
        print(_table(records))
    print(
        f"compiled {len(records)} kernels for sm_{', sm_'.join(map(str, args.arch))}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
