"""report.html: one self-contained page per run (PNG plots as data URIs) plus the same PNGs for trackers.

Why self-contained: a report is mailed, attached to tickets and archived next to a model; it must open
offline, years later, without the run dir. Plots are drawn with matplotlib's object API (no pyplot global
state, no display), from the run's own files:

* power over time: the average power of each logged interval, from metrics.jsonl's cumulative energy;
* grid intensity over the run: the values the run logged, over the hourly trace of its zone (replayed as
  the run's carbon source does), with the window a scheduler chose shaded (from audit.jsonl or
  sustainability.json; no window, no shading);
* cumulative emissions; accuracy vs emissions (each evaluation at the emissions spent so far).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from greenstack.report.tco import RunDir, load_run

log = logging.getLogger("greenstack")
PLOTS = ("power", "intensity", "emissions", "accuracy_vs_emissions")
TITLES = {"power": "Power over time", "intensity": "Grid carbon intensity over the run",
          "emissions": "Cumulative emissions", "accuracy_vs_emissions": "Accuracy vs emissions"}
#: scheduler actions whose `choice` is a planned window
_WINDOW_ACTIONS = ("wait", "start_now", "slurm_begin", "choose_region")
_COLOURS = {"measured": "#1a7f37", "estimated": "#9a6700", "fallback": "#cf222e"}


# -- data extraction --------------------------------------------------------------------------------
def _time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def power_series(run: RunDir) -> tuple[list[datetime], list[float]]:
    """Interval start times and average power (W) of each interval between cumulative-energy lines."""
    start = _time(run.summary.get("started_at"))
    points = [(t, float(row["energy/total_kwh"])) for row in run.metrics
              if isinstance(row.get("energy/total_kwh"), (int, float)) and (t := _time(row.get("time")))]
    points.sort(key=lambda p: p[0])
    if start is not None and (not points or start < points[0][0]):
        points.insert(0, (start, 0.0))
    times, watts = [], []
    for (t0, e0), (t1, e1) in zip(points, points[1:], strict=False):
        dt = (t1 - t0).total_seconds()
        if dt <= 0 or e1 < e0:
            continue  # a resumed segment restarts its clock; skip the seam rather than invent power
        times.append(t0)
        watts.append((e1 - e0) * 3.6e6 / dt)
    if times:
        times.append(points[-1][0])
        watts.append(watts[-1])
    return times, watts


def emissions_series(run: RunDir) -> tuple[list[datetime], list[float]]:
    """Cumulative kgCO2e at each logged time (starting at 0 at the run's start)."""
    start = _time(run.summary.get("started_at"))
    pts = sorted((t, float(row["carbon/total_kg_co2e"])) for row in run.metrics
                 if isinstance(row.get("carbon/total_kg_co2e"), (int, float)) and (t := _time(row.get("time"))))
    if start is not None and (not pts or start < pts[0][0]):
        pts.insert(0, (start, 0.0))
    return [p[0] for p in pts], [p[1] for p in pts]


def accuracy_points(run: RunDir) -> list[tuple[str, float, float]]:
    """(split, emissions so far kg, accuracy) for each evaluation, and the final test accuracy."""
    carbon = [(row.get("step", 0), _time(row.get("time")), float(row["carbon/total_kg_co2e"]))
              for row in run.metrics if isinstance(row.get("carbon/total_kg_co2e"), (int, float))]
    out = []
    for row in run.metrics:
        for split in ("val", "test"):
            acc = row.get(f"{split}/accuracy")
            if not isinstance(acc, (int, float)):
                continue
            t = _time(row.get("time"))
            before = [c for s, ct, c in carbon if (ct is not None and t is not None and ct <= t)
                      or ((ct is None or t is None) and s <= row.get("step", 0))]
            kg = before[-1] if before else 0.0
            if split == "test" and run.value("carbon/total_kg_co2e") is not None:
                kg = float(run.value("carbon/total_kg_co2e"))  # type: ignore[arg-type]
            out.append((split, kg, float(acc)))
    return out


def started_early(run: RunDir) -> str | None:
    """Why the run started before its planned window (SIGUSR2, START_NOW, ...), from its scheduler decisions."""
    decisions: list[Any] = [rec.get("data") for rec in run.audit if rec.get("kind") == "schedule"]
    raw = (run.figure("scheduler/decisions") or {}).get("value")
    if isinstance(raw, str):
        try:
            decisions += list(json.loads(raw))
        except (ValueError, TypeError):
            pass
    for data in decisions:
        inputs = data.get("inputs") if isinstance(data, Mapping) else None
        if isinstance(inputs, Mapping) and data.get("action") == "start" \
                and str(inputs.get("reason", "")).startswith("started early"):
            return str(inputs["reason"])
    return None


def chosen_windows(run: RunDir) -> list[dict[str, Any]]:
    """Windows a scheduler chose for this run and then used: audit.jsonl schedule/region decisions, or
    sustainability.json. A run started early did not use its planned window, so none is returned."""
    if started_early(run):
        return []
    found = []
    candidates: list[tuple[str, Mapping[str, Any]]] = []
    for rec in run.audit:
        if rec.get("kind") in ("schedule", "region") and isinstance(rec.get("data"), Mapping):
            candidates.append((f"audit #{rec.get('seq')} ({rec.get('kind')})", rec["data"]))
    sched = run.summary.get("scheduler")
    if isinstance(sched, Mapping):
        candidates.append(("sustainability.json scheduler", sched))
    for origin, data in candidates:
        window = data.get("window") if isinstance(data.get("window"), Mapping) else data
        start = _time(window.get("start") or window.get("window_start"))
        end = _time(window.get("end") or window.get("window_end"))
        choice, inputs = data.get("choice"), data.get("inputs")
        if start is None and isinstance(choice, Mapping) and data.get("action") in _WINDOW_ACTIONS:
            # a scheduler decision (greenstack.scheduling): chosen start + the run's planned duration
            start = _time(choice.get("start"))
            end = _time(choice.get("end"))
            duration_h = inputs.get("duration_h") if isinstance(inputs, Mapping) else None
            if start is not None and end is None and isinstance(duration_h, (int, float)) and duration_h > 0:
                end = start + timedelta(hours=float(duration_h))
        if start and end and end > start:
            zone = data.get("zone") or (choice.get("zone") if isinstance(choice, Mapping) else None)
            found.append({"start": start, "end": end, "origin": origin, "zone": zone})
    return found


def intensity_context(run: RunDir, windows: list[dict[str, Any]]) -> tuple[list[datetime], list[float], str] | None:
    """The hourly intensity of the run's zone around the run and its window, as its carbon source sees it."""
    src = run.summary.get("carbon_source") or {}
    if src.get("class") != "EmbeddedTraceSource" or not src.get("zone"):
        return None  # live or user sources are not re-queried for a report
    start, end = _time(run.summary.get("started_at")), _time(run.summary.get("ended_at"))
    if start is None or end is None:
        return None
    lo = min([start, *[w["start"] for w in windows]]) - timedelta(hours=3)
    hi = max([end, *[w["end"] for w in windows]]) + timedelta(hours=3)
    hi = min(hi, lo + timedelta(days=7))
    lo = lo.replace(minute=0, second=0, microsecond=0)
    n = int((hi - lo).total_seconds() // 3600) + 1
    hours = [lo + timedelta(hours=h) for h in range(n)]
    try:
        from greenstack.carbon.sources import EmbeddedTraceSource

        look = EmbeddedTraceSource(str(src["zone"])).series_at([h.timestamp() for h in hours])
    except Exception as e:  # noqa: BLE001 - a report must render even when the trace cannot be read
        log.warning("report: no intensity context for %s: %s", src.get("zone"), e)
        return None
    return hours, [float(v) for v in look.intensity_g_per_kwh], look.source


# -- plots --------------------------------------------------------------------------------------
def _figure(width: float = 7.2, height: float = 3.4) -> Any:
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _empty(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, wrap=True, color="#57606a")
    ax.set_xticks([])
    ax.set_yticks([])


def _time_axis(ax: Any) -> None:
    import matplotlib.dates as mdates

    locator = mdates.AutoDateLocator(tz=timezone.utc)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=timezone.utc))
    ax.set_xlabel("time (UTC)")


