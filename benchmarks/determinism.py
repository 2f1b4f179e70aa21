"""What `trainer.deterministic=true` costs: step time with and without it, side by side, one process.

The quickstart workload (timm resnet10t on the real digits, batch 64, 32 px), trained `--steps` steps per
contender in alternating rounds (so drifts in machine load hit both), the first `--warmup` steps of each
excluded. Deterministic mode = greenstack's `Determinism(True)` exactly as a run applies it
(`torch.use_deterministic_algorithms(True)`, cuDNN deterministic without benchmark, cuBLAS workspace).

    python -m benchmarks.determinism [--device cpu|cuda] [--steps 30] [--rounds 3] [--threads 1]

Ends with `BENCH {"deterministic_step_time_ratio": ..., ...}` (median step time true / false; 1.0 = free).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from benchmarks._common import IterationTimer, workload
from greenstack.engine.determinism import Determinism
from greenstack.engine.loop import Trainer, TrainerConfig
from greenstack.engine.optim import Optim


def median_step_s(deterministic: bool, device: str, steps: int, warmup: int) -> float:
    model, data = workload()
    timer = IterationTimer()
    with Determinism(deterministic).applied():
        Trainer(model, data.train, Optim(lr=2e-3), TrainerConfig(
            max_duration=f"{steps}ba", progress=False, eval_interval=f"{10 * steps}ba", device=device,
            deterministic=deterministic), policies=[timer], batch_size=data.batch_size).fit()
    return statistics.median(timer.deltas()[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1 keeps shared-CPU timings stable)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.rounds):
        for mode in ((False, True) if r % 2 == 0 else (True, False)):
            times[mode].append(median_step_s(mode, args.device, args.steps, args.warmup))
        print(f"round {r + 1}: deterministic=false {times[False][-1] * 1e3:7.2f} ms/step, "
              f"deterministic=true {times[True][-1] * 1e3:7.2f} ms/step", flush=True)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"\n{'':24s}{'ms/step':>10s}\n{'deterministic=false':24s}{off * 1e3:10.2f}\n{'deterministic=true':24s}"
          f"{on * 1e3:10.2f}\nratio true/false = {on / off:.3f} ({name}, resnet10t digits batch 64, "
          f"{args.threads} thread(s), torch {torch.__version__})")
    print("BENCH " + json.dumps({"deterministic_step_time_ratio": round(on / off, 4), "device": name,
                                 "ms_per_step_false": round(off * 1e3, 3), "ms_per_step_true": round(on * 1e3, 3),
                                 "steps": args.steps, "rounds": args.rounds, "threads": args.threads}))


if __name__ == "__main__":
    main()
