"""report.html layout (issue 15): every Figures cell inside a 1280 px viewport in real headless Chromium,
the test-accuracy star inside the plot, and no planned window for a run that started early."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from greenstack.report.html import accuracy_axes, chosen_windows, started_early, write_report
from greenstack.report.tco import load_run
from tests.integration.test_report import CHROMIUM, RUNS, run_chromium

VIEWPORT = 1280
# Injected into a copy of the page: the bounding box of every Figures cell, after layout.
LAYOUT_SCRIPT = """<script>
window.addEventListener('load', function () {
  var rows = Array.prototype.slice.call(document.querySelectorAll('table#figures tr')).slice(1);
  var cells = [];
  rows.forEach(function (tr) {
    Array.prototype.slice.call(tr.cells).forEach(function (td, i) {
      var r = td.getBoundingClientRect();
      var range = document.createRange(); range.selectNodeContents(td);
      var c = range.getBoundingClientRect();  // the text itself, which may overflow its cell
      cells.push({key: tr.cells[0].textContent, col: i, left: r.left, right: r.right, width: r.width,
                  content_left: c.left, content_right: c.right, overflow: td.scrollWidth > td.clientWidth + 1});
    });
  });
  var out = {viewport: window.innerWidth, scroll_width: document.documentElement.scrollWidth, cells: cells};
  var pre = document.createElement('pre'); pre.id = 'greenstack-layout'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""

DECISIONS = [{"policy": "forecast_window", "action": "wait", "at": "2024-05-06T09:00:00+00:00",
              "inputs": {"duration_h": 2.0, "deadline": "2024-05-07T09:00:00+00:00", "objective": "mean",
                         "source": "electricitymaps:GB replayed 2023 (hour-of-week)",
                         "expected_g_per_kwh_by_hour": [round(180 + 7.5 * i, 2) for i in range(24)]},
              "choice": {"start": "2024-05-06T10:00:00+00:00", "start_offset_h": 1, "latest_start_h": 22},
              "expected_saving_pct": 21.7, "provenance": "estimated", "notes": []},
             {"policy": "forecast_window", "action": "start", "at": "2024-05-06T09:10:00+00:00",
              "inputs": {"reason": "started early: /very/long/run/dir/START_NOW exists", "planned_saving_pct": 21.7,
                         "window_used": False},
              "choice": {"start": "2024-05-06T09:10:00+00:00", "waited_s": 600.0},
              "expected_saving_pct": 0.0, "provenance": "estimated", "notes": []}]


@pytest.fixture
def chromium() -> str:
    import os

    if not CHROMIUM or not Path(CHROMIUM).is_file():
        if os.environ.get("CI"):
            pytest.fail("CI must install Chromium (bash tests/infra/chromium.sh) and export GREENSTACK_TEST_CHROMIUM")
        pytest.skip("no Chromium: run `bash tests/infra/chromium.sh` and export GREENSTACK_TEST_CHROMIUM")
    return CHROMIUM


def run_with_long_figures(tmp_path: Path) -> Path:
    """The fixture run plus the long values real runs report: a decision log (~1.5 kB of JSON), a long
    unbroken source string and a long path-like value."""
    run = tmp_path / "small"
    shutil.copytree(RUNS / "small", run)
    summary = json.loads((run / "sustainability.json").read_text())
    decisions = json.dumps(DECISIONS)
    assert len(decisions) > 700
    summary["metrics"].update({
        "scheduler/decisions": {"value": decisions, "unit": "json", "provenance": "estimated",
                                "source": "greenstack.policies.scheduler.forecast_window: every decision"},
        "scheduler/expected_saving_pct": {"value": 0.0, "unit": "%", "provenance": "estimated",
                                          "source": "greenstack.policies.scheduler.forecast_window: started early"},
        "carbon/intensity_g_per_kwh": {"value": 212.5, "unit": "gCO2eq/kWh", "provenance": "estimated",
                                       "source": "electricitymaps:GB_replayed_2023_hour-of-week_" + "x" * 180},
        "data/path": {"value": "/very/long/" + "nested-directory-name/" * 12 + "train.csv", "unit": "",
                      "provenance": "measured", "source": "config"},
    })
    (run / "sustainability.json").write_text(json.dumps(summary))
    return run


def test_every_figures_cell_is_inside_a_1280px_viewport(chromium, tmp_path):
    page = write_report(run_with_long_figures(tmp_path))
    probe = page.with_name("report.layout.html")
    probe.write_text(page.read_text(encoding="utf-8").replace("<head>", "<head>" + LAYOUT_SCRIPT, 1), encoding="utf-8")
    proc = run_chromium(chromium, f"--window-size={VIEWPORT},900", "--virtual-time-budget=15000", "--dump-dom",
                        probe.as_uri())
    match = re.search(r'<pre id="greenstack-layout">(.*?)</pre>', proc.stdout, re.S)
    assert match, f"page did not finish loading in Chromium: rc={proc.returncode}\n{proc.stderr[-2000:]}"
    layout = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert layout["viewport"] == VIEWPORT
    keys = {c["key"] for c in layout["cells"]}
    assert {"scheduler/decisions", "data/path", "carbon/intensity_g_per_kwh"} <= keys
    assert len(layout["cells"]) == 4 * len(keys)  # figure, value, provenance, source of every row
    outside = [c for c in layout["cells"] if c["left"] < 0 or c["right"] > layout["viewport"] or c["width"] <= 0
               or c["content_left"] < c["left"] - 1 or c["content_right"] > c["right"] + 1 or c["overflow"]]
    assert outside == [], outside
    assert layout["scroll_width"] <= layout["viewport"]  # nothing pushes the page sideways


def test_the_test_accuracy_star_is_inside_the_plot():
    fig, ax = accuracy_axes(load_run(RUNS / "small"))
    fig.canvas.draw()
    (star,) = [line for line in ax.get_lines() if line.get_label() == "test/accuracy"]
    x, y = ax.transData.transform((star.get_xdata()[0], star.get_ydata()[0]))
    box = ax.get_window_extent()
    radius_px = star.get_markersize() / 72 * fig.dpi / 2
    assert box.x0 + radius_px <= x <= box.x1 - radius_px and box.y0 + radius_px <= y <= box.y1 - radius_px


def test_a_run_started_early_shades_no_planned_window(tmp_path):
    run = run_with_long_figures(tmp_path)
    (run / "audit.jsonl").unlink()  # only the decision log in sustainability.json
    loaded = load_run(run)
    assert started_early(loaded) == "started early: /very/long/run/dir/START_NOW exists"
    assert chosen_windows(loaded) == []
    summary = json.loads((run / "sustainability.json").read_text())
    summary["metrics"].pop("scheduler/decisions")
    summary["metrics"]["scheduler/decisions"] = {"value": json.dumps(DECISIONS[:1]), "unit": "json",
                                                 "provenance": "estimated", "source": "waited"}
    (run / "sustainability.json").write_text(json.dumps(summary))
    assert started_early(load_run(run)) is None
