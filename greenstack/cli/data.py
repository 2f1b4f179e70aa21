"""`greenstack data prepare [overrides]`: tokenise a data set into the cache training reuses, as a
measured, schedulable job (the job itself is `greenstack.prepare`)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from greenstack.cli._common import help_exit
from greenstack.errors import ConfigError
from greenstack.prepare import compose_prepare, prepare

HELP = """usage: greenstack data prepare [overrides ...]

Tokenise a data set into the cache that training runs reuse, as a measured job of its own: its run dir
(hydra.run.dir=DIR, default outputs/data-prepare/DATE/TIME) holds sustainability.json, emissions.csv,
audit.jsonl and report.html. The same overrides as `greenstack train` (data=hf_local data.path=...,
data.tokenizer=..., carbon=..., energy=...; model/task/trainer overrides are accepted and ignored), and the
same start-time schedulers: scheduler=forecast_window waits for a low-carbon window, scheduler=region
records the region to run in, scheduler=threshold waits for a low intensity.
A cache that exists already is a fast no-op. Training runs that read the cache report their share of this
job's energy and emissions (data/prepare_energy_kwh_share, data/prepare_kg_co2e_share).
Exit 0 done (or nothing to do), 2 bad config or data.
"""


@contextmanager
def _progress_lines() -> Iterator[None]:
    """greenstack's INFO lines (scheduler countdown, tokenising progress) on stderr for this command only."""
    logger = logging.getLogger("greenstack")
    if any(isinstance(h, logging.StreamHandler) for h in logger.handlers + logging.getLogger().handlers):
        yield
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def run_data(argv: list[str]) -> int:
    """`greenstack data prepare ...`: see HELP."""
    if (code := help_exit(argv, lambda: print(HELP))) is not None:
        return code
    if argv[0] != "prepare":
        raise ConfigError("unknown data command", key="data", value=argv[0], fix="use `greenstack data prepare ...`")
    rest = argv[1:]
    if any(a in ("-h", "--help") for a in rest):
        print(HELP)
        return 0
    flags = [a for a in rest if a.startswith("-")]
    if flags:
        raise ConfigError("data prepare takes overrides (key=value), no flags", key="data prepare",
                          value=" ".join(flags), fix="e.g. greenstack data prepare data=hf_local data.path=DIR")
    cfg, run_dir = compose_prepare(rest)
    with _progress_lines():
        result = prepare(cfg, run_dir)
    if not result.prepared and result.run_dir is None:
        by = result.prepared_by
        who = f"by prepare run {by.get('run_id')} ({by.get('run_dir')})" if by else "by an earlier training run"
        print(f"greenstack data prepare: nothing to do: {result.plan.describe} is cached already in "
              f"{result.plan.path}, written {who}")
        return 0
    metrics = (result.summary or {}).get("metrics", {})

    def figure(key: str) -> str:
        fig = metrics.get(key) or {}
        value = fig.get("value")
        return f"{value:.4g} {fig.get('unit', '')} ({fig.get('provenance')})" if isinstance(value, (int, float)) \
            else "n/a"

    print(f"greenstack data prepare: {result.reason}: {result.plan.describe} -> {result.plan.path}\n"
          f"  {figure('data/tokens')}, {result.duration_s:.1f} s, energy {figure('energy/total_kwh')}, "
          f"carbon {figure('carbon/total_kg_co2e')}\n"
          f"  run dir {result.run_dir} (sustainability.json); training runs that read the cache report their "
          "share as data/prepare_energy_kwh_share, data/prepare_kg_co2e_share")
    return 0
