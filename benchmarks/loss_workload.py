"""The loss benchmark's inputs and judge: logits buffers of one shape, a float64 reference, and how
one contender is called and checked on them (a ``measure.Workload``)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _common import Shape, dtype_name
from contenders import LABEL_SMOOTHING
from measure import Contender, LossFn, Outcome, Settings, Step, Workload, run_measured
from torch import Tensor

# Per dtype: (loss rtol, gradient rtol, gradient atol as a fraction of max |reference gradient|).
# Half-precision contenders may return a loss in their own dtype (torch eager does), hence the loose
# loss tolerance; contenders that promise a float32 loss are held to PRECISE_LOSS_RTOL instead.
TOLERANCES = {
    torch.float64: (1e-9, 1e-6, 1e-9),
    torch.float32: (1e-4, 1e-3, 1e-5),
    torch.float16: (5e-3, 2e-2, 2e-3),
    torch.bfloat16: (2e-2, 5e-2, 1e-2),
}
PRECISE_LOSS_RTOL = 1e-4


def float64_reference(x: Tensor, t: Tensor) -> tuple[float, Tensor]:
    """Loss and gradient of F.cross_entropy on ``x.double()``, in row chunks to bound memory.

    The gradient is returned in float32, which is ample to judge float32 and half gradients.
    """
    rows, classes = x.shape
    grad = torch.empty(rows, classes, dtype=torch.float32, device=x.device)
    chunk = max(1, (1 << 24) // classes)
    total = 0.0
    for start in range(0, rows, chunk):
        part = x[start : start + chunk].double().requires_grad_()
        loss = F.cross_entropy(
            part, t[start : start + chunk], label_smoothing=LABEL_SMOOTHING, reduction="sum"
        )
        (part_grad,) = torch.autograd.grad(loss, part)
        grad[start : start + chunk] = part_grad / rows
        total += loss.item()
    return total / rows, grad


def compare_grad(
    grad: Tensor, ref: Tensor, ref_scale: float, rtol: float, atol_frac: float
) -> tuple[float, bool]:
    """``(max |grad - ref| / max |ref|, allclose)``, in row chunks to bound memory."""
    if grad.shape != ref.shape:
        return math.inf, False
    atol = atol_frac * ref_scale
    chunk = max(1, (1 << 24) // ref.shape[1])
    worst, close = 0.0, True
    for start in range(0, ref.shape[0], chunk):
        g = grad[start : start + chunk].float()
        r = ref[start : start + chunk]
        if not bool(torch.isfinite(g).all()):
            return math.inf, False
        diff = (g - r).abs()
        worst = max(worst, diff.max().item())
        close = close and bool((diff <= atol + rtol * r.abs()).all())
    return worst / ref_scale, close


class LossWorkload(Workload):
    """``n`` logits buffers of one shape (N(0, 4) logits, uniform targets), rotated over so that
    caches do not flatter small shapes, with a pristine copy of each for in-place contenders."""

    def __init__(self, shape: Shape, device: torch.device, settings: Settings, seed: int):
        self.shape, self.device, self.nbytes = shape, device, shape.nbytes
        n = math.ceil(settings.buffer_bytes / shape.nbytes)
        self.n = max(2, min(settings.max_buffers, n))
        gen = torch.Generator(device=device).manual_seed(seed)
        self.xs, self.ts = [], []
        for _ in range(self.n):
            x = torch.randn(shape.rows, shape.classes, generator=gen, device=device)
            self.xs.append(x.mul_(2.0).to(shape.dtype).requires_grad_())
            self.ts.append(
                torch.randint(0, shape.classes, (shape.rows,), generator=gen, device=device)
            )
        self.xs_nograd = [x.detach() for x in self.xs]
        # In-place contenders overwrite their input with the gradient. Each buffer is restored
        # from its pristine copy after every call, outside the clock; it is next used n - 1 calls
        # later, after other buffers have gone through the caches, so the restore flatters nothing.
        self.sources = [x.clone() for x in self.xs_nograd]
        self.copy_dst = torch.empty_like(self.xs_nograd[0])
        self.flush = (
            torch.empty(256 << 20, dtype=torch.int8, device=device)
            if device.type == "cuda"
            else None
        )
        self.notes: dict = {}

    def prepare(self, progress: Callable[[str], None]) -> None:
        self.ref_loss, self.ref_grad = float64_reference(self.sources[0], self.ts[0])
        self.ref_scale = self.ref_grad.abs().max().item()
        self.notes = {"ref_loss": self.ref_loss}

    def floor_step(self) -> Step:
        def step(i: int):
            return self.copy_dst.copy_(self.xs_nograd[i % self.n])

        return step

    def step(self, fn: LossFn, pass_name: str) -> Step:
        if pass_name == "fwd":

            def fwd(i: int):
                with torch.no_grad():
                    return fn(self.xs_nograd[i % self.n], self.ts[i % self.n])

            return fwd

        def fwd_bwd(i: int):
            x = self.xs[i % self.n]
            # A view is a non-leaf, as logits from a model are, so in-place backward may write the
            # gradient into its storage; the leaf behind it is never touched by autograd.
            xv = x.view_as(x)
            loss = fn(xv, self.ts[i % self.n])
            (grad,) = torch.autograd.grad(loss, xv)
            return loss, grad

        return fwd_bwd

    def restore(self, i: int) -> None:
        self.xs_nograd[i % self.n].copy_(self.sources[i % self.n])

    def spare_step(self, fn: LossFn) -> Callable[[], object]:
        """fwd+bwd of ``fn`` on a buffer of its own (for the training loop's churn)."""
        x, t = self.sources[0].clone(), self.ts[0]

        def step():
            xv = x.detach().requires_grad_()
            loss = fn(xv, t)
            return loss, torch.autograd.grad(loss, xv)[0]

        return step

    def check(self, c: Contender, fn: LossFn, with_memory: bool) -> dict[str, Outcome]:
        """Run fwd+bwd and fwd-only once on fresh copies of buffer 0 and judge them.

        An in-place variant's fwd-only call is its default twin's, so it is neither run nor timed.
        On the CPU these calls also measure the peak memory (saving two slow calls on big shapes),
        unless the contender compiles on its first call; on CUDA the first call may autotune.
        """
        loss_rtol, grad_rtol, grad_atol = TOLERANCES[self.shape.dtype]
        if c.precise_loss:
            loss_rtol = min(loss_rtol, PRECISE_LOSS_RTOL)
        t = self.ts[0]
        x = self.sources[0].clone().requires_grad_()
        xv = x.view_as(x)  # a non-leaf, like a model's logits: in-place backward applies

        def fwd_bwd():
            loss = fn(xv, t)
            return loss, torch.autograd.grad(loss, xv)[0]

        calls = [("fwd+bwd", fwd_bwd)]
        if not c.fwd_twin:
            x_fwd = self.sources[0].clone()

            def fwd():
                with torch.no_grad():
                    return fn(x_fwd, t), None

            calls.append(("fwd", fwd))
        results = {"fwd": Outcome(f"= {c.fwd_twin}")}
        grad = None
        for pass_name, call in calls:
            if with_memory:
                (value, grad_out), extra, seconds = run_measured(call, self.device)
            else:
                (value, grad_out), extra, seconds = call(), None, None
            if grad_out is not None:
                grad = grad_out
            value = value.detach()
            loss_value = float(value.double())
            err = abs(loss_value - self.ref_loss) / abs(self.ref_loss)
            status = "ok"
            if value.numel() != 1 or not err <= loss_rtol:
                status = f"WRONG ({pass_name} loss err {err:.1e} > {loss_rtol:.0e})"
            results[pass_name] = Outcome(
                status,
                extra_bytes=extra,
                call_s=seconds,
                loss=loss_value,
                loss_dtype=dtype_name(value.dtype),
                loss_rel_err=err,
            )
        grad_err, close = compare_grad(grad, self.ref_grad, self.ref_scale, grad_rtol, grad_atol)
        results["fwd+bwd"].grad_rel_err = grad_err
        if not close:
            results["fwd+bwd"].status = f"WRONG (grad err {grad_err:.1e}, rtol {grad_rtol:.0e})"
        wrong = [r.status for r in results.values() if r.status.startswith("WRONG")]
        if wrong:  # a contender that disagrees anywhere is timed nowhere
            for r in results.values():
                r.status = wrong[0]
        return results
