"""Live API calls: run only with credentials in the environment (marker `network`)."""

from __future__ import annotations

import os
import time

import pytest

from greenstack.carbon.providers import make_live_source

pytestmark = pytest.mark.network


@pytest.mark.skipif(not os.environ.get("ELECTRICITYMAPS_API_KEY"), reason="needs ELECTRICITYMAPS_API_KEY")
def test_electricitymaps_live(tmp_path):
    src = make_live_source("electricitymaps", "DE", cache_dir=tmp_path)
    look = src.series_at(time.time() - 3 * 3600)
    assert src.last_stage == "live" and 0 < look.intensity_g_per_kwh[0] < 2000


@pytest.mark.skipif(not (os.environ.get("WATTTIME_USERNAME") and os.environ.get("WATTTIME_PASSWORD")),
                    reason="needs WATTTIME_USERNAME and WATTTIME_PASSWORD")
def test_watttime_live(tmp_path):
    src = make_live_source("watttime", "CAISO_NORTH", cache_dir=tmp_path)
    look = src.series_at(time.time() + 3600)
    assert src.last_stage == "live" and 0 < look.intensity_g_per_kwh[0] < 2000


@pytest.mark.skipif(os.environ.get("GREENSTACK_NETWORK_TESTS") != "1",
                    reason="the UK API needs no key; opt in with GREENSTACK_NETWORK_TESTS=1")
def test_ukgrid_live(tmp_path):
    src = make_live_source("ukgrid", "GB", cache_dir=tmp_path)
    look = src.series_at(time.time() + 3600)
    assert src.last_stage == "live" and 0 < look.intensity_g_per_kwh[0] < 1000
