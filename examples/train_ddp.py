"""Data-parallel training with the fused loss, warmup and the linear scaling rule.

A small MLP learns a synthetic classification rule (the argmax of a fixed random projection of the
input) with DistributedDataParallel. Every rank draws its own batches; the learning rate follows
the linear scaling rule for the *global* batch (per-rank batch x world size) and ramps up linearly
over the first steps with :class:`lsr_fused.WarmupScheduler`; the loss is
:class:`lsr_fused.LabelSmoothingCE`.

Runs unchanged on CPUs (gloo) and GPUs (nccl, one GPU per rank)::

    torchrun --nproc_per_node 2 examples/train_ddp.py
    torchrun --nproc_per_node 2 examples/train_ddp.py --steps 600 --per-rank-batch 128
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

try:
    import lsr_fused
except ImportError:  # running from a source checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import lsr_fused


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--per-rank-batch", type=int, default=64, help="examples per rank per step")
    parser.add_argument("--warmup-steps", type=int, default=None, help="default: steps // 6")
    parser.add_argument("--base-lr", type=float, default=0.1, help="lr for a batch of 256")
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument(
        "--loss-backend", default="auto", choices=("auto", "triton", "cpp", "torch"),
        help="kernel backend of the fused loss",
    )  # fmt: skip
    parser.add_argument("--log-every", type=int, default=None, help="default: steps // 10")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


class RuleData:
    """Inputs ~ N(0, 1); label = argmax of a fixed random linear map (same rule on every rank)."""

    def __init__(self, features: int, classes: int, seed: int, device: torch.device) -> None:
        rule = torch.Generator().manual_seed(seed)
        self.projection = torch.randn(features, classes, generator=rule).to(device)
        self.features = features
        self.device = device

    def batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = torch.randn(size, self.features, generator=generator).to(self.device)
        return inputs, (inputs @ self.projection).argmax(dim=1)


def setup() -> tuple[int, int, torch.device]:
    """Join the group torchrun describes: nccl with one GPU per rank, else gloo on the CPU."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        # Share the cores between the ranks instead of oversubscribing them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().clone()
    dist.all_reduce(value)
    return value.item() / dist.get_world_size()


def main() -> None:
    args = parse_args()
    rank, world_size, device = setup()
    warmup_steps = args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 6)
    log_every = args.log_every or max(1, args.steps // 10)

    torch.manual_seed(args.seed)  # identical initial weights everywhere (DDP also broadcasts them)
    model = nn.Sequential(
        nn.Linear(args.features, args.hidden),
        nn.ReLU(),
        nn.Linear(args.hidden, args.hidden),
        nn.ReLU(),
        nn.Linear(args.hidden, args.classes),
    ).to(device)
    model = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )

    global_batch = args.per_rank_batch * world_size
    lr = lsr_fused.linear_scaled_lr(args.base_lr, global_batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    scheduler = lsr_fused.WarmupScheduler(optimizer, warmup_steps=warmup_steps)
    criterion = lsr_fused.LabelSmoothingCE(args.label_smoothing, backend=args.loss_backend)

    data = RuleData(args.features, args.classes, args.seed, device)
    generator = torch.Generator().manual_seed(args.seed * 1000 + 1 + rank)  # distinct per rank
    if rank == 0:
        print(
            f"world size {world_size} ({dist.get_backend()}), global batch {global_batch}, "
            f"peak lr {lr:.4f} after {warmup_steps} warmup steps, {args.steps} steps",
            flush=True,
        )

    start = time.perf_counter()
    running = torch.zeros((), device=device)
    for step in range(1, args.steps + 1):
        inputs, labels = data.batch(args.per_rank_batch, generator)
        loss = criterion(model(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients over the ranks
        optimizer.step()
        scheduler.step()
        running += loss.detach()
        if step % log_every == 0 or step == args.steps:
            window = log_every if step % log_every == 0 else step % log_every
            average = mean_over_ranks(running) / window
            running.zero_()
            if rank == 0:
                current_lr = optimizer.param_groups[0]["lr"]
                print(f"step {step:5d}  loss {average:.4f}  lr {float(current_lr):.4f}", flush=True)

    # Held-out accuracy: every rank scores its own fresh batch, the counts are summed.
    model.eval()
    with torch.no_grad():
        inputs, labels = data.batch(2048, torch.Generator().manual_seed(10_000 + rank))
        correct = (model(inputs).argmax(dim=1) == labels).sum().to(torch.float64)
        total = torch.tensor(float(labels.numel()), dtype=torch.float64, device=device)
        counts = torch.stack([correct, total])
        dist.all_reduce(counts)
    if rank == 0:
        elapsed = time.perf_counter() - start
        print(
            f"final accuracy {counts[0].item() / counts[1].item():.3f} ({elapsed:.1f}s)", flush=True
        )
    # Release DDP (its reducer holds the process group) while the group is still registered:
    # otherwise the group can be destroyed from the reducer's destructor with the GIL held, while
    # gloo's worker thread waits for the GIL to free a finished work item (a teardown deadlock).
    del model, optimizer, scheduler
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
