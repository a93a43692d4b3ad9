"""Every implementation of label-smoothed cross-entropy the loss benchmark times.

lsr_fused in each backend the device offers, by default and with ``inplace_backward=True``; torch
eager ``F.cross_entropy(label_smoothing=0.1)``; the same under ``torch.compile``; a dense one-hot
reference in the style of the seed's LSR module; and, when importable (CUDA only), Liger-Kernel's
``LigerCrossEntropyLoss`` and flash-attention's Triton ``cross_entropy_loss``. Each is a
``measure.Contender`` whose ``make()`` returns ``fn(logits, target) -> loss``. lsr_fused is used
through its public API only.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import short
from measure import Contender, LossFn
from torch import Tensor

LABEL_SMOOTHING = 0.1
REPO_ROOT = Path(__file__).resolve().parent.parent


def torch_eager(x: Tensor, t: Tensor) -> Tensor:
    return F.cross_entropy(x, t, label_smoothing=LABEL_SMOOTHING)


def one_hot_reference(x: Tensor, t: Tensor) -> Tensor:
    """Dense label smoothing in the style of the seed's ``LSR`` module.

    Like the seed, it builds a float32 one-hot target of the logits' size with ``scatter_add_``,
    smooths it, and takes the sum of target x log-softmax. The seed spreads eps over the K - 1 other
    classes (Inception's convention); this one uses PyTorch's (target 1 - eps + eps/K, others
    eps/K) so that it computes the same loss as every other contender.
    """
    rows, classes = x.shape
    one_hot = torch.zeros(rows, classes, device=x.device)
    one_hot.scatter_add_(1, t.view(rows, 1), torch.ones(rows, 1, device=x.device))
    smoothed = one_hot * (1.0 - LABEL_SMOOTHING) + LABEL_SMOOTHING / classes
    log_prob = F.log_softmax(x, dim=1)
    return -(smoothed * log_prob).sum(dim=1).mean()


def make_compiled() -> LossFn:
    # A fresh compile per shape: dynamo caches per code object and would otherwise hit its
    # recompile limit across shapes and grad modes, then fall back to eager without a word.
    torch._dynamo.reset()
    return torch.compile(torch_eager, dynamic=False, fullgraph=True)


def import_lsr_fused():
    """Import lsr_fused: the installed one, else the one in this checkout."""
    try:
        import lsr_fused
    except ModuleNotFoundError as err:
        if err.name != "lsr_fused":
            raise
        sys.path.insert(1, str(REPO_ROOT))
        import lsr_fused
    return lsr_fused


def build_contenders(device: torch.device, quick: bool) -> list[Contender]:
    contenders = []
    try:
        lsr_fused = import_lsr_fused()
        backends = list(lsr_fused.available_backends(device.type))
    except Exception as err:  # the package's own rows must say why they are missing
        contenders.append(
            Contender("lsr_fused", status=f"failed: import: {short(err)}", kind="lsr_fused")
        )
        backends = []
    for backend in backends:
        name = f"lsr_fused {backend}"
        if backend == "triton" and device.type != "cuda":
            contenders.append(
                Contender(
                    name,
                    status="skipped (Triton's CPU interpreter is too slow)",
                    kind="lsr_fused",
                    backend=backend,
                )
            )
            continue
        for inplace in (False, True):

            def make(backend=backend, inplace=inplace) -> LossFn:
                def fn(x: Tensor, t: Tensor) -> Tensor:
                    return lsr_fused.label_smoothing_cross_entropy(
                        x, t, LABEL_SMOOTHING, inplace_backward=inplace, backend=backend
                    )

                return fn

            contenders.append(
                Contender(
                    name + (" in-place" if inplace else ""),
                    make,
                    kind="lsr_fused",
                    backend=backend,
                    inplace=inplace,
                    fwd_twin=name if inplace else None,
                    precise_loss=True,
                )
            )

    contenders.append(Contender("torch eager", lambda: torch_eager))
    if quick:
        contenders.append(Contender("torch.compile", status="skipped (--quick: compiling is slow)"))
    else:
        contenders.append(Contender("torch.compile", make_compiled, compiles=True))
    # One-hot target (4 B), smoothed target (4 B), their product (4 B), its gradient (4 B), and
    # log-softmax and its gradient in the logits' dtype: about 16 B + 2 elements per logit.
    contenders.append(
        Contender("one-hot (seed-style)", lambda: one_hot_reference, dense_bytes_per_element=16.0)
    )
    contenders.extend(optional_contenders(device))
    return contenders


def optional_contenders(device: torch.device) -> list[Contender]:
    """Liger-Kernel and flash-attention's Triton cross-entropy, when importable (CUDA only)."""
    out = []
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError:
        out.append(Contender("Liger-Kernel", status="not installed"))
    except Exception as err:
        out.append(Contender("Liger-Kernel", status=f"failed: import: {short(err)}"))
    else:
        if device.type != "cuda":
            out.append(Contender("Liger-Kernel", status="skipped (needs CUDA)"))
        else:
            # Liger writes the gradient into the logits during the forward pass.
            out.append(
                Contender(
                    "Liger-Kernel",
                    lambda: LigerCrossEntropyLoss(label_smoothing=LABEL_SMOOTHING),
                    inplace=True,
                )
            )
    try:
        from flash_attn.ops.triton.cross_entropy import cross_entropy_loss
    except ImportError:
        out.append(Contender("flash-attn CE", status="not installed"))
    except Exception as err:
        out.append(Contender("flash-attn CE", status=f"failed: import: {short(err)}"))
    else:
        for inplace in (False, True):
            name = "flash-attn CE" + (" in-place" if inplace else "")
            if device.type != "cuda":
                out.append(Contender(name, status="skipped (needs CUDA)"))
                continue

            def make(inplace=inplace) -> LossFn:
                def fn(x: Tensor, t: Tensor) -> Tensor:
                    losses = cross_entropy_loss(
                        x, t, label_smoothing=LABEL_SMOOTHING, inplace_backward=inplace
                    )
                    if isinstance(losses, tuple):  # (losses, z_losses) since flash-attn 2.4
                        losses = losses[0]
                    return losses.mean()

                return fn

            out.append(
                Contender(
                    name,
                    make,
                    inplace=inplace,
                    precise_loss=True,
                    fwd_twin="flash-attn CE" if inplace else None,
                )
            )
    return out


def lsr_fused_info() -> dict:
    """Which lsr_fused the run used (for the JSON)."""
    try:
        lsr_fused = import_lsr_fused()
    except Exception as err:
        return {"error": short(err)}
    return {
        "version": getattr(lsr_fused, "__version__", None),
        "path": str(Path(lsr_fused.__file__).parent),
    }
