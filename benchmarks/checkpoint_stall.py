"""Training-loop stall per checkpoint: greenstack's async hierarchical tiers vs synchronous torch.save.

Both checkpoint the same model (timm resnet50, ~100 MB of weights + Adam state) at the same steps in one
process. The stall is the time the training thread is blocked: for greenstack, the in-memory snapshot
(the disk write runs on a background thread); for the baseline, torch.save of model+optimizer to disk
with fsync.

    python -m benchmarks.checkpoint_stall [--checkpoints 5]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time

import torch

from greenstack.engine.loop import Trainer, TrainerConfig
from greenstack.engine.optim import Optim
from greenstack.models import build_timm
from greenstack.policies.checkpointing.hierarchical import HierarchicalCheckpointing


def _data(n: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n * 4, 3, 32, 32, generator=g)
    return [{"inputs": x[i:i + 4], "labels": torch.randint(0, 10, (4,), generator=g)} for i in range(0, n * 4, 4)]


def sync_baseline(steps: int, every: int, directory: str) -> list[float]:
    torch.manual_seed(0)
    model = build_timm("resnet50", num_classes=10)
    trainer = Trainer(model, _data(steps), Optim(lr=1e-3), TrainerConfig(max_duration=f"{steps}ba", progress=False),
                      batch_size=4)
    stalls: list[float] = []

    class SyncSave(HierarchicalCheckpointing):
        def _on_step(self, state, reporter=None):  # the classic pattern: block the loop on torch.save
            if state.step % every:
                return
            t0 = time.perf_counter()
            path = os.path.join(directory, f"sync-{state.step}.pt")
            with open(path, "wb") as f:
                torch.save({"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict()}, f)
                f.flush()
                os.fsync(f.fileno())
            stalls.append(time.perf_counter() - t0)

    trainer.policies.append(SyncSave(local_every=0, durable_every=0, signals=[]))
    trainer.fit()
    return stalls


def greenstack_async(steps: int, every: int, directory: str) -> tuple[list[float], HierarchicalCheckpointing]:
    torch.manual_seed(0)
    model = build_timm("resnet50", num_classes=10)
    policy = HierarchicalCheckpointing(memory_every=every, local_every=every, local_dir=directory, local_keep=2,
                                       durable_every=0, signals=[])
    Trainer(model, _data(steps), Optim(lr=1e-3), TrainerConfig(max_duration=f"{steps}ba", progress=False),
            policies=[policy], batch_size=4).fit()
    return policy.stall_s, policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoints", type=int, default=5)
    parser.add_argument("--every", type=int, default=4)
    args = parser.parse_args()
    logging.disable(logging.INFO)
    steps = args.checkpoints * args.every
    with tempfile.TemporaryDirectory() as tmp:
        sync = sync_baseline(steps, args.every, tmp)
        ours, policy = greenstack_async(steps, args.every, os.path.join(tmp, "gs"))
        written = policy.tiers["local"].written
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    ratio = med(ours) / med(sync)
    print(f"{'':24s}{'median stall (ms)':>20s}{'checkpoints':>14s}")
    print(f"{'torch.save (sync)':24s}{med(sync) * 1000:20.1f}{len(sync):14d}")
    print(f"{'greenstack (async)':24s}{med(ours) * 1000:20.1f}{len(ours):14d}   ({written} written to disk in background)")
    print(f"stall ratio greenstack/sync = {ratio:.3f} (target <= 0.10)")
    print("BENCH " + json.dumps({"stall_ratio": round(ratio, 4), "sync_stall_ms": round(med(sync) * 1000, 2),
                                 "async_stall_ms": round(med(ours) * 1000, 2), "checkpoints": len(ours)}))


if __name__ == "__main__":
    main()
