"""greenstack's HF and Lightning callbacks: step-time overhead, and kgCO2e vs CodeCarbon on the same run.

    python -m benchmarks.integrations [--steps 40] [--rounds 16] [--compare-s 30]

1. Step time of a real Hugging Face `Trainer` loop and a real Lightning loop (tiny models built from
   config, CPU, one intra-op thread) without and with `GreenstackCallback`; runs interleaved
   (off/on, then on/off), each round's on/off ratio of median step times, and the median of those
   ratios (target <= 1.02 each).
2. One Lightning run measured at once by greenstack's callback and CodeCarbon's
   `OfflineEmissionsTracker` (country of the greenstack zone, PUE 1 both): both kgCO2e and their ratio,
   decomposed into energy per component and grid intensity, so a gap is explained by its source.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ZONE, COUNTRY = "DE-LU", "DEU"  # greenstack's default carbon zone, and CodeCarbon's country for it


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _timed(callback: Any, hooks: tuple[str, ...], spent: list[float]) -> Any:
    """Wrap the callback's per-step hooks (on the instance) to add their own wall time to `spent`."""
    for name in hooks:
        fn = getattr(callback, name)

        def timed(*args: Any, _fn: Any = fn, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                spent.append(time.perf_counter() - t0)

        setattr(callback, name, timed)
    return callback


# -- Hugging Face ---------------------------------------------------------------------------------
def hf_step_times(steps: int, with_callback: bool, out: Path) -> tuple[list[float], float]:
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    class Stamps(TrainerCallback):
        def __init__(self) -> None:
            self.t: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.t.append(time.perf_counter())

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=128, num_labels=2,
                                                     max_position_embeddings=64))
    data = [{"input_ids": torch.randint(0, 256, (32,)), "labels": torch.tensor(i % 2)} for i in range(512)]
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=16, max_steps=steps, logging_steps=10,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    stamps = Stamps()
    callbacks: list[Any] = [stamps]
    spent: list[float] = []
    if with_callback:
        from greenstack.integrations.hf import GreenstackCallback

        callbacks.append(_timed(GreenstackCallback(out / "greenstack"), ("on_step_begin", "on_step_end", "on_log"),
                                spent))
    Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks).train()
    return [b - a for a, b in zip(stamps.t, stamps.t[1:], strict=False)][2:], sum(spent) / max(steps, 1)


# -- Lightning -------------------------------------------------------------------------------------
def _lightning(max_steps: int, callbacks: list[Any], out: Path, max_time: float | None = None) -> Any:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                                           torch.nn.ReLU(), torch.nn.Linear(512, 10))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(4096, 256), torch.randint(0, 10, (4096,)))
    trainer = pl.Trainer(max_steps=max_steps, max_epochs=-1, accelerator="cpu", devices=1, logger=CSVLogger(str(out)),
                         log_every_n_steps=10, callbacks=callbacks, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(out),
                         max_time={"seconds": max_time} if max_time else None)
    trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=64, shuffle=True))
    return trainer


def lightning_step_times(steps: int, with_callback: bool, out: Path) -> tuple[list[float], float]:
    import lightning.pytorch as pl

    class Stamps(pl.Callback):
        def __init__(self) -> None:
            self.t: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.t.append(time.perf_counter())

    stamps = Stamps()
    callbacks: list[Any] = [stamps]
    spent: list[float] = []
    if with_callback:
        from greenstack.integrations.lightning import GreenstackCallback

        callbacks.append(_timed(GreenstackCallback(out / "greenstack"), ("on_train_batch_start", "on_train_batch_end"),
                                spent))
    _lightning(steps, callbacks, out)
    return [b - a for a, b in zip(stamps.t, stamps.t[1:], strict=False)][2:], sum(spent) / max(steps, 1)


