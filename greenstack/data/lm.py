"""Language-modelling data: offline tokenizers, sequence packing, a tokenisation cache, a real corpus.

Corpora are packed into blocks of `block_size + 1` tokens (documents joined by an end-of-text token),
cut with a stride of `block_size`: a block's first `block_size` tokens are the inputs and its last
`block_size` the next-token labels, so every corpus token is a target exactly once and nothing is
padded. Tokenised splits are cached once per (corpus, tokenizer, block size) under
`$GREENSTACK_CACHE_DIR/data` (default `~/.cache/greenstack/data`), so reruns and sweep jobs skip it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from greenstack.errors import ConfigError, Problem
from greenstack.provenance import Figure

IGNORE_INDEX = -100
log = logging.getLogger("greenstack")


def data_cache_dir() -> Path:
    """$GREENSTACK_CACHE_DIR/data, else $XDG_CACHE_HOME/greenstack/data, else ~/.cache/greenstack/data."""
    if os.environ.get("GREENSTACK_CACHE_DIR"):
        return Path(os.environ["GREENSTACK_CACHE_DIR"]).expanduser() / "data"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "greenstack" / "data"


def digest(*parts: Any) -> str:
    """A stable sha256 hex digest of `parts` (cache keys of tokenized corpora)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def atomic_save(obj: Any, path: Path) -> None:
    """Write `obj` (text, else torch.save) to a temporary file, then rename: no half-written cache file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if isinstance(obj, str):
            Path(tmp).write_text(obj, encoding="utf-8")
        else:
            torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- tokenizers ----------------------------------------------------------------------------------
@dataclass
class TextTokenizer:
    """One interface over the offline tokenizers: `encode(texts) -> ids`, vocabulary size, special ids.

    `fingerprint` identifies the exact tokenizer, so cached tokenisations are reused only when it is
    the same.
    """

    backend: Any
    kind: str
    vocab_size: int
    eos_id: int
    pad_id: int
    fingerprint: str

    def encode(self, texts: Sequence[str], max_length: int | None = None, special_tokens: bool = False
               ) -> list[list[int]]:
        """Token ids per text; a transformers tokenizer adds its [CLS]/[SEP] only with `special_tokens`
        (labelled rows), not for corpora (documents are joined with eos)."""
        if self.kind == "byte":
            ids = [list(t.encode("utf-8")) for t in texts]
        elif self.kind == "bpe":
            ids = [e.ids for e in self.backend.encode_batch(list(texts))]
        elif special_tokens and max_length:
            ids = self.backend(list(texts), truncation=True, max_length=max_length)["input_ids"]
        else:
            ids = self.backend(list(texts), add_special_tokens=special_tokens)["input_ids"]
        return [i[:max_length] for i in ids] if max_length else ids


def _byte_tokenizer() -> TextTokenizer:
    return TextTokenizer(None, "byte", vocab_size=258, eos_id=256, pad_id=257, fingerprint="byte-v1")


def _train_bpe(vocab_size: int, texts: Sequence[str], corpus_digest: str, cache: Path | None) -> TextTokenizer:
    """A byte-level BPE trained on `texts` with the `tokenizers` package, cached by corpus and size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    fingerprint = f"bpe{vocab_size}-{corpus_digest}"
    path = (cache or data_cache_dir()) / "tokenizers" / f"{fingerprint}.json"
    if path.is_file():
        tok = Tokenizer.from_file(str(path))
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        atomic_save(tok.to_str(), path)
    return TextTokenizer(tok, "bpe", vocab_size=tok.get_vocab_size(), eos_id=tok.token_to_id("<|endoftext|>"),
                         pad_id=tok.token_to_id("<|pad|>"), fingerprint=fingerprint)


def build_tokenizer(spec: str, train_texts: Sequence[str] = (), corpus_digest: str = "",
                    cache: Path | None = None, key: str = "data.tokenizer") -> TextTokenizer:
    """`byte` (UTF-8 bytes), `bpe:N` (byte-level BPE of N tokens trained on the training split, cached),
    or a local transformers tokenizer directory (`minilm` = the shipped all-MiniLM-L6-v2)."""
    spec = str(spec)
    if spec == "byte":
        return _byte_tokenizer()
    if spec.startswith("bpe:"):
        size = spec.split(":", 1)[1]
        if not size.isdigit() or not 300 <= int(size) <= 1_000_000:
            raise ConfigError("bpe size must be an integer in [300, 1000000]", key=key, value=spec,
                              fix="e.g. data.tokenizer=bpe:2048")
        return _train_bpe(int(size), train_texts, corpus_digest, cache)
    from greenstack.data.builders import load_tokenizer

    tok = load_tokenizer(spec, key=key)
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    if eos is None:
        raise ConfigError("tokenizer has neither an eos nor a sep token to join documents", key=key, value=spec)
    return TextTokenizer(tok, "hf", vocab_size=len(tok), eos_id=int(eos), pad_id=int(pad),
                         fingerprint=f"hf-{tok.name_or_path}-{len(tok)}")


