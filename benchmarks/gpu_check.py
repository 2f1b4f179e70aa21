"""The Python pieces of benchmarks/gpu_check.sh; each also runs on a CPU (`--device cpu --quick`), so
everything but CUDA itself is known to work before a GPU machine is lent.

    python -m benchmarks.gpu_check resume --device cuda --kills 3 --out DIR
    python -m benchmarks.gpu_check efficiency --workload vit --device cuda --out DIR
    python -m benchmarks.gpu_check efficiency --workload text --device cuda --out DIR
    python -m benchmarks.gpu_check summary RUN_DIR KEY... --out DIR/NAME.json
    python -m benchmarks.gpu_check bench DIR        # prints the single `BENCH {json}` line

`resume`: preempt a run with a real SIGTERM at random steps (sent by the run to itself from a policy at
the chosen step, so a fast GPU cannot finish before an outside signal lands), resume it with
`checkpointing.resume=auto`, and compare the final weights bit for bit with an uninterrupted run; with
`trainer.deterministic=true` (`--kills` points) and without it (one point: the max difference).

`efficiency`: fp32 with eager attention and no policies vs the default stack in auto mode (compile on
where CUDA is), on a ViT (samples/J) or a transformers BERT (tokens/J), energy from the run's meters
(NVML's counter on a GPU). MFU = FLOPs of one fwd+bwd step (torch's FlopCounterMode: 2 FLOPs per
multiply-add, matmuls, convolutions and attention) x steps/s / the device's dense bf16 peak (`--peak-tflops`;
790 for an H200).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from greenstack.engine.events import Event
from greenstack.engine.policy import Policy
from greenstack.engine.reporter import Reporter

#: dense bf16 matmul peak, TFLOP/s (H200: measured ~790 for bf16 matmul, see the issue)
PEAK_TFLOPS = {"H200": 790.0, "H100": 790.0}


# -- resume: preempt at a chosen step, resume, compare -------------------------------------------
class PreemptAt(Policy):
    """Sends SIGTERM to its own process at the end of optimizer step `step`, once per run (its state is
    checkpointed, so the resumed run does not preempt itself again)."""

    events = frozenset({Event.STEP_END})

    def __init__(self, step: int) -> None:
        super().__init__(name="preempt_at")
        self.step, self.fired = int(step), False

    def __call__(self, event: Event, state: Any, reporter: Reporter) -> None:
        if not self.fired and state.step >= self.step:
            self.fired = True
            os.kill(os.getpid(), signal.SIGTERM)

    def state_dict(self) -> dict[str, Any]:
        return {"fired": self.fired}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fired = bool(state.get("fired", False))


def _run_overrides(device: str, quick: bool, deterministic: bool) -> list[str]:
    size = (["data.num_samples=96", "data.image_size=16", "model.name=resnet10t"] if quick
            else ["data.num_samples=320", "data.image_size=32", "model.name=resnet18"])
    return ["data=synthetic_image", *size, "data.batch_size=16", "trainer.max_duration=3ep", "trainer.log_interval=1",
            "trainer.progress=false", "tracker=none", "checkpointing=hierarchical", "checkpointing.memory_every=1",
            "checkpointing.local_every=2", "energy.interval_s=0.2", f"trainer.device={device}",
            f"trainer.deterministic={str(deterministic).lower()}"]


def _train(run_dir: Path, overrides: list[str], log: Path) -> int:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with log.open("a") as out:
        return subprocess.run([sys.executable, "-m", "greenstack", "train", *overrides, f"hydra.run.dir={run_dir}"],
                              env=env, stdout=out, stderr=subprocess.STDOUT, timeout=900).returncode


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model.safetensors"))


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


def resume_check(device: str, kills: int, quick: bool, out: Path, seed: int = 0) -> dict[str, Any]:
    """Reference run, then `kills` preempted+resumed runs (deterministic), then one without determinism."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / "resume_runs.log"
    result: dict[str, Any] = {"device": device}
    rng = random.Random(seed)
    for deterministic, n in ((True, kills), (False, 1)):
        label = "deterministic" if deterministic else "nondeterministic"
        overrides = _run_overrides(device, quick, deterministic)
        reference = out / f"{label}_reference"
        if _train(reference, overrides, log) != 0:
            raise SystemExit(f"the {label} reference run failed: see {log}")
        expected = _weights(reference)
        summary = json.loads((reference / "sustainability.json").read_text())
        total = int(summary["metrics"]["train/steps"]["value"])
        points = sorted(rng.sample(range(2, max(3, total - 1)), min(n, max(1, total - 3))))
        trials = []
        for i, step in enumerate(points):
            run_dir = out / f"{label}_preempted{i}"
            preempt = [*overrides, "+policies.preempt._target_=benchmarks.gpu_check.PreemptAt",
                       f"+policies.preempt.step={step}"]
            code = _train(run_dir, preempt, log)
            preempted = code == 128 + signal.SIGTERM and not (run_dir / "model.safetensors").exists()
            resumed = _train(run_dir, [*preempt, "checkpointing.resume=auto"], log) == 0
            diff = _max_abs_diff(_weights(run_dir), expected) if resumed else float("nan")
            trials.append({"step": step, "preempted": preempted, "exit_code": code, "resumed": resumed,
                           "max_abs_diff": diff, "bit_identical": preempted and resumed and diff == 0.0})
            print(f"{label:16s} preempted at step {step:3d}/{total} (exit {code}), resumed: {resumed}, "
                  f"max |Δw| = {diff:.3g}{'  bit-identical' if trials[-1]['bit_identical'] else ''}", flush=True)
            result[label] = {"trials": trials, "bit_identical": sum(t["bit_identical"] for t in trials),
                             "of": len(trials), "max_abs_diff": max(t["max_abs_diff"] for t in trials),
                             "total_steps": total}
            (out / "resume.json").write_text(json.dumps(result, indent=2))  # as it goes: a timeout keeps the rest
    print("BENCH " + json.dumps({"resume_bit_identical": result["deterministic"]["bit_identical"],
                                 "of": result["deterministic"]["of"],
                                 "nondeterministic_max_abs_diff": result["nondeterministic"]["max_abs_diff"]}))
    return result


