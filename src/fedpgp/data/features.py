"""Image features of a frozen encoder: computed once per image (and per stored view), kept on
disk, reused by every method, seed and run.

A cache entry holds the features of some images of one image source under one encoder, one
transform and one view; its key is the sha256 of those four identities, so a changed backbone,
transform or dataset gets a new entry instead of stale features. A source's identity names its
images (relative paths), not their pixels, so every row of an entry also records what the image
file was when it was encoded: its size, modification time and sha256. On reuse each file is
stat'ed; one whose size or time differs is hashed again, and if its content changed (a fixed,
replaced or corrupted image at the same path) it is encoded again. An entry is one file, written
atomically, with a checksum over its contents: a truncated or corrupted file is detected, removed
and rebuilt, never used. Entries grow as runs ask for images they do not hold yet (other shots,
other seeds), and are read through a memory map.

File layout: ``MAGIC``, the header length (8 bytes, little endian), a JSON header padded to a
multiple of 64 bytes, then ``count`` int64 image indices (sorted), ``count x dim`` float32
features, ``count x 2`` int64 file stamps (size, mtime in ns) and ``count x 32`` bytes of file
sha256, all in the same order (stamps and digests are zero for images not read from files).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from ..atomic import write_bytes_atomic
from ..console import PROGRESS
from ..errors import DatasetError, WriteError
from ..seeding import derive_seed
from .datasets import ImageSource, image_file

log = logging.getLogger(__name__)

Encoder = Callable[[Tensor], Tensor]
Transform = Callable[[Image.Image], Tensor]

MAGIC = b"FPGPFEAT"
FORMAT = 2
_ALIGN = 64
_HASH_BLOCK = 1 << 22
_DIGEST = 32


def _view_seed(view: int, index: int) -> int:
    """The random stream of view ``view`` of image ``index``: fixed by the pair alone, so a
    stored view is the same whichever images were encoded with it."""
    return derive_seed(0, "view", view, index)


def encode_images(
    encoder: Encoder,
    images: ImageSource,
    indices: Sequence[int],
    transform: Transform,
    view: int | None = None,
    batch_size: int = 256,
) -> Tensor:
    """Features (n, E) of ``images[i]`` for i in ``indices``, in that order, on the CPU.

    ``view`` None applies ``transform`` as it is (a deterministic test transform); an integer
    draws each image's random augmentation from the stream of (view, image index).
    """
    chunks = []
    # disable=None: silent when stderr is not a terminal; leave=False: gone once done.
    bar = tqdm(total=len(indices), desc="encoding", unit="image", disable=None, leave=False)
    with bar, torch.no_grad(), torch.random.fork_rng(devices=[]):
        for start in range(0, len(indices), batch_size):
            tensors = []
            for index in indices[start : start + batch_size]:
                if view is not None:
                    torch.manual_seed(_view_seed(view, int(index)))
                tensors.append(transform(images[int(index)]))
            chunks.append(encoder(torch.stack(tensors)).float().cpu())
            bar.update(len(tensors))
    if not chunks:
        return torch.empty(0, 0)
    return torch.cat(chunks)


def default_cache_dir() -> Path:
    """``$FEDPGP_CACHE``, else ``$XDG_CACHE_HOME/fedpgp``, else ``~/.cache/fedpgp``."""
    explicit = os.environ.get("FEDPGP_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "fedpgp"


class CorruptCacheError(Exception):
    """A cache file that cannot be trusted; the cache removes it and recomputes."""


class _Entry:
    """A verified cache file: sorted image indices, their features and the stamps and digests of
    their files, memory-mapped. ``checksum`` False checks the header and the size only (a quick
    look that reads no features)."""

    def __init__(self, path: Path, key: str, checksum: bool = True) -> None:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(len(MAGIC) + 8)
            if len(head) < len(MAGIC) + 8 or head[: len(MAGIC)] != MAGIC:
                raise CorruptCacheError("not a fedpgp feature file")
            header_length = int.from_bytes(head[len(MAGIC) :], "little")
            if header_length > size:
                raise CorruptCacheError("header longer than the file")
            try:
                header = json.loads(handle.read(header_length))
                count, dim, digest = int(header["count"]), int(header["dim"]), header["sha256"]
            except (ValueError, KeyError, TypeError) as exc:
                raise CorruptCacheError(f"unreadable header ({exc})") from None
            if header.get("key") != key or header.get("format") != FORMAT:
                raise CorruptCacheError("header names another entry or format")
            offset = len(MAGIC) + 8 + header_length
            expected = offset + count * (8 + dim * 4 + 16 + _DIGEST)
            if size != expected:
                raise CorruptCacheError(f"{size} bytes, expected {expected} (truncated?)")
            if checksum:
                body = hashlib.sha256()
                for block in iter(lambda: handle.read(_HASH_BLOCK), b""):
                    body.update(block)
                if body.hexdigest() != digest:
                    raise CorruptCacheError("checksum mismatch")
        self.count, self.dim = count, dim
        if count == 0:
            self.indices = np.empty(0, dtype=np.int64)
            self.features = np.empty((0, dim), dtype=np.float32)
            self.stamps = np.empty((0, 2), dtype=np.int64)
            self.digests = np.empty((0, _DIGEST), dtype=np.uint8)
            return
        self.indices = np.memmap(path, dtype=np.int64, mode="r", offset=offset, shape=(count,))
        offset += count * 8
        self.features = np.memmap(
            path, dtype=np.float32, mode="r", offset=offset, shape=(count, dim)
        )
        offset += count * dim * 4
        self.stamps = np.memmap(path, dtype=np.int64, mode="r", offset=offset, shape=(count, 2))
        offset += count * 16
        self.digests = np.memmap(
            path, dtype=np.uint8, mode="r", offset=offset, shape=(count, _DIGEST)
        )

    @cached_property
    def rows(self) -> _Rows:
        return _Rows(self.indices, self.features, self.stamps, self.digests)


@dataclass
class _Rows:
    """Rows of an entry: image indices, their features and the file each was read from."""

    indices: np.ndarray
    features: np.ndarray
    stamps: np.ndarray
    digests: np.ndarray

    def take(self, keep: np.ndarray) -> _Rows:
        return _Rows(self.indices[keep], self.features[keep], self.stamps[keep], self.digests[keep])

    def join(self, other: _Rows) -> _Rows:
        """Both sets of rows, sorted by image index."""
        indices = np.concatenate([self.indices, other.indices])
        order = np.argsort(indices, kind="stable")
        return _Rows(
            indices[order],
            np.concatenate([self.features, other.features])[order],
            np.concatenate([self.stamps, other.stamps])[order],
            np.concatenate([self.digests, other.digests])[order],
        )


def _file_stamp(path: Path) -> tuple[int, int]:
    """(size, mtime in ns) of an image file; DatasetError naming it if it is not a file."""
    try:
        status = path.stat()
    except FileNotFoundError:
        raise DatasetError(f"image {path}: listed in the split but the file is absent") from None
    except OSError as exc:
        raise DatasetError(f"image {path}: cannot be read ({exc})") from exc
    if not stat.S_ISREG(status.st_mode):
        raise DatasetError(f"image {path}: expected an image file, found a folder or device")
    return int(status.st_size), int(status.st_mtime_ns)


def _file_digest(path: Path) -> np.ndarray:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(_HASH_BLOCK), b""):
                digest.update(block)
    except OSError as exc:
        raise DatasetError(f"image {path}: cannot be read ({exc})") from exc
    return np.frombuffer(digest.digest(), dtype=np.uint8)


def _from_files(images: ImageSource, indices: Sequence[int] | np.ndarray) -> bool:
    """Whether ``images`` reads from files (a source is all files or none)."""
    return len(indices) > 0 and image_file(images, int(indices[0])) is not None


def _identify(images: ImageSource, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """File stamps (n, 2) and sha256 digests (n, 32) of images ``indices`` (zero where an image
    is not read from a file)."""
    stamps = np.zeros((len(indices), 2), dtype=np.int64)
    digests = np.zeros((len(indices), _DIGEST), dtype=np.uint8)
    if not _from_files(images, indices):
        return stamps, digests
    for row, index in enumerate(indices):
        path = image_file(images, int(index))
        if path is not None:
            stamps[row] = _file_stamp(path)
            digests[row] = _file_digest(path)
    return stamps, digests


def _changed_files(
    images: ImageSource, entry: _Entry, indices: np.ndarray
) -> tuple[list[int], dict[int, tuple[int, int]], Path | None]:
    """Which of ``indices`` (all held by ``entry``) changed on disk since they were encoded,
    the new stamps of files touched without a change of content, and one changed file's path."""
    changed: list[int] = []
    touched: dict[int, tuple[int, int]] = {}
    example = None
    if not _from_files(images, indices):
        return changed, touched, example
    rows = np.searchsorted(entry.indices, indices)
    for index, row in zip(indices.tolist(), rows.tolist(), strict=True):
        path = image_file(images, index)
        if path is None:
            continue
        stamp = _file_stamp(path)
        if stamp == tuple(int(v) for v in entry.stamps[row]):
            continue
        if np.array_equal(_file_digest(path), entry.digests[row]):
            touched[index] = stamp
        else:
            changed.append(index)
            example = example or path
    return changed, touched, example


