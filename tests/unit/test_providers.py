"""Live providers against recorded responses: parsing, units, cache, retries, labelled fallbacks, secrets."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from greenstack.carbon.providers import (
    DiskCache,
    ElectricityMapsProvider,
    ProviderSource,
    UkGridProvider,
    WattTimeProvider,
    make_live_source,
)
from greenstack.errors import ConfigError

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "providers"
NOW = pd.Timestamp("2024-03-01T12:00Z").timestamp()
EM_KEY = "em-secret-key-0123456789"
WT_PASS = "wt-password-s3cr3t"


def fixture(name: str) -> dict:
    return json.loads((FIX / name).read_text())


class Recorder:
    """An httpx transport that replays recorded files by path and records every request."""

    def __init__(self, routes: dict[str, object]) -> None:
        self.routes = routes
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        for prefix, answer in self.routes.items():
            if prefix in request.url.path:
                if callable(answer):
                    return answer(request)
                if isinstance(answer, httpx.Response):
                    return answer
                return httpx.Response(200, json=fixture(answer))
        return httpx.Response(404, text="not found")

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)


def em_source(tmp_path, routes, *, env=None, ttl=3600.0, clock=lambda: NOW, fallback_zone="GB", retries=2):
    rec = Recorder(routes)
    provider = ElectricityMapsProvider("GB", transport=rec.transport(), backoff_s=0.001, retries=retries,
                                       env={"ELECTRICITYMAPS_API_KEY": EM_KEY} if env is None else env)
    src = ProviderSource(provider, cache=DiskCache(tmp_path / "cache", ttl_s=ttl), fallback_zone=fallback_zone,
                         clock=clock)
    return src, rec


EM_ROUTES = {"/carbon-intensity/history": "electricitymaps_history_GB.json",
             "/carbon-intensity/forecast": "electricitymaps_forecast_GB.json",
             "/carbon-intensity/past-range": "electricitymaps_past_range_GB.json"}


def test_electricitymaps_live_history_is_measured_and_forecast_estimated(tmp_path):
    src, rec = em_source(tmp_path, EM_ROUTES)
    hist = fixture("electricitymaps_history_GB.json")["history"]
    fc = fixture("electricitymaps_forecast_GB.json")["forecast"]
    look = src.series_at([NOW - 20 * 3600, NOW + 5 * 3600])
    assert look.intensity_g_per_kwh[0] == hist[4]["carbonIntensity"]
    assert look.intensity_g_per_kwh[1] == fc[5]["carbonIntensity"]
    assert list(look.provenances) == ["measured", "estimated"]
    assert look.source.startswith("electricitymaps:GB live@2024-03-01T12:00:00Z")
    assert all(r.headers["auth-token"] == EM_KEY for r in rec.requests)
    assert {r.url.path for r in rec.requests} == {"/v3/carbon-intensity/history", "/v3/carbon-intensity/forecast"}
    # a publisher-estimated hour is not "measured"
    assert src.series_at(NOW - 1.5 * 3600).provenance == "estimated"
    # repeated lookups in the window are answered from memory: no more calls
    n = len(rec.requests)
    src.series_at(np.linspace(NOW - 3600, NOW + 3600, 50))
    assert len(rec.requests) == n


def test_electricitymaps_past_range_for_older_windows(tmp_path):
    src, rec = em_source(tmp_path, EM_ROUTES)
    t = pd.Timestamp("2024-02-26T05:00Z")
    look = src.series_at(t)
    expected = next(i["carbonIntensity"] for i in fixture("electricitymaps_past_range_GB.json")["data"]
                    if i["datetime"].startswith("2024-02-26T05:00"))
    assert look.intensity_g_per_kwh[0] == expected and look.provenance == "measured"
    (req,) = rec.requests
    assert req.url.path.endswith("/past-range") and req.url.params["zone"] == "GB"
    assert req.url.params["start"].endswith("Z") and req.url.params["end"].endswith("Z")


def test_fresh_cache_avoids_the_network_and_stale_cache_is_labelled(tmp_path):
    src, _ = em_source(tmp_path, EM_ROUTES)
    src.series_at(NOW + 3600)
    down = {"/carbon": httpx.Response(503, text="down")}
    cached, rec = em_source(tmp_path, down)
    look = cached.series_at(NOW + 3600)
    assert rec.requests == [] and "cache" in look.source and cached.last_stage == "cache"
    later = NOW + 5 * 3600
    stale, rec = em_source(tmp_path, down, ttl=60, clock=lambda: later)
    look = stale.series_at(NOW + 6 * 3600)
    assert stale.last_stage == "stale-cache"
    assert "stale cache (5.0 h old" in look.source and "HTTP 503" in look.source
    assert look.provenance == "estimated"
    assert len(rec.requests) == 2  # 2 attempts at history; after that failure live is not tried again
    assert {r.url.path for r in rec.requests} == {"/v3/carbon-intensity/history"}


@pytest.mark.parametrize("garbage", [
    httpx.Response(200, text="<html>maintenance</html>"),
    httpx.Response(200, json={"zone": "GB", "unexpected": []}),
    httpx.Response(200, json={"zone": "GB", "history": [{"datetime": "2024-03-01T10:00:00.000Z",
                                                          "carbonIntensity": -50}]}),
    httpx.Response(200, json={"zone": "GB", "history": []}),
])
def test_garbage_from_the_provider_falls_back_to_the_embedded_trace(tmp_path, garbage):
    src, _ = em_source(tmp_path, {"/carbon": garbage})
    look = src.series_at(NOW - 3600)
    assert src.last_stage == "embedded"
    assert look.source.startswith("fallback electricitymaps:GB")
    assert "live history failed" in look.source and "replayed 2023" in src._resolved.source.series_at(NOW).source
    assert 20 < look.intensity_g_per_kwh[0] < 600
    assert not list((tmp_path / "cache").glob("*.json"))  # garbage is never cached


def test_static_is_the_last_resort_and_says_why(tmp_path):
    src, rec = em_source(tmp_path, {}, env={}, fallback_zone=None)
    look = src.series_at(NOW)
    assert rec.requests == []  # no key: live is not even attempted
    assert look.provenance == "fallback" and look.intensity_g_per_kwh[0] == 475.0
    assert "fallback static 475 g/kWh" in look.source and "no API key (set ELECTRICITYMAPS_API_KEY)" in look.source


def test_transient_errors_are_retried_with_backoff_then_succeed(tmp_path):
    calls = {"n": 0}

    def flaky(request):
        calls["n"] += 1
        if calls["n"] <= 2:
            return httpx.Response(503) if calls["n"] == 1 else httpx.Response(429)
        return httpx.Response(200, json=fixture("electricitymaps_history_GB.json"))

    src, rec = em_source(tmp_path, {"/carbon-intensity/history": flaky}, retries=3)
    look = src.series_at(NOW - 3 * 3600)
    assert calls["n"] == 3 and src.last_stage == "live" and look.provenance == "measured"


def test_timeouts_are_retried_then_fall_back(tmp_path):
    def slow(request):
        raise httpx.ReadTimeout("read timed out", request=request)

    src, rec = em_source(tmp_path, {"/carbon": slow}, retries=2)
    look = src.series_at(NOW - 3 * 3600)
    assert len(rec.requests) == 2 and src.last_stage == "embedded" and "timed out" in look.source


def test_api_key_never_appears_in_logs_or_errors(tmp_path, caplog):
    echo = {"/carbon": lambda r: httpx.Response(401, text=f"invalid token {r.headers['auth-token']}")}
    with caplog.at_level(logging.DEBUG):
        src, rec = em_source(tmp_path, echo, retries=3)
        look = src.series_at(NOW - 3600)
        with pytest.raises(Exception) as err:
            src.provider.fetch(src.provider.requests_for(NOW - 3600, NOW, NOW)[0])
    assert len(rec.requests) == 2  # 401 is not retried (one per attempt above)
    assert "HTTP 401" in look.source and "credentials" in look.source
    for text in (look.source, str(err.value), caplog.text):
        assert EM_KEY not in text
    assert "***" in str(err.value)


def test_watttime_login_bearer_token_and_unit_conversion(tmp_path, caplog):
    token = fixture("watttime_login.json")["token"]
    rec = Recorder({"/login": "watttime_login.json", "/v3/forecast": "watttime_forecast_CAISO_NORTH.json",
                    "/v3/historical": "watttime_historical_CAISO_NORTH.json"})
    env = {"WATTTIME_USERNAME": "greenstack-test", "WATTTIME_PASSWORD": WT_PASS}
    provider = WattTimeProvider("CAISO_NORTH", transport=rec.transport(), env=env, backoff_s=0.001)
    src = ProviderSource(provider, cache=DiskCache(tmp_path), fallback_zone="US-CAL-CISO", clock=lambda: NOW)
    with caplog.at_level(logging.DEBUG):
        look = src.series_at([NOW - 6 * 3600, NOW + 2 * 3600 + 600])
    login = rec.requests[0]
    assert login.url.path == "/login"
    assert login.headers["authorization"] == "Basic " + base64.b64encode(f"greenstack-test:{WT_PASS}".encode()).decode()
    assert all(r.headers["authorization"] == f"Bearer {token}" for r in rec.requests[1:])
    hist = fixture("watttime_historical_CAISO_NORTH.json")["data"]
    fc = fixture("watttime_forecast_CAISO_NORTH.json")["data"]
    assert look.intensity_g_per_kwh[0] == pytest.approx(hist[216]["value"] * 0.45359237)
    assert look.intensity_g_per_kwh[1] == pytest.approx(fc[26]["value"] * 0.45359237)
    assert list(look.provenances) == ["measured", "estimated"]
    assert "[marginal co2_moer]" in look.source and src.resolution_s == 300
    assert WT_PASS not in caplog.text and token not in caplog.text


def test_watttime_rejects_a_non_emission_signal(tmp_path):
    bad = fixture("watttime_forecast_CAISO_NORTH.json")
    bad["meta"]["units"] = "percentile"
    rec = Recorder({"/login": "watttime_login.json", "/v3/": httpx.Response(200, json=bad)})
    provider = WattTimeProvider("CAISO_NORTH", transport=rec.transport(), backoff_s=0.001,
                                env={"WATTTIME_USERNAME": "u", "WATTTIME_PASSWORD": WT_PASS})
    src = ProviderSource(provider, cache=DiskCache(tmp_path), fallback_zone="US-CAL-CISO", clock=lambda: NOW)
    look = src.series_at(NOW + 3600)
    assert src.last_stage == "embedded" and "percentile" in look.source


def test_ukgrid_actuals_measured_forecasts_estimated_half_hourly(tmp_path):
    rec = Recorder({"/fw48h": "ukgrid_fw48h.json", "/intensity/": "ukgrid_range.json"})
    src = ProviderSource(UkGridProvider("GB", transport=rec.transport()), cache=DiskCache(tmp_path),
                         fallback_zone="GB", clock=lambda: NOW)
    look = src.series_at([NOW - 12 * 3600 + 1800, NOW + 60, NOW + 3 * 3600])
    fw = fixture("ukgrid_fw48h.json")["data"]
    rng = fixture("ukgrid_range.json")["data"]
    assert look.intensity_g_per_kwh[0] == rng[49]["intensity"]["actual"]
    assert look.intensity_g_per_kwh[1] == fw[0]["intensity"]["actual"]
    assert look.intensity_g_per_kwh[2] == fw[6]["intensity"]["forecast"]
    assert list(look.provenances) == ["measured", "measured", "estimated"]
    assert "[direct (operational)]" in look.source
    paths = {r.url.path for r in rec.requests}
    assert paths == {"/intensity/2024-03-01T12:00Z/fw48h", "/intensity/2024-02-29T00:00Z/2024-03-01T12:00Z"}


def test_make_live_source_validates_config_offline():
    src = make_live_source("watttime", "CAISO_NORTH")
    assert src.fallback_zone == "US-CAL-CISO" and src.describe()["provider"] == "watttime"
    assert make_live_source("ukgrid").zone == "GB"
    with pytest.raises(ConfigError) as err:
        make_live_source("ukgrid", "FR", cache_ttl_s=0, timeout_s=-1)
    assert len(err.value.problems) == 3
    with pytest.raises(ConfigError, match="unknown live provider"):
        make_live_source("carbonfoo", "GB")


def test_disk_cache_ttl_and_corrupt_files(tmp_path):
    cache = DiskCache(tmp_path, ttl_s=10)
    cache.put("p", "Z", {"a": 1}, {"x": 1}, now=100.0)
    assert cache.get("p", "Z", {"a": 1}, now=105.0).payload == {"x": 1}
    assert cache.get("p", "Z", {"a": 1}, now=200.0) is None
    assert cache.get("p", "Z", {"a": 1}, now=200.0, allow_stale=True).age_s(200.0) == 100.0
    cache.path("p", "Z", {"a": 2}).write_text("{not json")
    assert cache.get("p", "Z", {"a": 2}, now=100.0) is None
    assert len(list(cache.entries("p", "Z"))) == 1


def test_history_chunks_cover_the_past_part_in_day_aligned_limited_pieces():
    from greenstack.carbon.providers.base import history_chunks

    day = 86400.0
    now = 100 * day + 5.5 * 3600  # 05:30 UTC on day 100
    chunks = history_chunks(90 * day + 7200, 200 * day, now, lookback_s=31 * day, max_chunk_s=3 * day)
    assert chunks[0][0] == 90 * day  # floored to the UTC day
    assert chunks[-1][1] == 100 * day + 6 * 3600  # up to the next full hour after now
    assert all(u - t <= 3 * day for t, u in chunks)
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:], strict=False))  # contiguous
    far = history_chunks(0.0, now, now, lookback_s=31 * day, max_chunk_s=40 * day)
    assert far[0][0] == 69 * day  # lookback limit (then day-aligned)
    assert history_chunks(now + 1, now + day, now, lookback_s=day, max_chunk_s=day) == []


@pytest.mark.parametrize("elsewhere", ["https://evil.example.com/v3/carbon-intensity/history",
                                       "https://api.electricitymap.org:8443/v3/carbon-intensity/history",
                                       "http://api.electricitymap.org/v3/carbon-intensity/history"])
def test_electricitymaps_key_never_follows_a_cross_origin_redirect(tmp_path, elsewhere):
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if str(request.url).startswith(elsewhere):
            return httpx.Response(200, json=fixture("electricitymaps_history_GB.json"))
        return httpx.Response(302, headers={"location": elsewhere})

    provider = ElectricityMapsProvider("GB", transport=httpx.MockTransport(handle), backoff_s=0.001, retries=1,
                                       env={"ELECTRICITYMAPS_API_KEY": EM_KEY})
    frame = provider.fetch(provider.requests_for(NOW - 3600, NOW, NOW)[0])
    assert len(frame) > 0 and len(seen) == 2
    assert seen[0].headers["auth-token"] == EM_KEY  # the provider's own origin gets the key
    assert all(EM_KEY not in f"{k}: {v}" for k, v in seen[1].headers.items())  # another origin never does
    assert EM_KEY not in str(seen[1].url)


def test_same_origin_redirect_keeps_credentials_and_watttime_basic_auth_stays_home(tmp_path):
    seen: list[httpx.Request] = []
    token = fixture("watttime_login.json")["token"]

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "elsewhere.example.net":
            return httpx.Response(200, json=fixture("watttime_login.json"))
        if request.url.path == "/login":  # same origin hop first, then off-site
            return httpx.Response(301, headers={"location": "/v3/login-moved"})
        return httpx.Response(302, headers={"location": "https://elsewhere.example.net/login"})

    env = {"WATTTIME_USERNAME": "greenstack-test", "WATTTIME_PASSWORD": WT_PASS}
    provider = WattTimeProvider("CAISO_NORTH", transport=httpx.MockTransport(handle), env=env, backoff_s=0.001)
    assert provider.login() == token
    assert [r.url.host for r in seen] == ["api.watttime.org", "api.watttime.org", "elsewhere.example.net"]
    assert seen[1].headers["authorization"].startswith("Basic ")  # same origin: still authenticated
    assert "authorization" not in seen[2].headers
    assert all(WT_PASS not in str(v) for v in seen[2].headers.values())
