"""GradualWarmupScheduler's followers at base * multiplier, the seed's calls, positions, absolute
starts, the 1-sqrt shape, the epoch clock, and what malformed input does.

Every follower check builds a reference: the same follower on a second optimizer whose lrs are
``base * multiplier``, stepped on its own; three param groups throughout.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from torch.optim.lr_scheduler import (
    ChainedScheduler,
    ConstantLR,
    CosineAnnealingLR,
    CosineAnnealingWarmRestarts,
    ExponentialLR,
    LambdaLR,
    LinearLR,
    LRScheduler,
    MultiStepLR,
    OneCycleLR,
    PolynomialLR,
    ReduceLROnPlateau,
    SequentialLR,
    StepLR,
)

from lsr_fused.scheduler import GradualWarmupScheduler, WarmupScheduler

BASES = [0.1, 0.02, 0.3]
REL = 1e-12


def make_sgd(bases: list[float] = BASES) -> torch.optim.SGD:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": b} for b in bases]
    return torch.optim.SGD(groups, lr=1.0)


def lrs_of(opt: torch.optim.Optimizer) -> list[float]:
    return [float(g["lr"]) for g in opt.param_groups]


def assert_rows_close(actual: list[list[float]], expected: list[list[float]]) -> None:
    assert len(actual) == len(expected)
    for t, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a == pytest.approx(e, rel=REL, abs=0.0), f"step {t}: {a} != {e}"


def plateau_metric(t: int) -> float:
    return 1.0 if t < 9 else 1.0 + 0.1 * t  # flat, then rising: reductions after the warmup


def drive(
    opt: torch.optim.Optimizer, sched: object, steps: int, metrics: bool
) -> list[list[float]]:
    rows = [lrs_of(opt)]
    for t in range(steps):
        opt.step()
        if metrics:
            sched.step(metrics=plateau_metric(t))  # type: ignore[attr-defined]
        else:
            sched.step()  # type: ignore[attr-defined]
        rows.append(lrs_of(opt))
    return rows


def seed_formula(t: int, m: float, epochs: int, base: float) -> float:
    """The seed's warmup: base * ((m - 1) t / T + 1), or base * t / T when m == 1."""
    t = min(t, epochs)
    return base * t / epochs if m == 1.0 else base * ((m - 1) * t / epochs + 1)


# ---------------------------------------------------------------------------------------------
# followers at base * multiplier, composite ones included

FOLLOWERS: dict[str, Callable[[torch.optim.Optimizer], LRScheduler]] = {
    "sequential constant+cosine": lambda o: SequentialLR(
        o, [ConstantLR(o, factor=1 / 3, total_iters=3), CosineAnnealingLR(o, T_max=10)], [3]
    ),
    "sequential of one cosine": lambda o: SequentialLR(o, [CosineAnnealingLR(o, T_max=10)], []),
    "chained lambda+exponential": lambda o: ChainedScheduler(
        [LambdaLR(o, lambda k: 1 / (1 + 0.1 * k)), ExponentialLR(o, gamma=0.9)]
    ),
    "chained(sequential(linear, step), exponential)": lambda o: ChainedScheduler(
        [
            SequentialLR(
                o, [LinearLR(o, start_factor=0.5, total_iters=4), StepLR(o, 3, gamma=0.5)], [4]
            ),
            ExponentialLR(o, gamma=0.95),
        ]
    ),
    "linear from 0.5": lambda o: LinearLR(o, start_factor=0.5, total_iters=4),
    "cosine warm restarts": lambda o: CosineAnnealingWarmRestarts(o, T_0=4, eta_min=0.001),
    "cosine with eta_min": lambda o: CosineAnnealingLR(o, T_max=7, eta_min=0.01),
    "polynomial": lambda o: PolynomialLR(o, total_iters=10, power=2.0),
    "multistep": lambda o: MultiStepLR(o, [2, 5], gamma=0.3),
    "one cycle": lambda o: OneCycleLR(o, max_lr=[0.5, 0.2, 0.9], total_steps=40),
    "plateau with min_lr": lambda o: ReduceLROnPlateau(o, factor=0.5, patience=0, min_lr=0.05),
}


