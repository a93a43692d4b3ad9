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
* The scenarios drive the public API: ``label_smoothing_cross_entropy`` forward and backward
  (every dtype, option and autograd path), the layouts off the aligned fast path (odd C, C = 1,
  ``(N, C, d)``, a ``(B, C, S)`` view, a sliced padded vocabulary, 64-bit row strides), the
  vocabulary-parallel loss on a one-rank gloo group (one row, one class included) and the fused
  classifier + loss, local and sharded, so a new kernel or argument is compiled as soon as the API
  reaches it.

For each compiled kernel the script records its signature, resource usage (``cuobjdump
-res-usage``: registers, spills) and facts read off the SASS (``cuobjdump -sass``): per hot loop,
load/store widths, ``MUFU.EX2`` and instructions per element, 64-bit compares, calls; per kernel,
where the first ``EXIT``, barrier and ``ex2`` are, and whether a barrier separates the row's reads
from the gradient loop's stores. The test asserts on those facts; ``--table`` prints them for
``benchmarks/RESULTS.md``.
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
_scenario = {"name": ""}
_original_run = JITFunction.run


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _original_run(self, *args, grid=grid, warmup=True, **kwargs)
    key = (self.fn.__name__, kernel.hash)
    entry = _compiled.setdefault(key, {"kernel": kernel, "scenarios": []})
    entry["scenarios"].append(_scenario["name"])
    return kernel


JITFunction.run = _compile_only


# --------------------------------------------------------------------------------------------
# Scenarios: the public API, forward and backward, every path that launches a kernel.


@contextlib.contextmanager
def scenario(name: str):
    _scenario["name"] = name
    yield


def _train_and_recompute(logits_of, target, class_weight, tag: str) -> None:
    """The local loss's four launch paths for logits made by ``logits_of()`` (a fresh leaf)."""
    lsce = lsr_fused.label_smoothing_cross_entropy
    options = dict(weight=class_weight, backend="triton")
    with scenario(f"grad-in-forward mean/sum {tag}"):
        for reduction in ("mean", "sum"):
            lsce(logits_of(), target, 0.1, reduction=reduction, **options).backward()
    with scenario(f"reduction none, per-row upstream {tag}"):
        loss = lsce(logits_of(), target, 0.1, reduction="none", **options)
        loss.backward(torch.rand_like(loss))


def _local_matrix() -> None:
    """Every dtype, option and autograd path of the local loss, on aligned rows."""
    lsce = lsr_fused.label_smoothing_cross_entropy
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        # C = 1000: a multiple of 8, not of 16 (the hints' case); half and float32 are enough.
        sizes = (32000, 1000) if dtype in (torch.bfloat16, torch.float32) else (32000,)
        for num_classes in sizes:
            target = torch.randint(0, num_classes, (4,))
            for class_weight in (None, torch.rand(num_classes) + 0.5):
                tag = f"{dtype} C={num_classes} weight={class_weight is not None}"
                leaf = torch.randn(4, num_classes, dtype=dtype, requires_grad=True)
                _train_and_recompute(lambda: leaf, target, class_weight, tag)  # noqa: B023
                options = dict(weight=class_weight, backend="triton")
                with scenario(f"recompute (upstream != guess) {tag}"):
                    loss = lsce(leaf, target, 0.1, spread="others", z_loss=1e-4, **options)
                    (3.0 * loss).backward()
                with scenario(f"inplace_backward {tag}"):
                    lsce(leaf * 1.0, target, 0.1, inplace_backward=True, **options).backward()
                with scenario(f"forward only (no_grad) {tag}"), torch.no_grad():
                    lsce(leaf, target, 0.1, **options)


