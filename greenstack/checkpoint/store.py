"""Where checkpoints live: a local directory (atomic rename) or any fsspec URL (manifest written last).

Both publish a checkpoint only when it is complete: locally the files are written into a temporary
directory that is renamed into place; on object stores, where rename is not atomic, the manifest is
uploaded last and a checkpoint without a manifest does not exist as far as `load_latest` is concerned.
Removal is the mirror image: a local checkpoint is renamed out of the published names before its files
are deleted, and on object stores the manifest goes first, so a kill at any instant never leaves a
published checkpoint with missing files.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from greenstack.checkpoint.codec import MANIFEST, CheckpointError, decode
from greenstack.checkpoint.snapshot import Snapshot

log = logging.getLogger("greenstack")
NAME = re.compile(r"^step-\d{9}$")


@dataclass
class Store:
    """A checkpoint directory addressed by URL: a plain path / file:// or e.g. s3://bucket/prefix."""

    url: str
    storage_options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self._made = False
        self.local = "://" not in self.url or self.url.startswith("file://")
        if self.local:
            self.root = Path(self.url.removeprefix("file://")).expanduser()
        else:
            import fsspec

            self.fs, self.root_path = fsspec.core.url_to_fs(self.url, **(self.storage_options or {}))

    def __str__(self) -> str:
        return self.url

    # -- write ------------------------------------------------------------------------------------
    def write(self, name: str, files: dict[str, bytes]) -> None:
        """Publish a complete checkpoint `name` (files include the manifest)."""
        if self.local:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                for fname, data in files.items():
                    with open(tmp / fname, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                final = self.root / name
                old = self._unpublish(name)
                os.replace(tmp, final)
                _fsync_dir(self.root)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            return
        base = f"{self.root_path.rstrip('/')}/{name}"
        if not self._made:
            self.fs.makedirs(self.root_path, exist_ok=True)  # creates the bucket on object stores
            self._made = True
        for fname, data in files.items():
            if fname != MANIFEST:
                self.fs.pipe_file(f"{base}/{fname}", data)
        self.fs.pipe_file(f"{base}/{MANIFEST}", files[MANIFEST])

    # -- read -------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Checkpoint names, newest first (incomplete local temp dirs excluded)."""
        if self.local:
            if not self.root.is_dir():
                return []
            found = [p.name for p in self.root.iterdir() if p.is_dir() and NAME.match(p.name)]
        else:
            try:
                found = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root_path, detail=False)]
            except FileNotFoundError:
                return []
            found = [n for n in found if NAME.match(n)]
            self.fs.invalidate_cache(self.root_path)
        return sorted(found, reverse=True)

    def read(self, name: str) -> dict[str, bytes]:
        if self.local:
            directory = self.root / name
            return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
        base = f"{self.root_path.rstrip('/')}/{name}"
        return {p.rsplit("/", 1)[-1]: self.fs.cat_file(p) for p in self.fs.ls(base, detail=False)}

    def _unpublish(self, name: str) -> Path | None:
        """Atomically move a local checkpoint out of the published names (into a `.tmp-` dir that
        `clean_partial` removes if we are killed before deleting it); None when there was none."""
        final = self.root / name
        if not final.exists():
            return None
        gone = self.root / f".tmp-del-{name}-{uuid.uuid4().hex[:8]}"
        os.replace(final, gone)
        _fsync_dir(self.root)
        return gone

    def delete(self, name: str) -> None:
        """Remove a checkpoint so that no instant of the removal looks like a published, broken one."""
        if self.local:
            gone = self._unpublish(name)
            if gone is not None:
                shutil.rmtree(gone, ignore_errors=True)
            return
        base = f"{self.root_path.rstrip('/')}/{name}"
        try:
            self.fs.rm_file(f"{base}/{MANIFEST}")
        except FileNotFoundError:
            pass
        self.fs.rm(base, recursive=True)

    def clean_partial(self) -> list[str]:
        """Remove temp dirs left by a write that was killed (local only); returns what was removed."""
        if not self.local or not self.root.is_dir():
            return []
        stale = [p for p in self.root.iterdir() if p.name.startswith(".tmp-")]
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
        return [p.name for p in stale]

    def load_latest(self, key: Any = None) -> tuple[Snapshot | None, str | None, list[str]]:
        """The newest checkpoint that verifies (and decrypts); the ones skipped, with why."""
        skipped: list[str] = []
        for name in self.names():
            try:
                return decode(self.read(name), key), name, skipped
            except Exception as e:  # noqa: BLE001 - whatever is wrong with one checkpoint, try the next
                reason = str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {e}"
                skipped.append(f"{self}/{name}: {reason}")
                log.warning("checkpoint %s/%s skipped: %s", self, name, reason)
        return None, None, skipped


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def open_store(url: str, storage_options: dict[str, Any] | None = None) -> Store:
    return Store(url, storage_options)
