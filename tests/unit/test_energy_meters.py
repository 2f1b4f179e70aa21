"""Meter base class and select_meters on this machine (no RAPL, no NVML: the TDP model is used)."""

from __future__ import annotations

import ctypes.util
import os
from pathlib import Path

import pytest

from greenstack.energy import EnergyMonitor, Meter, MeterUnavailable, node_process_root_pid, select_meters
from greenstack.errors import ConfigError


def _nvml_library_present() -> bool:
    return ctypes.util.find_library("nvidia-ml") is not None or Path("/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1").exists()


def test_select_auto_on_this_machine() -> None:
    meters, reasons = select_meters("auto")
    names = [m.name for m in meters]
    covered = {c for m in meters for c in m.components}
    assert {"cpu", "ram"} <= covered
    for kind in ("nvml", "rapl"):  # each counter is either used or explained in one line
        assert kind in names or any(r.startswith(f"{kind}: ") for r in reasons)
    assert all("\n" not in r for r in reasons)
    if not Path("/sys/class/powercap").exists() and not _nvml_library_present():  # this CPU-only VM
        assert names == ["tdp", "ram"]
        assert "rapl: /sys/class/powercap not present (no RAPL powercap driver, e.g. in a VM)" in reasons
        assert any(r.startswith("nvml: library not found") for r in reasons)
        tdp, ram = meters
        assert tdp.provenance in ("estimated", "fallback") and tdp.source.startswith("tdp:")
        assert tdp.scope == "process" and ram.source == "ram:0.375 W/GB×RSS"
        with pytest.raises(ConfigError, match="energy.meter = 'rapl'.*not present"):
            select_meters("rapl")
        with pytest.raises(ConfigError, match="nvml"):
            select_meters("nvml")


def test_auto_meters_measure_real_cpu_work() -> None:
    meters, _ = select_meters("auto", rapl_root="/nonexistent-powercap", tdp_w=100.0)
    with EnergyMonitor([m for m in meters if m.name in ("tdp", "ram")], interval_s=0.05) as monitor:
        t_end = os.times().elapsed + 0.3
        x = 0
        while os.times().elapsed < t_end:
            x += 1
    energy = monitor.total_energy_j()
    assert energy["cpu"] > 0.0 and energy["ram"] > 0.0
    # at most TDP x duration, since the process can at most saturate the whole CPU
    assert energy["cpu"] <= 100.0 * monitor.duration_s() * 1.05


def test_invalid_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown meter kind"):
        select_meters("joulemeter")
    with pytest.raises(ConfigError) as info:
        select_meters("auto", tdp_w=-5.0, default_tdp_w=0.0, ram_w_per_gb=-1.0)
    assert {p.key for p in info.value.problems} == {"energy.tdp_w", "energy.default_tdp_w", "energy.ram_w_per_gb"}


def test_meter_base_hooks_and_info() -> None:
    with pytest.raises(TypeError):
        Meter()  # type: ignore[abstract]

    class Constant(Meter):
        name, provenance, source, components = "tdp", "estimated", "tdp:test", ("cpu",)

        def read_energy_j(self) -> dict[str, float]:
            return {"cpu": 1.0}

    meter = Constant()
    meter.start()
    meter.poll()
    meter.stop()
    assert meter.read_energy_j() == {"cpu": 1.0}
    assert meter.info() == {"name": "tdp", "provenance": "estimated", "source": "tdp:test",
                            "components": ["cpu"], "scope": "node"}
    assert str(MeterUnavailable("rapl: x")) == "rapl: x"


def test_node_process_root_pid_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert node_process_root_pid() == os.getpid()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    assert node_process_root_pid() == os.getppid()
    meters, _ = select_meters("tdp", rapl_root="/nonexistent-powercap")
    assert {m.pid for m in meters if m.name in ("tdp", "ram")} == {os.getppid()}
