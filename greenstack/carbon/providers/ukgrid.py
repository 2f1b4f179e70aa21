"""National Grid ESO carbon-intensity API for Great Britain (api.carbonintensity.org.uk, no key).

Half-hourly `intensity.actual` where measured, else `intensity.forecast` (labelled estimated);
/intensity/{from}/fw48h for the next 48 h, /intensity/{from}/{to} for history (14-day windows).
The API reports direct (operational) emissions, not life-cycle, so its label says so.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from greenstack.carbon.providers.base import (
    LiveProvider,
    ProviderRequest,
    history_chunks,
    records_frame,
    shape_error,
)

RANGE_MAX_S = 14 * 86400.0
MAX_LOOKBACK_S = 31 * 86400.0


def _uk_time(epoch_s: float) -> str:
    return pd.Timestamp(epoch_s, unit="s", tz="UTC").strftime("%Y-%m-%dT%H:%MZ")


class UkGridProvider(LiveProvider):
    """Zone GB only (the national series)."""

    name = "ukgrid"
    base_url = "https://api.carbonintensity.org.uk"
    resolution_s = 1800.0
    basis = "direct (operational)"

    def requests_for(self, start_s: float, end_s: float, now_s: float) -> list[ProviderRequest]:
        out = [ProviderRequest("history", f"/intensity/{_uk_time(t)}/{_uk_time(u)}")
               for t, u in history_chunks(start_s, end_s, now_s, lookback_s=MAX_LOOKBACK_S, max_chunk_s=RANGE_MAX_S)]
        if end_s > now_s:
            frm = float(pd.Timestamp(now_s, unit="s", tz="UTC").floor("h").timestamp())
            out.append(ProviderRequest("forecast", f"/intensity/{_uk_time(frm)}/fw48h"))
        return out

    def parse(self, request: ProviderRequest, payload: Any) -> pd.DataFrame:
        if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
            raise shape_error(self.name, "expected {'data': [...]}", payload)
        rows = []
        for item in payload["data"]:
            intensity = item.get("intensity") if isinstance(item, dict) else None
            if not isinstance(intensity, dict) or "from" not in item:
                raise shape_error(self.name, "items need 'from' and 'intensity'", item)
            actual = intensity.get("actual")
            value = actual if actual is not None else intensity.get("forecast")
            rows.append((item["from"], value, actual is None))
        return records_frame(rows, self.name)