def reference_rows(
    follower: Callable[[torch.optim.Optimizer], LRScheduler],
    multiplier: float,
    total_epoch: int,
    steps: int,
    metrics: bool,
    warm_bases: list[float] = BASES,
) -> list[list[float]]:
    """The seed's warmup formula, then the follower built on lrs base * multiplier.

    ``warm_bases``: the lrs the warmup ramps from, the groups' ``initial_lr`` (OneCycleLR sets
    its own, ``max_lr / div_factor``).
    """
    rows = [
        [seed_formula(t, multiplier, total_epoch, b) for b in warm_bases]
        for t in range(total_epoch)
    ]
    ref = make_sgd([b * multiplier for b in BASES])
    sched = follower(ref)
    rows.append(lrs_of(ref))
    for t in range(total_epoch, steps):
        ref.step()
        if metrics:
            sched.step(plateau_metric(t))  # type: ignore[call-arg]
        else:
            sched.step()
        rows.append(lrs_of(ref))
    return rows


@pytest.mark.parametrize("name", list(FOLLOWERS))
@pytest.mark.parametrize("multiplier", [1.0, 4.0])
@pytest.mark.parametrize("builds", [1, 2], ids=["built once", "built twice"])
def test_follower_runs_as_if_built_at_base_times_multiplier(
    name: str, multiplier: float, builds: int
) -> None:
    total_epoch, steps = 5, 30
    metrics = name.startswith("plateau")
    opt = make_sgd()
    after = FOLLOWERS[name](opt)
    for _ in range(builds):  # built twice over one after-scheduler: must not compound
        sched = GradualWarmupScheduler(opt, multiplier, total_epoch, after)
    rows = drive(opt, sched, steps, metrics)
    warm_bases = [g["initial_lr"] for g in opt.param_groups]
    expected = reference_rows(FOLLOWERS[name], multiplier, total_epoch, steps, metrics, warm_bases)
    assert_rows_close(rows, expected)


def test_issue_examples_of_composite_followers() -> None:
    # The three silent errors reported: the milestone drop, the 16th step, the chained product.
    for name, at in [
        ("sequential constant+cosine", 5 + 3),
        ("sequential of one cosine", 15),
        ("chained lambda+exponential", 9),
    ]:
        opt = make_sgd()
        sched = GradualWarmupScheduler(opt, 4.0, 5, FOLLOWERS[name](opt))
        rows = drive(opt, sched, at + 1, metrics=False)
        expected = reference_rows(FOLLOWERS[name], 4.0, 5, at + 1, metrics=False)
        assert rows[at] == pytest.approx(expected[at], rel=REL), name


def test_hand_off_value_is_the_followers_step_zero() -> None:
    # The lr at t = total_epoch: the follower's step-0 lr at base * multiplier (0.5 * base * m for
    # LinearLR(0.5)), the warmup formula only below it.
    m, epochs = 3.0, 4
    opt = make_sgd()
    sched = GradualWarmupScheduler(opt, m, epochs, LinearLR(opt, start_factor=0.5, total_iters=2))
    rows = drive(opt, sched, epochs + 2, metrics=False)
    assert rows[epochs - 1] == pytest.approx(
        [b * ((m - 1) * (epochs - 1) / epochs + 1) for b in BASES], rel=REL
    )
    assert rows[epochs] == pytest.approx([0.5 * b * m for b in BASES], rel=REL)
    assert rows[epochs + 2] == pytest.approx([b * m for b in BASES], rel=REL)
    # Without a follower the formula's value at t = total_epoch, base * m, exactly thereafter.
    opt = make_sgd()
    rows = drive(opt, GradualWarmupScheduler(opt, m, epochs), epochs + 1, metrics=False)
    assert rows[epochs] == [b * m for b in BASES] == rows[epochs + 1]


def test_warmup_scheduler_built_twice_over_one_follower() -> None:
    def build(times: int) -> list[list[float]]:
        opt = make_sgd()
        after = LinearLR(opt, start_factor=0.5, total_iters=3)
        for _ in range(times):
            sched = WarmupScheduler(opt, 4, after=after)
        return drive(opt, sched, 10, metrics=False)

    assert build(2) == build(1)


# ---------------------------------------------------------------------------------------------
# the seed's calls: step(), step(epoch), step(epoch, metrics), step(metrics=...)


