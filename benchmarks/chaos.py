"""Chaos: kill real training runs at random points of the checkpoint cycle, resume, compare bit for bit.

Each trial starts `greenstack train` (CPU, memory + local + durable checkpoint tiers), waits for a random
step, then kills it in one of five ways: SIGKILL during training, SIGKILL while a checkpoint is being
written (a `.tmp-*` directory exists), SIGKILL between tiers (the local tier has published a step the
durable tier has not), SIGTERM (emergency checkpoint, exit 143) and SIGTERM followed by SIGKILL during the
emergency checkpoint. The run is then resumed with `checkpointing.resume=auto` and its final weights are
compared with an uninterrupted run's. Every published checkpoint left by the kill must decode; one that
does not (or a resume that fails) counts as a corrupt load.

Runs are forked from a warm parent (greenstack, torch and timm already imported), so a trial costs the
training, not the interpreter start-up. Prints one line per trial and ends with
`BENCH {"kills": N, "bit_identical": n, "corrupt_loads": 0}`.

    python -m benchmarks.chaos [--kills 10] [--seed 0] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

KINDS = ("sigkill_training", "sigkill_mid_write", "sigkill_between_tiers", "sigterm", "sigterm_then_sigkill")
LOCAL_EVERY, DURABLE_EVERY = 2, 4


def run_args(trial_dir: Path, *extra: str) -> list[str]:
    """The training command's arguments: a small CPU run with all three checkpoint tiers."""
    return ["train", "data=synthetic_image", "data.num_samples=96", "data.batch_size=16", "data.image_size=16",
            "model.name=resnet10t", "trainer.max_duration=4ep", "trainer.log_interval=1", "trainer.progress=false",
            "trainer.device=cpu", "tracker=none", "energy.interval_s=0.2", "checkpointing=hierarchical",
            "checkpointing.memory_every=1", f"checkpointing.local_every={LOCAL_EVERY}",
            f"checkpointing.durable_every={DURABLE_EVERY}", f"checkpointing.durable_url=file://{trial_dir / 'durable'}",
            f"hydra.run.dir={trial_dir / 'run'}", *extra]


def _child(argv: list[str], log: Path) -> None:
    """In the forked child: run the CLI with output to `log`, then exit without running parent cleanups."""
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        from greenstack.cli import main

        code = main(argv)
    except BaseException:  # noqa: BLE001 - the exit code is what the parent reads
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)


class Proc:
    """A forked training run: poll it, signal it, wait for its exit code."""

    def __init__(self, argv: list[str], log: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self.returncode: int | None = None
        self.pid = os.fork()
        if self.pid == 0:
            _child(argv, log)

    def poll(self) -> int | None:
        if self.returncode is None:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def alive(self) -> bool:
        return self.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            os.kill(self.pid, signum)

    def wait(self, timeout_s: float = 600.0) -> int:
        deadline = time.monotonic() + timeout_s
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.returncode is None:
            os.kill(self.pid, signal.SIGKILL)
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode


def in_child(fn, *args):  # noqa: ANN001, ANN201 - a tiny fork-and-return helper
    """`fn(*args)` computed in a forked child (result pickled back): the parent never runs torch ops, so
    its OpenMP pool is never started and later forks cannot deadlock in it."""
    import pickle

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            payload = pickle.dumps((True, fn(*args)))
        except BaseException as e:  # noqa: BLE001 - sent back to the parent
            payload = pickle.dumps((False, f"{type(e).__name__}: {e}"))
        with os.fdopen(write, "wb") as f:
            f.write(payload)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    ok, value = pickle.loads(data)
    if not ok:
        raise RuntimeError(value)
    return value


def same_weights(a: Path, b: Path) -> bool:
    """Bit-identical tensors (numpy view of the safetensors files: no torch in the parent)."""
    from safetensors.numpy import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and x[k].tobytes() == y[k].tobytes() for k in x)


