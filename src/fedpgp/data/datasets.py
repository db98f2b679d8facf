"""Dataset registry and the containers every loader returns.

A loader turns a folder laid out the way the community has it on disk into a `DatasetSplits`:
class names plus train / test (and, where the dataset has one, val) `LabeledSet`s. Images are
read lazily; a `LabeledSet` holds only identities (relative paths or an array) and labels, so
loading a dataset is cheap and its fingerprint never needs to decode an image.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from fedpgp.errors import ConfigError, DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_MESSAGE_PROBLEMS = 5  # problems quoted in an exception message; `data check` lists all


@runtime_checkable
class ImageSource(Protocol):
    """A sequence of images, read on demand, with a stable identity."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Image.Image: ...

    def fingerprint(self) -> str: ...


def _sha256(parts: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        # Length-prefix every part so that ("ab", "c") and ("a", "bc") hash differently.
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()


class FileImages:
    """Images stored as files under `root`, identified by their paths relative to it."""

    def __init__(self, root: str | Path, relpaths: Sequence[str]) -> None:
        self.root = Path(root)
        self.relpaths = tuple(relpaths)

    def __len__(self) -> int:
        return len(self.relpaths)

    def path(self, index: int) -> Path:
        """Absolute path of image `index`."""
        return self.root / self.relpaths[index]

    def __getitem__(self, index: int) -> Image.Image:
        return read_image(self.path(index))

    @cached_property
    def _fingerprint(self) -> str:
        return _sha256([b"files"] + [p.encode("utf-8") for p in self.relpaths])

    def fingerprint(self) -> str:
        """sha256 over the relative paths, so a moved data root keeps its fingerprint."""
        return self._fingerprint


class ArrayImages:
    """Images held in memory as a uint8 array of shape (N, H, W, 3)."""

    def __init__(self, array: np.ndarray) -> None:
        if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
            raise DatasetError(
                f"image array: expected uint8 of shape (N, H, W, 3), "
                f"found {array.dtype} of shape {array.shape}"
            )
        self.array = np.ascontiguousarray(array)

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def __getitem__(self, index: int) -> Image.Image:
        return Image.fromarray(self.array[index])

    @cached_property
    def _fingerprint(self) -> str:
        return _sha256([b"array", str(self.array.shape).encode(), self.array.tobytes()])

    def fingerprint(self) -> str:
        """sha256 over the array's shape and bytes."""
        return self._fingerprint


class SubsetImages:
    """A view of some images of another source, in the order of `indices`."""

    def __init__(self, parent: ImageSource, indices: Sequence[int]) -> None:
        self.parent = parent
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, index: int) -> Image.Image:
        return self.parent[int(self.indices[index])]

    def fingerprint(self) -> str:
        """sha256 over the parent's fingerprint and the chosen indices."""
        return _sha256([b"subset", self.parent.fingerprint().encode(), self.indices.tobytes()])


# Modes whose samples exceed 8 bits: PIL's convert("RGB") clips them at 255 instead of scaling.
_WIDE_INTEGER_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB with its full range kept: 16-bit samples (modes I;16 and I, as PNG
    and TIFF store them) are scaled by 255/65535, float images (mode F) in [0, 1] by 255; every
    other mode PIL opens (L, P, CMYK, RGBA, ...) goes through PIL's own conversion."""
    if image.mode in _WIDE_INTEGER_MODES:
        samples = np.asarray(image, dtype=np.float64)
        grey = np.clip(samples, 0, 65535) * (255.0 / 65535.0)
    elif image.mode == "F":
        samples = np.nan_to_num(np.asarray(image, dtype=np.float64))
        scale = 255.0 if samples.size and samples.max() <= 1.0 else 1.0
        grey = np.clip(samples * scale, 0, 255)
    else:
        return image.convert("RGB")
    return Image.fromarray(np.round(grey).astype(np.uint8)).convert("RGB")


def read_image(path: Path) -> Image.Image:
    """Open an image file and decode it fully as RGB; any failure is a DatasetError."""
    try:
        with Image.open(path) as image:
            return to_rgb(image)
    except FileNotFoundError as exc:
        raise DatasetError(f"image {path}: listed in the split but the file is absent") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(
            f"image {path}: expected a readable image file, found an unreadable or "
            f"truncated one ({exc})"
        ) from exc