def test_seed_readme_loop_step_epoch() -> None:
    # The seed's README: after = StepLR(step_size=10), then step(epoch) for epoch in 1..19.
    m, epochs = 8.0, 5
    opt = make_sgd()
    sched = GradualWarmupScheduler(opt, m, epochs, StepLR(opt, step_size=10, gamma=0.1))
    seen = {0: lrs_of(opt)}
    for epoch in range(1, 20):
        sched.step(epoch)
        seen[epoch] = lrs_of(opt)
        opt.step()
    for epoch, lrs in seen.items():
        k = max(0, epoch - epochs)
        expected = [
            seed_formula(epoch, m, epochs, b) if epoch < epochs else b * m * 0.1 ** (k // 10)
            for b in BASES
        ]
        assert lrs == pytest.approx(expected, rel=REL), epoch


def test_step_epoch_from_zero_and_plain_steps_agree() -> None:
    # for epoch in range(E): step(epoch): 0 is the current position, so nothing changes there.
    def build() -> tuple[torch.optim.Optimizer, GradualWarmupScheduler]:
        opt = make_sgd()
        return opt, GradualWarmupScheduler(opt, 2.0, 4, CosineAnnealingLR(opt, T_max=6))

    opt, sched = build()
    plain = drive(opt, sched, 11, metrics=False)
    for first in (0, 1):
        opt, sched = build()
        rows = []
        for epoch in range(first, 12):
            sched.step(epoch)
            rows.append(lrs_of(opt))
        assert rows == plain[first:], first


def test_seed_plateau_calls() -> None:
    def run(call: Callable[[GradualWarmupScheduler, int, float], None]) -> list[list[float]]:
        opt = make_sgd()
        sched = GradualWarmupScheduler(opt, 10.0, 3, ReduceLROnPlateau(opt, factor=0.1, patience=0))
        rows = [lrs_of(opt)]
        for epoch in range(1, 9):
            call(sched, epoch, 1.0)
            rows.append(lrs_of(opt))
        return rows

    positional = run(lambda s, e, m: s.step(e, m))
    keyword = run(lambda s, e, m: s.step(metrics=m))
    mixed = run(lambda s, e, m: s.step(epoch=e, metrics=m))
    assert positional == keyword == mixed
    expected = [[seed_formula(t, 10.0, 3, b) for b in BASES] for t in range(4)]
    expected += [[b * 10 * 0.1**k for b in BASES] for k in range(5)]  # t = 4 sets the best
    assert_rows_close(positional, expected)


def test_an_epoch_is_never_read_as_a_metric() -> None:
    # Reported: step(epoch) with a ReduceLROnPlateau follower took the epoch as the loss.
    opt = make_sgd()
    sched = GradualWarmupScheduler(opt, 10.0, 3, ReduceLROnPlateau(opt, factor=0.1, patience=0))
    for epoch in range(1, 4):
        sched.step(epoch)  # in the warmup: a position, no metric needed
    assert lrs_of(opt) == pytest.approx([b * 10 for b in BASES], rel=REL)
    with pytest.raises(TypeError, match="metrics"):
        sched.step(4)  # past the warmup the plateau scheduler needs a metric: never the epoch
    assert sched.last_epoch == 3
    with pytest.raises(TypeError, match="metrics="):
        sched.step(0.37)  # a loss passed positionally: not a position
    opt = make_sgd()
    sched = WarmupScheduler(opt, 2, after=ReduceLROnPlateau(opt))
    with pytest.raises(TypeError, match="metrics="):
        sched.step(2.5)


def test_positions_that_could_mean_two_things_raise_and_change_nothing() -> None:
    opt = make_sgd()
    sched = GradualWarmupScheduler(opt, 2.0, 3, ReduceLROnPlateau(opt, patience=0))
    sched.step(1)
    before = (copy.deepcopy(sched.state_dict()), lrs_of(opt))
    cases = [
        (lambda: sched.step(0), ValueError, "behind"),
        (lambda: sched.step(1, 0.5), ValueError, "current position"),
        (lambda: sched.step(6, 0.5), ValueError, "jump"),
        (lambda: sched.step(True), TypeError, "epoch"),
        (lambda: sched.step("2"), TypeError, "epoch"),
    ]
    for call, error, words in cases:
        with pytest.raises(error, match=words):
            call()
        assert (sched.state_dict(), lrs_of(opt)) == before
    sched.step(3, 0.5)  # a jump inside the warmup steps nothing that needs a metric
    assert sched.last_epoch == 3


def test_a_jump_is_the_uninterrupted_sequence() -> None:
    # Fast-forwarding a fresh scheduler (a resume without its state) gives the same lrs and state.
    def build() -> tuple[torch.optim.Optimizer, WarmupScheduler]:
        opt = make_sgd()
        after = SequentialLR(
            opt, [ConstantLR(opt, 0.5, total_iters=2), CosineAnnealingLR(opt, T_max=9)], [2]
        )
        return opt, GradualWarmupScheduler(opt, 3.0, 4, after)

    opt, sched = build()
    uninterrupted = drive(opt, sched, 20, metrics=False)
    for k in (0, 3, 4, 5, 13):
        opt, sched = build()
        sched.step(k)
        assert lrs_of(opt) == uninterrupted[k]
        assert drive(opt, sched, 20 - k, metrics=False) == uninterrupted[k:]


# ---------------------------------------------------------------------------------------------
# absolute start (start_lr) and the 1-sqrt shape


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt", "exponential", "constant"])
def test_absolute_start_per_group(shape: str) -> None:
    start, warm = 0.05, 6  # above group 1's base (0.02): that group ramps down
    opt = make_sgd()
    sched = WarmupScheduler(opt, warm, start_lr=start, shape=shape)
    rows = drive(opt, sched, warm + 2, metrics=False)
    for g, base in enumerate(BASES):
        s = start / base
        for t in range(warm):
            p = t / warm
            f = {
                "linear": s + (1 - s) * p,
                "cosine": s + (1 - s) * (1 - math.cos(math.pi * p)) / 2,
                "1-sqrt": s + (1 - s) * (1 - math.sqrt(1 - p)),
                "exponential": s ** (1 - p),
                "constant": s,
            }[shape]
            assert rows[t][g] == pytest.approx(base * f, rel=REL), (t, g)
        assert rows[0][g] == pytest.approx(start, rel=1e-15)
        assert rows[warm][g] == base and rows[warm + 2][g] == base  # exact
    assert sched.start_lrs == [start] * 3
    assert sched.start_factors == pytest.approx([start / b for b in BASES], rel=1e-15)


def test_absolute_start_mixed_with_factors_and_added_groups() -> None:
    opt = make_sgd()
    WarmupScheduler(opt, 4, start_lr=[0.001, None, 0.6])
    assert lrs_of(opt) == pytest.approx([0.001, 0.02 / 4, 0.6], rel=REL)
    opt = make_sgd()
    sched = WarmupScheduler(opt, 4, start_lr=0.01)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.5})
    opt.step()
    assert lrs_of(opt)[3] == pytest.approx(0.01, rel=1e-15)
    sched.step()
    assert lrs_of(opt)[3] == pytest.approx(0.01 + (0.5 - 0.01) / 4, rel=REL)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"start_lr": -0.1}, "start_lr"),
        ({"start_lr": float("inf")}, "start_lr"),
        ({"start_lr": 0.0, "shape": "exponential"}, "start_lr"),
        ({"start_lr": 0.1, "start_factor": 0.5}, "start_factor and start_lr"),
        ({"start_lr": [0.1, 0.2]}, "start_lr"),
        ({"shape": "sqrt"}, "shape"),
    ],
)
def test_absolute_start_bad_arguments(kwargs: dict, error: str) -> None:
    with pytest.raises(ValueError, match=rf"^{error}"):
        WarmupScheduler(make_sgd(), 4, **kwargs)


