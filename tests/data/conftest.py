"""Fixtures that write tiny datasets in the real on-disk formats, and in-memory splits.

Every writer produces the layout the real dataset has (CoOp split JSON + image folders,
torchvision's CIFAR pickles, domain folders with list files), with a few 8x8 JPEGs per class.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from fedpgp.data.coop import LAYOUTS, CoOpLayout
from fedpgp.data.datasets import ArrayImages, DatasetSplits, LabeledSet
from fedpgp.data.domains import DOMAINNET_CLASSES, DOMAINNET_DOMAINS, OFFICE_DOMAINS

# Class names as the split files spell them (underscores kept, CoOp turns them into spaces).
COOP_CLASSES = ["face", "leopard", "motor_bike", "accordion", "air_plane"]
COOP_COUNTS = {"train": 4, "val": 1, "test": 2}
OFFICE_CLASSES = ["back_pack", "bike", "mug"]
OFFICE_PER_CLASS = 5
# DomainNet list labels index its 345 classes; these are arbitrary distinct stand-ins.
DOMAINNET_LABELS = {name: 20 + 7 * i for i, name in enumerate(DOMAINNET_CLASSES)}
DOMAINNET_EXTRA = ("aircraft_carrier", 0)  # a class outside the 10-class subset


def write_jpeg(path: Path, value: int = 0) -> None:
    """An 8x8 RGB JPEG whose pixels encode `value` (so images differ)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((8, 8, 3), (value * 37) % 256, dtype=np.uint8)
    pixels[..., 1] = (value * 11) % 256
    Image.fromarray(pixels).save(path, format="JPEG")


def write_coop(
    root: Path,
    layout: CoOpLayout,
    classes: list[str] = COOP_CLASSES,
    counts: dict[str, int] = COOP_COUNTS,
) -> dict[str, list]:
    """Write one CoOp dataset (images + split_zhou JSON) under `root`; returns the split."""
    image_dir = root / layout.folder / layout.image_dir
    split: dict[str, list] = {name: [] for name in counts}
    serial = 0
    for label, classname in enumerate(classes):
        for name, count in counts.items():
            for _ in range(count):
                relpath = f"{classname}/image_{serial:04d}.jpg"
                write_jpeg(image_dir / relpath, serial)
                split[name].append([relpath, label, classname])
                serial += 1
    (root / layout.folder / layout.split_file).write_text(json.dumps(split), encoding="utf-8")
    return split


def write_cifar_batch(path: Path, data: np.ndarray, labels: dict[str, list[int]]) -> None:
    """One batch as torchvision reads it: a protocol-2 pickle of a dict with 'data' + labels."""
    entry: dict[str, object] = {
        "batch_label": f"batch {path.name}",
        "data": data,
        "filenames": [f"img_{i}.png" for i in range(len(data))],
        **labels,
    }
    with path.open("wb") as handle:
        pickle.dump(entry, handle, protocol=2)


