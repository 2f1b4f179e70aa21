"""Streaming shards (parquet / jsonl, local or any fsspec URL such as s3://) for data larger than RAM or disk.

Rows are read shard by shard and tokenised on the fly; nothing is held but the current batch. Each
epoch visits the shards in an order drawn from the train loader's seeded generator, and rows within a
shard in file order, so an epoch's sequence is a function of that generator's state alone. The loop
saves that state and the number of batches consumed (`loader_rng`, `batch_in_epoch`) in every
checkpoint, so a preempted run resumes mid-epoch at the next unseen sample: nothing repeated,
nothing skipped. Each sample carries its id (`<shard>:<row>`) in `batch["ids"]`.

Rows are samples: without `label_column` each row is one causal-LM sequence (truncated to
`max_length + 1` tokens, padded labels ignored); with it, one labelled text (class or value).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from greenstack.errors import ConfigError, Problem

SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".json", ".ndjson")


def list_shards(url: str, storage_options: dict[str, Any] | None = None, key: str = "data.url"
                ) -> tuple[Any, list[str]]:
    """(filesystem, sorted shard paths) under a directory URL, a glob, or one file."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        if any(c in root for c in "*?["):
            paths = fs.glob(root)
        elif fs.isdir(root):
            paths = fs.find(root)
        elif fs.isfile(root):
            paths = [root]
        else:
            raise ConfigError("no such file or directory", key=key, value=url)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any filesystem error is the user's URL or credentials
        raise ConfigError(f"cannot list shards: {type(e).__name__}: {e}", key=key, value=url,
                          fix="check the URL and data.storage_options (endpoint, credentials)") from e
    shards = sorted(p for p in paths if str(p).endswith(SUFFIXES))
    if not shards:
        raise ConfigError(f"no shards ({', '.join(SUFFIXES)}) found", key=key, value=url)
    return fs, shards


def _rows(fs: Any, path: str, columns: list[str]) -> Iterator[dict[str, Any]]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=1024, columns=columns):
                yield from batch.to_pylist()
    else:
        with fs.open(path, "rt", encoding="utf-8", compression="infer") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)


def _count(fs: Any, path: str) -> int:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows  # the footer only
    with fs.open(path, "rt", encoding="utf-8", compression="infer") as f:
        return sum(1 for line in f if line.strip())


class ShardStream(IterableDataset):
    """Rows of shards as `(id, token ids, label)`, in a per-epoch shard order drawn from `generator`."""

    def __init__(self, fs: Any, shards: list[str], *, text_column: str, label_column: str | None,
                 encode: Any, max_length: int, generator: torch.Generator | None, shuffle_shards: bool,
                 labels: dict[str, int] | None = None) -> None:
        self.fs, self.shards, self.text_column, self.label_column = fs, shards, text_column, label_column
        self.encode, self.max_length, self.generator = encode, max_length, generator
        self.shuffle_shards, self.labels = shuffle_shards, labels
        self.rows_per_shard = [_count(fs, s) for s in shards]

    def __len__(self) -> int:
        return sum(self.rows_per_shard)

    def __iter__(self) -> Iterator[tuple[str, list[int], Any]]:
        order = list(range(len(self.shards)))
        if self.shuffle_shards and self.generator is not None:
            order = torch.randperm(len(order), generator=self.generator).tolist()
        worker = get_worker_info()
        if worker is not None:  # workers read disjoint shards; the loader interleaves them in order
            order = order[worker.id::worker.num_workers]
        columns = [self.text_column] + ([self.label_column] if self.label_column else [])
        for s in order:
            name = self.shards[s].rsplit("/", 1)[-1]
            for r, row in enumerate(_rows(self.fs, self.shards[s], columns)):
                missing = [c for c in columns if c not in row]
                if missing:
                    raise ConfigError(f"shard {name} row {r} has no column {missing[0]!r} (has {sorted(row)})",
                                      key="data.text_column" if missing[0] == self.text_column else "data.label_column",
                                      value=missing[0])
                text = row[self.text_column] or ""
                limit = self.max_length + 1 if self.label_column is None else self.max_length
                ids = self.encode([text], max_length=limit, special_tokens=self.label_column is not None)[0]
                label = None
                if self.label_column is not None:
                    raw = row[self.label_column]
                    if self.labels is None:
                        label = float(raw)
                    elif str(raw) in self.labels:
                        label = self.labels[str(raw)]
                    else:
                        raise ConfigError(f"shard {name} row {r}: label {raw!r} is not one of data.classes",
                                          key="data.classes", value=sorted(self.labels), fix=f"add {raw!r}")
                yield f"{name}:{r}", ids, label