# -- efficiency: fp32 vs the auto stack, samples (tokens) per joule, MFU ----------------------------
def _workload(kind: str, device: torch.device, quick: bool) -> tuple[Any, Any, int, int]:
    """(build_model, loader_factory, batch, tokens_per_sample); data already on the device."""
    from torch.utils.data import DataLoader, TensorDataset

    from greenstack.models import build_timm, build_transformers

    g = torch.Generator(device=device).manual_seed(0)
    if kind == "vit":
        name, size, batch, classes = (("vit_tiny_patch16_224", 32, 8, 10) if quick
                                      else ("vit_base_patch16_224", 224, 128, 1000))
        kwargs = {"img_size": 32, "patch_size": 8, "depth": 2} if quick else {}
        n = batch * 8
        inputs = torch.randn(n, 3, size, size, device=device, generator=g)
        labels = torch.randint(0, classes, (n,), device=device, generator=g)

        def build() -> torch.nn.Module:
            torch.manual_seed(0)
            return build_timm(name, classes, 3, kwargs=kwargs)

        tokens = 1
    else:  # a BERT from a config (random init: nothing to download); every token real (no padding)
        layers, hidden, seq, batch = (2, 64, 32, 8) if quick else (12, 768, 256, 64)
        config = {"model_type": "bert", "vocab_size": 30522, "hidden_size": hidden, "num_hidden_layers": layers,
                  "num_attention_heads": max(2, hidden // 64), "intermediate_size": 4 * hidden,
                  "max_position_embeddings": 512}
        n = batch * 8
        inputs = torch.randint(1000, 30000, (n, seq), device=device, generator=g)
        labels = torch.randint(0, 4, (n,), device=device, generator=g)

        def build() -> torch.nn.Module:
            torch.manual_seed(0)
            return build_transformers(4, config=config, attn_implementation="eager")

        tokens = seq

    def collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
        x, y = torch.stack([i for i, _ in items]), torch.stack([t for _, t in items])
        return {"inputs": x if kind == "vit" else {"input_ids": x, "attention_mask": torch.ones_like(x)}, "labels": y}

    def loader() -> DataLoader:
        return DataLoader(TensorDataset(inputs, labels), batch_size=batch, shuffle=True, collate_fn=collate,
                          generator=torch.Generator().manual_seed(0), drop_last=True)

    return build, loader, batch, tokens


def step_flops(model: torch.nn.Module, batch: dict[str, Any]) -> int:
    """FLOPs of one fp32 fwd+bwd on `batch` (FlopCounterMode: 2 per multiply-add)."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    from greenstack.tasks.base import forward

    model = copy.deepcopy(model)
    counter = FlopCounterMode(display=False)
    with counter:
        torch.nn.functional.cross_entropy(forward(model, batch).float(), batch["labels"]).backward()
    return int(counter.get_total_flops())


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def efficiency_check(kind: str, device_name: str, quick: bool, out: Path, steps: int, warmup: int,
                     peak: float | None) -> dict[str, Any]:
    from benchmarks._common import IterationTimer
    from benchmarks.efficiency import EnergyWindow, default_stack
    from greenstack.efficiency.attention import set_attention_implementation
    from greenstack.engine.loop import Trainer, TrainerConfig, resolve_device
    from greenstack.engine.optim import Optim
    from greenstack.measure import CarbonConfig, EnergyConfig, Measurement

    device = resolve_device(device_name)
    build, loader, batch, tokens = _workload(kind, device, quick)
    flops = step_flops(build().to(device), next(iter(loader())))
    peak = peak_tflops(device, peak)
    results: dict[str, dict[str, Any]] = {}
    for name in ("fp32", "auto"):
        model = build()
        if name == "fp32":
            set_attention_implementation(model, "eager")
            policies: list[Policy] = []
        else:
            policies = default_stack()
            for p in policies:
                if p.name == "efficiency.compile":
                    p.enabled = device.type == "cuda"  # compiling takes minutes on a CPU
        timer = IterationTimer()
        measurement = Measurement(EnergyConfig(meter="nvml" if device.type == "cuda" else "auto"), CarbonConfig(),
                                  count_flops=False)
        window = EnergyWindow(measurement, first=warmup)
        Trainer(model, loader(), Optim(lr=1e-4), TrainerConfig(
            max_duration=f"{steps}ba", progress=False, eval_interval=f"{10 * steps}ba", device=str(device)),
            policies=[measurement, timer, *policies, window], batch_size=batch).fit()
        step_s = statistics.median(timer.deltas()[warmup + 1:])
        unit_per_j = tokens / window.j_per_sample()
        results[name] = {"samples_per_s": batch / step_s, "per_j": unit_per_j,
                         "energy_provenance": window.provenance, "energy_source": window.source,
                         "mfu": flops / step_s / (peak * 1e12) if peak else None,
                         "decisions": {p.name.removeprefix("efficiency."): ("on" if p.on else "off") for p in policies
                                       if getattr(p, "on", None) is not None and p.enabled}}
        r = results[name]
        print(f"{kind} {name:5s} {r['samples_per_s']:9.1f} samples/s {r['per_j']:10.3f} "
              f"{'samples' if kind == 'vit' else 'tokens'}/J [{window.provenance}: {window.source}] "
              f"MFU {'n/a' if r['mfu'] is None else format(r['mfu'], '.1%')} {r['decisions']}", flush=True)
    ratio = results["auto"]["per_j"] / results["fp32"]["per_j"]
    unit = "samples" if kind == "vit" else "tokens"
    summary = {"workload": kind, "device": str(device), "quick": quick, f"{unit}_per_j_ratio": ratio,
               "throughput_ratio": results["auto"]["samples_per_s"] / results["fp32"]["samples_per_s"],
               "flops_per_step": flops, "peak_tflops": peak, "mfu_fp32": results["fp32"]["mfu"],
               "mfu_auto": results["auto"]["mfu"], "per_contender": results}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"efficiency_{kind}.json").write_text(json.dumps(summary, indent=2))
    print(f"{kind}: auto vs fp32 = {ratio:.2f}x {unit}/J")
    print("BENCH " + json.dumps({k: v for k, v in summary.items() if k != "per_contender"}))
    return summary


# -- run summaries and the final line ------------------------------------------------------------
def run_summary(run_dir: Path, keys: list[str], out: Path) -> dict[str, Any]:
    """Chosen figures (value and provenance) of a finished run's sustainability.json, as a JSON file."""
    metrics = json.loads((run_dir / "sustainability.json").read_text())["metrics"]
    picked = {k: {"value": metrics[k]["value"], "provenance": metrics[k]["provenance"]} if k in metrics else None
              for k in keys}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(picked, indent=2))
    print(json.dumps(picked))
    return picked


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _figure(summary: Any, key: str) -> Any:
    return (summary or {}).get(key, {}) and summary[key].get("value") if summary else None


