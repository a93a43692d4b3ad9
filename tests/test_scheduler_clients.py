"""The schedules real clients use, every step, three param groups, against the clients' own forms.

* Hugging Face: the schedulers of ``transformers.optimization`` themselves (skipped where
  transformers is not installed), equal bit for bit wherever the package's closed form performs
  the same float operations (every warmup here, with ``start_factor=0``).
* torch: ``SequentialLR([LinearLR, ...])`` built on a second optimizer.
* timm: ``CosineLRScheduler``'s formula, re-derived below from timm's documentation (timm does not
  import on these machines), including ``warmup_lr_init`` above a group's base lr (a ramp down).

``lrs[t]`` is the lr of optimizer step ``t``: right after construction for ``t = 0``, then after
each ``scheduler.step()``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import torch
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    ExponentialLR,
    LambdaLR,
    LinearLR,
    LRScheduler,
    SequentialLR,
    StepLR,
)

from lsr_fused.scheduler import WarmupScheduler

BASES = [0.1, 0.02, 0.3]


def make_sgd(bases: list[float] = BASES) -> torch.optim.SGD:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": b} for b in bases]
    return torch.optim.SGD(groups, lr=1.0)


def lrs_of(opt: torch.optim.Optimizer) -> list[float]:
    return [float(g["lr"]) for g in opt.param_groups]


def trace(opt: torch.optim.Optimizer, sched: LRScheduler, steps: int) -> list[list[float]]:
    """lrs of steps 0 .. steps, every group."""
    rows = [lrs_of(opt)]
    for _ in range(steps):
        opt.step()
        sched.step()
        rows.append(lrs_of(opt))
    return rows


def assert_rows_close(actual: list[list[float]], expected: list[list[float]], rel: float) -> None:
    assert len(actual) == len(expected)
    for t, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a == pytest.approx(e, rel=rel, abs=0.0), f"step {t}: {a} != {e}"


# ---------------------------------------------------------------------------------------------
# Hugging Face (transformers.optimization), the package itself

W, N = 7, 30  # warmup steps, total steps


def hf_linear_decay(t: int) -> float:
    return max(0.0, float(N - t) / float(max(1, N - W)))


def hf_cosine_decay(t: int, cycles: float = 0.5, min_rate: float | None = None) -> float:
    progress = float(t - W) / float(max(1, N - W))
    factor = 0.5 * (1.0 + math.cos(math.pi * float(cycles) * 2.0 * progress))
    if min_rate is None:
        return max(0.0, factor)
    return max(0.0, factor * (1.0 - min_rate) + min_rate)


def hf_inverse_sqrt(t: int) -> float:
    return 1.0 / math.sqrt((t + 0) / W)  # timescale = W, so shift = 0


# name: (HF function, its arguments after the optimizer, the after-scheduler's lambda or None)
HF_CASES: dict[str, tuple[str, dict, Callable[[int], float] | None]] = {
    "linear": (
        "get_linear_schedule_with_warmup",
        {"num_warmup_steps": W, "num_training_steps": N},
        hf_linear_decay,
    ),
    "cosine": (
        "get_cosine_schedule_with_warmup",
        {"num_warmup_steps": W, "num_training_steps": N},
        hf_cosine_decay,
    ),
    "cosine_min_lr": (
        "get_cosine_with_min_lr_schedule_with_warmup",
        {"num_warmup_steps": W, "num_training_steps": N, "min_lr_rate": 0.1},
        lambda t: hf_cosine_decay(t, 0.5, 0.1),
    ),
    "constant": ("get_constant_schedule_with_warmup", {"num_warmup_steps": W}, None),
    "inverse_sqrt": ("get_inverse_sqrt_schedule", {"num_warmup_steps": W}, hf_inverse_sqrt),
}


def wsd_decay(t: int, stable: int, decay: int, kind: str) -> float:
    """HF's WSD after the warmup: stable, then decay to min_lr_ratio = 0."""
    if t < W + stable:
        return 1.0
    if t < W + stable + decay:
        progress = float(t - W - stable) / float(max(1, decay))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
        return max(0.0, 1.0 - math.sqrt(progress))
    return 0.0


