"""The cloud price catalog: instance prices (on-demand, spot) and storage prices, per provider and region.

`load_catalog` reads it for `greenstack report tco` and the run's instance price (`Catalog`);
`load_price_catalog` reads its zone-tagged instance rows as offers for region choice (`PriceCatalog`).

Why a shipped, dated file: region choice trades carbon against price, and a scheduler must work
offline and reproducibly. There is ONE shipped catalog, `greenstack/scheduling/data/prices_<YYYY-MM>.json`,
shared with `greenstack report tco`: its instance rows that name a carbon `zone` and a `kind` are the
offers compared here, so whatever `plan region` picks, `report tco` can price. Users replace it with
their own (the same JSON, or a CSV with the columns in REQUIRED, see data/README.md); like carbon
traces, a catalog is validated with pandera and every offending row is named before anything runs.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
import pandera.pandas as pa
from pandera.errors import SchemaErrors

from greenstack.errors import ConfigError, DataError, Problem
from greenstack.io import jsonable

DATA_DIR = Path(__file__).resolve().parent / "data"
CATALOG_SCHEMA = "greenstack.prices/1"
KINDS = ("cpu", "gpu")
REQUIRED = ("zone", "provider", "region", "instance_type", "kind", "on_demand_usd_per_h", "spot_usd_per_h", "as_of")
MAX_ROWS_PER_PROBLEM = 10


@dataclass(frozen=True)
class Offer:
    """One instance type in one region: on-demand and (optional) spot price per hour."""

    zone: str
    provider: str
    region: str
    instance_type: str
    kind: str
    on_demand_usd_per_h: float
    spot_usd_per_h: float | None
    as_of: str
    source: str

    @property
    def spot_ratio(self) -> float:
        """spot / on-demand (1.0 without a spot market: no discount to gain)."""
        if self.spot_usd_per_h is None or self.on_demand_usd_per_h <= 0:
            return 1.0
        return self.spot_usd_per_h / self.on_demand_usd_per_h

    def to_dict(self) -> dict[str, Any]:
        return {"zone": self.zone, "provider": self.provider, "region": self.region,
                "instance_type": self.instance_type, "kind": self.kind,
                "on_demand_usd_per_h": self.on_demand_usd_per_h, "spot_usd_per_h": self.spot_usd_per_h,
                "spot_ratio": round(self.spot_ratio, 4), "as_of": self.as_of}


@lru_cache(maxsize=1)
def _schema() -> pa.DataFrameSchema:
    price = [pa.Check(lambda s: s > 0, name="positive_price")]
    return pa.DataFrameSchema(
        {
            "zone": pa.Column(str, pa.Check.str_length(min_value=1, name="non_empty"), nullable=False),
            "provider": pa.Column(str, pa.Check.str_length(min_value=1, name="non_empty"), nullable=False),
            "region": pa.Column(str, pa.Check.str_length(min_value=1, name="non_empty"), nullable=False),
            "instance_type": pa.Column(str, pa.Check.str_length(min_value=1, name="non_empty"), nullable=False),
            "kind": pa.Column(str, pa.Check.isin(list(KINDS), name="kind"), nullable=False),
            "on_demand_usd_per_h": pa.Column("float64", price, nullable=False, coerce=True),
            "spot_usd_per_h": pa.Column("float64", price, nullable=True, coerce=True),
            "as_of": pa.Column(str, pa.Check.str_matches(r"^\d{4}-\d{2}-\d{2}$", name="date"), nullable=False),
        },
        strict=False, name="cloud price catalog",
    )


_REASONS = {  # pandera check name prefix -> (reason, fix)
    "str_length": ("empty", "fill it in"),
    "isin": ("unknown instance kind", f"one of {', '.join(KINDS)}"),
    "positive_price": ("a price must be > 0 USD/h", "leave spot_usd_per_h empty where there is no spot market"),
    "str_matches": ("not a YYYY-MM-DD date", "e.g. 2024-06-01"),
    "not_nullable": ("missing value", "every row needs a value here"),
}


@dataclass(frozen=True)
class PriceCatalog:
    """A validated catalog; `offer(zone, kind)` is the cheapest on-demand offer of that kind in the zone."""

    frame: pd.DataFrame
    path: str

    @property
    def as_of(self) -> str:
        dates = sorted(set(self.frame["as_of"]))
        return dates[0] if len(dates) == 1 else f"{dates[0]}..{dates[-1]}"

    def zones(self, kind: str | None = None) -> list[str]:
        df = self.frame if kind is None else self.frame[self.frame["kind"] == kind]
        return sorted(set(df["zone"]))

    def offer(self, zone: str, kind: str) -> Offer:
        """The zone's offer of this kind (cheapest on-demand if several); ConfigError if none."""
        rows = self.frame[(self.frame["zone"].str.upper() == str(zone).upper()) & (self.frame["kind"] == kind)]
        if rows.empty:
            have = ", ".join(self.zones(kind)) or "none"
            raise ConfigError(Problem("catalog", f"{zone}/{kind}", f"no {kind} price for zone {zone!r} in {self.path}",
                                      f"add a row for it, or choose among: {have}"))
        row = rows.sort_values("on_demand_usd_per_h").iloc[0]
        spot = row["spot_usd_per_h"]
        return Offer(str(row["zone"]), str(row["provider"]), str(row["region"]), str(row["instance_type"]), kind,
                     float(row["on_demand_usd_per_h"]), None if pd.isna(spot) else float(spot), str(row["as_of"]),
                     str(row.get("source", "")))


