"""NVML meter against a fake pynvml module (this machine has no NVIDIA driver)."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from greenstack.energy.meters import MeterUnavailable
from greenstack.energy.nvml import MIG_NOTE, NvmlMeter, resolve_visible_devices
from greenstack.energy.select import select_meters
from greenstack.errors import ConfigError


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


class NVMLError_LibraryNotFound(NVMLError):
    pass


class NVMLError_NotFound(NVMLError):
    pass


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA A100-SXM4-80GB"
    energy_mj: int | None = 0  # None: counter not supported (pre-Volta)
    power_mw: int | None = 250_000  # None: power reading not supported
    mig: int | None = 0  # None: MIG not supported (pre-Ampere)
    mig_uuids: list[str] = field(default_factory=list)
    util_percent: int = 0
    mem_used: int = 0
    mem_total: int = 80 * 2**30


class FakeNvml:
    """Implements the pynvml functions NvmlMeter uses, raising pynvml-style errors."""

    NVMLError = NVMLError
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound

    def __init__(self, gpus: list[FakeGpu], init_error: Exception | None = None) -> None:
        self.gpus = gpus
        self.init_error = init_error

    def nvmlInit(self) -> None:
        if self.init_error:
            raise self.init_error

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> FakeGpu:
        return self.gpus[i]

    def nvmlDeviceGetUUID(self, h: FakeGpu | tuple) -> str:
        return h[1] if isinstance(h, tuple) else h.uuid

    def nvmlDeviceGetName(self, h: FakeGpu) -> bytes:
        return h.name.encode()  # older pynvml returns bytes

    def nvmlDeviceGetTotalEnergyConsumption(self, h: FakeGpu) -> int:
        if h.energy_mj is None:
            raise NVMLError_NotSupported("Not Supported")
        return h.energy_mj

    def nvmlDeviceGetPowerUsage(self, h: FakeGpu) -> int:
        if h.power_mw is None:
            raise NVMLError_NotSupported("Not Supported")
        return h.power_mw

    def nvmlDeviceGetMigMode(self, h: FakeGpu) -> list[int]:
        if h.mig is None:
            raise NVMLError_NotSupported("Not Supported")
        return [h.mig, h.mig]

    def nvmlDeviceGetMaxMigDeviceCount(self, h: FakeGpu) -> int:
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: FakeGpu, j: int) -> tuple:
        if j >= len(h.mig_uuids):
            raise NVMLError_NotFound("Not Found")
        return (h, h.mig_uuids[j])

    def nvmlDeviceGetUtilizationRates(self, h: FakeGpu) -> SimpleNamespace:
        if h.mig == 1:
            raise NVMLError_NotSupported("Not Supported")  # as on real MIG-enabled GPUs
        return SimpleNamespace(gpu=h.util_percent, memory=0)

    def nvmlDeviceGetMemoryInfo(self, h: FakeGpu) -> SimpleNamespace:
        return SimpleNamespace(used=h.mem_used, total=h.mem_total, free=h.mem_total - h.mem_used)


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


UUIDS = ["GPU-aaaa1111-0000-0000-0000-000000000000", "GPU-bbbb2222-0000-0000-0000-000000000000"]


@pytest.fixture(autouse=True)
def _no_cuda_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_energy_counter_is_used_when_supported() -> None:
    gpus = [FakeGpu(UUIDS[0], energy_mj=1_000_000), FakeGpu(UUIDS[1], energy_mj=5_000_000)]
    meter = NvmlMeter(nvml=FakeNvml(gpus))
    assert meter.provenance == "measured"
    assert meter.source == "nvml.total_energy:GPU0+GPU1"
    assert meter.components == ("gpu",)
    meter.start()
    gpus[0].energy_mj += 120_000  # +120 J
    gpus[1].energy_mj += 30_500  # +30.5 J
    meter.poll()  # no-op for counter devices
    assert meter.read_energy_by_device_j() == pytest.approx({"GPU0": 120.0, "GPU1": 30.5})
    gpus[0].energy_mj += 80_000
    assert meter.read_energy_j() == pytest.approx({"gpu": 230.5})
    info = meter.info()
    assert [d["name"] for d in info["devices"]] == ["NVIDIA A100-SXM4-80GB"] * 2
    assert {d["method"] for d in info["devices"]} == {"total_energy"}


def test_power_polling_integrates_trapezoid_over_fake_clock() -> None:
    gpu = FakeGpu(UUIDS[0], energy_mj=None, power_mw=100_000)
    clock = FakeClock(0.0)
    meter = NvmlMeter(nvml=FakeNvml([gpu]), clock=clock)
    assert meter.source == "nvml.power_poll:GPU0"
    assert meter.provenance == "measured"
    meter.start()  # 100 W at t=0
    for t, watts in [(1.0, 200), (2.0, 300), (4.0, 300), (4.5, 100)]:
        clock.t, gpu.power_mw = t, watts * 1000
        meter.poll()
    # (100+200)/2*1 + (200+300)/2*1 + (300+300)/2*2 + (300+100)/2*0.5 = 150 + 250 + 600 + 100
    assert meter.read_energy_j()["gpu"] == pytest.approx(1100.0)


def test_mixed_counter_and_polling_devices_and_unmeterable_gpu() -> None:
    gpus = [FakeGpu(UUIDS[0], energy_mj=0), FakeGpu(UUIDS[1], energy_mj=None),
            FakeGpu("GPU-cccc", energy_mj=None, power_mw=None)]
    meter = NvmlMeter(nvml=FakeNvml(gpus), clock=FakeClock())
    assert meter.source == "nvml.total_energy:GPU0; nvml.power_poll:GPU1"
    assert len(meter.unmetered) == 1 and "GPU2" in meter.unmetered[0]
    with pytest.raises(MeterUnavailable, match="neither energy counter nor power"):
        NvmlMeter(nvml=FakeNvml([FakeGpu(UUIDS[0], energy_mj=None, power_mw=None)]))


def test_mig_mode_is_labelled_whole_gpu_and_does_not_crash() -> None:
    gpus = [FakeGpu(UUIDS[0], energy_mj=0, mig=1, mem_used=20 * 2**30), FakeGpu(UUIDS[1], mig=None)]
    meter = NvmlMeter(nvml=FakeNvml(gpus))
    assert MIG_NOTE == "whole-GPU energy, MIG slice not attributable"
    assert meter.source == f"nvml.total_energy:GPU0+GPU1 ({MIG_NOTE})"
    info = meter.info()
    assert info["mig"] == MIG_NOTE
    assert info["devices"][0]["mig_mode"] is True and MIG_NOTE in info["devices"][0]["notes"]
    assert info["devices"][1]["mig_mode"] is False
    meter.start()
    gpus[0].energy_mj += 10_000
    assert meter.read_energy_j()["gpu"] == pytest.approx(10.0)
    util = meter.utilization()  # utilisation is not supported in MIG mode: reported as None, no crash
    assert util["devices"][0]["gpu_util_percent"] is None
    assert util["devices"][0]["memory_used_fraction"] == pytest.approx(0.25)


def test_utilization_and_memory() -> None:
    gpus = [FakeGpu(UUIDS[0], util_percent=50, mem_used=2 * 2**30, mem_total=8 * 2**30),
            FakeGpu(UUIDS[1], util_percent=70, mem_used=6 * 2**30, mem_total=8 * 2**30)]
    util = NvmlMeter(nvml=FakeNvml(gpus)).utilization()
    assert util["gpu_util_percent"] == pytest.approx(60.0)
    assert util["memory_used_fraction"] == pytest.approx(0.5)


@pytest.mark.parametrize(("value", "expected"), [
    (None, [0, 1, 2]),
    ("1", [1]),
    ("2,0", [2, 0]),
    ("0,7,1", [0]),  # CUDA ignores everything from the first invalid entry
    ("GPU-bbbb", [1]),  # UUID prefix
    ("gpu-aaaa1111-0000-0000-0000-000000000000, 2", [0, 2]),
    ("GPU-", []),  # ambiguous prefix
    ("", []),
    ("-1", []),
    ("MIG-GPU-bbbb2222-0000-0000-0000-000000000000/1/0", [1]),  # legacy MIG form
    ("MIG-1234", [2]),  # modern MIG UUID, resolved through the parent map
])
def test_resolve_visible_devices(value: str | None, expected: list[int]) -> None:
    uuids = [*UUIDS, "GPU-cccc3333"]
    assert resolve_visible_devices(value, uuids, {"MIG-1234": 2}) == expected


def test_cuda_visible_devices_filters_metered_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = [FakeGpu(UUIDS[0], energy_mj=0), FakeGpu(UUIDS[1], energy_mj=0)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb2222")
    meter = NvmlMeter(nvml=FakeNvml(gpus))
    assert [d.index for d in meter.devices] == [1]
    assert meter.source == "nvml.total_energy:GPU1"
    meter.start()
    gpus[0].energy_mj += 999_000  # not visible: not counted
    gpus[1].energy_mj += 2_000
    assert meter.read_energy_j()["gpu"] == pytest.approx(2.0)
    # the node-wide meter can be told to ignore a per-rank restriction
    assert len(NvmlMeter(nvml=FakeNvml(gpus), respect_cuda_visible_devices=False).devices) == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(MeterUnavailable, match="hides all 2 GPU"):
        NvmlMeter(nvml=FakeNvml(gpus))


def test_cuda_visible_mig_uuid_meters_parent_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = [FakeGpu(UUIDS[0], energy_mj=0), FakeGpu(UUIDS[1], energy_mj=0, mig=1, mig_uuids=["MIG-abc", "MIG-def"])]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-def")
    meter = NvmlMeter(nvml=FakeNvml(gpus))
    assert [d.index for d in meter.devices] == [1]
    assert MIG_NOTE in meter.source


def test_unavailable_library_reason_and_forcing() -> None:
    fake = FakeNvml([], init_error=NVMLError_LibraryNotFound("NVML Shared Library Not Found"))
    with pytest.raises(MeterUnavailable, match="^nvml: library not found"):
        NvmlMeter(nvml=fake)
    with pytest.raises(MeterUnavailable, match="no NVIDIA GPU"):
        NvmlMeter(nvml=FakeNvml([]))
    with pytest.raises(ConfigError, match="library not found"):
        select_meters("nvml", nvml=fake, rapl_root="/nonexistent-powercap")


def test_select_auto_uses_nvml_for_gpus() -> None:
    fake = FakeNvml([FakeGpu(UUIDS[0])])
    meters, reasons = select_meters("auto", nvml=fake, rapl_root="/nonexistent-powercap")
    assert [m.name for m in meters] == ["nvml", "tdp", "ram"]
    assert not any(r.startswith("nvml") for r in reasons)
    assert any(r.startswith("rapl: /nonexistent-powercap not present") for r in reasons)