def test_absolute_start_needs_a_positive_base() -> None:
    with pytest.raises(ValueError, match=r"^start_lr: param group 1"):
        WarmupScheduler(make_sgd([0.1, 0.0, 0.3]), 4, start_lr=0.01)


def test_one_minus_sqrt_default_start() -> None:
    opt = make_sgd()
    rows = drive(opt, WarmupScheduler(opt, 5, shape="1-sqrt"), 6, metrics=False)
    for t in range(7):
        f = 1 - math.sqrt(1 - min(1.0, (t + 1) / 5))
        assert rows[t] == pytest.approx([b * f for b in BASES], rel=REL)


def test_one_minus_sqrt_per_group_path_equals_shared_path() -> None:
    # Group 0 alone (one shared factor) and next to a cosine group (the tensor expression).
    alone = make_sgd([0.1])
    mixed = make_sgd([0.1, 0.2])
    a = drive(alone, WarmupScheduler(alone, 9, shape="1-sqrt", start_factor=0.0), 10, False)
    shapes = ["1-sqrt", "cosine"]
    b = drive(mixed, WarmupScheduler(mixed, 9, shape=shapes, start_factor=0.0), 10, False)
    assert [row[0] for row in a] == [row[0] for row in b]


# ---------------------------------------------------------------------------------------------
# after_clock="epoch": a per-step warmup with a per-epoch after-scheduler