class StreamCollate:
    """Pads a batch; LM rows become (inputs, next-token labels with `ignore_index` on padding)."""

    def __init__(self, pad_id: int, lm: bool, label_dtype: torch.dtype, ignore_index: int = -100) -> None:
        self.pad_id, self.lm, self.label_dtype, self.ignore_index = pad_id, lm, label_dtype, ignore_index

    def __call__(self, rows: list[tuple[str, list[int], Any]]) -> dict[str, Any]:
        ids = [r[1] for r in rows]
        if self.lm:
            length = max(1, max(len(i) - 1 for i in ids))
            x = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
            y = torch.full((len(rows), length), self.ignore_index, dtype=torch.long)
            mask = torch.zeros((len(rows), length), dtype=torch.long)
            for b, seq in enumerate(ids):
                n = len(seq) - 1
                if n > 0:
                    x[b, :n], y[b, :n], mask[b, :n] = torch.tensor(seq[:-1]), torch.tensor(seq[1:]), 1
            return {"inputs": {"input_ids": x, "attention_mask": mask}, "labels": y, "ids": [r[0] for r in rows]}
        length = max(1, max(len(i) for i in ids))
        x = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for b, seq in enumerate(ids):
            x[b, : len(seq)], mask[b, : len(seq)] = torch.tensor(seq, dtype=torch.long), 1
        labels = torch.tensor([r[2] for r in rows], dtype=self.label_dtype)
        return {"inputs": {"input_ids": x, "attention_mask": mask}, "labels": labels, "ids": [r[0] for r in rows]}


def check_stream(node: dict[str, Any], key: str) -> list[Problem]:
    """Problems with a stream config found without listing the shards (used by `validate`)."""
    from greenstack.data.lm import check_tokenizer_spec

    problems = []
    tok = str(node.get("tokenizer", "byte"))
    if tok.startswith("bpe:"):
        problems.append(Problem(f"{key}.tokenizer", tok, "a stream cannot train a BPE (it never holds the corpus)",
                                "use byte, minilm or a local tokenizer directory (or data=hf_local for bpe:N)"))
    else:
        problems += check_tokenizer_spec(tok, f"{key}.tokenizer")
    if node.get("label_column") is not None and node.get("label_kind", "class") == "class" and not node.get("classes"):
        problems.append(Problem(f"{key}.classes", node.get("classes"), "a streamed class label needs the list of "
                                "classes (the stream is never read in full to find them)",
                                f"e.g. {key}.classes=[neg,pos]"))
    return problems


def stream(url: str, val_url: str | None = None, test_url: str | None = None, text_column: str = "text",
           label_column: str | None = None, label_kind: Literal["class", "value"] = "class",
           classes: list[str] | None = None, tokenizer: str = "byte", max_length: int = 128, batch_size: int = 32,
           shuffle_shards: bool = True, storage_options: dict[str, Any] | None = None, seed: int = 0,
           num_workers: int = 0) -> Any:
    """Iterable shards from a local directory or an fsspec URL (s3://bucket/prefix/, gs://, ...)."""
    from greenstack.data.builders import DataModule
    from greenstack.data.lm import build_tokenizer

    problems = check_stream({"tokenizer": tokenizer, "label_column": label_column, "label_kind": label_kind,
                             "classes": classes}, "data")
    if batch_size < 1:
        problems.append(Problem("data.batch_size", batch_size, "must be >= 1"))
    if max_length < 1:
        problems.append(Problem("data.max_length", max_length, "must be >= 1"))
    if problems:
        raise ConfigError(problems)
    tok = build_tokenizer(tokenizer)
    labels = {str(c): i for i, c in enumerate(classes)} if label_column is not None and label_kind == "class" \
        and classes else None
    lm = label_column is None
    collate = StreamCollate(tok.pad_id, lm, torch.float32 if label_kind == "value" else torch.long)
    generator = torch.Generator().manual_seed(seed)

    def loader(u: str, key: str, train: bool) -> DataLoader:
        fs, shards = list_shards(u, storage_options, key=key)
        ds = ShardStream(fs, shards, text_column=text_column, label_column=label_column, encode=tok.encode,
                         max_length=max_length, generator=generator if train else None,
                         shuffle_shards=shuffle_shards and train, labels=labels)
        return DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                          generator=generator if train else None)

    train = loader(url, "data.url", True)
    val = loader(val_url, "data.val_url", False) if val_url else None
    test = loader(test_url, "data.test_url", False) if test_url else None
    n_shards = len(train.dataset.shards)  # type: ignore[attr-defined]
    return DataModule(train=train, val=val, test=test,
                      num_classes=tok.vocab_size if lm else (1 if label_kind == "value" else len(classes or [])),
                      kind="text", batch_size=batch_size, class_names=[str(c) for c in classes or []],
                      source=f"stream:{url} ({n_shards} shards, tokenizer {tok.fingerprint})",
                      target="next_token" if lm else ("value" if label_kind == "value" else "class"))
