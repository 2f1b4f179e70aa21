"""Knowledge distillation: the loss, teachers from checkpoints or local models, students by size.

Students are the teacher's own architecture made smaller until their parameter count is at most
`size_ratio` of the teacher's: fewer channels for ResNets, a narrower/shallower ViT, fewer layers
and/or a smaller hidden size for transformers, encoders and decoders (GPT-2, Llama, ...) alike
(initialised from the teacher where shapes allow: copied layers, PCA-projected embeddings). Candidates are counted on the meta device, so choosing a
student costs no memory and no time worth mentioning.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from greenstack.compression.selection import count_parameters
from greenstack.errors import ConfigError, Problem
from greenstack.models.spec import build_from_spec, input_channels, model_spec, num_labels

log = logging.getLogger("greenstack")


# -- loss ----------------------------------------------------------------------------------------
def kd_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target term: T^2 * KL(softmax(teacher/T) || softmax(student/T)), batch mean.

    The T^2 keeps its gradient scale comparable to the hard-label loss whatever the temperature.
    """
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (t * t)


def lm_kd_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
               temperature: float, ignore_index: int = -100) -> torch.Tensor:
    """The soft-target term for language models: T^2 * KL(teacher/T || student/T) of the next-token
    distributions, averaged over the positions that have a target (`labels != ignore_index`: padding
    and document ends teach nothing), so it is on the scale of the per-token cross-entropy."""
    t = temperature
    vocab = student_logits.shape[-1]
    mask = (labels != ignore_index).flatten()
    log_p_student = F.log_softmax(student_logits.reshape(-1, vocab)[mask].float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.reshape(-1, teacher_logits.shape[-1])[mask].float() / t, dim=-1)
    if log_p_student.shape[0] == 0:
        return student_logits.sum() * 0.0
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (t * t)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                      temperature: float = 4.0, alpha: float = 0.5) -> torch.Tensor:
    """`alpha * kd_term + (1 - alpha) * cross_entropy(student, labels)`."""
    hard = F.cross_entropy(student_logits.float(), labels)
    return alpha * kd_term(student_logits, teacher_logits, temperature) + (1 - alpha) * hard


# -- teachers ------------------------------------------------------------------------------------
def _hf_dir(teacher: str) -> Path | None:
    from greenstack.models.builders import MINILM_ALIASES, minilm_path

    if teacher in MINILM_ALIASES:
        return minilm_path()
    path = Path(teacher).expanduser()
    return path if (path / "config.json").is_file() else None


def _trained_head(architecture: str) -> bool:
    return any(k in architecture for k in ("ForSequenceClassification", "ForCausalLM", "LMHeadModel"))


def check_teacher(teacher: str, key: str = "compression.distill.teacher") -> list[Problem]:
    """Problems with a teacher reference found without loading weights (used at validate time)."""
    try:
        hf = _hf_dir(teacher)
    except ConfigError as e:
        return [Problem(key, teacher, p.reason, p.fix) for p in e.problems]
    if hf is not None:
        config = json.loads((hf / "config.json").read_text())
        architectures = config.get("architectures") or []
        if not any(_trained_head(a) for a in architectures):
            return [Problem(key, teacher, f"{hf.name} has no trained classification head ({architectures or 'none'}),"
                            " so its logits would teach noise",
                            "use teacher: null to fine-tune the run's model (e.g. model=minilm) as the teacher until "
                            "`start`, or point at a fine-tuned classifier (a run directory or save_pretrained dir)")]
        return []
    path = Path(teacher).expanduser()
    if path.is_dir():
        if not (path / "model.safetensors").is_file():
            return [Problem(key, teacher, "directory has neither config.json (transformers) nor model.safetensors "
                            "(a greenstack run)")]
        if not (path / ".hydra" / "config.yaml").is_file():
            return [Problem(key, teacher, "run directory has no .hydra/config.yaml describing its model",
                            "point at the model.safetensors file and set teacher_model")]
        return []
    if path.is_file():
        return [] if path.suffix == ".safetensors" else [Problem(key, teacher, "expected a .safetensors file")]
    return [Problem(key, teacher, "no such file or directory",
                    "a greenstack run dir, a model.safetensors, a transformers directory or 'minilm'")]