def check_tokenizer_spec(spec: Any, key: str) -> list[Problem]:
    """Problems with a tokenizer name, found without building it (used by `validate`)."""
    spec = str(spec)
    if spec == "byte":
        return []
    if spec.startswith("bpe:"):
        size = spec.split(":", 1)[1]
        return [] if size.isdigit() and 300 <= int(size) <= 1_000_000 else \
            [Problem(key, spec, "bpe size must be an integer in [300, 1000000]", "e.g. bpe:2048")]
    from greenstack.models.builders import resolve_local_model_dir

    try:
        resolve_local_model_dir(spec, key=key)
    except ConfigError as e:
        return [Problem(p.key, p.value, p.reason, p.fix or "or use byte / bpe:N (built offline)") for p in e.problems]
    return []


# -- packing -------------------------------------------------------------------------------------
def pack_blocks(docs: Sequence[Sequence[int]], block_size: int, eos_id: int) -> torch.Tensor:
    """Documents joined by `eos_id` and cut into (N, block_size + 1) blocks with stride `block_size`."""
    if not docs:
        return torch.zeros((0, block_size + 1), dtype=torch.long)
    stream = torch.from_numpy(np.concatenate([np.append(np.asarray(d, dtype=np.int64), eos_id) for d in docs]))
    n = (stream.numel() - 1) // block_size
    if n == 0:
        return torch.zeros((0, block_size + 1), dtype=torch.long)
    return stream.unfold(0, block_size + 1, block_size)[:n].contiguous()


class BlockDataset(Dataset):
    """Packed (N, block_size + 1) token blocks; item i is block i."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.blocks[i]


def block_collate(blocks: list[torch.Tensor]) -> dict[str, Any]:
    """Stacked blocks as `{"inputs": {"input_ids"}, "labels"}` with labels shifted by one token."""
    x = torch.stack(blocks)
    return {"inputs": {"input_ids": x[:, :-1]}, "labels": x[:, 1:]}


def unigram_perplexity(train: torch.Tensor, test: torch.Tensor, vocab_size: int) -> float:
    """Perplexity on `test`'s targets of an add-one-smoothed unigram model of `train`'s targets."""
    counts = torch.bincount(train[:, 1:].flatten(), minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[test[:, 1:].flatten()].mean().item())


@dataclass
class PackedCorpus:
    """Tokenised, packed splits of a corpus plus its tokenizer."""

    tokenizer: TextTokenizer
    splits: dict[str, torch.Tensor]
    cached: bool
    #: the tokenisation cache file these splits were read from or written to
    cache_path: Path | None = None


@dataclass(frozen=True)
class CachePlan:
    """Where a data config's tokenisation cache lives and whether it is there, found without tokenising.

    Why: `greenstack data prepare` must know before it waits for a low-carbon window (or meters
    anything) whether there is work at all; builders return one when called with `cache_only="plan"`,
    and with `cache_only="build"` after writing the cache (without building loaders: a batch size that
    does not fit is the training run's concern, not the cache's).
    """

    path: Path
    exists: bool
    describe: str
    #: "build": tokens in the cache (every split), and whether this call wrote it (False: it was there)
    tokens: int | None = None
    written: bool = False


def encode_with_progress(tok: TextTokenizer, texts: Sequence[str], what: str, *, max_length: int | None = None,
                         special_tokens: bool = False, chunk: int = 512, every_s: float = 5.0) -> list[list[int]]:
    """`tok.encode` in chunks, with an INFO progress line at most every `every_s` seconds on long work."""
    import time

    out: list[list[int]] = []
    t0 = last = time.monotonic()
    for i in range(0, len(texts), chunk):
        out += tok.encode(texts[i:i + chunk], max_length=max_length, special_tokens=special_tokens)
        now = time.monotonic()
        if now - last >= every_s and i + chunk < len(texts):
            last = now
            log.info("tokenising %s: %d/%d documents (%.0f %%, %.0f s)", what, len(out), len(texts),
                     100 * len(out) / len(texts), now - t0)
    return out


def split_documents(n: int, val_fraction: float, test_fraction: float, split_seed: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic train/val/test split of `n` documents (at least one each when a fraction is > 0)."""
    order = np.random.default_rng(split_seed).permutation(n)
    n_test = max(1, round(test_fraction * n)) if test_fraction > 0 else 0
    n_val = max(1, round(val_fraction * n)) if val_fraction > 0 else 0
    if n_test + n_val >= n:
        raise ConfigError(f"{n} documents cannot be split into train/val/test", key="data.val_fraction",
                          value=val_fraction, fix="use more documents or smaller fractions")
    return np.sort(order[n_test + n_val:]), np.sort(order[n_test:n_test + n_val]), np.sort(order[:n_test])