def load_price_catalog(path: str | Path | None = None) -> PriceCatalog:
    """Read and validate a price catalog, JSON or CSV (default: the shipped snapshot). Raises DataError naming rows."""
    p = Path(path).expanduser() if path else default_catalog_path()
    return _load(str(p.resolve()) if p.exists() else str(p))


def _json_rows(p: Path) -> pd.DataFrame:
    """The zone offers of a `greenstack.prices/1` JSON catalog as CSV-like string columns."""
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(Problem(p.name, None, f"not valid JSON: {err}")) from err
    rows = doc.get("instances") if isinstance(doc, dict) else None
    if not isinstance(rows, list):
        raise DataError(Problem(f"{p.name}.instances", None, "a JSON catalog needs a list of instances",
                                "see greenstack/scheduling/data/README.md for the format"))

    def text(value: object) -> str:
        return "" if value is None else str(value)

    offers = [{"zone": text(r.get("zone")), "provider": text(r.get("provider")), "region": text(r.get("region")),
               "location": text(r.get("location")), "instance_type": text(r.get("instance_type")),
               "kind": text(r.get("kind")), "on_demand_usd_per_h": text(r.get("on_demand_usd_per_hour")),
               "spot_usd_per_h": text(r.get("spot_usd_per_hour")), "as_of": text(r.get("as_of") or doc.get("as_of")),
               "source": text(r.get("source") or doc.get("source"))}
              for r in rows if isinstance(r, dict) and r.get("zone")]
    if not offers:
        raise DataError(Problem(f"{p.name}.instances", None, "no instance names a carbon `zone` and a `kind`",
                                "add \"zone\" (e.g. GB) and \"kind\" (cpu|gpu) to the offers to compare"))
    return pd.DataFrame(offers, columns=[*REQUIRED[:3], "location", *REQUIRED[3:], "source"])


@lru_cache(maxsize=8)
def _load(path: str) -> PriceCatalog:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(Problem("catalog", path, "price catalog not found",
                                  f"give an existing JSON catalog like {default_catalog_path()}, or a CSV with "
                                  f"columns {', '.join(REQUIRED)}"))
    if p.suffix.lower() == ".json":
        raw = _json_rows(p)
    else:
        try:
            raw = pd.read_csv(p, dtype=str, keep_default_na=False, comment="#", encoding="utf-8-sig")
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
            raise DataError(Problem(p.name, None, f"cannot read as CSV: {err}")) from err
    raw.columns = [str(c).strip() for c in raw.columns]
    missing = [c for c in REQUIRED if c not in raw.columns]
    if missing:
        raise DataError(Problem(f"{p.name}.columns", list(raw.columns), f"missing column(s) {missing}",
                                "see greenstack/scheduling/data/README.md for the format"))
    if raw.empty:
        raise DataError(Problem(p.name, 0, "the catalog has no rows"))
    df = raw.copy()
    for col in df.columns:
        df[col] = df[col].str.strip()
    problems: list[Problem] = []
    flagged: set[tuple[int, str]] = set()
    for col in ("on_demand_usd_per_h", "spot_usd_per_h"):
        num = pd.to_numeric(df[col].replace("", None), errors="coerce")
        bad = num.isna() & (df[col] != "")
        for row in df.index[bad][:MAX_ROWS_PER_PROBLEM]:
            problems.append(Problem(_row(p.name, row, col), df.at[row, col], "not a number",
                                    "use a plain decimal number, e.g. 0.526"))
        flagged |= {(int(r), col) for r in df.index[bad]}
        df[col] = num
    try:
        df = _schema().validate(df, lazy=True)
    except SchemaErrors as err:
        problems += _translate(err.failure_cases, df, p.name, flagged)
    above = df["spot_usd_per_h"].notna() & df["on_demand_usd_per_h"].notna() & (
        df["spot_usd_per_h"] > df["on_demand_usd_per_h"])
    for row in df.index[above][:MAX_ROWS_PER_PROBLEM]:
        problems.append(Problem(_row(p.name, row, "spot_usd_per_h"), float(df.at[row, "spot_usd_per_h"]),
                                f"spot price above the on-demand price {float(df.at[row, 'on_demand_usd_per_h']):g}",
                                "check the two price columns"))
    if problems:
        raise DataError(problems)
    dup = df.duplicated(["zone", "kind", "instance_type", "region"], keep="first")
    if dup.any():
        rows = df.index[dup]
        raise DataError([Problem(f"{p.name}[row {r}, line {r + 2}]", f"{df.at[r, 'zone']}/{df.at[r, 'instance_type']}",
                                 "duplicate offer (same zone, kind, region and instance type)",
                                 "keep one row per offer") for r in rows[:MAX_ROWS_PER_PROBLEM]])
    return PriceCatalog(df.reset_index(drop=True), str(p))


