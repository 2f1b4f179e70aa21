"""`plan forecast-eval|backtest --trace GB:2023 --history GB:2021-2022`: shipped zone-years by name."""

from __future__ import annotations

import pytest

from greenstack.carbon import inputs
from greenstack.errors import ConfigError


def test_a_zone_year_is_that_year_of_the_shipped_trace():
    df = inputs.load_trace("GB:2023", "g_per_kwh", "trace")
    assert set(df["timestamp"].dt.year) == {2023} and len(df) >= 8700
    assert df.attrs["zone"] == "GB" and df.attrs["path"] == "GB:2023" and df.attrs["role"] == "trace"
    history = inputs.load_trace("gb:2021-2022", "g_per_kwh", "history")  # zone ids are case-insensitive
    assert set(history["timestamp"].dt.year) == {2021, 2022} and history.attrs["path"] == "GB:2021-2022"
    series, _ = inputs.combine_history(df, [history], "GB:2023")
    assert series.index[0].year == 2021 and series.index[-1].year == 2023


@pytest.mark.parametrize("spec, words", [("GB:2024", "covers 2021-2023"), ("GB:2023-2021", "covers"),
                                         ("GBB:2023", "did you mean 'GB'")])
def test_a_zone_year_outside_the_shipped_data_is_a_clear_error(spec, words):
    with pytest.raises(ConfigError) as err:
        inputs.load_trace(spec, "g_per_kwh", "trace")
    assert words in str(err.value)


def test_an_existing_file_named_like_a_zone_year_is_read_as_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "GB:2023").write_text("timestamp,carbon_intensity\n2023-01-01T00:00:00Z,100\n"
                                      "2023-01-01T01:00:00Z,110\n")
    df = inputs.load_trace("GB:2023", "g_per_kwh", "trace")
    assert len(df) == 2


def test_the_cli_takes_zone_years(capsys):
    from greenstack import cli

    code = cli.main(["plan", "backtest", "--trace", "GB:2024", "--duration", "4h", "--slack", "24h"])
    assert code == 2 and "covers 2021-2023" in capsys.readouterr().err
