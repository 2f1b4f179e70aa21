"""Energy and carbon configuration groups (`energy`, `carbon`) and the run's measurement policy."""

from __future__ import annotations

import logging
import math
import platform
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from greenstack.engine.events import Event
from greenstack.engine.policy import Policy, Role
from greenstack.engine.reporter import Reporter
from greenstack.engine.state import State
from greenstack.errors import ConfigError, Problem
from greenstack.provenance import Figure, weakest


@dataclass
class EnergyConfig:
    """Which meters to use and how often to sample them."""

    meter: Literal["auto", "nvml", "rapl", "tdp"] = "auto"
    interval_s: float = 1.0
    tdp_w: float | None = None
    default_tdp_w: float = 85.0
    ram_w_per_gb: float = 0.375
    idle_baseline_s: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        if self.meter not in ("auto", "nvml", "rapl", "tdp"):
            problems.append(Problem("energy.meter", self.meter, "unknown meter", "auto, nvml, rapl or tdp"))
        if not self.interval_s > 0:
            problems.append(Problem("energy.interval_s", self.interval_s, "must be > 0"))
        if self.tdp_w is not None and not self.tdp_w > 0:
            problems.append(Problem("energy.tdp_w", self.tdp_w, "must be > 0 or null"))
        if not self.default_tdp_w > 0:
            problems.append(Problem("energy.default_tdp_w", self.default_tdp_w, "must be > 0"))
        if self.ram_w_per_gb < 0:
            problems.append(Problem("energy.ram_w_per_gb", self.ram_w_per_gb, "must be >= 0"))
        if self.idle_baseline_s < 0:
            problems.append(Problem("energy.idle_baseline_s", self.idle_baseline_s, "must be >= 0"))
        if problems:
            raise ConfigError(problems)


@dataclass
class CarbonConfig:
    """Where intensity comes from, plus accounting knobs (PUE, price, budget, embodied emissions)."""

    kind: Literal["embedded", "country", "static", "csv", "electricitymaps", "watttime", "ukgrid"] = "embedded"
    zone: str | None = "DE-LU"
    intensity_g_per_kwh: float | None = None
    path: str | None = None
    measured: bool = False
    pue: float = 1.0
    electricity_usd_per_kwh: float = 0.20
    budget_kg: float | None = None
    budget_action: Literal["warn", "stop"] = "warn"
    embodied_kg_co2e: float | None = None
    embodied_lifetime_hours: float = 35040.0
    #: prices the avoided emissions (cost/carbon_credit_value_usd); US EPA 2023 social cost of carbon
    carbon_price_usd_per_t: float = 190.0
    #: carbon/savings_vs_baseline compares with: the same energy started at submission time, or at the
    #: zone's annual mean intensity; auto = submission when a scheduler made the run wait, else annual_mean
    savings_baseline: Literal["auto", "submission", "annual_mean"] = "auto"
    #: the cloud instance the run uses (price catalog): cost/compute_usd and cost/spot_savings_usd
    instance_type: str | None = None
    instance_region: str | None = None
    price_catalog: str | None = None
    # live providers only (electricitymaps, watttime, ukgrid): cache, HTTP behaviour, labelled fallbacks
    cache_dir: str | None = None
    cache_ttl_s: float = 3600.0
    timeout_s: float = 10.0
    retries: int = 3
    fallback_zone: str | None = None
    fallback_g_per_kwh: float | None = None
    pool: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        problems = []
        if not self.pue >= 1.0:
            problems.append(Problem("carbon.pue", self.pue, "PUE is a ratio >= 1.0"))
        if self.electricity_usd_per_kwh < 0:
            problems.append(Problem("carbon.electricity_usd_per_kwh", self.electricity_usd_per_kwh, "must be >= 0"))
        if self.budget_kg is not None and not self.budget_kg > 0:
            problems.append(Problem("carbon.budget_kg", self.budget_kg, "must be > 0 or null"))
        if self.budget_action not in ("warn", "stop"):
            problems.append(Problem("carbon.budget_action", self.budget_action, "must be warn or stop"))
        if self.embodied_kg_co2e is not None and self.embodied_kg_co2e < 0:
            problems.append(Problem("carbon.embodied_kg_co2e", self.embodied_kg_co2e, "must be >= 0 or null"))
        if not self.embodied_lifetime_hours > 0:
            problems.append(Problem("carbon.embodied_lifetime_hours", self.embodied_lifetime_hours, "must be > 0"))
        if not (isinstance(self.carbon_price_usd_per_t, (int, float)) and math.isfinite(self.carbon_price_usd_per_t)
                and self.carbon_price_usd_per_t >= 0):
            problems.append(Problem("carbon.carbon_price_usd_per_t", self.carbon_price_usd_per_t,
                                    "must be a number >= 0 (USD per tonne CO2e)", "e.g. 190 (US EPA 2023)"))
        if self.savings_baseline not in ("auto", "submission", "annual_mean"):
            problems.append(Problem("carbon.savings_baseline", self.savings_baseline, "unknown baseline",
                                    "auto, submission or annual_mean"))
        if self.instance_type is not None:
            try:
                self.instance_price()
            except ConfigError as e:
                problems.extend(Problem(p.key.replace("--instance", "carbon.instance_type")
                                        .replace("--region", "carbon.instance_region")
                                        .replace("--catalog", "carbon.price_catalog"), p.value, p.reason, p.fix)
                                for p in e.problems)
        try:
            from greenstack.policies.pool_allocation import PoolConfig

            PoolConfig.from_node(self.pool)
        except ConfigError as e:
            problems.extend(e.problems)
        try:
            self.source()
        except ConfigError as e:
            problems.extend(e.problems)
        if problems:
            raise ConfigError(problems)

    def instance_price(self) -> dict[str, Any] | None:
        """The catalog row of `instance_type` (on-demand and spot USD/h, catalog description), or None."""
        if self.instance_type is None:
            return None
        from greenstack.scheduling.prices import load_catalog

        catalog = load_catalog(self.price_catalog)
        row = catalog.instance(self.instance_type, self.instance_region)
        return {**row, "catalog": catalog.describe()}

    def source(self):  # noqa: ANN201 - IntensitySource, imported lazily
        """The intensity source this config describes."""
        if self.kind in ("electricitymaps", "watttime", "ukgrid"):  # no network call until the first lookup
            from greenstack.carbon.providers import make_live_source

            return make_live_source(self.kind, self.zone, cache_dir=self.cache_dir, cache_ttl_s=self.cache_ttl_s,
                                    timeout_s=self.timeout_s, retries=self.retries, fallback_zone=self.fallback_zone,
                                    fallback_g_per_kwh=self.fallback_g_per_kwh)
        from greenstack.carbon.sources import make_source

        return make_source(self.kind, zone=self.zone, intensity_g_per_kwh=self.intensity_g_per_kwh,
                           path=self.path, measured=self.measured)