def _prov(run: RunDir, key: str) -> str:
    fig = run.figure(key) or {}
    return str(fig.get("provenance", "fallback"))


def plot_power(run: RunDir) -> bytes:
    fig, ax = _figure()
    times, watts = power_series(run)
    if not times:
        _empty(ax, "no energy lines in metrics.jsonl: power cannot be shown")
    else:
        ax.step(times, watts, where="post", color="#0969da")
        ax.fill_between(times, watts, step="post", alpha=0.15, color="#0969da")
        ax.set_ylabel("average power (W)")
        ax.set_ylim(bottom=0)
        _time_axis(ax)
    ax.set_title(f"{TITLES['power']} [energy: {_prov(run, 'energy/total_kwh')}]", fontsize=10)
    return _png(fig)


def plot_intensity(run: RunDir) -> bytes:
    fig, ax = _figure()
    windows = chosen_windows(run)
    context = intensity_context(run, windows)
    logged = [(t, float(row["carbon/intensity_g_per_kwh"])) for row in run.metrics
              if isinstance(row.get("carbon/intensity_g_per_kwh"), (int, float)) and (t := _time(row.get("time")))]
    if context is None and not logged:
        _empty(ax, "no intensity logged and no shipped trace for the run's carbon source")
    else:
        if context is not None:
            hours, values, source = context
            ax.step(hours, values, where="post", color="#8c959f", label=f"hourly trace ({source})")
        if logged:
            ax.plot([p[0] for p in logged], [p[1] for p in logged], "o-", ms=3, color="#cf222e",
                    label="logged by the run")
        start, end = _time(run.summary.get("started_at")), _time(run.summary.get("ended_at"))
        if start and end:
            ax.axvspan(start, end, color="#0969da", alpha=0.08, label="run")
        for i, w in enumerate(windows):
            ax.axvspan(w["start"], w["end"], color="#1a7f37", alpha=0.25, hatch="//",
                       label="chosen window" if i == 0 else None)
        early = started_early(run)
        if early:
            ax.text(0.01, 0.02, f"{early}: the planned window was not used", transform=ax.transAxes, fontsize=7,
                    color="#9a6700", va="bottom")
        ax.set_ylabel("gCO2eq/kWh")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7, loc="best")
        _time_axis(ax)
    ax.set_title(f"{TITLES['intensity']} [{_prov(run, 'carbon/intensity_g_per_kwh')}]", fontsize=10)
    return _png(fig)


