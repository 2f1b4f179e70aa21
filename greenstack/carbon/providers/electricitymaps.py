"""Electricity Maps API v3: carbon-intensity history, past-range and forecast (auth-token header).

Docs: https://static.electricitymaps.com/api/docs/index.html. Values are gCO2eq/kWh (life-cycle by
default). Key from $ELECTRICITYMAPS_API_KEY (or $ELECTRICITYMAPS_TOKEN).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from greenstack.carbon.providers.base import LiveProvider, ProviderRequest, iso_z, records_frame, shape_error

DAY_S = 86400.0
PAST_RANGE_MAX_S = 10 * DAY_S  # the API caps an hourly past-range request at 10 days
MAX_LOOKBACK_S = 31 * DAY_S
HISTORY_SPAN_S = 1.5 * DAY_S  # /history returns the last 24 h; lookups padded by a few hours still fit  # older windows are left to the embedded fallback/replay


class ElectricityMapsProvider(LiveProvider):
    """Zone ids as Electricity Maps spells them (GB, DE, US-CAL-CISO, ...)."""

    name = "electricitymaps"
    base_url = "https://api.electricitymap.org/v3"
    key_env = ("ELECTRICITYMAPS_API_KEY", "ELECTRICITYMAPS_TOKEN")

    def _key(self) -> str | None:
        return next((self.env[k] for k in self.key_env if self.env.get(k)), None)

    def missing_credentials(self) -> str | None:
        return None if self._key() else "no API key (set ELECTRICITYMAPS_API_KEY)"

    def headers(self) -> dict[str, str] | None:
        key = self._key()
        return {"auth-token": key} if key else None

    def requests_for(self, start_s: float, end_s: float, now_s: float) -> list[ProviderRequest]:
        zone = (("zone", self.zone),)
        out: list[ProviderRequest] = []
        if start_s < now_s:
            if now_s - start_s <= HISTORY_SPAN_S:
                out.append(ProviderRequest("history", "/carbon-intensity/history", zone))
            else:
                hi = min(end_s, now_s)
                lo = max(start_s, hi - MAX_LOOKBACK_S)
                lo = float(pd.Timestamp(lo, unit="s", tz="UTC").floor("D").timestamp())
                hi = float(pd.Timestamp(hi, unit="s", tz="UTC").ceil("h").timestamp())
                t = lo
                while t < hi:
                    u = min(t + PAST_RANGE_MAX_S, hi)
                    out.append(ProviderRequest("history", "/carbon-intensity/past-range",
                                               (*zone, ("start", iso_z(t)), ("end", iso_z(u)))))
                    t = u
        if end_s > now_s:
            out.append(ProviderRequest("forecast", "/carbon-intensity/forecast", zone))
        return out

    def parse(self, request: ProviderRequest, payload: Any) -> pd.DataFrame:
        if not isinstance(payload, dict):
            raise shape_error(self.name, "expected a JSON object", payload)
        list_key = {"forecast": "forecast"}.get(request.endpoint) or (
            "history" if "history" in payload else "data")
        items = payload.get(list_key)
        if not isinstance(items, list):
            raise shape_error(self.name, f"no '{list_key}' list", payload)
        rows = []
        for item in items:
            if not isinstance(item, dict) or "datetime" not in item or "carbonIntensity" not in item:
                raise shape_error(self.name, "items need 'datetime' and 'carbonIntensity'", item)
            estimated = request.endpoint == "forecast" or bool(item.get("isEstimated", False))
            rows.append((item["datetime"], item["carbonIntensity"], estimated))
        return records_frame(rows, self.name)
