"""Live carbon-intensity providers (Electricity Maps, WattTime, UK grid) behind `IntensitySource`.

`make_live_source(kind, zone, ...)` builds a `ProviderSource`: live API -> on-disk cache -> shipped
embedded trace -> static constant, every link labelled in the lookup's source string. Building one
is offline; the network is touched at the first lookup. Credentials come from environment variables
only and are never logged.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from greenstack.carbon.providers.base import (
    GLOBAL_AVERAGE_G_PER_KWH,
    LiveProvider,
    ProviderRequest,
    ProviderSource,
)
from greenstack.carbon.providers.cache import DEFAULT_TTL_S, DiskCache, default_cache_dir
from greenstack.carbon.providers.electricitymaps import ElectricityMapsProvider
from greenstack.carbon.providers.http import (
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT_S,
    HttpClient,
    ProviderError,
    redact,
)
from greenstack.carbon.providers.ukgrid import UkGridProvider
from greenstack.carbon.providers.watttime import WattTimeProvider, embedded_zone_for
from greenstack.errors import ConfigError, Problem

PROVIDERS: dict[str, type[LiveProvider]] = {
    "electricitymaps": ElectricityMapsProvider,
    "watttime": WattTimeProvider,
    "ukgrid": UkGridProvider,
}
PROVIDER_KINDS = tuple(PROVIDERS)


def default_fallback_zone(kind: str, zone: str) -> str | None:
    """The shipped trace (or country average) that stands in when the provider cannot answer."""
    from greenstack.carbon import traces
    from greenstack.carbon.sources import find_country

    if kind == "ukgrid":
        return "GB"
    if kind == "watttime":
        return embedded_zone_for(zone)
    if traces.find_zone(zone) is not None or find_country(zone.split("-")[0]) is not None:
        return zone if traces.find_zone(zone) is not None else zone.split("-")[0]
    return None


def make_live_source(kind: str, zone: str | None = None, *, cache_dir: str | Path | None = None,
                     cache_ttl_s: float = DEFAULT_TTL_S, timeout_s: float = DEFAULT_TIMEOUT_S,
                     retries: int = DEFAULT_RETRIES, fallback_zone: str | None = None,
                     fallback_g_per_kwh: float | None = None,
                     transport: httpx.BaseTransport | None = None) -> ProviderSource:
    """A live provider source from config values (no network here).

    kind: electricitymaps (zone: an Electricity Maps zone id), watttime (zone: a WattTime region such
    as CAISO_NORTH), ukgrid (zone: GB). fallback_zone defaults to the matching shipped trace;
    fallback_g_per_kwh (default: world average 475) is the last-resort constant.
    """
    kind_norm = str(kind).strip().lower()
    problems = []
    if kind_norm not in PROVIDERS:
        problems.append(Problem("carbon.kind", kind, "unknown live provider", f"one of {', '.join(PROVIDERS)}"))
    zone = zone or ("GB" if kind_norm == "ukgrid" else None)
    if not zone:
        problems.append(Problem("carbon.zone", zone, f"the {kind_norm} source needs a zone/region",
                                "e.g. carbon.zone=GB (electricitymaps) or carbon.zone=CAISO_NORTH (watttime)"))
    if kind_norm == "ukgrid" and zone and str(zone).upper() != "GB":
        problems.append(Problem("carbon.zone", zone, "the UK carbon-intensity API covers GB only",
                                "use carbon.zone=GB"))
    if not cache_ttl_s > 0:
        problems.append(Problem("carbon.cache_ttl_s", cache_ttl_s, "must be > 0 seconds"))
    if not timeout_s > 0:
        problems.append(Problem("carbon.timeout_s", timeout_s, "must be > 0 seconds"))
    if int(retries) < 1:
        problems.append(Problem("carbon.retries", retries, "must be >= 1"))
    if fallback_g_per_kwh is not None and not 0 <= float(fallback_g_per_kwh) <= 2000:
        problems.append(Problem("carbon.fallback_g_per_kwh", fallback_g_per_kwh, "must be in [0, 2000] g/kWh"))
    if problems:
        raise ConfigError(problems)
    assert zone is not None
    provider = PROVIDERS[kind_norm](str(zone).upper() if kind_norm == "ukgrid" else str(zone),
                                    timeout_s=timeout_s, retries=retries, transport=transport)
    return ProviderSource(provider, cache=DiskCache(cache_dir, ttl_s=cache_ttl_s),
                          fallback_zone=fallback_zone or default_fallback_zone(kind_norm, str(zone)),
                          static_g_per_kwh=fallback_g_per_kwh)


__all__ = ["DEFAULT_RETRIES", "DEFAULT_TIMEOUT_S", "DEFAULT_TTL_S", "GLOBAL_AVERAGE_G_PER_KWH", "PROVIDERS",
           "PROVIDER_KINDS", "DiskCache", "ElectricityMapsProvider", "HttpClient", "LiveProvider",
           "ProviderError", "ProviderRequest", "ProviderSource", "UkGridProvider", "WattTimeProvider",
           "default_cache_dir", "default_fallback_zone", "make_live_source", "redact"]