def plot_emissions(run: RunDir) -> bytes:
    fig, ax = _figure()
    times, kg = emissions_series(run)
    if len(times) < 2:
        _empty(ax, "no emissions lines in metrics.jsonl")
    else:
        ax.plot(times, [k * 1000 for k in kg], color="#9a6700")
        total = run.value("carbon/total_kg_co2e")
        end = _time(run.summary.get("ended_at"))
        if total is not None and end is not None:
            ax.plot([end], [total * 1000], "D", color="#9a6700", label=f"final {total * 1000:.4g} g")
            ax.legend(fontsize=7)
        ax.set_ylabel("gCO2eq (cumulative)")
        ax.set_ylim(bottom=0)
        _time_axis(ax)
    ax.set_title(f"{TITLES['emissions']} [{_prov(run, 'carbon/total_kg_co2e')}]", fontsize=10)
    return _png(fig)


def accuracy_axes(run: RunDir) -> tuple[Any, Any]:
    """The accuracy-vs-emissions figure and its axes (tests check the limits leave room for the star)."""
    fig, ax = _figure()
    points = accuracy_points(run)
    if not points:
        _empty(ax, "no evaluation lines (val/accuracy, test/accuracy) in metrics.jsonl")
    else:
        val = [(kg * 1000, acc) for split, kg, acc in points if split == "val"]
        test = [(kg * 1000, acc) for split, kg, acc in points if split == "test"]
        if val:
            ax.plot([p[0] for p in val], [p[1] for p in val], "o-", color="#0969da", label="val/accuracy")
        if test:
            ax.plot([p[0] for p in test], [p[1] for p in test], "*", ms=12, color="#cf222e", label="test/accuracy",
                    clip_on=False, zorder=3)
        ax.set_xlabel("emissions so far (gCO2eq)")
        ax.set_ylabel("accuracy")
        _pad_limits(ax, [p[0] for p in val + test], [p[1] for p in val + test])
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
    ax.set_title(TITLES["accuracy_vs_emissions"], fontsize=10)
    return fig, ax