def step_of(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(int(json.loads(line).get("step", 0)))
        except (ValueError, AttributeError):
            continue
    return max(steps, default=0)


def _published(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("step-*")) if directory.is_dir() else []


def _writing(directory: Path) -> bool:
    return directory.is_dir() and any(p.name.startswith(".tmp-") for p in directory.iterdir())


def corrupt_checkpoints(trial_dir: Path) -> list[str]:
    """Published checkpoints (what resume would consider) that do not decode."""
    from greenstack.checkpoint.codec import decode
    from greenstack.checkpoint.store import Store

    bad = []
    for directory in (trial_dir / "run" / "checkpoints", trial_dir / "durable"):
        store = Store(str(directory))
        for name in store.names():
            try:
                decode(store.read(name))
            except Exception as e:  # noqa: BLE001 - any failure is a corrupt published checkpoint
                bad.append(f"{directory.name}/{name}: {e}")
    return bad


@dataclass
class Trial:
    kind: str
    at_step: int
    killed_at_step: int
    exit_code: int
    resume_code: int
    bit_identical: bool
    corrupt: list[str]
    note: str = ""


def _kill_point(kind: str, proc: Proc, trial_dir: Path, at_step: int, rng: random.Random) -> str:
    """Wait for the trial's kill point and deliver its signal(s); returns what happened."""
    run_dir, local, durable = trial_dir / "run", trial_dir / "run" / "checkpoints", trial_dir / "durable"
    deadline = time.monotonic() + 300
    while proc.alive() and step_of(run_dir) < at_step and time.monotonic() < deadline:
        time.sleep(0.002)
    if kind == "sigkill_mid_write":
        while proc.alive() and not (_writing(local) or _writing(durable)) and time.monotonic() < deadline:
            time.sleep(0.0005)
    elif kind == "sigkill_between_tiers":
        while proc.alive() and time.monotonic() < deadline:
            ahead = set(_published(local)) - set(_published(durable))
            if any(int(n.split("-")[1]) % DURABLE_EVERY == 0 for n in ahead):
                break
            time.sleep(0.0005)
    if not proc.alive():
        return "the run ended before its kill point"
    if kind.startswith("sigkill"):
        proc.signal(signal.SIGKILL)
        return {"sigkill_training": "SIGKILL", "sigkill_mid_write": "SIGKILL while a .tmp write existed",
                "sigkill_between_tiers": "SIGKILL with local ahead of durable"}[kind]
    proc.signal(signal.SIGTERM)
    if kind == "sigterm":
        return "SIGTERM"
    time.sleep(rng.uniform(0.0, 0.3))  # during the emergency checkpoint (or just after it)
    proc.signal(signal.SIGKILL)
    return "SIGTERM then SIGKILL"


def trial(kind: str, trial_dir: Path, at_step: int, reference: Path, rng: random.Random) -> Trial:
    proc = Proc(run_args(trial_dir), trial_dir / "kill.log")
    note = _kill_point(kind, proc, trial_dir, at_step, rng)
    code = proc.wait()
    killed_at = step_of(trial_dir / "run")
    corrupt = in_child(corrupt_checkpoints, trial_dir)
    resume_code = Proc(run_args(trial_dir, "checkpointing.resume=auto"), trial_dir / "resume.log").wait()
    identical = False
    weights = trial_dir / "run" / "model.safetensors"
    if resume_code == 0 and weights.is_file():
        identical = same_weights(weights, reference)
    else:
        corrupt.append(f"resume exited {resume_code} (see {trial_dir / 'resume.log'})")
    return Trial(kind, at_step, killed_at, code, resume_code, identical, corrupt, note)


def run_chaos(kills: int, seed: int, workdir: Path) -> dict:
    """Reference run, then `kills` kill/resume trials cycling through the five kinds at random steps."""
    import greenstack.cli  # noqa: F401 - warm the parent: children fork with everything imported
    import greenstack.runner  # noqa: F401

    rng = random.Random(seed)
    ref_dir = workdir / "reference"
    code = Proc(run_args(ref_dir), workdir / "reference.log").wait()
    if code != 0:
        raise SystemExit(f"the reference run failed (exit {code}); see {workdir / 'reference.log'}")
    reference = ref_dir / "run" / "model.safetensors"
    total = step_of(ref_dir / "run")
    trials = []
    for i in range(kills):
        kind = KINDS[i % len(KINDS)]
        at_step = rng.randint(2, max(2, total - 4))
        t = trial(kind, workdir / f"trial-{i:02d}-{kind}", at_step, reference, rng)
        trials.append(t)
        print(f"trial {i:2d} {kind:<22} step {t.at_step:>2}->{t.killed_at_step:>2} exit {t.exit_code:>4} "
              f"resume {t.resume_code} bit-identical {t.bit_identical} corrupt {len(t.corrupt)}  ({t.note})",
              flush=True)
        for c in t.corrupt:
            print(f"    corrupt: {c}", flush=True)
    return {"kills": kills, "bit_identical": sum(t.bit_identical for t in trials),
            "corrupt_loads": sum(len(t.corrupt) for t in trials), "total_steps": total,
            "trials": [asdict(t) for t in trials]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10, help="number of kill/resume trials (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="keep the trials' run dirs here (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="greenstack-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        result = run_chaos(args.kills, args.seed, workdir)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"{result['bit_identical']}/{result['kills']} resumed runs bit-identical to the uninterrupted one "
          f"({result['total_steps']} steps), {result['corrupt_loads']} corrupt loads")
    print("BENCH " + json.dumps({k: result[k] for k in ("kills", "bit_identical", "corrupt_loads")}))
    return 0 if result["bit_identical"] == result["kills"] and result["corrupt_loads"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
