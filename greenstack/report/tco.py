"""Total cost of ownership of a run: compute, energy, storage and carbon, from measured run figures.

Why: "greener" choices are only adopted when their cost is visible, and a saving is only credible when it
is measured. Every TCO line here is measured run figures (duration, emissions, energy, file sizes) times
a price with a stated source: a dated price catalog (instance type x region, on-demand and spot, storage
$/GB-month; the shipped one is a replaceable snapshot, users pass their own), a configurable carbon price
($/tCO2e). Savings are computed against a *measured* baseline run priced with the same options, never
against an assumed percentage.

Cloud instances bill for time, and their price includes electricity, so a priced instance counts no
separate energy line; without an instance the run is on-prem: energy at the run's configured electricity
price (plus an optional hardware $/hour).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from greenstack.errors import ConfigError, DataError, Problem
from greenstack.provenance import Figure, weakest
from greenstack.scheduling.prices import Catalog, load_catalog

#: default carbon price: US EPA 2023 social cost of CO2 (2 % near-term discount rate, 2020 emissions)
DEFAULT_CARBON_PRICE_USD_PER_T = 190.0
DEFAULT_CARBON_PRICE_SOURCE = "US EPA 2023 social cost of carbon, 2% discount rate (configurable)"
HOURS_PER_MONTH = 730.0
Pricing = Literal["on_demand", "spot"]


# -- run directories --------------------------------------------------------------------------------
@dataclass
class RunDir:
    """What a finished run left in its directory (read-only view used by the reports)."""

    path: Path
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    config: dict[str, Any]
    overrides: list[str]
    audit: list[dict[str, Any]]
    launch_dir: Path | None = None

    @property
    def name(self) -> str:
        return str(self.summary.get("run_name") or self.path.name)

    def figure(self, key: str) -> dict[str, Any] | None:
        fig = self.summary.get("metrics", {}).get(key)
        return fig if isinstance(fig, dict) else None

    def value(self, key: str) -> float | None:
        fig = self.figure(key)
        value = fig.get("value") if fig else None
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def accuracy(self) -> tuple[str, float] | None:
        for key in ("test/accuracy", "val/accuracy"):
            value = self.value(key)
            if value is not None:
                return key, value
        return None


def load_run(path: str | Path, *, summary: dict[str, Any] | None = None,
             metrics: list[dict[str, Any]] | None = None) -> RunDir:
    """Read a run dir (sustainability.json required; metrics.jsonl, .hydra and audit.jsonl when present).

    `summary` / `metrics`: what the run that is finishing holds in memory (sustainability.json's object,
    metrics.jsonl's rows), so the end-of-run report does not read back the files it just wrote.
    """
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(Problem("RUN_DIR", str(path), "not a directory", "give a run dir written by greenstack train"))
    if summary is None:
        summary = _read_summary(path)
    if metrics is None:
        metrics = _read_metrics(path)
    config: dict[str, Any] = {}
    overrides: list[str] = []
    launch_dir = None
    hydra_dir = path / ".hydra"
    if (hydra_dir / "config.yaml").is_file():
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(OmegaConf.load(hydra_dir / "config.yaml"), resolve=False)  # type: ignore[assignment]
        if (hydra_dir / "overrides.yaml").is_file():
            overrides = [str(o) for o in OmegaConf.to_container(OmegaConf.load(hydra_dir / "overrides.yaml")) or []]
        if (hydra_dir / "hydra.yaml").is_file():
            cwd = OmegaConf.select(OmegaConf.load(hydra_dir / "hydra.yaml"), "hydra.runtime.cwd")
            launch_dir = Path(cwd) if cwd else None
    audit: list[dict[str, Any]] = []
    apath = path / "audit.jsonl"
    if apath.is_file():
        for line in apath.read_text(encoding="utf-8").splitlines():
            try:
                audit.append(json.loads(line))
            except ValueError:
                continue  # `greenstack audit verify` is the place to report a damaged log
    return RunDir(path, summary, metrics, config, overrides, audit, launch_dir)


def _read_summary(path: Path) -> dict[str, Any]:
    summary_path = path / "sustainability.json"
    if not summary_path.is_file():
        raise DataError(Problem("RUN_DIR", str(path), "no sustainability.json: not a finished greenstack run",
                                "point at a run dir (outputs/<date>/<time>, or hydra.run.dir)"))
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(Problem(str(summary_path), None, f"not valid JSON: {e}")) from None
    if not isinstance(summary.get("metrics"), dict):
        raise DataError(Problem(str(summary_path), None, "has no `metrics` object"))
    return summary


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    metrics: list[dict[str, Any]] = []
    mpath = path / "metrics.jsonl"
    if mpath.is_file():
        for n, line in enumerate(mpath.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(Problem(f"{mpath}:{n}", line[:60], f"not valid JSON: {e}")) from None
            if isinstance(row, dict):
                metrics.append(row)
    return metrics


# -- the computation --------------------------------------------------------------------------------
@dataclass
class TcoOptions:
    """How to price a run. Sizes of None are measured from the run dir (and its config's data path)."""

    instance: str | None = None
    region: str | None = None
    pricing: Pricing = "on_demand"
    nodes: int = 1
    catalog: str | None = None
    carbon_price_usd_per_t: float = DEFAULT_CARBON_PRICE_USD_PER_T
    dataset_gb: float | None = None
    checkpoint_gb: float | None = None
    retention_months: float = 1.0
    storage_class: str = "object"
    storage_usd_per_gb_month: float | None = None
    electricity_usd_per_kwh: float | None = None
    hardware_usd_per_hour: float | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.pricing not in ("on_demand", "spot"):
            problems.append(Problem("--pricing", self.pricing, "must be on_demand or spot"))
        if not (isinstance(self.nodes, int) and self.nodes >= 1):
            problems.append(Problem("--nodes", self.nodes, "must be an integer >= 1"))
        for key in ("carbon_price_usd_per_t", "retention_months"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                problems.append(Problem(f"--{key.replace('_', '-')}", value, "must be a number >= 0"))
        for key in ("dataset_gb", "checkpoint_gb", "storage_usd_per_gb_month", "electricity_usd_per_kwh",
                    "hardware_usd_per_hour"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value >= 0):
                problems.append(Problem(f"--{key.replace('_', '-')}", value, "must be a number >= 0"))
        if problems:
            raise ConfigError(problems)


@dataclass
class Tco:
    """A priced run: one Figure per line, the total, and the inputs used."""

    run: str
    run_dir: str
    lines: dict[str, Figure]
    inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def total_usd(self) -> float:
        return float(self.lines["total_usd"].value or 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run, "run_dir": self.run_dir, "lines": {k: v.to_dict() for k, v in self.lines.items()},
                "inputs": self.inputs}


LINE_ORDER = ("compute_usd", "energy_usd", "storage_dataset_usd", "storage_checkpoints_usd", "carbon_usd", "total_usd")
LINE_TITLES = {"compute_usd": "compute", "energy_usd": "energy", "storage_dataset_usd": "storage: dataset",
               "storage_checkpoints_usd": "storage: checkpoints", "carbon_usd": "carbon", "total_usd": "total"}


def dir_size_gb(path: Path) -> float:
    """Bytes on disk of a file or folder tree, in GB (1e9 bytes)."""
    if path.is_file():
        return path.stat().st_size / 1e9
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 1e9


def _dataset_size(run: RunDir) -> tuple[float, str, str]:
    data = run.config.get("data") if isinstance(run.config.get("data"), dict) else {}
    for key in ("root", "path"):
        value = data.get(key) if data else None
        if isinstance(value, str) and value and "${" not in value:
            p = Path(value).expanduser()
            if not p.is_absolute() and run.launch_dir is not None:
                p = run.launch_dir / p
            if p.exists():
                return dir_size_gb(p), "measured", f"size on disk of data.{key} = {p}"
            return 0.0, "fallback", f"data.{key} = {value} not found from here; pass --dataset-gb"
    return 0.0, "fallback", "the run's data has no path (built-in or synthetic dataset); pass --dataset-gb"


def _checkpoint_size(run: RunDir) -> tuple[float, str, str]:
    parts = [p for p in (run.path / "checkpoints", run.path / "model.safetensors") if p.exists()]
    if not parts:
        return 0.0, "fallback", "no checkpoints/ or model.safetensors in the run dir; pass --checkpoint-gb"
    return sum(dir_size_gb(p) for p in parts), "measured", \
        "size on disk of " + " + ".join(p.name for p in parts) + " (remote checkpoint tiers not included)"


def compute_tco(run: RunDir | str | Path, options: TcoOptions | None = None) -> Tco:
    """Price one run. Raises DataError when the run lacks the measured figures TCO needs."""
    opts = options or TcoOptions()
    run = run if isinstance(run, RunDir) else load_run(run)
    duration_fig = run.figure("time/duration_s")
    duration_s = run.value("time/duration_s")
    if duration_s is None or duration_fig is None:
        raise DataError(Problem(f"{run.path}/sustainability.json", None, "no time/duration_s figure",
                                "TCO prices the measured duration of a finished run"))
    hours = duration_s / 3600.0
    d_prov = duration_fig.get("provenance", "measured")
    lines: dict[str, Figure] = {}
    inputs: dict[str, Any] = {"duration_s": duration_s, "nodes": opts.nodes, "pricing": opts.pricing,
                              "carbon_price_usd_per_t": opts.carbon_price_usd_per_t,
                              "retention_months": opts.retention_months}
    catalog: Catalog | None = None
    provider = region = None
    if opts.instance:
        catalog = load_catalog(opts.catalog)
        row = catalog.instance(opts.instance, opts.region)
        provider, region = row["provider"], row["region"]
        price = row["on_demand_usd_per_hour"] if opts.pricing == "on_demand" else row.get("spot_usd_per_hour")
        if price is None:
            raise ConfigError(Problem("--pricing", opts.pricing, f"the catalog has no spot price for "
                                      f"{opts.instance} in {region}", "use --pricing on_demand or your own catalog"))
        inputs.update(instance=opts.instance, region=region, provider=provider, usd_per_hour=price,
                      catalog=catalog.describe())
        lines["compute_usd"] = Figure(hours * opts.nodes * price, "USD", weakest(d_prov, "estimated"),
                                      f"{hours:.6g} h x {opts.nodes} x {opts.instance} {region} {opts.pricing} "
                                      f"{price:g} USD/h ({catalog.describe()})")
        lines["energy_usd"] = Figure(0.0, "USD", "estimated", "included in the instance price")
    else:
        hw = opts.hardware_usd_per_hour
        if hw is None:
            lines["compute_usd"] = Figure(None, "USD", "fallback", "on-prem hardware not priced: pass "
                                                                   "--hardware-usd-per-hour (or --instance)")
        else:
            lines["compute_usd"] = Figure(hours * opts.nodes * hw, "USD", weakest(d_prov, "estimated"),
                                          f"on-prem: {hours:.6g} h x {opts.nodes} x hardware {hw:g} USD/h "
                                          "(--hardware-usd-per-hour)")
        lines["energy_usd"] = _energy_line(run, opts)
    # storage
    storage_price, storage_src = _storage_price(opts, catalog, provider, region)
    for part, (given, measure) in {"dataset": (opts.dataset_gb, _dataset_size),
                                   "checkpoints": (opts.checkpoint_gb, _checkpoint_size)}.items():
        if given is not None:
            gb, prov, src = float(given), "estimated", f"--{'dataset' if part == 'dataset' else 'checkpoint'}-gb"
        else:
            gb, prov, src = measure(run)
        inputs["dataset_gb" if part == "dataset" else "checkpoint_gb"] = gb
        if storage_price is None:  # on-prem without a storage price: shown, labelled, not guessed
            lines[f"storage_{part}_usd"] = Figure(0.0 if gb == 0 else None, "USD", "fallback",
                                                  f"{gb:.6g} GB ({src}) not priced: pass --storage-price "
                                                  "USD_PER_GB_MONTH or --instance")
            continue
        usd = gb * storage_price * opts.retention_months
        lines[f"storage_{part}_usd"] = Figure(usd, "USD", weakest(prov, "estimated"),
                                              f"{gb:.6g} GB ({src}) x {storage_price:g} USD/GB-month "
                                              f"({storage_src}) x {opts.retention_months:g} months retention")
    # carbon
    kg = run.value("carbon/total_kg_co2e")
    kg_fig = run.figure("carbon/total_kg_co2e")
    if kg is None or kg_fig is None:
        raise DataError(Problem(f"{run.path}/sustainability.json", None, "no carbon/total_kg_co2e figure",
                                "TCO prices the measured emissions; was the run metered?"))
    embodied = run.value("carbon/embodied_kg_co2e") or 0.0
    price_t = opts.carbon_price_usd_per_t
    carbon_src = DEFAULT_CARBON_PRICE_SOURCE if price_t == DEFAULT_CARBON_PRICE_USD_PER_T else "--carbon-price"
    inputs.update(emissions_kg=kg, embodied_kg=embodied)
    lines["carbon_usd"] = Figure((kg + embodied) / 1000.0 * price_t, "USD",
                                 weakest(kg_fig.get("provenance", "fallback"), "estimated"),
                                 f"({kg:.6g} kg operational" + (f" + {embodied:.6g} kg embodied" if embodied else "")
                                 + f") / 1000 x {price_t:g} USD/tCO2e ({carbon_src})")
    parts = [lines[k] for k in LINE_ORDER[:-1]]
    unpriced = [k for k in LINE_ORDER[:-1] if lines[k].value is None]
    lines["total_usd"] = Figure(sum(float(f.value or 0.0) for f in parts), "USD",
                                weakest(*(f.provenance for f in parts)),
                                "sum of the lines above" + (f" (not priced: {', '.join(unpriced)})" if unpriced else ""))
    inputs["storage_usd_per_gb_month"] = storage_price
    return Tco(run.name, str(run.path), {k: lines[k] for k in LINE_ORDER}, inputs)


def _energy_line(run: RunDir, opts: TcoOptions) -> Figure:
    facility = run.figure("energy/facility_kwh") or run.figure("energy/total_kwh")
    kwh = run.value("energy/facility_kwh") if run.figure("energy/facility_kwh") else run.value("energy/total_kwh")
    if opts.electricity_usd_per_kwh is not None:
        if kwh is None or facility is None:
            raise DataError(Problem(f"{run.path}/sustainability.json", None, "no energy figure to price"))
        price = opts.electricity_usd_per_kwh
        return Figure(kwh * price, "USD", weakest(facility.get("provenance", "fallback"), "estimated"),
                      f"{kwh:.6g} kWh facility x {price:g} USD/kWh (--electricity-price)")
    cost = run.figure("cost/energy_usd")
    if cost is not None and isinstance(cost.get("value"), (int, float)):
        return Figure(float(cost["value"]), "USD", cost.get("provenance", "estimated"),
                      f"the run's cost/energy_usd: {cost.get('source', '')}")
    raise DataError(Problem(f"{run.path}/sustainability.json", None, "no cost/energy_usd figure",
                            "pass --electricity-price USD_PER_KWH"))


def _storage_price(opts: TcoOptions, catalog: Catalog | None, provider: str | None,
                   region: str | None) -> tuple[float | None, str]:
    if opts.storage_usd_per_gb_month is not None:
        return opts.storage_usd_per_gb_month, "--storage-price"
    if catalog is not None and provider and region:
        row = catalog.storage_price(provider, region, opts.storage_class)
        return float(row["usd_per_gb_month"]), f"{provider} {region} {row.get('product') or opts.storage_class}, " \
                                               f"{catalog.describe()}"
    return None, "no storage price"


@dataclass
class TcoComparison:
    """A run priced against a measured baseline run with the same options."""

    run: Tco
    baseline: Tco | None
    savings: dict[str, dict[str, Any]]
    measured: dict[str, dict[str, Any]]
    roi: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"schema": "greenstack.tco/1", "run": self.run.to_dict(),
               "baseline": self.baseline.to_dict() if self.baseline else None,
               "savings": self.savings, "measured_deltas": self.measured}
        if self.roi is not None:
            out["return_on_savings"] = self.roi
        return out


def return_on_savings(comparison: TcoComparison, investment_usd: float,
                      runs_per_month: float | None = None) -> dict[str, Any]:
    """Break-even of a one-off cost (e.g. the engineering that made the run cheaper) paid back by the
    measured per-run saving against the baseline: runs, and months at `runs_per_month`.

    Every input is returned beside the result; a saving <= 0 never breaks even (None, with why).
    """
    problems = []
    if not (math.isfinite(investment_usd) and investment_usd >= 0):
        problems.append(Problem("--investment-usd", investment_usd, "must be a number >= 0 (USD, one-off)"))
    if runs_per_month is not None and not (math.isfinite(runs_per_month) and runs_per_month > 0):
        problems.append(Problem("--runs-per-month", runs_per_month, "must be a number > 0"))
    if comparison.baseline is None:
        problems.append(Problem("--investment-usd", investment_usd, "a return needs a measured saving per run",
                                "also pass --baseline DIR (the run before the change)"))
    if problems:
        raise ConfigError(problems)
    saving = comparison.savings["total_usd"]
    per_run = float(saving["usd"])
    out: dict[str, Any] = {
        "inputs": {"investment_usd": investment_usd, "runs_per_month": runs_per_month,
                   "saving_per_run_usd": per_run, "saving_provenance": saving["provenance"],
                   "saving_source": f"total_usd of baseline {comparison.baseline.run} - run {comparison.run.run}"},  # type: ignore[union-attr]
        "break_even_runs": None, "break_even_months": None, "monthly_saving_usd": None, "note": "",
    }
    if runs_per_month is not None:
        out["monthly_saving_usd"] = per_run * runs_per_month
    if per_run <= 0:
        out["note"] = "the run costs no less than the baseline: the investment never breaks even"
        return out
    runs = investment_usd / per_run
    out["break_even_runs"] = runs
    out["break_even_whole_runs"] = math.ceil(runs - 1e-12)
    if runs_per_month is not None:
        out["break_even_months"] = runs / runs_per_month
    out["note"] = (f"{investment_usd:g} USD / {per_run:.6g} USD saved per run = {runs:.4g} runs"
                   + (f" / {runs_per_month:g} runs per month = {runs / runs_per_month:.4g} months"
                      if runs_per_month is not None else ""))
    return out


def compare_tco(run: str | Path | RunDir, baseline: str | Path | RunDir | None = None,
                options: TcoOptions | None = None) -> TcoComparison:
    """TCO of `run` and, with a baseline run, the saving on every line (baseline - run, and % of baseline)."""
    opts = options or TcoOptions()
    r = run if isinstance(run, RunDir) else load_run(run)
    tco = compute_tco(r, opts)
    if baseline is None:
        return TcoComparison(tco, None, {}, {})
    b = baseline if isinstance(baseline, RunDir) else load_run(baseline)
    base = compute_tco(b, opts)
    savings = {}
    for key in LINE_ORDER:
        bv, rv = float(base.lines[key].value or 0.0), float(tco.lines[key].value or 0.0)
        savings[key] = {"usd": bv - rv, "percent": (bv - rv) / bv * 100.0 if bv > 0 else None,
                        "provenance": weakest(base.lines[key].provenance, tco.lines[key].provenance)}
    measured = {}
    for key in ("carbon/total_kg_co2e", "energy/total_kwh", "time/duration_s", "test/accuracy", "val/accuracy"):
        bv, rv = b.value(key), r.value(key)
        if bv is None or rv is None:
            continue
        measured[key] = {"baseline": bv, "run": rv, "delta": rv - bv,
                         "percent": (rv - bv) / bv * 100.0 if bv else None,
                         "provenance": weakest((b.figure(key) or {}).get("provenance", "fallback"),
                                               (r.figure(key) or {}).get("provenance", "fallback"))}
    return TcoComparison(tco, base, savings, measured)


def options_dict(options: TcoOptions) -> dict[str, Any]:
    return asdict(options)
