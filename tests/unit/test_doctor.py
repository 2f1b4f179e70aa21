"""`greenstack doctor` reports live carbon providers whose credentials are set, without their secrets."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from greenstack.cli import doctor

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "providers"
KEY = "em-doctor-secret-0123456789"
PASSWORD = "wt-doctor-pass-987654"


def _answer(request: httpx.Request) -> httpx.Response:
    if request.url.host == "api.watttime.org":
        return httpx.Response(403, text=f"bad password for {request.headers.get('authorization')}")
    if request.headers.get("auth-token") == KEY:
        return httpx.Response(200, json=json.loads((FIX / "electricitymaps_history_GB.json").read_text()))
    return httpx.Response(401, text=f"invalid token {request.headers.get('auth-token')}")


def test_providers_with_keys_are_called_and_reported_without_the_key(capsys, monkeypatch):
    env = {"ELECTRICITYMAPS_API_KEY": KEY, "WATTTIME_USERNAME": "me", "WATTTIME_PASSWORD": PASSWORD}
    report = {p["name"]: p for p in doctor.probe_live_providers("GB", env=env, transport=httpx.MockTransport(_answer))}
    assert report["electricitymaps"]["key_present"] and report["electricitymaps"]["ok"]
    wt = report["watttime"]
    assert wt["key_present"] and wt["checked"] and not wt["ok"] and "HTTP 403" in wt["error"]
    assert report["ukgrid"]["checked"] is False and "no key" in report["ukgrid"]["note"]
    assert KEY not in json.dumps(report) and PASSWORD not in json.dumps(report)

    wrong = doctor.probe_live_providers("GB", env={"ELECTRICITYMAPS_API_KEY": "wrong-key-1234"},
                                        transport=httpx.MockTransport(_answer))
    em = {p["name"]: p for p in wrong}["electricitymaps"]
    assert not em["ok"] and "HTTP 401" in em["error"] and "wrong-key-1234" not in em["error"]


def test_unset_keys_are_not_called_and_unreachable_hosts_are_named(capsys, monkeypatch):
    calls: list[httpx.Request] = []

    def down(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectError("name resolution failed", request=request)

    none = doctor.probe_live_providers("GB", env={}, transport=httpx.MockTransport(down))
    assert calls == [] and all(p["checked"] is False for p in none)
    assert {p["name"]: p["key_present"] for p in none} == {"electricitymaps": False, "watttime": False,
                                                          "ukgrid": None}
    monkeypatch.setenv("ELECTRICITYMAPS_API_KEY", KEY)
    monkeypatch.setattr(doctor, "probe_live_providers",
                        lambda zone, env=None, transport=None, _real=doctor.probe_live_providers:
                        _real(zone, transport=httpx.MockTransport(down)))
    assert doctor.run_doctor(["--zone", "GB"]) == 0
    out = capsys.readouterr().out
    assert "live electricitymaps: key set but the call failed" in out and "ConnectError" in out
    assert "live watttime: not checked" in out and KEY not in out
