"""Build greenstack's shipped carbon data from the raw public copies in /work/shared/data.

Why a build step: the raw Electricity Maps exports are ~30 MB of per-year CSVs with repeated text
columns; the package ships one compact gzip CSV per zone (UTC timestamps, 2-decimal values) plus a
small country table, so that carbon accounting works offline and without the shared data folder.

Usage:  python tools/build_carbon_data.py [--src /work/shared/data] [--dst greenstack/carbon/data]

Output (deterministic: gzip mtime is fixed, so rebuilding unchanged inputs gives identical bytes):
  traces/<ZONE>.csv.gz      timestamp, carbon_intensity (LCA), carbon_intensity_direct,
                            renewable_percent, low_carbon_percent, estimated (0/1)
  zones.json                per-zone metadata (name, country ISO-3, approximate lat/lon, coverage)
  country_intensity.json    {ISO3: {name, iso2, carbon_intensity, renewable_percent, year}}

`carbon_intensity` is the life-cycle (LCA) figure because that is the number Electricity Maps
headlines on its map and API; the direct (combustion-only) figure is kept as a second column.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SRC = Path("/work/shared/data")
DEFAULT_DST = REPO / "greenstack" / "carbon" / "data"

# Raw export column -> shipped column.
EM_COLUMNS = {
    "Carbon Intensity gCO₂eq/kWh (LCA)": "carbon_intensity",
    "Carbon Intensity gCO₂eq/kWh (direct)": "carbon_intensity_direct",
    "Renewable Percentage": "renewable_percent",
    "Low Carbon Percentage": "low_carbon_percent",
}

# Zone metadata the exports do not carry. lat/lon is an APPROXIMATE representative point (the main
# load centre of the zone, to about half a degree), good enough for distance/latency heuristics only.
ZONE_META: dict[str, dict] = {
    "AU-NSW": {"name": "New South Wales (Australia)", "country_iso3": "AUS", "lat": -33.9, "lon": 151.0,
               "timezone": "Australia/Sydney"},
    "BR-SP": {"name": "São Paulo / Central Brazil", "country_iso3": "BRA", "lat": -23.5, "lon": -46.6,
              "timezone": "America/Sao_Paulo",
              "note": "the redistributed export is Electricity Maps zone BR-CS (Central Brazil), "
                      "which contains São Paulo"},
    "CA-ON": {"name": "Ontario (Canada)", "country_iso3": "CAN", "lat": 43.7, "lon": -79.4,
              "timezone": "America/Toronto"},
    "DE-LU": {"name": "Germany (DE-LU bidding zone)", "country_iso3": "DEU", "lat": 51.0, "lon": 10.0,
              "timezone": "Europe/Berlin",
              "note": "the redistributed export is Electricity Maps zone DE (Germany)"},
    "GB": {"name": "Great Britain", "country_iso3": "GBR", "lat": 52.5, "lon": -1.5,
           "timezone": "Europe/London"},
    "IN-WE": {"name": "Western India", "country_iso3": "IND", "lat": 19.1, "lon": 72.9,
              "timezone": "Asia/Kolkata"},
    "JP-TK": {"name": "Tokyo area (Japan)", "country_iso3": "JPN", "lat": 35.7, "lon": 139.7,
              "timezone": "Asia/Tokyo"},
    "SG": {"name": "Singapore", "country_iso3": "SGP", "lat": 1.35, "lon": 103.8,
           "timezone": "Asia/Singapore"},
    "US-CAL-CISO": {"name": "California (CAISO)", "country_iso3": "USA", "lat": 37.0, "lon": -120.0,
                    "timezone": "America/Los_Angeles"},
    "US-MIDA-PJM": {"name": "Mid-Atlantic (PJM Interconnection)", "country_iso3": "USA", "lat": 39.5,
                    "lon": -78.0, "timezone": "America/New_York"},
    "US-NY-NYIS": {"name": "New York (NYISO)", "country_iso3": "USA", "lat": 42.2, "lon": -75.0,
                   "timezone": "America/New_York"},
    "US-TEX-ERCO": {"name": "Texas (ERCOT)", "country_iso3": "USA", "lat": 31.0, "lon": -97.5,
                    "timezone": "America/Chicago"},
}

# ISO 3166-1 alpha-3 -> alpha-2 for the countries in global_energy_mix.json, so that users can name a
# country the way Electricity Maps zone ids do ("FR", "DE").
_ISO_PAIRS = """
ABW:AW AFG:AF AGO:AO ALB:AL ARE:AE ARG:AR ARM:AM ASM:AS ATG:AG AUS:AU AUT:AT AZE:AZ BDI:BI BEL:BE
BEN:BJ BFA:BF BGD:BD BGR:BG BHR:BH BHS:BS BIH:BA BLR:BY BLZ:BZ BMU:BM BOL:BO BRA:BR BRB:BB BRN:BN
BTN:BT BWA:BW CAF:CF CAN:CA CHE:CH CHL:CL CHN:CN CIV:CI CMR:CM COD:CD COG:CG COK:CK COL:CO COM:KM
CPV:CV CRI:CR CUB:CU CYM:KY CYP:CY CZE:CZ DEU:DE DJI:DJ DMA:DM DNK:DK DOM:DO DZA:DZ ECU:EC EGY:EG
ERI:ER ESH:EH ESP:ES EST:EE ETH:ET FIN:FI FJI:FJ FLK:FK FRA:FR FRO:FO GAB:GA GBR:GB GEO:GE GHA:GH
GIB:GI GIN:GN GLP:GP GMB:GM GNB:GW GNQ:GQ GRC:GR GRD:GD GRL:GL GTM:GT GUF:GF GUM:GU GUY:GY HKG:HK
HND:HN HRV:HR HTI:HT HUN:HU IDN:ID IND:IN IRL:IE IRN:IR IRQ:IQ ISL:IS ISR:IL ITA:IT JAM:JM JOR:JO
JPN:JP KAZ:KZ KEN:KE KGZ:KG KHM:KH KIR:KI KNA:KN KOR:KR KWT:KW LAO:LA LBN:LB LBR:LR LBY:LY LCA:LC
LKA:LK LSO:LS LTU:LT LUX:LU LVA:LV MAC:MO MAR:MA MDA:MD MDG:MG MDV:MV MEX:MX MKD:MK MLI:ML MLT:MT
MMR:MM MNE:ME MNG:MN MOZ:MZ MRT:MR MSR:MS MTQ:MQ MUS:MU MWI:MW MYS:MY NAM:NA NCL:NC NER:NE NGA:NG
NIC:NI NLD:NL NOR:NO NPL:NP NRU:NR NZL:NZ OMN:OM PAK:PK PAN:PA PER:PE PHL:PH PNG:PG POL:PL PRI:PR
PRK:KP PRT:PT PRY:PY PSE:PS PYF:PF QAT:QA REU:RE ROU:RO RUS:RU RWA:RW SAU:SA SDN:SD SEN:SN SGP:SG
SHN:SH SLB:SB SLE:SL SLV:SV SOM:SO SPM:PM SRB:RS SSD:SS STP:ST SUR:SR SVK:SK SVN:SI SWE:SE SWZ:SZ
SYC:SC SYR:SY TCA:TC TCD:TD TGO:TG THA:TH TJK:TJ TKM:TM TLS:TL TON:TO TTO:TT TUN:TN TUR:TR TWN:TW
TZA:TZ UGA:UG UKR:UA URY:UY USA:US UZB:UZ VCT:VC VEN:VE VGB:VG VIR:VI VNM:VN VUT:VU WSM:WS YEM:YE
ZAF:ZA ZMB:ZM ZWE:ZW
"""
ISO3_TO_ISO2 = dict(pair.split(":") for pair in _ISO_PAIRS.split())


def read_zone(zone_dir: Path) -> tuple[pd.DataFrame, dict]:
    """Concatenate a zone's yearly exports into the shipped columns, checking they are gap-free."""
    files = sorted(zone_dir.glob(f"{zone_dir.name}_*_hourly.csv"))
    if not files:
        raise SystemExit(f"no <ZONE>_<YEAR>_hourly.csv files in {zone_dir}")
    raw = pd.concat([pd.read_csv(f, encoding="utf-8") for f in files], ignore_index=True)
    out = pd.DataFrame({"timestamp": pd.to_datetime(raw["Datetime (UTC)"], format="%Y-%m-%d %H:%M:%S",
                                                    utc=True)})
    for src, dst in EM_COLUMNS.items():
        out[dst] = pd.to_numeric(raw[src], errors="raise").astype("float64").round(2)
    flag = raw["Data Estimated"].astype(str).str.strip().str.lower()
    if not flag.isin(["true", "false"]).all():
        raise SystemExit(f"{zone_dir.name}: unexpected 'Data Estimated' values {sorted(flag.unique())}")
    out["estimated"] = (flag == "true").astype("int8")
    out = out.sort_values("timestamp", kind="stable").reset_index(drop=True)

    step = out["timestamp"].diff().dropna()
    if out["timestamp"].duplicated().any() or (step != pd.Timedelta(hours=1)).any():
        raise SystemExit(f"{zone_dir.name}: trace is not strictly hourly without gaps")

    first = raw.iloc[0]
    info = {
        "publisher_zone_id": str(first["Zone Id"]),
        "publisher_zone_name": str(first["Zone Name"]),
        "publisher_country": str(first["Country"]),
        "years": sorted({int(y) for y in out["timestamp"].dt.year.unique()}),
        "start": out["timestamp"].iloc[0].strftime("%Y-%m-%dT%H:%M:%SZ"),
        "end": out["timestamp"].iloc[-1].strftime("%Y-%m-%dT%H:%M:%SZ"),
        "rows": len(out),
        "resolution_s": 3600,
        "estimated_fraction": round(float(out["estimated"].mean()), 4),
        "mean_carbon_intensity": round(float(out["carbon_intensity"].mean()), 2),
    }
    return out, info


