"""Time one ``step()`` of lsr_fused's WarmupScheduler against torch's warmup schedulers.

Every scheduler is timed mid-warmup (the warmup is far longer than the run), each on its own
optimizer with the given number of param groups (one 1-element parameter per group). The groups'
base lrs are either all equal (``--bases equal``: groups split for weight decay, say) or all
different (``--bases distinct``: layer-wise lr decay, 0.1 * 0.999 ** i), the case that exercises
the per-group tensor expression; ``both`` (the default) times each. The schedulers:

* ``ours``: ``WarmupScheduler(opt, W)``, the Bag-of-Tricks linear ramp lr * (t + 1) / W
* ``LinearLR``: ``LinearLR(opt, start_factor=1 / W, total_iters=W)``
* ``LinearLR+SeqLR``: the same inside ``SequentialLR`` with a follower (the usual warmup recipe)
* ``LambdaLR``: ``LambdaLR(opt, lambda t: min(1, (t + 1) / W))``

The table gives microseconds per step (best of several repeats) and the speed-up of ours over each
(``x`` = their time / our time, above 1 means ours is faster). ``--tensor-lr`` gives every group a
0-dim lr tensor on ``--device`` (what fused and capturable optimizers use); torch's schedulers then
call ``.item()``/``fill_`` per group, ours copies in place without a host sync.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.optim.lr_scheduler import ExponentialLR, LambdaLR, LinearLR, SequentialLR

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lsr_fused.scheduler import WarmupScheduler

WARMUP = 10**9  # never reached: every timed step is a warmup step


def make_optimizer(
    num_groups: int, tensor_lr: bool, device: str, distinct: bool
) -> torch.optim.Optimizer:
    """SGD with one 1-element parameter per group.

    ``add_param_group`` checks the new group against every existing one, which is quadratic in the
    number of groups (minutes for 10000), so the groups after the first are copies of the first
    one's filled-in dict with their own parameter (and lr tensor).
    """

    def new_lr(index: int) -> float | torch.Tensor:
        lr = 0.1 * 0.999**index if distinct else 0.1
        return torch.tensor(lr, device=device) if tensor_lr else lr

    def new_param() -> torch.nn.Parameter:
        return torch.nn.Parameter(torch.zeros(1, device=device))

    opt = torch.optim.SGD([{"params": [new_param()], "lr": new_lr(0)}], lr=0.1)
    first = opt.param_groups[0]
    for index in range(1, num_groups):
        opt.param_groups.append({**first, "params": [new_param()], "lr": new_lr(index)})
    return opt


def build(name: str, opt: torch.optim.Optimizer) -> Callable[[], None]:
    if name == "ours":
        return WarmupScheduler(opt, WARMUP).step
    if name == "LinearLR":
        return LinearLR(opt, start_factor=1.0 / WARMUP, total_iters=WARMUP).step
    if name == "LinearLR+SeqLR":
        warm = LinearLR(opt, start_factor=1.0 / WARMUP, total_iters=WARMUP)
        follower = ExponentialLR(opt, gamma=0.99)
        return SequentialLR(opt, [warm, follower], milestones=[WARMUP]).step
    if name == "LambdaLR":
        return LambdaLR(opt, lambda t: min(1.0, (t + 1) / WARMUP)).step
    raise ValueError(name)


def time_steps(
    steps: dict[str, Callable[[], None]], iters: int, repeats: int, sync: Callable[[], None]
) -> dict[str, float]:
    """Best per-call time in microseconds of each step function over ``repeats`` runs.

    The runs of the different schedulers are interleaved, so a burst of load on a shared machine
    slows all of them alike instead of one of them.
    """
    for step in steps.values():
        for _ in range(max(1, iters // 10)):
            step()
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(repeats):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            for _ in range(iters):
                step()
            sync()
            best[name] = min(best[name], (time.perf_counter() - start) / iters)
    return {name: seconds * 1e6 for name, seconds in best.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (a few seconds)")
    parser.add_argument(
        "--groups", type=int, nargs="+", default=[1, 100, 1000, 10000], help="param group counts"
    )
    parser.add_argument(
        "--bases", choices=["equal", "distinct", "both"], default="both", help="groups' base lrs"
    )
    parser.add_argument("--tensor-lr", action="store_true", help="0-dim tensor lrs")
    parser.add_argument("--device", default="cpu", help="device of params and tensor lrs")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda needs a GPU")

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    names = ["ours", "LinearLR", "LinearLR+SeqLR", "LambdaLR"]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
        f"{'tensor' if args.tensor_lr else 'float'} lrs; us per step() (x = theirs / ours)"
    )
    header = f"{'bases':>8} {'groups':>6} " + " ".join(f"{n:>14}" for n in names)
    header += " " + " ".join(f"{'x ' + n:>16}" for n in names[1:])
    print(header)
    kinds = ["equal", "distinct"] if args.bases == "both" else [args.bases]
    for kind in kinds:
        for num_groups in args.groups:
            if kind == "distinct" and num_groups == 1:
                continue  # one group has one base lr
            # Roughly equal wall time per row: torch's steps cost ~0.5-1 us per group.
            iters = max(5, (2000 if args.quick else 20000) // max(1, num_groups // 10))
            repeats = 3 if args.quick else 7
            steps = {}
            for name in names:
                opt = make_optimizer(num_groups, args.tensor_lr, args.device, kind == "distinct")
                steps[name] = build(name, opt)
                opt.step()  # torch warns when a scheduler steps before the optimizer ever did
            times = time_steps(steps, iters, repeats, sync)
            del steps
            gc.collect()
            row = f"{kind:>8} {num_groups:>6} " + " ".join(f"{times[n]:>14.1f}" for n in names)
            row += " " + " ".join(f"{times[n] / times['ours']:>15.1f}x" for n in names[1:])
            print(row, flush=True)


if __name__ == "__main__":
    main()
