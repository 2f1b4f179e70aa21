"""Check a composed config before anything runs, and report every problem at once.

Each node with a `_target_` is checked against its callable's signature (unknown keys, missing
required arguments, value types), cheap config objects (policies, optimizer, trainer, trackers) are
constructed so their own validation runs, and domain checks (timm model names, data paths, carbon
zones) are looked up in `DOMAIN_CHECKS`. Nothing heavy (models, datasets) is built here.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import types
import typing
from collections.abc import Callable, Collection
from typing import Any, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from greenstack.engine.groups import policy_groups
from greenstack.engine.policy import Policy
from greenstack.errors import ConfigError, Problem, declared_problems

V = TypeVar("V")
HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
#: arguments the runner passes itself, per top-level group
RUNNER_SUPPLIED: dict[str, set[str]] = {"model": {"num_classes", "in_chans"}, "data": {"seed"}}
#: groups whose `_target_` objects are cheap to construct, so construction-time checks run in validate;
#: so are policies and every node of a policy group (found in the config, engine/groups.py)
CONSTRUCT_GROUPS = {"task", "carbon", "energy", "optim", "trainer", "tracker"}


def _domain_checks() -> dict[str, Callable[[dict[str, Any], str], list[Problem]]]:
    # model/data builders (timm, transformers, torchvision) are imported only when a node needs them:
    # validating the carbon/energy/scheduler groups alone (greenstack.track) must not pay seconds of imports
    class _Lazy:
        def __init__(self, module: str) -> None:
            self.module = module

        def __getattr__(self, name: str) -> Any:
            return getattr(importlib.import_module(self.module), name)

    data: Any = _Lazy("greenstack.data.builders")
    models: Any = _Lazy("greenstack.models.builders")
    hf: Any = _Lazy("greenstack.data.hf")
    lm: Any = _Lazy("greenstack.data.lm")
    streaming: Any = _Lazy("greenstack.data.streaming")

    def timm(node: dict[str, Any], path: str) -> list[Problem]:
        return models.check_timm_name(node.get("name"), key=f"{path}.name")

    def folder(node: dict[str, Any], path: str) -> list[Problem]:
        return data.check_data_options(node, path) + data.check_image_folder(node.get("root"), key=f"{path}.root")

    def text(node: dict[str, Any], path: str) -> list[Problem]:
        problems = data.check_data_options(node, path) + data.check_text_csv(node.get("path"), node.get("text_column", "text"),
                                       node.get("label_column", "label"), key=f"{path}.path")
        return problems + _local_dir(node.get("tokenizer", "minilm"), f"{path}.tokenizer")

    def transformers(node: dict[str, Any], path: str) -> list[Problem]:
        return _local_dir(node["path"], f"{path}.path") if node.get("path") else []

    return {
        "greenstack.models.build_timm": timm,
        "greenstack.models.build_transformers": transformers,
        "greenstack.models.build_causal_lm": transformers,
        "greenstack.data.image_folder": folder,
        "greenstack.data.text_csv": text,
        "greenstack.data.synthetic_text": lambda n, p: (data.check_data_options(n, p)
                                                        + _local_dir(n.get("tokenizer", "minilm"), f"{p}.tokenizer")),
        "greenstack.data.synthetic_image": lambda n, p: data.check_data_options(n, p),
        "greenstack.data.digits": lambda n, p: data.check_data_options(n, p),
        "greenstack.data.hf_local": lambda n, p: hf.check_hf_local(n, p),
        "greenstack.data.python_stdlib": lambda n, p: lm.check_tokenizer_spec(n.get("tokenizer", "byte"), f"{p}.tokenizer"),
        "greenstack.data.stream": lambda n, p: streaming.check_stream(n, p),
    }


#: (modality, label kind) each data builder yields; hf_local/stream depend on their label column
DATA_KINDS: dict[str, tuple[str, str]] = {
    "greenstack.data.digits": ("image", "class"), "greenstack.data.synthetic_image": ("image", "class"),
    "greenstack.data.image_folder": ("image", "class"), "greenstack.data.text_csv": ("text", "class"),
    "greenstack.data.synthetic_text": ("text", "class"), "greenstack.data.python_stdlib": ("text", "next_token"),
}
LABELLED_TEXT = ("greenstack.data.hf_local", "greenstack.data.stream")
#: (modality, label kinds) each model builder can learn
MODEL_KINDS: dict[str, tuple[str, frozenset[str]]] = {
    "greenstack.models.build_timm": ("image", frozenset({"class", "value"})),
    "greenstack.models.build_transformers": ("text", frozenset({"class", "value"})),
    "greenstack.models.build_causal_lm": ("text", frozenset({"next_token"})),
}
DISTILLATION = {"greenstack.policies.compression.distill.Distillation": True}
PRUNING = {"greenstack.policies.compression.prune.MagnitudePruning": True}
_LABELS = {"class": "class labels", "value": "real-valued labels", "next_token": "next-token (language-model) text"}


def _canonical(path: str) -> str:
    """Where the object a `_target_` names is defined (`greenstack.data.builders.digits` for
    `greenstack.data.digits`), or `path` itself when it does not import."""
    module_name, _, attr = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), attr) if module_name else None
    except (ImportError, AttributeError):
        return path
    return f"{getattr(found, '__module__', module_name)}.{getattr(found, '__qualname__', attr)}"


def lookup(table: dict[str, V], target: Any) -> V | None:
    """`table`'s entry for a `_target_`, however it is spelled: the tables use the public names
    (`greenstack.data.digits`); a node may name the defining module (`greenstack.data.builders.digits`).
    Only keys with the same final name are imported, so validating a carbon node imports no model code."""
    path = str(target or "")
    if path in table:
        return table[path]
    attr = path.rpartition(".")[2]
    same = [key for key in table if key.rpartition(".")[2] == attr]
    if not same:
        return None
    canonical = _canonical(path)
    return next((table[key] for key in same if _canonical(key) == canonical), None)


def _data_kind(node: dict[str, Any]) -> tuple[str, str] | None:
    target = node.get("_target_")
    if lookup(dict.fromkeys(LABELLED_TEXT, True), target):
        if node.get("label_column") is None:
            return "text", "next_token"
        return "text", "value" if node.get("label_kind") == "value" else "class"
    return lookup(DATA_KINDS, target)


def check_task_fit(body: dict[str, Any]) -> list[Problem]:
    """Task, model and data that cannot train together (e.g. task=causal_lm on images), all reported."""
    task_node, data_node, model_node = (body.get(k) if isinstance(body.get(k), dict) else {}
                                        for k in ("task", "data", "model"))
    try:
        task_cls = import_target(str(task_node["_target_"])) if task_node.get("_target_") else None
    except ConfigError:
        return []  # reported by the signature checks
    wanted = getattr(task_cls, "target", "class") if task_cls is not None else "class"
    task_name = getattr(task_cls, "name", "classification")
    data = _data_kind(data_node)
    model = lookup(MODEL_KINDS, model_node.get("_target_"))
    problems = []
    if data is not None and data[1] != wanted:
        problems.append(Problem("data._target_", data_node.get("_target_"),
                                f"task={task_name} learns from {_LABELS[wanted]}, but this data gives {_LABELS[data[1]]}",
                                {"next_token": "use data=python_stdlib, data=hf_local or data=stream without a "
                                               "label_column", "class": "use a labelled data set (e.g. data=digits, "
                                                                        "text_csv, or hf_local with data.label_column)",
                                 "value": "use data=hf_local with data.label_column and data.label_kind=value"}[wanted]))
    if model is not None and wanted not in model[1]:
        problems.append(Problem("model._target_", model_node.get("_target_"),
                                f"task={task_name} needs a model for {_LABELS[wanted]}; this builder makes one for "
                                f"{' or '.join(_LABELS[k] for k in sorted(model[1]))}",
                                "use model=gpt2_tiny (or build_causal_lm) for causal_lm; model=timm, bert_tiny or "
                                "minilm otherwise"))
    compression = body.get("compression") if isinstance(body.get("compression"), dict) else {}
    for name, spec in compression.items():
        model_type = (model_node.get("config") or {}).get("model_type") if isinstance(model_node.get("config"), dict) \
            else None
        if isinstance(spec, dict) and lookup(PRUNING, spec.get("_target_")) \
                and spec.get("structure") == "channels" and model_type == "gpt2":
            problems.append(Problem(f"compression.{name}.structure", "channels",
                                    "channel pruning ranks output channels along dim 0, but GPT-2's transformers "
                                    "Conv1D stores its weight (in, out), so it would remove input channels",
                                    "use structure: unstructured, or a Llama-style decoder (model=llama_tiny)"))
        if wanted == "value" and isinstance(spec, dict) and lookup(DISTILLATION, spec.get("_target_")):
            problems.append(Problem(f"compression.{name}", spec.get("_target_"),
                                    f"distillation matches the teacher's predicted distributions (classes for "
                                    f"classification, next tokens for causal_lm); task={task_name} predicts a single "
                                    f"value per sample, which has no distribution to soften",
                                    "use compression=none, prune or qat with this task"))
    if model is not None and data is not None and model[0] != data[0]:
        problems.append(Problem("model._target_", model_node.get("_target_"),
                                f"a {model[0]} model cannot read {data[0]} data ({data_node.get('_target_')})",
                                f"pick a {data[0]} model" + (" (model=timm)" if data[0] == "image" else
                                                             " (model=bert_tiny, minilm or gpt2_tiny)")))
    return problems


def _local_dir(name: Any, key: str) -> list[Problem]:
    from greenstack.models.builders import resolve_local_model_dir

    try:
        resolve_local_model_dir(str(name), key=key)
    except ConfigError as e:
        return e.problems
    return []


def import_target(path: str) -> Any:
    """Import `pkg.module.attr`; raise ConfigError with close names when it does not exist."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ConfigError("a _target_ must be a dotted path like pkg.module.name", value=path)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"cannot import module {module_name!r}: {e}", value=path) from e
    if not hasattr(module, attr):
        close = difflib.get_close_matches(attr, [n for n in dir(module) if not n.startswith("_")], n=3)
        hint = f"did you mean {', '.join(f'{module_name}.{c}' for c in close)}?" if close else ""
        raise ConfigError(f"{module_name} has no attribute {attr!r}", value=path, fix=hint)
    return getattr(module, attr)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def matches_type(value: Any, tp: Any) -> bool:
    """Whether a plain config value fits an annotation (int accepted for float; unknown types pass)."""
    if tp is Any or tp is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(matches_type(value, a) for a in args)
    if tp is type(None):
        return value is None
    if origin is typing.Literal:
        return value in args
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        inner = [a for a in args if a is not Ellipsis]
        return not inner or all(matches_type(v, inner[0]) for v in value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            return False
        return len(args) != 2 or all(matches_type(v, args[1]) for v in value.values())
    return True


def _signature(target: Any) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    fn = inspect.unwrap(target.__init__ if inspect.isclass(target) else target)  # under `errors.checked`
    sig = inspect.signature(target)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unresolvable annotations only disable type checks
        hints = {}
    params = {n: p for n, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    var_kw = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    return params, hints, var_kw


def _check_node(node: dict[str, Any], path: str, problems: list[Problem], checks: dict[str, Callable],
                construct: Collection[str] = CONSTRUCT_GROUPS) -> None:
    target_path = node["_target_"]
    if target_path is None:
        return
    try:
        target = import_target(str(target_path))
    except ConfigError as e:
        problems.extend(Problem(f"{path}._target_", target_path, p.reason, p.fix) for p in e.problems)
        return
    params, hints, var_kw = _signature(target)
    group = path.split(".")[0]
    supplied = RUNNER_SUPPLIED.get(group, set()) if path == group else set()
    given = {k for k in node if k not in HYDRA_KEYS}
    before = len(problems)
    for key in sorted(given - params.keys()):
        if var_kw:
            continue
        close = difflib.get_close_matches(key, list(params), n=3)
        problems.append(Problem(f"{path}.{key}", node[key], f"not an argument of {target_path}",
                                f"did you mean {', '.join(close)}?" if close else
                                f"valid keys: {', '.join(sorted(params))}"))
    typed: dict[str, Any] = {}
    for name, param in params.items():
        if name in given:
            value = node[name]
            if isinstance(value, dict) and "_target_" in value:
                continue
            tp = hints.get(name, param.annotation)
            if not matches_type(value, tp):
                problems.append(Problem(f"{path}.{name}", value, f"expected {_type_name(tp)}",
                                        f"got {type(value).__name__}"))
            else:
                typed[name] = value
        elif param.default is inspect.Parameter.empty and name not in supplied and not node.get("_partial_"):
            problems.append(Problem(f"{path}.{name}", "<missing>", f"{target_path} requires it",
                                    f"add {path}.{name}=..."))
    structural = len(problems) > before  # unknown, missing or mistyped arguments: nothing to construct
    try:  # the constraints declared on the parameters (errors.checked), every one, even beside a type error
        problems += declared_problems(target.__init__ if inspect.isclass(target) else target, typed, path)
    except Exception:  # noqa: BLE001 - unresolvable annotations: construction still checks
        pass
    check = lookup(checks, target_path)
    if check:
        problems.extend(check(node, path))
    if len(problems) == before and node.get("_partial_") and inspect.isclass(target) \
            and _is_torch_optimizer(target):
        _try_optimizer(target, node, path, problems)
    # constructed beside broken declared constraints too: the constructor's own (cross-field) checks join them
    if not structural and inspect.isclass(target) and not node.get("_partial_") \
            and (group in construct or issubclass(target, Policy)):
        _try_construct(target, node, path, problems)


def _try_construct(target: Any, node: dict[str, Any], path: str, problems: list[Problem]) -> None:
    nested = {k for k, v in node.items() if isinstance(v, dict) and "_target_" in v}
    kwargs = {k: v for k, v in node.items() if k not in HYDRA_KEYS and k not in nested}
    params = inspect.signature(target).parameters
    if any(k in params and params[k].default is inspect.Parameter.empty for k in nested):
        return  # needs a built component (optim.optimizer): its declared constraints were checked
    listed = {p.key for p in problems}
    try:
        target(**kwargs)
    except ConfigError as e:
        for p in e.problems:
            leaf = p.key.split(".")[-1]
            key = f"{path}.{leaf}" if leaf in node else p.key
            if key not in listed:  # a declared constraint already reported above
                problems.append(Problem(key, p.value, p.reason, p.fix))
    except (TypeError, ValueError) as e:
        problems.append(Problem(path, "", f"{target.__name__}: {e}"))


def _is_torch_optimizer(target: type) -> bool:
    import torch

    return issubclass(target, torch.optim.Optimizer)


def _try_optimizer(target: Any, node: dict[str, Any], path: str, problems: list[Problem]) -> None:
    """An optimizer component (`_partial_: true`) built on one dummy parameter, so torch's own argument
    checks (betas, momentum, eps) run before training; the problem goes to the key its message names."""
    import torch

    kwargs = {k: v for k, v in node.items() if k not in HYDRA_KEYS}
    try:
        target([torch.nn.Parameter(torch.zeros(1))], **kwargs)
    except Exception as e:  # noqa: BLE001 - whatever torch raises on bad arguments, said with the key
        text = str(e) if isinstance(e, (TypeError, ValueError)) else f"rejects these arguments ({e})"
        named = [k for k in kwargs if k.rstrip("s").lower() in text.lower()]
        key = f"{path}.{named[0]}" if named else path
        problems.append(Problem(key, kwargs.get(named[0], "") if named else "", f"{target.__name__}: {text}",
                                "see the torch.optim documentation of this optimizer"))


def _walk(node: Any, path: str, problems: list[Problem], checks: dict[str, Callable],
          construct: Collection[str] = CONSTRUCT_GROUPS) -> None:
    if isinstance(node, dict):
        if "_target_" in node:
            _check_node(node, path, problems, checks, construct)
        for key, value in node.items():
            if key not in HYDRA_KEYS:
                _walk(value, f"{path}.{key}" if path else str(key), problems, checks, construct)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _walk(value, f"{path}[{i}]", problems, checks, construct)


def _missing_and_interpolation(cfg: Any, path: str, problems: list[Problem]) -> None:
    keys = cfg.keys() if isinstance(cfg, DictConfig) else range(len(cfg))
    for key in keys:
        sub = f"{path}.{key}" if path else str(key)
        if isinstance(cfg, DictConfig) and OmegaConf.is_missing(cfg, key):
            problems.append(Problem(sub, "???", "required value is missing", f"set it: {sub}=..."))
            continue
        try:
            value = cfg[key]
        except OmegaConfBaseException as e:
            problems.append(Problem(sub, "", f"cannot resolve: {str(e).splitlines()[0]}"))
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            _missing_and_interpolation(value, sub, problems)


def validate_config(cfg: DictConfig) -> list[Problem]:
    """Every problem in a composed greenstack config (empty list when valid)."""
    problems: list[Problem] = []
    body = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    _missing_and_interpolation(body, "", problems)
    if problems:
        bad = {p.key for p in problems}
        container = OmegaConf.to_container(body, resolve=False)
        _walk(_drop(container, bad), "", problems, _domain_checks())
        return problems
    container = OmegaConf.to_container(body, resolve=True)
    non_finite = non_finite_numbers(container)
    walked: list[Problem] = []
    _walk(container, "", walked, _domain_checks(), CONSTRUCT_GROUPS | set(policy_groups(container)))  # type: ignore[arg-type]
    said = {p.key for p in non_finite}  # "must be finite" says it all; no second row for the same key
    problems += non_finite + [p for p in walked if p.key not in said]
    problems += _device_available(cfg)
    problems += check_task_fit(container)  # type: ignore[arg-type]
    problems += importlib.import_module("greenstack.federated.config").check_federated(body)
    problems += importlib.import_module("greenstack.engine.replay").check_decisions_from(body)
    if not isinstance(cfg.get("seed", 0), int):
        problems.append(Problem("seed", cfg.get("seed"), "expected int"))
    return problems


def non_finite_numbers(node: Any, path: str = "") -> list[Problem]:
    """Every nan/inf in a config: no greenstack setting takes one, and one silently ruins a run
    (`optim.lr=inf` trains a NaN model; a NaN price makes every cost NaN)."""
    if isinstance(node, float) and not math.isfinite(node):
        return [Problem(path or "<config>", node, "must be a finite number", "give a real number (not nan/inf)")]
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in non_finite_numbers(v, f"{path}.{k}" if path else str(k))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in non_finite_numbers(v, f"{path}[{i}]")]
    return []


def _device_available(cfg: DictConfig) -> list[Problem]:
    """`trainer.device=cuda` where this machine has no CUDA: caught here, before a run dir exists. Jobs
    submitted elsewhere (launcher=slurm) are checked on the node they run on, not here."""
    device = str(OmegaConf.select(cfg, "trainer.device", default="auto") or "auto")
    launcher = str(OmegaConf.select(cfg, "hydra.launcher._target_", default="") or "")
    if not launcher:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            launcher = str(OmegaConf.select(HydraConfig.get(), "launcher._target_", default="") or "")
    if not device.startswith("cuda") or "slurm" in launcher.lower() or "submitit" in launcher.lower():
        return []
    import torch

    if not torch.cuda.is_available():
        return [Problem("trainer.device", device, "CUDA was requested but no CUDA device is available",
                        "use trainer.device=auto or cpu")]
    index = device.partition(":")[2]
    if index.isdigit() and int(index) >= torch.cuda.device_count():
        return [Problem("trainer.device", device, f"this machine has {torch.cuda.device_count()} CUDA device(s)",
                        f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")]
    return []


def _drop(container: Any, bad: set[str], path: str = "") -> Any:
    """The container without the keys already reported (so later checks don't trip on them)."""
    if isinstance(container, dict):
        return {k: _drop(v, bad, f"{path}.{k}" if path else k) for k, v in container.items()
                if (f"{path}.{k}" if path else k) not in bad and not (isinstance(v, str) and "${" in v)}
    return container
