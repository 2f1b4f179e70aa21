"""No process-wide mutable state in greenstack/: an AST scan, and the per-run behaviour it protects.

Why: a multirun trains several jobs in one process; a module-level registry (the old preemption
`_Registry`) once carried one job's checkpointing policy and group hooks into the next. State that
lives as long as a run belongs to an object created for that run (`State.preemption`, the CLI's
per-invocation job table and exit codes), not to a module.
"""

from __future__ import annotations

import ast
import functools
import json
import textwrap
from pathlib import Path

import pytest
import torch

import greenstack
from greenstack.engine.events import Event
from greenstack.engine.policy import Policy
from greenstack.engine.state import State

PACKAGE = Path(greenstack.__file__).parent
#: methods that change a list, dict, set, deque or bytearray in place
MUTATORS = frozenset({"append", "extend", "update", "add", "clear", "pop", "popitem", "setdefault", "insert",
                      "remove", "discard", "sort", "reverse", "appendleft", "extendleft", "rotate",
                      "__setitem__", "__delitem__", "difference_update", "intersection_update",
                      "symmetric_difference_update"})
#: calls that build a mutable container
CONTAINER_CALLS = frozenset({"list", "dict", "set", "defaultdict", "deque", "OrderedDict", "Counter", "bytearray",
                             "WeakValueDictionary", "WeakKeyDictionary", "WeakSet"})
#: calls whose result is immutable or a handle, never state (a capitalised call is taken for an instance)
IMMUTABLE_CALLS = frozenset({"MappingProxyType", "frozenset", "tuple", "Path", "PurePath", "TypeVar", "ParamSpec",
                             "NamedTuple", "ContextVar", "Lock", "RLock", "Figure", "Problem", "Decimal",
                             "Fraction", "Template"})
#: the only module-level ContextVars: handles Hydra's call chain forces on us, each set by a `with`
#: block for one job or one sweep and reset when it ends (see their docstrings)
CONTEXT_VARS = frozenset({"greenstack/launch/preemption.py:_OFFERED", "greenstack/launch/jobs.py:_CURRENT",
                          "greenstack/paths.py:_SEARCHPATH_RECIPE_DIRS"})
#: SMALL list of module-level mutable objects that are filled once at import and never per run
#: (path:name -> why). Prefer an immutable table (tuple, frozenset, MappingProxyType) to an entry here.
ALLOWED: dict[str, str] = {}


def _call_name(node: ast.AST) -> str | None:
    if not isinstance(node, ast.Call):
        return None
    f = node.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def _mutable(value: ast.AST) -> bool:
    """A container literal or constructor, or an instance (capitalised call) that may be mutated later."""
    if isinstance(value, (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)):
        return True
    name = _call_name(value)
    if name is None or name in IMMUTABLE_CALLS:
        return False
    return name in CONTAINER_CALLS or name.lstrip("_")[:1].isupper()


def _root(node: ast.AST) -> ast.AST:
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node