def _layout_scenarios() -> None:
    """Shapes and layouts off the aligned fast path (issue 20, item 4)."""
    for dtype in (torch.bfloat16, torch.float32):
        for class_weight in (None, torch.rand(50257) + 0.5):
            leaf = torch.randn(4, 50257, dtype=dtype, requires_grad=True)
            target = torch.randint(0, 50257, (4,))
            _train_and_recompute(lambda: leaf, target, class_weight, f"odd C=50257 {dtype}")  # noqa: B023
        one_class = torch.randn(4, 1, dtype=dtype, requires_grad=True)
        _train_and_recompute(lambda: one_class, torch.zeros(4, dtype=torch.long), None,  # noqa: B023
                             f"C=1 {dtype}")  # fmt: skip
        # (N, C, d): the class dimension strided by d.
        strided = torch.randn(2, 32000, 3, dtype=dtype, requires_grad=True)
        _train_and_recompute(lambda: strided, torch.randint(0, 32000, (2, 3)), None,  # noqa: B023
                             f"(N, C, d) C=32000 {dtype}")  # fmt: skip
    bf16 = torch.bfloat16
    # (B, S, C) logits handed over as a (B, C, S) view: unit class stride, rows S apart.
    sequence = torch.randn(2, 3, 32000, dtype=bf16, requires_grad=True)
    # (Evenly spaced rows: the row view makes them one dimension, the kernels of (N, C) logits.)
    _train_and_recompute(lambda: sequence.transpose(1, 2), torch.randint(0, 32000, (2, 3)), None,
                         "(B, C, S) view of (B, S, C)")  # fmt: skip
    # ... of a slice along S: rows not evenly spaced, the (S, B) grid of programs (S > 1).
    longer = torch.randn(2, 4, 32000, dtype=bf16, requires_grad=True)
    _train_and_recompute(lambda: longer[:, :3].transpose(1, 2), torch.randint(0, 32000, (2, 3)),
                         None, "(B, C, S) view of an S-sliced (B, S, C)")  # fmt: skip
    # A padded vocabulary sliced to its classes: read in place, rows 32064 apart.
    padded = torch.randn(4, 32064, dtype=bf16, requires_grad=True)
    _train_and_recompute(lambda: padded[:, :32000], torch.randint(0, 32000, (4,)), None,
                         "sliced padded vocabulary")  # fmt: skip
    # Rows 2**31 elements apart (64-bit strides); the storage is reserved, never touched.
    storage = torch.empty(2**31 + 64, dtype=bf16)
    far = storage.as_strided((2, 64), (2**31, 1)).requires_grad_()
    _train_and_recompute(lambda: far, torch.randint(0, 64, (2,)), None, "64-bit row stride")
    with scenario("1-D (C,)"):
        logits = torch.randn(4096, dtype=bf16, requires_grad=True)
        lsr_fused.label_smoothing_cross_entropy(
            logits, torch.tensor(7), 0.1, z_loss=1e-4, backend="triton"
        ).backward()


def _fused_head(process_group=None) -> None:
    """The fused classifier + loss: training (gradient written in forward, over the logits
    buffer), reduction="none" (backward recomputes), half and float32."""
    sharded = "sharded " if process_group is not None else ""
    for dtype in (torch.bfloat16, torch.float32):
        for num_classes in (32000, 1000):
            hidden = torch.randn(8, 32, dtype=dtype, requires_grad=True)
            weight = (torch.randn(num_classes, 32) * 0.05).to(dtype).requires_grad_()
            target = torch.randint(0, num_classes, (8,))
            for reduction in ("mean", "none"):
                with scenario(f"{sharded}fused head {reduction} {dtype} C={num_classes}"):
                    loss = lsr_fused.linear_label_smoothing_cross_entropy(
                        hidden, weight, target, 0.1, reduction=reduction, chunk_size=4,
                        backend="triton", process_group=process_group,
                    )  # fmt: skip
                    loss.sum().backward()


