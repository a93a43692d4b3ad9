"""Tests of lsr_fused.scheduler against closed forms written out here, independently of the code.

``lrs[t]`` always means the lr the optimizer uses for its step number ``t``: the value right after
construction for t = 0, then after each ``optimizer.step(); scheduler.step()`` pair.
"""

from __future__ import annotations

import io
import itertools
import math
import random
import warnings
from collections.abc import Callable

import pytest
import torch
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    LambdaLR,
    MultiStepLR,
    ReduceLROnPlateau,
    StepLR,
)

from lsr_fused.scheduler import GradualWarmupScheduler, WarmupScheduler, linear_scaled_lr

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
SHAPES = ["constant", "linear", "exponential", "cosine"]
REL = 1e-12


# ---------------------------------------------------------------------------------------------
# closed forms, written from the documentation


def warm_factor(t: int, steps: int, start: float | None, shape: str) -> float:
    """f(t) of the module docstring."""
    if t >= steps:
        return 1.0
    if start is None:
        if shape == "constant":
            return 0.1
        start = {"linear": 0.0, "cosine": 0.0, "exponential": 0.01}[shape]
        progress = (t + 1) / steps
    else:
        progress = t / steps
    if shape == "constant":
        return start
    if shape == "linear":
        return start + (1 - start) * progress
    if shape == "cosine":
        return start + (1 - start) * (1 - math.cos(math.pi * progress)) / 2
    return start ** (1 - progress)


def make_sgd(bases: list[float], tensor_lr: bool = False) -> torch.optim.SGD:
    groups = []
    for base in bases:
        lr = torch.tensor(base, dtype=torch.float64) if tensor_lr else base
        groups.append({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr})
    return torch.optim.SGD(groups, lr=1.0)


def current_lrs(opt: torch.optim.Optimizer) -> list[float]:
    return [float(g["lr"]) for g in opt.param_groups]


def run(
    opt: torch.optim.Optimizer,
    sched: WarmupScheduler,
    n: int,
    metrics: Callable[[int], float] | None = None,
    start: int = 0,
) -> list[list[float]]:
    """lrs of steps start .. start + n (n + 1 rows); checks get_last_lr() against the optimizer."""
    rows = []
    for t in range(start, start + n + 1):
        held = current_lrs(opt)
        assert [float(lr) for lr in sched.get_last_lr()] == held
        rows.append(held)
        if t == start + n:
            break
        opt.step()
        if metrics is None:
            sched.step()
        else:
            sched.step(metrics=metrics(t))
    return rows


def column(rows: list[list[float]], group: int = 0) -> list[float]:
    return [row[group] for row in rows]


def assert_close_seq(actual: list[float], expected: list[float], rel: float = REL) -> None:
    assert len(actual) == len(expected)
    for t, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a == pytest.approx(e, rel=rel, abs=0.0), f"step {t}: {a} != {e}"


# ---------------------------------------------------------------------------------------------
# closed forms of each shape


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("start", [None, 0.0, 0.25, 1.0])
@pytest.mark.parametrize("steps", [0, 1, 5, 13])
def test_each_shape_follows_its_closed_form(shape: str, start: float | None, steps: int) -> None:
    if shape == "exponential" and start == 0.0:
        return  # rejected, see test_bad_arguments
    base = 0.3
    opt = make_sgd([base])
    sched = WarmupScheduler(opt, steps, start_factor=start, shape=shape)
    lrs = column(run(opt, sched, steps + 4))
    expected = [base * warm_factor(t, steps, start, shape) for t in range(steps + 5)]
    assert_close_seq(lrs, expected)
    # The warmup lands on the base lr bit for bit, and stays there.
    assert all(lr == base for lr in lrs[steps:])


