"""Spike detection/repair, multi-source cross-check, and Ed25519 signing of data files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from greenstack.carbon import integrity, traces
from greenstack.cli.carbon import run_carbon
from greenstack.errors import ConfigError, DataError


def _week(zone: str = "GB") -> pd.DataFrame:
    df = traces.load_zone(zone)
    return df[(df["timestamp"] >= "2023-03-01") & (df["timestamp"] < "2023-03-08")].reset_index(drop=True)


def test_isolated_spikes_are_flagged_and_repaired_but_real_swings_are_not():
    df = _week("DE-LU")
    clean = integrity.detect_anomalies(df["carbon_intensity"])
    spiked = df.copy()
    spiked.loc[40, "carbon_intensity"] *= 3.0
    spiked.loc[100, "carbon_intensity"] = 5.0
    report = integrity.detect_anomalies(spiked["carbon_intensity"])
    assert {40, 100} <= set(report.rows())
    assert set(report.rows()) - {40, 100} <= set(clean.rows())  # nothing new besides the injected spikes
    repaired, rep = integrity.repair_spikes(spiked)
    assert abs(repaired.loc[40, "carbon_intensity"] - df.loc[40, "carbon_intensity"]) < 0.25 * df.loc[40, "carbon_intensity"]
    assert repaired.loc[40, "estimated"] == 1 and repaired.loc[41, "estimated"] == df.loc[41, "estimated"]
    # a sustained 8-hour excursion is weather, not a glitch
    step = df.copy()
    step.loc[60:67, "carbon_intensity"] *= 2.5
    assert not set(range(60, 68)) & set(integrity.detect_anomalies(step["carbon_intensity"]).rows())


def test_flat_series_noise_is_not_a_spike():
    rng = np.random.default_rng(0)
    flat = 490 + rng.normal(0, 0.5, 500)
    assert integrity.detect_anomalies(flat).count == 0
    with pytest.raises(ConfigError):
        integrity.detect_anomalies(flat, window=2)


def test_cross_check_flags_hours_where_sources_disagree():
    a = _week("GB")
    b = a[["timestamp", "carbon_intensity"]].copy()
    b.loc[[10, 11, 50], "carbon_intensity"] *= 1.6
    # b at half-hourly resolution, as the UK API reports: averaged to hours before comparing
    half = pd.DataFrame({"timestamp": np.repeat(b["timestamp"].to_numpy(), 2), "carbon_intensity":
                         np.repeat(b["carbon_intensity"].to_numpy(), 2)})
    half["timestamp"] = pd.DatetimeIndex(half["timestamp"]) + pd.to_timedelta(np.tile([0, 30], len(b)), unit="min")
    out = integrity.cross_check(a, half, threshold_pct=20, names=("electricitymaps", "ukgrid"))
    assert list(out["timestamp"]) == list(a["timestamp"].iloc[[10, 11, 50]])
    assert (out["diff_pct"] > 40).all() and out.attrs["overlap_hours"] == len(a)
    assert {"electricitymaps", "ukgrid", "diff_pct"} <= set(out.columns)


def test_sign_and_verify_detects_tampering(tmp_path):
    key, pub = integrity.generate_keypair(tmp_path / "k")
    assert pub.name == "k.pub"
    other, other_pub = integrity.generate_keypair(tmp_path / "other")
    data = tmp_path / "trace.csv"
    data.write_text("timestamp,carbon_intensity\n2023-01-01T00:00:00Z,100\n")
    sig = integrity.sign_file(data, key)
    assert sig == tmp_path / "trace.csv.sig" and (key.stat().st_mode & 0o777) == 0o600
    assert integrity.verify_file(data, pub) == sig
    with pytest.raises(DataError, match="signature does not match"):
        integrity.verify_file(data, other_pub)
    data.write_text("timestamp,carbon_intensity\n2023-01-01T00:00:00Z,101\n")
    with pytest.raises(DataError, match="signature does not match"):
        integrity.verify_file(data, pub)
    sig.write_text("not base64 at all")
    with pytest.raises(DataError):
        integrity.verify_file(data, pub)
    with pytest.raises(ConfigError, match="already exists"):
        integrity.generate_keypair(tmp_path / "k")
    with pytest.raises(ConfigError, match="Ed25519|PEM"):
        integrity.sign_file(data, pub)  # a public key is not a signing key


def test_carbon_cli_keygen_sign_verify_check(tmp_path, capsys):
    key = tmp_path / "team.key"
    assert run_carbon(["keygen", str(key)]) == 0
    data = tmp_path / "t.csv"
    df = _week("GB")
    df.loc[30, "carbon_intensity"] = 1500.0
    pd.DataFrame({"timestamp": df["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "carbon_intensity": df["carbon_intensity"]}).to_csv(data, index=False)
    assert run_carbon(["sign", "--key", str(key), str(data)]) == 0
    assert run_carbon(["verify", "--pub", str(key) + ".pub", str(data)]) == 0
    assert "OK" in capsys.readouterr().out
    repaired = tmp_path / "fixed.csv"
    assert run_carbon(["check", str(data), "--repair", str(repaired), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [s["row"] for s in doc["spikes"]] == [30]
    assert traces.load_csv_trace(repaired)["carbon_intensity"].iloc[30] < 500
    data.write_text(data.read_text().replace("1500.0", "150.0"))
    with pytest.raises(DataError):
        run_carbon(["verify", "--pub", str(key) + ".pub", str(data)])
    with pytest.raises(ConfigError):
        run_carbon(["sign", str(data)])  # --key is required