def _file_bytes(key: str, meta: dict, rows: _Rows) -> bytes:
    body = (
        rows.indices.astype("<i8").tobytes()
        + rows.features.astype("<f4").tobytes()
        + rows.stamps.astype("<i8").tobytes()
        + rows.digests.astype(np.uint8).tobytes()
    )
    header = {
        "format": FORMAT,
        "key": key,
        "count": int(rows.indices.shape[0]),
        "dim": int(rows.features.shape[1]),
        "sha256": hashlib.sha256(body).hexdigest(),
        **meta,
    }
    text = json.dumps(header, sort_keys=True).encode()
    start = len(MAGIC) + 8
    text += b" " * (-(start + len(text)) % _ALIGN)
    return MAGIC + len(text).to_bytes(8, "little") + text + body


def _log_progress(missing: int, needed: int, what: str, view: int | None) -> None:
    """The progress line of one request to the cache: how many images it encodes."""
    prefix = "image features" if view is None else f"image features (view {view})"
    if not missing:
        log.info("%s: all %d %s cached", prefix, needed, what, extra=PROGRESS)
    elif missing == needed:
        log.info("%s: encoding %d %s (none cached)", prefix, needed, what, extra=PROGRESS)
    else:
        log.info(
            "%s: encoding %d of %d %s (the rest cached)",
            prefix,
            missing,
            needed,
            what,
            extra=PROGRESS,
        )


