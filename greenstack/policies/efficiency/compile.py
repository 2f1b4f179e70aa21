"""torch.compile (opt-in), in place, with a fallback to eager on any failure."""

from __future__ import annotations

from typing import Annotated, Literal

from greenstack.efficiency.compile import is_compiled, time_compiled_vs_eager, try_compile, uncompile
from greenstack.efficiency.probe import Comparison, energy_reader_from
from greenstack.engine.events import Event
from greenstack.engine.reporter import Reporter
from greenstack.engine.state import State
from greenstack.errors import Check, checked
from greenstack.policies.efficiency._common import (
    FROZEN_WHY,
    Count,
    Enabled,
    ProbingPolicy,
    Speedup,
    config_key,
    device_words,
)
from greenstack.provenance import Figure

BACKEND = Check(lambda b: isinstance(b, str) and bool(b), "must be a torch.compile backend name",
                "e.g. inductor, aot_eager, eager")


class Compile(ProbingPolicy):
    """Compiles the model in place at the first batch (`nn.Module.compile`, state-dict keys unchanged).

    Compilation errors (no compiler, unsupported ops, a bad backend name) are caught: the run continues
    eagerly and the reason is logged. `auto` then times compiled vs eager steps and keeps the compiled
    model only for a gain of `min_speedup`; `on` keeps it whenever it compiles. Compilation can take
    minutes on CPU, which is why the default stack leaves this policy disabled.
    """

    key = "compile"
    events = frozenset({Event.BATCH_START})

    @checked(config_key)
    def __init__(self, enabled: Enabled = True, mode: Literal["auto", "on", "off"] = "auto",
                 backend: Annotated[str, BACKEND] = "inductor",
                 compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
                 | None = None, dynamic: bool | None = None, fullgraph: bool = False,
                 min_speedup: Speedup = 1.05, probe_steps: Count = 1, probe_rounds: Count = 3) -> None:
        super().__init__(enabled, mode, [], min_speedup=min_speedup, probe_steps=probe_steps,
                         probe_rounds=probe_rounds)
        self.backend, self.compile_mode, self.dynamic, self.fullgraph = backend, compile_mode, dynamic, fullgraph

    def __call__(self, event: Event, state: State, reporter: Reporter) -> None:
        if self.decided:
            return
        if self.mode == "off":
            self.decide(state, reporter, False, "mode=off")
            return
        if is_compiled(state.model):
            self.warn(state, reporter, "no effect — the model is already compiled")
            self.decide(state, reporter, True, "compiled before this policy")
            return
        if self.frozen(state):
            self.decide(state, reporter, False, FROZEN_WHY)
            return
        if isinstance(state.batch.get("inputs"), dict) and self.dynamic is None:
            self.warn(state, reporter, "text batches change length from batch to batch: expect recompilations "
                             "(set efficiency.compile.dynamic=true, or pad to fixed multiples)")
        result = try_compile(state.model, state.batch, device=state.device, autocast_dtype=state.autocast_dtype,
                             backend=self.backend, mode=self.compile_mode, dynamic=self.dynamic,
                             fullgraph=self.fullgraph)
        self.figures["efficiency/compile_first_step_s"] = Figure(
            result.compile_s, "s", "measured", f"first compiled fwd+bwd ({result.reason})")
        if not result.ok:
            self.warn(state, reporter, f"compilation failed, training eagerly — {result.reason}")
            self.decide(state, reporter, False, f"compile failed ({result.reason}); eager fallback", error=result.reason)
            return
        restored = self.restored_choice()
        if restored is not None:
            if not restored:
                uncompile(state.model)
            self.decide(state, reporter, restored, self.restored_why)
            return
        energy = energy_reader_from(state)
        eager, compiled = time_compiled_vs_eager(state.model, state.batch, device=state.device,
                                                 autocast_dtype=state.autocast_dtype, steps=self.probe_steps,
                                                 rounds=self.probe_rounds, energy=energy)
        cmp = Comparison(eager, compiled, energy.provenance if energy else None, energy.source if energy else None)
        self.record_comparison(state, reporter, cmp)
        what = (f"{cmp.describe('compiled', 'eager')} on {device_words(state.device)} "
                f"(first step {result.compile_s:.1f} s, {result.reason})")
        on = cmp.helps(self.min_speedup) if self.mode == "auto" else True
        if not on:
            uncompile(state.model)
            if cmp.gain >= 1.0:
                what += self.short_of(cmp)
        elif cmp.gain < 1.0:
            self.warn(state, reporter, f"mode=on forced although {what}")
        self.decide(state, reporter, on, what, **self.comparison_data(cmp))