log = logging.getLogger("greenstack")
J_PER_KWH = 3.6e6


def reduce_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """Sum per-node figures over all ranks; ranks that do not meter contribute zeros.

    Node-wide counters are read by one process per node (local rank 0), so summing over ranks counts
    every node exactly once instead of once per GPU/process.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return dict(zip(keys, tensor.tolist(), strict=True))


class Measurement(Policy):
    """Meters the run, prices its carbon hour by hour, logs step-aligned figures and the summary.

    The loop only pays for `monitor.sample()` (a timestamp append) at each step; energy is read by the
    monitor's thread, and emissions are accounted incrementally at log steps and epoch ends.
    """

    role = Role.OBSERVER

    events = frozenset({Event.FIT_START, Event.BATCH_START, Event.AFTER_BACKWARD, Event.STEP_END,
                        Event.EPOCH_END, Event.FIT_END, Event.EXCEPTION})

    def __init__(self, energy: EnergyConfig, carbon: CarbonConfig, *, log_interval: int = 10,
                 meters: list[Any] | None = None, count_flops: bool = True,
                 submitted_at: datetime | None = None) -> None:
        super().__init__(name="measurement")
        #: when the run was submitted (before any scheduler wait): the `submission` savings baseline
        self.submitted_at = submitted_at
        self.energy_cfg, self.carbon_cfg = energy, carbon
        self.log_interval = log_interval
        self.source = carbon.source()
        self._given_meters = meters
        self.count_flops = count_flops
        self.monitor: Any = None
        self.meter_notes: list[str] = []
        self.metering = True
        self._accounted = 0
        self._emissions_kg = 0.0
        self._epoch_kg: list[float] = []
        self._epoch_start_kg = 0.0
        self._flop_counter: Any = None
        self.flops_per_sample: float | None = None
        self.budget_decision: dict[str, Any] | None = None
        #: totals of earlier segments of a resumed run (from a checkpoint), added to this segment's
        self._carried: dict[str, Any] = {"kwh": {}, "kg": 0.0, "duration_s": 0.0}

    # -- events -----------------------------------------------------------------------------------
    def __call__(self, event: Event, state: State, reporter: Reporter) -> None:
        if event is Event.FIT_START:
            self._start()
        elif event is Event.BATCH_START and self.count_flops and self.flops_per_sample is None \
                and self._flop_counter is None:
            from torch.utils.flop_counter import FlopCounterMode

            self._flop_counter = FlopCounterMode(display=False)
            self._flop_counter.__enter__()
        elif event is Event.AFTER_BACKWARD and self._flop_counter is not None:
            self._flop_counter.__exit__(None, None, None)
            n = int(state.batch["labels"].shape[0]) if isinstance(state.batch, dict) else 1
            self.flops_per_sample = self._flop_counter.get_total_flops() / max(n, 1)
            self._flop_counter = None
        elif event is Event.STEP_END:
            if self.monitor is not None:
                self.monitor.sample()
            if state.step % self.log_interval == 0:
                reporter.metrics(self._running(state))
        elif event is Event.EPOCH_END:
            self._epoch_end(state, reporter)
        elif event in (Event.FIT_END, Event.EXCEPTION):
            if self._flop_counter is not None:
                self._flop_counter.__exit__(None, None, None)
                self._flop_counter = None
            self.close()

    def _start(self) -> None:
        from greenstack.energy import EnergyMonitor, select_meters, should_meter

        self.metering = should_meter()
        if not self.metering:
            self.meter_notes.append("not local rank 0: this node is metered by local rank 0")
            return
        if self._given_meters is not None:
            meters = self._given_meters
        else:
            cfg = self.energy_cfg
            meters, self.meter_notes = select_meters(cfg.meter, tdp_w=cfg.tdp_w, default_tdp_w=cfg.default_tdp_w,
                                                     ram_w_per_gb=cfg.ram_w_per_gb)
        self.monitor = EnergyMonitor(meters, interval_s=self.energy_cfg.interval_s, pue=self.carbon_cfg.pue)
        if self.energy_cfg.idle_baseline_s > 0:
            log.info("measuring idle power for %.1f s", self.energy_cfg.idle_baseline_s)
            self.monitor.measure_idle_baseline(self.energy_cfg.idle_baseline_s)
        self.monitor.start()
        for meter in meters:
            log.info("energy: %s [%s]", meter.source, meter.provenance)
        log.info("carbon: %s", self.source.name)

    # -- accounting -------------------------------------------------------------------------------
    def _account_new(self) -> tuple[float, float, float]:
        """Account intervals recorded since the last call; returns (new kg, intensity, renewable %)."""
        from greenstack.carbon.accounting import account_emissions

        starts, ends, kwh = self.monitor.as_arrays("samples")
        new = slice(self._accounted, len(starts))
        if new.start >= len(starts):
            return 0.0, math.nan, math.nan
        energy = sum(kwh.values())[new]
        result = account_emissions(starts[new], ends[new], energy, self.source, pue=self.carbon_cfg.pue)
        self._accounted = len(starts)
        self._emissions_kg += result.total_emissions_kg
        return result.total_emissions_kg, result.mean_intensity_g_per_kwh, result.mean_renewable_percent

    def _running(self, state: State) -> dict[str, float]:
        if self.monitor is None:
            return {}
        _, intensity, renewable = self._account_new()
        energy_kwh = self.monitor.total_kwh() + sum(self._carried["kwh"].values())
        out = {"energy/total_kwh": energy_kwh, "carbon/total_kg_co2e": self._emissions_kg + self._carried["kg"],
               "cost/energy_usd": energy_kwh * self.carbon_cfg.pue * self.carbon_cfg.electricity_usd_per_kwh}
        if state.samples_seen:
            out["energy/j_per_sample"] = energy_kwh * J_PER_KWH / state.samples_seen
        if state.tokens_seen:
            out["energy/j_per_token"] = energy_kwh * J_PER_KWH / state.tokens_seen
        if not math.isnan(intensity):
            out["carbon/intensity_g_per_kwh"] = intensity
        if not math.isnan(renewable):
            out["carbon/renewable_percent"] = renewable
        util = self._gpu_utilization()
        if util is not None:
            out["efficiency/gpu_utilization"] = util
        return out

    def _epoch_end(self, state: State, reporter: Reporter) -> None:
        if self.monitor is None:
            return
        self.monitor.sample(label=f"epoch{state.epoch}", read=True)
        self._account_new()
        epoch_kg = self._emissions_kg - self._epoch_start_kg
        self._epoch_start_kg = self._emissions_kg
        self._epoch_kg.append(epoch_kg)
        reporter.metric("carbon/per_epoch_kg", epoch_kg)
        reporter.metric("carbon/total_kg_co2e", self._emissions_kg + self._carried["kg"])
        self.check_budget(state, reporter=reporter)

    def check_budget(self, state: State, *, every_step: bool = False, reporter: Reporter | None = None) -> bool:
        """Compare the run's (projected) emissions with `carbon.budget_kg`; True when it asks to stop.

        At epoch ends (`every_step=False`) the first check records a decision either way, on the linear
        projection to the planned end. Step-level checks (framework callbacks, `track`) record only a
        breach: the projection once a tenth of the run is done, or the emissions so far when the length
        is unknown or they already exceed the budget. One decision per run.
        """
        budget = self.carbon_cfg.budget_kg
        if budget is None or self.budget_decision is not None:
            return False
        from greenstack.carbon.accounting import project_total

        if every_step:
            if self.monitor is not None:
                self._account_new()
            so_far = self._emissions_kg + self._carried["kg"]
            if so_far > budget or state.progress < 0.1:
                projected, basis = so_far, "emissions so far"
            else:
                projected, basis = project_total(so_far, state.progress), "linear projection"
            if not projected > budget:
                return False
        else:
            if state.progress <= 0:
                return False
            so_far = self._emissions_kg + self._carried["kg"]
            projected, basis = project_total(so_far, state.progress), "linear projection"
        over = projected > budget
        action = self.carbon_cfg.budget_action if over else "continue"
        self.budget_decision = {"after_epoch": state.epoch, "after_step": state.step, "emissions_so_far_kg": so_far,
                                "projected_total_kg": projected, "basis": basis, "budget_kg": budget,
                                "action": action, "at": datetime.now(timezone.utc).isoformat()}
        (reporter or Reporter.for_state(state, self.name)).metric("carbon/projected_total_kg", projected)
        if over and action == "stop":
            log.warning("carbon budget: %s %.3g kg > budget %.3g kg: stopping", basis, projected, budget)
            state.request_stop(f"{'projected emissions' if basis.startswith('linear') else 'emissions so far'} "
                               f"{projected:.3g} kg exceed carbon.budget_kg={budget:g}")
            return True
        if over:
            log.warning("carbon budget: %s %.3g kg > budget %.3g kg (carbon.budget_action=warn)",
                        basis, projected, budget)
        else:
            log.info("carbon budget: projected %.3g kg within %.3g kg", projected, budget)
        return False

    def _gpu_utilization(self) -> float | None:
        for meter in self.monitor.meters if self.monitor else []:
            if hasattr(meter, "utilization"):
                return meter.utilization().get("gpu_util_percent")
        return None

    def close(self) -> None:
        """Stop the sampling thread (idempotent)."""
        if self.monitor is not None and not self.monitor.stopped:
            self.monitor.stop()
            self._account_new()

    def energy_monitor(self) -> Any | None:
        return self.monitor

    def state_dict(self) -> dict[str, Any]:
        """Energy and emissions so far, so a resumed run reports the whole run, not the last segment."""
        kwh = dict(self._carried["kwh"])
        kg, duration = self._carried["kg"], self._carried["duration_s"]
        if self.monitor is not None:
            self._account_new()
            for c, joules in self.monitor.total_energy_j().items():
                kwh[c] = kwh.get(c, 0.0) + joules / J_PER_KWH
            kg += self._emissions_kg
            duration += self.monitor.duration_s()
        return {"kwh": kwh, "kg": kg, "duration_s": duration, "epoch_kg": list(self._epoch_kg)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._carried = {"kwh": dict(state.get("kwh", {})), "kg": float(state.get("kg", 0.0)),
                         "duration_s": float(state.get("duration_s", 0.0))}
        self._epoch_kg = list(state.get("epoch_kg", []))

    # -- summary ----------------------------------------------------------------------------------
    @property
    def resumed(self) -> bool:
        """Whether this segment continues a run from a checkpoint (its totals include earlier segments)."""
        return bool(self._carried["kwh"] or self._carried["kg"] or self._carried["duration_s"])

    def final(self, state: State, latency_ms: float | None, latency_batch: int, *,
              reduce: bool = True) -> tuple[dict[str, Figure], dict]:
        """Summary figures (unit, provenance, source) and the CodeCarbon-compatible emissions row.

        `reduce=False` (a run ending on an error): this process's figures only, no collective that
        peers which already failed would never join.
        """
        from greenstack.carbon.accounting import account_emissions, embodied_emissions_kg

        self.close()
        figs: dict[str, Figure] = {}
        mon = self.monitor
        result = None
        local = dict.fromkeys(("cpu", "gpu", "ram", "kg", "baseline_kg"), 0.0)  # same keys on every rank
        baseline = None
        if mon is not None:
            starts, ends, kwh = mon.as_arrays("samples")
            energy_figs = mon.figures()
            e_prov = energy_figs["energy/total_kwh"].provenance
            result = account_emissions(starts, ends, sum(kwh.values()) if kwh else np.zeros(0), self.source,
                                       pue=self.carbon_cfg.pue, energy_provenance=e_prov)
            local.update({c: float(v.sum()) + self._carried["kwh"].get(c, 0.0) for c, v in kwh.items()})
            local["kg"] = result.total_emissions_kg + self._carried["kg"]
            baseline = self._baseline(starts, ends, sum(kwh.values()) if kwh else np.zeros(0))
            if baseline is not None:
                local["baseline_kg"] = baseline[0] + self._carried["kg"]
        # every rank joins the reduction (collectives must match); only metering ranks add energy
        node = {**local, "samples": float(state.samples_seen), "tokens": float(state.tokens_seen)}
        node = reduce_across_ranks(node) if reduce else node
        if mon is None or result is None:
            return figs, {}
        per_component = {c: node[c] for c in mon.components}
        total_kwh = sum(per_component.values())
        e_src = energy_figs["energy/total_kwh"].source
        kg = node["kg"]
        src = f"{e_src}; {result.source}"
        prov = result.provenance
        figs["carbon/total_kg_co2e"] = Figure(kg, "kgCO2eq", prov, src)
        if self._epoch_kg:
            figs["carbon/per_epoch_kg"] = Figure(statistics.fmean(self._epoch_kg), "kgCO2eq/epoch", prov,
                                                 f"mean over {len(self._epoch_kg)} epochs; {src}")
        i_prov = weakest(*result.energy_kwh_by_provenance) if result.energy_kwh_by_provenance else "fallback"
        figs["carbon/intensity_g_per_kwh"] = Figure(result.mean_intensity_g_per_kwh, "gCO2eq/kWh", i_prov,
                                                    f"energy-weighted; {result.source}")
        figs["carbon/renewable_percent"] = Figure(
            None if math.isnan(result.mean_renewable_percent) else result.mean_renewable_percent, "%",
            i_prov if not math.isnan(result.mean_renewable_percent) else "fallback",
            f"energy-weighted; {result.source}" if not math.isnan(result.mean_renewable_percent)
            else f"{self.source.name} has no renewable share")
        for c in per_component:
            figs[f"energy/{c}_kwh"] = Figure(node[c], "kWh", energy_figs[f"energy/{c}_kwh"].provenance,
                                             energy_figs[f"energy/{c}_kwh"].source)
        figs["energy/total_kwh"] = Figure(total_kwh, "kWh", e_prov, e_src)
        figs["energy/facility_kwh"] = Figure(total_kwh * self.carbon_cfg.pue, "kWh",
                                             weakest(e_prov, energy_figs["energy/pue"].provenance),
                                             f"total x {energy_figs['energy/pue'].source}")
        figs["energy/pue"] = energy_figs["energy/pue"]
        for key in ("energy/idle_power_w", "energy/dynamic_kwh", "energy/meter_errors"):
            if key in energy_figs:
                figs[key] = energy_figs[key]
        samples = node.get("samples", state.samples_seen)
        figs["energy/j_per_sample"] = Figure(total_kwh * J_PER_KWH / samples if samples else None, "J/sample",
                                             e_prov, f"energy/total_kwh / {int(samples)} training samples")
        tokens = node.get("tokens", state.tokens_seen)
        if tokens:
            figs["energy/j_per_token"] = Figure(total_kwh * J_PER_KWH / tokens, "J/token", e_prov,
                                                f"energy/total_kwh / {int(tokens)} training target tokens")
        price = self.carbon_cfg.electricity_usd_per_kwh
        figs["cost/energy_usd"] = Figure(total_kwh * self.carbon_cfg.pue * price, "USD", weakest(e_prov, "estimated"),
                                         f"facility kWh x configured price {price:g} USD/kWh")
        util = self._gpu_utilization()
        figs["efficiency/gpu_utilization"] = Figure(util, "%", "measured", "nvml.utilization") if util is not None \
            else Figure(None, "%", "fallback", "no GPU metered: " + "; ".join(n for n in self.meter_notes
                                                                              if n.startswith("nvml")) or "no NVML")
        figs["efficiency/memory_efficiency"] = self._memory_figure(state)
        if self.flops_per_sample is not None and total_kwh > 0:
            total_flops = self.flops_per_sample * state.samples_seen
            figs["efficiency/flops_per_watt"] = Figure(
                total_flops / (total_kwh * J_PER_KWH), "FLOP/J", weakest("estimated", e_prov),
                f"torch.utils.flop_counter on one batch ({self.flops_per_sample:.4g} FLOP/sample fwd+bwd) "
                f"x {state.samples_seen} samples / energy")
        if latency_ms is not None:
            figs["efficiency/inference_latency_ms"] = Figure(
                latency_ms, "ms/batch", "measured", f"median of 10 eval forwards, batch {latency_batch}, "
                                                     f"{state.device}")
        if self.carbon_cfg.embodied_kg_co2e is not None:
            hours = mon.duration_s() / 3600
            figs["carbon/embodied_kg_co2e"] = Figure(
                embodied_emissions_kg(hours, self.carbon_cfg.embodied_kg_co2e, self.carbon_cfg.embodied_lifetime_hours),
                "kgCO2eq", "estimated", f"configured {self.carbon_cfg.embodied_kg_co2e:g} kg over "
                                        f"{self.carbon_cfg.embodied_lifetime_hours:g} h, x {hours:.4g} h")
        figs.update(self._saving_and_cost_figures(state, figs, node, baseline))
        if self.budget_decision is not None:
            d = self.budget_decision
            figs["carbon/projected_total_kg"] = Figure(d["projected_total_kg"], "kgCO2eq", prov,
                                                       f"{d.get('basis', 'linear projection')} after epoch {d['after_epoch']}"
                                                       f" (step {d.get('after_step')})")
        return figs, self._emissions_row(state, figs, result, mon)

    # -- baselines and money ------------------------------------------------------------------------
    def _baseline_kind(self, first_start_s: float) -> str:
        kind = self.carbon_cfg.savings_baseline
        if kind != "auto":
            return kind
        waited = self.submitted_at is not None and first_start_s - self.submitted_at.timestamp() > 60.0
        return "submission" if waited else "annual_mean"

    def _baseline(self, starts: np.ndarray, ends: np.ndarray, energy: np.ndarray) -> tuple[float, str, str] | None:
        """(kg this segment's energy would have emitted at the baseline, provenance, description)."""
        from greenstack.carbon.accounting import account_emissions

        if len(starts) == 0:
            return None
        pue = self.carbon_cfg.pue
        if self._baseline_kind(float(starts[0])) == "submission":
            if self.submitted_at is None:
                return None
            shift = float(starts[0]) - self.submitted_at.timestamp()
            res = account_emissions(starts - shift, ends - shift, energy, self.source, pue=pue)
            return (res.total_emissions_kg, res.provenance,
                    f"the same energy profile started at submission {self.submitted_at.isoformat(timespec='minutes')} "
                    f"({shift / 3600:.2f} h earlier; {res.source})")
        mean = annual_mean_intensity(self.source, float(starts[0]))
        if mean is None:
            return None
        g_per_kwh, prov, what = mean
        return float(energy.sum()) * pue * g_per_kwh / 1000.0, prov, f"the same energy at {what}"

    def _saving_and_cost_figures(self, state: State, figs: dict[str, Figure], node: dict[str, float],
                                 baseline: tuple[float, str, str] | None) -> dict[str, Figure]:
        """carbon/savings_vs_baseline, cost/per_epoch_usd, cost/compute_usd, cost/spot_savings_usd,
        cost/carbon_credit_value_usd: each with its inputs in `source`, labelled like every figure."""
        out: dict[str, Figure] = {}
        kg_fig = figs["carbon/total_kg_co2e"]
        kg = float(kg_fig.value or 0.0)
        price_t = self.carbon_cfg.carbon_price_usd_per_t
        if baseline is not None:
            base_kg, base_prov, what = node["baseline_kg"], baseline[1], baseline[2]
            carried = " (earlier segments of a resumed run count at their own emissions)" if self.resumed else ""
            saving = Figure(base_kg - kg, "kgCO2eq", weakest(kg_fig.provenance, base_prov),
                            f"{base_kg:.6g} kg at the baseline - {kg:.6g} kg emitted; baseline: {what}{carried}")
            out["carbon/savings_vs_baseline"] = saving
            out["cost/carbon_credit_value_usd"] = Figure(
                saving.value / 1000.0 * price_t, "USD", weakest(saving.provenance, "estimated"),
                f"carbon/savings_vs_baseline {saving.value:.6g} kg / 1000 x {price_t:g} USD/tCO2e "
                "(carbon.carbon_price_usd_per_t)")
        else:
            why = f"{self.source.name} has no annual mean" if self.carbon_cfg.savings_baseline != "submission" \
                else "no submission time known"
            out["carbon/savings_vs_baseline"] = Figure(None, "kgCO2eq", "fallback", f"no baseline: {why}")
            out["cost/carbon_credit_value_usd"] = Figure(None, "USD", "fallback", "no carbon/savings_vs_baseline")
        hours = (self.monitor.duration_s() + self._carried["duration_s"]) / 3600.0 if self.monitor else 0.0
        row = self.carbon_cfg.instance_price()
        run_cost = figs["cost/energy_usd"]
        if row is not None:
            on_demand, spot = row["on_demand_usd_per_hour"], row.get("spot_usd_per_hour")
            what = f"{row['instance_type']} {row['region']} ({row['catalog']})"
            run_cost = Figure(hours * on_demand, "USD", "estimated",
                              f"{hours:.6g} h metered x on-demand {on_demand:g} USD/h, {what}")
            out["cost/compute_usd"] = run_cost
            out["cost/spot_savings_usd"] = (
                Figure(hours * (on_demand - spot), "USD", "estimated",
                       f"{hours:.6g} h x (on-demand {on_demand:g} - spot {spot:g}) USD/h, {what}")
                if spot is not None else Figure(None, "USD", "fallback", f"no spot price in the catalog for {what}"))
        else:
            out["cost/spot_savings_usd"] = Figure(None, "USD", "fallback",
                                                  "no instance configured (carbon.instance_type=TYPE from the "
                                                  "price catalog)")
        epochs = state.step / state.steps_per_epoch if state.steps_per_epoch else None
        if epochs and isinstance(run_cost.value, (int, float)):
            out["cost/per_epoch_usd"] = Figure(run_cost.value / epochs, "USD/epoch", run_cost.provenance,
                                               f"{'cost/compute_usd' if row is not None else 'cost/energy_usd'} "
                                               f"{run_cost.value:.6g} USD / {epochs:.4g} epochs")
        else:
            out["cost/per_epoch_usd"] = Figure(None, "USD/epoch", "fallback", "no epoch length known")
        return out

    def _memory_figure(self, state: State) -> Figure:
        if state.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(state.device)
            total = torch.cuda.get_device_properties(state.device).total_memory
            return Figure(peak / total, "fraction", "measured", "torch.cuda.max_memory_allocated / device memory")
        import psutil

        rss = psutil.Process().memory_info().rss
        return Figure(rss / psutil.virtual_memory().total, "fraction", "measured",
                      "process RSS at end / system memory (psutil)")

    def _emissions_row(self, state: State, figs: dict[str, Figure], result: Any, mon: Any) -> dict[str, Any]:
        import psutil

        duration = mon.duration_s() + self._carried["duration_s"]
        energy = {c: figs[f"energy/{c}_kwh"].value if f"energy/{c}_kwh" in figs else 0.0 for c in ("cpu", "gpu", "ram")}
        power = {c: (energy[c] or 0.0) * J_PER_KWH / duration if duration > 0 else 0.0 for c in energy}
        kg = figs["carbon/total_kg_co2e"].value
        gpus = [m for m in mon.meters if m.name == "nvml"]
        cpu = next((m for m in mon.meters if m.name == "tdp"), None)
        return {
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "duration": round(duration, 3), "emissions": kg,
            "emissions_rate": kg / duration if duration > 0 else 0.0,
            "cpu_power": power["cpu"], "gpu_power": power["gpu"], "ram_power": power["ram"],
            "cpu_energy": energy["cpu"], "gpu_energy": energy["gpu"], "ram_energy": energy["ram"],
            "energy_consumed": figs["energy/facility_kwh"].value,
            "country_iso_code": self.source.country_iso3 or "", "region": self.source.zone,
            "os": platform.platform(), "python_version": platform.python_version(),
            "cpu_count": psutil.cpu_count(), "cpu_model": getattr(cpu, "cpu_model", "") if cpu else "",
            "gpu_count": sum(len(getattr(g, "devices", [])) for g in gpus),
            "ram_total_size": round(psutil.virtual_memory().total / 2**30, 3),
            "tracking_mode": "process", "pue": self.carbon_cfg.pue,
            "provenance": figs["carbon/total_kg_co2e"].provenance,
            "source": figs["carbon/total_kg_co2e"].source,
        }


def measure_latency_ms(model: torch.nn.Module, batch: Any, repeats: int = 10) -> float | None:
    """Median wall time of an eval-mode forward on one batch (ms); None without a batch."""
    from greenstack.tasks.base import forward

    if not isinstance(batch, dict):
        return None
    was_training = model.training
    model.eval()
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            forward(model, batch)
            if batch["labels"].device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    model.train(was_training)
    return statistics.median(times[1:]) * 1000


EMISSIONS_COLUMNS = ["timestamp", "project_name", "run_id", "experiment_id", "duration", "emissions",
                     "emissions_rate", "cpu_power", "gpu_power", "ram_power", "cpu_energy", "gpu_energy",
                     "ram_energy", "energy_consumed", "country_name", "country_iso_code", "region",
                     "cloud_provider", "cloud_region", "os", "python_version", "codecarbon_version",
                     "cpu_count", "cpu_model", "gpu_count", "gpu_model", "longitude", "latitude",
                     "ram_total_size", "tracking_mode", "on_cloud", "pue", "provenance", "source"]


def write_emissions_csv(path: Path, row: dict[str, Any], *, replace_run_id: str | None = None) -> None:
    """Append one run row with CodeCarbon's column names (plus provenance/source) so dashboards read it.

    `replace_run_id`: drop that run's earlier rows first (a resumed run's row covers its interrupted
    segments, whose partial rows would otherwise be counted twice).
    """
    import csv
    import io

    from greenstack.io import atomic_write_bytes

    existing = path.read_text() if path.is_file() else ""
    if existing and replace_run_id is not None:
        kept = [r for r in csv.DictReader(io.StringIO(existing)) if r.get("run_id") != replace_run_id]
        out = io.StringIO()
        rewrite = csv.DictWriter(out, fieldnames=EMISSIONS_COLUMNS, extrasaction="ignore")
        rewrite.writeheader()
        rewrite.writerows(kept)
        existing = out.getvalue()
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=EMISSIONS_COLUMNS, extrasaction="ignore")
    if not existing:
        writer.writeheader()
    writer.writerow({c: row.get(c, "") for c in EMISSIONS_COLUMNS})
    atomic_write_bytes(path, (existing + buf.getvalue()).encode())