def _mutated_paths(tree: ast.AST) -> list[tuple[ast.AST, int]]:
    """(the expression whose object is changed, line) for every in-place change in `tree`."""
    found: list[tuple[ast.AST, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS:
            found.append((node.func.value, node.lineno))
        targets: list[ast.AST] = []
        if isinstance(node, (ast.Assign, ast.Delete)):
            targets = list(node.targets)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for target in targets:
            for t in (target.elts if isinstance(target, ast.Tuple) else [target]):
                if isinstance(t, (ast.Subscript, ast.Attribute)):
                    found.append((t.value, node.lineno))
                elif isinstance(node, ast.AugAssign) and isinstance(t, ast.Name):
                    found.append((t, node.lineno))
    return found


def _bindings(body: list[ast.stmt]) -> dict[str, int]:
    """Names bound to mutable values by the statements of one module or class body."""
    names: dict[str, int] = {}
    for node in body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        for t in targets:
            if isinstance(t, ast.Name) and t.id != "__all__" and _mutable(value):
                names[t.id] = node.lineno
    return names


def scan_source(source: str, where: str = "<src>") -> list[str]:
    """Every piece of module-level or class-level mutable state in one module's source."""
    tree = ast.parse(source)
    problems = [f"{where}:{n.lineno}: `global {', '.join(n.names)}` (module state changed at run time)"
                for n in ast.walk(tree) if isinstance(n, ast.Global)]
    changes = _mutated_paths(tree)
    module_names = _bindings(tree.body)
    for path, line in changes:
        root = _root(path)
        if isinstance(root, ast.Name) and root.id in module_names:
            problems.append(f"{where}:{line}: module-level `{root.id}` (line {module_names[root.id]}) is changed "
                            "in place: keep it in an object created per run, or make it immutable")
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        class_names = _bindings(cls.body)
        rebound = {t.attr for n in ast.walk(cls) if isinstance(n, ast.Assign) for t in n.targets
                   if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
        for path, line in _mutated_paths(cls):
            # `cls.X[...] = `, `Class.X.append()`, or `self.X.append()` on a class attribute never rebound
            if isinstance(path, ast.Attribute) and path.attr in class_names and isinstance(path.value, ast.Name) \
                    and (path.value.id in ("cls", cls.name) or (path.value.id == "self" and path.attr not in rebound)):
                problems.append(f"{where}:{line}: class-level `{cls.name}.{path.attr}` is a mutable registry shared "
                                "by every instance and run")
    return problems


@functools.cache
def _package_sources() -> dict[str, str]:
    return {p.relative_to(PACKAGE.parent).as_posix(): p.read_text(encoding="utf-8")
            for p in sorted(PACKAGE.rglob("*.py"))}


def test_the_scan_finds_registries_globals_and_class_level_state():
    bad = textwrap.dedent("""
        import threading
        _jobs = []
        _state = _Registry()
        TABLE = {"a": 1}
        FLAG = False

        def record(x):
            global FLAG
            FLAG = True
            _jobs.append(x)
            _state.listeners[:] = [x]

        class Plugin:
            registry = {}

            @classmethod
            def add(cls, name, obj):
                cls.registry[name] = obj

        def read():
            return TABLE["a"]
    """)
    problems = scan_source(bad)
    assert any("global FLAG" in p for p in problems)
    assert any("`_jobs`" in p for p in problems) and any("`_state`" in p for p in problems)
    assert any("Plugin.registry" in p for p in problems)
    assert not any("TABLE" in p for p in problems)  # a table that is only read is a constant


def test_greenstack_has_no_module_level_mutable_state():
    problems = []
    for where, source in _package_sources().items():
        problems += [p for p in scan_source(source, where) if not any(f"`{name}`" in p for name in ALLOWED)]
    assert not problems, "process-wide mutable state:\n" + "\n".join(problems)


def test_the_allowlist_and_context_vars_are_current():
    sources = _package_sources()
    for name in ALLOWED:  # an entry nothing needs any more goes
        assert any(f"\n{name}:" in s or f"\n{name} =" in s for s in sources.values()), f"stale allowlist entry {name}"
    found = set()
    for where, source in sources.items():
        for node in ast.parse(source).body:
            value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
            if value is not None and _call_name(value) == "ContextVar":
                target = node.targets[0] if isinstance(node, ast.Assign) else node.target
                found.add(f"{where}:{getattr(target, 'id', '?')}")
    assert found == CONTEXT_VARS, "a new module-level ContextVar needs a reason in CONTEXT_VARS (or a per-run object)"


# -- behaviour: two jobs of one multirun, in one process, share nothing --------------------------------
class Observe(Policy):
    """Notes what the run's preemption channel holds at INIT; with `request`, leaves a request at FIT_END."""

    events = frozenset({Event.INIT, Event.FIT_END})

    def __init__(self, request: bool = False) -> None:
        super().__init__(name="observe")
        self.request = request

    def __call__(self, event, state, reporter):
        if event is Event.INIT:
            seen = {"requested": state.preemption.requested_signum, "saved": state.preemption.saved,
                    "coordinated": state.preemption.coordinator is not None}
            (Path(state.run_dir) / "observed.json").write_text(json.dumps(seen))
        elif self.request:  # a request nobody honours any more: it must die with this job
            import signal

            state.preemption.request(signal.SIGUSR2)

    def state_dict(self):
        return {}


def _fit(policies: list[Policy], tmp_path: Path) -> State:
    from greenstack.engine.loop import Trainer, TrainerConfig
    from greenstack.engine.optim import Optim

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(3))
    data = torch.utils.data.DataLoader([(x[i], (x[i, 0] > 0).long()) for i in range(16)], batch_size=4,
                                       collate_fn=lambda b: {"inputs": torch.stack([t[0] for t in b]),
                                                             "labels": torch.stack([t[1] for t in b])})
    trainer = Trainer(model, data, Optim(lr=0.05), TrainerConfig(max_duration="3ba", progress=False, device="cpu"),
                      policies=policies, batch_size=4, run_dir=str(tmp_path))
    return trainer.fit()


def test_two_trainings_in_one_process_share_no_preemption_state(tmp_path):
    from greenstack.policies.checkpointing.hierarchical import HierarchicalCheckpointing

    first, second = tmp_path / "first", tmp_path / "second"
    for d in (first, second):
        d.mkdir()
    done = _fit([Observe(request=True), HierarchicalCheckpointing(memory_every=1, local_every=0, signals=[])], first)
    assert done.preemption.requested_signum is not None and not done.preemption.honoured
    # the next run's checkpointing would stop at its first step if it saw the request left behind
    state = _fit([Observe(), HierarchicalCheckpointing(memory_every=1, local_every=0, signals=[])], second)
    assert state.step == 3 and not state.stop
    assert json.loads((second / "observed.json").read_text()) == {"requested": None, "saved": None,
                                                                    "coordinated": False}
    assert state.preemption is not done.preemption


@pytest.mark.slow
def test_two_jobs_of_a_multirun_share_no_preemption_state(tmp_path, monkeypatch, capsys):
    """The same through `greenstack train -m` in one process (Hydra's basic launcher): runner + CLI."""
    from greenstack import cli
    from tests.conftest import FAST

    monkeypatch.chdir(tmp_path)
    # job 0 leaves a request behind; job 1 (checkpointing) would stop at its first step if it saw it
    code = cli.main(["train", "-m", "recipe=quickstart", *FAST, "model.name=resnet10t", "checkpointing=hierarchical",
                     f"+policies.observe._target_={__name__}.Observe", "+policies.observe.request=true,false",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    out = capsys.readouterr().out
    assert code == 0 and "2 jobs, 0 failed" in out, out
    seen = json.loads((tmp_path / "sweep" / "1" / "observed.json").read_text())
    assert seen == {"requested": None, "saved": None, "coordinated": False}, seen
