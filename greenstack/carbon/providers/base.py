"""Live carbon-intensity providers behind the IntensitySource interface, with a labelled fallback chain.

Chain: live API -> on-disk cache (fresh, then stale) -> shipped embedded trace -> static constant.
Why a chain: a training run must never stop because an API is down, rate-limited or returns garbage,
but the report must say which link answered, so every label names its stage and, for a fallback,
why the earlier links failed. Live history counts as "measured" (as for shipped traces), forecasts and
stale cache as "estimated", the static constant as "fallback".
"""

from __future__ import annotations

import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pandas as pd

from greenstack.carbon.providers.cache import DEFAULT_TTL_S, DiskCache
from greenstack.carbon.providers.http import (
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT_S,
    HttpClient,
    redact,
)
from greenstack.carbon.schema import validate_trace
from greenstack.carbon.sources import (
    HOUR_S,
    IntensityLookup,
    IntensitySource,
    SeriesSource,
    StaticSource,
    to_epoch_seconds,
)
from greenstack.errors import ConfigError, DataError, GreenstackError, Problem

log = logging.getLogger("greenstack.carbon.providers")

GLOBAL_AVERAGE_G_PER_KWH = 475.0  # world average grid intensity (IEA, ~2019): last-resort constant
PROVIDER_MAX_GAP_HOURS = 24.0 * 31  # history + forecast may leave a gap; SeriesSource labels it estimated
LIVE_RETRY_AFTER_S = 300.0  # after a live failure, do not hammer the API on every lookup


def iso_z(epoch_s: float) -> str:
    """Epoch seconds as 2024-03-01T12:00:00Z."""
    return pd.Timestamp(epoch_s, unit="s", tz="UTC").strftime("%Y-%m-%dT%H:%M:%SZ")


def history_chunks(start_s: float, end_s: float, now_s: float, *, lookback_s: float,
                   max_chunk_s: float) -> list[tuple[float, float]]:
    """[t, u) ranges covering the past part of [start_s, end_s) that a history endpoint can serve.

    The range ends at the next full hour after min(end, now), starts no earlier than `lookback_s`
    before that (providers keep a limited history), aligned to a UTC day so cached responses are
    reused, and is cut into pieces of at most `max_chunk_s` (the endpoint's range limit).
    """
    if start_s >= now_s:
        return []
    hi = float(pd.Timestamp(min(end_s, now_s), unit="s", tz="UTC").ceil("h").timestamp())
    lo = max(start_s, hi - lookback_s)
    t = float(pd.Timestamp(lo, unit="s", tz="UTC").floor("D").timestamp())
    chunks = []
    while t < hi:
        u = min(t + max_chunk_s, hi)
        chunks.append((t, u))
        t = u
    return chunks


