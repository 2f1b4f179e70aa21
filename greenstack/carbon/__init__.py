"""Grid carbon intensity (shipped hourly traces, user CSVs, country averages) and emissions accounting.

Shipped data: Electricity Maps hourly traces (ODbL 1.0) and OWID/codecarbon country averages; see
data/LICENSE.md for attribution.
"""

from greenstack.carbon.accounting import (
    EmissionsResult,
    account_emissions,
    embodied_emissions_kg,
    project_total,
)
from greenstack.carbon.schema import trace_schema, validate_trace
from greenstack.carbon.sources import (
    CountryAverageSource,
    CsvTraceSource,
    EmbeddedTraceSource,
    IntensityLookup,
    IntensitySource,
    SeriesSource,
    StaticSource,
    make_source,
    to_epoch_seconds,
)
from greenstack.carbon.traces import available_zones, load_csv_trace, load_zone, zone_metadata

__all__ = [
    "CountryAverageSource",
    "CsvTraceSource",
    "EmbeddedTraceSource",
    "EmissionsResult",
    "IntensityLookup",
    "IntensitySource",
    "SeriesSource",
    "StaticSource",
    "account_emissions",
    "available_zones",
    "embodied_emissions_kg",
    "load_csv_trace",
    "load_zone",
    "make_source",
    "project_total",
    "to_epoch_seconds",
    "trace_schema",
    "validate_trace",
    "zone_metadata",
]
