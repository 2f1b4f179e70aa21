"""RAPL meter against a fake powercap sysfs tree (this machine has none)."""

from __future__ import annotations

from pathlib import Path

import pytest

from greenstack.energy.meters import MeterUnavailable
from greenstack.energy.rapl import RaplMeter
from greenstack.energy.select import select_meters
from greenstack.errors import ConfigError


def _zone(path: Path, name: str, energy_uj: int, max_uj: int | None = 1_000_000_000) -> Path:
    path.mkdir(parents=True)
    (path / "name").write_text(name + "\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    if max_uj is not None:
        (path / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return path


def make_tree(root: Path, *, dram: bool = True, max_uj: int | None = 1_000_000_000) -> dict[str, Path]:
    """Layout like /sys/class/powercap: sub-zones nested in the package and symlinked at the top level."""
    root.mkdir(exist_ok=True)
    (root / "intel-rapl").mkdir()  # the control-type directory, not a zone
    pkg = _zone(root / "intel-rapl:0", "package-0", 5_000_000, max_uj)
    core = _zone(pkg / "intel-rapl:0:0", "core", 1_000_000, max_uj)
    (root / "intel-rapl:0:0").symlink_to(core)
    zones = {"package": pkg, "core": core}
    if dram:
        zones["dram"] = _zone(pkg / "intel-rapl:0:1", "dram", 2_000_000, max_uj)
        (root / "intel-rapl:0:1").symlink_to(zones["dram"])
    zones["psys"] = _zone(root / "intel-rapl:1", "psys", 9_000_000, max_uj)
    return zones


def set_uj(zone: Path, value: int) -> None:
    (zone / "energy_uj").write_text(f"{value}\n")


def test_package_and_dram_counted_core_and_psys_not(tmp_path: Path) -> None:
    zones = make_tree(tmp_path)
    meter = RaplMeter(root=tmp_path)
    assert meter.components == ("cpu", "ram")
    assert meter.provenance == "measured"
    assert meter.source == "rapl:package-0+dram"
    assert sorted(z.name for z in meter.zones) == ["dram", "package-0"]
    meter.start()
    set_uj(zones["package"], 5_000_000 + 12_500_000)  # +12.5 J
    set_uj(zones["dram"], 2_000_000 + 1_500_000)  # +1.5 J
    set_uj(zones["core"], 1_000_000 + 99_000_000)  # inside the package: must not add
    set_uj(zones["psys"], 9_000_000 + 99_000_000)  # whole platform: must not add
    assert meter.read_energy_j() == pytest.approx({"cpu": 12.5, "ram": 1.5})
    assert {z["name"] for z in meter.info()["zones"]} == {"package-0", "dram"}
    assert any("psys" in s for s in meter.info()["skipped_zones"])


def test_counter_wraparound_adds_max_range(tmp_path: Path) -> None:
    zones = make_tree(tmp_path, max_uj=10_000_000)
    set_uj(zones["package"], 9_000_000)
    meter = RaplMeter(root=tmp_path)
    meter.start()
    set_uj(zones["package"], 9_500_000)
    meter.poll()  # +0.5 J
    set_uj(zones["package"], 1_000_000)  # wrapped: 9.5 -> 10 (range) -> 1.0 = +1.5 J
    meter.poll()
    set_uj(zones["package"], 2_000_000)  # +1.0 J
    assert meter.read_energy_j()["cpu"] == pytest.approx(3.0)
    assert meter.info()["zones"][0]["wraps"] == 1


def test_reset_without_known_range_never_goes_negative(tmp_path: Path) -> None:
    zones = make_tree(tmp_path, dram=False, max_uj=None)
    meter = RaplMeter(root=tmp_path)
    assert meter.components == ("cpu",)
    meter.start()
    set_uj(zones["package"], 6_000_000)  # +1 J
    meter.poll()
    set_uj(zones["package"], 100)  # drop with unknown range: interval discarded, not negative
    meter.poll()
    set_uj(zones["package"], 1_000_100)  # +1 J
    assert meter.read_energy_j()["cpu"] == pytest.approx(2.0)


def test_permission_denied_gives_file_and_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    zones = make_tree(tmp_path)
    denied = zones["package"] / "energy_uj"
    real_read_text = Path.read_text

    def read_text(self: Path, *args: object, **kwargs: object) -> str:
        if self == denied:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(MeterUnavailable) as info:
        RaplMeter(root=tmp_path)
    message = str(info.value)
    assert str(denied) in message
    assert "permission denied" in message
    assert "sudo chmod o+r /sys/class/powercap/intel-rapl:*/energy_uj" in message
    assert "root" in message

    # auto falls back to the TDP model and says why; forcing rapl is a config error with the same reason
    meters, reasons = select_meters("auto", rapl_root=str(tmp_path), nvml=_NoNvml())
    assert [m.name for m in meters] == ["tdp", "ram"]
    assert any(r.startswith("rapl: permission denied") for r in reasons)
    with pytest.raises(ConfigError, match="chmod o\\+r"):
        select_meters("rapl", rapl_root=str(tmp_path), nvml=_NoNvml())


def test_missing_root_and_no_package(tmp_path: Path) -> None:
    with pytest.raises(MeterUnavailable, match="not present"):
        RaplMeter(root=tmp_path / "absent")
    _zone(tmp_path / "intel-rapl:0", "psys", 1)
    with pytest.raises(MeterUnavailable, match="no intel-rapl package domain"):
        RaplMeter(root=tmp_path)


def test_select_auto_uses_rapl_for_cpu_and_dram(tmp_path: Path) -> None:
    make_tree(tmp_path)
    meters, reasons = select_meters("auto", rapl_root=str(tmp_path), nvml=_NoNvml())
    assert [m.name for m in meters] == ["rapl"]
    assert "tdp: not used (RAPL measures the CPU)" in reasons
    assert any(r.startswith("nvml: library not found") for r in reasons)
    # without a dram domain RAM falls back to the RSS estimate
    other = tmp_path / "nodram"
    make_tree(other, dram=False)
    meters, reasons = select_meters("auto", rapl_root=str(other), nvml=_NoNvml())
    assert [m.name for m in meters] == ["rapl", "ram"]
    assert any("no dram domain" in r for r in reasons)
    # forcing tdp ignores a working RAPL
    meters, reasons = select_meters("tdp", rapl_root=str(tmp_path), nvml=_NoNvml())
    assert [m.name for m in meters] == ["tdp", "ram"]
    assert any(r.startswith("rapl: not used") for r in reasons)


class _NoNvml:
    """A pynvml stand-in whose library is missing."""

    class NVMLError(Exception):
        pass

    class NVMLError_LibraryNotFound(NVMLError):
        pass

    def nvmlInit(self) -> None:
        raise self.NVMLError_LibraryNotFound("NVML Shared Library Not Found")