def run_epochs(
    compose: str, per_epoch: int, epochs: int, warm: int
) -> tuple[list[list[float]], list[int]]:
    """lrs of every update, and the epoch each update ran in."""
    opt = make_sgd()
    after = StepLR(opt, step_size=2, gamma=0.5)
    sched = WarmupScheduler(opt, warm, after=after, compose=compose, after_clock="epoch")
    rows, epoch_of = [], []
    for epoch in range(epochs):
        for _ in range(per_epoch):
            rows.append(lrs_of(opt))
            epoch_of.append(epoch)
            opt.step()
            sched.step()
        sched.step_epoch()
    return rows, epoch_of


@pytest.mark.parametrize("compose", ["sequential", "multiply"])
@pytest.mark.parametrize("warm", [6, 8, 0])  # ends mid-epoch, on an epoch boundary, none
def test_epoch_clock(compose: str, warm: int) -> None:
    rows, epoch_of = run_epochs(compose, per_epoch=4, epochs=7, warm=warm)
    for u, (row, epoch) in enumerate(zip(rows, epoch_of, strict=True)):
        a = [b * 0.5 ** (epoch // 2) for b in BASES]  # StepLR counted from epoch 0
        f = (u + 1) / warm if u < warm else 1.0
        if compose == "multiply":
            expected = [f * x for x in a]
        else:
            expected = [f * b for b in BASES] if u < warm else a
        assert row == pytest.approx(expected, rel=REL), (u, epoch)


def test_epoch_clock_calls() -> None:
    opt = make_sgd()
    sched = WarmupScheduler(opt, 4, after=StepLR(opt, 1, 0.5), after_clock="epoch")
    with pytest.raises(TypeError, match="step_epoch"):
        sched.step(metrics=1.0)
    plain = WarmupScheduler(make_sgd(), 4)
    with pytest.raises(RuntimeError, match="after_clock"):
        plain.step_epoch()
    opt = make_sgd()
    plateau = ReduceLROnPlateau(opt, factor=0.5, patience=0)
    sched = WarmupScheduler(opt, 2, after=plateau, after_clock="epoch")
    sched.step_epoch(metrics=1.0)  # during the warmup: ignored
    sched.step(2)
    assert lrs_of(opt) == BASES
    sched.step_epoch(metrics=1.0)
    sched.step_epoch(metrics=1.0)
    assert lrs_of(opt) == pytest.approx([b / 2 for b in BASES], rel=REL)
    with pytest.raises(TypeError, match="metrics"):
        sched.step_epoch()


def test_epoch_clock_resume() -> None:
    def build() -> tuple[torch.optim.Optimizer, WarmupScheduler]:
        opt = make_sgd()
        after = CosineAnnealingLR(opt, T_max=6)
        return opt, WarmupScheduler(opt, 5, after=after, compose="multiply", after_clock="epoch")

    def play(opt: torch.optim.Optimizer, sched: WarmupScheduler, epochs: range) -> list:
        rows = []
        for _ in epochs:
            for _ in range(3):
                rows.append(lrs_of(opt))
                sched.step()
            sched.step_epoch()
        return rows

    opt, sched = build()
    uninterrupted = play(opt, sched, range(6))
    opt, sched = build()
    play(opt, sched, range(2))
    state = copy.deepcopy(sched.state_dict())
    opt, sched = build()
    sched.load_state_dict(state)
    assert play(opt, sched, range(2, 6)) == uninterrupted[6:]


# ---------------------------------------------------------------------------------------------
# load_state_dict: a malformed state raises naming the key and changes nothing


def mutations(state: dict) -> list[tuple[str, dict]]:
    out = []
    for key in state:
        if key in ("start_lr", "after_clock", "epoch"):
            continue  # optional: states saved before these keys existed still load
        missing = dict(state)
        del missing[key]
        out.append((key, missing))
    for key in ("warmup_steps", "start_factor", "shape", "base_lrs", "lrs", "after_start_lrs"):
        out.append((key, state | {key: state[key][:-1]}))  # one group short
        out.append((key, state | {key: "abc"}))
    for key, bad in [
        ("last_epoch", -1),
        ("last_epoch", 2.5),
        ("step_count", 0),
        ("epoch", "3"),
        ("warmup_steps", [1, -2, 3]),
        ("shape", ["linear", "square", "linear"]),
        ("start_factor", [None, "x", None]),
        ("start_lr", [None, -1.0, None]),
        ("base_lrs", [0.1, float("nan"), 0.3]),
        ("lrs", [0.1, None, 0.3]),
        ("template", "linear"),
        ("template", {"warmup_steps": 3, "shape": "linear"}),
        ("after", [1, 2]),
        ("compose", "multiply"),
        ("after_clock", "epoch"),
    ]:
        out.append((key, state | {key: bad}))
    return out


def test_malformed_state_raises_naming_the_key_and_changes_nothing() -> None:
    opt = make_sgd()
    sched = WarmupScheduler(opt, 6, after=StepLR(opt, 2, gamma=0.5))
    for _ in range(3):
        sched.step()
    state = sched.state_dict()
    other_opt = make_sgd()
    other = WarmupScheduler(other_opt, 6, after=StepLR(other_opt, 2, gamma=0.5))
    other.step()
    before = (copy.deepcopy(other.state_dict()), lrs_of(other_opt))
    for key, bad in mutations(state):
        with pytest.raises((ValueError, TypeError), match=key):
            other.load_state_dict(bad)
        assert (other.state_dict(), lrs_of(other_opt)) == before, key
    with pytest.raises(TypeError, match="dict"):
        other.load_state_dict([("format", 1)])  # type: ignore[arg-type]
    other.load_state_dict(state)  # the intact state still loads
    assert lrs_of(other_opt) == lrs_of(opt)


def test_a_failing_after_load_leaves_the_after_scheduler_as_it_was() -> None:
    opt = make_sgd()
    after = SequentialLR(opt, [StepLR(opt, 2), StepLR(opt, 3)], [2])
    sched = WarmupScheduler(opt, 3, after=after)
    state = sched.state_dict()
    state["after"] = dict(state["after"])
    del state["after"]["_schedulers"]  # torch's SequentialLR.load_state_dict raises KeyError
    before = copy.deepcopy(after.state_dict())
    with pytest.raises(KeyError):
        sched.load_state_dict(state)
    assert after.state_dict() == before and sched.last_epoch == 0


# ---------------------------------------------------------------------------------------------
# an optimizer with no groups yet


def test_zero_groups_then_add_param_group() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    opt.param_groups.clear()
    sched = WarmupScheduler(opt, 4, start_factor=0.5)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.2})
    opt.step()
    assert lrs_of(opt) == [0.1]
    sched.step()
    assert lrs_of(opt) == pytest.approx([0.2 * (0.5 + 0.5 / 4)], rel=REL)
    with pytest.raises(ValueError, match=r"^warmup_steps"):
        WarmupScheduler(opt.__class__([torch.nn.Parameter(torch.zeros(1))], lr=0.1), -1)
    empty = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    empty.param_groups.clear()
    with pytest.raises(ValueError, match=r"^warmup_steps"):
        WarmupScheduler(empty, 2.5)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# tensor lrs (fused / capturable optimizers) through the new paths