def test_hand_computed_values() -> None:
    # Bag of Tricks: lr_t = 0.1 * (t + 1) / 4, full lr at the last warmup step.
    opt = make_sgd([0.1])
    assert_close_seq(
        column(run(opt, WarmupScheduler(opt, 4), 5)), [0.025, 0.05, 0.075, 0.1] + [0.1] * 2
    )
    # ResNet: 0.01 for the warmup, then 0.1.
    opt = make_sgd([0.1])
    lrs = column(run(opt, WarmupScheduler(opt, 3, shape="constant"), 4))
    assert_close_seq(lrs, [0.01, 0.01, 0.01, 0.1, 0.1])
    # Explicit start factor: LinearLR's convention, f(0) = s and 1 at t = W.
    opt = make_sgd([1.0])
    lrs = column(run(opt, WarmupScheduler(opt, 4, start_factor=0.2), 5))
    assert_close_seq(lrs, [0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    # Geometric: 0.01 ** (1 - (t + 1) / 2).
    opt = make_sgd([1.0])
    lrs = column(run(opt, WarmupScheduler(opt, 2, shape="exponential"), 2))
    assert_close_seq(lrs, [0.1, 1.0, 1.0])
    # Half-cosine from 0: (1 - cos(pi (t + 1) / 2)) / 2.
    opt = make_sgd([1.0])
    lrs = column(run(opt, WarmupScheduler(opt, 2, shape="cosine"), 2))
    assert_close_seq(lrs, [0.5, 1.0, 1.0])


@pytest.mark.parametrize("shape", ["linear", "cosine", "exponential"])
def test_first_step_is_never_at_zero_unless_asked(shape: str) -> None:
    opt = make_sgd([0.1])
    WarmupScheduler(opt, 1000, shape=shape)
    assert 0.0 < current_lrs(opt)[0] < 0.1
    if shape != "exponential":
        opt = make_sgd([0.1])
        WarmupScheduler(opt, 1000, shape=shape, start_factor=0.0)
        assert current_lrs(opt) == [0.0]


def test_explicit_start_factor_matches_torch_linear_lr_closed_form() -> None:
    # LinearLR(start_factor=s, total_iters=W) is the same closed form but refuses s = 0.
    for start in (0.0, 1 / 3, 0.5):
        opt = make_sgd([0.1])
        lrs = column(run(opt, WarmupScheduler(opt, 6, start_factor=start), 9))
        expected = [0.1 * (start + (1 - start) * min(t, 6) / 6) for t in range(10)]
        assert_close_seq(lrs, expected)


def test_per_group_settings() -> None:
    bases = [0.1, 0.2, 0.3, 0.4]
    steps = [2, 5, 0, 7]
    starts = [None, 0.5, None, 0.05]
    shapes = ["linear", "cosine", "constant", "exponential"]
    opt = make_sgd(bases)
    sched = WarmupScheduler(opt, steps, start_factor=starts, shape=shapes)
    assert sched.warmup_steps == steps and sched.shapes == shapes
    assert sched.start_factors == starts and sched.warmup_end == 7
    rows = run(opt, sched, 10)
    for g in range(4):
        expected = [bases[g] * warm_factor(t, steps[g], starts[g], shapes[g]) for t in range(11)]
        assert_close_seq(column(rows, g), expected)
        assert column(rows, g)[steps[g] :] == [bases[g]] * (11 - steps[g])  # exact


def test_thousand_groups_against_a_per_group_reference_loop() -> None:
    rng = random.Random(1234)
    num_groups = 1000
    bases = [rng.uniform(1e-4, 1.0) for _ in range(num_groups)]
    shapes = [rng.choice(SHAPES) for _ in range(num_groups)]
    steps = [rng.randint(0, 40) for _ in range(num_groups)]
    starts = [None if rng.random() < 0.4 else rng.uniform(0.001, 1.0) for _ in range(num_groups)]
    opt = make_sgd(bases)
    sched = WarmupScheduler(opt, steps, start_factor=starts, shape=shapes)
    for t in range(45):
        held = current_lrs(opt)
        for g in range(num_groups):
            expected = bases[g] * warm_factor(t, steps[g], starts[g], shapes[g])
            assert held[g] == pytest.approx(expected, rel=REL, abs=0.0), (t, g)
            ramp_done = t >= steps[g] - (starts[g] is None and shapes[g] != "constant")
            if ramp_done:
                assert held[g] == bases[g], (t, g)
        sched.step()


@pytest.mark.parametrize("bases", [[0.1], [0.1, 0.3]], ids=["one lr", "per-group lrs"])
def test_a_million_steps_do_not_drift(bases: list[float]) -> None:
    # Each step evaluates the closed form at the integer step count, so a million steps must give
    # exactly the formula, and exactly the base lr at the end. Both paths a shared setting takes
    # run here: one Python float for equal base lrs, base * f over a tensor for different ones.
    steps = 1_000_000
    opt = make_sgd(bases)
    sched = WarmupScheduler(opt, steps)
    checkpoints = {0, 1, 3, 99_999, 333_333, 500_000, 777_777, steps - 2, steps - 1}
    for t in range(steps + 2):
        if t in checkpoints:
            assert current_lrs(opt) == [base * ((t + 1) / steps) for base in bases], t
        sched.step()
    assert current_lrs(opt) == bases


def test_per_group_expression_has_no_history_either() -> None:
    # The per-group expression at the same distance, reached directly by last_step.
    steps = 1_000_000
    opt = make_sgd([0.2, 0.3])
    opt.param_groups[0]["initial_lr"], opt.param_groups[1]["initial_lr"] = 0.2, 0.3
    WarmupScheduler(opt, [steps, steps + 5], shape=["linear", "cosine"], last_step=777_776)
    expected = [
        0.2 * warm_factor(777_777, steps, None, "linear"),
        0.3 * warm_factor(777_777, steps + 5, None, "cosine"),
    ]
    assert_close_seq(current_lrs(opt), expected)


def test_a_group_lr_does_not_depend_on_the_other_groups() -> None:
    # Group 0 (linear, base 0.1) takes a different code path in each optimizer: one Python float,
    # base * f over a tensor, and the per-group expression. Its lrs must be identical bit for bit.
    sequences = []
    for bases, shapes in [
        ([0.1, 0.1], ["linear", "linear"]),
        ([0.1, 0.7], ["linear", "linear"]),
        ([0.1, 0.7], ["linear", "cosine"]),
    ]:
        opt = make_sgd(bases)
        sequences.append(column(run(opt, WarmupScheduler(opt, [7, 7], shape=shapes), 9)))
    assert sequences[0] == sequences[1] == sequences[2]
    assert_close_seq(sequences[0], [0.1 * warm_factor(t, 7, None, "linear") for t in range(10)])


# ---------------------------------------------------------------------------------------------
# tensor lrs


def test_tensor_lrs_are_written_in_place() -> None:
    bases = [0.1, 0.2]
    opt = make_sgd(bases, tensor_lr=True)
    lr_tensors = [g["lr"] for g in opt.param_groups]
    pointers = [lr.data_ptr() for lr in lr_tensors]
    sched = WarmupScheduler(opt, [3, 5], shape=["linear", "cosine"])
    for t in range(8):
        for g, lr in enumerate(lr_tensors):
            assert opt.param_groups[g]["lr"] is lr and lr.data_ptr() == pointers[g]
            expected = bases[g] * warm_factor(t, [3, 5][g], None, ["linear", "cosine"][g])
            assert float(lr) == pytest.approx(expected, rel=REL)
        last = sched.get_last_lr()
        assert all(
            isinstance(x, torch.Tensor) and x is not lr
            for x, lr in zip(last, lr_tensors, strict=True)
        )
        assert [float(x) for x in last] == [float(lr) for lr in lr_tensors]
        opt.step()
        sched.step()


def test_tensor_lrs_drive_a_real_optimizer_step() -> None:
    param = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.Adam([param], lr=torch.tensor(0.01), foreach=False)
    sched = WarmupScheduler(opt, 4)
    for t in range(6):
        before = param.detach().clone()
        param.grad = torch.ones(3)
        opt.step()
        # Adam's first steps move by about lr along -sign(grad).
        moved = float((before - param.detach())[0])
        assert moved == pytest.approx(0.01 * warm_factor(t, 4, None, "linear"), rel=1e-4)
        sched.step()


def test_shared_lr_tensor_needs_shared_settings() -> None:
    shared = torch.tensor(0.1)
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    opt = torch.optim.SGD([{"params": [p]} for p in params], lr=shared)
    assert opt.param_groups[0]["lr"] is opt.param_groups[1]["lr"]
    WarmupScheduler(opt, 4)  # same settings: both groups write the same value
    with pytest.raises(ValueError, match=r"^lr"):
        WarmupScheduler(opt, [4, 5])


# ---------------------------------------------------------------------------------------------
# after-schedulers


def test_sequential_hand_off_step_lr_one() -> None:
    # Regression (seed bug): a StepLR(step_size=1) follower must start from the warmed-up lr.
    base, steps, gamma = 0.4, 5, 0.5
    opt = make_sgd([base])
    sched = WarmupScheduler(opt, steps, after=StepLR(opt, step_size=1, gamma=gamma))
    lrs = column(run(opt, sched, 12))
    expected = [base * (t + 1) / steps for t in range(steps)]
    expected += [base * gamma ** (t - steps) for t in range(steps, 13)]
    assert_close_seq(lrs, expected)


def test_sequential_hand_off_has_no_dip() -> None:
    # Regression (seed bug): the lr dipped right after the hand-off.
    base, steps = 0.1, 6
    opt = make_sgd([base])
    sched = WarmupScheduler(opt, steps, after=StepLR(opt, step_size=30, gamma=0.1))
    lrs = column(run(opt, sched, steps + 40))
    assert lrs[steps - 1 : steps + 30] == [base] * 31
    assert all(a <= b for a, b in itertools.pairwise(lrs[: steps + 1]))
    assert lrs[steps + 30] == pytest.approx(base * 0.1, rel=REL)


@pytest.mark.parametrize("start", [None, 0.1])
def test_sequential_cosine_annealing(start: float | None) -> None:
    base, eta_min, steps, span = 0.2, 0.001, 4, 10
    opt = make_sgd([base])
    after = CosineAnnealingLR(opt, T_max=span, eta_min=eta_min)
    sched = WarmupScheduler(opt, steps, start_factor=start, after=after)
    lrs = column(run(opt, sched, steps + span))
    expected = [base * warm_factor(t, steps, start, "linear") for t in range(steps)]
    expected += [
        eta_min + (base - eta_min) * (1 + math.cos(math.pi * k / span)) / 2 for k in range(span + 1)
    ]
    assert_close_seq(lrs, expected, rel=1e-10)


def test_sequential_closed_form_after_scheduler() -> None:
    base, steps = 0.5, 3
    opt = make_sgd([base])
    sched = WarmupScheduler(opt, steps, after=LambdaLR(opt, lambda k: 1 / (1 + k)))
    lrs = column(run(opt, sched, 8))
    expected = [base * (t + 1) / steps for t in range(steps)]
    expected += [base / (1 + k) for k in range(6)]
    assert_close_seq(lrs, expected)


def test_sequential_per_group_lengths_hand_off_at_the_longest() -> None:
    bases, steps = [0.1, 0.2], [2, 5]
    opt = make_sgd(bases)
    sched = WarmupScheduler(opt, steps, after=MultiStepLR(opt, milestones=[2], gamma=0.1))
    rows = run(opt, sched, 9)
    for g in range(2):
        expected = [bases[g] * warm_factor(t, steps[g], None, "linear") for t in range(5)]
        expected += [bases[g], bases[g], bases[g] * 0.1, bases[g] * 0.1, bases[g] * 0.1]
        assert_close_seq(column(rows, g), expected)


def test_multiply_composition() -> None:
    bases, steps, gamma = [0.1, 0.3], [3, 6], 0.8
    opt = make_sgd(bases)
    sched = WarmupScheduler(
        opt, steps, shape="cosine", after=StepLR(opt, 2, gamma=gamma), compose="multiply"
    )
    rows = run(opt, sched, 10)
    for g in range(2):
        expected = [
            bases[g] * warm_factor(t, steps[g], None, "cosine") * gamma ** (t // 2)
            for t in range(11)
        ]
        assert_close_seq(column(rows, g), expected)


def test_multiply_with_a_recursive_cosine() -> None:
    # CosineAnnealingLR reads the lr it finds: the warmup factor must not leak into it.
    base, span = 1.0, 8
    opt = make_sgd([base])
    after = CosineAnnealingLR(opt, T_max=span)
    sched = WarmupScheduler(opt, 4, start_factor=0.0, after=after, compose="multiply")
    lrs = column(run(opt, sched, span))
    expected = [
        warm_factor(t, 4, 0.0, "linear") * (1 + math.cos(math.pi * t / span)) / 2
        for t in range(span + 1)
    ]
    assert_close_seq(lrs, expected, rel=1e-10)


def plateau_metrics(t: int) -> float:
    # Improves during warmup, then stalls.
    return [5.0, 4.0, 3.0, 2.0][t] if t < 4 else 2.0


@pytest.mark.parametrize("compose", ["sequential", "multiply"])
def test_reduce_lr_on_plateau_after_warmup(compose: str) -> None:
    # Regression (seed bug): the plateau path. Metrics seen during warmup never reduce the lr.
    base, steps = 1.0, 4
    opt = make_sgd([base])
    after = ReduceLROnPlateau(opt, factor=0.5, patience=1)
    sched = WarmupScheduler(opt, steps, after=after, compose=compose)

    def stalls(t: int) -> float:
        return 1.0  # flat from the start: would trigger reductions if seen during warmup

    lrs = column(run(opt, sched, 10, metrics=stalls))
    # Calls 5, 6, ... step the plateau scheduler: 5 sets the best, 6 is bad #1, 7 bad #2 > 1.
    expected = [base * (t + 1) / steps for t in range(steps)]
    expected += [base, base, base, 0.5, 0.5, 0.25, 0.25]
    assert_close_seq(lrs, expected)


def test_metrics_are_passed_as_a_keyword() -> None:
    class KeywordOnly(ReduceLROnPlateau):
        seen: list[float]

        def step(self, *, metrics: float) -> None:  # type: ignore[override]
            self.seen.append(metrics)
            super().step(metrics)

    opt = make_sgd([1.0])
    after = KeywordOnly(opt)
    after.seen = []
    sched = WarmupScheduler(opt, 2, after=after)
    run(opt, sched, 5, metrics=float)
    assert after.seen == [2.0, 3.0, 4.0]  # only calls that move past the hand-off step at t = 2


def test_metrics_errors() -> None:
    opt = make_sgd([1.0])
    sched = WarmupScheduler(opt, 2)
    with pytest.raises(TypeError, match="metrics"):
        sched.step(metrics=1.0)
    opt = make_sgd([1.0])
    sched = WarmupScheduler(opt, 1, after=ReduceLROnPlateau(opt))
    sched.step()  # reaching the hand-off step needs no metrics
    with pytest.raises(TypeError, match="metrics"):
        sched.step()
    assert sched.last_epoch == 1  # a refused call changes nothing


def test_the_unit_is_the_call_per_epoch_after() -> None:
    # Per-epoch stepping: 5 warmup epochs, then decay by 10 at epochs 30 and 60 after it.
    opt = make_sgd([3.2])
    sched = WarmupScheduler(opt, 5, after=MultiStepLR(opt, milestones=[30, 60], gamma=0.1))
    lrs = column(run(opt, sched, 70))
    assert_close_seq(lrs[:5], [3.2 * (t + 1) / 5 for t in range(5)])
    assert lrs[5:35] == [3.2] * 30
    assert lrs[35] == pytest.approx(0.32, rel=REL) and lrs[65] == pytest.approx(0.032, rel=REL)


# ---------------------------------------------------------------------------------------------
# finish_warmup


def test_finish_warmup_resnet_recipe() -> None:
    # lr 0.01 until the training error falls below 80% (here: after 7 iterations), then 0.1.
    opt = make_sgd([0.1])
    sched = WarmupScheduler(opt, 10**9, shape="constant")
    assert sched.in_warmup
    lrs = column(run(opt, sched, 7))
    assert_close_seq(lrs, [0.01] * 8)
    sched.finish_warmup()
    assert current_lrs(opt) == [0.1] and not sched.in_warmup and sched.warmup_end == 7
    assert column(run(opt, sched, 3, start=7)) == [0.1] * 4
    sched.finish_warmup()  # a no-op now
    assert current_lrs(opt) == [0.1]


def test_finish_warmup_hands_off() -> None:
    opt = make_sgd([1.0])
    sched = WarmupScheduler(opt, 100, after=StepLR(opt, 1, gamma=0.5))
    run(opt, sched, 3)
    sched.finish_warmup()
    assert current_lrs(opt) == [1.0]
    assert_close_seq(column(run(opt, sched, 3, start=3)), [1.0, 0.5, 0.25, 0.125])
    # compose="multiply": the factor is dropped from the after-scheduler's current lr.
    opt = make_sgd([1.0])
    sched = WarmupScheduler(opt, 100, after=StepLR(opt, 1, 0.5), compose="multiply")
    run(opt, sched, 3)
    sched.finish_warmup()
    assert_close_seq(column(run(opt, sched, 2, start=3)), [0.125, 0.0625, 0.03125])


# ---------------------------------------------------------------------------------------------
# state_dict


PLAIN = (dict, list, tuple, str, int, float, bool, type(None), torch.Tensor)


def assert_plain(value: object) -> None:
    assert isinstance(value, PLAIN), type(value)
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, (str, int))
            assert_plain(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            assert_plain(item)


def save_load(state: object) -> object:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def build_plain() -> tuple[torch.optim.Optimizer, WarmupScheduler]:
    opt = make_sgd([0.1, 0.2])
    return opt, WarmupScheduler(opt, [4, 6], shape=["cosine", "linear"])


def build_cosine() -> tuple[torch.optim.Optimizer, WarmupScheduler]:
    opt = make_sgd([0.1])
    return opt, WarmupScheduler(opt, 4, after=CosineAnnealingLR(opt, T_max=7, eta_min=0.01))


def build_multiply() -> tuple[torch.optim.Optimizer, WarmupScheduler]:
    opt = make_sgd([0.1, 0.5])
    after = StepLR(opt, 3, gamma=0.5)
    return opt, WarmupScheduler(opt, [3, 5], after=after, compose="multiply")


def build_plateau() -> tuple[torch.optim.Optimizer, WarmupScheduler]:
    opt = make_sgd([0.1])
    return opt, WarmupScheduler(opt, 3, after=ReduceLROnPlateau(opt, factor=0.5, patience=0))


def build_gradual() -> tuple[torch.optim.Optimizer, WarmupScheduler]:
    opt = make_sgd([0.1])
    return opt, GradualWarmupScheduler(opt, 4, 3, StepLR(opt, 2, gamma=0.5))


def build_tensor() -> tuple[torch.optim.Optimizer, WarmupScheduler]:
    opt = make_sgd([0.1, 0.2], tensor_lr=True)
    return opt, WarmupScheduler(opt, 4, shape="exponential", after=StepLR(opt, 2, 0.5))


BUILDERS = {
    "plain": build_plain,
    "cosine": build_cosine,
    "multiply": build_multiply,
    "plateau": build_plateau,
    "gradual": build_gradual,
    "tensor": build_tensor,
}


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("restore", ["optimizer first", "scheduler first", "scheduler only"])
def test_resume_at_every_step_gives_the_uninterrupted_sequence(name: str, restore: str) -> None:
    build = BUILDERS[name]
    metrics = plateau_metrics if name == "plateau" else None
    total = 11
    opt, sched = build()
    uninterrupted = run(opt, sched, total, metrics)
    for k in range(total + 1):
        opt, sched = build()
        run(opt, sched, k, metrics)
        checkpoint = save_load({"opt": opt.state_dict(), "sched": sched.state_dict()})
        assert isinstance(checkpoint, dict)
        opt, sched = build()
        if restore == "optimizer first":
            opt.load_state_dict(checkpoint["opt"])
        sched.load_state_dict(checkpoint["sched"])
        if restore == "scheduler first":
            opt.load_state_dict(checkpoint["opt"])
        assert run(opt, sched, total - k, metrics, start=k) == uninterrupted[k:], (k, restore)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_state_dict_is_plain_data(name: str) -> None:
    opt, sched = BUILDERS[name]()
    run(opt, sched, 5, plateau_metrics if name == "plateau" else None)
    state = sched.state_dict()
    assert_plain(state)
    assert save_load(state) == state


def test_state_dict_is_a_snapshot() -> None:
    opt, sched = build_multiply()
    run(opt, sched, 2)
    state = sched.state_dict()
    expected = run(opt, sched, 6, start=2)
    opt, sched = build_multiply()
    sched.load_state_dict(state)
    assert run(opt, sched, 6, start=2) == expected


def test_load_state_dict_mismatch() -> None:
    _, sched = build_plain()
    state = sched.state_dict()
    opt = make_sgd([0.1])
    with pytest.raises(ValueError, match="param groups"):
        WarmupScheduler(opt, 3).load_state_dict(state)
    _, other = build_cosine()
    with pytest.raises(ValueError, match="after-scheduler"):
        other.load_state_dict(build_plain()[1].state_dict() | {"base_lrs": [0.1]})
    with pytest.raises(ValueError, match="format"):
        other.load_state_dict({"base_lrs": [0.1]})


# ---------------------------------------------------------------------------------------------
# add_param_group


def test_added_group_is_picked_up_before_its_first_step() -> None:
    opt = make_sgd([0.1])
    sched = WarmupScheduler(opt, 10)
    run(opt, sched, 3)
    extra = torch.nn.Parameter(torch.zeros(1))
    opt.add_param_group({"params": [extra], "lr": 0.5})
    extra.grad = torch.ones(1)
    opt.step()  # step 3: the new group must already run at 0.5 * f(3)
    assert float(extra.detach()) == pytest.approx(-0.5 * 4 / 10, rel=1e-6)  # float32 param
    assert opt.param_groups[1]["initial_lr"] == 0.5
    extra.grad = None
    rows = run(opt, sched, 8, start=3)[1:]
    assert_close_seq(
        column(rows, 1), [0.5 * warm_factor(t, 10, None, "linear") for t in range(4, 12)]
    )


def test_a_dropped_scheduler_leaves_the_optimizer_alone() -> None:
    opt = make_sgd([0.1])
    WarmupScheduler(opt, [10])  # not kept: its pick-up hook must go with it
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.5})
    opt.step()
    assert current_lrs(opt) == pytest.approx([0.1 * 1 / 10, 0.5], rel=REL)


def test_added_group_clear_errors() -> None:
    opt = make_sgd([0.1])
    sched = WarmupScheduler(opt, [10])  # per-group: no settings for a new group
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})
    with pytest.raises(RuntimeError, match="per group"):
        opt.step()
    opt = make_sgd([0.1])
    sched = WarmupScheduler(opt, 10, after=StepLR(opt, 3))
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})
    with pytest.raises(RuntimeError, match="after-scheduler"):
        sched.step()


