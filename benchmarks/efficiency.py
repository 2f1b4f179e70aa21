"""The efficiency stack (`efficiency=default`, auto modes) vs no efficiency policies, side by side, one process.

For a timm CNN (resnet10t), a small ViT and a small BERT: steady-state training throughput (after the
first-batch probes) and energy per sample. The stack is built from conf/efficiency/default.yaml, so this
measures what users get. `auto` must never leave a model slower than `none`: the BENCH line's
`auto_vs_none_throughput_ratio_min` is the worst model's ratio (target >= 0.98). Probe costs (a one-off
at the first batch) are reported apart.

The two contenders train in lockstep: two real training loops in two threads that pass a baton after
every optimizer step, so exactly one computes at a time and neighbouring steps of both see the same
machine, and both threads are pinned to the same core. On a shared machine, load from other processes
changes step times by 10-20 % from one second to the next and differs between cores; running the
contenders one after the other, or on different cores, would measure that instead of the policies.
Each contender's energy is the energy read between the start and end of its own steps.

    python -m benchmarks.efficiency [--steps 40] [--rounds 2] [--threads 1]

`--gpu` (see benchmarks/gpu_efficiency.sh) instead compares, on a CUDA GPU with NVML's energy counter,
plain fp32 with eager attention against bf16 + SDPA + torch.compile forced through the same policies
(and the default stack in auto mode with compile enabled), on a ViT: target >= 2.5x samples per joule.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from hydra.utils import instantiate

from benchmarks._common import IterationTimer
from greenstack.compose import compose_with_problems
from greenstack.data import synthetic_image, synthetic_text
from greenstack.efficiency.probe import MonitorEnergy
from greenstack.engine.events import Event
from greenstack.engine.loop import Trainer, TrainerConfig
from greenstack.engine.optim import Optim
from greenstack.engine.policy import Policy
from greenstack.engine.reporter import Reporter
from greenstack.measure import CarbonConfig, EnergyConfig, Measurement
from greenstack.models import build_timm, build_transformers

SEED = 0
SKIP = 3  # steps excluded from the steady state (the first one carries the probes)
BERT = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 512, "max_position_embeddings": 128}


def workloads() -> dict[str, Callable[[], tuple[torch.nn.Module, Any]]]:
    """name -> builder of (model, data), seeded so every contender gets the same start."""

    def cnn() -> tuple[torch.nn.Module, Any]:
        data = synthetic_image(num_samples=512, num_classes=4, batch_size=32, image_size=32, seed=SEED)
        torch.manual_seed(SEED)
        return build_timm("resnet10t", data.num_classes, data.in_chans), data

    def vit() -> tuple[torch.nn.Module, Any]:
        data = synthetic_image(num_samples=512, num_classes=4, batch_size=32, image_size=32, seed=SEED)
        torch.manual_seed(SEED)
        return build_timm("vit_tiny_patch16_224", data.num_classes, data.in_chans,
                          kwargs={"img_size": 32, "patch_size": 4, "depth": 2}), data

    def bert() -> tuple[torch.nn.Module, Any]:
        data = synthetic_text(num_samples=512, num_classes=4, batch_size=32, max_length=32, seed=SEED)
        torch.manual_seed(SEED)
        return build_transformers(data.num_classes, config=BERT), data

    return {"resnet10t (timm CNN)": cnn, "vit_tiny d2 (timm ViT)": vit, "bert 2x128 (transformers)": bert}


def trimmed_mean(values: list[float], cut: float = 0.1) -> float:
    """Mean without the `cut` fastest and slowest fractions: throughput (a mean, so batches of varying
    length count right) without the bursts other processes on a shared machine add."""
    values = sorted(values)
    k = int(len(values) * cut)
    kept = values[k:len(values) - k] or values
    return sum(kept) / len(kept)


def default_stack() -> list[Policy]:
    """The policies of conf/efficiency/default.yaml, exactly as `efficiency=default` builds them."""
    cfg, problems = compose_with_problems(["efficiency=default"])
    assert cfg is not None and not problems, problems
    return [instantiate(spec) for spec in cfg.efficiency.values() if hasattr(spec, "get") and spec.get("_target_")]


class Baton:
    """Strict alternation of two training loops (or one, once the other has finished)."""

    def __init__(self, first: int) -> None:
        self.cond = threading.Condition()
        self.turn, self.done = first, [False, False]

    def wait(self, me: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == me or self.done[1 - me])

    def give(self, me: int, *, finished: bool = False) -> None:
        with self.cond:
            self.done[me] = self.done[me] or finished
            self.turn = 1 - me
            self.cond.notify_all()


class TakeTurn(Policy):
    """First policy of a contender: waits for its turn before training starts; exposes the shared meter."""

    events = frozenset({Event.FIT_START})

    def __init__(self, baton: Baton, me: int, monitor: Any, clock: GiveTurn) -> None:
        super().__init__(name="take_turn")
        self.baton, self.me, self.monitor, self.clock = baton, me, monitor, clock

    def __call__(self, event: Event, state: Any, reporter: Reporter) -> None:
        self.baton.wait(self.me)
        self.clock.resume()


class GiveTurn(Policy):
    """Last policy of a contender: times its own step (and reads energy), then hands over the baton."""

    events = frozenset({Event.STEP_END, Event.FIT_END, Event.EXCEPTION})

    def __init__(self, baton: Baton, me: int, energy: MonitorEnergy) -> None:
        super().__init__(name="give_turn")
        self.baton, self.me, self.energy = baton, me, energy
        self.step_s: list[float] = []
        self.first_step_s = 0.0
        self.joules = 0.0
        self.samples = 0
        self._t0 = self._e0 = 0.0
        self._seen = 0

    def resume(self) -> None:
        self._e0 = self.energy()
        self._t0 = time.perf_counter()

    def __call__(self, event: Event, state: Any, reporter: Reporter) -> None:
        if event is not Event.STEP_END:
            self.baton.give(self.me, finished=True)
            return
        seconds = time.perf_counter() - self._t0
        joules = self.energy() - self._e0
        if state.step == 1:
            self.first_step_s = seconds
        elif state.step > SKIP:
            self.step_s.append(seconds)
            self.joules += joules
            self.samples += state.samples_seen - self._seen
        self._seen = state.samples_seen
        self.baton.give(self.me)
        self.baton.wait(self.me)
        self.resume()


def run_pair(build: Callable[[], tuple[torch.nn.Module, Any]], steps: int, first: int) -> dict[str, dict[str, Any]]:
    """Train `none` (0) and `auto` (1) in lockstep; `first` takes the first step."""
    from greenstack.energy import EnergyMonitor, select_meters

    cfg = EnergyConfig()
    meters, _ = select_meters(cfg.meter, tdp_w=cfg.tdp_w, default_tdp_w=cfg.default_tdp_w, ram_w_per_gb=cfg.ram_w_per_gb)
    monitor = EnergyMonitor(meters, interval_s=1.0).start()
    energy = MonitorEnergy(monitor)
    baton = Baton(first)
    trainers, clocks, stacks = [], [], []
    for me, stack in ((0, False), (1, True)):
        model, data = build()
        clock = GiveTurn(baton, me, energy)
        efficiency = default_stack() if stack else []
        trainers.append(Trainer(model, data.train, Optim(lr=1e-3), TrainerConfig(
            max_duration=f"{steps}ba", progress=False, eval_interval=f"{10 * steps}ba"),
            policies=[TakeTurn(baton, me, monitor, clock), *efficiency, clock], batch_size=data.batch_size))
        clocks.append(clock)
        stacks.append(efficiency)
    errors: list[BaseException] = []
    cpu = min(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None

    def fit(trainer: Trainer) -> None:
        if cpu is not None:  # both loops on one core: the other core's neighbours cannot favour either
            os.sched_setaffinity(0, {cpu})
        try:
            trainer.fit()
        except BaseException as e:  # noqa: BLE001 - reported after both threads ended
            errors.append(e)

    threads = [threading.Thread(target=fit, args=(t,)) for t in trainers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monitor.stop()
    if errors:
        raise errors[0]
    out = {}
    for label, clock, efficiency in zip(("none", "auto"), clocks, stacks, strict=True):
        out[label] = {"step_s": clock.step_s, "first_step_s": clock.first_step_s,
                      "batch": trainers[0].state.batch_size,
                      "j_per_sample": clock.joules / clock.samples if clock.samples else float("nan"),
                      "samples_per_s_total": clock.samples / sum(clock.step_s) if clock.step_s else float("nan"),
                      "energy_provenance": energy.provenance, "energy_source": energy.source,
                      "decisions": {p.name.removeprefix("efficiency."): ("on" if p.on else "off") for p in efficiency
                                    if getattr(p, "on", None) is not None and p.enabled},
                      "reasons": [f"{p.key}: {'on' if p.on else 'off'} — {p.reason}" for p in efficiency
                                  if getattr(p, "on", None) is not None and p.enabled]}
    return out


class EnergyWindow(Policy):
    """Energy (synchronous meter reads) and samples between the end of step `first` and the last step.

    GPU mode runs the contenders one after the other: a dedicated GPU has no neighbours to share with,
    and NVML's counter is node-wide, so lockstep threads could not split it between them."""

    events = frozenset({Event.STEP_END})

    def __init__(self, measurement: Measurement, first: int) -> None:
        super().__init__(name="energy_window")
        self.measurement, self.first = measurement, first
        self.start_j = self.end_j = 0.0
        self.start_samples = self.end_samples = 0
        self.provenance = self.source = ""

    def __call__(self, event: Event, state: Any, reporter: Reporter) -> None:
        if state.step == self.first or state.step == state.max_steps:
            if state.device.type == "cuda":
                torch.cuda.synchronize()
            energy = MonitorEnergy(self.measurement.monitor)
            joules = energy()
            self.provenance, self.source = energy.provenance, energy.source
            if state.step == self.first:
                self.start_j, self.start_samples = joules, state.samples_seen
            else:
                self.end_j, self.end_samples = joules, state.samples_seen

    def j_per_sample(self) -> float:
        samples = self.end_samples - self.start_samples
        return (self.end_j - self.start_j) / samples if samples else float("nan")