def overhead(name: str, fn: Any, steps: int, rounds: int, root: Path) -> dict[str, float]:
    """Interleaved off/on runs; the ratio is the median over rounds of each round's on/off median step.

    Why per-round pairs: on a shared box the load drifts between runs by more than the callback costs;
    a pair measured back to back sees the same load. Pooled medians and means are reported as well, and
    the callback's own time per step (its hooks timed inside the loop), which load hardly moves.
    """
    times: dict[bool, list[float]] = {False: [], True: []}
    pair_ratios, self_s = [], []
    for r in range(rounds):
        medians = {}
        for on in (False, True) if r % 2 == 0 else (True, False):
            deltas, per_step = fn(steps, on, root / f"{name}-{r}-{int(on)}")
            times[on] += deltas
            medians[on] = _median(deltas)
            if on:
                self_s.append(per_step)
        pair_ratios.append(medians[True] / medians[False])
        print(f"{name:9s} round {r + 1:2d}: off {medians[False] * 1e3:7.2f} ms | on {medians[True] * 1e3:7.2f} ms | "
              f"ratio {pair_ratios[-1]:.4f} | callback {self_s[-1] * 1e6:6.1f} us/step", flush=True)
    off, on = _median(times[False]), _median(times[True])
    mean_ratio = statistics.fmean(times[True]) / statistics.fmean(times[False])
    return {"off_ms": round(off * 1e3, 3), "on_ms": round(on * 1e3, 3), "ratio": round(_median(pair_ratios), 4),
            "pooled_ratio": round(on / off, 4), "mean_ratio": round(mean_ratio, 4),
            "callback_us_per_step": round(_median(self_s) * 1e6, 1),
            "self_ratio": round(1 + _median(self_s) / off, 5)}


# -- greenstack vs CodeCarbon ----------------------------------------------------------------------
def compare_codecarbon(seconds: float, root: Path) -> dict[str, Any]:
    from codecarbon import OfflineEmissionsTracker

    from greenstack.integrations.lightning import GreenstackCallback

    callback = GreenstackCallback(root / "compare" / "greenstack", carbon={"zone": ZONE})
    tracker = OfflineEmissionsTracker(country_iso_code=COUNTRY, measure_power_secs=1, save_to_file=False,
                                      log_level="error", pue=1.0)
    tracker.start()
    try:
        _lightning(10**9, [callback], root / "compare", max_time=seconds)
    finally:
        cc_kg = float(tracker.stop() or 0.0)
    cc = tracker.final_emissions_data
    m = callback.summary["metrics"]
    gs = {c: (m.get(f"energy/{c}_kwh") or {}).get("value") or 0.0 for c in ("cpu", "gpu", "ram")}
    gs_kwh, gs_kg = m["energy/total_kwh"]["value"], m["carbon/total_kg_co2e"]["value"]
    cc_energy = {"cpu": cc.cpu_energy, "gpu": cc.gpu_energy, "ram": cc.ram_energy}
    cc_kwh = float(cc.energy_consumed)
    gs_int, cc_int = gs_kg / gs_kwh * 1000, cc_kg / cc_kwh * 1000
    return {
        "duration_s": round(m["time/duration_s"]["value"], 1),
        "greenstack_kg": gs_kg, "codecarbon_kg": cc_kg, "ratio": round(gs_kg / cc_kg, 4),
        "energy_kwh": {"greenstack": {**gs, "total": gs_kwh}, "codecarbon": {**cc_energy, "total": cc_kwh}},
        "energy_ratio": round(gs_kwh / cc_kwh, 4),
        "intensity_g_per_kwh": {"greenstack": round(gs_int, 2), "codecarbon": round(cc_int, 2)},
        "intensity_ratio": round(gs_int / cc_int, 4),
        "power_w": {"greenstack_cpu": round(gs["cpu"] * 3.6e6 / m["time/duration_s"]["value"], 2),
                    "greenstack_ram": round(gs["ram"] * 3.6e6 / m["time/duration_s"]["value"], 2),
                    "codecarbon_cpu": round(float(cc.cpu_power), 2), "codecarbon_ram": round(float(cc.ram_power), 2)},
        "sources": {"greenstack_energy": m["energy/total_kwh"]["source"],
                    "greenstack_energy_provenance": m["energy/total_kwh"]["provenance"],
                    "greenstack_carbon": m["carbon/intensity_g_per_kwh"]["source"],
                    "codecarbon_cpu_model": cc.cpu_model, "codecarbon_tracking_mode": cc.tracking_mode},
    }