# ---------------------------------------------------------------------------------------------
# GradualWarmupScheduler (the seed's signature and meaning)


@pytest.mark.parametrize("multiplier", [1.0, 2.0, 8.0])
def test_gradual_warmup_closed_form(multiplier: float) -> None:
    base, epochs = 0.1, 5
    opt = make_sgd([base])
    sched = GradualWarmupScheduler(opt, multiplier, epochs)
    lrs = column(run(opt, sched, epochs + 3))
    if multiplier == 1.0:
        expected = [base * min(t, epochs) / epochs for t in range(epochs + 4)]
    else:
        expected = [base * ((multiplier - 1) * min(t, epochs) / epochs + 1) for t in range(9)]
    assert_close_seq(lrs, expected)
    assert sched.finished and sched.multiplier == multiplier and sched.total_epoch == epochs


def test_gradual_warmup_step_lr_follower() -> None:
    # Regressions (seed bugs): the dip after the hand-off and the first value of StepLR(1).
    base, mult, epochs = 0.1, 4.0, 3
    opt = make_sgd([base])
    sched = GradualWarmupScheduler(opt, mult, epochs, StepLR(opt, step_size=1, gamma=0.1))
    lrs = column(run(opt, sched, 7))
    expected = [base * ((mult - 1) * t / epochs + 1) for t in range(epochs + 1)]
    expected += [base * mult * 0.1**k for k in range(1, 5)]
    assert_close_seq(lrs, expected)
    opt = make_sgd([base])
    sched = GradualWarmupScheduler(opt, mult, epochs, StepLR(opt, step_size=10, gamma=0.1))
    lrs = column(run(opt, sched, 15))
    assert lrs[epochs : epochs + 10] == pytest.approx([base * mult] * 10, rel=REL)
    assert min(lrs[epochs:13]) >= lrs[epochs - 1]