def make_tensor_sgd() -> torch.optim.SGD:
    groups = [
        {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": torch.tensor(b, dtype=torch.float64)}
        for b in BASES
    ]
    return torch.optim.SGD(groups, lr=1.0)


@pytest.mark.parametrize(
    "build",
    [
        lambda o: WarmupScheduler(o, 5, start_lr=0.05, shape="1-sqrt"),
        lambda o: WarmupScheduler(
            o, 5, after=StepLR(o, 1, gamma=0.5), compose="multiply", after_clock="epoch"
        ),
        lambda o: GradualWarmupScheduler(
            o, 3.0, 4, SequentialLR(o, [ConstantLR(o, 0.5, 2), ExponentialLR(o, 0.9)], [2])
        ),
    ],
    ids=["start_lr 1-sqrt", "epoch clock", "gradual composite"],
)
def test_tensor_lrs_follow_the_float_lrs(build: Callable[[torch.optim.Optimizer], object]) -> None:
    rows = []
    for opt in (make_sgd(), make_tensor_sgd()):
        lr_objects = [g["lr"] for g in opt.param_groups]
        sched = build(opt)
        seen = []
        for t in range(12):
            seen.append(lrs_of(opt))
            opt.step()
            sched.step()  # type: ignore[attr-defined]
            if t % 3 == 2 and getattr(sched, "after_clock", "step") == "epoch":
                sched.step_epoch()  # type: ignore[attr-defined]
        if isinstance(lr_objects[0], torch.Tensor):
            assert all(g["lr"] is lr for g, lr in zip(opt.param_groups, lr_objects, strict=True))
        rows.append(seen)
    assert_rows_close(rows[1], rows[0])