def bench(logs: Path) -> dict[str, Any]:
    """The one BENCH line of gpu_check.sh from what its steps wrote (null where a step failed)."""
    resume, vit, text = _load(logs / "resume.json"), _load(logs / "efficiency_vit.json"), _load(logs / "efficiency_text.json")
    quick, qat, det = _load(logs / "quickstart.json"), _load(logs / "qat.json"), _load(logs / "determinism.json")
    unit = _load(logs / "unit.json") or {}
    line = {
        "resume_bit_identical": (resume or {}).get("deterministic", {}).get("bit_identical"),
        "resume_kill_points": (resume or {}).get("deterministic", {}).get("of"),
        "nondeterministic_resume_max_abs_diff": (resume or {}).get("nondeterministic", {}).get("max_abs_diff"),
        "vit_samples_per_j_ratio": (vit or {}).get("samples_per_j_ratio"),
        "vit_mfu_auto": (vit or {}).get("mfu_auto"), "vit_mfu_fp32": (vit or {}).get("mfu_fp32"),
        "text_tokens_per_j_ratio": (text or {}).get("tokens_per_j_ratio"),
        "text_mfu_auto": (text or {}).get("mfu_auto"),
        "quickstart_test_accuracy": _figure(quick, "test/accuracy"),
        "quickstart_gpu_energy_provenance": ((quick or {}).get("energy/gpu_kwh") or {}).get("provenance"),
        "qat_size_ratio": _figure(qat, "compression/size_ratio"),
        "qat_accuracy_drop_pt": (100 * (_figure(qat, "compression/accuracy_before") - _figure(qat, "compression/accuracy_after"))
                                 if _figure(qat, "compression/accuracy_before") is not None
                                 and _figure(qat, "compression/accuracy_after") is not None else None),
        "deterministic_step_time_ratio": (det or {}).get("deterministic_step_time_ratio"),
        "unit_failed": unit.get("failed"), "unit_passed": unit.get("passed"), "unit_skipped": unit.get("skipped"),
    }
    print("BENCH " + json.dumps(line))
    return line