def test_gradual_warmup_closed_form_followers_start_from_the_multiplied_lr() -> None:
    base, mult, epochs = 0.1, 2.0, 2
    opt = make_sgd([base])
    sched = GradualWarmupScheduler(opt, mult, epochs, LambdaLR(opt, lambda k: 0.9**k))
    assert_close_seq(column(run(opt, sched, 5))[epochs:], [0.2 * 0.9**k for k in range(4)])
    opt = make_sgd([base])
    after = CosineAnnealingLR(opt, T_max=4, eta_min=0.0)
    sched = GradualWarmupScheduler(opt, mult, epochs, after)
    expected = [0.2 * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(5)]
    assert_close_seq(column(run(opt, sched, 6))[epochs:], expected, rel=1e-10)


def test_gradual_warmup_reduce_lr_on_plateau() -> None:
    # Regression (seed bug): the ReduceLROnPlateau path. Warmup values stay exact while metrics
    # are passed; reductions start after the hand-off, from base * multiplier.
    base, mult, epochs = 0.1, 10.0, 3
    opt = make_sgd([base])
    after = ReduceLROnPlateau(opt, factor=0.1, patience=0)
    sched = GradualWarmupScheduler(opt, mult, epochs, after)
    lrs = column(run(opt, sched, 7, metrics=lambda t: 1.0))
    expected = [base * ((mult - 1) * t / epochs + 1) for t in range(epochs + 1)]
    expected += [1.0, 0.1, 0.01, 0.001]
    assert_close_seq(lrs, expected)