def write_trace(df: pd.DataFrame, path: Path) -> None:
    """Write one zone as gzip CSV with ISO-8601 'Z' timestamps (byte-for-byte reproducible)."""
    text = df.assign(timestamp=df["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%SZ"))
    text.to_csv(path, index=False, float_format="%.2f", lineterminator="\n",
                compression={"method": "gzip", "compresslevel": 9, "mtime": 0})


def build_countries(src: Path) -> dict[str, dict]:
    """Annual country intensities (codecarbon's OWID extract) reduced to what greenstack uses."""
    mix = json.loads(src.read_text(encoding="utf-8"))
    missing = sorted(set(mix) - set(ISO3_TO_ISO2))
    if missing:
        raise SystemExit(f"no ISO-2 code known for {missing}; extend ISO3_TO_ISO2")
    out: dict[str, dict] = {}
    for iso3 in sorted(mix):
        row = mix[iso3]
        total = float(row.get("total_TWh") or 0.0)
        renewable = round(100.0 * float(row["renewables_TWh"]) / total, 2) if total > 0 else None
        out[iso3] = {
            "name": row["country_name"],
            "iso2": ISO3_TO_ISO2[iso3],
            "carbon_intensity": round(float(row["carbon_intensity"]), 3),
            "renewable_percent": renewable,
            "year": int(row["year"]),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC, help="shared data root")
    parser.add_argument("--dst", type=Path, default=DEFAULT_DST, help="greenstack/carbon/data")
    args = parser.parse_args(argv)

    em_root = args.src / "carbon" / "electricitymaps"
    traces_dir = args.dst / "traces"
    traces_dir.mkdir(parents=True, exist_ok=True)
    zones: dict[str, dict] = {}
    for zone_dir in sorted(p for p in em_root.iterdir() if p.is_dir()):
        zone = zone_dir.name
        if zone not in ZONE_META:
            raise SystemExit(f"{zone}: add its metadata to ZONE_META first")
        df, info = read_zone(zone_dir)
        write_trace(df, traces_dir / f"{zone}.csv.gz")
        aliases = [info["publisher_zone_id"]] if info["publisher_zone_id"] != zone else []
        zones[zone] = {**ZONE_META[zone], "location_approximate": True, "aliases": aliases, **info,
                       "file": f"traces/{zone}.csv.gz"}
        print(f"{zone:12s} {len(df):6d} rows  {info['years']}  "
              f"{(traces_dir / f'{zone}.csv.gz').stat().st_size / 1e3:7.1f} kB", file=sys.stderr)

    meta = {
        "_about": "Hourly grid carbon intensity traces shipped with greenstack; see LICENSE.md. "
                  "lat/lon are approximate representative points (load centres), not zone centroids.",
        "zones": zones,
    }
    (args.dst / "zones.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n",
                                         encoding="utf-8")
    countries = build_countries(args.src / "carbon" / "global_energy_mix.json")
    (args.dst / "country_intensity.json").write_text(
        json.dumps(countries, indent=0, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
    total = sum(p.stat().st_size for p in args.dst.rglob("*") if p.is_file())
    print(f"{len(zones)} zones, {len(countries)} countries, {total / 1e6:.2f} MB in {args.dst}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
