"""Step time with greenstack's energy meter + carbon accounting on vs off, same loop, one process.

    python benchmarks/meter_overhead.py [--steps 60] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import logging

from benchmarks._common import IterationTimer, median, workload
from greenstack.engine.loop import Trainer, TrainerConfig
from greenstack.engine.optim import Optim
from greenstack.measure import CarbonConfig, EnergyConfig, Measurement


def run(steps: int, metered: bool) -> list[float]:
    model, data = workload()
    timer = IterationTimer()
    policies = [timer] + ([Measurement(EnergyConfig(), CarbonConfig(), count_flops=False)] if metered else [])
    Trainer(model, data.train, Optim(lr=2e-3), TrainerConfig(max_duration=f"{steps}ba", progress=False,
                                                             eval_interval=f"{10 * steps}ba"),
            policies=policies, batch_size=data.batch_size).fit()
    return timer.deltas()[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.disable(logging.INFO)
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.rounds):
        for metered in (False, True) if r % 2 == 0 else (True, False):
            deltas = run(args.steps, metered)
            times[metered] += deltas
            print(f"round {r + 1} meter {'on ' if metered else 'off'} median step {median(deltas) * 1000:8.2f} ms")
    off, on = median(times[False]), median(times[True])
    print(f"\nmeter off {off * 1000:.2f} ms | meter on {on * 1000:.2f} ms | ratio {on / off:.4f} (target <= 1.01)")
    print("BENCH " + json.dumps({"step_time_ratio": round(on / off, 4), "steps": args.steps, "rounds": args.rounds}))


if __name__ == "__main__":
    main()