def test_gradual_warmup_zero_epochs() -> None:
    # Regression (seed bug): ZeroDivisionError at total_epoch=0.
    opt = make_sgd([0.1])
    sched = GradualWarmupScheduler(opt, 3.0, 0, StepLR(opt, 1, gamma=0.5))
    assert_close_seq(column(run(opt, sched, 3)), [0.3, 0.15, 0.075, 0.0375])


def test_gradual_warmup_state_dict_holds_no_live_objects() -> None:
    # Regression (seed bug): its state_dict pickled the after-scheduler (and its optimizer).
    opt, sched = build_gradual()
    run(opt, sched, 4)
    state = sched.state_dict()
    assert_plain(state)
    assert save_load(state) == state


def test_gradual_warmup_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"^multiplier"):
        GradualWarmupScheduler(make_sgd([0.1]), 0.5, 3)
    with pytest.raises(ValueError, match=r"^total_epoch"):
        GradualWarmupScheduler(make_sgd([0.1]), 2.0, -1)


# ---------------------------------------------------------------------------------------------
# linear scaling rule


def test_linear_scaled_lr() -> None:
    assert linear_scaled_lr(0.1, 1024) == 0.4
    assert linear_scaled_lr(0.1, 256) == 0.1
    assert linear_scaled_lr(0.1, 8192) == pytest.approx(3.2, rel=REL)
    assert linear_scaled_lr(0.1, 1024, rule="sqrt") == pytest.approx(0.2, rel=REL)
    assert linear_scaled_lr(0.5, 64, base_batch_size=32) == 1.0
    for kwargs, name in [
        ({"base_lr": -0.1, "batch_size": 256}, "base_lr"),
        ({"base_lr": float("nan"), "batch_size": 256}, "base_lr"),
        ({"base_lr": 0.1, "batch_size": 0}, "batch_size"),
        ({"base_lr": 0.1, "batch_size": 2.5}, "batch_size"),
        ({"base_lr": 0.1, "batch_size": 256, "base_batch_size": -1}, "base_batch_size"),
        ({"base_lr": 0.1, "batch_size": 256, "rule": "cubic"}, "rule"),
    ]:
        with pytest.raises(ValueError, match=rf"^{name}"):
            linear_scaled_lr(**kwargs)


