"""greenstack's loop vs a minimal hand-written PyTorch loop: same model, data, seed and steps.

Prints the median per-iteration time of each (full iterations: data, forward, backward, step and
whatever the loop does around them, including greenstack's energy meter) and the final-loss difference.
Contenders alternate over several rounds in one process to even out machine noise.

    python benchmarks/overhead.py [--steps 60] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch
import torch.nn.functional as F

from benchmarks._common import IterationTimer, median, workload
from greenstack.engine.loop import Trainer, TrainerConfig
from greenstack.engine.optim import Optim
from greenstack.measure import CarbonConfig, EnergyConfig, Measurement

OPTIM = Optim(name="adamw", lr=2e-3, weight_decay=0.05, schedule="cosine")


def run_minimal(steps: int) -> tuple[list[float], float]:
    model, data = workload()
    opt, sched = OPTIM.build(model.parameters(), steps)
    model.train()
    stamps, step, loss = [time.perf_counter()], 0, torch.zeros(())
    while step < steps:
        for batch in data.train:
            logits = model(batch["inputs"])
            loss = F.cross_entropy(logits, batch["labels"])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            stamps.append(time.perf_counter())
            if step == steps:
                break
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)], loss.item()


def run_greenstack(steps: int) -> tuple[list[float], float]:
    model, data = workload()
    timer = IterationTimer()
    measurement = Measurement(EnergyConfig(), CarbonConfig())  # the default: metered, carbon-accounted
    trainer = Trainer(model, data.train, OPTIM, TrainerConfig(max_duration=f"{steps}ba", progress=False,
                                                              eval_interval=f"{10 * steps}ba"),
                      policies=[timer, measurement], batch_size=data.batch_size)
    state = trainer.fit()
    return timer.deltas(), state.loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.disable(logging.INFO)
    torch.set_num_threads(torch.get_num_threads())
    times: dict[str, list[float]] = {"minimal": [], "greenstack": []}
    losses: dict[str, list[float]] = {"minimal": [], "greenstack": []}
    for r in range(args.rounds):
        for name, fn in (("minimal", run_minimal), ("greenstack", run_greenstack)) if r % 2 == 0 else \
                (("greenstack", run_greenstack), ("minimal", run_minimal)):
            deltas, loss = fn(args.steps)
            times[name] += deltas[1:]  # the first iteration includes one-off set-up
            losses[name].append(loss)
            print(f"round {r + 1} {name:10s} median step {median(deltas[1:]) * 1000:8.2f} ms  final loss {loss:.8f}")
    base, ours = median(times["minimal"]), median(times["greenstack"])
    ratio = ours / base
    diff = max(abs(a - b) for a, b in zip(losses["minimal"], losses["greenstack"], strict=True))
    print(f"\n{'':12s}{'median step (ms)':>18s}{'final loss':>16s}")
    print(f"{'minimal':12s}{base * 1000:18.2f}{losses['minimal'][0]:16.8f}")
    print(f"{'greenstack':12s}{ours * 1000:18.2f}{losses['greenstack'][0]:16.8f}")
    print(f"step-time ratio greenstack/minimal = {ratio:.4f} (target <= 1.03); |loss diff| = {diff:.2e} (target <= 1e-6)")
    print("BENCH " + json.dumps({"step_time_ratio": round(ratio, 4), "final_loss_abs_diff": diff,
                                 "steps": args.steps, "rounds": args.rounds}))


if __name__ == "__main__":
    main()
