"""A tensor-parallel LM head with the fused, vocabulary-parallel label-smoothed loss.

Each rank holds a contiguous slice of the vocabulary's classifier rows (uneven when the world size
does not divide the vocabulary); the hidden states and the labels are the same on every rank. One
training step (forward + backward) of three ways to get the loss, per rank:

* ``fused``: ``linear_label_smoothing_cross_entropy(hidden, w_k, labels, process_group=pg)``: the
  logits never exist; hidden's gradient is summed over the ranks inside the op;
* ``fused, reduce_hidden_grad=False``: the same, inside a Megatron-style "copy to tensor-parallel
  region" (identity forward, all-reduce of the gradient backward), which then owns the reduction;
* ``unfused``: ``hidden_tp @ w_k.T`` materialises this rank's logits, then the vocabulary-parallel
  loss ``label_smoothing_cross_entropy(logits_k, labels, process_group=pg)``.

It prints the loss, the time, the peak extra memory of the step and the bytes this rank handed to
collectives (counted by wrapping them), beside what an all-gather of the logits would move, and
checks that the three agree. Runs on CPUs (gloo) and GPUs (NCCL, one GPU per rank)::

    torchrun --nproc_per_node 2 examples/tp_lm_head.py
    torchrun --nproc_per_node 2 examples/tp_lm_head.py --tokens 8192 --vocab 128256 --hidden 1024
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import time

import torch
import torch.distributed as dist

try:
    import lsr_fused
except ImportError:  # running from a source checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import lsr_fused


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="rows N (batch x sequence)")
    parser.add_argument("--hidden", type=int, default=128, help="features H")
    parser.add_argument("--vocab", type=int, default=50257, help="classes C (split unevenly)")
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--spread", default="others", choices=("all", "others"))
    parser.add_argument("--chunk-size", type=int, default=None, help="default: the memory rule")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    return parser.parse_args()


# ------------------------------------------------------------------------------------------------
# Measurement: bytes handed to collectives, and peak memory.
# ------------------------------------------------------------------------------------------------


class CollectiveBytes:
    """Counts the bytes of the tensors this rank hands to all_reduce / all_gather: ``stats`` (the
    1-D ones: the agreement exchange and the per-row statistics) and ``hidden`` (the 2-D ones:
    the sum of hidden's gradient over the ranks)."""

    def __init__(self):
        self.stats = self.hidden = 0
        self._reduce, self._gather = dist.all_reduce, dist.all_gather

        def count(tensor):
            size = tensor.numel() * tensor.element_size()
            if tensor.dim() == 2:
                self.hidden += size
            else:
                self.stats += size

        def all_reduce(tensor, *args, **kwargs):
            count(tensor)
            return self._reduce(tensor, *args, **kwargs)

        def all_gather(tensor_list, tensor, *args, **kwargs):
            count(tensor)
            return self._gather(tensor_list, tensor, *args, **kwargs)

        dist.all_reduce, dist.all_gather = all_reduce, all_gather


class PeakMemory:
    """Peak extra memory of a block: CUDA's allocator statistics, or on Linux CPUs the resident
    set's high-water mark (reset through /proc/self/clear_refs; glibc is told to return every
    allocation of 1 MiB or more to the system, so freed tensors leave the resident set)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu_ok = False
        if device.type == "cpu" and sys.platform.startswith("linux"):
            try:
                ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
                with open("/proc/self/clear_refs", "w") as handle:
                    handle.write("5")
                self.cpu_ok = True
            except OSError:
                pass

    @staticmethod
    def _status_kib(field: str) -> int:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise OSError(field)

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif self.cpu_ok:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            self.base = self._status_kib("VmRSS") * 1024

    def stop(self):
        """Peak bytes above the start, or None where it cannot be measured."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        if self.cpu_ok:
            return self._status_kib("VmHWM") * 1024 - self.base
        return None


def mib(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:8.1f} MiB"


# ------------------------------------------------------------------------------------------------
# The Megatron-style region: identity forward, gradient all-reduced backward.
# ------------------------------------------------------------------------------------------------


class CopyToTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, group):
        ctx.group = group
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def main() -> None:
    args = parse_args()
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))
        dist.init_process_group("gloo")
    group = dist.group.WORLD
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, args.dtype)

    # Uneven contiguous slices of the vocabulary, rank 0 first.
    widths = [args.vocab // world + (r < args.vocab % world) for r in range(world)]
    offset = sum(widths[:rank])
    generator = torch.Generator().manual_seed(0)  # the same full head and batch on every rank
    full_weight = torch.randn(args.vocab, args.hidden, generator=generator) / args.hidden**0.5
    hidden_values = torch.randn(args.tokens, args.hidden, generator=generator)
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=generator).to(device)
    labels[::17] = -100  # padding
    weight_k = full_weight[offset : offset + widths[rank]].to(device, dtype).contiguous()
    del full_weight
    hidden_values = hidden_values.to(device, dtype)
    options = dict(spread=args.spread)

    counter = CollectiveBytes()
    peak = PeakMemory(device)

    def step(name):
        hidden = hidden_values.clone().requires_grad_()
        weight = weight_k.clone().requires_grad_()
        counter.stats = counter.hidden = 0
        peak.start()
        start = time.perf_counter()
        if name == "fused":
            loss = lsr_fused.linear_label_smoothing_cross_entropy(
                hidden, weight, labels, args.label_smoothing, chunk_size=args.chunk_size,
                process_group=group, **options,
            )  # fmt: skip
        elif name == "fused, reduce_hidden_grad=False":
            hidden_tp = CopyToTensorParallelRegion.apply(hidden, group)
            loss = lsr_fused.linear_label_smoothing_cross_entropy(
                hidden_tp, weight, labels, args.label_smoothing, chunk_size=args.chunk_size,
                process_group=group, reduce_hidden_grad=False, **options,
            )  # fmt: skip
        else:
            hidden_tp = CopyToTensorParallelRegion.apply(hidden, group)
            logits_k = hidden_tp @ weight.t()  # (N, C_k): this rank's logits
            loss = lsr_fused.label_smoothing_cross_entropy(
                logits_k, labels, args.label_smoothing, process_group=group, **options
            )
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        return dict(
            loss=loss.item(), seconds=seconds, peak=peak.stop(), stats=counter.stats,
            hidden_bytes=counter.hidden,
            grads=(hidden.grad, weight.grad),
        )  # fmt: skip

    names = ("fused", "fused, reduce_hidden_grad=False", "unfused")
    step("fused")  # warm-up (lazy imports, allocator)
    results = {name: step(name) for name in names}

    itemsize = torch.empty((), dtype=dtype).element_size()
    logits_gather = args.tokens * widths[rank] * itemsize  # this rank's part of an all-gather
    lines = [
        f"rank {rank}/{world}: classes [{offset}, {offset + widths[rank]}) of {args.vocab}, "
        f"N={args.tokens}, H={args.hidden}, {args.dtype}, {device.type}; one training step:",
    ]
    for name in names:
        r = results[name]
        lines.append(
            f"  {name:<32} loss {r['loss']:.6f}  {r['seconds'] * 1e3:7.1f} ms  peak extra "
            f"{mib(r['peak'])}  sent: statistics {r['stats'] / 2**10:6.1f} KiB + hidden's "
            f"gradient {r['hidden_bytes'] / 2**20:.2f} MiB"
        )
    lines.append(
        f"  an all-gather of the logits would send {logits_gather / 2**20:.2f} MiB from this rank "
        f"(and receive {args.tokens * (args.vocab - widths[rank]) * itemsize / 2**20:.2f} MiB)"
    )
    fused = results["fused"]
    for name in names[1:]:
        other = results[name]
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert abs(other["loss"] - fused["loss"]) <= tol * max(1.0, abs(fused["loss"])), name
        for a, b in zip(fused["grads"], other["grads"], strict=True):
            scale = max(1.0, b.abs().max().item())
            assert (a.float() - b.float()).abs().max().item() <= tol * scale, name
    lines.append("  the three agree (loss, hidden's gradient, this rank's weight gradient)")
    # Print rank by rank so that the lines do not interleave.
    for turn in range(world):
        dist.barrier()
        if turn == rank:
            print("\n".join(lines), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
