"""lsr_fused.integrations.timm.TimmScheduler driven the way timm's train.py drives a scheduler.

The loop below makes timm's calls: ``step_update(num_updates=..., metric=...)`` after every
optimizer step and ``step(epoch + 1, metric)`` after every epoch; a resume either loads the
scheduler's state or, as train.py does without it, calls ``step_update(start_epoch * n)`` (updates)
or ``step(start_epoch)`` (epochs) on a fresh scheduler. Expected lrs come from timm's
CosineLRScheduler formula (``timm_cosine``, re-derived in test_scheduler_clients.py).
"""

from __future__ import annotations

import io
import math
import sys
from collections.abc import Callable

import pytest
import torch
from test_scheduler_clients import timm_cosine
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, ReduceLROnPlateau

from lsr_fused.integrations.timm import TimmScheduler
from lsr_fused.scheduler import WarmupScheduler

BASES = [0.1, 0.02, 0.3]
PER_EPOCH, EPOCHS = 4, 8
WARMUP_EPOCHS, INIT, LR_MIN = 2, 0.05, 1e-4  # INIT is above group 1's base: it ramps down


def make_sgd() -> torch.optim.SGD:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": b} for b in BASES]
    return torch.optim.SGD(groups, lr=1.0)


def lrs_of(opt: torch.optim.Optimizer) -> list[float]:
    return [float(g["lr"]) for g in opt.param_groups]


def loss_at(update: int) -> float:
    return 2.0 / (1 + update)


def eval_metric(epoch: int) -> float:
    return 1.0  # flat: a plateau scheduler reduces after every epoch past its patience


def train(
    opt: torch.optim.Optimizer,
    sched: TimmScheduler,
    epochs: range,
    stop_after: int | None = None,
) -> list[list[float]]:
    """timm's train.py loop: the lrs of every optimizer step; stop after ``stop_after`` updates."""
    seen = []
    for epoch in epochs:
        num_updates = epoch * PER_EPOCH
        for _ in range(PER_EPOCH):
            if stop_after is not None and num_updates == stop_after:
                return seen
            seen.append(lrs_of(opt))
            opt.step()
            num_updates += 1
            sched.step_update(num_updates=num_updates, metric=loss_at(num_updates))
        sched.step(epoch + 1, eval_metric(epoch))
    return seen


def timm_cosine_updates() -> tuple[Callable[[], tuple[torch.optim.Optimizer, TimmScheduler]], list]:
    """timm's CosineLRScheduler with sched_on_updates (t in updates), warmup_prefix=False."""
    t_initial, warmup_t = EPOCHS * PER_EPOCH, WARMUP_EPOCHS * PER_EPOCH

    def build() -> tuple[torch.optim.Optimizer, TimmScheduler]:
        opt = make_sgd()

        def cosine(base: float) -> Callable[[int], float]:
            def factor(k: int) -> float:  # k counts from the hand-off, timm's t from 0
                t = k + warmup_t
                cos = math.cos(math.pi * t / t_initial)
                return (LR_MIN + 0.5 * (base - LR_MIN) * (1 + cos)) / base

            return factor

        after = LambdaLR(opt, [cosine(b) for b in BASES])
        warm = WarmupScheduler(opt, warmup_t, start_lr=INIT, after=after)
        return opt, TimmScheduler(warm)

    expected = [
        [
            timm_cosine(
                u,
                b,
                t_initial=t_initial,
                lr_min=LR_MIN,
                warmup_t=warmup_t,
                warmup_lr_init=INIT,
                warmup_prefix=False,
            )
            for b in BASES
        ]
        for u in range(EPOCHS * PER_EPOCH)
    ]
    return build, expected


def cosine_epochs() -> tuple[Callable[[], tuple[torch.optim.Optimizer, TimmScheduler]], list]:
    """t_in_epochs=True: the warmup per update, a CosineAnnealingLR per epoch from epoch 0."""
    warmup_t = WARMUP_EPOCHS * PER_EPOCH - 1  # ends one update before an epoch boundary

    def build() -> tuple[torch.optim.Optimizer, TimmScheduler]:
        opt = make_sgd()
        after = CosineAnnealingLR(opt, T_max=EPOCHS, eta_min=LR_MIN)
        warm = WarmupScheduler(opt, warmup_t, start_lr=INIT, after=after, after_clock="epoch")
        # updates_per_epoch: train.py's resume call step(start_epoch) then restores the warmup too.
        return opt, TimmScheduler(warm, t_in_epochs=True, updates_per_epoch=PER_EPOCH)

    expected = []
    for u in range(EPOCHS * PER_EPOCH):
        epoch = u // PER_EPOCH
        row = []
        for b in BASES:
            if u < warmup_t:
                row.append(INIT + u * (b - INIT) / warmup_t)
            else:
                row.append(LR_MIN + (b - LR_MIN) * (1 + math.cos(math.pi * epoch / EPOCHS)) / 2)
        expected.append(row)
    return build, expected


SCHEDULES = {"updates": timm_cosine_updates, "epochs": cosine_epochs}


