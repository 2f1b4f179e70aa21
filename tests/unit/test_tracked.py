"""greenstack.track, greenstack.wait_for_window and `greenstack plan start` (fake clock; no real waiting)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pytest

import greenstack
from greenstack.errors import ConfigError
from greenstack.ledger.audit import verify
from tests.conftest import _env, read_jsonl
from tests.helpers.clock import SimClock

STATIC = {"kind": "static", "intensity_g_per_kwh": 400.0, "zone": None}
FAST_TDP = {"meter": "tdp", "tdp_w": 100.0, "interval_s": 0.05}
LOW_HOURS = (2, 3, 4, 5)  # UTC hours at 100 g/kWh, the rest 300
RUN_FILES = ("sustainability.json", "emissions.csv", "audit.jsonl", "report.html")


@pytest.fixture(autouse=True)
def _no_outside_requests(monkeypatch):
    monkeypatch.delenv("GREENSTACK_START_NOW", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)


@pytest.fixture
def trace(tmp_path):
    times = pd.date_range("2022-11-01", "2023-01-20", freq="h", tz="UTC", inclusive="left")
    path = tmp_path / "trace.csv"
    pd.DataFrame({"timestamp": times.strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "carbon_intensity": np.where(times.hour.isin(LOW_HOURS), 100.0, 300.0)}).to_csv(path, index=False)
    return str(path)


class FakeClock(SimClock):
    @property
    def now(self) -> datetime:
        return datetime.fromtimestamp(self.t, tz=timezone.utc)


def test_track_writes_a_run_dir_like_a_greenstack_run(tmp_path):
    out = tmp_path / "run"
    with greenstack.track(out, carbon=STATIC, energy=FAST_TDP, run_name="plain", log_every=2) as run:
        for _ in range(6):
            time.sleep(0.02)
            run.step(samples=4)
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    summary = json.loads((out / "sustainability.json").read_text())
    m = summary["metrics"]
    assert summary["schema"] == "greenstack.sustainability/1" and summary["stopped_early"] is None
    assert summary["status"] == "completed" and summary["audit"]["seq"] == 1  # the audit head, anchored
    assert m["train/steps"]["value"] == 6 and m["train/samples"]["value"] == 24
    kwh, kg = m["energy/total_kwh"]["value"], m["carbon/total_kg_co2e"]["value"]
    assert kwh > 0 and kg == pytest.approx(kwh * 0.4, rel=1e-6)  # 400 g/kWh, PUE 1
    assert m["energy/total_kwh"]["provenance"] == "estimated" and "tdp" in m["energy/total_kwh"]["source"]
    assert m["energy/j_per_sample"]["value"] == pytest.approx(kwh * 3.6e6 / 24)
    row = next(iter(pd.read_csv(out / "emissions.csv").to_dict("records")))
    assert row["emissions"] == pytest.approx(kg) and row["experiment_id"] == "plain"
    assert verify(out / "audit.jsonl").ok
    assert [r["kind"] for r in read_jsonl(out / "audit.jsonl")] == ["schedule"]  # scheduler=immediate
    rows = read_jsonl(out / "metrics.jsonl")  # every log_every=2 steps, and the end
    assert [r["step"] for r in rows] == [2, 4, 6, 6] and rows[-1]["carbon/total_kg_co2e"] > 0
    assert "Cumulative emissions" in (out / "report.html").read_text()


def test_track_budget_stop_raises_at_a_step_and_writes_the_reason(tmp_path):
    with pytest.raises(greenstack.CarbonBudgetExceeded) as err, \
            greenstack.track(tmp_path / "steps", carbon={**STATIC, "budget_kg": 1e-12, "budget_action": "stop"},
                             energy=FAST_TDP) as run:
        for _ in range(10_000):
            time.sleep(0.01)
            run.step(samples=1)
    assert "carbon.budget_kg=1e-12" in str(err.value)
    summary = json.loads((tmp_path / "steps" / "sustainability.json").read_text())
    assert "exceed carbon.budget_kg" in summary["stopped_early"]
    assert summary["carbon_budget"]["action"] == "stop" and summary["status"] == "budget_stopped"
    assert summary["metrics"]["train/steps"]["value"] < 10_000
    assert "budget" in [r["kind"] for r in read_jsonl(tmp_path / "steps" / "audit.jsonl")]


def test_track_watchdog_stops_code_that_never_calls_step(tmp_path):
    @greenstack.track(tmp_path / "busy", carbon={**STATIC, "budget_kg": 1e-12, "budget_action": "stop"},
                      energy=FAST_TDP)
    def busy() -> int:
        deadline = time.monotonic() + 30
        n = 0
        while time.monotonic() < deadline:  # pure Python: the async raise lands at the next bytecode
            n += 1
        return n

    t0 = time.monotonic()
    with pytest.raises(greenstack.CarbonBudgetExceeded, match="exceed carbon.budget_kg"):
        busy()
    assert time.monotonic() - t0 < 20
    summary = json.loads((tmp_path / "busy" / "sustainability.json").read_text())
    assert summary["stopped_early"] and summary["carbon_budget"]["action"] == "stop"


def test_track_writes_partial_accounting_when_the_block_raises(tmp_path):
    with pytest.raises(ZeroDivisionError), greenstack.track(tmp_path / "f", carbon=STATIC, energy=FAST_TDP) as run:
        time.sleep(0.1)
        run.step(samples=2)
        1 / 0  # noqa: B018
    summary = json.loads((tmp_path / "f" / "sustainability.json").read_text())
    assert summary["status"] == "failed" and summary["partial"] is True
    assert "division by zero" in summary["end_reason"] and summary["metrics"]["energy/total_kwh"]["value"] > 0


def test_track_warn_budget_records_the_breach_and_finishes(tmp_path):
    with greenstack.track(tmp_path / "w", carbon={**STATIC, "budget_kg": 1e-12}, energy=FAST_TDP) as run:
        for _ in range(5):
            time.sleep(0.03)
            run.step()
    summary = json.loads((tmp_path / "w" / "sustainability.json").read_text())
    assert summary["stopped_early"] is None and summary["carbon_budget"]["action"] == "warn"


def test_track_config_errors_list_every_problem(tmp_path):
    with pytest.raises(ConfigError) as err:
        greenstack.track(tmp_path / "x", carbon={"pue": 0.5}, energy={"interval_s": -1.0},
                         scheduler="pause_resume", overrides=["energy=bogus"])
    keys = {p.key for p in err.value.problems}
    assert {"energy", "carbon.pue", "energy.interval_s", "scheduler"} <= keys, keys
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_track_reads_the_same_groups_from_a_yaml_file(tmp_path):
    cfg = tmp_path / "green.yaml"
    cfg.write_text("defaults:\n  - energy: tdp\ncarbon: {kind: static, intensity_g_per_kwh: 250, zone: null}\n"
                   "run_name: from-yaml\n")
    with greenstack.track(tmp_path / "y", config=cfg, energy={"interval_s": 0.05}) as run:
        time.sleep(0.1)
        run.step()
    summary = json.loads((tmp_path / "y" / "sustainability.json").read_text())
    assert summary["run_name"] == "from-yaml"
    assert summary["metrics"]["carbon/intensity_g_per_kwh"]["value"] == pytest.approx(250)
    bad = tmp_path / "bad.yaml"
    bad.write_text("carbon: {pue: 0.2}\nmodel: timm\n")
    with pytest.raises(ConfigError) as err:
        greenstack.track(tmp_path / "z", config=bad)
    assert {"bad.yaml:model", "carbon.pue"} <= {p.key for p in err.value.problems}


def test_track_waits_for_the_scheduler_window_before_metering(tmp_path, trace):
    clock = FakeClock("2023-01-09T10:30:00+00:00")
    out = tmp_path / "sched"
    with greenstack.track(out, carbon=STATIC, energy=FAST_TDP, scheduler="forecast_window",
                          overrides=[f"scheduler.trace={trace}", "scheduler.duration=3h", "scheduler.replan=false",
                                     "scheduler.tick_s=600"], clock=clock.time, sleep=clock.sleep) as run:
        assert clock.now == datetime(2023, 1, 10, 2, tzinfo=timezone.utc)  # waited for the 02-05 window
        run.step()
    actions = [r["data"]["action"] for r in read_jsonl(out / "audit.jsonl") if r["kind"] == "schedule"]
    assert actions == ["wait", "start"]
    summary = json.loads((out / "sustainability.json").read_text())
    assert summary["metrics"]["scheduler/wait_s"]["value"] == pytest.approx(15.5 * 3600)


def test_wait_for_window_returns_at_the_low_window_and_start_now_file_skips_it(tmp_path, trace):
    clock = FakeClock("2023-01-09T10:30:00+00:00")
    decision = greenstack.wait_for_window(trace=trace, duration="3h", deadline="24h", tick_s=600,
                                          clock=clock.time, sleep=clock.sleep, audit=tmp_path / "a.jsonl")
    assert decision.start == datetime(2023, 1, 10, 2, tzinfo=timezone.utc) == clock.now
    assert decision.action == "start" and decision.expected_saving_pct > 50
    assert verify(tmp_path / "a.jsonl").ok
    (tmp_path / "START_NOW").touch()
    clock2 = FakeClock("2023-01-09T10:30:00+00:00")
    now = greenstack.wait_for_window(trace=trace, duration="3h", run_dir=tmp_path, clock=clock2.time,
                                     sleep=clock2.sleep)
    assert now.action == "start_now" and now.waited_s == 0 and clock2.now.hour == 10


def test_plan_start_waits_then_execs_with_start_now(tmp_path, trace, capsys):
    from greenstack.cli.plan import build_parser
    from greenstack.cli.plan_start import run_start_command

    clock = FakeClock("2023-01-09T10:30:00+00:00")
    calls = []
    args = build_parser().parse_args(["start", "--trace", trace, "--duration", "3h", "--deadline", "24h",
                                      "--run-dir", str(tmp_path), "--exec", "--", "python", "train.py", "lr=1"])
    run_start_command(args, clock=clock.time, sleep=clock.sleep, execvpe=lambda *a: calls.append(a))
    assert clock.now == datetime(2023, 1, 10, 2, tzinfo=timezone.utc)
    (file, argv, env), = calls
    assert (file, argv, env["GREENSTACK_START_NOW"]) == ("python", ["python", "train.py", "lr=1"], "1")
    assert "start at 2023-01-10T02:00:00" in capsys.readouterr().err


def test_plan_start_cli_execs_and_reports_bad_input(tmp_path, cli):
    done = cli("plan", "start", "--zone", "GB", "--duration", "4h", "--deadline", "24h", "--exec", "--",
               sys.executable, "-c", "import os; print('child', os.environ['GREENSTACK_START_NOW'])",
               env={"GREENSTACK_START_NOW": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "child 1" and "start_now" in done.stderr
    from greenstack.cli.plan import run_plan

    with pytest.raises(ConfigError, match="deadline"):
        run_plan(["start", "--zone", "GB", "--duration", "4h", "--deadline", "2h", "--exec", "--", "true"])
    with pytest.raises(ConfigError, match="without --exec"):
        run_plan(["start", "--zone", "GB", "--", "true"])


def test_importing_greenstack_never_imports_lightning():
    code = ("import sys, greenstack, greenstack.tracked, greenstack.integrations; greenstack.track; "
            "bad = [m for m in ('lightning', 'pytorch_lightning') if m in sys.modules]; assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_integrations_name_the_extra_when_the_framework_is_missing():
    code = ("import sys; sys.modules['lightning'] = sys.modules['pytorch_lightning'] = None\n"
            "try:\n    import greenstack.integrations.lightning\nexcept ImportError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300)
    assert "pip install 'greenstack[lightning]'" in done.stdout, done.stderr
    code = code.replace("'lightning'] = sys.modules['pytorch_lightning']", "'transformers']").replace(
        "integrations.lightning", "integrations.hf")
    done = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300)
    assert "pip install 'greenstack[hf]'" in done.stdout, done.stderr
