"""Label smoothing, warmup and the linear scaling rule on real data: scikit-learn's digits.

A small ResNet-like CNN (batch norm, two residual blocks) learns the 8 x 8 handwritten digits of
``sklearn.datasets.load_digits`` (1797 images, 10 classes) on a fixed stratified train/validation
split (1257 / 540 images). Two studies, each repeated over several seeds (the seed sets the weights
and the batch order; the split never changes):

1. **Label smoothing.** ``LabelSmoothingCE(eps, spread=...)`` with eps = 0, eps = 0.1 spread over
   all classes (PyTorch's convention) and eps = 0.1 spread over the other classes (Inception-v3).
   Reported on the validation set: accuracy, negative log-likelihood (of the true labels, not the
   smoothed loss), expected calibration error over 15 equal-width confidence bins, and a
   reliability diagram (pooled over seeds).
2. **Warmup and the linear scaling rule.** Batch 512 with the peak lr
   ``linear_scaled_lr(base_lr, 512)`` (= base_lr * 512 / 256), swept over base_lr = 0.025 ... 6.4,
   for no warmup, constant warmup (0.1x, ResNet) and gradual linear warmup (Goyal et al. 2017), all
   built with ``WarmupScheduler`` followed by cosine decay; and, for one base_lr, the same gradual
   warmup built with the seed's ``GradualWarmupScheduler`` signature. Reported: final validation
   accuracy against the peak lr, and the lr of every step.
3. **Mixup and CutMix** (with ``--mixup``). ``lsr_fused.BatchMixer`` in batch mode (one ``lam``
   per batch, each image paired with its mirror in the shuffled batch): no mixing, mixup
   (alpha 0.2, the bag of tricks' value), CutMix (alpha 1, the CutMix paper's) and both
   (switch_prob 0.5), each trained with ``label_smoothing_cross_entropy(..., mix_target=,
   mix_lambda=)`` at the label-smoothing study's batch, lr and warmup. Reported like study 1 (table
   and JSON; not drawn in the figure).

Outputs (``--out``, default ``examples/results``): ``bag_of_tricks.json`` (every run, its settings,
metrics and per-step lr and loss), ``bag_of_tricks.png`` (all panels), and a table on stdout.
``--quick`` runs one seed of every arm with fewer epochs (under a minute on 2 cores) and writes
``bag_of_tricks_quick.*`` instead. Needs scikit-learn and matplotlib
(``pip install "lsr_fused[examples]"``)::

    python examples/bag_of_tricks.py            # 93 runs, about 6 CPU-minutes (2 processes)
    python examples/bag_of_tricks.py --quick    # 31 runs, about 35 s on 2 cores
    python examples/bag_of_tricks.py --mixup    # the 93 runs and 12 of mixup / CutMix
    python examples/bag_of_tricks.py --replot examples/results/bag_of_tricks.json

Every run uses one thread (these convolutions are tiny), ``--jobs`` (default 2) runs in parallel;
runs are deterministic for a given seed and machine. A run whose loss becomes non-finite stops and
scores as wrong on every image with non-finite logits.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    import lsr_fused
except ImportError:  # running from a source checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import lsr_fused

from lsr_fused import (
    BatchMixer,
    GradualWarmupScheduler,
    LabelSmoothingCE,
    WarmupScheduler,
    linear_scaled_lr,
)

ECE_BINS = 15
LS_ARMS = (  # (name, eps, spread)
    ("eps=0", 0.0, "all"),
    ("eps=0.1 all", 0.1, "all"),
    ("eps=0.1 others", 0.1, "others"),
)
MIXUP_ARMS = (  # (name, mixup_alpha, cutmix_alpha); switch_prob 0.5 when both are > 0
    ("no mixing", 0.0, 0.0),
    ("mixup 0.2", 0.2, 0.0),
    ("cutmix 1.0", 0.0, 1.0),
    ("mixup 0.2 + cutmix 1.0", 0.2, 1.0),
)
MIXUP_SWITCH_PROB = 0.5
MIXER_SEED_OFFSET = 10_000  # a mixer's generator seed: the run's seed + this
WARMUP_KINDS = ("none", "constant", "gradual")
GWS_KIND = "gradual (GradualWarmupScheduler)"
GWS_MULTIPLIER = 10  # the seed's API ramps base -> base * multiplier: 0.1x -> 1x of the peak lr
STABLE_ACC = 0.9  # a (kind, lr) is "stable" when every seed ends at >= 90% validation accuracy


# ---------------------------------------------------------------------------------------------
# data and model


def load_data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The digits as (N, 1, 8, 8) float images, standardised with the training set's statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_val, y_train, y_val = train_test_split(
        digits.images, digits.target, test_size=0.3, stratify=digits.target, random_state=0
    )
    x_train = torch.tensor(x_train, dtype=torch.float32).unsqueeze(1)
    x_val = torch.tensor(x_val, dtype=torch.float32).unsqueeze(1)
    mean, std = x_train.mean(), x_train.std()
    return (
        (x_train - mean) / std,
        torch.tensor(y_train, dtype=torch.int64),
        (x_val - mean) / std,
        torch.tensor(y_val, dtype=torch.int64),
    )


class ResidualBlock(nn.Module):
    """Two 3x3 conv + batch norm layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def make_model(width: int = 16, num_classes: int = 10) -> nn.Module:
    """Stem (8x8, ``width`` channels), a block at 8x8, a block at 4x4 (2 x width), pool, linear."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, 1, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        ResidualBlock(width, width, 1),
        ResidualBlock(width, 2 * width, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


# ---------------------------------------------------------------------------------------------
# metrics


def reliability(probs: Tensor, target: Tensor, bins: int = ECE_BINS) -> dict:
    """Per equal-width confidence bin: count, mean confidence, accuracy; and the ECE."""
    confidence, prediction = probs.max(dim=1)
    correct = (prediction == target).double()
    confidence = confidence.double()
    # Bin i holds confidences in (i / bins, (i + 1) / bins]; a confidence of exactly 0 joins bin 0.
    index = (confidence * bins).ceil().long().sub(1).clamp(0, bins - 1)
    count = torch.bincount(index, minlength=bins).double()
    conf_sum = torch.bincount(index, weights=confidence, minlength=bins)
    acc_sum = torch.bincount(index, weights=correct, minlength=bins)
    nonempty = count > 0
    ece = (conf_sum - acc_sum).abs().sum() / len(target)
    safe = count.clamp(min=1)
    return {
        "ece": float(ece),
        "bin_count": count.long().tolist(),
        "bin_confidence": [
            float(v) if m else None for v, m in zip(conf_sum / safe, nonempty, strict=True)
        ],
        "bin_accuracy": [
            float(v) if m else None for v, m in zip(acc_sum / safe, nonempty, strict=True)
        ],
    }


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> dict:
    model.eval()
    logits = model(x).double()
    model.train()
    finite = torch.isfinite(logits).all(dim=1)
    correct = (logits.argmax(dim=1) == y) & finite  # a row with inf/NaN logits counts as wrong
    result: dict = {"val_acc": float(correct.double().mean())}
    if bool(finite.all()):
        result["val_nll"] = float(F.cross_entropy(logits, y))
        rel = reliability(logits.softmax(dim=1), y)
        result["val_ece"] = rel.pop("ece")
        result["reliability"] = rel
    else:  # a diverged model: no meaningful probabilities
        result["val_nll"] = result["val_ece"] = result["reliability"] = None
    return result


# ---------------------------------------------------------------------------------------------
# one training run


def train(
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    *,
    seed: int,
    epochs: int,
    batch_size: int,
    criterion: nn.Module,
    make_scheduler,
    width: int,
    weight_decay: float,
    mixer: BatchMixer | None = None,
) -> dict:
    """SGD (momentum 0.9) on shuffled batches (the last partial batch is dropped); the scheduler
    steps once per iteration, after ``optimizer.step()``. Stops early if the loss is not finite.
    With a ``mixer``, each batch is mixed and ``criterion`` gets its ``mix_target`` and ``lam``."""
    x_train, y_train, x_val, y_val = data
    torch.manual_seed(seed)
    model = make_model(width)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=1.0, momentum=0.9, weight_decay=weight_decay
    )  # lr=1.0 is a placeholder: make_scheduler sets the real one
    scheduler = make_scheduler(optimizer, epochs * (len(x_train) // batch_size))
    order = torch.Generator().manual_seed(seed)
    lrs: list[float] = []
    losses: list[float] = []
    diverged = False
    start = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(x_train), generator=order)
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            lrs.append(optimizer.param_groups[0]["lr"])
            images, target = x_train[idx], y_train[idx]
            if mixer is None:
                loss = criterion(model(images), target)
            else:
                images, target, mix_target, lam = mixer(images, target)
                loss = criterion(model(images), target, mix_target=mix_target, mix_lambda=lam)
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                diverged = True
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        if diverged:
            break
    result = evaluate(model, x_val, y_val)
    result.update(
        diverged=diverged,
        steps=len(lrs),
        final_train_loss=losses[-1] if math.isfinite(losses[-1]) else None,
        lr_per_step=lrs,
        train_loss_per_step=[v if math.isfinite(v) else None for v in losses],
        seconds=round(time.perf_counter() - start, 3),
    )
    return result


# ---------------------------------------------------------------------------------------------
# the two studies


def cosine_after(optimizer: torch.optim.Optimizer, total: int, warmup: int):
    """Cosine decay over the steps after the warmup (built before the warmup scheduler)."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total - warmup, 1))


