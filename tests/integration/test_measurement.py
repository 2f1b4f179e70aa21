"""Energy/carbon measurement wired through a real training loop."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.multiprocessing as mp

from greenstack import runner
from greenstack.compose import compose_with_problems
from greenstack.energy.meters import Meter
from greenstack.engine.loop import Trainer, TrainerConfig
from greenstack.engine.optim import Optim
from greenstack.measure import CarbonConfig, EnergyConfig, Measurement, reduce_across_ranks
from tests.conftest import FAST

J_PER_KWH = 3.6e6


class ConstantPowerMeter(Meter):
    """A node-wide 'counter' that integrates a known constant power on the monotonic clock."""

    name, provenance, source, components = "fake", "measured", "fake:100W", ("cpu",)

    def __init__(self, power_w: float = 100.0) -> None:
        self.power_w = power_w
        self.t0 = time.monotonic()

    def start(self) -> None:
        self.t0 = time.monotonic()

    def read_energy_j(self) -> dict[str, float]:
        return {"cpu": self.power_w * (time.monotonic() - self.t0)}


def _batches(n=40, size=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n * size, 4, generator=g)
    y = (x[:, 0] > 0).long()
    return [{"inputs": x[i:i + size], "labels": y[i:i + size]} for i in range(0, n * size, size)]


class SlowLinear(torch.nn.Linear):
    def forward(self, x):  # ~2 ms a batch so the run spans several meter readings
        time.sleep(0.002)
        return super().forward(x)


def test_emissions_match_hand_computation_with_known_power():
    meter = ConstantPowerMeter(100.0)
    carbon = CarbonConfig(kind="static", zone="static", intensity_g_per_kwh=400.0, pue=1.5,
                          electricity_usd_per_kwh=0.25)
    measurement = Measurement(EnergyConfig(interval_s=0.02), carbon, log_interval=5, meters=[meter])
    trainer = Trainer(SlowLinear(4, 2), _batches(), Optim(lr=0.1), TrainerConfig(max_duration="2ep", progress=False),
                      val_loader=_batches(4), policies=[measurement], batch_size=8)
    state = trainer.fit()
    figs, row = measurement.final(state, latency_ms=None, latency_batch=0)
    duration = measurement.monitor.duration_s()
    kwh = 100.0 * duration / J_PER_KWH
    assert figs["energy/total_kwh"].value == pytest.approx(kwh, rel=1e-4)
    assert figs["energy/facility_kwh"].value == pytest.approx(kwh * 1.5, rel=1e-4)
    assert figs["carbon/total_kg_co2e"].value == pytest.approx(kwh * 1.5 * 400 / 1000, rel=1e-4)
    assert figs["cost/energy_usd"].value == pytest.approx(kwh * 1.5 * 0.25, rel=1e-4)
    assert figs["energy/j_per_sample"].value == pytest.approx(100.0 * duration / state.samples_seen, rel=1e-4)
    # a static intensity is a configured fallback, and the weakest label wins
    assert figs["carbon/total_kg_co2e"].provenance == "fallback"
    assert figs["energy/total_kwh"].provenance == "measured"
    assert "fake:100W" in figs["carbon/total_kg_co2e"].source and "static:400" in figs["carbon/total_kg_co2e"].source
    assert figs["efficiency/flops_per_watt"].value > 0
    # two epochs were metered; they cover all but the final test evaluation
    assert len(measurement._epoch_kg) == 2
    assert figs["carbon/per_epoch_kg"].value == pytest.approx(sum(measurement._epoch_kg) / 2)
    assert 0.8 * figs["carbon/total_kg_co2e"].value < sum(measurement._epoch_kg) <= figs["carbon/total_kg_co2e"].value
    assert row["emissions"] == figs["carbon/total_kg_co2e"].value


def test_carbon_budget_stop_after_first_epoch(tmp_path):
    cfg, problems = compose_with_problems(["data=synthetic_image", "model.name=resnet10t", "data.num_samples=96",
                                           "trainer.max_duration=4ep", *FAST[2:], "carbon=static",
                                           "carbon.budget_kg=1e-12", "carbon.budget_action=stop"])
    assert not problems
    summary = runner.run(cfg, tmp_path)
    decision = summary["carbon_budget"]
    assert decision["action"] == "stop" and decision["after_epoch"] == 1
    assert decision["projected_total_kg"] > decision["budget_kg"]
    assert "carbon.budget_kg" in summary["stopped_early"]
    assert summary["metrics"]["train/steps"]["value"] < 4 * 3
    # a budget stop is a partial run, flagged as such on disk
    written = json.loads((tmp_path / "sustainability.json").read_text())
    assert written["status"] == "budget_stopped" and written["partial"] is True
    assert "carbon.budget_kg" in written["end_reason"]


def _rank_main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ["LOCAL_RANK"] = str(rank)  # both ranks on one node
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        measurement = Measurement(EnergyConfig(interval_s=0.05),
                                  CarbonConfig(kind="static", zone="static", intensity_g_per_kwh=300.0),
                                  meters=[ConstantPowerMeter(50.0)])
        trainer = Trainer(SlowLinear(4, 2), _batches(20), Optim(lr=0.1),
                          TrainerConfig(max_duration="1ep", progress=False), policies=[measurement], batch_size=8)
        state = trainer.fit()
        figs, _ = measurement.final(state, latency_ms=None, latency_batch=0)
        metered = measurement.monitor is not None
        own = measurement.monitor.total_kwh() if metered else 0.0
        total_own = reduce_across_ranks({"own": own})["own"]
        result = {"metered": metered, "total_kwh": figs.get("energy/total_kwh").value if figs else None,
                  "sum_of_own_kwh": total_own}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        torch.distributed.barrier()  # nobody tears gloo down while a peer still talks to it (SIGABRT)
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_gloo_run_counts_the_node_once(tmp_path):
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["metered"] and not r1["metered"]
    # the node total is rank 0's meter alone (not doubled by the second process on the node)
    assert r0["total_kwh"] == pytest.approx(r0["sum_of_own_kwh"], rel=1e-9)
    assert r0["total_kwh"] > 0 and r1["total_kwh"] is None


def _trace_with_a_peak(path, peak_at, year):
    """Hourly, from the year before `year` to the year after: 100 g/kWh, 500 in the 3 h around `peak_at`.
    Returns the mean over `year` (the run's annual-mean baseline)."""
    import pandas as pd

    hours = pd.date_range(f"{year - 1}-01-01", f"{year + 2}-01-01", freq="h", tz="UTC", inclusive="left")
    centre = pd.Timestamp(peak_at).floor("h")
    peak = (hours >= centre - pd.Timedelta(hours=1)) & (hours <= centre + pd.Timedelta(hours=1))
    intensity = pd.Series(100.0, index=hours).mask(peak, 500.0)
    pd.DataFrame({"timestamp": hours.strftime("%Y-%m-%dT%H:%M:%SZ"), "carbon_intensity": intensity.to_numpy()}).to_csv(
        path, index=False)
    return float(intensity[intensity.index.year == year].mean())


@pytest.mark.parametrize("baseline", ["submission", "annual_mean"])
def test_savings_vs_baseline_and_costs_match_hand_computation(tmp_path, baseline):
    from datetime import datetime, timedelta, timezone
    from pathlib import Path

    now = datetime.now(timezone.utc)
    submitted = now - timedelta(hours=12)
    annual = _trace_with_a_peak(tmp_path / "trace.csv", submitted, now.year)
    catalog = Path(__file__).resolve().parents[1] / "fixtures" / "runs" / "prices_test.json"
    carbon = CarbonConfig(kind="csv", path=str(tmp_path / "trace.csv"), zone="XX", pue=1.5,
                          savings_baseline=baseline, carbon_price_usd_per_t=100.0, instance_type="tc.gpu1",
                          instance_region="test-1", price_catalog=str(catalog))
    measurement = Measurement(EnergyConfig(interval_s=0.02), carbon, log_interval=5, meters=[ConstantPowerMeter(100.0)],
                              submitted_at=submitted)
    trainer = Trainer(SlowLinear(4, 2), _batches(), Optim(lr=0.1), TrainerConfig(max_duration="2ep", progress=False),
                      policies=[measurement], batch_size=8)
    state = trainer.fit()
    figs, _ = measurement.final(state, latency_ms=None, latency_batch=0)
    facility_kwh = figs["energy/facility_kwh"].value
    emitted = figs["carbon/total_kg_co2e"].value
    assert emitted == pytest.approx(facility_kwh * 100 / 1000, rel=1e-6)  # ran at 100 g/kWh
    # submission: the same energy 12 h earlier, in the 500 g/kWh peak; annual mean: the trace's own mean
    at_baseline = facility_kwh * (500.0 if baseline == "submission" else annual) / 1000
    saving = figs["carbon/savings_vs_baseline"]
    assert saving.value == pytest.approx(at_baseline - emitted, rel=1e-6) and saving.unit == "kgCO2eq"
    assert saving.provenance == "measured"  # measured energy on a measured trace, inside its span
    assert ("submission" if baseline == "submission" else "annual mean") in saving.source
    credit = figs["cost/carbon_credit_value_usd"]
    assert credit.value == pytest.approx(saving.value / 1000 * 100.0) and "100 USD/tCO2e" in credit.source
    hours = measurement.monitor.duration_s() / 3600
    assert figs["cost/compute_usd"].value == pytest.approx(hours * 2.0, rel=1e-6)
    assert figs["cost/spot_savings_usd"].value == pytest.approx(hours * (2.0 - 0.8), rel=1e-6)
    assert figs["cost/per_epoch_usd"].value == pytest.approx(hours * 2.0 / 2, rel=1e-6)  # 2 epochs
    for key in ("carbon/savings_vs_baseline", "cost/carbon_credit_value_usd", "cost/spot_savings_usd",
                "cost/per_epoch_usd"):
        assert set(figs[key].to_dict()) == {"value", "unit", "provenance", "source"}