def _feature_scenarios() -> None:
    """Issue 22's backend switches (SOFTCAP, MIXED, STATS), called on the backends directly: a
    training step with all three (weighted: the most live values), a softcap-only step, a
    statistics-only evaluation, a recomputing backward, and both sharded passes. Aligned bf16 rows,
    so the strict half-precision limits apply."""
    from lsr_fused._params import RowParams
    from lsr_fused.backends import triton_backend, triton_sharded

    rows, num_classes = 4, 32000
    logits = torch.randn(rows, 1, num_classes, dtype=torch.bfloat16)
    grad = torch.empty_like(logits)
    target = torch.randint(0, num_classes, (rows,))
    mix = (torch.randint(0, num_classes, (rows,)), torch.tensor(0.3).expand(rows))
    stats = (torch.empty(rows), torch.empty(rows, dtype=torch.long))
    weight = torch.rand(num_classes) + 0.5
    total = weight.sum().reshape(1)
    capped = RowParams(0.9, 0.1 / num_classes, 1e-4, -100, 30.0)
    plain = capped._replace(softcap=0.0)
    guess, upstream = torch.ones(1), torch.rand(rows)
    forward, backward = triton_backend.forward, triton_backend.backward
    with scenario("features: training step, softcap + mix + stats, weighted"):
        _, lse = forward(logits, target, weight, total, capped, grad, guess, mix=mix, stats=stats)
        backward(upstream, logits, target, weight, total, lse, capped, grad, guess, mix=mix)
    with scenario("features: training step, softcap"):
        forward(logits, target, None, None, capped, grad, guess)
    with scenario("features: statistics, no gradient"):
        forward(logits, target, None, None, plain, stats=stats)
    with scenario("features: recomputing backward, softcap + mix"):
        backward(upstream, logits, target, None, None, lse, capped, grad, mix=mix)
    with scenario("features: sharded softcap + mix + argmax"):
        local_mix = mix[0]
        triton_sharded.shard_stats(logits, target, weight, torch.empty(8, rows), softcap=30.0,
                                   local_mix_target=local_mix, argmax_out=stats[1])  # fmt: skip
        triton_sharded.shard_grad(logits, target, weight, torch.empty(6, rows), grad,
                                  softcap=30.0, local_mix_target=local_mix)  # fmt: skip


def _local_scenarios() -> None:
    _local_matrix()
    _layout_scenarios()
    _fused_head()
    _feature_scenarios()


def _sharded_loss(logits, target, class_weight, group) -> None:
    lsr_fused.label_smoothing_cross_entropy(
        logits, target, 0.1, weight=class_weight, backend="triton", process_group=group
    ).backward()


def _sharded_scenarios() -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    group = dist.group.WORLD
    try:
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            sizes = (32000, 1000) if dtype in (torch.bfloat16, torch.float32) else (32000,)
            for num_classes in sizes:
                for class_weight in (None, torch.rand(num_classes) + 0.5):
                    name = f"sharded {dtype} C={num_classes} weight={class_weight is not None}"
                    with scenario(name):
                        logits = torch.randn(4, num_classes, dtype=dtype, requires_grad=True)
                        target = torch.randint(0, num_classes, (4,))
                        _sharded_loss(logits, target, class_weight, group)
        with scenario("sharded one row"):
            logits = torch.randn(1, 32000, dtype=torch.bfloat16, requires_grad=True)
            _sharded_loss(logits, torch.tensor([5]), None, group)
        with scenario("sharded one class"):
            logits = torch.randn(4, 1, dtype=torch.bfloat16, requires_grad=True)
            _sharded_loss(logits, torch.zeros(4, dtype=torch.long), None, group)
        _fused_head(group)
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


def _instructions(sass: str) -> list[tuple[int, str, str]]:
    return [
        (int(addr, 16), opcode, operands) for addr, opcode, operands in _SASS_LINE.findall(sass)
    ]


def _loops(instructions) -> list[list[tuple[int, str, str]]]:
    """Instruction lists of each loop body (a backward branch closes one), in address order."""
    loops = []
    for addr, opcode, operands in instructions:
        # sm_100 closes loops with a uniform-predicate BRA.U (the predicate among the operands).
        if opcode.startswith("BRA") and 0 <= _branch_target(operands) < addr:
            start = _branch_target(operands)
            loops.append([ins for ins in instructions if start <= ins[0] <= addr])
    return loops


def _access_bytes(opcode: str) -> int:
    """Bytes per thread of one LDG/STG: ``STG.E.128`` 16, ``LDG.E.U16`` 2, ``STG.E`` 4."""
    for suffix, size in ((".128", 16), (".64", 8), ("16", 2), ("8", 1)):
        if opcode.endswith(suffix):
            return size
    return 4


def _blocks_per_iteration(opcodes, stats_elements: int, element_size: int, weighted: bool) -> int:
    """How many blocks one iteration of a statistics loop reads: ptxas may unroll a narrow
    block's loop (four blocks of a one-warp BLOCK 64 on sm_100), which its loads show. Only read
    where the loop loads the logits alone (no class weights); 1 otherwise."""
    loaded = sum(_access_bytes(op) for op in opcodes if op.startswith("LDG"))
    block_bytes = stats_elements * element_size
    if weighted or loaded <= block_bytes or loaded % block_bytes:
        return 1
    return loaded // block_bytes


