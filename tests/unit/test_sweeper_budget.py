"""The carbon-budgeted search's pure logic: budget ledger, penalty, Pareto front, search space, and the
loop itself driven by a fake launcher whose trials 'emit' a known amount per architecture."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from hydra.core.utils import JobStatus

from greenstack.errors import ConfigError
from greenstack.launch.carbon_sweep import (
    BudgetLedger,
    SweepSettings,
    pareto_front,
    parse_search_space,
    penalised,
    run_search,
)
from tests.helpers.optional import need


def test_ledger_stops_at_the_fraction_and_flags_trials_over_budget():
    ledger = BudgetLedger(total_kg=1.0, trial_kg=0.3)
    ledger.charge(0.5)
    assert not ledger.exhausted()
    ledger.charge(0.39)
    assert not ledger.exhausted()  # 0.89 < 0.9
    ledger.charge(0.01)
    assert ledger.exhausted()
    assert ledger.over_trial_budget(0.31) and not ledger.over_trial_budget(0.3)
    with pytest.raises(ConfigError) as err:
        BudgetLedger(total_kg=0, trial_kg=-1, stop_fraction=1.5)
    assert len(err.value.problems) == 3


def test_penalty_and_pareto_front():
    assert penalised(0.9, 0.1, 0.2, 0.5) == 0.9  # within the budget: unchanged
    assert penalised(0.9, 0.4, 0.2, 0.5) == pytest.approx(0.4)  # 2x the budget: -0.5
    points = [(0, 0.90, 3.0), (1, 0.95, 5.0), (2, 0.80, 1.0), (3, 0.85, 4.0), (4, 0.80, 2.0)]
    assert pareto_front(points) == [2, 0, 1]  # 3 is dominated by 0; 4 by 2


def test_search_space_from_hydra_sweep_syntax():
    need("optuna")
    space = parse_search_space({"a": "choice(1, 2, 4)", "b": "range(1, 4)", "c": "tag(log, interval(1e-4, 1e-2))",
                                "d": [16, 32]})
    assert space["a"].choices == (1, 2, 4) and space["d"].choices == (16, 32)
    assert (space["b"].low, space["b"].high) == (1, 3)
    assert space["c"].log and space["c"].low == pytest.approx(1e-4)
    with pytest.raises(ConfigError) as err:
        parse_search_space({"x": "3", "y": "choice(("})
    assert {p.key for p in err.value.problems} == {"hydra.sweeper.params.x", "hydra.sweeper.params.y"}


def _summary(acc: float, kg: float) -> dict:
    return {"metrics": {"test/accuracy": {"value": acc}, "carbon/total_kg_co2e": {"value": kg}}}


def _fake_launch(emissions, calls):
    """Trials whose accuracy and kg follow from their depth; depth 3 fails."""

    def launch(batch, first):
        calls.append((first, batch))
        out = []
        for overrides in batch:
            depth = int(next(o for o in overrides if o.startswith("depth=")).split("=")[1])
            if depth == 3:
                ret = SimpleNamespace(status=JobStatus.FAILED, return_value=None)
            else:
                ret = SimpleNamespace(status=JobStatus.COMPLETED, return_value=_summary(0.5 + 0.1 * depth, emissions[depth]))
            out.append(ret)
        return out

    return launch


def test_search_stops_when_90_percent_of_the_budget_is_spent(tmp_path):
    need("optuna")
    emissions = {1: 0.1, 2: 0.2, 4: 0.4, 3: 0.0}
    calls: list = []
    settings = SweepSettings(n_trials=50, batch_size=2, total_budget_kg=1.0, params={"depth": "choice(1, 2, 4)"})
    report = run_search(settings, ["fixed=1"], _fake_launch(emissions, calls), sweep_dir=tmp_path)
    spent = [t["kg"] for t in report["trials"]]
    assert sum(spent) == pytest.approx(report["spent_kg"])
    assert report["spent_kg"] >= 0.9 and sum(spent[:-2]) < 0.9  # stopped right after the batch that crossed 90 %
    assert len(report["trials"]) < 50 and "90%" in report["stopped"]
    assert all(b[0] == "fixed=1" for _, batch in calls for b in batch)
    assert [first for first, _ in calls] == list(range(0, 2 * len(calls), 2))
    assert json.loads((tmp_path / "carbon_sweep.json").read_text())["spent_kg"] == pytest.approx(report["spent_kg"])


def test_over_budget_trials_are_rejected_or_penalised_and_failures_recorded():
    need("optuna")
    emissions = {1: 0.1, 2: 0.2, 4: 0.5, 3: 0.0}
    base = {"n_trials": 12, "total_budget_kg": 100.0, "trial_budget_kg": 0.25, "sampler": "random",
            "params": {"depth": "choice(1, 2, 3, 4)"}}
    rejected = run_search(SweepSettings(**base), [], _fake_launch(emissions, []))
    by_depth = {t["params"]["depth"]: t for t in rejected["trials"]}
    assert {1, 2, 3, 4} <= set(by_depth)  # 12 random draws over 4 choices
    assert by_depth[4]["state"] == "rejected" and by_depth[4]["number"] not in rejected["pareto_front"]
    assert by_depth[3]["state"] == "failed"
    assert by_depth[1]["state"] == by_depth[2]["state"] == "complete"
    penal = run_search(SweepSettings(**base, over_budget="penalize", penalty=0.5), [], _fake_launch(emissions, []))
    deep = next(t for t in penal["trials"] if t["params"]["depth"] == 4)
    assert deep["state"] == "complete" and deep["objective"] == pytest.approx(0.9 - 0.5 * (0.5 / 0.25 - 1))
    # rejected trials still cost what they emitted
    assert rejected["spent_kg"] == pytest.approx(sum(t["kg"] or 0 for t in rejected["trials"]))


def test_bad_settings_are_all_reported():
    with pytest.raises(ConfigError) as err:
        run_search(SweepSettings(n_trials=0, over_budget="ignore", sampler="grid", params={"a": "choice(1,2)"}),
                   [], lambda batch, first: [])
    assert {p.key for p in err.value.problems} == {"hydra.sweeper.n_trials", "hydra.sweeper.over_budget",
                                                   "hydra.sweeper.sampler"}