def _timm_or_hf_spec(model_node: dict[str, Any], num_classes: int, in_chans: int) -> dict[str, Any]:
    if str(model_node.get("_target_", "")).endswith("build_causal_lm"):
        return {"builder": "causal_lm", "vocab": num_classes,
                "node": {k: v for k, v in model_node.items() if not k.startswith("_")}}
    node = {k: v for k, v in model_node.items() if not k.startswith("_")}
    if node.get("name"):
        return {"builder": "timm", "name": node["name"], "num_classes": num_classes, "in_chans": in_chans,
                "kwargs": dict(node.get("kwargs") or {}), "kwargs_known": True}
    if node.get("path"):
        return {"builder": "transformers_path", "path": node["path"], "num_classes": num_classes}
    if node.get("config"):
        cfg = dict(node["config"])
        cfg["num_labels"] = num_classes
        return {"builder": "transformers", "config": cfg}
    raise ConfigError("teacher model description needs `name` (timm), `path` or `config` (transformers)",
                      key="compression.distill.teacher_model", value=node)


def _build(spec: dict[str, Any]) -> nn.Module:
    if spec["builder"] == "transformers_path":
        from greenstack.models import build_transformers

        return build_transformers(spec["num_classes"], path=spec["path"])
    if spec["builder"] == "causal_lm":
        from greenstack.models import build_causal_lm

        return build_causal_lm(spec["vocab"], **spec["node"])
    return build_from_spec(spec)


def _head_mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[int | None, list[str]]:
    """(teacher label count if only the classifier differs, keys whose shapes differ)."""
    own = model.state_dict()
    bad = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if not bad:
        return None, []
    n_classes = num_labels(model)
    heads = [k for k in bad if own[k].ndim >= 1 and own[k].shape[0] == n_classes]
    if len(heads) == len(bad):
        return int(state[heads[0]].shape[0]), bad
    return None, bad


