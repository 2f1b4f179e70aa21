"""The engine contract (issue 16, ARCHITECTURE.md "Engine contract"): what a policy may touch, in which order.

(a) no side channels in greenstack/: no `getattr(<policy>, "<hook>")` probes, no `.extras` string protocol, no
    direct writes into `state.metrics` (policies report through their `Reporter`);
(b) the engine owns dispatch order: observers open (INIT, FIT_START, EPOCH_START, BATCH_START) before
    modifiers, modifiers act before observers on every other event; declared order within a role;
(c) saved policy state is keyed by policy name: it round-trips when the policies' order changes.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest
import torch

import greenstack
from greenstack.checkpoint.snapshot import apply_snapshot, capture, policy_keys, saved_policy_states
from greenstack.engine.audit_trail import record_policy_decisions
from greenstack.engine.events import Event
from greenstack.engine.loop import Trainer, TrainerConfig
from greenstack.engine.optim import Optim
from greenstack.engine.policy import Policy, Role
from greenstack.engine.state import State
from greenstack.ledger.audit import AuditLog

SRC = Path(greenstack.__file__).parent
#: hooks that used to be probed with getattr on policies; they are declared Policy methods now
HOOKS = {"checkpoint_now", "monitor", "region_report", "restore_model", "recorder", "decisions",
         "bind_run_config", "replay", "energy_monitor", "recorded_decisions", "decision_recorder",
         "at_boundary", "pending_signal"}


#: the loop's own metrics (train/loss, lr, eval figures) and the reporter write the metric buffer directly
METRIC_WRITERS = {"greenstack/engine/loop.py", "greenstack/engine/reporter.py"}


def _writes_state_metrics(node: ast.AST) -> bool:
    """`state.metrics[k] = v` or `state.metrics.update(...)` (any `<x>.state.metrics` too)."""
    if isinstance(node, ast.Assign):
        return any(isinstance(t, ast.Subscript) and ast.unparse(t.value).endswith("state.metrics") for t in node.targets)
    return isinstance(node, ast.Call) and ast.unparse(node.func).endswith("state.metrics.update")


def _sources() -> list[tuple[Path, ast.AST]]:
    return [(path, ast.parse(path.read_text(encoding="utf-8"), str(path))) for path in sorted(SRC.rglob("*.py"))]


def _name(node: ast.AST) -> str:
    return ast.unparse(node).lower()


def test_no_getattr_hook_probes_and_no_extras_channel():
    probes, extras, metric_writes = [], [], []
    for path, tree in _sources():
        where = path.relative_to(SRC.parent)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr") \
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
                attr, obj = node.args[1].value, _name(node.args[0])
                if attr in HOOKS or ("polic" in obj and attr not in ("name",)):
                    probes.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
            if isinstance(node, ast.Attribute) and node.attr == "extras":
                extras.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
            if isinstance(node, ast.Attribute) and node.attr == "__self__":
                probes.append(f"{where}:{node.lineno}: reach-in through {ast.unparse(node)}")
            if str(where) not in METRIC_WRITERS and _writes_state_metrics(node):
                metric_writes.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    assert not probes, "declare the hook on Policy instead of probing for it:\n" + "\n".join(probes)
    assert not extras, "use a typed member of State (state.requests, ...) instead of extras:\n" + "\n".join(extras)
    assert "extras" not in State.__dataclass_fields__
    assert not metric_writes, "report metrics with reporter.metric(name, value):\n" + "\n".join(metric_writes)


def _policy_classes() -> list[type[Policy]]:
    for info in pkgutil.walk_packages(greenstack.__path__, "greenstack."):
        if info.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(info.name)
        except ImportError:  # an optional integration that is not installed
            continue
    seen, todo = [], [Policy]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in seen and sub.__module__.startswith("greenstack."):
                seen.append(sub)
                todo.append(sub)
    return seen


def test_every_policy_class_declares_its_role():
    classes = _policy_classes()
    assert len(classes) > 20  # the walk found the policies
    undeclared = [f"{c.__module__}.{c.__qualname__}" for c in classes
                  if not any("role" in vars(k) for k in c.__mro__ if k is not Policy and issubclass(k, Policy))]
    assert not undeclared, "declare `role = Role.MODIFIER` or `Role.OBSERVER`: " + ", ".join(undeclared)


class _Seen(Policy):
    events = frozenset(Event)
    always = frozenset(Event)

    def __init__(self, name: str, log: list[tuple[Event, str]]) -> None:
        super().__init__(name=name)
        self.log = log

    def __call__(self, event, state, reporter):
        self.log.append((event, self.name))


class _Modifier(_Seen):
    role = Role.MODIFIER


class _Observer(_Seen):
    role = Role.OBSERVER


def _fit(policies_of) -> list[tuple[Event, str]]:
    log: list[tuple[Event, str]] = []
    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    loader = torch.utils.data.DataLoader(data, batch_size=4,
                                         collate_fn=lambda b: {"inputs": torch.stack([x for x, _ in b]),
                                                               "labels": torch.stack([y for _, y in b])})
    trainer = Trainer(torch.nn.Linear(4, 2), loader, Optim(lr=0.1),
                      TrainerConfig(max_duration="2ba", eval_interval="1ep", progress=False),
                      policies=policies_of(log), batch_size=4)
    trainer.fit()
    return log


def test_observers_open_first_and_close_last_modifiers_keep_their_declared_order():
    log = _fit(lambda log: [_Observer("clock", log), _Modifier("amp", log), _Observer("meter", log),
                            _Modifier("prune", log), _Modifier("checkpoint", log)])
    order = {}
    for event, name in log:
        order.setdefault(event, [])
        if name not in order[event]:
            order[event].append(name)
    for event in (Event.INIT, Event.FIT_START, Event.EPOCH_START, Event.BATCH_START):
        assert order[event] == ["clock", "meter", "amp", "prune", "checkpoint"], event
    for event in (Event.AFTER_FORWARD, Event.AFTER_BACKWARD, Event.STEP_END, Event.EPOCH_END, Event.CHECKPOINT,
                  Event.FIT_END):
        assert order[event] == ["amp", "prune", "checkpoint", "clock", "meter"], event


def test_a_role_less_base_policy_counts_as_a_modifier():
    assert Policy.role is Role.MODIFIER
    log = _fit(lambda log: [_Observer("meter", log), _Seen("plain", log)])
    assert [n for e, n in log if e is Event.STEP_END][:2] == ["plain", "meter"]


class _Counter(Policy):
    def __init__(self, name: str, value: int) -> None:
        super().__init__(name=name)
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def test_policy_state_round_trips_by_name_when_the_order_changes():
    saved = State(model=torch.nn.Linear(2, 2), policies=[_Counter("a", 1), _Counter("b", 2), _Counter("a", 3)])
    snapshot = capture(saved)
    assert list(snapshot.trainer["policies"]) == ["a", "b", "a#2"]
    a1, b, a2 = _Counter("a", 0), _Counter("b", 0), _Counter("a", 0)
    apply_snapshot(snapshot, State(model=torch.nn.Linear(2, 2), policies=[b, a1, a2]))
    assert (a1.value, b.value, a2.value) == (1, 2, 3)


def test_checkpoints_keyed_by_position_are_read_by_name():
    old = {"00:clock": {"t": 1}, "01:amp": {"on": True}, "02:amp": {"on": False}}
    assert saved_policy_states(old) == {"clock": {"t": 1}, "amp": {"on": True}, "amp#2": {"on": False}}
    assert policy_keys(["x", "y", "x", "x"]) == ["x", "y", "x#2", "x#3"]


@pytest.mark.parametrize("event", [Event.STEP_END])
def test_reporter_metrics_reach_the_metrics_line_and_decisions_the_audit_log(event, tmp_path):
    class Reports(Policy):
        role = Role.OBSERVER
        events = frozenset({event})

        def __call__(self, ev, state, reporter):
            reporter.metric("test/value", state.step)
            reporter.decision("efficiency", {"did": f"step {state.step}"})

    lines: list[dict] = []

    class Sink:
        def log(self, metrics, step):
            lines.append(dict(metrics))

    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    loader = torch.utils.data.DataLoader(data, batch_size=4,
                                         collate_fn=lambda b: {"inputs": torch.stack([x for x, _ in b]),
                                                               "labels": torch.stack([y for _, y in b])})
    trainer = Trainer(torch.nn.Linear(4, 2), loader, Optim(lr=0.1),
                      TrainerConfig(max_duration="2ba", progress=False, log_interval=1),
                      policies=[Reports(name="reports")], sinks=[Sink()], batch_size=4)
    trainer.fit()
    assert [line["test/value"] for line in lines if "test/value" in line] == [1, 2]
    assert [(d.policy, d.kind, d.data["did"]) for d in trainer.decisions.entries] == \
        [("reports", "efficiency", "step 1"), ("reports", "efficiency", "step 2")]
    with pytest.raises(ValueError, match="audit kind"):
        trainer.reporter(trainer.policies[0]).decision("", {})
    audit = AuditLog(tmp_path / "audit.jsonl")
    assert record_policy_decisions(audit, trainer.policies, reported=trainer.decisions) == 2
    assert record_policy_decisions(audit, trainer.policies, reported=trainer.decisions) == 0  # never twice
    assert [(r["kind"], r["data"]) for r in audit.records()] == \
        [("efficiency", {"policy": "reports", "did": "step 1"}), ("efficiency", {"policy": "reports", "did": "step 2"})]