def annual_mean_intensity(source: Any, at_s: float) -> tuple[float, str, str] | None:
    """(gCO2eq/kWh, provenance, description) of the source's zone over the calendar year of `at_s`.

    A trace covering that year gives its own mean (labelled like the trace); otherwise the year the
    source replays (labelled estimated). Constant sources are their own annual mean; live providers
    have none (None).
    """
    from greenstack.carbon.sources import CountryAverageSource, SeriesSource, StaticSource

    if isinstance(source, (StaticSource, CountryAverageSource)):
        prov = getattr(source, "provenance", "estimated")
        return source.intensity_g_per_kwh, prov, f"{source.name} (constant: its own annual mean)"
    if not isinstance(source, SeriesSource):
        return None
    year = datetime.fromtimestamp(at_s, tz=timezone.utc).year
    y0 = datetime(year, 1, 1, tzinfo=timezone.utc).timestamp()
    y1 = datetime(year + 1, 1, 1, tzinfo=timezone.utc).timestamp()
    inside = source.start_s <= y0 and y1 <= source.end_s
    if not inside:
        if source.replay_year is None:
            return None
        year = source.replay_year
        y0 = datetime(year, 1, 1, tzinfo=timezone.utc).timestamp()
        y1 = datetime(year + 1, 1, 1, tzinfo=timezone.utc).timestamp()
    t = source._t
    mask = (t >= y0) & (t < y1)
    if not mask.any():
        return None
    mean = float(source._ci[mask].mean())
    prov = source.covered_provenance if inside else "estimated"
    zone = source.zone or source.name
    return mean, prov, (f"{zone}'s {year} annual mean {mean:.4g} gCO2eq/kWh ({source.label}"
                        + ("" if inside else ", replayed: the run is outside the trace") + ")")