def _row(name: str, row: int, col: str) -> str:
    return f"{name}[row {row}, line {row + 2}].{col}"


def _translate(fc: pd.DataFrame, df: pd.DataFrame, name: str, flagged: set[tuple[int, str]]) -> list[Problem]:
    """pandera failure cases -> one Problem per offending row (capped), skipping rows already reported."""
    problems: list[Problem] = []
    for (column, check), group in fc.groupby(["column", "check"], sort=False, dropna=False):
        kind = next((k for k in _REASONS if str(check).startswith(k)), str(check))
        reason, fix = _REASONS.get(kind, (f"failed check {check}", ""))
        col = str(column)
        rows = sorted({int(i) for i in group["index"].dropna()} - {r for r, c in flagged if c == col})
        if group["index"].isna().all():
            problems.append(Problem(f"{name}.{col}", group["failure_case"].iloc[0], reason, fix))
            continue
        for r in rows[:MAX_ROWS_PER_PROBLEM]:
            value = df.at[r, col] if col in df.columns else None
            problems.append(Problem(_row(name, r, col), value.item() if hasattr(value, "item") else value, reason, fix))
        if len(rows) > MAX_ROWS_PER_PROBLEM:
            problems.append(Problem(f"{name}.{col}", None, f"{len(rows) - MAX_ROWS_PER_PROBLEM} more rows fail {kind}"))
    return problems


# -- the full catalog (instances and storage), as `report tco` prices runs ----------------------------
@dataclass(frozen=True)
class Catalog:
    """A dated price list: instances (provider, region, type, on-demand/spot $/h) and storage $/GB-month."""

    path: str
    as_of: str
    label: str
    currency: str
    instances: Any  # pandas.DataFrame
    storage: Any  # pandas.DataFrame

    def describe(self) -> str:
        return f"{self.label} (as of {self.as_of}; {Path(self.path).name})"

    def instance(self, instance_type: str, region: str | None) -> dict[str, Any]:
        df = self.instances
        rows = df[df["instance_type"] == instance_type]
        if rows.empty:
            close = difflib.get_close_matches(instance_type, sorted(set(df["instance_type"])), n=3, cutoff=0.5)
            raise ConfigError(Problem("--instance", instance_type, f"not in the price catalog {self.describe()}",
                                      (f"did you mean {', '.join(close)}? " if close else "")
                                      + "or pass --catalog FILE with your prices"))
        regions = sorted(set(rows["region"]))
        if region is None:
            if len(regions) > 1:
                raise ConfigError(Problem("--region", None, f"{instance_type} is priced in several regions",
                                          f"choose one: {', '.join(regions)}"))
            region = regions[0]
        match = rows[rows["region"] == region]
        if match.empty:
            raise ConfigError(Problem("--region", region, f"no price for {instance_type} in this region",
                                      f"priced regions: {', '.join(regions)}"))
        return {k: jsonable(v) for k, v in match.iloc[0].to_dict().items()}

    def storage_price(self, provider: str, region: str, storage_class: str) -> dict[str, Any]:
        df = self.storage
        match = df[(df["provider"] == provider) & (df["region"] == region) & (df["storage_class"] == storage_class)]
        if match.empty:
            have = sorted({f"{r.provider}/{r.region}/{r.storage_class}" for r in df.itertuples()})
            raise ConfigError(Problem("--storage-class", f"{provider}/{region}/{storage_class}",
                                      "no storage price in the catalog",
                                      f"priced: {', '.join(have)}; or pass --storage-price USD_PER_GB_MONTH"))
        return {k: jsonable(v) for k, v in match.iloc[0].to_dict().items()}


def default_catalog_path() -> Path:
    """The newest shipped snapshot (files are named prices_<YYYY-MM>.json)."""
    files = sorted(DATA_DIR.glob("prices_*.json"))
    if not files:
        raise DataError(Problem("catalog", str(DATA_DIR), "no shipped price catalog found"))
    return files[-1]