# ---------------------------------------------------------------------------------------------
# arguments and warnings


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 2.5}, "warmup_steps"),
        ({"warmup_steps": [3]}, "warmup_steps"),
        ({"warmup_steps": 3, "start_factor": [0.1, 0.2, 0.3]}, "start_factor"),
        ({"warmup_steps": 3, "shape": ["linear"]}, "shape"),
        ({"warmup_steps": 3, "shape": "quadratic"}, "shape"),
        ({"warmup_steps": 3, "compose": "parallel"}, "compose"),
        ({"warmup_steps": 3, "start_factor": -0.1}, "start_factor"),
        ({"warmup_steps": 3, "start_factor": 1.5}, "start_factor"),
        ({"warmup_steps": 3, "start_factor": float("nan")}, "start_factor"),
        ({"warmup_steps": 3, "start_factor": 0.0, "shape": "exponential"}, "start_factor"),
        ({"warmup_steps": 3, "last_step": -2}, "last_step"),
        ({"warmup_steps": 3, "last_step": 4}, "last_step"),  # no initial_lr to resume from
        ({"warmup_steps": 3, "after": object()}, "after"),
    ],
)
def test_bad_arguments(kwargs: dict, name: str) -> None:
    opt = make_sgd([0.1, 0.2])
    with pytest.raises(ValueError, match=rf"^{name}"):
        WarmupScheduler(opt, **kwargs)


