"""CIFAR-10 and CIFAR-100 from torchvision's on-disk format (the original python pickles).

`cifar-10-batches-py/`: data_batch_1..5, test_batch, batches.meta (label_names).
`cifar-100-python/`: train, test (fine_labels, coarse_labels), meta (fine_label_names,
coarse_label_names). Each batch is a dict with `data`, a uint8 array of shape (N, 3072) in
channel-major order, and one label list of length N.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedpgp.data.datasets import (
    ArrayImages,
    DatasetSplits,
    LabeledSet,
    Problems,
    register,
    require_root,
)
from fedpgp.errors import DatasetError

_PIXELS = 3 * 32 * 32

# Only what numpy arrays and protocol-2 bytes need: a pickle naming anything else is refused.
_ALLOWED_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        canonical = module.replace("numpy.core.", "numpy._core.")
        if (canonical, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        # numpy >= 2 calls numpy.core (used by older pickles) numpy._core; numpy 1.x the reverse.
        return super().find_class(
            canonical if hasattr(np, "_core") else canonical.replace("numpy._core.", "numpy.core."),
            name,
        )


@dataclass(frozen=True)
class CifarLayout:
    """File names of one CIFAR variant inside its folder."""

    name: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str


CIFAR10 = CifarLayout(
    "cifar10",
    "cifar-10-batches-py",
    tuple(f"data_batch_{i}" for i in range(1, 6)),
    ("test_batch",),
    "batches.meta",
    "labels",
    "label_names",
)
CIFAR100 = CifarLayout(
    "cifar100", "cifar-100-python", ("train",), ("test",), "meta", "fine_labels", "fine_label_names"
)


def read_pickle(path: Path) -> dict[str, object]:
    """Load one CIFAR pickle as a dict with str keys (the originals are Python 2 pickles)."""
    try:
        with path.open("rb") as handle:
            data = _ArrayUnpickler(handle, encoding="latin1").load()
    except FileNotFoundError as exc:
        raise DatasetError(f"CIFAR file {path}: expected a pickle, found nothing") from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DatasetError(
            f"CIFAR file {path}: expected a pickled dict, cannot unpickle ({exc})"
        ) from exc
    if not isinstance(data, dict):
        raise DatasetError(
            f"CIFAR file {path}: expected a pickled dict, found {type(data).__name__}"
        )
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in data.items()}


def _names(meta: dict[str, object], key: str, path: Path, problems: Problems) -> list[str]:
    names = meta.get(key)
    if not isinstance(names, list) or not names:
        problems.add(
            f"CIFAR file {path}: key '{key}': expected a list of class names, "
            f"found {type(names).__name__}"
        )
        return []
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]


def _labels(batch: dict, key: str, count: int, path: Path, problems: Problems) -> np.ndarray:
    values = batch.get(key)
    if values is None:
        problems.add(f"CIFAR file {path}: missing key '{key}' (found {', '.join(sorted(batch))})")
        return np.zeros(0, dtype=np.int64)
    labels = np.asarray(values)
    if labels.ndim != 1 or labels.shape[0] != count or not np.issubdtype(labels.dtype, np.integer):
        problems.add(
            f"CIFAR file {path}: key '{key}': expected {count} integer labels, "
            f"found {labels.dtype} of shape {labels.shape}"
        )
        return np.zeros(0, dtype=np.int64)
    return labels.astype(np.int64)


def _read_split(
    layout: CifarLayout, folder: Path, files: tuple[str, ...], problems: Problems
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Images, labels and (CIFAR-100) coarse labels of every readable batch of one split."""
    images, labels, coarse = [], [], []
    for filename in files:
        path = folder / filename
        try:
            batch = read_pickle(path)
        except DatasetError as exc:
            problems.add(str(exc))
            continue
        data = batch.get("data")
        if (
            not isinstance(data, np.ndarray)
            or data.ndim != 2
            or data.shape[1] != _PIXELS
            or (data.dtype != np.uint8)
        ):
            found = (
                f"{data.dtype} of shape {data.shape}"
                if isinstance(data, np.ndarray)
                else type(data).__name__
            )
            problems.add(
                f"CIFAR file {path}: key 'data': expected a uint8 array of shape "
                f"(N, {_PIXELS}), found {found}"
            )
            continue
        count = data.shape[0]
        fine = _labels(batch, layout.label_key, count, path, problems)
        grouped = (
            _labels(batch, "coarse_labels", count, path, problems) if (layout is CIFAR100) else fine
        )
        if fine.shape[0] != count or grouped.shape[0] != count:
            continue
        images.append(data.reshape(count, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(fine)
        coarse.append(grouped)
    return images, labels, coarse


def _coarse_per_class(
    fine: np.ndarray, coarse: np.ndarray, num_classes: int, path: Path, problems: Problems
) -> np.ndarray:
    table = np.full(num_classes, -1, dtype=np.int64)
    for label in range(num_classes):
        values = np.unique(coarse[fine == label])
        if values.size != 1:
            problems.add(
                f"CIFAR folder {path}: fine class {label}: expected exactly one coarse "
                f"label, found {values.tolist()}"
            )
        else:
            table[label] = values[0]
    return table


def load_cifar(layout: CifarLayout, root: Path) -> DatasetSplits:
    """Load CIFAR-10 or CIFAR-100 under the data root `root`, reporting every problem."""
    require_root(root, layout.name)
    folder = root / layout.folder
    if not folder.is_dir():
        raise DatasetError(
            f"dataset '{layout.name}': expected folder {folder} in torchvision's format "
            f"({', '.join(layout.train_files + layout.test_files + (layout.meta_file,))}), "
            f"found nothing; `fedpgp data download {layout.name} --root {root}` fetches it"
        )
    problems = Problems(layout.name, folder)
    classnames: list[str] = []
    coarse_names: list[str] | None = None
    try:
        meta = read_pickle(folder / layout.meta_file)
        classnames = _names(meta, layout.names_key, folder / layout.meta_file, problems)
        if layout is CIFAR100:
            coarse_names = _names(meta, "coarse_label_names", folder / layout.meta_file, problems)
    except DatasetError as exc:
        problems.add(str(exc))
    splits = {}
    for split, files in (("train", layout.train_files), ("test", layout.test_files)):
        images, labels, coarse = _read_split(layout, folder, files, problems)
        splits[split] = (images, labels, coarse)
        found = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
        if classnames and found.size and (found.min() < 0 or found.max() >= len(classnames)):
            problems.add(
                f"CIFAR folder {folder}: {split} labels: expected values in "
                f"[0, {len(classnames)}), found {found.min()}..{found.max()}"
            )
    problems.raise_if_any()

    def labeled(split: str) -> LabeledSet:
        images, labels, _ = splits[split]
        return LabeledSet(ArrayImages(np.concatenate(images)), np.concatenate(labels))

    coarse_labels = None
    if layout is CIFAR100:
        fine = np.concatenate(splits["train"][1] + splits["test"][1])
        coarse = np.concatenate(splits["train"][2] + splits["test"][2])
        coarse_labels = _coarse_per_class(fine, coarse, len(classnames), folder, problems)
        problems.raise_if_any()
    return DatasetSplits(
        name=layout.name,
        classnames=list(classnames),
        train=labeled("train"),
        test=labeled("test"),
        coarse_labels=coarse_labels,
        coarse_names=None if coarse_names is None else list(coarse_names),
    )


@register("cifar10")
def load_cifar10(root: Path) -> DatasetSplits:
    """CIFAR-10 from `root/cifar-10-batches-py/` (torchvision's download)."""
    return load_cifar(CIFAR10, root)


@register("cifar100")
def load_cifar100(root: Path) -> DatasetSplits:
    """CIFAR-100 with its 20 coarse classes from `root/cifar-100-python/`."""
    return load_cifar(CIFAR100, root)