def save_load(state: object) -> object:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_train_loop_follows_the_closed_form(name: str) -> None:
    build, expected = SCHEDULES[name]()
    opt, sched = build()
    seen = train(opt, sched, range(EPOCHS))
    assert len(seen) == len(expected)
    for u, (a, e) in enumerate(zip(seen, expected, strict=True)):
        assert a == pytest.approx(e, rel=1e-12, abs=0.0), u
    assert seen[0][1] == pytest.approx(INIT, rel=1e-15) and seen[0][1] > BASES[1]


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("stop", [3, 7, 8, 13, 20], ids=lambda s: f"stop at update {s}")
def test_resume_from_state_is_bit_exact(name: str, stop: int) -> None:
    build, _ = SCHEDULES[name]()
    opt, sched = build()
    uninterrupted = train(opt, sched, range(EPOCHS))
    opt, sched = build()
    first = train(opt, sched, range(EPOCHS), stop_after=stop)
    checkpoint = save_load({"opt": opt.state_dict(), "sched": sched.state_dict()})
    opt, sched = build()
    opt.load_state_dict(checkpoint["opt"])  # type: ignore[index]
    sched.load_state_dict(checkpoint["sched"])  # type: ignore[index]
    epoch = stop // PER_EPOCH
    rest = train_from(opt, sched, stop)
    assert first + rest == uninterrupted, epoch


def train_from(opt: torch.optim.Optimizer, sched: TimmScheduler, update: int) -> list:
    """Continue the train.py loop from ``update`` (possibly mid-epoch)."""
    epoch, done = divmod(update, PER_EPOCH)
    seen = []
    num_updates = update
    for _ in range(done, PER_EPOCH):
        seen.append(lrs_of(opt))
        opt.step()
        num_updates += 1
        sched.step_update(num_updates=num_updates, metric=loss_at(num_updates))
    sched.step(epoch + 1, eval_metric(epoch))
    return seen + train(opt, sched, range(epoch + 1, EPOCHS))


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("start_epoch", [1, 2, 5])
def test_resume_without_state_like_train_py_is_bit_exact(name: str, start_epoch: int) -> None:
    # train.py without scheduler state: step_update(start_epoch * n) if on updates, else
    # step(start_epoch), on a freshly built scheduler.
    build, _ = SCHEDULES[name]()
    opt, sched = build()
    uninterrupted = train(opt, sched, range(EPOCHS))
    opt, sched = build()
    if sched.t_in_epochs:
        sched.step(start_epoch)
    else:
        sched.step_update(start_epoch * PER_EPOCH)
    assert train(opt, sched, range(start_epoch, EPOCHS)) == uninterrupted[start_epoch * PER_EPOCH :]


def test_plateau_per_epoch_gets_the_epoch_metric() -> None:
    opt = make_sgd()
    plateau = ReduceLROnPlateau(opt, factor=0.5, patience=0)
    seen_metrics: list[float] = []
    original = plateau.step

    def record(metrics: float) -> None:
        seen_metrics.append(metrics)
        original(metrics)

    plateau.step = record  # type: ignore[method-assign]
    warm = WarmupScheduler(opt, PER_EPOCH + 1, after=plateau, after_clock="epoch")
    sched = TimmScheduler(warm, t_in_epochs=True)
    seen = train(opt, sched, range(4))
    # step(1) comes at update 4, in the warmup: its metric is ignored. step(2), step(3) and
    # step(4) pass eval_metric = 1.0: the first sets the best, each later one halves the lr.
    assert seen_metrics == [1.0, 1.0, 1.0]
    assert seen[2 * PER_EPOCH] == BASES and seen[3 * PER_EPOCH] == [b / 2 for b in BASES]


def test_plateau_per_update_gets_the_update_metric() -> None:
    opt = make_sgd()
    plateau = ReduceLROnPlateau(opt, factor=0.5, patience=100)
    warm = WarmupScheduler(opt, 3, after=plateau)
    sched = TimmScheduler(warm)
    train(opt, sched, range(2))
    assert plateau.best == pytest.approx(loss_at(2 * PER_EPOCH), rel=1e-15)  # falling loss


def test_bad_arguments_and_states() -> None:
    opt = make_sgd()
    per_update = WarmupScheduler(opt, 3, after=CosineAnnealingLR(opt, 5))
    with pytest.raises(ValueError, match=r"^t_in_epochs=True.*after_clock='epoch'"):
        TimmScheduler(per_update, t_in_epochs=True)
    opt = make_sgd()
    per_epoch = WarmupScheduler(opt, 3, after=CosineAnnealingLR(opt, 5), after_clock="epoch")
    with pytest.raises(ValueError, match=r"^t_in_epochs=False"):
        TimmScheduler(per_epoch)
    with pytest.raises(ValueError, match=r"^scheduler"):
        TimmScheduler(CosineAnnealingLR(make_sgd(), 5))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^t_in_epochs"):
        TimmScheduler(WarmupScheduler(make_sgd(), 3), t_in_epochs=1)  # type: ignore[arg-type]
    sched = TimmScheduler(WarmupScheduler(make_sgd(), 3))
    with pytest.raises(TypeError, match=r"^num_updates"):
        sched.step_update(2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="behind"):
        sched.step_update(2)
        sched.step_update(1)
    with pytest.raises(ValueError, match="t_in_epochs"):
        sched.load_state_dict({"t_in_epochs": True, "scheduler": sched.scheduler.state_dict()})
    with pytest.raises(ValueError, match="scheduler"):
        sched.load_state_dict({"t_in_epochs": False})


def test_timm_is_not_imported() -> None:
    assert "timm" not in sys.modules