@lru_cache(maxsize=8)
def _load_catalog_cached(path: str, mtime: float) -> Catalog:
    del mtime  # part of the cache key only
    return _read_catalog(Path(path))


def load_catalog(path: str | Path | None = None) -> Catalog:
    """Load and validate a price catalog (the shipped snapshot when `path` is None)."""
    p = Path(path) if path is not None else default_catalog_path()
    if not p.is_file():
        raise ConfigError(Problem("--catalog", str(p), "price catalog not found",
                                  f"a JSON file like {default_catalog_path()}"))
    return _load_catalog_cached(str(p.resolve()), p.stat().st_mtime)


def _read_catalog(p: Path) -> Catalog:
    import pandas as pd
    import pandera.pandas as pa
    from pandera.errors import SchemaErrors

    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(Problem(str(p), None, f"not valid JSON: {e}")) from None
    problems: list[Problem] = []
    if not isinstance(doc, dict):
        raise DataError(Problem(str(p), None, "a catalog is a JSON object with instances and storage"))
    if doc.get("schema") != CATALOG_SCHEMA:
        problems.append(Problem(f"{p.name}: schema", doc.get("schema"), f"expected {CATALOG_SCHEMA!r}"))
    as_of = str(doc.get("as_of") or "")
    try:
        from datetime import date

        date.fromisoformat(as_of)
    except ValueError:
        problems.append(Problem(f"{p.name}: as_of", doc.get("as_of"), "a catalog must be dated (YYYY-MM-DD)",
                                "prices change: say when these were taken"))
    if str(doc.get("currency", "USD")).upper() != "USD":
        problems.append(Problem(f"{p.name}: currency", doc.get("currency"), "only USD catalogs are supported"))
    positive = pa.Check.gt(0)
    text = pa.Check.str_length(min_value=1)
    schemas = {
        "instances": pa.DataFrameSchema({
            "provider": pa.Column(str, text), "region": pa.Column(str, text), "instance_type": pa.Column(str, text),
            "on_demand_usd_per_hour": pa.Column(float, positive),
            "spot_usd_per_hour": pa.Column(float, positive, nullable=True, required=False),
        }, unique=["instance_type", "region"], report_duplicates="exclude_first"),
        "storage": pa.DataFrameSchema({
            "provider": pa.Column(str, text), "region": pa.Column(str, text), "storage_class": pa.Column(str, text),
            "usd_per_gb_month": pa.Column(float, pa.Check.ge(0)),
        }, unique=["provider", "region", "storage_class"], report_duplicates="exclude_first"),
    }
    frames: dict[str, Any] = {}
    for table, schema in schemas.items():
        rows = doc.get(table)
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            problems.append(Problem(f"{p.name}: {table}", None, "must be a list of objects"))
            continue
        df = pd.DataFrame(rows)
        for col in schema.columns:
            if col.endswith("_usd_per_hour") or col == "usd_per_gb_month":
                if col not in df.columns:
                    continue
                numbers = pd.to_numeric(df[col], errors="coerce")
                for idx in df.index[df[col].notna() & numbers.isna()]:
                    problems.append(Problem(f"{p.name}: {table}[{idx}].{col}", df.at[idx, col], "not a number"))
                df[col] = numbers.astype("float64")
        try:
            frames[table] = schema.validate(df, lazy=True)
        except SchemaErrors as e:
            seen = {(pr.key, "missing value") for pr in problems if pr.reason == "not a number"}
            for _, case in e.failure_cases.iterrows():
                idx, col, check = case.get("index"), case.get("column"), str(case.get("check"))
                if isinstance(idx, (int, float)) and not pd.isna(idx):
                    where = f"{table}[{int(idx)}]"
                else:
                    where = table
                if "unique" in check or "duplicate" in check:
                    key, value, reason = f"{p.name}: {where}", None, "duplicate of an earlier row (same " + \
                        ", ".join(schema.unique or []) + ")"
                else:
                    key = f"{p.name}: {where}" + (f".{col}" if isinstance(col, str) else "")
                    value, reason = jsonable(case.get("failure_case")), _reason(check)
                if (key, reason) not in seen:
                    seen.add((key, reason))
                    problems.append(Problem(key, value, reason))
    if problems:
        raise DataError(problems)
    return Catalog(str(p), as_of, str(doc.get("label") or p.stem), "USD", frames["instances"], frames["storage"])


def _reason(check: str) -> str:
    """pandera's check names in words."""
    for prefix, reason in (("greater_than_or_equal_to", "must be >= 0"), ("greater_than", "price must be > 0"),
                           ("str_length", "must not be empty"), ("column_in_dataframe", "required column missing"),
                           ("not_nullable", "missing value"), ("dtype", "wrong type")):
        if check.startswith(prefix):
            return reason
    return check
