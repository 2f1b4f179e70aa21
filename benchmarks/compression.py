"""Compression on the real digits, in one process with the same budget for every contender:

1. dense: a timm CNN trained for `--epochs` (fp32; also the distillation teacher);
2. compressed: the same model and budget with gradual pruning to 80 % + int8 QAT, exported as the
   int8 + sparse artifact, reloaded and evaluated (what would ship);
3. student: distilled from the trained dense teacher into the same architecture shrunk to <= 30 %
   of its parameters, same budget.

Prints a table and ends with `BENCH {"size_ratio", "accuracy_drop_pt", "student_param_fraction",
"student_accuracy_retained", ...}`. Targets: artifact >= 8x smaller than dense fp32 at <= 1.0 point
accuracy loss; student <= 30 % of the parameters keeping >= 97 % of the teacher's accuracy.

    python -m benchmarks.compression [--model resnet10t] [--epochs 6] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from greenstack.compression.selection import count_parameters
from greenstack.data import DataModule, digits
from greenstack.engine.loop import Trainer, TrainerConfig
from greenstack.engine.optim import Optim
from greenstack.engine.state import State
from greenstack.models import build_timm
from greenstack.policies.compression import Distillation, ExportCompressed, Int8QAT, MagnitudePruning

OPTIM = Optim(name="adamw", lr=2e-3, weight_decay=0.05, schedule="cosine", warmup_steps=10)
IMAGE_SIZE, BATCH, SEED = 32, 64, 0


def _train(model: torch.nn.Module, data: DataModule, policies: list, epochs: int, run_dir: str
           ) -> tuple[Trainer, State, float]:
    torch.manual_seed(SEED)
    trainer = Trainer(model, data.train, OPTIM, TrainerConfig(max_duration=f"{epochs}ep", progress=False,
                                                              eval_interval=f"{epochs}ep"),
                      val_loader=data.val, test_loader=data.test, policies=policies,
                      batch_size=data.batch_size, run_dir=run_dir)
    t0 = time.perf_counter()
    state = trainer.fit()
    return trainer, state, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads; 1 avoids OpenMP stalls on shared cores (default 1)")
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--size-ratio", type=float, default=0.3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    data = digits(batch_size=BATCH, image_size=IMAGE_SIZE, seed=SEED)
    work = Path(tempfile.mkdtemp(prefix="greenstack-bench-compression-"))

    def model() -> torch.nn.Module:
        torch.manual_seed(SEED)
        return build_timm(args.model, num_classes=data.num_classes, in_chans=data.in_chans)

    # 1. dense baseline (and teacher)
    dense_trainer, dense_state, dense_s = _train(model(), data, [], args.epochs, str(work / "dense"))
    dense_acc = dense_trainer.last_eval["test/accuracy"]
    teacher_file = work / "teacher.safetensors"
    from safetensors.torch import save_model

    save_model(dense_state.model, str(teacher_file))

    # 2. prune 80 % + int8 QAT, exported and reloaded
    export = ExportCompressed(latency_repeats=20)
    policies = [MagnitudePruning(final_sparsity=args.sparsity, start="0.05dur", end="0.5dur", frequency="0.05dur"),
                Int8QAT(start="0.6dur", freeze_at="0.9dur"), export]
    _, _, comp_s = _train(model(), data, policies, args.epochs, str(work / "compressed"))
    fig = {k.split("/", 1)[1]: v.value for k, v in export.summary().items()}

    # 3. distilled student from the trained dense teacher
    distill = Distillation(teacher=str(teacher_file), teacher_model={"name": args.model},
                           size_ratio=args.size_ratio, temperature=4.0, alpha=0.7)
    student_trainer, _, student_s = _train(model(), data, [distill], args.epochs, str(work / "student"))
    dsum = {k.split("/", 1)[1]: v.value for k, v in distill.summary().items()}
    student_acc = student_trainer.last_eval["test/accuracy"]

    dense_params = count_parameters(dense_state.model)
    rows = [
        ("dense fp32", dense_params, fig["dense_fp32_bytes"], fig["dense_latency_ms"], dense_acc, dense_s),
        (f"pruned {args.sparsity:.0%} + int8 QAT", fig["parameters"], fig["artifact_bytes"], fig["latency_ms"],
         fig["accuracy_after"], comp_s),
        (f"student ({dsum['distill_param_fraction']:.0%} params)", dsum["distill_student_parameters"], None, None,
         student_acc, student_s),
    ]
    print(f"\n{args.model} on digits ({data.sizes()}), {args.epochs} epochs each, CPU threads={torch.get_num_threads()}")
    print(f"{'model':28s}{'params':>12s}{'size (kB)':>12s}{'latency (ms)':>14s}{'test acc':>10s}{'train (s)':>11s}")
    for name, params, size, lat, acc, secs in rows:
        print(f"{name:28s}{params:>12,d}{(f'{size / 1e3:.1f}' if size else '-'):>12s}"
              f"{(f'{lat:.2f}' if lat else '-'):>14s}{acc:>10.4f}{secs:>11.1f}")
    drop_pt = 100 * (dense_acc - fig["accuracy_after"])
    retained = student_acc / dense_acc
    print(f"artifact {fig['size_ratio']:.2f}x smaller than dense fp32 (target >= 8), sparsity {fig['sparsity']:.3f}, "
          f"accuracy drop {drop_pt:.2f} pt vs dense (target <= 1.0; vs its own pre-export model "
          f"{fig['accuracy_drop_pt']:.2f} pt), CPU latency {fig['dense_latency_ms'] / fig['latency_ms']:.2f}x faster")
    print(f"student {dsum['distill_param_fraction']:.3f} of the teacher's parameters (target <= 0.30), "
          f"keeps {retained:.4f} of its accuracy (target >= 0.97)")
    print("BENCH " + json.dumps({
        "size_ratio": round(fig["size_ratio"], 3), "accuracy_drop_pt": round(drop_pt, 3),
        "student_param_fraction": round(dsum["distill_param_fraction"], 4),
        "student_accuracy_retained": round(retained, 4),
        "dense_accuracy": round(dense_acc, 4), "compressed_accuracy": round(fig["accuracy_after"], 4),
        "student_accuracy": round(student_acc, 4), "latency_speedup": round(fig["latency_speedup"], 3),
        "model": args.model, "epochs": args.epochs}))


if __name__ == "__main__":
    main()