# Cache folders already warned about: a cache that cannot be used says so once per process,
# not once per entry.
_warned: set[Path] = set()


class FeatureCache:
    """Image features on disk under ``root/features``, keyed by encoder, transform, image
    source and view (see the module docstring). A cache that cannot be read or written (a
    read-only folder, a file in its place) is a warning, not an error: features are computed
    as they would be without it."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = (Path(root).expanduser() if root else default_cache_dir()) / "features"

    def _warn_once(self, problem: str) -> None:
        if self.root in _warned:
            return
        _warned.add(self.root)
        log.warning("feature cache: %s; going on without storing what cannot be stored", problem)

    @staticmethod
    def key(encoder_id: str, transform: object, images: ImageSource, view: int | None) -> str:
        """sha256 of everything the features depend on; ``transform`` by its repr, which lists
        every parameter of a torchvision transform."""
        parts = {
            "format": FORMAT,
            "encoder": encoder_id,
            "transform": repr(transform),
            "source": images.fingerprint(),
            "view": "fixed" if view is None else f"random/{view}",
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.feat"

    def load(self, key: str) -> _Entry | None:
        """The verified entry ``key``, or None when absent; an untrustworthy file is removed."""
        path = self.path(key)
        try:
            return _Entry(path, key)
        except FileNotFoundError:
            return None
        except CorruptCacheError as exc:
            log.warning("feature cache: %s is unusable (%s); rebuilding it", path, exc)
            # In a read-only folder the file stays; storing the rebuilt entry warns then.
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            return None
        except OSError as exc:  # a folder at the entry's path, a file in the cache's place
            self._warn_once(f"cannot read {path} ({exc.strerror or exc})")
            return None

    def holds(
        self,
        encoder_id: str,
        images: ImageSource,
        indices: Sequence[int],
        transform: Transform,
        view: int | None = None,
    ) -> bool:
        """Whether :meth:`features` would find every image of ``indices`` in the cache, current
        with its file on disk, and so encode nothing; reads the entry's header and rows but not
        its features, and changes nothing (a dry run asks this)."""
        wanted = np.unique(np.asarray(indices, dtype=np.int64))
        if wanted.size == 0:
            return True
        key = self.key(encoder_id, transform, images, view)
        try:
            entry = _Entry(self.path(key), key, checksum=False)
        except (CorruptCacheError, OSError):
            return False
        if not np.isin(wanted, entry.indices).all():
            return False
        changed, _, _ = _changed_files(images, entry, wanted)
        return not changed

    def features(
        self,
        encoder: Encoder,
        encoder_id: str,
        images: ImageSource,
        indices: Sequence[int],
        transform: Transform,
        view: int | None = None,
        batch_size: int = 256,
        what: str = "images",
    ) -> Tensor:
        """Features (n, E) of ``images[i]`` for i in ``indices`` (as :func:`encode_images`),
        encoding only the images the cache does not hold yet; the progress line names the
        images ``what`` (``test images``)."""
        wanted = np.asarray(indices, dtype=np.int64)
        if wanted.size == 0:
            return torch.empty(0, 0)
        key = self.key(encoder_id, transform, images, view)
        entry = self.load(key)
        needed = np.unique(wanted)
        held = self._current_rows(images, entry, needed)
        missing = np.setdiff1d(wanted, np.empty(0, np.int64) if held is None else held.indices)
        _log_progress(missing.size, needed.size, what, view)
        if missing.size:
            stamps, digests = _identify(images, missing.tolist())
            fresh = encode_images(encoder, images, missing.tolist(), transform, view, batch_size)
            new = _Rows(missing, fresh.numpy(), stamps, digests)
            held = new if held is None else held.join(new)
        if held is not None and (entry is None or held is not entry.rows):
            meta = {
                "encoder": encoder_id,
                "transform": repr(transform),
                "source": images.fingerprint(),
                "view": view,
            }
            try:
                write_bytes_atomic(self.path(key), _file_bytes(key, meta, held))
            except WriteError as exc:
                self._warn_once(str(exc))
            else:
                log.info("feature cache: encoded %d images into %s", missing.size, self.path(key))
        rows = np.searchsorted(held.indices, wanted)
        return torch.from_numpy(np.array(held.features[rows]))

    @staticmethod
    def _current_rows(
        images: ImageSource, entry: _Entry | None, needed: np.ndarray
    ) -> _Rows | None:
        """The rows of ``entry`` that still describe the images on disk: ``entry.rows`` itself
        when nothing changed, else a copy without the rows of changed files (and with new
        stamps for files touched without a change of content)."""
        if entry is None:
            return None
        held = np.intersect1d(needed, entry.indices)
        changed, touched, example = _changed_files(images, entry, held)
        if not changed and not touched:
            return entry.rows
        if changed:
            log.warning(
                "feature cache: %d image(s) changed on disk since they were encoded (%s%s); "
                "encoding them again",
                len(changed),
                example,
                ", ..." if len(changed) > 1 else "",
            )
        stamps = np.array(entry.stamps)
        for index, stamp in touched.items():
            stamps[int(np.searchsorted(entry.indices, index))] = stamp
        rows = _Rows(entry.indices, entry.features, stamps, entry.digests)
        return rows.take(~np.isin(entry.indices, changed))

    def views(
        self,
        encoder: Encoder,
        encoder_id: str,
        images: ImageSource,
        indices: Sequence[int],
        transform: Transform,
        views: int,
        batch_size: int = 256,
    ) -> Tensor:
        """Features (views, n, E) of ``views`` random augmentations of each image."""
        return torch.stack(
            [
                self.features(encoder, encoder_id, images, indices, transform, v, batch_size)
                for v in range(views)
            ]
        )


class OnlineViews:
    """``augment: online``: a fresh random augmentation of each image, encoded at every step
    (exact on-the-fly training, at the cost of the image encoder in every step)."""

    def __init__(
        self, encoder: Encoder, images: ImageSource, indices: Sequence[int], transform: Transform
    ) -> None:
        self.encoder = encoder
        self.images = images
        self.indices = [int(i) for i in indices]
        self.transform = transform

    def __call__(self, rows: Tensor, seed: int) -> Tensor:
        """Features (len(rows), E) of the client's images ``rows``, augmented from ``seed``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            batch = [self.transform(self.images[self.indices[r]]) for r in rows.tolist()]
        with torch.no_grad():
            return self.encoder(torch.stack(batch)).float()