def _cifar_pixels(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.integers(0, 256, size=(count, 3 * 32 * 32), dtype=np.uint8)


def write_cifar10(root: Path, per_batch: int = 20, test: int = 20) -> Path:
    """`cifar-10-batches-py` with 5 training batches, a test batch and batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        labels = [int(v) for v in np.arange(per_batch) % 10]
        write_cifar_batch(
            folder / f"data_batch_{i}", _cifar_pixels(rng, per_batch), {"labels": labels}
        )
    write_cifar_batch(
        folder / "test_batch",
        _cifar_pixels(rng, test),
        {"labels": [int(v) for v in np.arange(test) % 10]},
    )
    names = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    with (folder / "batches.meta").open("wb") as handle:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch}, handle, protocol=2)
    return folder


CIFAR100_FINE = ["apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle"]
CIFAR100_COARSE = ["fruit_and_vegetables", "fish", "people", "large_carnivores"]
CIFAR100_GROUP = [0, 1, 2, 3, 1, 2, 3, 0]  # coarse label of each fine class


def write_cifar100(root: Path, train: int = 40, test: int = 16) -> Path:
    """`cifar-100-python` with train, test (fine + coarse labels) and meta."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, count in (("train", train), ("test", test)):
        fine = [int(v) for v in np.arange(count) % len(CIFAR100_FINE)]
        write_cifar_batch(
            folder / name,
            _cifar_pixels(rng, count),
            {"fine_labels": fine, "coarse_labels": [CIFAR100_GROUP[f] for f in fine]},
        )
    with (folder / "meta").open("wb") as handle:
        pickle.dump(
            {"fine_label_names": CIFAR100_FINE, "coarse_label_names": CIFAR100_COARSE},
            handle,
            protocol=2,
        )
    return folder


def write_office(root: Path, lists: bool = False) -> Path:
    """`office_caltech10/<domain>/<class>/*.jpg`; with `lists`, also <domain>_train/test.txt."""
    folder = root / "office_caltech10"
    serial = 0
    for domain in OFFICE_DOMAINS:
        lines: dict[str, list[str]] = {"train": [], "test": []}
        for label, classname in enumerate(OFFICE_CLASSES):
            for i in range(OFFICE_PER_CLASS):
                relpath = f"{domain}/{classname}/frame_{i:04d}.jpg"
                write_jpeg(folder / relpath, serial)
                serial += 1
                lines["test" if i < 2 else "train"].append(f"{relpath} {label}")
        if lists:
            for split, items in lines.items():
                (folder / f"{domain}_{split}.txt").write_text("\n".join(items) + "\n")
    return folder


def write_domainnet(root: Path, train: int = 2, test: int = 1) -> Path:
    """`domainnet/<domain>/<class>/<file>` with the official list files (plus an extra class)."""
    folder = root / "domainnet"
    serial = 0
    classes = [*DOMAINNET_LABELS.items(), DOMAINNET_EXTRA]
    for domain in DOMAINNET_DOMAINS:
        for split, count in (("train", train), ("test", test)):
            lines = []
            for classname, label in classes:
                for _ in range(count):
                    relpath = f"{domain}/{classname}/{domain}_{serial:06d}.jpg"
                    write_jpeg(folder / relpath, serial)
                    serial += 1
                    lines.append(f"{relpath} {label}")
            (folder / f"{domain}_{split}.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only data root holding every dataset in its real format (written once)."""
    root = tmp_path_factory.mktemp("data")
    for layout in LAYOUTS.values():
        write_coop(root, layout)
    write_cifar10(root)
    write_cifar100(root)
    write_office(root)
    write_domainnet(root)
    return root


@pytest.fixture
def copy_dataset(data_root: Path, tmp_path: Path) -> Callable[[str], Path]:
    """Copy one dataset folder of `data_root` into a fresh root that a test may damage."""

    def copy(folder: str) -> Path:
        shutil.copytree(data_root / folder, tmp_path / folder)
        return tmp_path

    return copy


def make_splits(
    num_classes: int,
    train_per_class: int | list[int],
    test_per_class: int | list[int],
    *,
    domains: int = 0,
    coarse: list[int] | None = None,
    name: str = "synthetic",
) -> DatasetSplits:
    """In-memory splits (1x1 images) for partition tests: per-class counts, optional domains.

    With `domains` > 0 every class has the given counts in each domain.
    """

    def build(per_class: int | list[int]) -> LabeledSet:
        counts = [per_class] * num_classes if isinstance(per_class, int) else per_class
        labels = np.repeat(np.arange(num_classes), counts)
        domain_ids = None
        if domains:
            labels = np.tile(labels, domains)
            domain_ids = np.repeat(np.arange(domains), sum(counts))
        pixels = np.zeros((len(labels), 1, 1, 3), dtype=np.uint8)
        return LabeledSet(ArrayImages(pixels), labels, domain_ids)

    return DatasetSplits(
        name=name,
        classnames=[f"class {c}" for c in range(num_classes)],
        train=build(train_per_class),
        test=build(test_per_class),
        domain_names=[f"domain{d}" for d in range(domains)] if domains else None,
        coarse_labels=None if coarse is None else np.asarray(coarse),
    )


@pytest.fixture(scope="session")
def splits_factory() -> Callable[..., DatasetSplits]:
    """`make_splits` as a fixture, so test modules need not import this conftest."""
    return make_splits


@pytest.fixture(scope="session")
def formats() -> SimpleNamespace:
    """The writers and constants above, for tests (conftest modules are not importable)."""
    return SimpleNamespace(
        write_jpeg=write_jpeg,
        write_coop=write_coop,
        write_cifar_batch=write_cifar_batch,
        write_cifar10=write_cifar10,
        write_cifar100=write_cifar100,
        write_office=write_office,
        write_domainnet=write_domainnet,
        COOP_CLASSES=COOP_CLASSES,
        COOP_COUNTS=COOP_COUNTS,
        OFFICE_CLASSES=OFFICE_CLASSES,
        OFFICE_PER_CLASS=OFFICE_PER_CLASS,
        CIFAR100_FINE=CIFAR100_FINE,
        CIFAR100_COARSE=CIFAR100_COARSE,
        CIFAR100_GROUP=CIFAR100_GROUP,
    )