def warmup_scheduler_factory(kind: str, peak_lr: float, warmup: int):
    """A ``make_scheduler(optimizer, total_steps)`` for one warmup kind at one peak lr."""

    def make(optimizer, total):
        if kind == GWS_KIND:
            # The seed's signature: the optimizer holds base = peak / multiplier and the lr ramps
            # linearly to base * multiplier over total_epoch calls, then the follower takes over
            # as if its base lr were the peak.
            for group in optimizer.param_groups:
                group["lr"] = peak_lr / GWS_MULTIPLIER
            after = cosine_after(optimizer, total, warmup)
            return GradualWarmupScheduler(
                optimizer, multiplier=GWS_MULTIPLIER, total_epoch=warmup, after_scheduler=after
            )
        for group in optimizer.param_groups:
            group["lr"] = peak_lr
        steps = 0 if kind == "none" else warmup
        after = cosine_after(optimizer, total, steps)
        shape = "constant" if kind == "constant" else "linear"
        # constant: 0.1 x peak for the warmup steps (start_factor's default for this shape);
        # gradual: peak * (t + 1) / warmup at step t, the Goyal et al. ramp.
        return WarmupScheduler(optimizer, steps, shape=shape, after=after)

    return make


def run_specs(args: argparse.Namespace, num_train: int) -> list[dict]:
    """Every run of the studies, as plain settings (what the JSON records next to the results)."""
    common = {"width": args.width, "weight_decay": args.weight_decay}
    small_batch = {  # the label-smoothing and mixup studies' batch, lr and warmup
        "base_lr": args.ls_base_lr,
        "peak_lr": linear_scaled_lr(args.ls_base_lr, args.ls_batch),
        "batch_size": args.ls_batch,
        "warmup": "gradual",
        "scheduler": "WarmupScheduler",
        "warmup_steps": args.ls_warmup_epochs * (num_train // args.ls_batch),
        **common,
    }
    specs = []
    for name, eps, spread in LS_ARMS:
        for seed in args.seeds:
            specs.append(
                {
                    "study": "label_smoothing",
                    "arm": name,
                    "eps": eps,
                    "spread": spread,
                    "seed": seed,
                    "epochs": args.ls_epochs,
                    **small_batch,
                }
            )
    warmup = args.warmup_epochs * (num_train // args.big_batch)
    arms = [(kind, base_lr) for base_lr in args.base_lrs for kind in WARMUP_KINDS]
    arms.append((GWS_KIND, args.gws_base_lr))
    for kind, base_lr in arms:
        for seed in args.seeds:
            specs.append(
                {
                    "study": "warmup",
                    "warmup": kind,
                    "scheduler": "GradualWarmupScheduler"
                    if kind == GWS_KIND
                    else "WarmupScheduler",
                    "base_lr": base_lr,
                    "peak_lr": linear_scaled_lr(base_lr, args.big_batch),
                    "batch_size": args.big_batch,
                    "epochs": args.sweep_epochs,
                    "warmup_steps": 0 if kind == "none" else warmup,
                    "eps": args.sweep_eps,
                    "spread": "all",
                    "seed": seed,
                    **common,
                }
            )
    if args.mixup:
        specs += mixup_specs(args, small_batch)
    return specs


def mixup_specs(args: argparse.Namespace, small_batch: dict) -> list[dict]:
    """The mixup study: every arm of ``MIXUP_ARMS`` for every seed, batch mode."""
    return [
        {
            "study": "mixup",
            "arm": name,
            "mixup_alpha": mixup_alpha,
            "cutmix_alpha": cutmix_alpha,
            "switch_prob": MIXUP_SWITCH_PROB,
            "mix_mode": "batch",
            "eps": args.mixup_eps,
            "spread": "all",
            "seed": seed,
            "epochs": args.mixup_epochs,
            **small_batch,
        }
        for name, mixup_alpha, cutmix_alpha in MIXUP_ARMS
        for seed in args.seeds
    ]


_DATA: tuple[Tensor, Tensor, Tensor, Tensor] | None = None


def init_worker() -> None:
    """One thread per worker process (tiny convolutions scale badly across threads, and much
    worse on a loaded machine); subnormal floats flushed to zero (a diverging run otherwise
    crawls through them)."""
    global _DATA
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    _DATA = load_data()


def make_criterion(spec: dict) -> tuple:
    """The loss of one run and, in the mixup study, its ``BatchMixer`` (None: no mixing).

    The mixup study calls the functional loss with the mixer's ``mix_target`` and ``lam``: per
    element ``lam * LS(x, y) + (1 - lam) * LS(x, y_partner)``, in one fused pass. Its mixer draws
    from a generator of its own, so mixing leaves the batch order (the ``seed``'s) unchanged.
    """
    if spec["study"] != "mixup":
        return LabelSmoothingCE(spec["eps"], spread=spec["spread"]), None
    criterion = functools.partial(
        lsr_fused.label_smoothing_cross_entropy,
        label_smoothing=spec["eps"],
        spread=spec["spread"],
    )
    if spec["mixup_alpha"] == 0 and spec["cutmix_alpha"] == 0:
        return criterion, None
    mixer = BatchMixer(
        mixup_alpha=spec["mixup_alpha"],
        cutmix_alpha=spec["cutmix_alpha"],
        switch_prob=spec["switch_prob"],
        mode=spec["mix_mode"],
        generator=torch.Generator().manual_seed(MIXER_SEED_OFFSET + spec["seed"]),
    )
    return criterion, mixer


def run_one(spec: dict) -> dict:
    if _DATA is None:
        init_worker()
    kind = spec["warmup"] if spec["study"] == "warmup" else "gradual"
    make_scheduler = warmup_scheduler_factory(kind, spec["peak_lr"], spec["warmup_steps"])
    criterion, mixer = make_criterion(spec)
    result = train(
        _DATA,
        seed=spec["seed"],
        epochs=spec["epochs"],
        batch_size=spec["batch_size"],
        criterion=criterion,
        make_scheduler=make_scheduler,
        width=spec["width"],
        weight_decay=spec["weight_decay"],
        mixer=mixer,
    )
    return {**spec, **result}


def run_all(specs: list[dict], jobs: int) -> list[dict]:
    """Run every spec, ``jobs`` single-threaded processes at a time; results in spec order."""
    runs: list[dict | None] = [None] * len(specs)

    def report(i: int, run: dict) -> None:
        runs[i] = run
        what = f"warmup {run['warmup']}" if run["study"] == "warmup" else run["arm"]
        flag = " DIVERGED" if run["diverged"] else ""
        log(
            f"[{sum(r is not None for r in runs):3d}/{len(specs)}] {what[:20]:20s} "
            f"peak lr {run['peak_lr']:<6g} seed {run['seed']}: acc {run['val_acc']:.4f}{flag} "
            f"({run['seconds']:.1f} s)"
        )

    if jobs <= 1:
        for i, spec in enumerate(specs):
            report(i, run_one(spec))
        return runs  # type: ignore[return-value]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=init_worker) as pool:
        futures = {pool.submit(run_one, spec): i for i, spec in enumerate(specs)}
        for future in as_completed(futures):
            report(futures[future], future.result())
    return runs  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# summary, table, figure


def mean_std(values: list) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(mean: float | None, std: float | None, digits: int = 4) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f} +- {std:.{digits}f}"


def summarize_arms(runs: list[dict], study: str, names: list[str]) -> dict:
    """Per arm of ``study``: mean and std over seeds of accuracy, NLL and ECE."""
    table = {}
    for name in names:
        arm = [r for r in runs if r["study"] == study and r["arm"] == name]
        table[name] = {
            key: dict(zip(("mean", "std"), mean_std([r[key] for r in arm]), strict=True))
            for key in ("val_acc", "val_nll", "val_ece")
        }
        table[name]["seeds"] = len(arm)
    return table


def summarize(runs: list[dict]) -> dict:
    ls = summarize_arms(runs, "label_smoothing", [name for name, _, _ in LS_ARMS])
    sweep: dict = {}
    for r in runs:
        if r["study"] != "warmup":
            continue
        sweep.setdefault(r["warmup"], {}).setdefault(r["peak_lr"], []).append(r)
    table = {}
    stable_max = {}
    for kind, by_lr in sweep.items():
        table[kind] = {}
        for peak, rs in sorted(by_lr.items()):
            mean, std = mean_std([r["val_acc"] for r in rs])
            table[kind][str(peak)] = {
                "base_lr": rs[0]["base_lr"],
                "peak_lr": peak,
                "val_acc_mean": mean,
                "val_acc_std": std,
                "val_acc_min": min(r["val_acc"] for r in rs),
                "diverged": sum(r["diverged"] for r in rs),
                "seeds": len(rs),
                "stable": all(r["val_acc"] >= STABLE_ACC for r in rs),
            }
        stable = [v["peak_lr"] for v in table[kind].values() if v["stable"]]
        stable_max[kind] = max(stable) if stable else None
    summary = {
        "label_smoothing": ls,
        "warmup_sweep": table,
        "largest_stable_peak_lr": stable_max,
        "stable_definition": f"every seed ends at >= {STABLE_ACC:.0%} validation accuracy",
    }
    if any(r["study"] == "mixup" for r in runs):
        summary["mixup"] = summarize_arms(runs, "mixup", [name for name, _, _ in MIXUP_ARMS])
    return summary


def print_arms(title: str, arms: dict) -> None:
    """One row per arm: accuracy, NLL and ECE, mean +- std across seeds."""
    print(title)
    width = max(16, *map(len, arms))
    print(f"{'arm':{width}s} {'accuracy':>18s} {'NLL':>18s} {'ECE (15 bins)':>18s}")
    for name, m in arms.items():
        cells = [fmt(m[k]["mean"], m[k]["std"]) for k in ("val_acc", "val_nll", "val_ece")]
        print(f"{name:{width}s} " + " ".join(f"{c:>18s}" for c in cells))


def print_table(summary: dict, args) -> None:
    seeds = len(args.seeds)
    print_arms(
        f"\nLabel smoothing (validation, {seeds} seed(s), mean +- std across seeds; "
        f"batch {args.ls_batch}, {args.ls_epochs} epochs)",
        summary["label_smoothing"],
    )
    if "mixup" in summary:
        print_arms(
            f"\nMixup and CutMix (validation, {seeds} seed(s), mean +- std across seeds; "
            f"BatchMixer mode 'batch', switch_prob {MIXUP_SWITCH_PROB}; loss eps "
            f"{args.mixup_eps:g} 'all'; batch {args.ls_batch}, {args.mixup_epochs} epochs)",
            summary["mixup"],
        )
    sweep = summary["warmup_sweep"]
    print(
        f"\nWarmup sweep: final validation accuracy, mean +- std over {seeds} seed(s) "
        f"[diverged runs]; batch {args.big_batch}, peak lr = linear_scaled_lr(base_lr, "
        f"{args.big_batch}), {args.sweep_epochs} epochs, warmup {args.warmup_epochs} epochs"
    )
    print(f"{'base_lr':>8s} {'peak lr':>8s} " + " ".join(f"{k:>20s}" for k in WARMUP_KINDS))
    peaks = sorted({float(p) for k in WARMUP_KINDS for p in sweep.get(k, {})})
    for peak in peaks:
        cells = []
        base = None
        for kind in WARMUP_KINDS:
            cell = sweep.get(kind, {}).get(str(peak))
            if cell is None:
                cells.append("")
                continue
            base = cell["base_lr"]
            text = fmt(cell["val_acc_mean"], cell["val_acc_std"], 3)
            text += f" [{cell['diverged']}]" if cell["diverged"] else ""
            cells.append(text)
        print(f"{base:>8g} {peak:>8g} " + " ".join(f"{c:>20s}" for c in cells))
    for peak, cell in sweep.get(GWS_KIND, {}).items():
        print(
            f"{GWS_KIND} (multiplier {GWS_MULTIPLIER}) at base_lr {cell['base_lr']:g}, "
            f"peak {float(peak):g}: {fmt(cell['val_acc_mean'], cell['val_acc_std'], 3)}"
        )
    stable = summary["largest_stable_peak_lr"]
    print(
        f"largest stable peak lr ({summary['stable_definition']}): "
        + ", ".join(f"{k}: {stable.get(k)}" for k in WARMUP_KINDS)
    )


def plot(runs: list[dict], summary: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 9.5))
    colors = {
        "eps=0": "C0",
        "eps=0.1 all": "C1",
        "eps=0.1 others": "C2",
        "none": "C3",
        "constant": "C4",
        "gradual": "C2",
        GWS_KIND: "k",
    }

    # Row 1: one reliability diagram per label-smoothing arm, pooled over seeds.
    edges = [i / ECE_BINS for i in range(ECE_BINS + 1)]
    width = 1.0 / ECE_BINS
    for ax, (name, _, _) in zip(axes[0], LS_ARMS, strict=True):
        arm = [r for r in runs if r["study"] == "label_smoothing" and r["arm"] == name]
        count = [0] * ECE_BINS
        conf = [0.0] * ECE_BINS
        acc = [0.0] * ECE_BINS
        for r in arm:
            rel = r["reliability"]
            if rel is None:
                continue
            for i in range(ECE_BINS):
                n = rel["bin_count"][i]
                if n:
                    count[i] += n
                    conf[i] += n * rel["bin_confidence"][i]
                    acc[i] += n * rel["bin_accuracy"][i]
        total = sum(count)
        mids, accs, gaps, fracs = [], [], [], []
        for i in range(ECE_BINS):
            if count[i]:
                mids.append(edges[i] + width / 2)
                accs.append(acc[i] / count[i])
                gaps.append(conf[i] / count[i] - acc[i] / count[i])
                fracs.append(count[i] / total)
        ax.bar(
            mids,
            accs,
            width=width,
            color=colors[name],
            alpha=0.8,
            edgecolor="k",
            lw=0.5,
            label="accuracy",
        )
        ax.bar(
            mids,
            gaps,
            bottom=accs,
            width=width,
            color="none",
            edgecolor="r",
            hatch="//",
            lw=0.5,
            label="confidence - accuracy",
        )
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        twin = ax.twinx()
        twin.plot(mids, fracs, "o:", color="0.3", ms=3, lw=1, label="fraction of samples")
        twin.set_ylim(0, 1)
        twin.set_ylabel("fraction of samples in bin", color="0.3", fontsize=8)
        twin.tick_params(labelsize=7, colors="0.3")
        m = summary["label_smoothing"][name]
        ax.set_title(
            f"Reliability, {name}: ECE {fmt(m['val_ece']['mean'], m['val_ece']['std'], 3)}\n"
            f"acc {fmt(m['val_acc']['mean'], m['val_acc']['std'], 3)}, "
            f"NLL {fmt(m['val_nll']['mean'], m['val_nll']['std'], 3)}",
            fontsize=9,
        )
        ax.set_xlabel("confidence (max softmax), 15 bins")
        ax.set_ylabel("accuracy in bin")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(loc="upper left", fontsize=7)

    # Row 2: accuracy vs peak lr; lr curves; training loss at a high lr.
    ax = axes[1][0]
    sweep = summary["warmup_sweep"]
    for kind in (*WARMUP_KINDS, GWS_KIND):
        cells = sorted(sweep.get(kind, {}).values(), key=lambda c: c["peak_lr"])
        if not cells:
            continue
        xs = [c["peak_lr"] for c in cells]
        ys = [c["val_acc_mean"] for c in cells]
        es = [c["val_acc_std"] for c in cells]
        style = dict(marker="s", ls="none", ms=9, mfc="none") if kind == GWS_KIND else {}
        ax.errorbar(xs, ys, yerr=es, color=colors[kind], capsize=3, label=kind, **style)
        lows = [c["val_acc_min"] for c in cells]
        ax.scatter(xs, lows, color=colors[kind], marker="v", s=12, alpha=0.6)
    ax.axhline(STABLE_ACC, color="0.5", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"peak lr = linear_scaled_lr(base_lr, {args.big_batch})")
    ax.set_ylabel("final validation accuracy")
    ax.set_title(
        f"Warmup sweep, batch {args.big_batch}: mean +- std over {len(args.seeds)} "
        "seed(s), v = worst seed",
        fontsize=9,
    )
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, loc="lower left")

    ax = axes[1][1]
    shown = args.gws_base_lr
    for kind in (*WARMUP_KINDS, GWS_KIND):
        run = next(
            (
                r
                for r in runs
                if r["study"] == "warmup"
                and r["warmup"] == kind
                and r["base_lr"] == shown
                and not r["diverged"]
            ),
            None,
        )
        if run is None:
            continue
        ls = "--" if kind == GWS_KIND else "-"
        label = kind if kind == GWS_KIND else f"{kind} (WarmupScheduler)"
        ax.plot(run["lr_per_step"], ls, color=colors[kind], label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(
        f"lr per step at base_lr {shown:g} (peak "
        f"{linear_scaled_lr(shown, args.big_batch):g}); warmup {args.warmup_epochs} "
        "epochs, then cosine",
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="lower left")
    inset = ax.inset_axes([0.6, 0.55, 0.37, 0.3])
    for line in ax.get_lines():
        inset.plot(line.get_xdata(), line.get_ydata(), line.get_linestyle(), color=line.get_color())
    warmup_steps = max((r["warmup_steps"] for r in runs if r["study"] == "warmup"), default=1)
    inset.set_xlim(-0.5, 3 * max(1, warmup_steps))
    inset.tick_params(labelsize=6)
    inset.set_title("first steps", fontsize=7)

    ax = axes[1][2]
    loss_lr = pick_loss_lr(summary)
    for kind in WARMUP_KINDS:
        for r in runs:
            if r["study"] == "warmup" and r["warmup"] == kind and r["base_lr"] == loss_lr:
                label = kind if r["seed"] == args.seeds[0] else None
                ys = [v if v is not None else float("nan") for v in r["train_loss_per_step"]]
                ax.plot(ys, color=colors[kind], lw=1, alpha=0.8, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"training loss (label-smoothed, eps={args.sweep_eps:g})")
    ax.set_title(
        f"Training loss at base_lr {loss_lr:g} (peak "
        f"{linear_scaled_lr(loss_lr, args.big_batch):g}), every seed",
        fontsize=9,
    )
    ax.legend(fontsize=7)

    fig.suptitle("lsr_fused bag of tricks on sklearn digits (small ResNet with batch norm)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def pick_loss_lr(summary: dict) -> float:
    """The base_lr whose loss curves are shown: where the warmup kinds' mean accuracies differ
    most (the largest base_lr of the sweep on a tie)."""
    sweep = summary["warmup_sweep"]
    best, best_spread = None, -1.0
    for cell in sorted(sweep.get("none", {}).values(), key=lambda c: c["peak_lr"]):
        key = str(cell["peak_lr"])
        means = [sweep[k][key]["val_acc_mean"] for k in WARMUP_KINDS if key in sweep.get(k, {})]
        spread = max(means) - min(means)
        if spread >= best_spread:
            best, best_spread = cell["base_lr"], spread
    return best


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="one seed, fewer epochs (under a minute on 2 cores)"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (quick: 0)"
    )
    parser.add_argument(
        "--base-lrs",
        type=float,
        nargs="+",
        default=None,
        help="warmup sweep, lr per 256 images (default 0.025 0.05 ... 6.4)",
    )
    parser.add_argument(
        "--gws-base-lr",
        type=float,
        default=1.6,
        help="base_lr of the GradualWarmupScheduler run (and of the lr panel)",
    )
    parser.add_argument("--ls-epochs", type=int, default=None, help="default 30 (quick: 6)")
    parser.add_argument("--sweep-epochs", type=int, default=None, help="default 60 (quick: 12)")
    parser.add_argument("--warmup-epochs", type=int, default=None, help="default 5 (quick: 2)")
    parser.add_argument("--ls-batch", type=int, default=64)
    parser.add_argument("--ls-base-lr", type=float, default=0.2, help="lr per 256 images")
    parser.add_argument("--ls-warmup-epochs", type=int, default=2)
    parser.add_argument("--big-batch", type=int, default=512)
    parser.add_argument(
        "--sweep-eps", type=float, default=0.1, help="label smoothing of the warmup sweep's loss"
    )
    parser.add_argument(
        "--mixup", action="store_true",
        help="also run the mixup / CutMix study (BatchMixer with the loss's mix_target=)",
    )  # fmt: skip
    parser.add_argument(
        "--mixup-epochs", type=int, default=None, help="mixup study (default: --ls-epochs)"
    )
    parser.add_argument(
        "--mixup-eps", type=float, default=0.1, help="label smoothing of the mixup study's loss"
    )
    parser.add_argument("--width", type=int, default=16, help="channels of the first stage")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="runs in parallel, one single-threaded process each (default: 2)",
    )
    parser.add_argument(
        "--replot", type=Path, default=None, metavar="JSON",
        help="no training: print the table and redraw the PNG next to a JSON this script wrote",
    )  # fmt: skip
    args = parser.parse_args(argv)
    quick = args.quick
    if args.seeds is None:
        args.seeds = [0] if quick else [0, 1, 2]
    if args.base_lrs is None:
        args.base_lrs = [0.025 * 2**k for k in range(9)]  # 0.025 ... 6.4
    if args.ls_epochs is None:
        args.ls_epochs = 6 if quick else 30
    if args.mixup_epochs is None:
        args.mixup_epochs = args.ls_epochs
    if args.sweep_epochs is None:
        args.sweep_epochs = 12 if quick else 60
    if args.warmup_epochs is None:
        args.warmup_epochs = 2 if quick else 5
    return args


