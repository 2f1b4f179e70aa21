"""Region scoring, the dated price catalog and `greenstack plan region`."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from greenstack.cli.plan import run_plan
from greenstack.errors import ConfigError, DataError
from greenstack.scheduling.prices import Offer, default_catalog_path, load_price_catalog
from greenstack.scheduling.regions import Candidate, region_score, score_regions


def offer(zone: str, od: float, spot: float | None) -> Offer:
    return Offer(zone, "aws", "r", "t", "gpu", od, spot, "2024-06-01", "test")


def test_score_formula_with_default_weights():
    # 0.6 * (1 - 200/400) + 0.4 * (1 - 0.3/1.0) = 0.3 + 0.28
    assert region_score(200, 400, 0.3) == pytest.approx(0.58)
    assert region_score(400, 400, 1.0) == 0.0
    ranked = score_regions([Candidate("A", 400.0, offer("A", 1.0, 0.2)),   # 0 + 0.4*0.8 = 0.32
                            Candidate("B", 200.0, offer("B", 1.0, 0.9)),   # 0.3 + 0.04 = 0.34
                            Candidate("C", 300.0, offer("C", 2.0, None))])  # 0.15 + 0 (no spot market)
    assert [r.candidate.zone for r in ranked] == ["B", "A", "C"]
    assert [r.score for r in ranked] == pytest.approx([0.34, 0.32, 0.15])
    assert ranked[2].price_term == 0.0
    only_price = score_regions([Candidate("A", 400.0, offer("A", 1.0, 0.2)),
                                Candidate("B", 200.0, offer("B", 1.0, 0.9))], w_carbon=0.0, w_price=1.0)
    assert only_price[0].candidate.zone == "A"


def test_scoring_rejects_empty_candidates_and_bad_weights():
    with pytest.raises(ConfigError, match="no candidate regions"):
        score_regions([])
    with pytest.raises(ConfigError) as err:
        score_regions([Candidate("A", 1.0, offer("A", 1.0, 0.5))], w_carbon=0.7, w_price=0.4)
    assert err.value.problems[0].key == "w_price" and "not 1" in err.value.problems[0].reason


def test_shipped_catalog_is_dated_and_covers_every_shipped_zone():
    from greenstack.carbon import traces

    cat = load_price_catalog()
    assert cat.as_of == "2024-06-01"
    for kind in ("cpu", "gpu"):
        assert cat.zones(kind) == traces.available_zones()
    gb = cat.offer("gb", "gpu")
    assert gb.region == "eu-west-2" and 0 < gb.spot_ratio < 1
    assert cat.offer("US-NY-NYIS", "cpu").spot_ratio == 1.0  # no spot market: no discount
    assert "snapshot" in (default_catalog_path().parent / "README.md").read_text()
    with pytest.raises(ConfigError, match="no cpu price"):
        cat.offer("FR", "cpu")


def test_bad_catalog_rows_are_named(tmp_path):
    frame = load_price_catalog().frame.astype(object)  # the CSV form users may export
    frame = frame[frame["spot_usd_per_h"].notna()].reset_index(drop=True)
    frame.loc[0, "on_demand_usd_per_h"] = "abc"                            # row 0: not a number
    frame.loc[1, "kind"] = "tpu"                                           # row 1: unknown kind
    frame.loc[2, "spot_usd_per_h"] = frame.loc[2, "on_demand_usd_per_h"] + 1  # row 2: spot above on-demand
    frame.loc[3, "as_of"] = "June 2024"                                    # row 3: bad date
    bad = tmp_path / "prices.csv"
    frame.to_csv(bad, index=False)
    with pytest.raises(DataError) as err:
        load_price_catalog(bad)
    keys = {p.key for p in err.value.problems}
    assert keys == {"prices.csv[row 0, line 2].on_demand_usd_per_h", "prices.csv[row 1, line 3].kind",
                    "prices.csv[row 2, line 4].spot_usd_per_h", "prices.csv[row 3, line 5].as_of"}
    with pytest.raises(ConfigError, match="not found"):
        load_price_catalog(tmp_path / "missing.csv")


def test_plan_region_json_answers_where_and_when(capsys):
    assert run_plan(["region", "--duration", "2h", "--candidates", "CA-ON, IN-WE,GB", "--start",
                     "2025-03-01T10:00:00Z", "--slack", "12h", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [c["zone"] for c in doc["candidates"]][0] == doc["choice"]["zone"]
    assert {c["zone"] for c in doc["candidates"]} == {"CA-ON", "IN-WE", "GB"}
    scores = [c["score"] for c in doc["candidates"]]
    assert scores == sorted(scores, reverse=True)
    i_max = max(c["intensity_g_per_kwh"] for c in doc["candidates"])
    for c in doc["candidates"]:  # the documented formula, from the reported inputs
        expected = 0.6 * (1 - c["intensity_g_per_kwh"] / i_max) + 0.4 * (1 - c["offer"]["spot_ratio"])
        assert c["score"] == pytest.approx(expected, abs=1e-3)
        assert "2025-03-01T10:00" <= c["start"] <= "2025-03-01T22:00"
        assert c["intensity_g_per_kwh"] <= c["intensity_now_g_per_kwh"] + 1e-9
    assert doc["kind"] == "cpu" and doc["catalog"]["as_of"] == "2024-06-01"
    assert any("replayed 2023" in n for n in doc["notes"])  # 2025: the shipped traces are replayed, said so


def test_plan_region_table(capsys):
    assert run_plan(["region", "--duration", "2h", "--candidates", "GB,DE-LU", "--start", "2025-03-01T10:00:00Z",
                     "--kind", "gpu", "--w-carbon", "1", "--w-price", "0"]) == 0
    out = capsys.readouterr().out
    assert "run in " in out and "g4dn.xlarge" in out and "snapshot as of 2024-06-01" in out


@pytest.mark.parametrize(("argv", "key", "text"), [
    (["--candidates", " , "], "--candidates", "empty candidate list"),
    (["--candidates", "GB,ATLANTIS"], "--candidates", "unknown region"),
    (["--candidates", "GB", "--w-carbon", "0.9"], "--w-price", "not 1"),
    (["--candidates", "GB", "--start", "2025-03-01T10:00:00"], "--start", "timezone"),
    (["--candidates", "GB", "--catalog", "nope.csv"], "--catalog", "not found"),
])
def test_plan_region_bad_input(argv, key, text):
    with pytest.raises(ConfigError) as err:
        run_plan(["region", "--duration", "2h", *argv])
    assert any(p.key == key and text in p.reason for p in err.value.problems), err.value.problems


def test_unknown_region_suggests_the_closest():
    with pytest.raises(ConfigError) as err:
        run_plan(["region", "--duration", "2h", "--candidates", "US-CAL-CIS0"])
    assert "did you mean 'US-CAL-CISO'" in err.value.problems[0].fix


def test_plan_region_and_report_tco_share_one_catalog(capsys):
    """Every offer plan region can pick is priced by report tco, at the same on-demand and spot price."""
    from greenstack.scheduling.prices import load_catalog

    offers, tco = load_price_catalog(), load_catalog()
    assert offers.path == tco.path
    for row in offers.frame.itertuples():
        priced = tco.instance(row.instance_type, row.region)
        assert priced["on_demand_usd_per_hour"] == pytest.approx(row.on_demand_usd_per_h)
        assert (priced["spot_usd_per_hour"] is None) == pd.isna(row.spot_usd_per_h)
        for storage_class in ("object", "block"):  # storage is priced where the instance runs
            assert tco.storage_price(row.provider, row.region, storage_class)["usd_per_gb_month"] > 0
    assert run_plan(["region", "--duration", "2h", "--candidates", "GB,DE-LU,US-CAL-CISO", "--start",
                     "2025-03-01T10:00:00Z", "--json"]) == 0
    choice = json.loads(capsys.readouterr().out)["choice"]
    assert choice["instance_type"] == "c6i.4xlarge"
    assert tco.instance(choice["instance_type"], choice["region"])["on_demand_usd_per_hour"] > 0


def test_report_tco_prices_the_instance_plan_region_picks(tmp_path, capsys):
    from greenstack.cli.report import run_report

    runs = Path(__file__).resolve().parents[1] / "fixtures" / "runs"
    assert run_plan(["region", "--duration", "2h", "--candidates", "GB,DE-LU", "--kind", "cpu", "--json"]) == 0
    choice = json.loads(capsys.readouterr().out)["choice"]
    assert run_report(["tco", str(runs / "small"), "--instance", choice["instance_type"], "--region",
                       choice["region"], "--json"]) == 0
    out = capsys.readouterr().out
    assert choice["instance_type"] in out and "prices_" in out