def pack_corpus(docs: Sequence[str] | Callable[[], Sequence[str]], *, tokenizer: str, block_size: int,
                val_fraction: float, test_fraction: float, split_seed: int, corpus_id: Any,
                cache_dir: str | None = None, hash_docs: bool = True,
                split_by: Literal["document", "tail"] = "document",
                cache_only: Literal["plan", "build"] | None = None) -> PackedCorpus | CachePlan:
    """Split documents, tokenise (a BPE is trained on the train split only) and pack, cached on disk.

    `docs` may be a function returning them: on a full cache hit it is never called, so a rerun reads
    no text at all (pass `hash_docs=False` and a `corpus_id` that identifies the files, e.g. their
    paths, sizes and modification times). `split_by="document"` holds out whole documents;
    `"tail"` holds out the last `val_fraction + test_fraction` of every document (unseen text of the
    same sources, for corpora of few, very different documents). `cache_only="plan"`: the `CachePlan`
    (where the cache is, whether it exists) without training a BPE or tokenising; `"build"`: make sure the
    cache exists and return its `CachePlan` instead of the splits.
    """
    cache = Path(cache_dir).expanduser() if cache_dir else data_cache_dir()
    loaded: list[Sequence[str]] = []

    def texts() -> Sequence[str]:
        if not loaded:
            loaded.append(docs() if callable(docs) else docs)
        return loaded[0]

    corpus_digest = digest(corpus_id, [hashlib.sha256(d.encode()).hexdigest() for d in texts()] if hash_docs else [])
    split_digest = digest(corpus_digest, split_seed, val_fraction, test_fraction,
                           *([] if split_by == "document" else [split_by]))

    def split() -> tuple[list[str], list[str], list[str]]:
        docs_ = texts()
        if split_by == "tail":
            parts: tuple[list[str], list[str], list[str]] = ([], [], [])
            for d in docs_:
                a = int(len(d) * (1 - val_fraction - test_fraction))
                b = int(len(d) * (1 - test_fraction))
                for part, text in zip(parts, (d[:a], d[a:b], d[b:]), strict=True):
                    if text:
                        part.append(text)
            return parts
        tr_, va_, te_ = split_documents(len(docs_), val_fraction, test_fraction, split_seed)
        return [docs_[i] for i in tr_], [docs_[i] for i in va_], [docs_[i] for i in te_]

    bpe, plan_only = str(tokenizer).startswith("bpe:"), cache_only == "plan"
    if bpe and plan_only:  # the fingerprint a BPE trained on this split will have (see _train_bpe)
        fingerprint = f"bpe{int(str(tokenizer)[4:])}-{split_digest}"
    elif bpe and not (cache / "tokenizers" / f"bpe{str(tokenizer)[4:]}-{split_digest}.json").is_file():
        log.info("training a %s tokenizer on the training split", tokenizer)
        tok = build_tokenizer(tokenizer, split()[0], split_digest, cache)
    else:  # a byte or local tokenizer, or a BPE already trained for this corpus and split
        tok = build_tokenizer(tokenizer, (), split_digest, cache)
    if not (bpe and plan_only):
        fingerprint = tok.fingerprint
    key = digest(split_digest, fingerprint, block_size)
    path = cache / "tokenized" / f"{key}.pt"
    describe = f"tokenizer {tokenizer}, blocks of {block_size} tokens"
    if plan_only:
        return CachePlan(path, path.is_file(), describe)
    if path.is_file():
        if cache_only == "build":
            return CachePlan(path, True, describe)
        return PackedCorpus(tok, torch.load(path, weights_only=True), cached=True, cache_path=path)
    splits = {name: pack_blocks(encode_with_progress(tok, part, f"the {name} split"), block_size, tok.eos_id)
              for name, part in zip(("train", "val", "test"), split(), strict=True)}
    atomic_save(splits, path)
    if cache_only == "build":
        return CachePlan(path, True, describe, tokens=sum(b.shape[0] * block_size for b in splits.values()),
                         written=True)
    return PackedCorpus(tok, splits, cached=False, cache_path=path)