def write_json(record: dict, path: Path) -> None:
    """Indented, except one line per run; per-step lrs to 7 and losses to 5 significant digits."""

    def rounded(values: list, digits: int) -> list:
        return [None if v is None else float(f"{v:.{digits}g}") for v in values]

    runs = [
        {**r, "lr_per_step": rounded(r["lr_per_step"], 7),
         "train_loss_per_step": rounded(r["train_loss_per_step"], 5)}
        for r in record["runs"]
    ]  # fmt: skip
    head = json.dumps({k: v for k, v in record.items() if k != "runs"}, indent=1)
    lines = ",\n".join("  " + json.dumps(r, separators=(",", ":")) for r in runs)
    path.write_text(head[:-2] + ',\n "runs": [\n' + lines + "\n ]\n}\n")


def _portable(path: Path) -> str:
    """A path as the JSON records it: relative to the working directory when inside it, so that a
    committed result names no machine's directories."""
    resolved, here = path.resolve(), Path.cwd()
    return str(resolved.relative_to(here)) if resolved.is_relative_to(here) else str(path)


def replot(path: Path) -> int:
    """Print the table and draw the figure again from a JSON this script wrote (no training)."""
    record = json.loads(path.read_text())
    args = argparse.Namespace(**record["config"])
    summary = summarize(record["runs"])
    print_table(summary, args)
    plot(record["runs"], summary, args, path.with_suffix(".png"))
    print(f"\nwrote {path.with_suffix('.png')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot is not None:
        return replot(args.replot)
    start = time.perf_counter()
    data = load_data()
    specs = run_specs(args, len(data[0]))
    log(f"{len(specs)} runs, {args.jobs} at a time")
    runs = run_all(specs, args.jobs)
    summary = summarize(runs)
    print_table(summary, args)
    elapsed = time.perf_counter() - start
    # CPU time of this process and of the (finished, reaped) worker processes.
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(u.ru_utime + u.ru_stime for u in usage)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bag_of_tricks_quick" if args.quick else "bag_of_tricks"
    config = {k: (_portable(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    record = {
        "command": " ".join(["python", "examples/bag_of_tricks.py", *(argv or sys.argv[1:])]),
        "config": config,
        "data": {
            "dataset": "sklearn.datasets.load_digits",
            "train": len(data[0]),
            "val": len(data[2]),
            "split": "stratified, test_size=0.3, random_state=0",
        },
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "lsr_fused": lsr_fused.__version__,
            "jobs": args.jobs,
            "threads_per_job": 1,
            "cpu_count": os.cpu_count(),
            "loss_backend": lsr_fused.available_backends("cpu")[0],
            "load_average": list(os.getloadavg()),
        },
        "elapsed_s": round(elapsed, 1),
        "cpu_s": round(cpu, 1),
        "summary": summary,
        "runs": runs,
    }
    write_json(record, args.out / f"{stem}.json")
    plot(runs, summary, args, args.out / f"{stem}.png")
    print(
        f"\n{len(runs)} runs in {elapsed:.0f} s ({cpu:.0f} s of CPU); "
        f"wrote {args.out / stem}.json and .png"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