def explain(c: dict[str, Any]) -> list[str]:
    """Where the gap comes from: kg ratio = energy ratio x intensity ratio, energy split by component."""
    e, p = c["energy_kwh"], c["power_w"]
    lines = [f"kg ratio {c['ratio']:.3f} = energy ratio {c['energy_ratio']:.3f} x intensity ratio "
             f"{c['intensity_ratio']:.3f}"]
    lines.append(f"  CPU: greenstack {e['greenstack']['cpu']:.3e} kWh ({p['greenstack_cpu']} W avg; "
                 f"{c['sources']['greenstack_energy']}, {c['sources']['greenstack_energy_provenance']}) vs "
                 f"CodeCarbon {e['codecarbon']['cpu']:.3e} kWh ({p['codecarbon_cpu']} W; model "
                 f"{c['sources']['codecarbon_cpu_model']!r}, mode {c['sources']['codecarbon_tracking_mode']})")
    lines.append(f"  RAM: greenstack {e['greenstack']['ram']:.3e} kWh ({p['greenstack_ram']} W: 0.375 W/GB of "
                 f"installed RAM x process share) vs CodeCarbon {e['codecarbon']['ram']:.3e} kWh "
                 f"({p['codecarbon_ram']} W: its RAM model)")
    lines.append(f"  intensity: greenstack {c['intensity_g_per_kwh']['greenstack']} g/kWh ({ZONE} hourly trace, "
                 f"energy-weighted over the run's hours: {c['sources']['greenstack_carbon']}) vs CodeCarbon "
                 f"{c['intensity_g_per_kwh']['codecarbon']} g/kWh ({COUNTRY} annual mix of its bundled data)")
    lines.append("  PUE: 1.0 in both (greenstack carbon.pue default; CodeCarbon pue=1.0)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="steps per run (overhead part)")
    parser.add_argument("--rounds", type=int, default=16, help="interleaved off/on rounds per framework")
    parser.add_argument("--compare-s", type=float, default=30.0, help="length of the CodeCarbon comparison run")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a shared CPU box: one thread per process keeps the noise down
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("greenstack", "lightning", "lightning.pytorch", "lightning.fabric", "transformers", "codecarbon"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="gs-bench-") as tmp:
        root = Path(tmp)
        hf = overhead("hf", hf_step_times, args.steps, args.rounds, root)
        pl = overhead("lightning", lightning_step_times, args.steps, args.rounds, root)
        for label, r in (("HF Trainer", hf), ("Lightning ", pl)):
            print(f"\n{label}: off {r['off_ms']} ms | on {r['on_ms']} ms | step-time ratio {r['ratio']:.4f} "
                  f"(target <= 1.02; pooled medians {r['pooled_ratio']:.4f}, means {r['mean_ratio']:.4f}); the "
                  f"callback itself {r['callback_us_per_step']} us/step = ratio {r['self_ratio']:.5f}", end="")
        print()
        cmp = compare_codecarbon(args.compare_s, root)
    print(f"\nsame {cmp['duration_s']} s Lightning run: greenstack {cmp['greenstack_kg']:.4e} kgCO2e | CodeCarbon "
          f"{cmp['codecarbon_kg']:.4e} kgCO2e | ratio {cmp['ratio']:.3f}")
    for line in explain(cmp):
        print(line)
    bench = {"hf_step_time_ratio": hf["ratio"], "lightning_step_time_ratio": pl["ratio"],
             "hf_mean_ratio": hf["mean_ratio"], "lightning_mean_ratio": pl["mean_ratio"],
             "hf_callback_us_per_step": hf["callback_us_per_step"], "hf_callback_self_ratio": hf["self_ratio"],
             "lightning_callback_us_per_step": pl["callback_us_per_step"],
             "lightning_callback_self_ratio": pl["self_ratio"],
             "hf_step_ms": [hf["off_ms"], hf["on_ms"]], "lightning_step_ms": [pl["off_ms"], pl["on_ms"]],
             "greenstack_kg": cmp["greenstack_kg"], "codecarbon_kg": cmp["codecarbon_kg"],
             "kg_ratio_greenstack_over_codecarbon": cmp["ratio"], "energy_ratio": cmp["energy_ratio"],
             "intensity_ratio": cmp["intensity_ratio"], "intensity_g_per_kwh": cmp["intensity_g_per_kwh"],
             "power_w": cmp["power_w"], "steps": args.steps, "rounds": args.rounds}
    print("BENCH " + json.dumps(bench))


if __name__ == "__main__":
    main()