@pytest.mark.parametrize("name", list(HF_CASES))
def test_hugging_face_schedules_bit_for_bit(name: str) -> None:
    transformers = pytest.importorskip("transformers")
    function, kwargs, post = HF_CASES[name]
    ref = make_sgd()
    expected = trace(ref, getattr(transformers, function)(ref, **kwargs), N + 3)
    opt = make_sgd()
    # Sequential: the after-scheduler's step k is HF's step W + k.
    after = None if post is None else LambdaLR(opt, lambda k: post(W + k))
    sched = WarmupScheduler(opt, W, start_factor=0.0, after=after)
    assert trace(opt, sched, N + 3) == expected


@pytest.mark.parametrize("warmup", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize("decay", ["linear", "cosine", "1-sqrt"])
def test_hugging_face_wsd_bit_for_bit(warmup: str, decay: str) -> None:
    transformers = pytest.importorskip("transformers")
    stable, decay_steps = 9, 11
    ref = make_sgd()
    hf = transformers.get_wsd_schedule(
        ref,
        W,
        decay_steps,
        num_stable_steps=stable,
        warmup_type=warmup,
        decay_type=decay,
    )
    total = W + stable + decay_steps + 3
    expected = trace(ref, hf, total)
    opt = make_sgd()
    after = LambdaLR(opt, lambda k: wsd_decay(W + k, stable, decay_steps, decay))
    sched = WarmupScheduler(opt, W, start_factor=0.0, shape=warmup, after=after)
    assert trace(opt, sched, total) == expected


@pytest.mark.parametrize("warmup", ["linear", "cosine", "1-sqrt"])
def test_hugging_face_wsd_with_min_lr_ratio(warmup: str) -> None:
    # min_lr_ratio r is the start factor; HF rounds g * (1 - r) + r, this package s + (1 - s) g.
    transformers = pytest.importorskip("transformers")
    ratio = 0.1
    ref = make_sgd()
    hf = transformers.get_wsd_schedule(
        ref, W, 5, num_stable_steps=4, warmup_type=warmup, min_lr_ratio=ratio
    )
    expected = trace(ref, hf, W + 1)
    opt = make_sgd()
    sched = WarmupScheduler(opt, W, start_factor=ratio, shape=warmup)
    assert_rows_close(trace(opt, sched, W + 1), expected, rel=1e-15)


# ---------------------------------------------------------------------------------------------
# torch: LinearLR / SequentialLR on a second optimizer


@pytest.mark.parametrize("start", [0.001, 0.25, 1 / 3])  # LinearLR refuses 0
@pytest.mark.parametrize(
    "follower",
    [
        lambda o: CosineAnnealingLR(o, T_max=12, eta_min=0.001),
        lambda o: StepLR(o, step_size=4, gamma=0.5),
        lambda o: ExponentialLR(o, gamma=0.9),
    ],
    ids=["cosine", "step", "exponential"],
)
def test_torch_sequential_linear_lr(
    start: float, follower: Callable[[torch.optim.Optimizer], LRScheduler]
) -> None:
    warm = 6
    ref = make_sgd()
    linear = LinearLR(ref, start_factor=start, end_factor=1.0, total_iters=warm)
    expected = trace(ref, SequentialLR(ref, [linear, follower(ref)], milestones=[warm]), 24)
    opt = make_sgd()
    sched = WarmupScheduler(opt, warm, start_factor=start, after=follower(opt))
    assert_rows_close(trace(opt, sched, 24), expected, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# timm: CosineLRScheduler, its formula re-derived here


def timm_cosine(
    t: int,
    base: float,
    *,
    t_initial: int,
    lr_min: float,
    warmup_t: int,
    warmup_lr_init: float,
    warmup_prefix: bool,
) -> float:
    """timm's CosineLRScheduler (cycle_mul = 1, cycle_decay = 1, cycle_limit = 1, k_decay = 1).

    Warmup: ``warmup_lr_init + t * (base - warmup_lr_init) / warmup_t`` for ``t < warmup_t``.
    Then, with ``t' = t - warmup_t`` if ``warmup_prefix`` else ``t``:
    ``lr_min + (base - lr_min) * (1 + cos(pi * t' / t_initial)) / 2`` for ``t' < t_initial``,
    and ``lr_min`` after the (single) cycle.
    """
    if t < warmup_t:
        return warmup_lr_init + t * ((base - warmup_lr_init) / warmup_t)
    if warmup_prefix:
        t -= warmup_t
    if t >= t_initial:
        return lr_min
    return lr_min + 0.5 * (base - lr_min) * (1 + math.cos(math.pi * t / t_initial))


def timm_as_warmup_scheduler(
    opt: torch.optim.Optimizer,
    *,
    t_initial: int,
    lr_min: float,
    warmup_t: int,
    init: float,
    prefix: bool,
) -> WarmupScheduler:
    """timm's schedule written with this package: start_lr, then a per-group LambdaLR."""
    shift = 0 if prefix else warmup_t

    def cosine_factor(base: float) -> Callable[[int], float]:
        def factor(k: int) -> float:
            t = k + shift
            if t >= t_initial:
                return lr_min / base
            return (lr_min + 0.5 * (base - lr_min) * (1 + math.cos(math.pi * t / t_initial))) / base

        return factor

    after = LambdaLR(opt, [cosine_factor(g["lr"]) for g in opt.param_groups])
    return WarmupScheduler(opt, warmup_t, start_lr=init, after=after)


@pytest.mark.parametrize("prefix", [False, True])
@pytest.mark.parametrize("init", [1e-6, 0.05], ids=["init below", "init above group 1"])
def test_timm_cosine_with_warmup(prefix: bool, init: float) -> None:
    t_initial, lr_min, warmup_t = 20, 1e-4, 5
    opt = make_sgd()
    sched = timm_as_warmup_scheduler(
        opt, t_initial=t_initial, lr_min=lr_min, warmup_t=warmup_t, init=init, prefix=prefix
    )
    total = t_initial + warmup_t + 4
    expected = [
        [
            timm_cosine(
                t,
                b,
                t_initial=t_initial,
                lr_min=lr_min,
                warmup_t=warmup_t,
                warmup_lr_init=init,
                warmup_prefix=prefix,
            )
            for b in BASES
        ]
        for t in range(total + 1)
    ]
    rows = trace(opt, sched, total)
    assert_rows_close(rows, expected, rel=1e-12)
    if init > BASES[1]:  # the ramp down: group 1 starts above its base lr and falls to it
        group1 = [row[1] for row in rows[: warmup_t + 1]]
        assert all(a > b for a, b in itertools.pairwise(group1))
        assert rows[0][1] == pytest.approx(init, rel=1e-15)


def test_timm_cosine_with_warmup_prefix_is_cosine_annealing_lr() -> None:
    # The README's row: warmup_prefix=True is CosineAnnealingLR counted from the hand-off.
    t_initial, lr_min, warmup_t, init = 16, 1e-4, 4, 0.05
    opt = make_sgd()
    after = CosineAnnealingLR(opt, T_max=t_initial, eta_min=lr_min)
    sched = WarmupScheduler(opt, warmup_t, start_lr=init, after=after)
    total = warmup_t + t_initial  # one cycle: timm then stays at lr_min, torch turns back up
    expected = [
        [
            timm_cosine(
                t,
                b,
                t_initial=t_initial,
                lr_min=lr_min,
                warmup_t=warmup_t,
                warmup_lr_init=init,
                warmup_prefix=True,
            )
            for b in BASES
        ]
        for t in range(total + 1)
    ]
    assert_rows_close(trace(opt, sched, total), expected, rel=1e-12)
