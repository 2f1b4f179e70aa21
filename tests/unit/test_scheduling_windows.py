"""Window search (contiguous and interruptible) against brute force, and its input checks."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from greenstack.errors import ConfigError
from greenstack.scheduling.windows import (
    best_slots,
    best_window,
    choose_starts,
    planning_values,
    slot_dp,
    slots_cost,
    window_costs,
)

series = st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=12).map(
    lambda v: np.array(v, dtype=float))


def brute_window(values, duration_h, earliest, latest):
    whole, frac = int(math.floor(duration_h)), duration_h - math.floor(duration_h)
    best = None
    for k in range(earliest, latest + 1):
        cost = sum(values[k:k + whole]) + frac * (values[k + whole] if frac else 0.0)
        if best is None or cost < best[1] - 1e-12:
            best = (k, cost)
    return best


@settings(max_examples=200, deadline=None)
@given(values=series, duration=st.sampled_from([1, 2, 3, 0.5, 1.5, 2.25]), data=st.data())
def test_best_window_matches_brute_force(values, duration, data):
    span = math.ceil(duration)
    if span > len(values):
        with pytest.raises(ConfigError):
            best_window(values, duration)
        return
    last = len(values) - span
    earliest = data.draw(st.integers(0, last))
    latest = data.draw(st.integers(earliest, last))
    choice = best_window(values, duration, earliest_h=earliest, latest_start_h=latest)
    k, cost = brute_window(values, duration, earliest, latest)
    assert (choice.start_h, choice.cost) == (k, pytest.approx(cost))
    assert choice.cost_now == pytest.approx(brute_window(values, duration, 0, 0)[1])
    assert not choice.horizon_limited


def brute_slots(values, d, m, overhead):
    best = math.inf
    m_eff = min(m, d)
    for slots in itertools.combinations(range(len(values)), d):
        runs = []
        for s in slots:
            if runs and runs[-1][1] == s - 1:
                runs[-1][1] = s
            else:
                runs.append([s, s])
        if any(b - a + 1 < m_eff for a, b in runs):
            continue
        best = min(best, slots_cost(values, slots, overhead))
    return best


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.integers(min_value=1, max_value=30), min_size=1, max_size=9).map(
    lambda v: np.array(v, dtype=float)), data=st.data())
def test_best_slots_matches_brute_force(values, data):
    d = data.draw(st.integers(1, len(values)))
    m = data.draw(st.integers(1, 3))
    overhead = data.draw(st.sampled_from([0.0, 0.5, 2.0]))
    plan = best_slots(values, d, min_chunk_h=m, resume_overhead_h=overhead)
    assert plan.cost == pytest.approx(brute_slots(values, d, m, overhead))
    assert len(plan.slots) == d
    assert slots_cost(values, plan.slots, overhead) == pytest.approx(plan.cost)  # the path is the plan
    assert all(length >= min(m, d) for _, length in plan.chunks)


def test_no_overhead_unit_chunks_take_the_cheapest_hours():
    v = np.array([9, 1, 8, 2, 7, 3, 6.0])
    plan = best_slots(v, 3)
    assert plan.slots == (1, 3, 5) and plan.cost == 6.0
    assert plan.expected_saving_pct == pytest.approx(100 * (18 - 6) / 18)
    # a large resume overhead makes one contiguous chunk pay off
    assert len(best_slots(v, 3, resume_overhead_h=5.0).chunks) == 1


def test_slot_dp_scores_the_planned_path_on_other_values():
    rng = np.random.default_rng(1)
    plan = rng.uniform(50, 400, size=(64, 10))
    actual = rng.uniform(50, 400, size=(64, 10))
    dp = slot_dp(plan, 3, min_chunk_h=2, resume_overhead_h=0.25, evaluate=actual)
    for j in range(64):
        slots = best_slots(plan[j], 3, min_chunk_h=2, resume_overhead_h=0.25).slots
        assert dp.eval_cost[j] == pytest.approx(slots_cost(actual[j], slots, 0.25))


def test_choose_starts_is_best_window_per_row():
    rng = np.random.default_rng(0)
    m = rng.uniform(0, 100, size=(50, 12))
    n_starts = rng.integers(1, 10, size=50)
    got = choose_starts(m, 2.5, n_starts)
    for j in range(50):
        assert got[j] == best_window(m[j], 2.5, latest_start_h=int(n_starts[j]) - 1).start_h
    assert window_costs(m, 2.5).shape == (50, 10)


def test_latest_start_past_the_values_plans_with_what_is_known():
    choice = best_window([5, 4, 3, 2, 1], 2, latest_start_h=30)
    assert choice.horizon_limited and choice.latest_start_h == 3 and choice.start_h == 3
    assert best_slots([3, 1, 2], 2, deadline_h=10).horizon_limited


def test_risk_aware_objective_uses_an_upper_quantile():
    point = np.array([100.0, 90.0, 95.0])
    qs = {0.1: point * 0.9, 0.5: point, 0.9: np.array([110.0, 160.0, 105.0])}  # hour 1 is uncertain
    assert best_window(planning_values(point, qs, objective="point"), 1).start_h == 1
    assert best_window(planning_values(point, qs, objective=0.9), 1).start_h == 2
    assert planning_values(point, qs, objective=0.7) == pytest.approx((point + qs[0.9]) / 2)
    assert planning_values(point, qs, objective="mean", mean=point + 1) == pytest.approx(point + 1)


@pytest.mark.parametrize(("call", "key"), [
    (lambda: window_costs([1, 2, 3], 0), "duration"),
    (lambda: best_window([1, 2], 3), "duration"),
    (lambda: best_slots([1, 2, 3], 1.5), "duration"),
    (lambda: best_slots([1, 2, 3], 2, deadline_h=1), "deadline"),
    (lambda: best_slots([1, 2, 3], 2, min_chunk_h=0), "min_chunk"),
    (lambda: planning_values([1.0], {}, objective=0.9), "objective"),
    (lambda: planning_values([1.0], {0.5: [1.0]}, objective="best"), "objective"),
    (lambda: planning_values([1.0], {0.5: [1.0]}, objective=1.5), "objective"),
])
def test_bad_input_is_a_clear_error(call, key):
    with pytest.raises(ConfigError) as err:
        call()
    assert err.value.problems[0].key == key and err.value.problems[0].reason
