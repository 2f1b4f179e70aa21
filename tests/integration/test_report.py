"""report.html (self-contained, PNG plots) in a real headless Chromium; `report compare` with its Pareto plot.

The browser tests need Debian's chromium (tests/infra/chromium.sh, run by .ci/run, which exports
GREENSTACK_TEST_CHROMIUM). Locally they skip without it; in CI (CI set) a missing browser is a failure.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from greenstack.report.html import (
    PLOTS,
    accuracy_points,
    chosen_windows,
    log_plots_to_wandb,
    power_series,
    render_plots,
    write_report,
)
from greenstack.report.tco import load_run
from tests.conftest import FAST

RUNS = Path(__file__).resolve().parents[1] / "fixtures" / "runs"
CHROMIUM = os.environ.get("GREENSTACK_TEST_CHROMIUM")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
         "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]
# Injected into a copy of the page: records script and resource errors, then reports on every <img>.
CHECK_SCRIPT = """<script>
window.__errors = [];
window.onerror = function (msg) { window.__errors.push('script: ' + msg); };
window.addEventListener('error', function (e) {
  if (e.target && e.target.tagName) window.__errors.push('resource: ' + e.target.tagName + ' ' + (e.target.alt || ''));
}, true);
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var out = {images: imgs.length, errors: window.__errors,
             broken: imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).map(function (i) { return i.alt; }),
             sizes: imgs.map(function (i) { return [i.naturalWidth, i.naturalHeight]; })};
  var pre = document.createElement('pre'); pre.id = 'greenstack-check'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


@pytest.fixture
def chromium() -> str:
    if not CHROMIUM or not Path(CHROMIUM).is_file():
        if os.environ.get("CI"):
            pytest.fail("CI must install Chromium (bash tests/infra/chromium.sh) and export GREENSTACK_TEST_CHROMIUM")
        pytest.skip("no Chromium: run `bash tests/infra/chromium.sh` and export GREENSTACK_TEST_CHROMIUM")
    return CHROMIUM


def run_chromium(binary: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="greenstack-chromium-") as profile:
        return subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                              timeout=180)


def browser_check(binary: str, page: Path) -> dict:
    """Open `page` (with the check script injected) and return what the page reported."""
    text = page.read_text(encoding="utf-8")
    probe = page.with_name(page.stem + ".probe.html")
    probe.write_text(text.replace("<head>", "<head>" + CHECK_SCRIPT, 1), encoding="utf-8")
    proc = run_chromium(binary, "--virtual-time-budget=15000", "--dump-dom", probe.as_uri())
    match = re.search(r'<pre id="greenstack-check">(.*?)</pre>', proc.stdout, re.S)
    assert match, f"page did not finish loading in Chromium: rc={proc.returncode}\n{proc.stderr[-2000:]}"
    report = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    report["console_errors"] = [line for line in proc.stderr.splitlines() if "Uncaught" in line]
    return report


@pytest.fixture
def run_copy(tmp_path) -> Path:
    run = tmp_path / "small"
    shutil.copytree(RUNS / "small", run)
    return run


def decode_images(html_text: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(data)))
            for data in re.findall(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html_text)]


def colour_share(image: Image.Image, rgb: tuple[int, int, int], tol: int = 12) -> float:
    pixels = np.asarray(image.convert("RGB")).astype(int)
    return float((np.abs(pixels - np.array(rgb)).max(axis=2) <= tol).mean())


def green_share(image: Image.Image) -> float:
    """Share of pixels tinted by the window's green shading (over white or over the run's blue span)."""
    rgb = np.asarray(image.convert("RGB")).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return float(((g - r >= 20) & (g - b >= 8) & (g < 250)).mean())


# -- the page ------------------------------------------------------------------------------------
def test_report_is_self_contained_with_four_png_plots(run_copy):
    out = write_report(run_copy)
    assert out == run_copy / "report.html"
    text = out.read_text()
    assert not re.search(r'(src|href)="(?!data:)', text), "report must not reference external files"
    assert "<script" not in text
    images = decode_images(text)
    assert len(images) == 4
    assert all(im.format == "PNG" and im.size[0] >= 600 and im.size[1] >= 300 for im in images)
    assert sorted(p.name for p in (run_copy / "plots").iterdir()) == sorted(f"{n}.png" for n in PLOTS)
    assert "hash chain verified: 3 records" in text
    assert "fixture meter" in text and ">measured<" in text  # figures carry source and provenance


def test_plot_data_comes_from_the_run_files():
    run = load_run(RUNS / "small")
    times, watts = power_series(run)
    seconds = [(b - a).total_seconds() for a, b in zip(times, times[1:], strict=False)]
    energy_kwh = sum(w * s for w, s in zip(watts, seconds, strict=False)) / 3.6e6
    assert energy_kwh == pytest.approx(6.25, rel=1e-6)  # the power curve integrates to the run's energy
    points = accuracy_points(run)
    assert [p[0] for p in points] == ["val"] * 4 + ["test"]
    assert points[-1] == ("test", 2.5, 0.91)
    assert all(a[1] < b[1] for a, b in zip(points[:4], points[1:4], strict=False))  # emissions grow


def test_chosen_window_is_shaded_only_when_a_scheduler_decided_one():
    small, baseline = load_run(RUNS / "small"), load_run(RUNS / "baseline")
    (window,) = chosen_windows(small)
    assert (window["start"].hour, window["end"].hour, window["origin"]) == (10, 12, "audit #1 (schedule)")
    assert chosen_windows(baseline) == []
    with_window = Image.open(io.BytesIO(render_plots(small)["intensity"]))
    without = Image.open(io.BytesIO(render_plots(baseline)["intensity"]))
    assert green_share(with_window) > 0.05  # the shaded window covers a good part of the plot
    assert green_share(without) < 0.002