def unit_counts(junit: Path, out: Path) -> dict[str, int]:
    """passed/failed/skipped/errors from pytest's JUnit XML (failed counts errors too)."""
    import xml.etree.ElementTree as ET

    root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts = {"failed": total["failures"] + total["errors"], "skipped": total["skipped"],
              "passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"]}
    out.write_text(json.dumps(counts))
    print(json.dumps(counts))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("resume")
    r.add_argument("--device", default="cuda")
    r.add_argument("--kills", type=int, default=3)
    r.add_argument("--quick", action="store_true", help="a smaller run (CPU check of the script)")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--seed", type=int, default=int(time.time()) % 10_000, help="draws the kill points")
    e = sub.add_parser("efficiency")
    e.add_argument("--workload", choices=("vit", "text"), required=True)
    e.add_argument("--device", default="cuda")
    e.add_argument("--quick", action="store_true", help="tiny models (CPU check of the script)")
    e.add_argument("--steps", type=int, default=None)
    e.add_argument("--warmup", type=int, default=None, help="steps excluded (probes, compilation, clocks)")
    e.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default by GPU name)")
    e.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("summary")
    s.add_argument("run_dir", type=Path)
    s.add_argument("keys", nargs="+")
    s.add_argument("--out", type=Path, required=True)
    u = sub.add_parser("unit")
    u.add_argument("junit", type=Path)
    u.add_argument("--out", type=Path, required=True)
    b = sub.add_parser("bench")
    b.add_argument("logs", type=Path)
    args = parser.parse_args()
    if args.cmd == "resume":
        resume_check(args.device, args.kills, args.quick, args.out, args.seed)
    elif args.cmd == "efficiency":
        steps = args.steps or (8 if args.quick else 60)
        warmup = args.warmup if args.warmup is not None else (3 if args.quick else 15)
        efficiency_check(args.workload, args.device, args.quick, args.out, steps, warmup, args.peak_tflops)
    elif args.cmd == "summary":
        run_summary(args.run_dir, args.keys, args.out)
    elif args.cmd == "unit":
        unit_counts(args.junit, args.out)
    else:
        bench(args.logs)


if __name__ == "__main__":
    main()
