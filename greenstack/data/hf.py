"""Hugging Face `datasets` from local files (parquet, jsonl/json, csv, arrow) or a `save_to_disk` directory.

Without a `label_column` the texts are a language-modelling corpus (packed into blocks, for
task=causal_lm); with one, each row is a labelled sample (`label_kind=class` for classification,
`value` for regression). Tokenisation is cached once per (files, tokenizer, max_length/block_size):
the key is built from the files' paths, sizes and modification times, so a rerun reads no text.
"""

from __future__ import annotations

import glob
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch

from greenstack.errors import ConfigError, Problem

FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".arrow": "arrow"}


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def resolve_files(path: str | list[str], key: str = "data.path") -> tuple[list[Path], str | None, list[Problem]]:
    """(files, datasets builder name, problems) for a path, glob, directory of files or list of them."""
    specs = [path] if isinstance(path, str) else list(path)
    files: list[Path] = []
    for spec in specs:
        p = Path(str(spec)).expanduser()
        if _is_saved_dataset(p):
            return [p], "disk", []
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in FORMATS)
        else:
            matches = sorted(Path(m) for m in glob.glob(str(p))) if any(c in str(p) for c in "*?[") else [p]
            files += [m for m in matches if m.is_file()]
            if not matches or not any(m.is_file() for m in matches):
                return [], None, [Problem(key, str(spec), "no such file or directory")]
    if not files:
        return [], None, [Problem(key, str(path), "no data files found",
                                  f"use {', '.join(sorted(FORMATS))} files or a datasets save_to_disk directory")]
    kinds = {FORMATS.get(f.suffix.lower()) for f in files}
    if None in kinds:
        bad = next(f for f in files if f.suffix.lower() not in FORMATS)
        return [], None, [Problem(key, str(bad), f"unsupported file type {bad.suffix!r}",
                                  f"use one of {', '.join(sorted(FORMATS))}")]
    if len(kinds) > 1:
        return [], None, [Problem(key, str(path), f"mixed file types {sorted(kinds)}", "use one format per data set")]
    return files, kinds.pop(), []


