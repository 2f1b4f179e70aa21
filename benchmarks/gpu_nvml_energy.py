"""On a GPU: NVML's cumulative energy counter vs integrated power polling, on a real training loop.

Two monitors watch the same run: one reads `nvmlDeviceGetTotalEnergyConsumption`, the other integrates
`nvmlDeviceGetPowerUsage` samples (the counter is hidden from it, as on GPUs that lack one). Target:
within 2 %. Without a CUDA GPU it says so and exits 0.

    python -m benchmarks.gpu_nvml_energy [--seconds 60] [--poll-s 0.1]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


class _HideCounter:
    """pynvml as seen by a GPU without the energy counter."""

    def __init__(self, nvml) -> None:
        self._nvml = nvml

    def __getattr__(self, name):
        if name == "nvmlDeviceGetTotalEnergyConsumption":
            raise AttributeError(name)
        return getattr(self._nvml, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--poll-s", type=float, default=0.1)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to compare")
        print("BENCH " + json.dumps({"skipped": "no CUDA GPU"}))
        return
    import pynvml

    from greenstack.energy import EnergyMonitor
    from greenstack.energy.nvml import NvmlMeter
    from greenstack.models import build_timm

    counter = NvmlMeter()
    polled = NvmlMeter(nvml=_HideCounter(pynvml))
    assert {d.method for d in counter.devices} == {"total_energy"}, "this GPU has no energy counter"
    assert {d.method for d in polled.devices} == {"power_poll"}
    model = build_timm("resnet50", num_classes=1000).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(128, 3, 224, 224, device="cuda")
    y = torch.randint(0, 1000, (128,), device="cuda")
    monitors = [EnergyMonitor([counter], interval_s=1.0), EnergyMonitor([polled], interval_s=args.poll_s)]
    for m in monitors:
        m.start()
    t0, steps = time.time(), 0
    while time.time() - t0 < args.seconds:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps += 1
    torch.cuda.synchronize()
    for m in monitors:
        m.stop()
    e_counter = monitors[0].total_energy_j()["gpu"]
    e_polled = monitors[1].total_energy_j()["gpu"]
    diff_pct = 100 * (e_polled - e_counter) / e_counter
    print(f"{steps} steps in {args.seconds:.0f} s on {counter.devices[0].name}")
    print(f"counter {e_counter / 1000:.2f} kJ | polling every {args.poll_s} s {e_polled / 1000:.2f} kJ | "
          f"difference {diff_pct:+.2f} % (target within ±2 %)")
    print("BENCH " + json.dumps({"counter_kj": round(e_counter / 1000, 3), "polled_kj": round(e_polled / 1000, 3),
                                 "polled_vs_counter_pct": round(diff_pct, 3), "steps": steps}))


if __name__ == "__main__":
    main()
