"""TCO from measured run figures and a dated price catalog, checked against a hand computation.

Fixture runs (tests/fixtures/runs): `small` ran 7200 s and emitted 2.5 kg (6.25 kWh); `baseline` ran
10800 s and emitted 4.0 kg (10 kWh). Test catalog: tc.gpu1 in test-1 costs 2.00 USD/h on demand and
0.80 spot, object storage 0.025 USD/GB-month.

By hand, at 100 USD/t, 40 GB dataset + 10 GB checkpoints kept 3 months, one node, on demand:
  small:    compute 2 h x 2.00 = 4.00; storage 50 x 0.025 x 3 = 3.75; carbon 2.5/1000 x 100 = 0.25; total 8.00
  baseline: compute 3 h x 2.00 = 6.00; storage 3.75;                   carbon 4.0/1000 x 100 = 0.40; total 10.15
  saving 2.15 USD = 21.18 % of the baseline (compute 2.00 = 33.3 %, carbon 0.15 = 37.5 %)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from greenstack.errors import ConfigError, DataError
from greenstack.report.tco import (
    TcoOptions,
    compare_tco,
    compute_tco,
    load_run,
)
from greenstack.scheduling.prices import default_catalog_path, load_catalog

RUNS = Path(__file__).resolve().parents[1] / "fixtures" / "runs"
CATALOG = str(RUNS / "prices_test.json")


def opts(**kw) -> TcoOptions:
    base = {"instance": "tc.gpu1", "region": "test-1", "catalog": CATALOG, "carbon_price_usd_per_t": 100.0,
            "dataset_gb": 40.0, "checkpoint_gb": 10.0, "retention_months": 3.0}
    return TcoOptions(**{**base, **kw})


def values(tco) -> dict[str, float | None]:
    return {k: v.value for k, v in tco.lines.items()}


def test_tco_matches_hand_computation():
    tco = compute_tco(RUNS / "small", opts())
    assert values(tco) == pytest.approx({"compute_usd": 4.0, "energy_usd": 0.0, "storage_dataset_usd": 3.0,
                                         "storage_checkpoints_usd": 0.75, "carbon_usd": 0.25, "total_usd": 8.0})
    assert "2 h x 1 x tc.gpu1 test-1 on_demand 2 USD/h" in tco.lines["compute_usd"].source
    assert "as of 2024-05-01" in tco.lines["compute_usd"].source
    assert tco.lines["carbon_usd"].provenance == "estimated"


def test_savings_against_a_measured_baseline():
    result = compare_tco(RUNS / "small", RUNS / "baseline", opts())
    assert result.baseline is not None and result.baseline.total_usd == pytest.approx(10.15)
    s = result.savings
    assert s["total_usd"]["usd"] == pytest.approx(2.15)
    assert s["total_usd"]["percent"] == pytest.approx(2.15 / 10.15 * 100)
    assert s["compute_usd"]["percent"] == pytest.approx(100 / 3)
    assert s["carbon_usd"]["usd"] == pytest.approx(0.15) and s["carbon_usd"]["percent"] == pytest.approx(37.5)
    assert s["storage_dataset_usd"]["usd"] == 0.0
    assert result.measured["carbon/total_kg_co2e"] == pytest.approx(
        {"baseline": 4.0, "run": 2.5, "delta": -1.5, "percent": -37.5, "provenance": "estimated"})
    assert result.measured["test/accuracy"]["delta"] == pytest.approx(0.01)


def test_spot_and_nodes():
    assert compute_tco(RUNS / "small", opts(pricing="spot")).total_usd == pytest.approx(1.6 + 3.75 + 0.25)
    assert values(compute_tco(RUNS / "small", opts(nodes=2)))["compute_usd"] == pytest.approx(8.0)
    with pytest.raises(ConfigError, match="no spot price"):
        compute_tco(RUNS / "small", opts(region="test-2", pricing="spot"))


def test_on_prem_prices_energy_hardware_and_storage():
    run = RUNS / "small"
    default = compute_tco(run, TcoOptions(carbon_price_usd_per_t=100.0))
    assert default.lines["energy_usd"].value == pytest.approx(1.25)  # the run's cost/energy_usd: 6.25 kWh x 0.2
    assert default.lines["compute_usd"].value is None and default.lines["compute_usd"].provenance == "fallback"
    assert default.total_usd == pytest.approx(1.25 + 0.25)
    priced = compute_tco(run, TcoOptions(carbon_price_usd_per_t=100.0, electricity_usd_per_kwh=0.3,
                                         hardware_usd_per_hour=1.5, storage_usd_per_gb_month=0.02,
                                         dataset_gb=40, checkpoint_gb=10))
    assert values(priced) == pytest.approx({"compute_usd": 3.0, "energy_usd": 1.875, "storage_dataset_usd": 0.8,
                                            "storage_checkpoints_usd": 0.2, "carbon_usd": 0.25, "total_usd": 6.125})


def test_sizes_are_measured_when_not_given(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(RUNS / "small", run)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "step-1.bin").write_bytes(b"\0" * 2_000_000)
    data = tmp_path / "images"
    data.mkdir()
    (data / "a.png").write_bytes(b"\0" * 3_000_000)
    cfg = (run / ".hydra" / "config.yaml").read_text()
    (run / ".hydra" / "config.yaml").write_text(cfg.replace("num_samples: 256", f"root: {data}"))
    tco = compute_tco(run, opts(dataset_gb=None, checkpoint_gb=None, retention_months=1.0))
    assert tco.inputs["dataset_gb"] == pytest.approx(0.003) and tco.inputs["checkpoint_gb"] == pytest.approx(0.002)
    assert tco.lines["storage_dataset_usd"].value == pytest.approx(0.003 * 0.025)
    assert "size on disk" in tco.lines["storage_checkpoints_usd"].source


def test_unknown_instance_or_region_is_explained():
    with pytest.raises(ConfigError, match="did you mean tc.gpu1"):
        compute_tco(RUNS / "small", opts(instance="tc.gpu2"))
    with pytest.raises(ConfigError, match="test-1, test-2"):
        compute_tco(RUNS / "small", opts(region=None))
    with pytest.raises(ConfigError, match="priced regions"):
        compute_tco(RUNS / "small", opts(region="mars-1"))


def test_bad_catalog_rows_are_named(tmp_path):
    doc = json.loads(Path(CATALOG).read_text())
    doc.pop("as_of")
    doc["instances"][1]["on_demand_usd_per_hour"] = -1
    doc["instances"].append(dict(doc["instances"][0]))  # duplicate (instance_type, region)
    doc["storage"][0]["provider"] = ""
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(DataError) as e:
        load_catalog(bad)
    text = str(e.value)
    assert "as_of" in text and "must be dated" in text
    assert "instances[1].on_demand_usd_per_hour" in text and "> 0" in text
    assert "instances[3]" in text and "duplicate" in text
    assert "storage[0].provider" in text


def test_shipped_catalog_is_dated_and_complete():
    catalog = load_catalog()
    assert default_catalog_path().name.startswith("prices_") and catalog.as_of
    assert "replaceable" in catalog.label
    inst = catalog.instances
    assert len(inst) >= 20 and (inst["on_demand_usd_per_hour"] > 0).all()
    assert inst["spot_usd_per_hour"].notna().sum() >= 20
    for row in inst.itertuples():  # every priced instance can also price its storage
        catalog.storage_price(row.provider, row.region, "object")


def test_missing_figures_are_data_errors(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(RUNS / "small", run)
    summary = json.loads((run / "sustainability.json").read_text())
    del summary["metrics"]["time/duration_s"]
    (run / "sustainability.json").write_text(json.dumps(summary))
    with pytest.raises(DataError, match="time/duration_s"):
        compute_tco(run, opts())
    with pytest.raises(DataError, match="sustainability.json"):
        load_run(tmp_path)


def test_cli_tco_table_and_json(cli):
    args = ["report", "tco", str(RUNS / "small"), "--baseline", str(RUNS / "baseline"), "--instance", "tc.gpu1",
            "--region", "test-1", "--catalog", CATALOG, "--carbon-price", "100", "--dataset-gb", "40",
            "--checkpoint-gb", "10", "--retention-months", "3"]
    table = cli(*args)
    assert table.returncode == 0, table.stderr
    assert "10.15" in table.stdout and "21.2" in table.stdout and "measured differences" in table.stdout
    js = cli(*args, "--json")
    body = json.loads(js.stdout)
    assert body["run"]["lines"]["total_usd"]["value"] == pytest.approx(8.0)
    assert body["baseline"]["lines"]["total_usd"]["value"] == pytest.approx(10.15)
    assert body["savings"]["total_usd"]["usd"] == pytest.approx(2.15)
    bad = cli("report", "tco", str(RUNS / "small"), "--instance", "nope.large")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_return_on_the_savings_break_even_with_every_input_shown(capsys, monkeypatch):
    from greenstack.cli import main
    from greenstack.report.tco import return_on_savings

    # saving 2.15 USD per run (see the module docstring): 100 USD pays back after 46.5 runs, 4.65 months at 10/month
    result = compare_tco(RUNS / "small", RUNS / "baseline", opts())
    roi = return_on_savings(result, 100.0, 10.0)
    assert roi["break_even_runs"] == pytest.approx(100 / 2.15) and roi["break_even_whole_runs"] == 47
    assert roi["break_even_months"] == pytest.approx(100 / 2.15 / 10)
    assert roi["monthly_saving_usd"] == pytest.approx(21.5)
    assert roi["inputs"] == {"investment_usd": 100.0, "runs_per_month": 10.0, "saving_per_run_usd": pytest.approx(2.15),
                             "saving_provenance": "estimated", "saving_source": "total_usd of baseline baseline - run small"}
    # the other way round the "saving" is a loss: it never breaks even, and says so
    worse = return_on_savings(compare_tco(RUNS / "baseline", RUNS / "small", opts()), 100.0, 10.0)
    assert worse["break_even_runs"] is None and "never" in worse["note"]
    with pytest.raises(ConfigError, match="--baseline"):
        return_on_savings(compare_tco(RUNS / "small", None, opts()), 100.0)
    args = ["report", "tco", str(RUNS / "small"), "--baseline", str(RUNS / "baseline"), "--instance", "tc.gpu1",
            "--region", "test-1", "--catalog", CATALOG, "--carbon-price", "100", "--dataset-gb", "40",
            "--checkpoint-gb", "10", "--retention-months", "3", "--investment-usd", "100", "--runs-per-month", "10"]
    monkeypatch.setenv("COLUMNS", "200")
    capsys.readouterr()
    assert main(args) == 0
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("return on the savings", "--investment-usd", "--runs-per-month", "2.15", "46.51", "4.651 months"):
        assert shown in text, shown
    assert main([*args, "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["return_on_savings"]["break_even_months"] == pytest.approx(100 / 2.15 / 10)
    assert main(["report", "tco", str(RUNS / "small"), "--runs-per-month", "10"]) == 2
    assert "--investment-usd" in capsys.readouterr().err