def _load(files: list[Path], builder: str, cache: Path) -> Any:
    """One `datasets.Dataset` (a DatasetDict's splits concatenated in train/validation/test order)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    if builder == "disk":
        ds = datasets.load_from_disk(str(files[0]))
    else:
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                                   cache_dir=str(cache / "hf"))
    if isinstance(ds, datasets.DatasetDict):
        order = sorted(ds, key=lambda s: (["train", "validation", "test"] + sorted(ds)).index(s))
        ds = datasets.concatenate_datasets([ds[s] for s in order])
    return ds


def _fingerprint(files: list[Path]) -> list[Any]:
    out = []
    for f in files:
        for g in ([f] if f.is_file() else sorted(x for x in f.rglob("*") if x.is_file())):
            st = g.stat()
            out.append([str(g.resolve()), st.st_size, st.st_mtime_ns])
    return out


def check_hf_local(node: dict[str, Any], key: str) -> list[Problem]:
    """Problems with an hf_local config found without loading the data (used by `validate`)."""
    from greenstack.data.lm import check_tokenizer_spec

    _, _, problems = resolve_files(node.get("path"), key=f"{key}.path")
    if node.get("label_kind", "class") not in ("class", "value"):
        problems.append(Problem(f"{key}.label_kind", node.get("label_kind"), "must be class or value"))
    return problems + check_tokenizer_spec(node.get("tokenizer", "minilm"), f"{key}.tokenizer")


def hf_local(path: str | list[str], text_column: str = "text", label_column: str | None = None,
             label_kind: Literal["class", "value"] = "class", tokenizer: str = "minilm", max_length: int = 128,
             block_size: int = 128, batch_size: int = 32, val_fraction: float = 0.1, test_fraction: float = 0.1,
             split_seed: int = 0, seed: int = 0, num_workers: int = 0, cache_dir: str | None = None,
             pad_to_multiple_of: int = 1, cache_only: Literal["plan", "build"] | None = None) -> Any:
    """A Hugging Face dataset from local files: an LM corpus (no `label_column`) or labelled rows.

    `cache_only` (`greenstack data prepare`): "plan" gives the tokenisation cache's `CachePlan` (path,
    exists) without reading the files; "build" writes the cache if missing and gives its plan, no loaders."""
    from greenstack.data.builders import check_fractions
    from greenstack.data.lm import CachePlan, data_cache_dir, lm_module, pack_corpus

    check_fractions(val_fraction, test_fraction, batch_size)
    problems = check_hf_local({"path": path, "label_kind": label_kind, "tokenizer": tokenizer}, "data")
    if problems:
        raise ConfigError(problems)
    files, builder, _ = resolve_files(path)
    cache = Path(cache_dir).expanduser() if cache_dir else data_cache_dir()
    loaded: list[Any] = []

    def dataset() -> Any:
        if not loaded:
            ds = _load(files, builder, cache)  # type: ignore[arg-type]
            missing = [c for c in (text_column, label_column) if c is not None and c not in ds.column_names]
            if missing:
                raise ConfigError(f"column {missing[0]!r} not in {ds.column_names}", key="data.path", value=str(path),
                                  fix=f"set data.{'text' if missing[0] == text_column else 'label'}_column")
            loaded.append(ds)
        return loaded[0]

    source = f"hf_local:{path} ({builder})"
    corpus_id = ["hf_local", _fingerprint(files), text_column, label_column, label_kind]
    if label_column is None:
        corpus = pack_corpus(lambda: [t for t in dataset()[text_column] if t], tokenizer=tokenizer,
                             block_size=block_size, val_fraction=val_fraction, test_fraction=test_fraction,
                             split_seed=split_seed, corpus_id=corpus_id, cache_dir=str(cache), hash_docs=False,
                             cache_only=cache_only)
        if isinstance(corpus, CachePlan):
            return replace(corpus, describe=f"{source}; {corpus.describe}")
        return lm_module(corpus, batch_size=batch_size, seed=seed, num_workers=num_workers, source=source)
    return _labelled(dataset, corpus_id, text_column=text_column, label_column=label_column, label_kind=label_kind,
                     tokenizer=tokenizer, max_length=max_length, batch_size=batch_size, val_fraction=val_fraction,
                     test_fraction=test_fraction, split_seed=split_seed, seed=seed, num_workers=num_workers,
                     cache=cache, pad_to_multiple_of=pad_to_multiple_of, source=source, cache_only=cache_only)


def _labelled(dataset: Any, corpus_id: list[Any], *, text_column: str, label_column: str, label_kind: str,
              tokenizer: str, max_length: int, batch_size: int, val_fraction: float, test_fraction: float,
              split_seed: int, seed: int, num_workers: int, cache: Path, pad_to_multiple_of: int, source: str,
              cache_only: Literal["plan", "build"] | None = None) -> Any:
    from greenstack.data.builders import DataModule, PadCollate, TextDataset, split_indices, text_loaders
    from greenstack.data.lm import CachePlan, atomic_save, build_tokenizer, digest, encode_with_progress

    if str(tokenizer).startswith("bpe:"):
        raise ConfigError("a BPE is trained for language-model corpora; labelled rows need a fixed tokenizer",
                          key="data.tokenizer", value=tokenizer, fix="use minilm, a local tokenizer directory, or byte")
    tok = build_tokenizer(tokenizer)
    path = cache / "tokenized" / f"{digest(corpus_id, tok.fingerprint, max_length)}.pt"
    cached = path.is_file()
    describe = f"{source}; tokenizer {tok.fingerprint}, rows truncated to {max_length} tokens"
    if cache_only == "plan" or (cache_only == "build" and cached):
        return CachePlan(path, cached, describe)
    if cached:
        rows = torch.load(path, weights_only=True)
    else:
        ds = dataset()
        texts, raw = ds[text_column], ds[label_column]
        keep = [i for i, (t, y) in enumerate(zip(texts, raw, strict=True)) if t and y is not None and y != ""]
        rows = {"encodings": encode_with_progress(tok, [texts[i] for i in keep], "rows", max_length=max_length,
                                                  special_tokens=True),
                "labels": [raw[i] if label_kind == "value" else str(raw[i]) for i in keep]}
        atomic_save(rows, path)
        if cache_only == "build":
            return CachePlan(path, True, describe, tokens=sum(len(e) for e in rows["encodings"]), written=True)
    raw_labels = rows["labels"]
    if label_kind == "value":
        try:
            labels: list[Any] = [float(y) for y in raw_labels]
        except (TypeError, ValueError) as e:
            raise ConfigError(f"label column has a non-numeric value: {e}", key="data.label_column",
                              value=label_column, fix="use data.label_kind=class for categories") from e
        class_names: list[str] = []
        strata = [0] * len(labels)
    else:
        class_names = sorted(set(raw_labels))
        if len(class_names) < 2:
            raise ConfigError("need at least 2 distinct labels", key="data.label_column", value=label_column)
        index = {c: i for i, c in enumerate(class_names)}
        labels = strata = [index[c] for c in raw_labels]
    tr, va, te = split_indices(strata, val_fraction, test_fraction, split_seed)
    enc = rows["encodings"]
    sets = tuple(TextDataset([enc[i] for i in ix], [labels[i] for i in ix]) for ix in (tr, va, te))
    collate = PadCollate(tok.pad_id, multiple_of=pad_to_multiple_of,
                         label_dtype=torch.float32 if label_kind == "value" else torch.long)
    train, val, test = text_loaders(sets, batch_size, seed, num_workers, collate, False)  # type: ignore[arg-type]
    return DataModule(train=train, val=val, test=test, num_classes=1 if label_kind == "value" else len(class_names),
                      kind="text", batch_size=batch_size, class_names=class_names,
                      source=f"{source}; tokenizer {tok.fingerprint}{' (tokenisation cache hit)' if cached else ''}",
                      target="value" if label_kind == "value" else "class", cache_path=path, cache_hit=cached)