def image_file(images: ImageSource, index: int) -> Path | None:
    """The file image ``index`` of ``images`` is read from, or None for a source held in memory
    or generated (whose fingerprint already covers its pixels)."""
    if isinstance(images, FileImages):
        return images.path(index)
    if isinstance(images, SubsetImages):
        return image_file(images.parent, int(images.indices[index]))
    return None


def _as_int64(values: Sequence[int] | np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise DatasetError(
            f"{what}: expected a 1-d integer array, found {array.dtype}{array.shape}"
        )
    return array.astype(np.int64)


@dataclass(frozen=True, eq=False)
class LabeledSet:
    """Images with one integer label each (and a domain id each, for domain datasets)."""

    images: ImageSource
    labels: np.ndarray
    domains: np.ndarray | None = None

    def __post_init__(self) -> None:
        # Frozen dataclass: normalise the arrays once, through object.__setattr__.
        object.__setattr__(self, "labels", _as_int64(self.labels, "labels"))
        if len(self.images) != self.labels.shape[0]:
            raise DatasetError(
                f"labeled set: {len(self.images)} images but {self.labels.shape[0]} labels"
            )
        if self.domains is not None:
            object.__setattr__(self, "domains", _as_int64(self.domains, "domains"))
            if self.domains.shape != self.labels.shape:
                raise DatasetError(
                    f"labeled set: {self.labels.shape[0]} labels but "
                    f"{self.domains.shape[0]} domain ids"
                )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @cached_property
    def _fingerprint(self) -> str:
        parts = [b"labeled", self.images.fingerprint().encode(), self.labels.tobytes()]
        if self.domains is not None:
            parts.append(self.domains.tobytes())
        return _sha256(parts)

    def fingerprint(self) -> str:
        """sha256 over the image identities, the labels and the domain ids."""
        return self._fingerprint

    def subset(self, indices: Sequence[int] | np.ndarray) -> LabeledSet:
        """The items at `indices` (in that order) as a new LabeledSet."""
        index = _as_int64(indices, "subset indices")
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise DatasetError(
                f"subset indices: expected values in [0, {len(self)}), "
                f"found {int(index.min())}..{int(index.max())}"
            )
        domains = None if self.domains is None else self.domains[index]
        return LabeledSet(SubsetImages(self.images, index), self.labels[index], domains)


@dataclass(frozen=True, eq=False)
class DatasetSplits:
    """One dataset: class names (index == label) and its train / test / val sets.

    `coarse_labels[c]` is the superclass id of class `c` (CIFAR-100 only), named by
    `coarse_names`; the hierarchical partition needs them.
    """

    name: str
    classnames: list[str]
    train: LabeledSet
    test: LabeledSet
    val: LabeledSet | None = None
    domain_names: list[str] | None = None
    coarse_labels: np.ndarray | None = None
    coarse_names: list[str] | None = None

    def __post_init__(self) -> None:
        # Every loader's names, spelled as PromptBank spells them.
        object.__setattr__(self, "classnames", [normalize_classname(n) for n in self.classnames])
        if self.coarse_names is not None:
            normalized = [normalize_classname(n) for n in self.coarse_names]
            object.__setattr__(self, "coarse_names", normalized)
        num_classes = len(self.classnames)
        for split, labeled in (("train", self.train), ("test", self.test), ("val", self.val)):
            if labeled is None or len(labeled) == 0:
                continue
            low, high = int(labeled.labels.min()), int(labeled.labels.max())
            if low < 0 or high >= num_classes:
                raise DatasetError(
                    f"dataset '{self.name}' {split}: expected labels in [0, {num_classes}), "
                    f"found {low}..{high}"
                )
        if self.coarse_labels is not None:
            object.__setattr__(
                self, "coarse_labels", _as_int64(self.coarse_labels, "coarse labels")
            )
            if self.coarse_labels.shape[0] != num_classes:
                raise DatasetError(
                    f"dataset '{self.name}': expected one coarse label per class "
                    f"({num_classes}), found {self.coarse_labels.shape[0]}"
                )

    @property
    def num_classes(self) -> int:
        """Number of classes (labels are 0 .. num_classes - 1)."""
        return len(self.classnames)

    @cached_property
    def _fingerprint(self) -> str:
        parts = [b"splits", self.name.encode(), "\n".join(self.classnames).encode()]
        for labeled in (self.train, self.test, self.val):
            parts.append(b"-" if labeled is None else labeled.fingerprint().encode())
        parts.append("\n".join(self.domain_names or []).encode())
        if self.coarse_labels is not None:
            parts.append(self.coarse_labels.tobytes())
        return _sha256(parts)

    def fingerprint(self) -> str:
        """sha256 over the name, class names and every split's fingerprint."""
        return self._fingerprint


Loader = Callable[..., DatasetSplits]
_LOADERS: dict[str, Loader] = {}


def register(name: str) -> Callable[[Loader], Loader]:
    """Decorator that registers a loader `fn(root: Path, **options) -> DatasetSplits`."""

    def decorator(loader: Loader) -> Loader:
        if name in _LOADERS:
            raise ValueError(f"dataset loader '{name}' is registered twice")
        _LOADERS[name] = loader
        return loader

    return decorator


def dataset_names() -> list[str]:
    """Names of every registered dataset, sorted."""
    return sorted(_LOADERS)


def load_dataset(name: str, root: str | Path, **options: object) -> DatasetSplits:
    """Load dataset `name` from the data root `root` (the folder holding every dataset)."""
    if name not in _LOADERS:
        raise ConfigError(
            f"dataset.name: unknown dataset '{name}'; known: {', '.join(dataset_names())}"
        )
    loader = _LOADERS[name]
    accepted = [p for p in inspect.signature(loader).parameters if p != "root"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"dataset option(s) {', '.join(unknown)} not accepted by '{name}'; "
            f"accepted: {', '.join(accepted) or 'none'}"
        )
    root_path = Path(root).expanduser()
    return loader(root_path, **options)


def require_root(root: Path, dataset: str) -> None:
    """Raise DatasetError unless the data root `root` is a folder (loaders that read files)."""
    if not root.is_dir():
        raise DatasetError(
            f"data root {root}: expected a folder holding the '{dataset}' dataset, "
            f"found {'a file' if root.exists() else 'nothing'}"
        )


class DatasetProblemsError(DatasetError):
    """A dataset folder with one or more problems; `problems` lists every one of them."""

    def __init__(self, dataset: str, location: Path, problems: list[str]) -> None:
        self.dataset = dataset
        self.location = location
        self.problems = list(problems)
        shown = "; ".join(self.problems[:_MESSAGE_PROBLEMS])
        more = len(self.problems) - _MESSAGE_PROBLEMS
        tail = f"; and {more} more (run `fedpgp data check {dataset}` to list all)"
        super().__init__(
            f"dataset '{dataset}' at {location}: {len(self.problems)} problem(s): {shown}"
            + (tail if more > 0 else "")
        )


class Problems:
    """Collects every problem found while loading, so that all are reported at once."""

    def __init__(self, dataset: str, location: Path) -> None:
        self.dataset = dataset
        self.location = location
        self.items: list[str] = []

    def add(self, message: str) -> None:
        """Record one problem: it should name the path or key, what was expected and found."""
        self.items.append(message)

    def raise_if_any(self) -> None:
        """Raise a DatasetProblemsError listing every recorded problem, if there is one."""
        if self.items:
            raise DatasetProblemsError(self.dataset, self.location, self.items)


def check_listed_files(
    root: Path, relpaths: Iterable[str], listed_in: str, problems: Problems
) -> None:
    """Record a problem for each relative path under `root` that is not a regular file: absent,
    or a folder (or a broken link) of that name. One directory scan per folder and no stat per
    file, so that checking a large dataset stays cheap."""
    listings: dict[str, dict[str, os.DirEntry[str]]] = {}
    for relpath in relpaths:
        folder, _, filename = relpath.rpartition("/")
        if folder not in listings:
            try:
                with os.scandir(root / folder) as entries:
                    listings[folder] = {entry.name: entry for entry in entries}
            except (FileNotFoundError, NotADirectoryError):
                listings[folder] = {}
        entry = listings[folder].get(filename)
        if entry is None:
            problems.add(f"image {root / relpath}: listed in {listed_in} but absent")
        elif not entry.is_file():  # the scan's file type: no stat unless it is a link
            found = "a folder" if entry.is_dir() else "a broken link or a special file"
            problems.add(
                f"image {root / relpath}: listed in {listed_in}; expected an image file, "
                f"found {found}"
            )


def check_relative(relpath: str) -> bool:
    """True when `relpath` stays inside its root (no absolute path, no '..')."""
    parts = relpath.replace("\\", "/").split("/")
    return bool(relpath) and not relpath.startswith("/") and ".." not in parts


def normalize_classname(name: str) -> str:
    """The one spelling of a class name that prompts are built from (CoOp's): underscores
    become spaces, runs of white space one space, and the ends are stripped."""
    return " ".join(name.replace("_", " ").split())
