"""`recipes/carbon_nas.yaml`: the carbon-budgeted multi-objective sweep on CPU with a tiny ViT (no Slurm)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import FAST


@pytest.mark.slow
def test_carbon_nas_stops_at_the_budget_and_reports_the_pareto_front(cli, tmp_path):
    sweep = tmp_path / "nas"
    budget_kg = 1e-9  # below any real trial: the first batch spends more than 90 % of it
    result = cli("train", "-m", "recipe=carbon_nas", *FAST, "trainer.max_duration=3ba",
                 "hydra.sweeper.n_trials=6", "hydra.sweeper.batch_size=2", f"hydra.sweeper.total_budget_kg={budget_kg}",
                 "hydra.sweeper.trial_budget_kg=null", f"hydra.sweep.dir={sweep}")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    report = json.loads((sweep / "carbon_sweep.json").read_text())
    trials = report["trials"]
    # one batch of two trials ran, then the budget stopped the sweep (not n_trials)
    assert len(trials) == 2 and report["n_trials"] == 2
    assert "spent >= 90%" in report["stopped"] and "stopped:" in out
    # what was charged is what the runs measured
    measured = [json.loads((sweep / str(i) / "sustainability.json").read_text())["metrics"]["carbon/total_kg_co2e"]["value"]
                for i in range(2)]
    assert [t["kg"] for t in trials] == pytest.approx(measured)
    assert report["spent_kg"] == pytest.approx(sum(measured)) and report["spent_kg"] >= 0.9 * budget_kg
    # each trial searched the recipe's space and ran that architecture
    for i, t in enumerate(trials):
        assert t["params"]["model.kwargs.depth"] in (1, 2, 4) and t["params"]["data.image_size"] in (16, 24, 32)
        cfg = (sweep / str(i) / ".hydra" / "config.yaml").read_text()
        assert f"depth: {t['params']['model.kwargs.depth']}" in cfg
    # the Pareto front: exactly the non-dominated trials (accuracy up, kg down)
    done = [t for t in trials if t["state"] == "complete"]
    dominated = {t["number"] for t in done for u in done
                 if u["objective"] >= t["objective"] and u["kg"] <= t["kg"]
                 and (u["objective"] > t["objective"] or u["kg"] < t["kg"])}
    assert set(report["pareto_front"]) == {t["number"] for t in done} - dominated
    assert "Pareto front" in out and "2 jobs, 0 failed" in out