def test_scheduler_decision_in_the_audit_log_gives_the_window(tmp_path):
    from greenstack.ledger.audit import AuditLog

    run = tmp_path / "run"
    shutil.copytree(RUNS / "baseline", run)
    log = AuditLog(run / "audit.jsonl")
    log.append("schedule", {"policy": "immediate", "action": "start_now", "choice": {"start": "2024-05-06T10:00Z"}})
    assert chosen_windows(load_run(run)) == []  # no planned duration: no window to shade
    log.append("schedule", {"policy": "forecast_window", "action": "wait", "inputs": {"duration_h": 3.0},
                            "choice": {"start": "2024-05-06T13:00:00+00:00", "start_offset_h": 3}})
    (window,) = chosen_windows(load_run(run))
    assert (window["start"].hour, window["end"].hour) == (13, 16)


def test_report_in_headless_chromium(chromium, run_copy, tmp_path):
    page = write_report(run_copy)
    report = browser_check(chromium, page)
    assert report["images"] == 4, report
    assert report["broken"] == [] and report["errors"] == [] and report["console_errors"] == []
    assert all(w >= 600 and h >= 300 for w, h in report["sizes"])
    shot = tmp_path / "report.png"
    proc = run_chromium(chromium, f"--screenshot={shot}", "--window-size=1100,2600", "--virtual-time-budget=15000",
                        page.as_uri())
    assert shot.is_file(), proc.stderr[-2000:]
    image = Image.open(shot)
    assert image.size == (1100, 2600)
    assert colour_share(image, (9, 105, 218), tol=30) > 0.0005  # the power plot's blue made it to the screen
    assert np.asarray(image.convert("L")).std() > 10  # not a blank page


def test_browser_check_catches_broken_images_and_script_errors(chromium, tmp_path):
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><head><title>x</title></head><body>'
                    '<img alt="bad" src="data:image/png;base64,AAAA"><script>undefinedFunction();</script></body></html>')
    report = browser_check(chromium, page)
    assert report["broken"] == ["bad"]
    assert any("undefinedFunction" in e for e in report["errors"])


def test_report_figures_logged_to_wandb_as_media(tmp_path, monkeypatch):
    import wandb

    from tests.helpers.wandb_reader import find_run_files, read_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(project="greenstack-test", dir=str(tmp_path), mode="offline",
                     settings=wandb.Settings(console="off", silent=True, x_disable_stats=True, disable_git=True))
    keys = log_plots_to_wandb(run, RUNS / "small")
    run.finish()
    assert keys == sorted(f"report/{n}" for n in PLOTS)
    (run_file,) = find_run_files(tmp_path)
    history = read_run(run_file)["history"]
    logged = {k: v for row in history for k, v in row.items() if k.startswith("report/")}
    assert {k for k in logged if k.endswith("/_type")} == {f"{k}/_type" for k in keys}
    assert all(logged[f"{k}/_type"] == "image-file" and logged[f"{k}/format"] == "png" for k in keys)
    media = list(tmp_path.glob("wandb/offline-run-*/files/media/images/report/*.png"))
    assert len(media) == 4


# -- compare -------------------------------------------------------------------------------------
def test_compare_multirun_table_json_and_pareto_plot(cli, tmp_path):
    plot = tmp_path / "pareto.png"
    js = cli("report", "compare", str(RUNS / "sweep"), "--plot", str(plot), "--json")
    assert js.returncode == 0, js.stderr
    body = json.loads(js.stdout)
    assert body["pareto"] == ["0", "2"]  # job 1 is beaten by job 0 on both accuracy and emissions
    assert [r["label"] for r in body["runs"]] == ["0", "1", "2"]
    assert Image.open(plot).format == "PNG"
    table = cli("report", "compare", str(RUNS / "sweep"), str(RUNS / "small"), "--plot", str(plot))
    assert table.returncode == 0 and "optim.lr=0.003" in table.stdout and "Pareto" in table.stdout
    default = cli("report", "compare", str(tmp_path / "sweep-copy"))
    assert default.returncode == 2 and "not a directory" in default.stderr
    shutil.copytree(RUNS / "sweep", tmp_path / "sweep-copy")
    assert cli("report", "compare", str(tmp_path / "sweep-copy")).returncode == 0
    assert (tmp_path / "sweep-copy" / "pareto.png").is_file()  # defaults into the multirun dir


@pytest.mark.slow
def test_real_run_report_tco_and_audit(cli, tmp_path):
    """A real (tiny) training run: its files feed report.html, TCO and compare without hand-made fixtures."""
    run_dir = tmp_path / "real"
    trained = cli("train", "data=synthetic_image", "model.name=resnet10t", "data.num_samples=32", *FAST,
                  f"hydra.run.dir={run_dir}")
    assert trained.returncode == 0, trained.stderr[-3000:]
    html = cli("report", "html", str(run_dir))
    assert html.returncode == 0, html.stderr
    images = decode_images((run_dir / "report.html").read_text())
    assert len(images) == 4
    power = load_run(run_dir)
    assert power_series(power)[1], "a real run's metrics.jsonl yields a power curve"
    tco = cli("report", "tco", str(run_dir), "--baseline", str(run_dir), "--json")
    body = json.loads(tco.stdout)
    assert tco.returncode == 0 and body["savings"]["total_usd"]["usd"] == 0.0
    assert body["run"]["lines"]["energy_usd"]["value"] > 0
