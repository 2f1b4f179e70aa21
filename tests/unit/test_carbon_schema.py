"""validate_trace: every problem reported at once, each naming its row, timestamp and value."""

from __future__ import annotations

import pandas as pd
import pytest

from greenstack.carbon.schema import trace_schema, validate_trace
from greenstack.errors import ConfigError, DataError


def hourly(n: int = 6, start: str = "2023-01-01T00:00:00Z", **cols) -> pd.DataFrame:
    df = pd.DataFrame({"timestamp": pd.date_range(start, periods=n, freq="h"),
                       "carbon_intensity": [100.0 + i for i in range(n)]})
    for k, v in cols.items():
        df[k] = v
    return df


def problems_of(df: pd.DataFrame, **kw) -> list[str]:
    with pytest.raises(DataError) as info:
        validate_trace(df, "t", **kw)
    return [p.format() for p in info.value.problems]


def test_gap_duplicate_and_negative_are_all_reported_with_their_rows():
    ts = pd.to_datetime(["2023-01-01T00:00Z", "2023-01-01T01:00Z", "2023-01-01T01:00Z",  # row 2: duplicate
                         "2023-01-01T02:00Z", "2023-01-01T07:00Z", "2023-01-01T08:00Z"])  # row 4: 5 h gap
    df = pd.DataFrame({"timestamp": ts, "carbon_intensity": [100.0, 110.0, 110.0, -5.0, 90.0, 80.0]})  # row 3
    with pytest.raises(DataError) as info:
        validate_trace(df, "mytrace")
    err = info.value
    assert isinstance(err, ConfigError)  # the CLI prints it without a traceback
    text = str(err)
    assert len(err.problems) == 3, text
    dup = next(p for p in err.problems if "duplicate" in p.reason)
    assert "row 2" in dup.key and "2023-01-01T01:00:00Z" in dup.key and "row 1" in dup.reason
    neg = next(p for p in err.problems if "outside" in p.reason)
    assert "row 3" in neg.key and "2023-01-01T02:00:00Z" in neg.key and neg.value == -5.0
    assert "carbon_intensity" in neg.key
    gap = next(p for p in err.problems if "gap" in p.reason)
    assert "row 4" in gap.key and "2023-01-01T07:00:00Z" in gap.key
    assert "5 h" in gap.reason and "row 3" in gap.reason and "2023-01-01T02:00:00Z" in gap.reason


def test_valid_trace_passes_and_is_normalised():
    df = hourly(5, start="2023-06-01T02:00:00+02:00", renewable_percent=[10, 20, 30, 40, 50],
                estimated=["true", "false", "0", "1", "false"])
    out = validate_trace(df, "ok")
    assert str(out["timestamp"].dt.tz) == "UTC"
    assert out["timestamp"].iloc[0] == pd.Timestamp("2023-06-01T00:00:00Z")
    assert out["carbon_intensity"].dtype == "float64"
    assert out["estimated"].tolist() == [1, 0, 0, 1, 0]


def test_tz_naive_timestamps_are_rejected_with_the_fix():
    df = hourly(3)
    df["timestamp"] = df["timestamp"].dt.tz_localize(None)
    (msg,) = problems_of(df)
    assert "no timezone" in msg and "rows 0, 1, 2" in msg
    assert "Z" in msg and "UTC offset" in msg


def test_naive_timestamp_text_names_the_rows():
    df = pd.DataFrame({"timestamp": ["2023-01-01T00:00:00Z", "2023-01-01 01:00", "2023-01-01T02:00:00+00:00"],
                       "carbon_intensity": [1.0, 2.0, 3.0]})
    msgs = problems_of(df, first_line=2)
    assert len(msgs) == 1 and "row 1" in msgs[0] and "'2023-01-01 01:00'" in msgs[0]


def test_out_of_order_rows_are_named():
    df = hourly(4)
    df.loc[[1, 2], "timestamp"] = df.loc[[2, 1], "timestamp"].to_numpy()
    msgs = problems_of(df)
    assert len(msgs) == 1 and "row 2" in msgs[0] and "earlier than the previous row 1" in msgs[0]
    assert "sort" in msgs[0]


def test_range_checks_and_non_numbers():
    df = hourly(4, renewable_percent=[10.0, 101.0, 50.0, 50.0])
    df["carbon_intensity"] = df["carbon_intensity"].astype(object)
    df.loc[0, "carbon_intensity"] = 2500.0
    df.loc[2, "carbon_intensity"] = "n/a"
    msgs = problems_of(df)
    assert len(msgs) == 3, msgs
    assert any("row 0" in m and "2500" in m and "outside [0, 2000]" in m for m in msgs)
    assert any("row 1" in m and "renewable_percent" in m and "101" in m for m in msgs)
    assert any("row 2" in m and "not a number" in m and "'n/a'" in m for m in msgs)


def test_max_gap_is_configurable():
    df = hourly(4).drop(index=1).reset_index(drop=True)  # a 2 h step
    assert len(validate_trace(df, "t")) == 3
    (msg,) = problems_of(df, max_gap_hours=1)
    assert "gap of 2 h" in msg and "row 1" in msg


def test_missing_columns_and_empty_series():
    with pytest.raises(DataError, match="carbon_intensity"):
        validate_trace(pd.DataFrame({"timestamp": pd.date_range("2023", periods=2, freq="h", tz="UTC")}))
    with pytest.raises(DataError, match="no rows"):
        validate_trace(hourly(0))


def test_datetime_index_is_accepted():
    df = hourly(3).set_index("timestamp")
    assert list(validate_trace(df)["carbon_intensity"]) == [100.0, 101.0, 102.0]


def test_many_failures_are_capped_but_counted():
    df = hourly(30)
    df["carbon_intensity"] = -1.0
    msgs = problems_of(df)
    assert len(msgs) == 11 and "20 more rows" in msgs[-1]


def test_schema_object_is_a_pandera_schema():
    import pandera.pandas as pa

    schema = trace_schema(3.0)
    assert isinstance(schema, pa.DataFrameSchema)
    assert {"timestamp", "carbon_intensity", "renewable_percent"} <= set(schema.columns)
    assert schema.columns["renewable_percent"].required is False
