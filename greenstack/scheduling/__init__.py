"""Carbon-aware scheduling: window search, baselines and backtests, region choice, price catalog.

* `windows`   - pure, vectorised window search (contiguous, interruptible, risk-aware objectives)
* `rolling`   - forecasts from every hour of a trace with daily refits (backtests, no look-ahead)
* `backtest`  - greenstack vs oracle, seasonal-naive and threshold on a trace (`greenstack plan backtest`)
* `outlook`   - what a policy can know about the coming hours from any intensity source
* `regions`, `prices` - region scoring and the dated cloud price catalog (`greenstack plan region`)
* `decisions` - JSON-able decision records for reports, trackers and the audit log
* `slurm`     - the `--begin` value for a chosen start

The policies that use them live in `greenstack.policies.scheduler`.
"""

from greenstack.scheduling.windows import (
    SlotPlan,
    WindowChoice,
    best_slots,
    best_window,
    choose_starts,
    planning_values,
    slot_dp,
    slots_cost,
    window_costs,
)

__all__ = ["SlotPlan", "WindowChoice", "best_slots", "best_window", "choose_starts", "planning_values", "slot_dp",
           "slots_cost", "window_costs"]