def load_teacher(teacher: str, *, num_classes: int, in_chans: int = 3,
                 teacher_model: dict[str, Any] | None = None, key: str = "compression.distill.teacher") -> nn.Module:
    """A frozen teacher (eval mode, no grad) whose label space must be `num_classes` wide.

    `teacher` is a transformers directory (or 'minilm') holding a fine-tuned classifier, a greenstack
    run directory (`model.safetensors` + `.hydra/config.yaml`), or a `.safetensors` file described by
    `teacher_model` (a model config node such as {name: resnet18}). A different number of classes
    is a ConfigError naming `key`, raised before any training step.
    """
    from safetensors.torch import load_file

    problems = check_teacher(teacher, key)
    if problems:
        raise ConfigError(problems)
    hf = _hf_dir(teacher)
    if hf is not None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        architectures = json.loads((hf / "config.json").read_text()).get("architectures") or []
        causal = not any("ForSequenceClassification" in a for a in architectures)
        auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
        model = auto.from_pretrained(str(hf), local_files_only=True)
        teacher_labels = int(num_labels(model) or 0)
        if teacher_labels != num_classes:
            raise ConfigError(Problem(key, teacher, f"label spaces differ: the teacher predicts {teacher_labels} "
                                      f"classes, this run's data has {num_classes}",
                                      "distil from a teacher trained on the same labels"))
        return _freeze(model)
    path = Path(teacher).expanduser()
    if path.is_dir():
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(OmegaConf.load(path / ".hydra" / "config.yaml"), resolve=False)
        node = cfg.get("model") if isinstance(cfg, dict) else None  # type: ignore[union-attr]
        if not isinstance(node, dict):
            raise ConfigError("the teacher run's config has no model node", key=key, value=teacher)
        weights = path / "model.safetensors"
    else:
        if not teacher_model:
            raise ConfigError("a bare .safetensors teacher needs `teacher_model` describing its architecture",
                              key="compression.distill.teacher_model", value=None,
                              fix="e.g. teacher_model: {name: resnet18}")
        node, weights = dict(teacher_model), path
    spec = _timm_or_hf_spec(node, num_classes, in_chans)
    model = _build(spec)
    state = load_file(str(weights))
    teacher_labels, bad = _head_mismatch(model, state)
    if teacher_labels is not None:
        raise ConfigError(Problem(key, teacher, f"label spaces differ: the teacher predicts {teacher_labels} "
                                  f"classes, this run's data has {num_classes}",
                                  "distil from a teacher trained on the same labels"))
    if bad:
        raise ConfigError(Problem(key, teacher, f"checkpoint does not fit the described architecture "
                                  f"(shapes differ for {', '.join(bad[:3])})", "check teacher_model"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _tied_to(model, state)]  # saved once (save_model drops ties)
    if missing or unexpected:
        raise ConfigError(Problem(key, teacher, f"checkpoint does not fit the described architecture (missing "
                                  f"{list(missing)[:3]}, unexpected {list(unexpected)[:3]})", "check teacher_model"))
    return _freeze(model)


def _tied_to(model: nn.Module, present: dict[str, torch.Tensor]) -> set[str]:
    """Names of `model`'s tensors that share storage with a tensor named in `present` (a tied LM head)."""
    owners: dict[int, list[str]] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if isinstance(value, torch.Tensor) and value.numel():
            owners.setdefault(value.untyped_storage().data_ptr(), []).append(name)
    tied: set[str] = set()
    for names in owners.values():
        if len(names) > 1 and any(n in present for n in names):
            tied.update(n for n in names if n not in present)
    return tied


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def frozen_copy(model: nn.Module) -> nn.Module:
    """The run's own model, copied and frozen, to serve as teacher."""
    return _freeze(copy.deepcopy(model))


# -- students ------------------------------------------------------------------------------------
def _round(value: float, multiple: int = 8) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def _resnet_candidates(teacher: nn.Module, spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    blocks = [getattr(teacher, f"layer{i}")[0] for i in range(1, 5)]
    channels = []
    for block in blocks:
        last = block.conv3 if hasattr(block, "conv3") else block.conv2
        channels.append(last.out_channels // getattr(type(block), "expansion", 1))
    deep_stem = isinstance(teacher.conv1, nn.Sequential)
    stem = teacher.bn1.num_features // 2 if deep_stem else None
    for step in range(20, 1, -1):
        w = step / 20
        kwargs = {**dict(spec.get("kwargs") or {}), "channels": tuple(_round(c * w) for c in channels)}
        if stem:
            kwargs["stem_width"] = _round(stem * w)
        yield {**spec, "kwargs": kwargs}


def _vit_candidates(teacher: nn.Module, spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    dim, depth = int(teacher.embed_dim), len(teacher.blocks)
    heads = int(teacher.blocks[0].attn.num_heads)
    head_dim = max(1, dim // heads)
    for depth_frac in (1.0, 0.75, 0.5, 0.25):
        for new_heads in range(heads, 0, -1):
            new_depth = max(1, int(round(depth * depth_frac)))
            yield {**spec, "kwargs": {**dict(spec.get("kwargs") or {}), "embed_dim": new_heads * head_dim,
                                      "num_heads": new_heads, "depth": new_depth}}


def _transformer_config(cfg: dict[str, Any], hidden: int, layers: int) -> dict[str, Any]:
    """`cfg` with `hidden` width (heads: the most of the original count that divide it) and `layers`.

    Keys are the config's own (GPT-2's n_embd/n_head/n_layer/n_inner through transformers'
    `attribute_map`); grouped-query key/value heads and an explicit head_dim follow the new heads."""
    from transformers import CONFIG_MAPPING

    amap = dict(getattr(CONFIG_MAPPING[cfg["model_type"]], "attribute_map", {}) or {})

    def key(name: str) -> str:
        return amap.get(name, name)

    old_hidden = int(cfg[key("hidden_size")])
    heads = int(cfg[key("num_attention_heads")])
    new_heads = max(d for d in range(1, heads + 1) if hidden % d == 0)
    out = {**cfg, key("hidden_size"): hidden, key("num_attention_heads"): new_heads, key("num_hidden_layers"): layers}
    for ffn in ("intermediate_size", "n_inner"):  # n_inner: GPT-2's (None = 4 x hidden, follows by itself)
        if cfg.get(ffn) is not None or (ffn == "intermediate_size" and "n_inner" not in cfg):
            ratio = int(cfg.get(ffn) or 4 * old_hidden) / old_hidden
            out[ffn] = max(8, int(round(hidden * ratio)))
            break
    if cfg.get("num_key_value_heads") is not None:
        kv = int(cfg["num_key_value_heads"])
        out["num_key_value_heads"] = max(d for d in range(1, new_heads + 1) if new_heads % d == 0 and d <= kv)
    if cfg.get("head_dim") is not None:
        out["head_dim"] = hidden // new_heads
    return out


def _plan_transformer(spec: dict[str, Any], budget: float) -> tuple[dict[str, Any], int] | None:
    """The (layers, hidden) student within `budget` parameters with the largest encoder: for each depth
    a binary search over widths in steps of 8 (parameters grow monotonically with width).

    Ranking by encoder rather than total parameters matters because embeddings dominate small
    transformers: by total size a 1-layer wide student would win, and it distils worse than a deep,
    narrower one with the same footprint.
    """
    from transformers import CONFIG_MAPPING

    cfg = dict(spec["config"])
    amap = dict(getattr(CONFIG_MAPPING[cfg["model_type"]], "attribute_map", {}) or {})
    widths = list(range(8, int(cfg[amap.get("hidden_size", "hidden_size")]) + 1, 8))
    best: tuple[dict[str, Any], int, int] | None = None
    for layers in range(int(cfg[amap.get("num_hidden_layers", "num_hidden_layers")]), 0, -1):
        lo, hi, found = 0, len(widths) - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            candidate = {**spec, "config": _transformer_config(cfg, widths[mid], layers)}
            try:
                model = build_from_spec(candidate, device="meta")
            except Exception:  # noqa: BLE001 - a width the architecture refuses (e.g. odd rotary dims)
                hi = mid - 1
                continue
            n = count_parameters(model)
            if n <= budget:
                embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
                found, lo = (candidate, n, n - embeddings), mid + 1
            else:
                hi = mid - 1
        if found and (best is None or found[2] > best[2]):
            best = found
    return (best[0], best[1]) if best else None


def _candidates(teacher: nn.Module, spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if spec["builder"] == "timm":
        if all(hasattr(teacher, f"layer{i}") for i in range(1, 5)) and hasattr(teacher, "bn1"):
            yield from _resnet_candidates(teacher, spec)
            return
        if hasattr(teacher, "blocks") and hasattr(teacher, "embed_dim"):
            yield from _vit_candidates(teacher, spec)
            return
        import timm

        family = "".join(ch for ch in spec["name"].split("_")[0] if not ch.isdigit())
        for name in timm.list_models(f"{family}*"):
            yield {**spec, "name": name, "kwargs": dict(spec.get("kwargs") or {})}


def plan_student(teacher: nn.Module, size_ratio: float) -> tuple[dict[str, Any], int, int]:
    """The largest student spec with at most `size_ratio` of the teacher's parameters:
    (spec, student parameters, teacher parameters). ConfigError when no candidate is small enough."""
    spec = model_spec(teacher)
    teacher_params = count_parameters(teacher)
    budget = size_ratio * teacher_params
    best: tuple[dict[str, Any], int] | None = None
    if spec["builder"] == "transformers":
        best = _plan_transformer(spec, budget)
    for candidate in _candidates(teacher, spec):
        try:
            n = count_parameters(build_from_spec(candidate, device="meta"))
        except Exception:  # noqa: BLE001 - an architecture that refuses these sizes is just skipped
            continue
        if n <= budget and (best is None or n > best[1]):
            best = (candidate, n)
    if best is None:
        raise ConfigError(Problem("compression.distill.size_ratio", size_ratio,
                                  f"no smaller variant of {spec.get('name') or spec['builder']} found with at most "
                                  f"{size_ratio:.0%} of the teacher's {teacher_params:,} parameters",
                                  "raise size_ratio or give an explicit `student`"))
    return best[0], best[1], teacher_params


def build_student(teacher: nn.Module, size_ratio: float, *, student: dict[str, Any] | None = None,
                  init_from_teacher: bool = True) -> nn.Module:
    """A student for `teacher`: `student` (a model node, e.g. {name: resnet10t}) when given, else the
    largest shrunken copy of the teacher's architecture within `size_ratio` of its parameters."""
    if student:
        spec = _timm_or_hf_spec(student, num_labels(teacher) or 2, input_channels(teacher))
        return _build(spec)
    spec, _, _ = plan_student(teacher, size_ratio)
    model = build_from_spec(spec)
    if init_from_teacher and spec["builder"] == "transformers":
        if spec.get("head") == "causal_lm":
            _init_decoder_student(model, teacher)
        else:
            _init_transformer_student(model, teacher)
    return model


@torch.no_grad()
def _init_transformer_student(student: nn.Module, teacher: nn.Module) -> None:
    """DistilBERT-style start: with equal hidden sizes copy embeddings and evenly spaced layers; with a
    smaller hidden size project the teacher's embeddings onto their top principal directions."""
    s_cfg, t_cfg = student.config, teacher.config  # type: ignore[attr-defined]
    s_base = getattr(student, student.base_model_prefix)  # type: ignore[attr-defined]
    t_base = getattr(teacher, teacher.base_model_prefix)  # type: ignore[attr-defined]
    if s_cfg.hidden_size == t_cfg.hidden_size:
        s_base.embeddings.load_state_dict(t_base.embeddings.state_dict())
        t_layers, s_layers = t_base.encoder.layer, s_base.encoder.layer
        picks = torch.linspace(0, len(t_layers) - 1, len(s_layers)).round().long().tolist()
        for s_layer, t_index in zip(s_layers, picks, strict=True):
            s_layer.load_state_dict(t_layers[t_index].state_dict())
        return
    t_word = t_base.embeddings.word_embeddings.weight.float()
    mean = t_word.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(t_word - mean, full_matrices=False)
    projection = v[: s_cfg.hidden_size].T  # (teacher hidden, student hidden)
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        t_emb = getattr(t_base.embeddings, name, None)
        s_emb = getattr(s_base.embeddings, name, None)
        if t_emb is not None and s_emb is not None and t_emb.weight.shape[0] == s_emb.weight.shape[0]:
            s_emb.weight.copy_((t_emb.weight.float() - (mean if name == "word_embeddings" else 0)) @ projection)


def _layer_stack(model: nn.Module) -> str | None:
    """Qualified name of the decoder's list of layers (GPT-2 `transformer.h`, Llama `model.layers`)."""
    n_layers = int(model.config.num_hidden_layers)  # type: ignore[union-attr]
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and name:
            return name
    return None


@torch.no_grad()
def _init_decoder_student(student: nn.Module, teacher: nn.Module) -> None:
    """A decoder student's start: with equal hidden sizes every weight is copied from the teacher,
    its layers from evenly spaced teacher layers (first and last kept); with a smaller hidden size
    the token and position embeddings are projected onto the teacher's top principal directions."""
    s_hidden = int(student.config.hidden_size)  # type: ignore[union-attr]
    if s_hidden == int(teacher.config.hidden_size):  # type: ignore[union-attr]
        s_stack, t_stack = _layer_stack(student), _layer_stack(teacher)
        if s_stack is None or t_stack is None or s_stack != t_stack:
            return
        n_student = len(student.get_submodule(s_stack))
        n_teacher = len(teacher.get_submodule(t_stack))
        picks = torch.linspace(0, n_teacher - 1, n_student).round().long().tolist()
        t_state = teacher.state_dict()
        new_state = {}
        for key, value in student.state_dict().items():
            source = key
            if key.startswith(f"{s_stack}."):
                index, rest = key[len(s_stack) + 1:].split(".", 1)
                source = f"{t_stack}.{picks[int(index)]}.{rest}"
            if source in t_state and t_state[source].shape == value.shape:
                new_state[key] = t_state[source]
        student.load_state_dict(new_state, strict=False)
        return
    t_word = teacher.get_input_embeddings().weight.float()  # type: ignore[operator]
    mean = t_word.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(t_word - mean, full_matrices=False)
    projection = v[:s_hidden].T  # (teacher hidden, student hidden)
    s_modules = dict(student.named_modules())
    for name, t_emb in teacher.named_modules():
        s_emb = s_modules.get(name)
        if isinstance(t_emb, nn.Embedding) and isinstance(s_emb, nn.Embedding) \
                and s_emb.weight.shape == (t_emb.weight.shape[0], s_hidden):
            is_tokens = t_emb is teacher.get_input_embeddings()  # type: ignore[operator]
            s_emb.weight.copy_((t_emb.weight.float() - (mean if is_tokens else 0)) @ projection)


def param_fraction(student: nn.Module, teacher: nn.Module) -> float:
    """Student parameters / teacher parameters."""
    return count_parameters(student) / max(1, count_parameters(teacher))