def age_text(seconds: float) -> str:
    """A human age: 42 s, 12 min, 5.0 h, 3.2 d."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


@dataclass(frozen=True)
class ProviderRequest:
    """One API call: an endpoint kind ("history" / "forecast"), a path and query parameters."""

    endpoint: str
    path: str
    params: tuple[tuple[str, str], ...] = ()

    def key(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "path": self.path, "params": dict(self.params)}


class LiveProvider(ABC):
    """One live API: which calls cover a time window, and how to parse each response.

    Subclasses declare `name`, `base_url`, `key_env` (env vars holding credentials) and implement
    `requests_for` and `parse`. `parse` must return columns timestamp, carbon_intensity (g/kWh) and
    estimated, and raise DataError/ProviderError on anything unexpected ("garbage").
    """

    name: str = "provider"
    base_url: str = ""
    key_env: tuple[str, ...] = ()
    resolution_s: float = HOUR_S
    basis: str = "lca"

    def __init__(self, zone: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES,
                 backoff_s: float = 0.5, transport: httpx.BaseTransport | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        if not zone or not str(zone).strip():
            raise ConfigError(Problem("carbon.zone", zone, f"the {self.name} source needs a zone/region"))
        self.zone = str(zone).strip()
        self.env = os.environ if env is None else env
        self.client = HttpClient(self.base_url, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s,
                                 transport=transport, secrets=self.secrets(), provider=self.name)

    def secrets(self) -> list[str]:
        """Values that must never appear in logs or messages."""
        return [v for k in self.key_env if (v := self.env.get(k))]

    def missing_credentials(self) -> str | None:
        """Why live calls cannot be made (no key in the environment), or None."""
        return None

    @abstractmethod
    def requests_for(self, start_s: float, end_s: float, now_s: float) -> list[ProviderRequest]:
        """The calls that cover [start_s, end_s]: history for the past, forecast for the future."""

    @abstractmethod
    def parse(self, request: ProviderRequest, payload: Any) -> pd.DataFrame:
        """Response JSON -> DataFrame(timestamp, carbon_intensity g/kWh, estimated)."""

    def fetch(self, request: ProviderRequest) -> Any:
        """Perform one call (credentials added by the subclass via `headers`/`auth`)."""
        return self.client.get_json(request.path, params=dict(request.params), headers=self.headers(),
                                    auth=self.auth())

    def headers(self) -> dict[str, str] | None:
        return None

    def auth(self) -> tuple[str, str] | None:
        return None

    def label(self) -> str:
        return f"{self.name}:{self.zone}"


def shape_error(provider: str, what: str, payload: Any) -> DataError:
    """The DataError for a provider answer that is not the shape expected (with a short sample)."""
    sample = repr(payload)[:120]
    return DataError(Problem(f"{provider} response", sample, f"unexpected shape: {what}"))


def records_frame(rows: list[tuple[Any, Any, bool]], provider: str) -> pd.DataFrame:
    """(timestamp text, value, estimated) rows -> a frame; empty or non-numeric data is garbage."""
    if not rows:
        raise DataError(Problem(f"{provider} response", "[]", "no data points"))
    df = pd.DataFrame(rows, columns=["timestamp", "carbon_intensity", "estimated"])
    df["carbon_intensity"] = pd.to_numeric(df["carbon_intensity"], errors="coerce")
    if df["carbon_intensity"].isna().any():
        bad = df.loc[df["carbon_intensity"].isna(), "timestamp"].iloc[0]
        raise DataError(Problem(f"{provider} response", str(bad), "missing or non-numeric intensity"))
    df["estimated"] = df["estimated"].astype(int)
    return df


@dataclass
class _Resolved:
    source: IntensitySource
    stage: str  # live / cache / stale-cache / embedded / static
    label: str
    start_s: float
    end_s: float
    at_s: float


class ProviderSource(IntensitySource):
    """An IntensitySource backed by a LiveProvider with the fallback chain live -> cache -> embedded -> static.

    Nothing touches the network until the first lookup, so building it from config (validation, tests)
    is offline. Lookups within the fetched window are answered from memory until the cache TTL expires.
    """

    def __init__(self, provider: LiveProvider, *, cache: DiskCache | None = None,
                 fallback_zone: str | None = None, static_g_per_kwh: float | None = None,
                 clock: Callable[[], float] = time.time, window_pad_s: float = 6 * HOUR_S) -> None:
        self.provider = provider
        self.cache = cache or DiskCache(ttl_s=DEFAULT_TTL_S)
        self.fallback_zone = fallback_zone
        self.static_g_per_kwh = float(static_g_per_kwh if static_g_per_kwh is not None
                                      else GLOBAL_AVERAGE_G_PER_KWH)
        self.clock = clock
        self.window_pad_s = window_pad_s
        self.name = provider.label()
        self.zone = provider.zone
        self.resolution_s = provider.resolution_s
        self.alignment_s = 0.0
        self._resolved: _Resolved | None = None
        self._live_failed_at: float | None = None
        self.last_stage: str | None = None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "provider": self.provider.name, "cache_dir": str(self.cache.directory),
                "cache_ttl_s": self.cache.ttl_s, "fallback_zone": self.fallback_zone,
                "static_g_per_kwh": self.static_g_per_kwh}

    def series_at(self, times_utc: Any) -> IntensityLookup:
        t = to_epoch_seconds(times_utc)
        if len(t) == 0:
            return IntensityLookup(t, np.zeros(0), np.zeros(0), np.zeros(0, dtype="<U9"), "estimated", self.name)
        resolved = self.resolve(float(np.min(t)), float(np.max(t)))
        inner = resolved.source.series_at(t)
        return IntensityLookup(inner.times_s, inner.intensity_g_per_kwh, inner.renewable_percent,
                               inner.provenances, inner.provenance, resolved.label)

    # --- the chain -----------------------------------------------------------------------------

    def resolve(self, start_s: float, end_s: float) -> _Resolved:
        """The source answering [start_s, end_s], fetching through the chain only when needed."""
        now = self.clock()
        r = self._resolved
        if r is not None and r.start_s <= start_s and end_s <= r.end_s and now - r.at_s < self.cache.ttl_s:
            return r
        lo, hi = start_s - self.window_pad_s, end_s + self.window_pad_s
        notes: list[str] = []
        resolved = (self._from_provider(lo, hi, now, notes) or self._from_embedded(lo, hi, now, notes)
                    or self._static(lo, hi, now, notes))
        if resolved.stage not in ("live", "cache"):
            log.warning("carbon intensity: %s", resolved.label)
        self._resolved = resolved
        self.last_stage = resolved.stage
        return resolved

    def _from_provider(self, lo: float, hi: float, now: float, notes: list[str]) -> _Resolved | None:
        p = self.provider
        frames: list[pd.DataFrame] = []
        stages: list[str] = []
        ages: list[float] = []
        live_ok = True
        missing = p.missing_credentials()
        if missing:
            notes.append(f"live skipped: {missing}")
            live_ok = False
        elif self._live_failed_at is not None and now - self._live_failed_at < LIVE_RETRY_AFTER_S:
            notes.append(f"live skipped: failed {age_text(now - self._live_failed_at)} ago")
            live_ok = False
        for req in p.requests_for(lo, hi, now):
            key = req.key()
            entry = self.cache.get(p.name, p.zone, key, now=now)
            if entry is not None:
                try:
                    frames.append(_checked(p, req, p.parse(req, entry.payload)))
                    stages.append("cache")
                    ages.append(entry.age_s(now))
                    continue
                except GreenstackError:
                    pass  # a corrupt cache entry is ignored like a missing one
            if live_ok:
                try:
                    payload = p.fetch(req)
                    frame = _checked(p, req, p.parse(req, payload))  # garbage never reaches the cache
                    self.cache.put(p.name, p.zone, key, payload, now=now)
                    frames.append(frame)
                    stages.append("live")
                    continue
                except GreenstackError as err:
                    reason = redact(_short(err), p.secrets())
                    notes.append(f"live {req.endpoint} failed: {reason}")
                    self._live_failed_at = now
                    live_ok = False
            stale = self._stale(req, now)
            if stale is not None:
                frames.append(stale[0])
                stages.append("stale-cache")
                ages.append(stale[1])
        if not frames:
            if not notes:
                notes.append("no cached data")
            return None
        try:
            df = _merge(frames)
            covered = "estimated" if "stale-cache" in stages else "measured"
            source = SeriesSource(df, name=p.label(), zone=p.zone, covered_provenance=covered,
                                  label=p.label(), max_gap_hours=PROVIDER_MAX_GAP_HOURS)
        except GreenstackError as err:
            notes.append(f"provider data unusable: {_short(err)}")
            return None
        if "stale-cache" in stages:
            stage = "stale-cache"
            label = (f"{p.label()} stale cache ({age_text(max(ages))} old; "
                     f"{'; '.join(notes) or 'live unavailable'})")
        elif "cache" in stages:
            stage = "cache" if "live" not in stages else "live"
            label = f"{p.label()} {'live + ' if 'live' in stages else ''}cache ({age_text(max(ages))} old)"
        else:
            stage, label = "live", f"{p.label()} live@{iso_z(now)}"
        if p.basis != "lca":
            label += f" [{p.basis}]"
        return _Resolved(source, stage, label, lo, hi, now)

    def _stale(self, req: ProviderRequest, now: float) -> tuple[pd.DataFrame, float] | None:
        p = self.provider
        entry = self.cache.get(p.name, p.zone, req.key(), now=now, allow_stale=True)
        candidates = [entry] if entry is not None else []
        candidates += [e for e in self.cache.entries(p.name, p.zone)
                       if e.meta.get("request", {}).get("endpoint") == req.endpoint]
        for e in candidates:
            try:
                req_e = ProviderRequest(**{**e.meta["request"], "params": tuple(e.meta["request"]["params"].items())})
                return p.parse(req_e, e.payload), e.age_s(now)
            except (GreenstackError, KeyError, TypeError):
                continue
        return None

    def _from_embedded(self, lo: float, hi: float, now: float, notes: list[str]) -> _Resolved | None:
        if not self.fallback_zone:
            notes.append("no embedded trace for this zone")
            return None
        from greenstack.carbon.sources import make_source

        try:
            source = make_source("embedded", zone=self.fallback_zone)
        except ConfigError as err:
            notes.append(f"embedded fallback unavailable: {_short(err)}")
            return None
        label = f"fallback {source.name} ({self.provider.label()}: {'; '.join(notes)})"
        if self.provider.basis != "lca":
            label += f" [provider signal was {self.provider.basis}; fallback is average LCA]"
        return _Resolved(source, "embedded", label, lo, hi, now)

    def _static(self, lo: float, hi: float, now: float, notes: list[str]) -> _Resolved:
        source = StaticSource(self.static_g_per_kwh, zone=self.zone)
        label = f"fallback static {self.static_g_per_kwh:g} g/kWh ({self.provider.label()}: {'; '.join(notes)})"
        return _Resolved(source, "static", label, lo, hi, now)


def _checked(provider: LiveProvider, req: ProviderRequest, frame: pd.DataFrame) -> pd.DataFrame:
    """Schema-validate one response's rows (range, order, duplicates) before it is used or cached."""
    validate_trace(frame, f"{provider.name} {req.endpoint}", max_gap_hours=PROVIDER_MAX_GAP_HOURS)
    return frame


def _short(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text[:160]


def _merge(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate provider frames; on duplicate timestamps keep measured over forecast values."""
    df = pd.concat(frames, ignore_index=True)
    df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True, format="ISO8601")
    df = df.sort_values(["timestamp", "estimated"], kind="stable").drop_duplicates("timestamp", keep="first")
    return validate_trace(df.reset_index(drop=True), "provider data", max_gap_hours=PROVIDER_MAX_GAP_HOURS)
