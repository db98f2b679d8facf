"""Image features of a frozen encoder: computed once per image (and per stored view), kept on
disk, reused by every method, seed and run.

A cache entry holds the features of some images of one image source under one encoder, one
transform and one view; its key is the sha256 of those four identities, so a changed backbone,
transform or dataset gets a new entry instead of stale features. An entry is one file, written
atomically, with a checksum over its contents: a truncated or corrupted file is detected, removed
and rebuilt, never used. Entries grow as runs ask for images they do not hold yet (other shots,
other seeds), and are read through a memory map.

File layout: ``MAGIC``, the header length (8 bytes, little endian), a JSON header padded to a
multiple of 64 bytes, then ``count`` int64 image indices (sorted) and ``count x dim`` float32
features in the same order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..atomic import write_bytes_atomic
from ..seeding import derive_seed
from .datasets import ImageSource

log = logging.getLogger(__name__)

Encoder = Callable[[Tensor], Tensor]
Transform = Callable[[Image.Image], Tensor]

MAGIC = b"FPGPFEAT"
FORMAT = 1
_ALIGN = 64
_HASH_BLOCK = 1 << 22


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
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        for start in range(0, len(indices), batch_size):
            tensors = []
            for index in indices[start : start + batch_size]:
                if view is not None:
                    torch.manual_seed(_view_seed(view, int(index)))
                tensors.append(transform(images[int(index)]))
            chunks.append(encoder(torch.stack(tensors)).float().cpu())
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
    """A verified cache file: sorted image indices and their features, memory-mapped."""

    def __init__(self, path: Path, key: str) -> None:
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
            expected = offset + count * 8 + count * dim * 4
            if size != expected:
                raise CorruptCacheError(f"{size} bytes, expected {expected} (truncated?)")
            body = hashlib.sha256()
            for block in iter(lambda: handle.read(_HASH_BLOCK), b""):
                body.update(block)
            if body.hexdigest() != digest:
                raise CorruptCacheError("checksum mismatch")
        self.count, self.dim = count, dim
        if count == 0:
            self.indices = np.empty(0, dtype=np.int64)
            self.features = np.empty((0, dim), dtype=np.float32)
            return
        self.indices = np.memmap(path, dtype=np.int64, mode="r", offset=offset, shape=(count,))
        self.features = np.memmap(
            path, dtype=np.float32, mode="r", offset=offset + count * 8, shape=(count, dim)
        )


def _file_bytes(key: str, meta: dict, indices: np.ndarray, features: np.ndarray) -> bytes:
    body = indices.astype("<i8").tobytes() + features.astype("<f4").tobytes()
    header = {
        "format": FORMAT,
        "key": key,
        "count": int(indices.shape[0]),
        "dim": int(features.shape[1]),
        "sha256": hashlib.sha256(body).hexdigest(),
        **meta,
    }
    text = json.dumps(header, sort_keys=True).encode()
    start = len(MAGIC) + 8
    text += b" " * (-(start + len(text)) % _ALIGN)
    return MAGIC + len(text).to_bytes(8, "little") + text + body


class FeatureCache:
    """Image features on disk under ``root/features``, keyed by encoder, transform, image
    source and view (see the module docstring)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = (Path(root).expanduser() if root else default_cache_dir()) / "features"

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
        except (CorruptCacheError, OSError) as exc:
            log.warning("feature cache: %s is unusable (%s); rebuilding it", path, exc)
            path.unlink(missing_ok=True)
            return None

    def features(
        self,
        encoder: Encoder,
        encoder_id: str,
        images: ImageSource,
        indices: Sequence[int],
        transform: Transform,
        view: int | None = None,
        batch_size: int = 256,
    ) -> Tensor:
        """Features (n, E) of ``images[i]`` for i in ``indices`` (as :func:`encode_images`),
        encoding only the images the cache does not hold yet."""
        wanted = np.asarray(indices, dtype=np.int64)
        if wanted.size == 0:
            return torch.empty(0, 0)
        key = self.key(encoder_id, transform, images, view)
        entry = self.load(key)
        known = np.empty(0, dtype=np.int64) if entry is None else np.asarray(entry.indices)
        missing = np.setdiff1d(wanted, known)
        if missing.size:
            fresh = encode_images(encoder, images, missing.tolist(), transform, view, batch_size)
            meta = {
                "encoder": encoder_id,
                "transform": repr(transform),
                "source": images.fingerprint(),
                "view": view,
            }
            all_indices = np.concatenate([known, missing])
            stacked = fresh.numpy() if entry is None else np.concatenate([entry.features, fresh])
            order = np.argsort(all_indices, kind="stable")
            data = _file_bytes(key, meta, all_indices[order], stacked[order])
            write_bytes_atomic(self.path(key), data)
            log.info("feature cache: encoded %d images into %s", missing.size, self.path(key))
            entry = self.load(key)
            if entry is None:
                raise OSError(f"feature cache: {self.path(key)} could not be read back")
        rows = np.searchsorted(entry.indices, wanted)
        return torch.from_numpy(np.array(entry.features[rows]))

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
