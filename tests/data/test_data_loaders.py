"""Every loader reads its tiny real-format dataset with the right labels, names and counts."""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from fedpgp.data import dataset_names, load_dataset, register
from fedpgp.data.coop import LAYOUTS
from fedpgp.data.datasets import FileImages
from fedpgp.data.domains import DOMAINNET_CLASSES, DOMAINNET_DOMAINS, OFFICE_DOMAINS
from fedpgp.errors import ConfigError

ALL_NAMES = [
    "caltech101",
    "cifar10",
    "cifar100",
    "domainnet",
    "dtd",
    "food101",
    "office_caltech10",
    "oxford_flowers",
    "oxford_pets",
]


def test_every_paper_dataset_is_registered() -> None:
    assert set(ALL_NAMES) <= set(dataset_names())


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_coop_loader(data_root: Path, name: str, formats: SimpleNamespace) -> None:
    classes, counts = formats.COOP_CLASSES, formats.COOP_COUNTS
    splits = load_dataset(name, data_root)
    assert splits.name == name
    assert splits.classnames == ["face", "leopard", "motor bike", "accordion", "air plane"]
    for split, count in counts.items():
        labeled = getattr(splits, split)
        assert len(labeled) == count * len(classes)
        assert np.bincount(labeled.labels).tolist() == [count] * len(classes)
        assert labeled.labels.dtype == np.int64
        assert labeled.domains is None
    image = splits.train.images[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (8, 8)
    images = splits.test.images
    assert isinstance(images, FileImages)
    assert images.path(0).parent.name == "face"


def test_fingerprint_is_stable_across_processes_and_roots(data_root: Path, tmp_path: Path) -> None:
    here = load_dataset("dtd", data_root).fingerprint()
    code = (
        "import sys; from fedpgp.data import load_dataset; "
        "print(load_dataset('dtd', sys.argv[1]).fingerprint())"
    )
    other = subprocess.run(
        [sys.executable, "-c", code, str(data_root)], capture_output=True, text=True, check=True
    )
    assert other.stdout.strip() == here
    # The same files under another data root: relative paths, so the same fingerprint.
    shutil.copytree(data_root / "dtd", tmp_path / "dtd")
    assert load_dataset("dtd", tmp_path).fingerprint() == here
    assert load_dataset("food101", data_root).fingerprint() != here


def test_cifar10_loader(data_root: Path) -> None:
    splits = load_dataset("cifar10", data_root)
    assert splits.classnames[:3] == ["airplane", "automobile", "bird"]
    assert len(splits.train) == 100 and len(splits.test) == 20
    assert np.bincount(splits.train.labels).tolist() == [10] * 10
    assert splits.val is None and splits.coarse_labels is None
    # Pixel layout: the pickle stores each image channel-major (R plane, G plane, B plane).
    with (data_root / "cifar-10-batches-py" / "data_batch_1").open("rb") as handle:
        raw = pickle.load(handle, encoding="latin1")["data"][0]
    image = np.asarray(splits.train.images[0])
    assert image.shape == (32, 32, 3)
    assert image[0, 1, 0] == raw[1] and image[0, 0, 1] == raw[1024] and image[0, 0, 2] == raw[2048]


def test_cifar100_loader_exposes_coarse_labels(data_root: Path, formats: SimpleNamespace) -> None:
    splits = load_dataset("cifar100", data_root)
    assert splits.classnames == [n.replace("_", " ") for n in formats.CIFAR100_FINE]
    assert splits.coarse_labels.tolist() == formats.CIFAR100_GROUP
    assert splits.coarse_names == [n.replace("_", " ") for n in formats.CIFAR100_COARSE]
    assert len(splits.train) == 40 and len(splits.test) == 16


def test_office_loader_fixed_split(data_root: Path, formats: SimpleNamespace) -> None:
    classes, per_class = formats.OFFICE_CLASSES, formats.OFFICE_PER_CLASS
    splits = load_dataset("office_caltech10", data_root)
    assert splits.classnames == ["back pack", "bike", "mug"]
    assert splits.domain_names == list(OFFICE_DOMAINS)
    per_domain_class = len(OFFICE_DOMAINS) * len(classes)
    # Every fifth file of a class folder is a test image: 4 train, 1 test out of 5.
    assert len(splits.train) == per_domain_class * (per_class - 1)
    assert len(splits.test) == per_domain_class
    assert np.bincount(splits.test.domains).tolist() == [len(classes)] * 4
    test_files = {Path(p).name for p in splits.test.images.relpaths}
    assert test_files == {"frame_0004.jpg"}
    # Same files -> same split, no seed involved.
    again = load_dataset("office_caltech10", data_root)
    assert again.fingerprint() == splits.fingerprint()


def test_office_loader_uses_list_files_when_present(
    tmp_path: Path, formats: SimpleNamespace
) -> None:
    formats.write_office(tmp_path, lists=True)
    splits = load_dataset("office_caltech10", tmp_path)
    per_domain_class = len(OFFICE_DOMAINS) * len(formats.OFFICE_CLASSES)
    assert len(splits.test) == 2 * per_domain_class
    assert len(splits.train) == 3 * per_domain_class


def test_office_domain_subset(data_root: Path) -> None:
    splits = load_dataset("office_caltech10", data_root, domains=["webcam", "amazon"])
    assert splits.domain_names == ["amazon", "webcam"]
    assert set(splits.train.domains.tolist()) == {0, 1}
    with pytest.raises(ConfigError, match="domains"):
        load_dataset("office_caltech10", data_root, domains=["mars"])


def test_domainnet_loader_keeps_the_ten_class_subset(data_root: Path) -> None:
    splits = load_dataset("domainnet", data_root)
    assert splits.classnames == [n.replace("_", " ") for n in sorted(DOMAINNET_CLASSES)]
    assert splits.domain_names == list(DOMAINNET_DOMAINS)
    assert len(splits.train) == 6 * 10 * 2 and len(splits.test) == 6 * 10
    assert np.bincount(splits.train.labels).tolist() == [12] * 10
    assert np.bincount(splits.test.domains).tolist() == [10] * 6
    # Re-indexed in sorted name order: label 0 is 'bird', whatever the list file said.
    relpaths = splits.train.images.relpaths
    birds = np.flatnonzero(splits.train.labels == 0)
    assert all(relpaths[i].split("/")[1] == "bird" for i in birds)
    assert not any("aircraft_carrier" in p for p in relpaths)


def test_unknown_dataset_and_option_are_config_errors(data_root: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown dataset 'imagenet'.*caltech101"):
        load_dataset("imagenet", data_root)
    with pytest.raises(ConfigError, match="shots"):
        load_dataset("dtd", data_root, shots=4)


def test_register_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="twice"):
        register("dtd")(lambda root: None)


def test_subset_view(data_root: Path) -> None:
    splits = load_dataset("dtd", data_root)
    subset = splits.train.subset([3, 0])
    assert subset.labels.tolist() == [splits.train.labels[3], splits.train.labels[0]]
    assert np.array_equal(np.asarray(subset.images[0]), np.asarray(splits.train.images[3]))
    assert subset.fingerprint() != splits.train.fingerprint()