def test_bad_after_and_lr_arguments() -> None:
    opt, other = make_sgd([0.1]), make_sgd([0.1])
    with pytest.raises(ValueError, match=r"^after"):
        WarmupScheduler(opt, 3, after=StepLR(other, 2))
    with pytest.raises(ValueError, match=r"^last_step"):
        WarmupScheduler(opt, 3, after=StepLR(opt, 2), last_step=2)
    with pytest.raises(ValueError, match=r"^optimizer"):
        WarmupScheduler("sgd", 3)  # type: ignore[arg-type]
    mixed = make_sgd([0.1, 0.2])
    mixed.param_groups[1]["lr"] = torch.tensor(0.2)
    with pytest.raises(ValueError, match=r"^lr"):
        WarmupScheduler(mixed, 3)


def test_correct_use_emits_no_warnings() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for build in BUILDERS.values():
            opt, sched = build()
            # The scheduler steps first on purpose: there is no ordering heuristic to trip.
            sched.step(**({"metrics": 1.0} if isinstance(sched.after, ReduceLROnPlateau) else {}))
            run(
                opt,
                sched,
                12,
                plateau_metrics if isinstance(sched.after, ReduceLROnPlateau) else None,
            )
            sched.get_lr()
            sched.load_state_dict(sched.state_dict())
        linear_scaled_lr(0.1, 512)
    assert [str(w.message) for w in caught] == []


