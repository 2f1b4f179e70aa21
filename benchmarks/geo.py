"""Geo-distributed training vs plain data parallel, and carbon-aware vs uniform participation.

Four gloo processes on this machine (torch's elastic launcher), each running greenstack's loop with the
`federated` policies on its own shard of the same data for the same number of steps:

* `ddp`: DistributedDataParallel, gradients all-reduced every step;
* `geo`: 8 local steps per round, top-k 0.1 with error feedback, work-weighted outer averaging;
* `geo carbon-aware`: the same, replaying 3 zones' shipped hourly traces (one round = one hour), regions
  above the cleanest by more than the margin sit the round out.

Bytes are counted (payload each worker passes to torch.distributed collectives, summed over workers).
Modelled emissions = Σ rounds Σ workers local steps × energy per step × its region's intensity that
hour (the same hardware everywhere, so the ratio is the participation effect alone).

With `--secure`, the same task also runs with secure aggregation (pairwise masks, shared random-k
0.1 support instead of top-k), in the clear over gloo and over mutual TLS. It reports loss and bytes
against plain geo and DDP, the time per round, and the cost of encoding and masking one update.

    python -m benchmarks.geo [--steps 240] [--secure]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
import warnings
from datetime import timedelta
from typing import Any

import torch

from greenstack.federated.launch import free_port, preload_forkserver

WORKERS = 4
SEED = 0
REGIONS = {  # 3 zones of the shipped Electricity Maps traces; the coordinator's region holds 2 workers
    "gb": {"capacity": 2, "role": "coordinator", "carbon": {"kind": "embedded", "zone": "GB"}},
    "cal": {"capacity": 1, "role": "worker", "carbon": {"kind": "embedded", "zone": "US-CAL-CISO"}},
    "de": {"capacity": 1, "role": "worker", "carbon": {"kind": "embedded", "zone": "DE-LU"}},
}
REPLAY = {"replay_start": "2023-04-03T00:00:00Z", "round_duration_s": 3600}
J_PER_STEP = 1.0  # modelled energy per local step (same hardware in every region; cancels in the ratio)


def _data(samples: int = 8192, dim: int = 32, classes: int = 8, label_noise: float = 0.3):
    """A fixed noisy classification task: a random teacher MLP labels Gaussian inputs, 30 % labels flipped.

    The label noise gives the task a loss floor, so "final loss" compares how close each method gets to
    it rather than how fast it overfits.
    """
    g = torch.Generator().manual_seed(1234)
    teacher = torch.nn.Sequential(torch.nn.Linear(dim, 64), torch.nn.Tanh(), torch.nn.Linear(64, classes))
    for p in teacher.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.8
    x = torch.randn(samples, dim, generator=g)
    with torch.no_grad():
        y = teacher(x).argmax(-1)
    flip = torch.rand(samples, generator=g) < label_noise
    y[flip] = torch.randint(0, classes, (int(flip.sum()),), generator=g)
    return x, y, classes


def _loaders(rank: int, world: int, batch: int):
    from torch.utils.data import DataLoader, TensorDataset

    x, y, classes = _data()
    n_test = 2048
    train_x, train_y, test_x, test_y = x[n_test:], y[n_test:], x[:n_test], y[:n_test]
    shard = slice(rank, len(train_x) - len(train_x) % world, world)

    def collate(rows):
        xs, ys = zip(*rows, strict=True)
        return {"inputs": torch.stack(xs), "labels": torch.stack(ys)}

    gen = torch.Generator().manual_seed(SEED + rank)
    train = DataLoader(TensorDataset(train_x[shard], train_y[shard]), batch_size=batch, shuffle=True,
                       generator=gen, collate_fn=collate, drop_last=True)
    test = DataLoader(TensorDataset(test_x, test_y), batch_size=512, collate_fn=collate)
    return train, test, x.shape[1], classes


def _model(dim: int, classes: int) -> torch.nn.Module:
    torch.manual_seed(SEED)
    return torch.nn.Sequential(torch.nn.Linear(dim, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                               torch.nn.ReLU(), torch.nn.Linear(256, classes))


def _contender(name: str, steps: int, margin: float, dirty_fraction: float) -> dict[str, Any]:
    """One training run in this worker; rank 0 returns its figures."""
    import torch.distributed as dist

    from greenstack.engine.loop import Trainer, TrainerConfig
    from greenstack.engine.optim import Optim
    from greenstack.federated import DataParallel, GeoTraining

    rank, world = dist.get_rank(), dist.get_world_size()
    train, test, dim, classes = _loaders(rank, world, batch=32)
    if name == "ddp":
        policy: Any = DataParallel(workers=world)
    elif name.startswith("geo_secure"):
        tls = {"transport": "tls", "tls": {"dir": os.environ["GEO_BENCH_TLS_DIR"]}} if name.endswith("tls") else {}
        kind = "none" if name.endswith("dense") else "topk"
        policy = GeoTraining(regions=REGIONS, local_steps=8, compression={"kind": kind, "ratio": 0.1},
                             outer_optimizer={"lr": 0.8, "momentum": 0.5, "nesterov": True},
                             participation={"mode": "uniform"}, clock=REPLAY, secure_aggregation=True, **tls)
    else:
        kind = "none" if name.endswith("dense") else "topk"
        policy = GeoTraining(regions=REGIONS, local_steps=8, compression={"kind": kind, "ratio": 0.1},
                             outer_optimizer={"lr": 0.8, "momentum": 0.5, "nesterov": True},
                             participation={"mode": "carbon_aware" if name == "geo_aware" else "uniform",
                                            "margin": margin, "dirty_steps_fraction": dirty_fraction},
                             clock=REPLAY)
    optim = Optim(name="adamw", lr=3e-3, weight_decay=0.0, schedule="cosine")
    trainer = Trainer(_model(dim, classes), train, optim,
                      TrainerConfig(max_duration=f"{steps}ba", eval_interval=f"{10 * steps}ba", progress=False,
                                    device="cpu", log_interval=10 ** 6),
                      test_loader=test, policies=[policy], batch_size=32)
    t0 = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - t0
    summary = {k: getattr(v, "value", v) for k, v in policy.summary().items()}
    out = {"loss": trainer.last_eval["test/loss"], "accuracy": trainer.last_eval["test/accuracy"],
           "bytes": summary.get("federated/bytes_sent"), "fit_s": seconds,
           "rounds": summary.get("federated/rounds")}
    if isinstance(policy, GeoTraining) and rank == 0:
        out["decisions"] = policy.decisions
        out["measured_emissions_kg"] = summary.get("federated/emissions_kg")
    return out


def bench_worker(steps: int, margin: float, dirty_fraction: float) -> dict[str, Any] | None:
    """Entry point of each of the 4 processes: every contender in turn, in one process group."""
    import torch.distributed as dist

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=int(os.environ.get("GEO_BENCH_TIMEOUT_S", "120"))))
    try:
        names = os.environ.get("GEO_BENCH_ONLY", "ddp,geo,geo_aware").split(",")
        results = {name: _contender(name, steps, margin, dirty_fraction) for name in names}
    finally:
        dist.destroy_process_group()
    return results if dist.is_available() and int(os.environ["RANK"]) == 0 else None


def masking_ms(numel: int, ratio: float = 0.1, participants: int = WORKERS, repeats: int = 20) -> float:
    """Best-of-`repeats` ms one worker spends encoding and masking its update on the round's support
    (the best, not the median: on a shared machine the median measures the other jobs)."""
    from greenstack.federated import secure

    pairs = [secure.KeyPair.generate() for _ in range(participants)]
    keys = pairs[0].pair_keys([p.public_bytes() for p in pairs], 0)
    support = secure.shared_support(numel, ratio, 1, 0)
    update = torch.randn(numel)
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        codes, _ = secure.encode(update[support] * 0.25)
        secure.mask(codes, 0, list(range(participants)), keys, r)
        times.append((time.perf_counter() - t0) * 1000)
    return min(times)


def modelled_emissions_kg(decisions: list[dict[str, Any]]) -> float:
    """Σ rounds Σ regions local steps × workers × J_PER_STEP × intensity (g/kWh) -> kg."""
    capacity = {name: spec["capacity"] for name, spec in REGIONS.items()}
    grams = 0.0
    for d in decisions:
        for region, steps in d["local_steps"].items():
            grams += steps * capacity[region] * J_PER_STEP / 3.6e6 * d["intensity_g_per_kwh"][region]
    return grams / 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--margin", type=float, default=0.25, help="dirty = above the cleanest x (1 + margin)")
    parser.add_argument("--dirty-fraction", type=float, default=0.5, help="share of local steps dirty regions do")
    parser.add_argument("--secure", action="store_true", help="also secure aggregation, over gloo and over TLS")
    args = parser.parse_args()
    if args.secure:
        from greenstack.federated.transport import keygen

        tls_dir = tempfile.mkdtemp(prefix="geo-bench-pki-")
        keygen(list(REGIONS), tls_dir)
        os.environ["GEO_BENCH_TLS_DIR"] = tls_dir
        os.environ.setdefault("GEO_BENCH_ONLY", "ddp,geo,geo_secure,geo_secure_tls,geo_dense,geo_secure_dense")
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=WORKERS, run_id="geo-bench",
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=0,
                          monitor_interval=0.2, start_method="forkserver")
    preload_forkserver(["torch", "greenstack.federated", "greenstack.engine.loop"])
    logging.getLogger("torch.distributed").setLevel(logging.ERROR)
    from benchmarks import geo  # the workers import this module by name (not as __main__)

    results = elastic_launch(config, geo.bench_worker)(args.steps, args.margin, args.dirty_fraction)[0]
    if args.secure:
        _report_secure(results, args.steps)
        return
    ddp, geo, aware = results["ddp"], results["geo"], results["geo_aware"]
    loss_gap_pct = (geo["loss"] - ddp["loss"]) / ddp["loss"] * 100
    bytes_ratio = ddp["bytes"] / geo["bytes"]
    uniform_kg, aware_kg = modelled_emissions_kg(geo["decisions"]), modelled_emissions_kg(aware["decisions"])
    emissions_ratio = aware_kg / uniform_kg
    aware_gap_pct = (aware["loss"] - geo["loss"]) / geo["loss"] * 100
    reduced = sum(1 for d in aware["decisions"] for n in d["local_steps"].values() if n < d["length"])
    print(f"{WORKERS} gloo workers, {args.steps} steps each, batch 32 per worker, same data shards and seed\n")
    print(f"{'':22s}{'final test loss':>16s}{'accuracy':>10s}{'bytes sent':>14s}{'model kgCO2e':>14s}")
    print(f"{'ddp (allreduce)':22s}{ddp['loss']:16.4f}{ddp['accuracy']:10.3f}{ddp['bytes']:14,d}{'':>14s}")
    print(f"{'geo top-k 0.1 uniform':22s}{geo['loss']:16.4f}{geo['accuracy']:10.3f}{geo['bytes']:14,d}"
          f"{uniform_kg:14.3e}")
    print(f"{'geo carbon-aware':22s}{aware['loss']:16.4f}{aware['accuracy']:10.3f}{aware['bytes']:14,d}"
          f"{aware_kg:14.3e}")
    print(f"\ngeo vs ddp: loss gap {loss_gap_pct:+.2f} % (target <= 2), bytes ddp/geo {bytes_ratio:.1f}x (target >= 10)")
    print(f"carbon-aware vs uniform (GB, US-CAL-CISO, DE-LU replayed from {REPLAY['replay_start']}, 1 round = 1 h): "
          f"modelled emissions x{emissions_ratio:.3f}, loss gap {aware_gap_pct:+.2f} % (target <= 2), "
          f"{reduced} of {len(aware['decisions']) * len(REGIONS)} region-rounds cut to {args.dirty_fraction:g} of their steps")
    print("BENCH " + json.dumps({"loss_gap_pct": round(loss_gap_pct, 3), "bytes_ratio": round(bytes_ratio, 2),
                                 "participation_emissions_ratio": round(emissions_ratio, 4)}))


def _report_secure(results: dict[str, Any], steps: int) -> None:
    ddp, geo, sec, tls = (results[k] for k in ("ddp", "geo", "geo_secure", "geo_secure_tls"))
    dense, sec_dense = results["geo_dense"], results["geo_secure_dense"]
    print(f"{WORKERS} gloo workers, {steps} steps each, batch 32 per worker, same data shards and seed\n")
    print(f"{'':34s}{'test loss':>10s}{'accuracy':>10s}{'bytes sent':>14s}{'s / round':>11s}")
    for label, r in (("ddp (allreduce)", ddp), ("geo top-k 0.1", geo), ("geo secure random-k 0.1 (gloo)", sec),
                     ("geo secure random-k 0.1 (TLS 1.3)", tls), ("geo dense (no compression)", dense),
                     ("geo secure dense (gloo)", sec_dense)):
        per_round = f"{r['fit_s'] / r['rounds']:11.3f}" if r.get("rounds") else f"{'':>11s}"
        print(f"{label:34s}{r['loss']:10.4f}{r['accuracy']:10.3f}{r['bytes']:14,d}{per_round}")
    numel = sum(p.numel() for p in _model(32, 8).parameters())
    mask = masking_ms(numel)
    gap_geo = (sec["loss"] - geo["loss"]) / geo["loss"] * 100
    gap_ddp = (sec["loss"] - ddp["loss"]) / ddp["loss"] * 100
    gap_dense = (sec_dense["loss"] - dense["loss"]) / dense["loss"] * 100
    round_ratio = (sec["fit_s"] / sec["rounds"]) / (geo["fit_s"] / geo["rounds"])
    tls_ratio = (tls["fit_s"] / tls["rounds"]) / (geo["fit_s"] / geo["rounds"])
    print(f"\nsecure vs geo: loss gap {gap_geo:+.2f} %, bytes x{sec['bytes'] / geo['bytes']:.2f}; vs ddp: loss gap "
          f"{gap_ddp:+.2f} %, bytes ddp/secure {ddp['bytes'] / sec['bytes']:.1f}x")
    print(f"secure dense vs geo dense: loss gap {gap_dense:+.3f} % (the masking alone), bytes "
          f"x{sec_dense['bytes'] / dense['bytes']:.2f}; ddp/secure dense bytes {ddp['bytes'] / sec_dense['bytes']:.1f}x")
    print(f"time per round: secure/geo x{round_ratio:.2f}, secure over TLS/geo x{tls_ratio:.2f}; encoding + masking "
          f"one update ({numel:,} parameters, 10 % support, {WORKERS - 1} pair masks): {mask:.2f} ms")
    print("BENCH " + json.dumps({
        "secure_loss_gap_vs_geo_pct": round(gap_geo, 3), "secure_dense_loss_gap_vs_geo_dense_pct": round(gap_dense, 3),
        "ddp_bytes_vs_secure_dense": round(ddp["bytes"] / sec_dense["bytes"], 2), "secure_loss_gap_vs_ddp_pct": round(gap_ddp, 3),
        "secure_bytes_vs_geo": round(sec["bytes"] / geo["bytes"], 3), "ddp_bytes_vs_secure": round(ddp["bytes"] / sec["bytes"], 2),
        "secure_round_time_ratio": round(round_ratio, 3), "tls_round_time_ratio": round(tls_ratio, 3),
        "mask_ms_per_round": round(mask, 3)}))


if __name__ == "__main__":
    main()
