"""EnergyMonitor with fake meters producing known power series."""

from __future__ import annotations

import threading
import time
from datetime import timedelta, timezone

import numpy as np
import pytest

from greenstack.energy.meters import Meter
from greenstack.energy.monitor import J_PER_KWH, EnergyMonitor, should_meter
from greenstack.errors import ConfigError


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def sleep(self, dt: float) -> None:
        self.t += dt


class PowerMeter(Meter):
    """Reports the exact integral of a piecewise-constant power (W) set through `power_w`."""

    def __init__(self, clock, components: dict[str, float], *, name: str = "fake",
                 provenance: str = "measured") -> None:
        self.clock = clock
        self.name = name
        self.provenance = provenance
        self.source = f"{name}:test"
        self.components = tuple(components)
        self.power_w = dict(components)
        self._energy = dict.fromkeys(components, 0.0)
        self._t = clock()
        self.polls = 0
        self.lock = threading.Lock()

    def _advance(self) -> None:
        with self.lock:
            t = self.clock()
            for c in self.components:
                self._energy[c] += self.power_w[c] * (t - self._t)
            self._t = t

    def set_power(self, **watts: float) -> None:
        self._advance()
        self.power_w.update(watts)

    def start(self) -> None:
        self._t = self.clock()
        self._energy = dict.fromkeys(self.components, 0.0)

    def poll(self) -> None:
        self.polls += 1

    def read_energy_j(self) -> dict[str, float]:
        self._advance()
        return dict(self._energy)


def test_intervals_and_totals_exact_with_fake_clock() -> None:
    clock = FakeClock()
    cpu = PowerMeter(clock, {"cpu": 100.0}, provenance="estimated")
    gpu = PowerMeter(clock, {"gpu": 300.0, }, name="gpu")
    monitor = EnergyMonitor([cpu, gpu], interval_s=0.1, clock=clock).start(background=False)
    assert monitor.components == ("cpu", "gpu")
    clock.sleep(2.0)
    monitor.sample(read=True)  # 0-2 s: cpu 100 W, gpu 300 W
    cpu.set_power(cpu=50.0)
    gpu.set_power(gpu=0.0)
    clock.sleep(1.0)
    monitor.sample("epoch-1")  # mark only, at 3 s (no read)
    clock.sleep(3.0)
    monitor.stop()  # final reading at 6 s
    assert cpu.polls == 1  # the stop() reading calls stop(), not poll()

    intervals = monitor.intervals()
    assert [iv.duration_s for iv in intervals] == pytest.approx([2.0, 1.0, 3.0])
    assert [iv.energy_j["cpu"] for iv in intervals] == pytest.approx([200.0, 50.0, 150.0])
    assert [iv.energy_j["gpu"] for iv in intervals] == pytest.approx([600.0, 0.0, 0.0])
    for a, b in zip(intervals, intervals[1:], strict=False):
        assert a.end == b.start
    assert intervals[0].start == monitor.started_at
    assert intervals[0].start.tzinfo == timezone.utc
    assert intervals[-1].end - intervals[0].start == timedelta(seconds=6)
    assert monitor.total_energy_j() == pytest.approx({"cpu": 400.0, "gpu": 600.0})
    assert monitor.total_kwh() == pytest.approx(1000.0 / J_PER_KWH)
    assert monitor.duration_s() == pytest.approx(6.0)
    assert monitor.marks() == [(monitor.started_at + timedelta(seconds=3), "epoch-1")]

    # sample(read=True) is a mark too: start -> 2 s -> epoch-1 -> end; thread readings alone: 0 -> 2 -> 6
    by_mark = monitor.intervals("marks")
    assert [iv.energy_j["cpu"] for iv in by_mark] == pytest.approx([200.0, 50.0, 150.0])
    assert [iv.energy_j["cpu"] for iv in monitor.intervals("samples")] == pytest.approx([200.0, 200.0])

    start_s, end_s, kwh = monitor.as_arrays()
    assert start_s[0] == pytest.approx(monitor.started_at.timestamp())
    assert np.diff(np.concatenate([start_s, end_s[-1:]])) == pytest.approx([2.0, 1.0, 3.0])
    assert kwh["cpu"] * J_PER_KWH == pytest.approx([200.0, 50.0, 150.0])
    assert kwh["gpu"].sum() * J_PER_KWH == pytest.approx(600.0)


def test_marks_interpolate_linearly_between_readings() -> None:
    clock = FakeClock()
    meter = PowerMeter(clock, {"cpu": 40.0})
    monitor = EnergyMonitor([meter], clock=clock).start(background=False)
    for _ in range(4):  # four 0.25 s steps, marked without reading
        clock.sleep(0.25)
        monitor.sample()
    assert monitor.intervals() == []  # marks after the latest reading wait for the next one
    monitor.stop()
    energies = [iv.energy_j["cpu"] for iv in monitor.intervals()]
    assert energies == pytest.approx([10.0, 10.0, 10.0, 10.0])
    assert [iv.energy_j["cpu"] for iv in monitor.intervals("samples")] == pytest.approx([40.0])
    assert len(monitor.intervals("marks")) == 4