def _pad_limits(ax: Any, xs: list[float], ys: list[float], pad: float = 0.08) -> None:
    """Axis limits with room around every point, so a marker at the last (top-right) point is not cut by
    the frame: x from 0, y around the points (accuracies near 1.0 sit at the top corner otherwise)."""
    x_hi = max(xs) if xs else 1.0
    ax.set_xlim(0, x_hi * (1 + pad) if x_hi > 0 else 1.0)
    y_lo, y_hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    span = max(y_hi - y_lo, 0.05)
    ax.set_ylim(max(0.0, y_lo - span * pad * 2) if y_lo >= 0 else y_lo - span * pad * 2, y_hi + span * pad * 1.5)


def plot_accuracy_vs_emissions(run: RunDir) -> bytes:
    return _png(accuracy_axes(run)[0])


def render_plots(run: RunDir | str | Path) -> dict[str, bytes]:
    """The four report figures as PNG bytes, keyed by name (see PLOTS)."""
    run = run if isinstance(run, RunDir) else load_run(run)
    return {"power": plot_power(run), "intensity": plot_intensity(run), "emissions": plot_emissions(run),
            "accuracy_vs_emissions": plot_accuracy_vs_emissions(run)}


# -- the page -----------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:980px;color:#1f2328;
padding:0 1rem}h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid
#d0d7de;padding-bottom:.3rem}.meta{color:#57606a;font-size:.9rem}table{border-collapse:collapse;width:100%;
font-size:.85rem}th,td{text-align:left;padding:.3rem .5rem;border-bottom:1px solid #eaeef2;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}th{white-space:nowrap}
td.src,td.val,td.key{overflow-wrap:anywhere}
table.fixed{table-layout:fixed}td.val pre{white-space:pre-wrap;overflow-wrap:anywhere;font-size:.72rem;margin:.3rem 0;
max-height:24rem;overflow:auto}td.val summary{cursor:pointer;text-align:right}.src{color:#57606a;font-size:.78rem}
.badge{display:inline-block;padding:0 .4rem;border-radius:.6rem;color:#fff;font-size:.75rem}
figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #d0d7de;border-radius:4px}
figcaption{color:#57606a;font-size:.82rem}.ok{color:#1a7f37}.bad{color:#cf222e}
"""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else str(value)


def _badge(prov: str) -> str:
    colour = _COLOURS.get(prov, "#57606a")
    return f'<span class="badge" style="background:{colour}">{html.escape(prov)}</span>'


def _value_cell(value: Any, unit: str) -> str:
    """A figure's value for the table: numbers with their unit; structured values (decision logs, unit
    `json`) as a short count that expands to the pretty-printed JSON, wrapped inside the column."""
    parsed = value
    if unit == "json" and isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
    if isinstance(parsed, (list, dict)):
        n = len(parsed)
        what = (f"{n} entr{'y' if n == 1 else 'ies'}" if isinstance(parsed, list)
                else f"{n} key{'' if n == 1 else 's'}")
        body = html.escape(json.dumps(parsed, indent=1, sort_keys=True, default=str))
        return f"<td class=val><details><summary>{what}</summary><pre>{body}</pre></details></td>"
    return f"<td class=num>{html.escape(_fmt(parsed))} {html.escape(unit if unit != 'json' else '')}</td>"


def _figures_table(run: RunDir) -> str:
    rows = []
    for key, fig in run.summary.get("metrics", {}).items():
        if not isinstance(fig, Mapping):
            continue
        rows.append(f"<tr><td class=key>{html.escape(key)}</td>{_value_cell(fig.get('value'), str(fig.get('unit', '')))}"
                    f"<td>{_badge(str(fig.get('provenance', '')))}</td>"
                    f"<td class=src>{html.escape(str(fig.get('source', '')))}</td></tr>")
    return ("<table id=figures class=fixed><colgroup><col style='width:26%'><col style='width:20%'>"
            "<col style='width:11%'><col style='width:43%'></colgroup>"
            "<tr><th>figure</th><th>value</th><th>provenance</th><th>source</th></tr>"
            + "".join(rows) + "</table>")


def _tco_section(run: RunDir) -> str:
    from greenstack.errors import GreenstackError
    from greenstack.report.tco import LINE_ORDER, LINE_TITLES, compute_tco

    try:
        tco = compute_tco(run)
    except GreenstackError as e:
        return f"<p class=src>TCO not computed: {html.escape(str(e))}</p>"
    rows = "".join(f"<tr><td>{LINE_TITLES[k]}</td><td class=num>{html.escape(_fmt(tco.lines[k].value))} USD</td>"
                   f"<td>{_badge(tco.lines[k].provenance)}</td><td class=src>{html.escape(tco.lines[k].source)}</td></tr>"
                   for k in LINE_ORDER)
    return ("<p class=src>Default pricing (on-prem, configured electricity price). For cloud prices and a measured "
            "baseline: <code>greenstack report tco RUN_DIR --instance TYPE --region R --baseline DIR</code>.</p>"
            f"<table><tr><th>line</th><th>cost</th><th>provenance</th><th>source</th></tr>{rows}</table>")


def _audit_section(run: RunDir) -> str:
    path = run.path / "audit.jsonl"
    if not path.is_file():
        return "<p class=src>No audit.jsonl: this run recorded no decisions.</p>"
    from greenstack.ledger.audit import verify

    result = verify(path)
    status = ('<p class=ok>hash chain verified: ' + str(result.lines) + " records</p>") if result.ok else \
        ("<p class=bad>audit log does NOT verify: " + html.escape("; ".join(p.format() for p in result.problems))
         + "</p>")
    rows = "".join(f"<tr><td class=num>{html.escape(str(r.get('seq')))}</td><td>{html.escape(str(r.get('at', '')))}"
                   f"</td><td>{html.escape(str(r.get('kind', '')))}</td><td class=src>"
                   f"{html.escape(json.dumps(r.get('data', {}), sort_keys=True)[:400])}</td></tr>" for r in run.audit)
    return status + f"<table><tr><th>#</th><th>at</th><th>decision</th><th>data</th></tr>{rows}</table>"


def render_html(run: RunDir, plots: Mapping[str, bytes]) -> str:
    """The report page (all images inline as data URIs; no script, no external resource)."""
    title = f"greenstack report: {run.name}"
    figs = []
    captions = {
        "power": "Average power of each logged interval (Δ energy/total_kwh ÷ Δ time, metrics.jsonl).",
        "intensity": "Intensity the run logged, over its zone's hourly trace; a chosen scheduling window is shaded "
                     "green (none when no scheduler decision was recorded).",
        "emissions": "carbon/total_kg_co2e as logged during the run; the diamond is the final reported total.",
        "accuracy_vs_emissions": "Each evaluation placed at the emissions spent until then; the star is the final "
                                 "test accuracy at the run's total emissions.",
    }
    for name in PLOTS:
        if name not in plots:
            continue
        data = base64.b64encode(plots[name]).decode("ascii")
        figs.append(f'<figure id="plot-{name}"><img alt="{html.escape(TITLES[name])}" '
                    f'src="data:image/png;base64,{data}"><figcaption>{html.escape(captions[name])}</figcaption></figure>')
    meta = (f"run {html.escape(str(run.summary.get('run_id', '')))} · {html.escape(str(run.summary.get('started_at')))} "
            f"→ {html.escape(str(run.summary.get('ended_at')))} · {html.escape(str(run.path))}")
    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><meta name=viewport "
            f'content="width=device-width,initial-scale=1"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n<h1>{html.escape(title)}</h1><p class=meta>{meta}</p>\n"
            f"<h2>Plots</h2>\n{''.join(figs)}\n<h2>Figures</h2>\n{_figures_table(run)}\n"
            f"<h2>Cost</h2>\n{_tco_section(run)}\n<h2>Decisions (audit log)</h2>\n{_audit_section(run)}\n"
            f"<p class=src>generated {generated} by greenstack; every figure carries its provenance "
            f"(measured / estimated / fallback) and source.</p>\n</body></html>\n")


def write_report(run_dir: str | Path, out: str | Path | None = None, *,
                 plots_dir: str | Path | None | bool = True) -> Path:
    """Write report.html (default: into the run dir) and, unless `plots_dir=False`, the PNGs to plots/."""
    from greenstack.io import atomic_write_bytes

    run = load_run(run_dir)
    plots = render_plots(run)
    out_path = Path(out) if out is not None else run.path / "report.html"
    atomic_write_bytes(out_path, render_html(run, plots).encode("utf-8"))
    if plots_dir is not False:
        folder = run.path / "plots" if plots_dir in (True, None) else Path(plots_dir)  # type: ignore[arg-type]
        for name, data in plots.items():
            atomic_write_bytes(folder / f"{name}.png", data)
    return out_path


def log_plots_to_wandb(wandb_run: Any, run_dir: str | Path, plots: Mapping[str, bytes] | None = None) -> list[str]:
    """Log the report figures to an open W&B run as images (`report/<name>`); returns the keys logged."""
    import wandb
    from PIL import Image

    images = plots if plots is not None else render_plots(run_dir)
    payload = {f"report/{name}": wandb.Image(Image.open(io.BytesIO(data)), caption=TITLES[name])
               for name, data in images.items()}
    wandb_run.log(payload)
    return sorted(payload)


def finish_run_report(run_dir: str | Path, tracker: Any = None, *, summary: dict[str, Any] | None = None,
                      metrics: list[dict[str, Any]] | None = None) -> Path | None:
    """End-of-run hook: write report.html and plots/, and log the figures to W&B when the tracker is W&B.

    `summary` / `metrics`: the finishing run's sustainability.json object and metrics rows, held in
    memory (read from the run dir when not given). Runs on rank 0 only. A finished training run is never
    failed by its report: problems are logged.
    """
    import os

    if int(os.environ.get("RANK", "0") or 0) != 0:
        return None
    try:
        run = load_run(run_dir, summary=summary, metrics=metrics)
        plots = render_plots(run)
        out = run.path / "report.html"
        from greenstack.io import atomic_write_bytes

        atomic_write_bytes(out, render_html(run, plots).encode("utf-8"))
        for name, data in plots.items():
            atomic_write_bytes(run.path / "plots" / f"{name}.png", data)
    except Exception as e:  # noqa: BLE001 - see docstring
        log.warning("report.html not written: %s", e)
        return None
    wandb_run = getattr(tracker, "run", None) if getattr(tracker, "name", "") == "wandb" else None
    if wandb_run is not None:
        try:
            log_plots_to_wandb(wandb_run, run.path, plots)
        except Exception as e:  # noqa: BLE001
            log.warning("report figures not logged to W&B: %s", e)
    log.info("report: %s", out)
    return out