def test_is_an_lr_scheduler() -> None:
    opt = make_sgd([0.1])
    sched = WarmupScheduler(opt, 3)
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)
    assert sched.base_lrs == [0.1] and sched.last_epoch == 0
    assert not hasattr(opt.step, "_wrapped_by_lr_sched")  # optimizer.step left alone


# ---------------------------------------------------------------------------------------------
# CUDA


@cuda_only
def test_cuda_step_has_no_host_device_sync() -> None:
    bases = [0.1, 0.2, 0.3]
    params = [torch.nn.Parameter(torch.zeros(4, device="cuda")) for _ in bases]
    groups = [
        {"params": [p], "lr": torch.tensor(b, device="cuda")}
        for p, b in zip(params, bases, strict=True)
    ]
    mixed = torch.optim.Adam(groups, capturable=True)
    uniform = torch.optim.Adam(
        [torch.nn.Parameter(torch.zeros(4, device="cuda"))],
        lr=torch.tensor(0.1, device="cuda"),
        capturable=True,
    )
    settings = {"warmup_steps": [2, 4, 0], "shape": ["linear", "cosine", "constant"]}
    sched_mixed = WarmupScheduler(mixed, **settings)
    sched_uniform = WarmupScheduler(uniform, 3, compose="multiply")
    lr_objects = [g["lr"] for g in mixed.param_groups]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(6):
            sched_mixed.step()
            sched_uniform.step()
        sched_mixed.get_last_lr()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert [g["lr"] for g in mixed.param_groups] == lr_objects
    for g, base in enumerate(bases):
        expected = base * warm_factor(6, settings["warmup_steps"][g], None, settings["shape"][g])
        assert float(lr_objects[g]) == pytest.approx(expected, rel=1e-6)


@cuda_only
def test_cuda_graph_captured_capturable_adam_follows_the_lr() -> None:
    def make() -> tuple[torch.nn.Parameter, torch.optim.Adam]:
        param = torch.nn.Parameter(torch.ones(256, device="cuda"))
        param.grad = torch.linspace(-1.0, 1.0, 256, device="cuda")
        return param, torch.optim.Adam(
            [param], lr=torch.tensor(0.1, device="cuda"), capturable=True
        )

    p_graph, opt_graph = make()
    p_eager, opt_eager = make()
    sched_graph, sched_eager = WarmupScheduler(opt_graph, 6), WarmupScheduler(opt_eager, 6)
    lr_tensor = opt_graph.param_groups[0]["lr"]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the capturable step initialises its state outside capture
        opt_graph.step()
    torch.cuda.current_stream().wait_stream(side)
    opt_eager.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_graph.step()
    seen = []
    for _ in range(8):
        sched_graph.step()
        sched_eager.step()
        graph.replay()
        opt_eager.step()
        assert opt_graph.param_groups[0]["lr"] is lr_tensor
        seen.append(float(lr_tensor))
        torch.testing.assert_close(p_graph.detach(), p_eager.detach())
    assert len(set(seen)) > 3  # the lr did change between replays
