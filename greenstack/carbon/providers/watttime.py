"""WattTime API v3: login token, /v3/historical and /v3/forecast of the marginal signal (co2_moer).

Docs: https://docs.watttime.org. Credentials from $WATTTIME_USERNAME / $WATTTIME_PASSWORD. WattTime
reports MOER in lbs CO2/MWh; it is converted to g/kWh (x 0.4536). MOER is the *marginal* emission
rate, not the average the other sources give, so its label says so.
"""

from __future__ import annotations

import time
from typing import Any

import pandas as pd

from greenstack.carbon.providers.base import (
    LiveProvider,
    ProviderRequest,
    history_chunks,
    iso_z,
    records_frame,
    shape_error,
)
from greenstack.carbon.providers.http import ProviderError
from greenstack.errors import DataError, Problem

LBS_PER_MWH_TO_G_PER_KWH = 0.45359237
HISTORICAL_MAX_S = 32 * 86400.0  # the API caps one historical request at 32 days
MAX_LOOKBACK_S = 31 * 86400.0
LOGIN_URL_PATH = "/login"
TOKEN_LIFETIME_S = 25 * 60  # tokens expire after 30 min
# WattTime region prefixes -> shipped Electricity Maps trace used as the embedded fallback.
REGION_TO_ZONE = {"CAISO": "US-CAL-CISO", "ERCOT": "US-TEX-ERCO", "PJM": "US-MIDA-PJM", "NYISO": "US-NY-NYIS",
                  "IESO": "CA-ON", "UK": "GB", "DE": "DE-LU"}
_UNIT_FACTORS = {"lbs_co2_per_mwh": LBS_PER_MWH_TO_G_PER_KWH, "kg_co2_per_mwh": 1.0, "g_co2_per_kwh": 1.0}


def embedded_zone_for(region: str) -> str | None:
    """The shipped zone closest to a WattTime region (by region prefix), if any."""
    head = str(region).upper().split("_")[0]
    return REGION_TO_ZONE.get(head)


class WattTimeProvider(LiveProvider):
    """Regions as WattTime spells them (CAISO_NORTH, PJM_DC, ERCOT_EASTTX, ...)."""

    name = "watttime"
    base_url = "https://api.watttime.org"
    key_env = ("WATTTIME_USERNAME", "WATTTIME_PASSWORD")
    resolution_s = 300.0
    basis = "marginal co2_moer"
    signal_type = "co2_moer"

    def __init__(self, zone: str, **kwargs: Any) -> None:
        self._token: str | None = None
        self._token_at = 0.0
        super().__init__(zone, **kwargs)

    def secrets(self) -> list[str]:
        return [v for v in (self.env.get("WATTTIME_PASSWORD"), self._token) if v]

    def missing_credentials(self) -> str | None:
        if self.env.get("WATTTIME_USERNAME") and self.env.get("WATTTIME_PASSWORD"):
            return None
        return "no credentials (set WATTTIME_USERNAME and WATTTIME_PASSWORD)"

    def login(self) -> str:
        """GET /login with HTTP basic auth -> bearer token (kept in memory, redacted everywhere)."""
        payload = self.client.get_json(LOGIN_URL_PATH, auth=(self.env.get("WATTTIME_USERNAME", ""),
                                                             self.env.get("WATTTIME_PASSWORD", "")))
        token = payload.get("token") if isinstance(payload, dict) else None
        if not isinstance(token, str) or not token:
            raise ProviderError("watttime: login response has no token")
        self.client.add_secret(token)
        self._token, self._token_at = token, time.time()
        return token

    def headers(self) -> dict[str, str] | None:
        fresh = self._token and time.time() - self._token_at < TOKEN_LIFETIME_S
        token = self._token if fresh else self.login()
        return {"Authorization": f"Bearer {token}"}

    def requests_for(self, start_s: float, end_s: float, now_s: float) -> list[ProviderRequest]:
        base = (("region", self.zone), ("signal_type", self.signal_type))
        out = [ProviderRequest("history", "/v3/historical", (*base, ("start", iso_z(t)), ("end", iso_z(u))))
               for t, u in history_chunks(start_s, end_s, now_s, lookback_s=MAX_LOOKBACK_S,
                                          max_chunk_s=HISTORICAL_MAX_S)]
        if end_s > now_s:
            out.append(ProviderRequest("forecast", "/v3/forecast", (*base, ("horizon_hours", "72"))))
        return out

    def parse(self, request: ProviderRequest, payload: Any) -> pd.DataFrame:
        if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
            raise shape_error(self.name, "expected {'data': [...], 'meta': {...}}", payload)
        meta = payload.get("meta") or {}
        units = str(meta.get("units", "lbs_co2_per_mwh")).lower()
        if units not in _UNIT_FACTORS:
            raise DataError(Problem("watttime.meta.units", units, "not an emission rate",
                                    f"expected one of {', '.join(_UNIT_FACTORS)}"))
        factor = _UNIT_FACTORS[units]
        rows = []
        for item in payload["data"]:
            if not isinstance(item, dict) or "point_time" not in item or "value" not in item:
                raise shape_error(self.name, "items need 'point_time' and 'value'", item)
            value = item["value"]
            value = value * factor if isinstance(value, (int, float)) else value
            rows.append((item["point_time"], value, request.endpoint == "forecast"))
        return records_frame(rows, self.name)