def lm_module(corpus: PackedCorpus, *, batch_size: int, seed: int, num_workers: int, source: str) -> Any:
    """A DataModule of packed blocks (train shuffled by a seeded generator) with a unigram baseline."""
    from greenstack.data.builders import DataModule

    splits = corpus.splits
    if splits["train"].shape[0] < batch_size:
        raise ConfigError(f"the training split packs into {splits['train'].shape[0]} blocks, fewer than one "
                          "batch", key="data.batch_size", value=batch_size,
                          fix="use a smaller batch size or block size, or more text")
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(BlockDataset(splits["train"]), batch_size=batch_size, shuffle=True, generator=generator,
                       num_workers=num_workers, collate_fn=block_collate, drop_last=True)
    evals = [DataLoader(BlockDataset(splits[s]), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=block_collate) if splits[s].shape[0] else None for s in ("val", "test")]
    vocab = corpus.tokenizer.vocab_size
    figures = {}
    reference = splits["test"] if splits["test"].shape[0] else splits["val"]
    if reference.shape[0]:
        figures["data/unigram_perplexity"] = Figure(
            unigram_perplexity(splits["train"], reference, vocab), "perplexity", "measured",
            f"add-one-smoothed unigram of the training split's tokens, on the "
            f"{'test' if splits['test'].shape[0] else 'val'} split (the baseline a model must beat)")
    block = splits["train"].shape[1] - 1
    return DataModule(train=train, val=evals[0], test=evals[1], num_classes=vocab, kind="text", batch_size=batch_size,
                      source=f"{source}; tokenizer {corpus.tokenizer.fingerprint}; blocks of {block} tokens"
                             f"{' (tokenisation cache hit)' if corpus.cached else ''}",
                      target="next_token", figures=figures, cache_path=corpus.cache_path, cache_hit=corpus.cached)


# -- a real corpus that ships with Python ----------------------------------------------------------
def stdlib_sources(max_files: int, max_bytes: int) -> tuple[list[str], list[str]]:
    """(names, texts) of the standard library's top-level modules, in name order, within the limits."""
    root = Path(sysconfig.get_paths()["stdlib"])
    names, texts, total = [], [], 0
    for file in sorted(root.glob("*.py")):
        if len(names) >= max_files or total >= max_bytes:
            break
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        names.append(file.name)
        texts.append(text)
        total += len(text.encode())
    return names, texts


def python_stdlib(tokenizer: str = "bpe:2048", block_size: int = 128, batch_size: int = 32,
                  max_files: int = 400, max_bytes: int = 2_000_000, val_fraction: float = 0.05,
                  test_fraction: float = 0.05, split_seed: int = 0, seed: int = 0, num_workers: int = 0,
                  cache_dir: str | None = None, split_by: Literal["document", "tail"] = "tail",
                  cache_only: Literal["plan", "build"] | None = None) -> Any:
    """The Python standard library's own source (top-level modules by name, up to `max_bytes`): a real
    corpus available offline everywhere, tokenised and packed for causal LM. By default val/test are the
    last 5 % + 5 % of every file (`split_by=tail`); `split_by=document` holds out whole files.
    `cache_only`: the tokenisation cache's `CachePlan` instead of the data (`greenstack data prepare`)."""
    problems = []
    if block_size < 2:
        problems.append(Problem("data.block_size", block_size, "must be >= 2"))
    if batch_size < 1:
        problems.append(Problem("data.batch_size", batch_size, "must be >= 1"))
    if split_by not in ("document", "tail"):
        problems.append(Problem("data.split_by", split_by, "must be document or tail"))
    if max_files < 3:
        problems.append(Problem("data.max_files", max_files, "must be >= 3 (train, val and test files)"))
    problems += check_tokenizer_spec(tokenizer, "data.tokenizer")
    if problems:
        raise ConfigError(problems)
    names, texts = stdlib_sources(max_files, max_bytes)
    if len(names) < 3:
        raise ConfigError("found fewer than 3 standard-library source files", key="data.max_files", value=max_files,
                          fix="this Python installation ships no .py sources; use data=hf_local")
    corpus = pack_corpus(texts, tokenizer=tokenizer, block_size=block_size, val_fraction=val_fraction,
                         test_fraction=test_fraction, split_seed=split_seed,
                         corpus_id=["python_stdlib", sys.version, names], cache_dir=cache_dir, split_by=split_by,
                         cache_only=cache_only)
    if isinstance(corpus, CachePlan):
        return replace(corpus, describe=f"Python {sys.version.split()[0]} standard library ({len(names)} files); "
                                        f"{corpus.describe}")
    return lm_module(corpus, batch_size=batch_size, seed=seed, num_workers=num_workers,
                     source=f"Python {sys.version.split()[0]} standard library: {len(names)} files "
                            f"({names[0]} .. {names[-1]}), held out by {split_by}")