def test_figures_provenance_sources_and_pue_label() -> None:
    clock = FakeClock()
    measured = PowerMeter(clock, {"gpu": 200.0}, name="nvml", provenance="measured")
    estimated = PowerMeter(clock, {"cpu": 50.0}, name="tdp", provenance="fallback")
    ram = PowerMeter(clock, {"ram": 1.0}, name="ram", provenance="estimated")
    monitor = EnergyMonitor([measured, estimated, ram], clock=clock).start(background=False)
    clock.sleep(3600.0)
    monitor.stop()
    figs = monitor.figures()
    assert figs["energy/total_kwh"].value == pytest.approx(0.251)
    assert figs["energy/total_kwh"].unit == "kWh"
    assert figs["energy/total_kwh"].provenance == "fallback"  # weakest of all meters
    assert figs["energy/total_kwh"].source == "nvml:test + tdp:test + ram:test"
    assert figs["energy/gpu_kwh"].value == pytest.approx(0.2)
    assert figs["energy/gpu_kwh"].provenance == "measured" and figs["energy/gpu_kwh"].source == "nvml:test"
    assert figs["energy/cpu_kwh"].provenance == "fallback"
    assert figs["energy/ram_kwh"].provenance == "estimated"
    assert figs["energy/duration_s"].value == pytest.approx(3600.0)
    pue = figs["energy/pue"]
    assert (pue.value, pue.source, pue.provenance) == (1.0, "pue:1.0 (default)", "fallback")
    configured = EnergyMonitor([measured], pue=1.2).figures()["energy/pue"]
    assert (configured.source, configured.provenance) == ("pue:1.2 (configured)", "estimated")


def test_idle_baseline_gives_dynamic_energy() -> None:
    clock = FakeClock()
    meter = PowerMeter(clock, {"cpu": 30.0})
    monitor = EnergyMonitor([meter], interval_s=0.5, clock=clock)
    assert monitor.measure_idle_baseline(2.0, sleep=clock.sleep) == pytest.approx({"cpu": 30.0})
    assert meter.polls == 4  # polled every interval while idle
    monitor.start(background=False)
    meter.set_power(cpu=100.0)
    clock.sleep(10.0)
    monitor.stop()
    assert monitor.total_energy_j()["cpu"] == pytest.approx(1000.0)
    assert monitor.dynamic_energy_j() == pytest.approx({"cpu": 700.0})
    figs = monitor.figures()
    assert figs["energy/idle_power_w"].value == pytest.approx(30.0)
    assert figs["energy/dynamic_kwh"].value == pytest.approx(700.0 / J_PER_KWH)
    with pytest.raises(RuntimeError):
        monitor.measure_idle_baseline(1.0, sleep=clock.sleep)


def test_binned_kwh_splits_pro_rata_at_bin_edges() -> None:
    clock = FakeClock()
    meter = PowerMeter(clock, {"cpu": 100.0})
    monitor = EnergyMonitor([meter], clock=clock).start(background=False)
    for _ in range(8):
        clock.sleep(1.5)
        monitor.sample(read=True)
    monitor.stop()
    bin_starts, kwh = monitor.binned_kwh(bin_s=2.0)
    joules = kwh["cpu"] * J_PER_KWH
    assert joules.sum() == pytest.approx(1200.0)
    assert np.all(np.diff(bin_starts) == 2.0)
    assert bin_starts[0] <= monitor.started_at.timestamp() < bin_starts[0] + 2.0
    assert joules[1:-1] == pytest.approx(np.full(len(joules) - 2, 200.0))  # full bins at constant power


def test_background_thread_samples_and_totals_match_meter() -> None:
    meter = PowerMeter(time.monotonic, {"cpu": 10.0})
    monitor = EnergyMonitor([meter], interval_s=0.05)
    with monitor:
        time.sleep(0.35)
    intervals = monitor.intervals("samples")
    assert len(intervals) >= 4
    assert meter.polls >= 3
    assert sum(iv.energy_j["cpu"] for iv in intervals) == pytest.approx(monitor.total_energy_j()["cpu"])
    # the reading time is the midpoint of the read, so totals match power x duration closely
    assert monitor.total_energy_j()["cpu"] == pytest.approx(10.0 * monitor.duration_s(), rel=0.05)
    assert all(iv.end > iv.start for iv in intervals)


def test_sample_is_cheap_while_thread_runs() -> None:
    meter = PowerMeter(time.monotonic, {"cpu": 10.0})
    with EnergyMonitor([meter], interval_s=0.02) as monitor:
        n = 20_000
        t0 = time.perf_counter()
        for _ in range(n):
            monitor.sample()
        per_call_s = (time.perf_counter() - t0) / n
    assert per_call_s < 100e-6  # <= 1 % of a 10 ms training step (typically ~1 µs)
    assert len(monitor.intervals()) >= n


def test_failing_meter_is_recorded_not_fatal() -> None:
    clock = FakeClock()
    good = PowerMeter(clock, {"cpu": 10.0})
    bad = PowerMeter(clock, {"gpu": 100.0}, name="nvml")
    monitor = EnergyMonitor([good, bad], clock=clock).start(background=False)
    clock.sleep(1.0)
    monitor.sample(read=True)

    def broken() -> dict[str, float]:
        raise OSError("GPU is lost")

    bad.read_energy_j = broken  # type: ignore[method-assign]
    clock.sleep(1.0)
    monitor.stop()
    assert monitor.total_energy_j() == pytest.approx({"cpu": 20.0, "gpu": 100.0})  # last good gpu value kept
    assert monitor.errors == ["nvml: OSError: GPU is lost"]
    assert monitor.figures()["energy/meter_errors"].value == 1


def test_validation_and_should_meter(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError):
        EnergyMonitor([])
    meter = PowerMeter(time.monotonic, {"cpu": 1.0})
    with pytest.raises(ConfigError, match="PUE"):
        EnergyMonitor([meter], pue=0.9)
    with pytest.raises(ConfigError, match="interval"):
        EnergyMonitor([meter], interval_s=0)
    assert should_meter(0) is True
    assert should_meter(1) is False
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("SLURM_LOCALID", raising=False)
    assert should_meter() is True
    monkeypatch.setenv("SLURM_LOCALID", "2")
    assert should_meter() is False
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert should_meter() is True
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(ConfigError):
        should_meter()