def _region_facts(region, stats_elements: int, element_size: int, is_loop: bool,
                  weighted: bool = False) -> dict:  # fmt: skip
    """Facts of one hot region. Elements per thread: a gradient loop's stores, each in the logits'
    dtype, say how many it handles; a statistics loop handles one block per block it reads in an
    iteration (see :func:`_blocks_per_iteration`); a loop-free kernel handles one block."""
    opcodes = [opcode for _, opcode, _ in region]
    closing = region[-1]
    memory = [op for op in opcodes if op.startswith(("LDG", "STG"))]
    stored = sum(_access_bytes(op) for op in opcodes if op.startswith("STG"))
    blocks = 1
    if is_loop and stored:
        elements_per_thread = max(1, stored // element_size)
    elif is_loop:
        blocks = _blocks_per_iteration(opcodes, stats_elements, element_size, weighted)
        elements_per_thread = stats_elements * blocks
    else:
        elements_per_thread = stats_elements
    return {
        "is_loop": is_loop,
        "blocks_per_iteration": blocks,
        "stores": bool(stored),
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


def _first(instructions, prefix: str):
    return next((i for i, (_, op, _) in enumerate(instructions) if op.startswith(prefix)), None)


def _store_loop_guarded(instructions, loops):
    """Whether a barrier separates every global load before the first storing loop from that
    loop (the loop may overwrite what they read); None for a kernel without a storing loop."""
    storing = [loop for loop in loops if any(op.startswith("STG") for _, op, _ in loop)]
    if not storing:
        return None
    before = [ins for ins in instructions if ins[0] < storing[0][0][0]]
    last_load = max((i for i, (_, op, _) in enumerate(before) if op.startswith("LDG")), default=-1)
    return any(op.startswith("BAR.SYNC") for _, op, _ in before[last_load + 1 :])


def _code_facts(sass: str, stats_elements: int, element_size: int, weighted: bool) -> dict:
    instructions = _instructions(sass)
    loops = _loops(instructions)
    regions = [(loop, True) for loop in loops] or [(instructions, False)]
    return {
        "hot_loops": [
            _region_facts(region, stats_elements, element_size, is_loop, weighted)
            for region, is_loop in regions
        ],
        "instruction_count": len(instructions),
        "first_exit": _first(instructions, "EXIT"),
        "first_barrier": _first(instructions, "BAR.SYNC"),
        "first_ex2": _first(instructions, "MUFU.EX2"),
        "barrier_before_store_loop": _store_loop_guarded(instructions, loops),
    }


_ELEMENT_SIZE = {"*fp16": 2, "*bf16": 2, "*fp32": 4, "*fp64": 8}


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
    acc = str(named_constants.get("ACC", ""))
    logits_type = signature.get("logits_ptr", "")
    sass = _tool("cuobjdump", "-sass", str(cubin))
    weighted = str(named_constants.get("HAS_WEIGHT")) == "True"
    stats_elements = max(1, block // (32 * num_warps))
    facts = _code_facts(sass, stats_elements, _ELEMENT_SIZE[logits_type], weighted)
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
        # Rows checked 16-byte aligned (ALIGN > 1): 128-bit accesses are expected.
        "aligned": int(named_constants.get("ALIGN", 1)) > 1,
        "scenarios": list(dict.fromkeys(entry["scenarios"])),
        "resources": _resources(cubin),
        **facts,
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
        "| target | kernel | logits | aligned | BLOCK/warps | REG "
        "| hot loops: instr/elem, ex2/elem, accesses |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if r["logits"] not in ("*bf16", "*fp16", "*fp32"):
            continue
        loops = "; ".join(
            f"{h['instructions_per_element']}, {h['ex2'] / h['elements_per_thread']:.2f}, "
            f"{'/'.join(h['global_accesses'])}"
            for h in r["hot_loops"]
        )
        switches = ",".join(
            f"{k}"
            for k, v in r["constexprs"].items()
            if k.isupper() and k not in ("BLOCK", "GRAD_BLOCK", "ALIGN", "ACC") and v == "True"
        )
        lines.append(
            f"| sm_{r['arch']} | {r['kernel']}({switches}) | {r['logits'][1:]} | "
            f"{'yes' if r['aligned'] else 'no'} | {r['block']}/{r['num_warps']} | "
            f"{r['resources'].get('REG')} | {loops} |"
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
