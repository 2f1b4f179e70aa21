"""TDP table matching, the TDP x utilisation CPU model and the RSS RAM model."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from greenstack.energy import tdp as tdp_mod
from greenstack.energy.tdp import (
    ProcessTree,
    RamRssMeter,
    TdpMeter,
    load_cpu_power_table,
    match_cpu_tdp,
    normalize_cpu_name,
    process_tree_cpu_seconds,
    process_tree_rss_bytes,
    read_cpuinfo,
)

DATA = Path(tdp_mod.__file__).parent / "data"


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_shipped_table_and_attribution() -> None:
    lines = (DATA / "cpu_power.csv").read_text().splitlines()
    assert lines[0] == "Name,TDP" and len(lines) == 4904
    table = load_cpu_power_table()
    assert len(table) > 4800
    licence = (DATA / "LICENSE-cpu_power.md").read_text()
    assert "b05965e43b690cdc53787c7577adbe6e2caf4ed9" in licence and "MIT" in licence
    assert "codecarbon/data/hardware/cpu_power.csv" in licence


@pytest.mark.parametrize(("model", "entry", "tdp_w", "method"), [
    ("Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz", "Intel Xeon Gold 6248", 150.0, "exact"),
    ("Intel(R) Xeon(R) Gold 6248R CPU @ 3.00GHz", "Intel Xeon Gold 6248R", 205.0, "exact"),
    ("AMD EPYC 7763 64-Core Processor", "AMD EPYC 7763", 280.0, "exact"),
    ("Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz", "Intel Xeon E5-2680 v4", 120.0, "exact"),
    ("12th Gen Intel(R) Core(TM) i7-12700K", "Intel Core i7-12700K", 190.0, "exact"),
    ("AMD Ryzen 7 PRO 4750U with Radeon Graphics", "AMD Ryzen 7 PRO 4750U", 15.0, "exact"),
    ("Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz (engineering sample)", "Intel Xeon Gold 6248", 150.0, "contained"),
    ("Intel(R) Core(TM) i7 8700K", "Intel Core i7-8700K", 95.0, "fuzzy"),
])
def test_match_known_cpus(model: str, entry: str, tdp_w: float, method: str) -> None:
    match = match_cpu_tdp(model)
    assert (match.entry, match.tdp_w, match.method) == (entry, tdp_w, method)


@pytest.mark.parametrize("model", [
    "Intel(R) Xeon(R) Processor",  # this machine: no model number, must not guess
    "Intel(R) Xeon(R) CPU @ 2.20GHz",
    "AMD EPYC 7B13 64-Core Processor",  # close to "AMD EPYC 7B12" but a different part
    "Totally Unknown CPU 9000",
])
def test_unknown_cpus_do_not_match(model: str) -> None:
    match = match_cpu_tdp(model)
    assert match.entry is None and match.tdp_w is None and match.method is None


def test_normalize() -> None:
    assert normalize_cpu_name("Intel(R) Core(TM) i9-9900K CPU @ 3.60GHz") == "intel core i9-9900k"
    assert normalize_cpu_name("AMD Ryzen Threadripper PRO 5995WX 64-Cores") == "amd ryzen threadripper pro 5995wx"


def test_unknown_cpu_is_labelled_fallback_default() -> None:
    meter = TdpMeter(cpu_model="Mystery CPU", logical_cpus=2, sockets=1)
    assert meter.provenance == "fallback"
    assert meter.tdp_w == 85.0
    assert meter.source == "tdp:unknown CPU 'Mystery CPU': default 85 W×cpu_util"
    other = TdpMeter(cpu_model="Mystery CPU", default_tdp_w=120.0, logical_cpus=2, sockets=1)
    assert other.tdp_w == 120.0 and "default 120 W" in other.source


def test_table_and_configured_tdp_sources() -> None:
    meter = TdpMeter(cpu_model="AMD EPYC 7763 64-Core Processor", logical_cpus=256, sockets=2)
    assert meter.provenance == "estimated"
    assert meter.source == "tdp:AMD EPYC 7763 (2×280 W)×cpu_util"
    assert meter.power_cap_w == 560.0
    assert meter.info()["matched_entry"] == "AMD EPYC 7763"
    configured = TdpMeter(cpu_model="AMD EPYC 7763 64-Core Processor", tdp_w=200.0, logical_cpus=8, sockets=1)
    assert configured.tdp_w == 200.0 and configured.provenance == "estimated"
    assert configured.source.startswith("tdp:configured 200 W")


def test_tdp_times_utilisation_integrated_over_polls() -> None:
    clock, cpu = FakeClock(10.0), {"s": 50.0}
    meter = TdpMeter(cpu_model="Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz", logical_cpus=4, sockets=1,
                     clock=clock, cpu_seconds_fn=lambda: cpu["s"])
    meter.start()
    clock.t, cpu["s"] = 11.0, 52.0  # 2 CPU-s in 1 s on 4 CPUs: util 0.5 -> 75 W for 1 s
    meter.poll()
    assert meter.last_cpu_util == pytest.approx(0.5)
    clock.t, cpu["s"] = 13.0, 53.0  # util 0.125 -> 18.75 W for 2 s
    meter.poll()
    clock.t = 14.0  # idle
    meter.stop()
    assert meter.read_energy_j() == pytest.approx({"cpu": 75.0 + 37.5})
    assert meter.last_cpu_util == 0.0


def test_read_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    block = "processor\t: {i}\nmodel name\t: Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz\nphysical id\t: {p}\n\n"
    info.write_text("".join(block.format(i=i, p=i % 2) for i in range(4)))
    assert read_cpuinfo(str(info)) == ("Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz", 2)
    meter = TdpMeter(cpuinfo_path=str(info), logical_cpus=4)
    assert meter.sockets == 2 and meter.source == "tdp:Intel Xeon Gold 6248 (2×150 W)×cpu_util"
    assert read_cpuinfo(str(tmp_path / "missing")) == ("unknown CPU", 1)


def test_process_tree_cpu_includes_children() -> None:
    before = process_tree_cpu_seconds(os.getpid())
    busy = "import time\nt=time.process_time()\nwhile time.process_time()-t<0.3: pass\n"
    child = subprocess.Popen([sys.executable, "-c", busy])
    deadline = time.monotonic() + 0.25
    during = before
    while time.monotonic() < deadline:  # sample while the child is alive (live descendant)
        time.sleep(0.05)
        during = process_tree_cpu_seconds(os.getpid())
    child.wait()  # reaped: its time moves to our children_user/system
    after = process_tree_cpu_seconds(os.getpid())
    assert during - before > 0.05
    assert after - before >= 0.3
    assert after >= during


def test_process_tree_lists_descendants_at_most_every_refresh_and_loses_no_cpu_time() -> None:
    """The meters read at logging steps: listing children scans every /proc entry, so it is cached for
    `refresh_s`; a child started in between is counted at the next refresh with all its CPU time."""
    clock = FakeClock(0.0)
    tree = ProcessTree(os.getpid(), refresh_s=2.0, clock=clock)
    calls = {"n": 0}
    real = tree.root.children

    def counting(**kw):
        calls["n"] += 1
        return real(**kw)

    tree.root.children = counting
    own = psutil.Process()
    own_before = sum(own.cpu_times()[:2])
    before = process_tree_cpu_seconds(tree=tree)
    busy = "import sys,time\nt=time.process_time()\nwhile time.process_time()-t<0.3: pass\nsys.stdin.read()\n"
    child = subprocess.Popen([sys.executable, "-c", busy], stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and psutil_cpu(child.pid) < 0.3:
            time.sleep(0.05)
        cached = process_tree_cpu_seconds(tree=tree)  # child alive, list not refreshed yet
        assert calls["n"] == 1 and child.pid not in [p.pid for p in tree.processes()]
        own_growth = sum(own.cpu_times()[:2]) - own_before  # this process kept polling meanwhile
        assert cached - before - own_growth < 0.3
        clock.t = 2.0
        refreshed = process_tree_cpu_seconds(tree=tree)
        assert calls["n"] == 2 and child.pid in [p.pid for p in tree.processes()]
        assert refreshed - before >= 0.3 - 0.02  # the child's whole CPU time so far (clock ticks), none lost
    finally:
        child.communicate(b"")
    after = process_tree_cpu_seconds(tree=tree)  # reaped, still cached: skipped, time in children_*
    assert after >= refreshed - 0.02 and calls["n"] == 2  # clock-tick rounding once the time moves to children_*


def psutil_cpu(pid: int) -> float:
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return t.user + t.system


def test_ram_rss_trapezoid() -> None:
    clock, rss = FakeClock(0.0), {"b": 2**30}
    meter = RamRssMeter(clock=clock, rss_bytes_fn=lambda: rss["b"])
    assert meter.source == "ram:0.375 W/GB×RSS" and meter.provenance == "estimated"
    meter.start()
    clock.t = 10.0
    meter.poll()  # 1 GB constant for 10 s: 3.75 J
    clock.t, rss["b"] = 12.0, 3 * 2**30
    meter.poll()  # ramp 0.375 W -> 1.125 W over 2 s: 1.5 J
    assert meter.read_energy_j()["ram"] == pytest.approx(3.75 + 1.5)
    assert meter.info()["peak_rss_gb"] == pytest.approx(3.0)
    assert process_tree_rss_bytes() > 10 * 2**20
