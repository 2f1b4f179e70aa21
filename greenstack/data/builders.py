"""Data builders: each returns a `DataModule` with deterministic train/val/test loaders.

Batches are dicts `{"inputs": Tensor | dict[str, Tensor], "labels": Tensor}` so the loop treats
image and text models alike. Splits are stratified and seeded by `split_seed`, independent of the
training seed, so changing the seed never leaks test samples into training.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from greenstack.errors import ConfigError, Problem

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class DataModule:
    """Loaders plus what the model builder needs to know about the data."""

    train: DataLoader
    val: DataLoader | None
    test: DataLoader | None
    num_classes: int
    kind: Literal["image", "text"]
    batch_size: int
    in_chans: int = 3
    input_size: int | None = None
    class_names: list[str] = field(default_factory=list)
    source: str = ""
    #: what a prediction on new inputs must do to them as training did (saved in labels.json)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    #: text runs: the tokenizer used, saved with the model so the run's model can be used for prediction
    tokenizer: Any = None
    #: what the labels are ("class", "value" or "next_token"), matched against the task
    target: Literal["class", "value", "next_token"] = "class"
    #: figures about the data for sustainability.json (e.g. a corpus's unigram perplexity baseline)
    figures: dict[str, Any] = field(default_factory=dict)
    #: the tokenisation cache file the data came from (None: not cached), and whether it was there already
    cache_path: Path | None = None
    cache_hit: bool = False

    def sizes(self) -> dict[str, int]:
        return {name: len(loader.dataset) for name, loader in  # type: ignore[arg-type]
                (("train", self.train), ("val", self.val), ("test", self.test)) if loader is not None}


def check_fractions(val_fraction: float, test_fraction: float, batch_size: int) -> None:
    """ConfigError when the validation/test fractions or the batch size cannot make three splits."""
    problems = []
    if not 0 <= val_fraction < 1:
        problems.append(Problem("data.val_fraction", val_fraction, "must be within [0, 1)"))
    if not 0 <= test_fraction < 1:
        problems.append(Problem("data.test_fraction", test_fraction, "must be within [0, 1)"))
    if val_fraction + test_fraction >= 1:
        problems.append(Problem("data.val_fraction", val_fraction, "val + test fractions leave no training data"))
    if batch_size < 1:
        problems.append(Problem("data.batch_size", batch_size, "must be >= 1"))
    if problems:
        raise ConfigError(problems)


def split_indices(labels: Sequence[int] | np.ndarray, val_fraction: float, test_fraction: float,
                  split_seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic stratified train/val/test index split (stratification falls back when too small)."""
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    idx = np.arange(len(labels))

    def cut(ix: np.ndarray, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        if frac <= 0 or len(ix) < 2:
            return ix, ix[:0]
        strat = labels[ix]
        n_out = max(1, int(round(frac * len(ix))))
        ok = len(np.unique(strat)) <= n_out and np.bincount(strat).min(initial=2) >= 2
        return train_test_split(ix, test_size=n_out, random_state=seed, stratify=strat if ok else None)

    rest, test = cut(idx, test_fraction, split_seed)
    train, val = cut(rest, val_fraction / (1 - test_fraction) if test_fraction < 1 else 0, split_seed + 1)
    return np.sort(train), np.sort(val), np.sort(test)


def _dict_collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    xs, ys = zip(*batch, strict=True)
    return {"inputs": torch.stack(xs), "labels": torch.stack(ys)}


def _loaders(datasets: tuple[Dataset, Dataset, Dataset], batch_size: int, seed: int, num_workers: int,
             collate: Callable | None = None, drop_last: bool = False
             ) -> tuple[DataLoader, DataLoader | None, DataLoader | None]:
    generator = torch.Generator().manual_seed(seed)
    collate = collate or _dict_collate
    train = DataLoader(datasets[0], batch_size=batch_size, shuffle=True, generator=generator,
                       num_workers=num_workers, collate_fn=collate, drop_last=drop_last)
    evals = [DataLoader(d, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
             if len(d) else None for d in datasets[1:]]  # type: ignore[arg-type]
    return train, evals[0], evals[1]


def _images_to_tensor(images: torch.Tensor, image_size: int, channels: int,
                      stats: dict[str, Any] | None = None) -> torch.Tensor:
    """(N, H, W) or (N, C, H, W) float images in [0, 1] -> normalised (N, channels, size, size).

    `stats` (if given) receives the per-channel `mean`/`std` used, which prediction must reuse.
    """
    if images.ndim == 3:
        images = images[:, None]
    if images.shape[-1] != image_size or images.shape[-2] != image_size:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    if images.shape[1] == 1 and channels > 1:
        images = images.expand(-1, channels, -1, -1)
    elif images.shape[1] != channels:
        raise ConfigError(f"images have {images.shape[1]} channels", key="data.channels", value=channels)
    mean = images.mean(dim=(0, 2, 3), keepdim=True)
    std = images.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    if stats is not None:
        stats.update(mean=[float(v) for v in mean.flatten()], std=[float(v) for v in std.flatten()])
    return ((images - mean) / std).contiguous()


def _tensor_module(x: torch.Tensor, y: torch.Tensor, *, batch_size: int, val_fraction: float,
                   test_fraction: float, split_seed: int, seed: int, num_workers: int, channels: int,
                   image_size: int, class_names: list[str], source: str,
                   preprocessing: dict[str, Any] | None = None) -> DataModule:
    tr, va, te = split_indices(y.numpy(), val_fraction, test_fraction, split_seed)
    sets = tuple(TensorDataset(x[i], y[i]) for i in (tr, va, te))
    train, val, test = _loaders(sets, batch_size, seed, num_workers)  # type: ignore[arg-type]
    return DataModule(train=train, val=val, test=test, num_classes=len(class_names), kind="image",
                      batch_size=batch_size, in_chans=channels, input_size=image_size,
                      class_names=class_names, source=source, preprocessing=dict(preprocessing or {}))


def digits(batch_size: int = 64, image_size: int = 32, channels: int = 1, val_fraction: float = 0.1,
           test_fraction: float = 0.2, split_seed: int = 0, seed: int = 0, num_workers: int = 0) -> DataModule:
    """scikit-learn's real handwritten digits (1,797 8x8 images, 10 classes), resized for the model."""
    from sklearn.datasets import load_digits

    check_fractions(val_fraction, test_fraction, batch_size)
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32) / 16.0
    stats: dict[str, Any] = {}
    x = _images_to_tensor(images, image_size, channels, stats)
    y = torch.tensor(bunch.target, dtype=torch.long)
    steps = (f"8x8 grey digits / 16, bilinear resize to {image_size}x{image_size} (align_corners=False), "
             "then (x - mean) / std per channel")
    return _tensor_module(x, y, batch_size=batch_size, val_fraction=val_fraction, test_fraction=test_fraction,
                          split_seed=split_seed, seed=seed, num_workers=num_workers, channels=channels,
                          image_size=image_size, class_names=[str(i) for i in range(10)],
                          source="sklearn.datasets.load_digits (UCI ML hand-written digits)",
                          preprocessing={"image_size": image_size, "channels": channels, "steps": steps, **stats})


def synthetic_image(num_samples: int = 256, num_classes: int = 4, batch_size: int = 32, image_size: int = 32,
                    channels: int = 3, noise: float = 0.5, val_fraction: float = 0.125,
                    test_fraction: float = 0.125, split_seed: int = 0, seed: int = 0,
                    num_workers: int = 0) -> DataModule:
    """Learnable synthetic images (class prototypes + noise) for fast tests."""
    check_fractions(val_fraction, test_fraction, batch_size)
    g = torch.Generator().manual_seed(split_seed)
    prototypes = torch.rand(num_classes, channels, 8, 8, generator=g)
    y = torch.arange(num_samples) % num_classes
    images = prototypes[y] + noise * torch.randn(num_samples, channels, 8, 8, generator=g)
    stats: dict[str, Any] = {}
    x = _images_to_tensor(images, image_size, channels, stats)
    steps = f"8x8 images, bilinear resize to {image_size}x{image_size}, then (x - mean) / std per channel"
    return _tensor_module(x, y, batch_size=batch_size, val_fraction=val_fraction, test_fraction=test_fraction,
                          split_seed=split_seed, seed=seed, num_workers=num_workers, channels=channels,
                          image_size=image_size, class_names=[f"class{i}" for i in range(num_classes)],
                          source="synthetic prototypes + gaussian noise",
                          preprocessing={"image_size": image_size, "channels": channels, "steps": steps, **stats})


def image_folder(root: str, batch_size: int = 32, image_size: int = 64, channels: int = 3,
                 val_fraction: float = 0.1, test_fraction: float = 0.1, split_seed: int = 0, seed: int = 0,
                 num_workers: int = 0) -> DataModule:
    """A user's directory with one sub-folder per class (ImageFolder layout), loaded into memory."""
    from PIL import Image, UnidentifiedImageError

    check_fractions(val_fraction, test_fraction, batch_size)
    base = Path(root).expanduser()
    problems = check_image_folder(str(root))
    if problems:
        raise ConfigError(problems)
    classes = sorted(p.name for p in base.iterdir() if p.is_dir())
    tensors, labels = [], []
    mode = "L" if channels == 1 else "RGB"
    for label, name in enumerate(classes):
        for file in sorted((base / name).iterdir()):
            if file.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            try:
                with Image.open(file) as im:
                    im = im.convert(mode).resize((image_size, image_size))
                    arr = np.asarray(im, dtype=np.float32) / 255.0
            except (OSError, UnidentifiedImageError) as e:
                raise ConfigError(f"cannot read image: {e}", key="data.root", value=str(file)) from e
            tensors.append(torch.from_numpy(arr.reshape(image_size, image_size, -1)).permute(2, 0, 1))
            labels.append(label)
    stats: dict[str, Any] = {}
    x = _images_to_tensor(torch.stack(tensors), image_size, channels, stats)
    y = torch.tensor(labels, dtype=torch.long)
    steps = (f"PIL: convert('{mode}'), resize(({image_size}, {image_size})), pixels / 255, "
             "then (x - mean) / std per channel")
    return _tensor_module(x, y, batch_size=batch_size, val_fraction=val_fraction, test_fraction=test_fraction,
                          split_seed=split_seed, seed=seed, num_workers=num_workers, channels=channels,
                          image_size=image_size, class_names=classes, source=f"image_folder:{base}",
                          preprocessing={"image_size": image_size, "channels": channels, "steps": steps, **stats})


#: lower bounds of the data group's numeric options (any builder that has the key)
_MINIMUMS = {"batch_size": 1, "image_size": 1, "channels": 1, "num_workers": 0, "num_samples": 1,
             "num_classes": 2, "max_length": 1, "noise": 0}


def check_data_options(node: dict[str, Any], path: str = "data") -> list[Problem]:
    """Problems with a data node's sizes and fractions, found without building it (used by `validate`),
    so `data.batch_size=0` or `data.val_fraction=1.5` stop before a run dir exists."""
    problems = []
    for key, low in _MINIMUMS.items():
        value = node.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < low:
            problems.append(Problem(f"{path}.{key}", value, f"must be >= {low}"))
    fractions = {}
    for key in ("val_fraction", "test_fraction"):
        value = node.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if 0 <= value < 1:
                fractions[key] = value
            else:
                problems.append(Problem(f"{path}.{key}", value, "must be within [0, 1)", "e.g. 0.1"))
    if len(fractions) == 2 and sum(fractions.values()) >= 1:
        problems.append(Problem(f"{path}.val_fraction", fractions["val_fraction"],
                                "val + test fractions leave no training data"))
    return problems


def check_image_folder(root: str, key: str = "data.root") -> list[Problem]:
    """Problems with an ImageFolder directory, found without loading it (used by `validate`)."""
    base = Path(str(root)).expanduser()
    if not base.exists():
        return [Problem(key, root, "directory does not exist")]
    if not base.is_dir():
        return [Problem(key, root, "not a directory", "point at a folder with one sub-folder per class")]
    try:
        classes = [p for p in base.iterdir() if p.is_dir()]
    except PermissionError as e:
        return [Problem(key, root, f"cannot list directory: {e.strerror}")]
    if len(classes) < 2:
        return [Problem(key, root, f"found {len(classes)} class sub-folders, need at least 2",
                        "layout: ROOT/<class>/<image>.png")]
    empty = [c.name for c in classes if not any(f.suffix.lower() in IMAGE_EXTENSIONS for f in c.iterdir())]
    if empty:
        return [Problem(key, root, f"class folders without images: {', '.join(sorted(empty))}")]
    return _unreadable_images(classes, key)


def _unreadable_images(classes: list[Path], key: str) -> list[Problem]:
    """Images that fail to decode (corrupt, truncated): the folder is read into memory at the start of a
    run anyway, so decoding it here costs little and stops a bad file before anything is created."""
    from PIL import Image

    problems = []
    for folder in sorted(classes):
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            try:
                with Image.open(file) as im:
                    im.load()
            except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError... on bad files
                problems.append(Problem(key, str(file), f"cannot read image: {e}",
                                        "remove or replace the file"))
                if len(problems) >= 5:
                    return problems
    return problems


# -- text ----------------------------------------------------------------------------------------
class TextDataset(Dataset):
    """Token id lists with their labels (the text classification data sets)."""

    def __init__(self, encodings: list[list[int]], labels: list[int]) -> None:
        self.encodings, self.labels = encodings, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        return self.encodings[i], self.labels[i]


class PadCollate:
    """Pads each batch to its own longest sequence (not a global max length)."""

    def __init__(self, pad_id: int, multiple_of: int = 1, label_dtype: torch.dtype = torch.long) -> None:
        self.pad_id, self.multiple_of, self.label_dtype = pad_id, multiple_of, label_dtype

    def __call__(self, batch: list[tuple[list[int], int]]) -> dict[str, Any]:
        length = max(len(ids) for ids, _ in batch)
        length = -(-length // self.multiple_of) * self.multiple_of
        input_ids = torch.full((len(batch), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for i, (ids, _) in enumerate(batch):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
        labels = torch.tensor([label for _, label in batch], dtype=self.label_dtype)
        return {"inputs": {"input_ids": input_ids, "attention_mask": mask}, "labels": labels}


def load_tokenizer(name: str, key: str = "data.tokenizer") -> Any:
    from transformers import AutoTokenizer

    from greenstack.models.builders import resolve_local_model_dir

    directory = resolve_local_model_dir(name, key=key)
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def text_loaders(sets: tuple[TextDataset, TextDataset, TextDataset], batch_size: int, seed: int,
                  num_workers: int, collate: Callable, group_by_length: bool
                  ) -> tuple[DataLoader, DataLoader | None, DataLoader | None]:
    """Like `_loaders`, but the train loader draws its order from a `LengthGroupedSampler`.

    Ungrouped, that sampler yields exactly RandomSampler's order from the same generator, so runs are
    unchanged; the `efficiency.padding` policy (or `group_by_length=true`) switches grouping on.
    """
    from greenstack.efficiency.sampler import LengthGroupedSampler

    generator = torch.Generator().manual_seed(seed)
    train_set = sets[0]
    sampler = LengthGroupedSampler(train_set, [len(ids) for ids in train_set.encodings], generator=generator,
                                   group_by_length=group_by_length, bucket_size=50 * batch_size)
    train = DataLoader(train_set, batch_size=batch_size, sampler=sampler, generator=generator,
                       num_workers=num_workers, collate_fn=collate)
    evals = [DataLoader(d, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
             if len(d) else None for d in sets[1:]]
    return train, evals[0], evals[1]


def _check_text_options(pad_to_multiple_of: int, group_by_length: bool) -> None:
    problems = []
    if not isinstance(pad_to_multiple_of, int) or isinstance(pad_to_multiple_of, bool) or pad_to_multiple_of < 1:
        problems.append(Problem("data.pad_to_multiple_of", pad_to_multiple_of, "must be an integer >= 1",
                                "8 suits tensor cores"))
    if not isinstance(group_by_length, bool):
        problems.append(Problem("data.group_by_length", group_by_length, "must be true or false"))
    if problems:
        raise ConfigError(problems)


def _text_module(texts: list[str], raw_labels: list[str], *, tokenizer: str, max_length: int, batch_size: int,
                 val_fraction: float, test_fraction: float, split_seed: int, seed: int, num_workers: int,
                 source: str, group_by_length: bool = False, pad_to_multiple_of: int = 1) -> DataModule:
    tok = load_tokenizer(tokenizer)
    class_names = sorted(set(raw_labels))
    index = {c: i for i, c in enumerate(class_names)}
    labels = [index[c] for c in raw_labels]
    encodings = tok(texts, truncation=True, max_length=max_length)["input_ids"]
    tr, va, te = split_indices(labels, val_fraction, test_fraction, split_seed)
    sets = tuple(TextDataset([encodings[i] for i in ix], [labels[i] for i in ix]) for ix in (tr, va, te))
    collate = PadCollate(tok.pad_token_id or 0, multiple_of=pad_to_multiple_of)
    train, val, test = text_loaders(sets, batch_size, seed, num_workers, collate, group_by_length)  # type: ignore[arg-type]
    return DataModule(train=train, val=val, test=test, num_classes=len(class_names), kind="text",
                      batch_size=batch_size, class_names=class_names, source=source, tokenizer=tok,
                      preprocessing={"tokenizer": tokenizer, "max_length": max_length, "truncation": True})


def check_text_csv(path: str, text_column: str, label_column: str, key: str = "data.path") -> list[Problem]:
    """Problems with a text CSV, found by reading only its header (used by `validate`)."""
    file = Path(str(path)).expanduser()
    if not file.is_file():
        return [Problem(key, path, "file does not exist" if not file.exists() else "not a file")]
    try:
        with file.open(newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError) as e:
        return [Problem(key, path, f"cannot read: {e}")]
    missing = [c for c in (text_column, label_column) if c not in header]
    return [Problem(key, path, f"column {c!r} not in header {header}",
                    f"set data.{'text' if c == text_column else 'label'}_column") for c in missing]


def text_csv(path: str, text_column: str = "text", label_column: str = "label", tokenizer: str = "minilm",
             max_length: int = 128, batch_size: int = 32, val_fraction: float = 0.1, test_fraction: float = 0.1,
             split_seed: int = 0, seed: int = 0, num_workers: int = 0, group_by_length: bool = False,
             pad_to_multiple_of: int = 1) -> DataModule:
    """A user's CSV of texts and labels, tokenised with a local tokenizer (default: shipped MiniLM).

    Batches are padded to their own longest sequence (rounded up to `pad_to_multiple_of`);
    `group_by_length` batches similar lengths together (see greenstack.efficiency.sampler).
    """
    check_fractions(val_fraction, test_fraction, batch_size)
    _check_text_options(pad_to_multiple_of, group_by_length)
    problems = check_text_csv(path, text_column, label_column)
    if problems:
        raise ConfigError(problems)
    texts, labels = [], []
    with Path(path).expanduser().open(newline="", encoding="utf-8") as f:
        for row_no, row in enumerate(csv.DictReader(f), start=2):
            text, label = row.get(text_column), row.get(label_column)
            if not text or label is None or label == "":
                raise ConfigError(f"row {row_no} has an empty text or label", key="data.path", value=path)
            texts.append(text)
            labels.append(label)
    if len(set(labels)) < 2:
        raise ConfigError("need at least 2 distinct labels", key="data.path", value=path)
    return _text_module(texts, labels, tokenizer=tokenizer, max_length=max_length, batch_size=batch_size,
                        val_fraction=val_fraction, test_fraction=test_fraction, split_seed=split_seed,
                        seed=seed, num_workers=num_workers, source=f"text_csv:{path}",
                        group_by_length=group_by_length, pad_to_multiple_of=pad_to_multiple_of)


_WORDS = {
    0: ["rain", "storm", "cold", "wind", "grey", "cloud", "snow", "winter"],
    1: ["sun", "warm", "bright", "summer", "beach", "clear", "light", "heat"],
    2: ["goal", "match", "team", "score", "league", "player", "coach", "win"],
    3: ["market", "stock", "price", "trade", "bank", "profit", "share", "fund"],
}
_FILLER = ["the", "a", "of", "and", "to", "in", "is", "it", "that", "on", "was", "for", "with", "as", "by", "at"]


def synthetic_text_rows(num_samples: int, num_classes: int, seed: int) -> tuple[list[str], list[str]]:
    """Short sentences whose topic words reveal the class, padded with filler words."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(num_samples):
        c = i % num_classes
        words = list(rng.choice(_WORDS[c % len(_WORDS)], size=3)) + list(rng.choice(_FILLER, size=rng.integers(3, 12)))
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(f"topic{c}")
    return texts, labels


def synthetic_text(num_samples: int = 256, num_classes: int = 4, tokenizer: str = "minilm", max_length: int = 32,
                   batch_size: int = 32, val_fraction: float = 0.125, test_fraction: float = 0.125,
                   split_seed: int = 0, seed: int = 0, num_workers: int = 0, group_by_length: bool = False,
                   pad_to_multiple_of: int = 1) -> DataModule:
    """Synthetic topic-classification sentences, tokenised with a real local tokenizer."""
    check_fractions(val_fraction, test_fraction, batch_size)
    _check_text_options(pad_to_multiple_of, group_by_length)
    texts, labels = synthetic_text_rows(num_samples, num_classes, split_seed)
    return _text_module(texts, labels, tokenizer=tokenizer, max_length=max_length, batch_size=batch_size,
                        val_fraction=val_fraction, test_fraction=test_fraction, split_seed=split_seed,
                        seed=seed, num_workers=num_workers, source="synthetic topic sentences",
                        group_by_length=group_by_length, pad_to_multiple_of=pad_to_multiple_of)
