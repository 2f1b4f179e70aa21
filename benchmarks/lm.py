"""Causal LM: greenstack's loop (task=causal_lm, metered) vs a minimal hand-written PyTorch loop.

Same tiny GPT-2-style decoder (the lm_tiny recipe's), same packed byte-level stdlib corpus, seed and
steps. Prints tokens/s (median full iteration; the ratio is the median of per-round paired ratios, so load
drifting between rounds on shared machines cancels), J/token (the same energy meter around each run) and the
validation perplexity each reaches next to the corpus's unigram baseline. Contenders alternate over
rounds in one process to even out machine noise.

    python -m benchmarks.lm [--steps 40] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time

import torch
import torch.nn.functional as F

from benchmarks._common import IterationTimer, median
from greenstack.data.lm import python_stdlib
from greenstack.energy import EnergyMonitor, select_meters
from greenstack.engine.loop import Trainer, TrainerConfig
from greenstack.engine.optim import Optim
from greenstack.measure import CarbonConfig, EnergyConfig, Measurement
from greenstack.models import build_causal_lm
from greenstack.tasks import CausalLM

OPTIM = Optim(name="adamw", lr=3e-3, weight_decay=0.01, warmup_steps=10, schedule="cosine")
CONFIG = {"model_type": "gpt2", "n_embd": 128, "n_layer": 2, "n_head": 4, "n_positions": 64,
          "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
BATCH, BLOCK, EVAL_BATCHES = 16, 64, 8


def workload(seed: int = 0):
    data = python_stdlib(tokenizer="byte", block_size=BLOCK, batch_size=BATCH, max_bytes=600_000, seed=seed)
    torch.manual_seed(seed)
    return build_causal_lm(data.num_classes, config=CONFIG), data


@torch.no_grad()
def perplexity(model: torch.nn.Module, loader) -> float:
    model.eval()
    total, count = 0.0, 0
    for i, batch in enumerate(loader):
        if i >= EVAL_BATCHES:
            break
        logits = model(**batch["inputs"]).logits
        total += F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), reduction="sum").item()
        count += batch["labels"].numel()
    model.train()
    return math.exp(total / count)


def run_minimal(steps: int) -> tuple[list[float], float, int, float]:
    model, data = workload()
    opt, sched = OPTIM.build(model.parameters(), steps)
    monitor = EnergyMonitor(select_meters("auto")[0], interval_s=0.5).start()
    model.train()
    stamps, step, tokens = [time.perf_counter()], 0, 0
    while step < steps:
        for batch in data.train:
            logits = model(**batch["inputs"]).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            tokens += int((batch["labels"] != -100).sum())
            step += 1
            stamps.append(time.perf_counter())
            if step == steps:
                break
    monitor.stop()
    deltas = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return deltas, monitor.total_kwh() * 3.6e6 / tokens, tokens, perplexity(model, data.val)


def run_greenstack(steps: int) -> tuple[list[float], float, int, float, float]:
    model, data = workload()
    timer = IterationTimer()
    measurement = Measurement(EnergyConfig(interval_s=0.5), CarbonConfig(), count_flops=False)
    trainer = Trainer(model, data.train, OPTIM, TrainerConfig(max_duration=f"{steps}ba", progress=False,
                                                              eval_interval=f"{10 * steps}ba"),
                      policies=[timer, measurement], batch_size=data.batch_size, task=CausalLM())
    state = trainer.fit()
    j_per_token = measurement.monitor.total_kwh() * 3.6e6 / state.tokens_seen
    return (timer.deltas(), j_per_token, state.tokens_seen, perplexity(model, data.val),
            data.figures["data/unigram_perplexity"].value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    logging.disable(logging.INFO)
    times: dict[str, list[float]] = {"minimal": [], "greenstack": []}
    joules: dict[str, list[float]] = {"minimal": [], "greenstack": []}
    ppl: dict[str, float] = {}
    paired: list[float] = []  # greenstack/minimal median step time within each round (drift-robust)
    unigram = math.nan
    tokens_per_step = BATCH * BLOCK
    for r in range(args.rounds):
        order = ("minimal", "greenstack") if r % 2 == 0 else ("greenstack", "minimal")
        round_median: dict[str, float] = {}
        for name in order:
            if name == "minimal":
                deltas, jpt, tokens, p = run_minimal(args.steps)
            else:
                deltas, jpt, tokens, p, unigram = run_greenstack(args.steps)
            assert tokens == args.steps * tokens_per_step
            times[name] += deltas[1:]  # the first iteration includes one-off set-up
            round_median[name] = median(deltas[1:])
            joules[name].append(jpt)
            ppl[name] = p
            print(f"round {r + 1} {name:10s} {tokens_per_step / median(deltas[1:]):9.1f} tokens/s  "
                  f"{jpt:.4g} J/token  val perplexity {p:.3f}")
        paired.append(round_median["greenstack"] / round_median["minimal"])
    tps = {k: tokens_per_step / median(v) for k, v in times.items()}
    jpt = {k: median(v) for k, v in joules.items()}
    ratio = median(paired)
    print(f"\n{'':12s}{'tokens/s':>12s}{'J/token':>12s}{'val ppl':>10s}")
    for k in ("minimal", "greenstack"):
        print(f"{k:12s}{tps[k]:12.1f}{jpt[k]:12.4g}{ppl[k]:10.3f}")
    print(f"step-time ratio greenstack/minimal = {ratio:.4f} (median of the per-round ratios "
          f"{', '.join(f'{x:.3f}' for x in paired)}; target <= 1.03); J/token ratio = "
          f"{jpt['greenstack'] / jpt['minimal']:.4f}; unigram baseline perplexity {unigram:.2f}")
    print("BENCH " + json.dumps({
        "step_time_ratio": round(ratio, 4), "tokens_per_s_minimal": round(tps["minimal"], 1),
        "tokens_per_s_greenstack": round(tps["greenstack"], 1), "j_per_token_minimal": jpt["minimal"],
        "j_per_token_greenstack": jpt["greenstack"], "j_per_token_ratio": round(jpt["greenstack"] / jpt["minimal"], 4),
        "val_perplexity_minimal": round(ppl["minimal"], 3), "val_perplexity_greenstack": round(ppl["greenstack"], 3),
        "unigram_perplexity": round(unigram, 3), "steps": args.steps, "rounds": args.rounds}))


if __name__ == "__main__":
    main()
