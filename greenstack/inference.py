"""What a trained run needs to be used: its class names, its preprocessing and (text) its tokenizer.

Why: the label index -> class name mapping is built from the data at run time (sorted distinct
labels); without it saved, a prediction is a bare index nobody can read. Every run writes
`labels.json` (class names in index order, and the preprocessing new inputs need); a transformers
model also gets `model/`, a directory `from_pretrained` loads (config with `id2label`, weights,
tokenizer), so `pipeline("text-classification", model="RUN_DIR/model")` returns class names.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from greenstack.errors import ConfigError
from greenstack.io import atomic_write_json

log = logging.getLogger("greenstack")
LABELS_FILE = "labels.json"
MODEL_DIR = "model"


def save_inference_files(model: torch.nn.Module, data: Any, run_dir: Path) -> list[str]:
    """Write labels.json and (transformers models) model/ into `run_dir`; returns what was written.

    Both are published atomically: a crash leaves the previous version or none, never half of one.
    """
    names = [str(c) for c in getattr(data, "class_names", []) or []]
    if not names:
        return []
    kind = getattr(data, "kind", "")
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    written = []
    model_dir = None
    if kind == "text" and _is_transformers(model):
        _save_transformers(model, getattr(data, "tokenizer", None), names, run_dir / MODEL_DIR)
        model_dir = MODEL_DIR
        written.append(MODEL_DIR + "/")
    atomic_write_json(run_dir / LABELS_FILE, {
        "schema": "greenstack.labels/1",
        "kind": kind,
        "labels": names,
        "preprocessing": dict(getattr(data, "preprocessing", {}) or {}),
        "weights": "model.safetensors",
        "model_dir": model_dir,
        "source": getattr(data, "source", ""),
    })
    written.append(LABELS_FILE)
    return written


def _is_transformers(model: torch.nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def _save_transformers(model: Any, tokenizer: Any, names: list[str], target: Path) -> None:
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: i for i, name in enumerate(names)}
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        old = target.with_name(f".{target.name}.old")
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_labels(run_dir: str | Path) -> dict[str, Any]:
    """labels.json of a run (class names in index order, preprocessing); a clear error without it."""
    path = Path(run_dir) / LABELS_FILE
    if not path.is_file():
        raise ConfigError("no labels.json: not a finished greenstack run (or one from before labels were saved)",
                          key="RUN_DIR", value=str(run_dir), fix="give the directory of a run that completed")
    return json.loads(path.read_text(encoding="utf-8"))


def predict_text(run_dir: str | Path, texts: list[str]) -> list[dict[str, Any]]:
    """Class name and probability for each text, from the run's saved model/ and tokenizer."""
    labels = load_labels(run_dir)
    model_dir = Path(run_dir) / (labels.get("model_dir") or MODEL_DIR)
    if labels.get("kind") != "text" or not (model_dir / "config.json").is_file():
        raise ConfigError(f"{run_dir} is a {labels.get('kind') or 'non-text'} run without a transformers model/ "
                          "directory", key="RUN_DIR", value=str(run_dir),
                          fix="predict works on text runs; for image runs load model.safetensors with labels.json "
                              "as in the README")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), local_files_only=True).eval()
    max_length = int(labels.get("preprocessing", {}).get("max_length") or 512)
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = model(**enc).logits.softmax(dim=-1)
    best = probs.argmax(dim=-1)
    return [{"text": t, "label": model.config.id2label[int(i)], "score": float(probs[n, i])}
            for n, (t, i) in enumerate(zip(texts, best, strict=True))]