def gpu_main(args: argparse.Namespace) -> None:
    """fp32 + eager attention vs bf16 + SDPA + compile (and the auto stack) on a ViT, samples per joule (NVML)."""
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to compare")
        print("BENCH " + json.dumps({"skipped": "no CUDA GPU"}))
        return
    from torch.utils.data import DataLoader, TensorDataset

    from greenstack.efficiency.attention import set_attention_implementation
    from greenstack.policies.efficiency.amp import MixedPrecision
    from greenstack.policies.efficiency.compile import Compile
    from greenstack.policies.efficiency.sdpa import SdpaAttention

    device = torch.device("cuda")
    g = torch.Generator(device="cuda").manual_seed(SEED)
    n = args.gpu_batch * args.gpu_batches_per_epoch  # every batch full: no shape change, no recompilation
    x = torch.randn(n, 3, 224, 224, device=device, generator=g)
    y = torch.randint(0, 1000, (n,), device=device, generator=g)

    def collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {"inputs": torch.stack([i for i, _ in items]), "labels": torch.stack([t for _, t in items])}

    def loader() -> DataLoader:  # data already on the GPU, so the input pipeline never limits the fast contender
        return DataLoader(TensorDataset(x, y), batch_size=args.gpu_batch, shuffle=True, collate_fn=collate,
                          generator=torch.Generator().manual_seed(SEED), drop_last=True)

    def contender(name: str) -> dict[str, Any]:
        torch.manual_seed(SEED)
        model = build_timm(args.gpu_model, 1000, 3)
        if name == "fp32":
            set_attention_implementation(model, "eager")
            policies: list[Policy] = []
        elif name == "bf16+sdpa+compile":
            policies = [MixedPrecision(mode="bf16"), SdpaAttention(mode="on"), Compile(mode="on")]
        else:  # the default stack, auto modes, with compile enabled
            policies = default_stack()
            for p in policies:
                if p.name == "efficiency.compile":
                    p.enabled = True
        timer = IterationTimer()
        measurement = Measurement(EnergyConfig(meter="nvml"), CarbonConfig(), count_flops=False)
        window = EnergyWindow(measurement, first=args.gpu_warmup)
        trainer = Trainer(model, loader(), Optim(lr=1e-4), TrainerConfig(
            max_duration=f"{args.steps}ba", progress=False, eval_interval=f"{10 * args.steps}ba", device="cuda"),
            policies=[measurement, timer, *policies, window], batch_size=args.gpu_batch)
        trainer.fit()
        steps = timer.deltas()[args.gpu_warmup + 1:]
        decisions = {p.name.removeprefix("efficiency."): ("on" if p.on else "off") for p in policies
                     if getattr(p, "on", None) is not None}
        result = {"samples_per_s": args.gpu_batch / statistics.median(steps),
                  "samples_per_j": 1 / window.j_per_sample(), "energy_source": window.source,
                  "energy_provenance": window.provenance, "decisions": decisions,
                  "reasons": {p.name: p.reason for p in policies if getattr(p, "reason", "")}}
        print(f"{name:22s} {result['samples_per_s']:9.1f} samples/s {result['samples_per_j']:9.3f} samples/J "
              f"[{window.provenance}: {window.source}] {decisions}", flush=True)
        for policy, reason in result["reasons"].items():
            print(f"    {policy}: {reason}")
        return result

    results = {name: contender(name) for name in ("fp32", "bf16+sdpa+compile", "auto+compile")}
    base = results["fp32"]
    ratios = {name: {"samples_per_j": r["samples_per_j"] / base["samples_per_j"],
                     "samples_per_s": r["samples_per_s"] / base["samples_per_s"]} for name, r in results.items()}
    print(f"\n{torch.cuda.get_device_name(device)}, {args.gpu_model}, batch {args.gpu_batch}, "
          f"steady state after {args.gpu_warmup} steps of {args.steps}")
    for name, r in ratios.items():
        print(f"{name:22s} samples/J x{r['samples_per_j']:.2f}  samples/s x{r['samples_per_s']:.2f}")
    best = ratios["bf16+sdpa+compile"]["samples_per_j"]
    print(f"bf16+sdpa+compile vs fp32: {best:.2f}x samples per joule (target >= 2.5)")
    print("BENCH " + json.dumps({"gpu": torch.cuda.get_device_name(device), "model": args.gpu_model,
                                 "samples_per_j_ratio": round(best, 3),
                                 "auto_samples_per_j_ratio": round(ratios["auto+compile"]["samples_per_j"], 3),
                                 "per_contender": {k: {kk: (round(vv, 4) if isinstance(vv, float) else vv)
                                                       for kk, vv in v.items() if kk != "reasons"}
                                                   for k, v in results.items()}}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads; 1 keeps a shared machine's timings stable")
    parser.add_argument("--gpu", action="store_true", help="the H200 comparison instead (see module docstring)")
    parser.add_argument("--gpu-model", default="vit_base_patch16_224")
    parser.add_argument("--gpu-batch", type=int, default=128)
    parser.add_argument("--gpu-batches-per-epoch", type=int, default=8)
    parser.add_argument("--gpu-warmup", type=int, default=10, help="steps excluded (compilation, clocks)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    if args.gpu:
        gpu_main(args)
        return
    torch.set_num_threads(args.threads)
    per_model: dict[str, dict[str, Any]] = {}
    for name, build in workloads().items():
        results: dict[str, list[dict[str, Any]]] = {"none": [], "auto": []}
        for r in range(args.rounds):
            pair = run_pair(build, args.steps, first=r % 2)
            for label in ("none", "auto"):
                results[label].append(pair[label])
            none, auto = pair["none"], pair["auto"]
            print(f"{name:28s} round {r + 1}: none {trimmed_mean(none['step_s']) * 1000:7.1f} ms/step, auto "
                  f"{trimmed_mean(auto['step_s']) * 1000:7.1f} ms/step (first step {auto['first_step_s']:.2f} s) "
                  f"{auto['decisions']}", flush=True)
            if r == 0:
                for line in auto["reasons"]:
                    print(f"    {line}")
        summary: dict[str, Any] = {}
        for label in ("none", "auto"):
            steps = [s for res in results[label] for s in res["step_s"]]
            batch = results[label][0]["batch"]
            summary[f"{label}_samples_per_s"] = batch / trimmed_mean(steps)
            summary[f"{label}_j_per_sample"] = statistics.median(res["j_per_sample"] for res in results[label])
            summary[f"{label}_first_step_s"] = statistics.median(res["first_step_s"] for res in results[label])
        summary["throughput_ratio"] = summary["auto_samples_per_s"] / summary["none_samples_per_s"]
        summary["j_per_sample_ratio"] = summary["auto_j_per_sample"] / summary["none_j_per_sample"]
        summary["probe_overhead_s"] = summary["auto_first_step_s"] - summary["none_first_step_s"]
        summary["decisions_per_round"] = [res["decisions"] for res in results["auto"]]
        summary["energy_provenance"] = results["auto"][-1]["energy_provenance"]
        summary["energy_source"] = results["auto"][-1]["energy_source"]
        per_model[name] = summary

    print(f"\n{'model':28s}{'none sp/s':>11s}{'auto sp/s':>11s}{'ratio':>8s}{'none J/sp':>11s}{'auto J/sp':>11s}"
          f"{'probe s':>9s}  auto kept (rounds)")
    for name, s in per_model.items():
        rounds = s["decisions_per_round"]
        on = {k: sum(d.get(k) == "on" for d in rounds) for k in rounds[0]}
        kept = ", ".join(f"{k} {n}/{len(rounds)}" for k, n in on.items() if n) or "nothing (all off)"
        print(f"{name:28s}{s['none_samples_per_s']:11.1f}{s['auto_samples_per_s']:11.1f}{s['throughput_ratio']:8.3f}"
              f"{s['none_j_per_sample']:11.4f}{s['auto_j_per_sample']:11.4f}{s['probe_overhead_s']:9.2f}  {kept}")
    provenance = {s["energy_provenance"] for s in per_model.values()}
    print(f"energy per sample: {', '.join(sorted(provenance))} ({next(iter(per_model.values()))['energy_source']}); "
          f"throughput = batch / trimmed-mean steady-state step ({args.rounds} lockstep rounds x "
          f"{args.steps - SKIP} steps), "
          f"{args.threads} thread(s), {torch.__version__}")
    worst = min(s["throughput_ratio"] for s in per_model.values())
    print(f"auto/none throughput ratio, worst model = {worst:.3f} (target >= 0.98)")
    print("BENCH " + json.dumps({
        "auto_vs_none_throughput_ratio_min": round(worst, 4),
        "per_model": {name: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()
                             if k != "energy_source"} for name, s in per_model.items()},
        "steps": args.steps, "rounds": args.rounds, "threads": args.threads}))


if __name__ == "__main__":
    main()
